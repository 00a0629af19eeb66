"""PIE-Bench (Ju et al., "PnP Inversion", ICLR 2024): run any inversion x editor of the pack on the benchmark and
score it with the benchmark's own metrics.

    python benchmarks/piebench.py run --data PIE_DIR --model MODEL --cases CASE... --out OUT_DIR
        [--types 0 1 ...] [--limit N] [--shard K/N] [--steps 50] [--cfg 7.5] [--device cuda] [--half]
    python benchmarks/piebench.py evaluate --data PIE_DIR --out OUT_DIR [--dino PATH] [--clip PATH]
        [--lpips SQUEEZENET_WEIGHTS] [--cases ...] [--types ...] [--per-type]
    python benchmarks/piebench.py toy-data --out PIE_DIR [--per-type 10]

PIE_DIR is the benchmark's ``data`` folder (``mapping_file.json`` and ``annotation_images/``). MODEL is a local
diffusers Stable Diffusion folder or ``toy`` (the project's trained toy model; ``toy-data`` writes a small
benchmark in PIE-Bench's format that it can edit). CASE is INVERSION[+EDITOR]: ddim+p2p, directinversion+p2p,
null_text+p2p, negative_prompt+p2p, edict, ddim+masactrl, directinversion+masactrl, ddim+pnp, directinversion+pnp,
ddim+p2p_zero, directinversion+p2p_zero (see benchmarks/pie/cases.py). Runs resume (edits already saved are skipped); ``--shard K/N`` lets N processes
share the images. ``evaluate`` writes per_image.csv, summary.md and summary.png into OUT_DIR.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "comfyui_direct_inversion"


def _paths() -> None:
    """``benchmarks`` and the tests' helpers importable. The repository goes last on the path: its ``nodes``
    package must not shadow ComfyUI's ``nodes`` module (``--comfyui``)."""
    if str(ROOT / "tests") not in sys.path:
        sys.path.insert(0, str(ROOT / "tests"))
    if str(ROOT) not in sys.path:
        sys.path.append(str(ROOT))


def _pack():
    """The pack's diffusers backend, editors and metrics (the repository folder may not be an importable name)."""
    _paths()
    import importlib

    import di_testing

    di_testing.load_pack(PACKAGE)
    di = importlib.import_module(f"{PACKAGE}.adapters.diffusers_backend")
    editors = importlib.import_module(f"{PACKAGE}.editors")
    return di, editors


def _metrics():
    _paths()
    import importlib

    import di_testing

    di_testing.load_pack(PACKAGE)
    return importlib.import_module(f"{PACKAGE}.evaluation.metrics")


def _progress(description: str):
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return lambda total: tqdm(total=total, desc=description, unit="image", dynamic_ncols=True)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="piebench.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="edit the benchmark's images with each case")
    r.add_argument("--data", required=True, help="the benchmark's data folder (mapping_file.json, annotation_images/)")
    r.add_argument("--model", help="a local diffusers SD1.x/SD2.x folder, or `toy`")
    r.add_argument("--comfyui", metavar="CHECKPOINT", help="instead of --model: run the cases through ComfyUI "
                   "headless (the sample workflows' graph) with this file of ComfyUI's models/checkpoints")
    r.add_argument("--comfyui-path", help="ComfyUI's folder (default: $COMFYUI_PATH, else the ComfyUI this pack "
                   "is installed in)")
    r.add_argument("--resolution", type=int, default=512, help="with --comfyui: the size images are edited at "
                   "(512 for SD1.x; 1024 for SDXL)")
    r.add_argument("--cases", nargs="+", default=None, help="INVERSION[+EDITOR] ... (default: ddim+p2p "
                   "directinversion+p2p)")
    r.add_argument("--out", required=True, help="output folder (one subfolder per case)")
    r.add_argument("--types", nargs="+", default=None, help="editing types to run (0-9; default all)")
    r.add_argument("--limit", type=int, default=None, help="at most this many images (after --types)")
    r.add_argument("--shard", default=None, help="K/N: this process takes every N-th image from the K-th (0-based)")
    r.add_argument("--steps", type=int, default=50, help="DDIM steps (benchmark: 50)")
    r.add_argument("--cfg", type=float, default=7.5, help="classifier-free guidance of the edit (benchmark: 7.5)")
    r.add_argument("--masactrl-layer", type=int, default=None, help="MasaCtrl's first layer (default: 10 of SD1.x's "
                   "16, the same place on other UNets)")
    r.add_argument("--pnp-block", type=int, default=4, help="PnP's decoder block for feature injection and the "
                   "first with attention injection (reference: 4)")
    r.add_argument("--p2p-zero-guidance", type=float, default=0.1, help="Pix2Pix-Zero's cross-attention guidance "
                   "step (benchmark: 0.1)")
    r.add_argument("--p2p-mode", default="refine", choices=("refine", "replace", "auto"), help="Prompt-to-Prompt's "
                   "mode (benchmark: refine for every image)")
    r.add_argument("--png", action="store_true", help="save edits losslessly (default: JPEG at quality 75, as the "
                   "benchmark's runs saved theirs)")
    r.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda when available)")
    r.add_argument("--half", action="store_true", help="float16 weights (diffusers models on a GPU)")
    r.add_argument("--comfyui-loader", default="CheckpointLoaderSimple", help=argparse.SUPPRESS)  # tests: a stand-in

    e = sub.add_parser("evaluate", help="score the saved edits with the benchmark's metrics")
    e.add_argument("--data", required=True)
    e.add_argument("--out", required=True, help="the run's output folder; the reports are written here")
    e.add_argument("--dino", help="DINO ViT-B/8 (transformers format, e.g. a local facebook/dino-vitb8) for the "
                   "structure distance; without it the metric is skipped")
    e.add_argument("--clip", help="CLIP ViT-L/14 (local openai/clip-vit-large-patch14) for the CLIP similarities")
    e.add_argument("--lpips", help="torchvision's SqueezeNet 1.1 weights file (default: torch's hub cache) for LPIPS")
    e.add_argument("--cases", nargs="+", default=None, help="case folders to score (default: all)")
    e.add_argument("--types", nargs="+", default=None)
    e.add_argument("--per-type", action="store_true", help="also one table per editing type")
    e.add_argument("--device", default=None, help="where DINO and CLIP run (default: cuda when available)")

    t = sub.add_parser("toy-data", help="write the toy benchmark (PIE-Bench's format, the toy model's data)")
    t.add_argument("--out", required=True)
    t.add_argument("--per-type", type=int, default=10, help="images per editing type (default 10)")
    return p


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    _paths()
    from benchmarks.pie import cases as pie_cases
    from benchmarks.pie import data as pie_data
    from benchmarks.pie import models, report, run, toy_bench

    try:
        if args.command == "toy-data":
            root = toy_bench.build(args.out, per_type=args.per_type)
            print(f"toy benchmark: {len(pie_data.load(root))} images in {root}")
            return 0
        if args.command == "evaluate":
            import torch

            device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
            result = report.evaluate(_metrics(), args.data, args.out, cases=args.cases, dino=args.dino,
                                     clip=args.clip, lpips=args.lpips, types=args.types, per_type=args.per_type,
                                     device=device, progress=_progress("evaluate"))
            print((Path(args.out) / "summary.md").read_text(encoding="utf-8"))
            print(f"wrote {len(result['rows'])} rows to {Path(args.out) / 'per_image.csv'}, summary.md, summary.png")
            return 0
        # run
        if bool(args.comfyui) == bool(args.model):
            print("piebench: run needs --model (a local diffusers folder or `toy`) or --comfyui CHECKPOINT",
                  file=sys.stderr)
            return 2
        import torch

        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        settings = pie_cases.Settings(steps=args.steps, cfg=args.cfg, masactrl_layer=args.masactrl_layer,
                                      pnp_block=args.pnp_block, p2p_mode=args.p2p_mode,
                                      p2p_zero_guidance=args.p2p_zero_guidance,
                                      save_format="png" if args.png else "jpg")
        cases = [pie_cases.parse_case(c, settings) for c in (args.cases or pie_cases.DEFAULT_CASES)]
        entries = pie_data.load(args.data, types=args.types, limit=args.limit,
                                shard=pie_data.parse_shard(args.shard))
        if args.comfyui:
            from benchmarks.pie import comfy

            _pack()
            runner = comfy.ComfyRunner(PACKAGE, args.comfyui_path, args.comfyui, resolution=args.resolution,
                                       cpu=device == "cpu", loader=args.comfyui_loader)
        else:
            runner = run.DiffusersRunner(_pack(), models.load_model(args.model, device=device, half=args.half))
        print(f"piebench: {len(entries)} image(s) x {len(cases)} case(s) on {runner.name} ({device}), "
              f"{settings.steps} steps, cfg {settings.cfg}")
        try:
            counts = run.run(runner, cases, entries, args.out, shard=pie_data.parse_shard(args.shard),
                             progress=_progress("edit"))
        finally:
            runner.close()
        for name, c in counts.items():
            print(f"{name}: {c['done']} edited, {c['skipped']} already done, {c['failed']} failed")
        return 1 if any(c["failed"] for c in counts.values()) else 0
    except (pie_data.DataError, pie_cases.CaseError, models.ModelError, run.RunError) as err:
        print(f"piebench: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
