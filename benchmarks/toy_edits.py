"""Does an edit edit? Conditioning, reconstruction and edits of the project's trained toy model (benchmarks/toy/).

    python benchmarks/toy_edits.py [--json PATH] [--images 50] [--captions 100] [--steps 50] [--workers 2]

Prints three tables and writes them as JSON (``conditioning``, ``reconstruction``, ``edits``: lists of rows):

1. conditioning: images sampled (DDIM, ``--steps``, cfg 7.5) from held-out captions, judged by the analytic
   checker (benchmarks/toy/checker.py): the share with the caption's colour, shape, style and background;
2. reconstruction: latent MSE against the VAE latent and pixel PSNR against the image, per inversion method,
   from the source branch of an edit (editors act on the target branch only; the source branch is the method's
   reconstruction: DDIM without offsets, Direct Inversion's pinned branch, the other methods as they sample);
3. edits on held-out solid-style images: a colour swap (the object's colour word replaced by another colour) with no
   editor, Prompt-to-Prompt (replace, local blend on the shape word), MasaCtrl, Plug-and-Play and Pix2Pix-Zero (its
   cross-attention guidance at the reference's step 0.1, at 100 and off; the target conditioning is the source
   caption's embedding plus the edit direction, the negative prompt the source caption, as PnPInversion's
   Pix2Pix-Zero runs), a style edit (solid -> hollow) with Plug-and-Play, and identity edits (target prompt = source
   prompt; Direct Inversion, so the source branch the editors read is the exact inversion while the target samples
   freely at cfg 7.5) without an editor, with MasaCtrl and with Plug-and-Play. Each row: edit success (the target
   attribute read off the edited image by the checker; for identity edits, colour, shape and style unchanged),
   background PSNR/SSIM/MSE outside the source's object mask (grown by 2 px), the source/edit silhouette IoU,
   whether the shape is still read as the source's, whole-image PSNR against the source, UNet evaluations (samples,
   not calls) and seconds per image (inversion included).

Everything runs through the pack's diffusers backend (adapters/diffusers_backend.py) on the CPU. Images are
processed in groups of ``--group`` (one batched call per step; every caption has the same token layout, so one
editor's token positions serve the whole group); null-text inversion optimises each image on its own, as the
reference does.
"""
from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "comfyui_direct_inversion"

EDIT_CFG = 7.5


def _pack():
    """The pack's diffusers backend and editors, and the toy package (the repository folder may not be an
    importable name)."""
    for path in (str(ROOT / "tests"), str(ROOT)):
        if path not in sys.path:
            sys.path.insert(0, path)
    import di_testing

    di_testing.load_pack(PACKAGE)
    from comfyui_direct_inversion import editors
    from comfyui_direct_inversion.adapters import diffusers_backend

    from benchmarks.toy import checker, data, model
    return (diffusers_backend, editors), data, checker, model


# (row name, method, offsets, editor, edit kind[, options]). Options: "negative", the unconditional input of the
# edit: "null" (the empty prompt; the default) or "source" (the source caption); "xa_guidance", Pix2Pix-Zero's
# guidance step (default the editor's, the reference's 0.1; 0: the edit direction alone).
P2P_ZERO = {"negative": "source"}  # PnPInversion's Pix2Pix-Zero runs: the caption is the negative prompt too
EDIT_ROWS = (
    ("DDIM, no editor", "ddim", "off", None, "colour"),
    ("Direct Inversion, no editor", "ddim", "source", None, "colour"),
    ("DDIM + P2P", "ddim", "off", "p2p", "colour"),
    ("Direct Inversion + P2P", "ddim", "source", "p2p", "colour"),
    ("Null-text + P2P", "null_text", "off", "p2p", "colour"),
    ("Negative-prompt + P2P", "negative_prompt", "off", "p2p", "colour"),
    ("EDICT + P2P", "edict", "off", "p2p", "colour"),
    ("DDIM + MasaCtrl", "ddim", "off", "masactrl", "colour"),
    ("Direct Inversion + MasaCtrl", "ddim", "source", "masactrl", "colour"),
    ("DDIM + PnP", "ddim", "off", "pnp", "colour"),
    ("Direct Inversion + PnP", "ddim", "source", "pnp", "colour"),
    ("DDIM + P2P-Zero", "ddim", "off", "p2p_zero", "colour", P2P_ZERO),
    ("Direct Inversion + P2P-Zero", "ddim", "both", "p2p_zero", "colour", P2P_ZERO),
    ("Direct Inversion + P2P-Zero (no guidance)", "ddim", "both", "p2p_zero", "colour",
     {**P2P_ZERO, "xa_guidance": 0.0}),
    # The reference's step (0.1) barely moves this toy's latent (the loss drops < 0.01 % per step); 100 does
    # (benchmarks/results/toy_p2p_zero.md).
    ("Direct Inversion + P2P-Zero (guidance 100)", "ddim", "both", "p2p_zero", "colour",
     {**P2P_ZERO, "xa_guidance": 100.0}),
    ("DDIM + PnP (style)", "ddim", "off", "pnp", "style"),
    ("Direct Inversion + PnP (style)", "ddim", "source", "pnp", "style"),
    ("Direct Inversion, no editor (identity)", "ddim", "source", None, "identity"),
    ("Direct Inversion + MasaCtrl (identity)", "ddim", "source", "masactrl", "identity"),
    ("Direct Inversion + PnP (identity)", "ddim", "source", "pnp", "identity"),
)
# Reconstruction rows: (row name, method, offsets, cfg); taken from the source branch of an edit of the same image.
RECONSTRUCTION_ROWS = (
    ("DDIM, cfg 1", "ddim", "off", 1.0),
    ("DDIM, cfg 7.5", "ddim", "off", EDIT_CFG),
    ("Direct Inversion, cfg 7.5", "ddim", "source", EDIT_CFG),
    ("Null-text, cfg 7.5", "null_text", "off", EDIT_CFG),
    ("Negative-prompt, cfg 7.5", "negative_prompt", "off", EDIT_CFG),
    ("EDICT (its guidance 3)", "edict", "off", EDIT_CFG),
)


# Editors whose source branch is predicted from its conditional half alone: their source branch is no cfg-7.5
# reconstruction.
SOURCE_UNGUIDED = ("pnp", "p2p_zero")


def edit_row(row: tuple) -> tuple:
    """(name, method, offsets, editor, edit kind, options) of an EDIT_ROWS entry (options {} when it has none)."""
    return (*row, {}) if len(row) == 5 else tuple(row)


def colour_target(sample, seed: int) -> str:
    """Another object colour, chosen by the image's seed."""
    import numpy as np

    from benchmarks.toy import data

    others = [c for c in data.COLOURS if c != sample.colour]
    return others[int(np.random.default_rng(seed + 7).integers(len(others)))]


def edit_seeds(count: int) -> list[int]:
    """The first ``count`` held-out seeds whose image is solid (the style edit turns it hollow)."""
    from benchmarks.toy import data

    seeds, seed = [], data.HELD_OUT_SEED + 100_000
    while len(seeds) < count:
        if data.draw(seed).style == "solid":
            seeds.append(seed)
        seed += 1
    return seeds


# ---------------------------------------------------------------------------------------------------------- parts

def conditioning(toy, data, checker, captions: int, steps: int, cfg: float = EDIT_CFG, chunk: int = 50) -> list[dict]:
    """Sample from held-out captions with the pack's DDIM schedule and judge each image."""
    samples = [data.draw(seed) for seed in data.held_out_seeds(captions)]
    scheduler = toy.scheduler
    scheduler.set_timesteps(steps)
    hits = {"colour": 0, "shape": 0, "style": 0, "background": 0}
    for first in range(0, len(samples), chunk):
        part = samples[first:first + chunk]
        cond = toy.embed([s.caption for s in part])
        uncond = toy.embed([""] * len(part))
        z = torch.randn(len(part), 4, 16, 16, generator=torch.Generator().manual_seed(first))
        with torch.no_grad():
            for t in scheduler.timesteps:
                eps = toy.unet(torch.cat([z, z]), t, encoder_hidden_states=torch.cat([uncond, cond])).sample
                eps_u, eps_c = eps.chunk(2)
                z = scheduler.step(eps_u + cfg * (eps_c - eps_u), t, z).prev_sample
        images = toy.decode(z)
        for image, sample in zip(images, part):
            seen = checker.analyse(image)
            for attribute in hits:
                hits[attribute] += getattr(seen, attribute) == getattr(sample, attribute)
    targets = {"colour": 0.9, "shape": 0.8, "style": None, "background": None}
    return [{"attribute": a, "correct": n, "total": len(samples), "share": n / len(samples), "target": targets[a],
             "steps": steps, "cfg": cfg} for a, n in hits.items()]


def _editor(pack, toy, kind: str, source_text: str, target_text: str, shape_word: str, options: dict):
    editors = pack[1]
    if kind is None:
        return None
    if kind == "p2p":
        from benchmarks.toy.tokenizer import tokenizer

        tok = tokenizer()
        words = lambda text: editors.tokenize_words(text, tok.ids, tok.bos_token_id, tok.eos_token_id)  # noqa: E731
        return editors.prompt_to_prompt(words(source_text), words(target_text), mode="replace",
                                        blend_source_words=[shape_word], blend_target_words=[shape_word])
    if kind == "masactrl":
        return editors.MasaCtrlEditor()
    if kind == "pnp":
        return editors.PnPEditor(source_conditioning=toy.embed([""]))
    if kind == "p2p_zero":
        return editors.P2PZeroEditor(**{k: v for k, v in options.items() if k == "xa_guidance"})
    raise ValueError(kind)


def p2p_zero_conditioning(editors, source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Pix2Pix-Zero's target conditioning per image: source + Delta_i, Delta_i = edit_direction([E(source_i)],
    [E(target_i)]) (one sentence per side, so this is E(target_i) up to rounding)."""
    return torch.cat([source[i:i + 1] + editors.edit_direction([source[i:i + 1]], [target[i:i + 1]]).to(source)
                      for i in range(source.shape[0])])


def run_group(args: tuple) -> dict:
    """Every inversion, reconstruction and edit row for one group of images (runs in a worker process)."""
    seeds, steps, weights, threads, keep_images, only = args
    rows_run = [edit_row(r) for r in EDIT_ROWS if not only or any(word in r[0] for word in only)]
    torch.set_num_threads(threads)
    pack, data, checker, model = _pack()
    from benchmarks.pie.run import UNetCounter

    di = pack[0]
    toy = model.load(weights)
    counter = UNetCounter(toy.unet)
    samples = [data.draw(seed) for seed in seeds]
    rendered = data.render(samples)
    images, masks = rendered["images"], rendered["masks"]
    z0 = toy.encode(images)
    source_text = [s.caption for s in samples]
    colour_text = [s.with_(colour=colour_target(s, seed)).caption for s, seed in zip(samples, seeds)]
    style_text = [s.with_(style="hollow").caption for s in samples]
    source, null = toy.embed(source_text), toy.embed([""] * len(samples))
    negatives = {"null": null, "source": source}
    targets = {"colour": toy.embed(colour_text), "style": toy.embed(style_text), "identity": source}
    target_text = {"colour": colour_text, "style": style_text, "identity": source_text}
    from benchmarks.toy.tokenizer import tokenizer

    layouts = {len(tokenizer().ids(text)) for text in source_text + colour_text + style_text}
    if len(layouts) != 1:  # one editor's token positions must hold for every image of the group
        raise ValueError(f"captions of one group tokenise to different lengths {sorted(layouts)}")
    source_analysis = [checker.analyse(image) for image in images]
    out = {"recon": [], "edits": [], "vae_psnr": [checker.psnr(a, b) for a, b in zip(toy.decode(z0), images)],
           "images": {}}

    inversions, inversion_cost = {}, {}
    for method in [m for m in ("ddim", "null_text", "negative_prompt", "edict") if any(r[1] == m for r in rows_run)]:
        counter.count, start = 0, time.perf_counter()
        if method == "null_text":  # optimised per image, as the reference does
            parts = [di.invert(toy.unet, toy.scheduler, z0[i:i + 1], source[i:i + 1], null[i:i + 1], steps=steps,
                               method=method) for i in range(len(samples))]
            inversions[method] = parts
        else:
            inversions[method] = di.invert(toy.unet, toy.scheduler, z0, source, null, steps=steps, method=method)
        inversion_cost[method] = (counter.count, time.perf_counter() - start)

    def run_edit(method, offsets, editor, target, cfg, negative=null):
        counter.count, start = 0, time.perf_counter()
        inv = inversions[method]
        if isinstance(inv, list):
            results = [di.edit(toy.unet, toy.scheduler, part, target[i:i + 1], negative[i:i + 1], cfg=cfg,
                               offsets=offsets, editor=editor) for i, part in enumerate(inv)]
            edited = torch.cat([r.edited for r in results])
            recon = torch.cat([r.source for r in results])
        else:
            result = di.edit(toy.unet, toy.scheduler, inv, target, negative, cfg=cfg, offsets=offsets, editor=editor)
            edited, recon = result.edited, result.source
        evals = counter.count + inversion_cost[method][0]
        seconds = time.perf_counter() - start + inversion_cost[method][1]
        return edited, recon, evals, seconds

    # cfg-1 DDIM reconstruction (the others come from the edits' source branches below)
    recon_rows = {}
    if not only:
        recon_rows["DDIM, cfg 1"] = run_edit("ddim", "off", None, source, 1.0)[1]
    for name, method, offsets, editor_kind, kind, options in rows_run:
        editor = None
        if editor_kind is not None:
            editor = _editor(pack, toy, editor_kind, source_text[0], target_text[kind][0], samples[0].shape, options)
        target = targets[kind]
        if editor_kind == "p2p_zero":
            target = p2p_zero_conditioning(pack[1], source, target)
        edited, recon, evals, seconds = run_edit(method, offsets, editor, target, EDIT_CFG,
                                                 negatives[options.get("negative", "null")])
        for row_name, m, o, cfg in RECONSTRUCTION_ROWS:
            if m == method and o == offsets and cfg == EDIT_CFG and row_name not in recon_rows and \
                    editor_kind not in SOURCE_UNGUIDED:
                recon_rows[row_name] = recon
        pixels = toy.decode(edited)
        for i, (sample, seed) in enumerate(zip(samples, seeds)):
            seen = checker.analyse(pixels[i])
            if kind == "colour":
                success = seen.colour == colour_target(sample, seed)
            elif kind == "style":
                success = seen.style == "hollow"
            else:  # identity: the picture still shows what the caption says
                success = (seen.colour, seen.shape, seen.style) == (sample.colour, sample.shape, sample.style)
            row = {"row": name, "seed": seed, "success": bool(success), "kept_shape": seen.shape == sample.shape,
                   "iou": checker.iou(source_analysis[i].silhouette, seen.silhouette),
                   "psnr": checker.psnr(pixels[i], images[i]),
                   **checker.background_scores(images[i], pixels[i], masks[i]),
                   "unet_evals": evals / len(samples), "seconds": seconds / len(samples)}
            out["edits"].append(row)
        for i in range(min(keep_images, len(samples))):
            out["images"].setdefault(seeds[i], {"source": images[i]})[name] = pixels[i]
    for name, recon in recon_rows.items():
        pixels = toy.decode(recon)
        for i, seed in enumerate(seeds):
            out["recon"].append({"row": name, "seed": seed, "latent_mse": (recon[i].float() - z0[i]).pow(2).mean().item(),
                                 "psnr": checker.psnr(pixels[i], images[i])})
    counter.close()
    return out


def _mean(values) -> float:
    values = list(values)
    return statistics.fmean(values) if values else float("nan")


def summarise(parts: list[dict]) -> tuple[list[dict], list[dict]]:
    recon = [r for part in parts for r in part["recon"]]
    edits = [r for part in parts for r in part["edits"]]
    vae = [p for part in parts for p in part["vae_psnr"]]
    recon_rows = [{"row": "VAE alone (encode, decode)", "images": len(vae), "latent_mse": 0.0, "psnr": _mean(vae)}]
    for name, *_ in RECONSTRUCTION_ROWS:
        rows = [r for r in recon if r["row"] == name]
        if not rows:
            continue
        recon_rows.append({"row": name, "images": len(rows), "latent_mse": _mean(r["latent_mse"] for r in rows),
                           "psnr": _mean(r["psnr"] for r in rows)})
    edit_rows = []
    for name, method, offsets, editor, kind, options in map(edit_row, EDIT_ROWS):
        rows = [r for r in edits if r["row"] == name]
        if not rows:
            continue
        edit_rows.append({"row": name, "method": method, "offsets": offsets, "editor": editor or "none", "edit": kind,
                          **options, "images": len(rows), "success": _mean(r["success"] for r in rows),
                          "bg_psnr": _mean(r["bg_psnr"] for r in rows), "bg_ssim": _mean(r["bg_ssim"] for r in rows),
                          "bg_mse": _mean(r["bg_mse"] for r in rows), "mask_iou": _mean(r["iou"] for r in rows),
                          "psnr": _mean(r["psnr"] for r in rows),
                          "kept_shape": _mean(r["kept_shape"] for r in rows),
                          "unet_evals": _mean(r["unet_evals"] for r in rows),
                          "seconds": _mean(r["seconds"] for r in rows)})
    return recon_rows, edit_rows


def print_table(title: str, rows: list[dict], columns: list[tuple]) -> None:
    print(f"\n{title}")
    header = " | ".join(f"{label:>{width}}" if i else f"{label:<{width}}" for i, (label, _, width, _) in enumerate(columns))
    print(header)
    print("-" * len(header))
    for row in rows:
        cells = []
        for i, (_, key, width, fmt) in enumerate(columns):
            value = row[key]
            text = format(value, fmt) if isinstance(value, (int, float)) and value is not None else str(value)
            cells.append(f"{text:>{width}}" if i else f"{text:<{width}}")
        print(" | ".join(cells))


def save_figure(parts: list[dict], path: Path, rows=("DDIM + P2P", "Direct Inversion + P2P", "DDIM + PnP (style)",
                                                      "Direct Inversion + PnP (style)"), scale: int = 3) -> None:
    """One PNG: per kept image, the source then each row's edit (``scale``x nearest-neighbour)."""
    from PIL import Image

    tiles = []
    for part in parts:
        for seed, images in part["images"].items():
            strip = [images["source"]] + [images[r] for r in rows]
            tiles.append(torch.cat([torch.nn.functional.pad(t, (2, 2, 2, 2), value=1.0) for t in strip], dim=2))
    grid = torch.cat(tiles, dim=1)
    array = (grid.permute(1, 2, 0).clamp(0, 1).numpy() * 255).round().astype("uint8")
    picture = Image.fromarray(array)
    picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST).save(path)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", type=Path, help="write the three tables here")
    parser.add_argument("--images", type=int, default=50, help="held-out images to edit (default 50)")
    parser.add_argument("--captions", type=int, default=100, help="held-out captions to sample (default 100)")
    parser.add_argument("--steps", type=int, default=50, help="DDIM steps (default 50)")
    parser.add_argument("--group", type=int, default=10, help="images per batched call (default 10)")
    parser.add_argument("--workers", type=int, default=2, help="worker processes, one thread each (default 2)")
    parser.add_argument("--weights", type=Path, default=None, help="weights folder (default: the committed ones)")
    parser.add_argument("--figure", type=Path, default=None, help="write example edits as one PNG here")
    parser.add_argument("--figure-images", type=int, default=2, help="images per group in the figure")
    parser.add_argument("--rows", nargs="*", default=(), help="run only the edit rows whose name contains one of "
                        "these words (and the inversions they need; no reconstruction table)")
    args = parser.parse_args(argv)
    pack, data, checker, model = _pack()
    weights = args.weights or model.WEIGHTS
    start = time.perf_counter()
    toy = model.load(weights)
    cond_rows = [] if args.rows else conditioning(toy, data, checker, args.captions, args.steps)
    print_table(f"Conditioning: {args.captions} held-out captions, DDIM {args.steps}, cfg {EDIT_CFG}", cond_rows,
                [("attribute", "attribute", 10, ""), ("correct", "correct", 7, "d"), ("of", "total", 4, "d"),
                 ("share", "share", 6, ".2f"), ("target", "target", 6, "")])
    seeds = edit_seeds(args.images)
    groups = [(seeds[i:i + args.group], args.steps, weights, 1, args.figure_images if args.figure else 0,
               tuple(args.rows))
              for i in range(0, len(seeds), args.group)]
    if args.workers > 1:
        with multiprocessing.get_context("spawn").Pool(args.workers) as pool:
            parts = pool.map(run_group, groups)
    else:
        parts = [run_group(g) for g in groups]
    recon_rows, edit_rows = summarise(parts)
    print_table(f"Reconstruction: {len(seeds)} held-out images, {args.steps} steps", recon_rows,
                [("row", "row", 28, ""), ("images", "images", 6, "d"), ("latent MSE", "latent_mse", 10, ".5f"),
                 ("PSNR dB", "psnr", 7, ".2f")])
    print_table(f"Edits: {len(seeds)} held-out solid images, {args.steps} steps, cfg {EDIT_CFG}", edit_rows,
                [("row", "row", 42, ""), ("success", "success", 7, ".2f"), ("bg PSNR", "bg_psnr", 7, ".2f"),
                 ("bg SSIM", "bg_ssim", 7, ".4f"), ("bg MSE", "bg_mse", 8, ".5f"), ("mask IoU", "mask_iou", 8, ".3f"),
                 ("shape kept", "kept_shape", 10, ".2f"), ("PSNR", "psnr", 6, ".2f"), ("UNet evals", "unet_evals", 10, ".0f"),
                 ("s/image", "seconds", 7, ".2f")])
    report = {"model": {"weights": str(Path(weights).name), "steps": args.steps, "images": len(seeds),
                        "captions": args.captions, "seconds": round(time.perf_counter() - start, 1)},
              "conditioning": cond_rows, "reconstruction": recon_rows, "edits": edit_rows}
    print(f"\ntotal {report['model']['seconds']:.0f} s")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
    if args.figure:
        save_figure(parts, args.figure)
    return report


if __name__ == "__main__":
    main()
