"""PIE-Bench (Ju et al., ICLR 2024) for the pack: the data format, the cases, the runs and the report.

The command is ``benchmarks/piebench.py``; the metrics live in the pack (``evaluation/metrics.py``), where the
Edit Metrics node uses them too.
"""
