"""Image-editing metrics of the PIE-Bench benchmark (``metrics``), as its evaluation code computes them."""
