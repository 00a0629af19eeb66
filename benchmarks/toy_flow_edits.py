"""Do editors on flow models edit? The toy flow model (benchmarks/toy/flow_model.py, an SD3-style MM-DiT) through the
pack's diffusers backend on the CPU.

    python benchmarks/toy_flow_edits.py [--json PATH] [--images 40] [--captions 100] [--steps 28] [--cfg 4.5]

Prints three tables and writes them as JSON (``conditioning``, ``reconstruction``, ``edits``: lists of rows):

1. conditioning: images sampled from held-out captions (Euler on the backend's flow schedule, ``--steps``, cfg
   ``--cfg``, the empty prompt as negative), judged by the analytic checker (benchmarks/toy/checker.py): the share
   with the caption's colour, shape, style and background;
2. reconstruction of held-out images: latent MSE against the VAE latent and pixel PSNR against the picture, from
   the source branch of an edit: Euler and RF-Solver inversion (cfg 1) sampled back at cfg 1 and at ``--cfg``
   without offsets, and Direct Inversion's pinned source branch at ``--cfg``;
3. edits of held-out solid-style images (``toy_edits.edit_seeds``): a colour swap (the colour word replaced, a
   one-token replace) with no editor, Prompt-to-Prompt (replace; and with local blend on the shape word, at the
   default threshold 0.3 and at 0.5), MasaCtrl and Plug-and-Play on the joint attention (``editors/joint.py``),
   after Euler inversion (Direct Inversion's offsets, and a few rows without them) and RF-Solver inversion, and
   identity edits (target prompt = source prompt) without and with each editor. Settings are the SD3.5 editor
   workflows' (``workflows/sd35_*``): inversion at cfg 1, sampling at cfg 4.5, Direct Inversion's source offsets
   (the workflows' "auto"), P2P cross 0.4 / self 0.6 (local blend threshold 0.3 from 0.2 of the steps), MasaCtrl
   from step 3 at its default layer (10/16 of the 4 blocks, rounded: blocks 2 and 3), PnP values 0.4 / queries and
   keys 0.25 with the empty prompt as its source. Each row: edit success (the checker reads the target colour;
   identity: colour, shape and style unchanged), background PSNR/SSIM/MSE outside the source's object mask (grown
   by 2 px), source/edit silhouette IoU, whether the shape is still read as the source's, whole-image PSNR against
   the source, transformer evaluations (samples, not calls) and seconds per image, inversion included, and for
   local blend the share of the latent its region (at the last step) lets change.

Images are processed in groups of ``--group`` (one batched call per step; every caption has the same token layout,
so one P2P editor's token positions serve the whole group).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "comfyui_direct_inversion"

STEPS = 28
CFG = 4.5
P2P = {"cross_replace_steps": 0.4, "self_replace_steps": 0.6, "blend_threshold": 0.3, "blend_start": 0.2}
MASACTRL = {"start_step": 3}
PNP = {"feature_injection": 0.4, "attention_injection": 0.25}

# (row name, inversion method, offsets, editor, edit kind[, editor options]). Editors: "p2p" (replace), "p2p_blend"
# (replace with local blend on the shape word), "masactrl", "pnp"; options override the settings above.
EDIT_ROWS = (
    ("Euler, no editor", "euler", "off", None, "colour"),
    ("Direct Inversion, no editor", "euler", "source", None, "colour"),
    ("Euler + P2P (blend)", "euler", "off", "p2p_blend", "colour"),
    ("Direct Inversion + P2P", "euler", "source", "p2p", "colour"),
    ("Direct Inversion + P2P (blend)", "euler", "source", "p2p_blend", "colour"),
    # The default threshold 0.3 lets the blend region cover almost the whole image on this model (its 8x8 word maps
    # are diffuse; "blend area" in the table): a second row at 0.5, not tuned further.
    ("Direct Inversion + P2P (blend 0.5)", "euler", "source", "p2p_blend", "colour", {"blend_threshold": 0.5}),
    ("Direct Inversion + MasaCtrl", "euler", "source", "masactrl", "colour"),
    ("Direct Inversion + PnP", "euler", "source", "pnp", "colour"),
    ("RF-Solver, no editor", "rf_solver", "off", None, "colour"),
    ("RF-Solver DI + P2P (blend)", "rf_solver", "source", "p2p_blend", "colour"),
    ("RF-Solver DI + MasaCtrl", "rf_solver", "source", "masactrl", "colour"),
    ("Direct Inversion, no editor (identity)", "euler", "source", None, "identity"),
    ("Direct Inversion + P2P (identity)", "euler", "source", "p2p", "identity"),
    ("Direct Inversion + MasaCtrl (identity)", "euler", "source", "masactrl", "identity"),
    ("Direct Inversion + PnP (identity)", "euler", "source", "pnp", "identity"),
)


def edit_row(row: tuple) -> tuple:
    """(name, method, offsets, editor, edit kind, options) of an EDIT_ROWS entry (options {} when it has none)."""
    return (*row, {}) if len(row) == 5 else tuple(row)


# Reconstruction rows: (row name, method, offsets, cfg, the edit row whose source branch it is, or None: a cfg-1
# run of its own).
RECONSTRUCTION_ROWS = (
    ("Euler, cfg 1", "euler", "off", 1.0, None),
    ("Euler, cfg 4.5", "euler", "off", CFG, "Euler, no editor"),
    ("Direct Inversion (Euler), cfg 4.5", "euler", "source", CFG, "Direct Inversion, no editor"),
    ("RF-Solver, cfg 1", "rf_solver", "off", 1.0, None),
    ("RF-Solver, cfg 4.5", "rf_solver", "off", CFG, "RF-Solver, no editor"),
    ("Direct Inversion (RF-Solver), cfg 4.5", "rf_solver", "source", CFG, "RF-Solver DI + P2P (blend)"),
)


def _paths() -> None:
    for path in (str(ROOT / "tests"), str(ROOT)):
        if path not in sys.path:
            sys.path.insert(0, path)


def _pack():
    """The pack's diffusers backend, models and editors, and the toy package (the repository folder may not be an
    importable name)."""
    _paths()
    import di_testing

    di_testing.load_pack(PACKAGE)
    from comfyui_direct_inversion import editors
    from comfyui_direct_inversion.adapters import diffusers_backend, diffusers_models

    from benchmarks.toy import checker, data, flow_model
    return (diffusers_backend, diffusers_models, editors), data, checker, flow_model


def toy_edits():
    """benchmarks/toy_edits.py (its edit seeds, colour targets and table printer)."""
    _paths()
    name = "di_benchmarks_toy_edits"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / "toy_edits.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


class Counter:
    """Samples the transformer evaluates (a batch of 2 is 2), through a forward pre-hook on its keyword inputs."""

    def __init__(self, model):
        self.count = 0
        self.handle = model.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        x = kwargs.get("hidden_states", args[0] if args else None)
        self.count += int(x.shape[0])

    def close(self):
        self.handle.remove()


# ---------------------------------------------------------------------------------------------------------- parts

@torch.no_grad()
def sample(pack, toy, prompts, steps: int, cfg: float, seed: int) -> torch.Tensor:
    """Latents sampled from noise with Euler on the backend's flow schedule (the levels its invert/edit use) and
    the backend's SD3 prediction, guided against the empty prompt."""
    diffusers_models = pack[1]
    net = diffusers_models.network(toy.transformer, toy.scheduler)
    count = prompts[0].shape[0]
    z = torch.randn(count, 4, 16, 16, generator=torch.Generator().manual_seed(seed))
    sigmas, _ = net.space.trajectory(net.train_sigmas(z), steps)  # ascending, 0 first
    cond, null = net.prompt(prompts), net.prompt(toy.prompt([""] * count))
    z = z * sigmas[-1].item()
    for i in range(len(sigmas) - 1, 0, -1):
        v_uncond, v_cond = net.predict(z, sigmas[i].float(), [null, cond]).chunk(2)
        z = z + (sigmas[i - 1] - sigmas[i]).item() * (v_uncond + cfg * (v_cond - v_uncond))
    return z


def conditioning(pack, toy, data, checker, captions: int, steps: int, cfg: float, chunk: int = 50) -> list[dict]:
    """Sample from held-out captions and judge each image."""
    samples = [data.draw(seed) for seed in data.held_out_seeds(captions)]
    hits = {"colour": 0, "shape": 0, "style": 0, "background": 0}
    for first in range(0, len(samples), chunk):
        part = samples[first:first + chunk]
        images = toy.decode(sample(pack, toy, toy.prompt([s.caption for s in part]), steps, cfg, first))
        for image, drawn in zip(images, part):
            seen = checker.analyse(image)
            for attribute in hits:
                hits[attribute] += getattr(seen, attribute) == getattr(drawn, attribute)
    return [{"attribute": a, "correct": n, "total": len(samples), "share": n / len(samples), "steps": steps,
             "cfg": cfg} for a, n in hits.items()]


def make_editor(pack, toy, kind, source_text: str, target_text: str, shape_word: str, options=None):
    editors = pack[2]
    options = dict(options or {})
    if kind is None:
        return None
    if kind in ("p2p", "p2p_blend"):
        from benchmarks.toy.tokenizer import tokenizer

        tok = tokenizer()
        words = lambda text: editors.tokenize_words(text, tok.ids, tok.bos_token_id, tok.eos_token_id)  # noqa: E731
        source, target = words(source_text), words(target_text)
        blend = dict(blend_source_words=[shape_word], blend_target_words=[shape_word]) if kind == "p2p_blend" else {}
        return editors.prompt_to_prompt(source, target, mode="replace", max_tokens=77,
                                        encoders=[("l", source, target, 77)], **{**P2P, **options}, **blend)
    if kind == "masactrl":
        return editors.MasaCtrlEditor(**{**MASACTRL, **options})
    if kind == "pnp":
        return editors.PnPEditor(source_conditioning=toy.prompt([""]), **{**PNP, **options})
    raise ValueError(kind)


def run_group(seeds, steps: int, cfg: float, transformer=None, rows=EDIT_ROWS, keep_images: int = 0,
              reconstruction: bool = True) -> dict:
    """The inversions, edit rows (``rows``, default all) and, with ``reconstruction``, the reconstruction rows for
    one group of images."""
    pack, data, checker, flow_model = _pack()
    di = pack[0]
    colour_target = toy_edits().colour_target
    toy = flow_model.load_flow(transformer=transformer)
    counter = Counter(toy.transformer)
    samples = [data.draw(seed) for seed in seeds]
    rendered = data.render(samples)
    images, masks = rendered["images"], rendered["masks"]
    z0 = toy.encode(images)
    source_text = [s.caption for s in samples]
    target_text = {"colour": [s.with_(colour=colour_target(s, seed)).caption for s, seed in zip(samples, seeds)],
                   "identity": source_text}
    source, null = toy.prompt(source_text), toy.prompt([""] * len(samples))
    targets = {kind: toy.prompt(texts) for kind, texts in target_text.items()}
    from benchmarks.toy.tokenizer import tokenizer

    layouts = {len(tokenizer().ids(text)) for texts in target_text.values() for text in texts + source_text}
    if len(layouts) != 1:  # one editor's token positions must hold for every image of the group
        raise ValueError(f"captions of one group tokenise to different lengths {sorted(layouts)}")
    source_analysis = [checker.analyse(image) for image in images]
    out = {"recon": [], "edits": [], "vae_psnr": [checker.psnr(a, b) for a, b in zip(toy.decode(z0), images)],
           "images": {}}

    inversions, inversion_cost = {}, {}
    own_runs = [r for r in RECONSTRUCTION_ROWS if r[4] is None] if reconstruction else []
    for method in sorted({r[1] for r in rows} | {r[1] for r in own_runs}):
        counter.count, start = 0, time.perf_counter()
        inversions[method] = di.invert(toy.transformer, toy.scheduler, z0, source, null, steps=steps, cfg=1.0,
                                       method=method)
        inversion_cost[method] = (counter.count, time.perf_counter() - start)

    def run_edit(method, offsets, editor, target, guidance):
        counter.count, start = 0, time.perf_counter()
        result = di.edit(toy.transformer, toy.scheduler, inversions[method], target, null, cfg=guidance,
                         offsets=offsets, editor=editor)
        evals = counter.count + inversion_cost[method][0]
        seconds = time.perf_counter() - start + inversion_cost[method][1]
        return result, evals, seconds

    recon = {name: run_edit(method, offsets, None, source, guidance)[0].source
             for name, method, offsets, guidance, _ in own_runs}
    sources = {}
    for name, method, offsets, editor_kind, kind, options in map(edit_row, rows):
        editor = make_editor(pack, toy, editor_kind, source_text[0], target_text[kind][0], samples[0].shape, options)
        result, evals, seconds = run_edit(method, offsets, editor, targets[kind], cfg)
        sources[name] = result.source
        pixels = toy.decode(result.edited)
        blend_area = [None] * len(samples)
        if editor_kind == "p2p_blend":  # the share of the latent the last step's blend region lets change
            blend_area = result.editor_state.blend_mask(result.edited).flatten(1).mean(1).tolist()
        for i, (drawn, seed) in enumerate(zip(samples, seeds)):
            seen = checker.analyse(pixels[i])
            if kind == "colour":
                success = seen.colour == colour_target(drawn, seed)
            else:  # identity: the picture still shows what the caption says
                success = (seen.colour, seen.shape, seen.style) == (drawn.colour, drawn.shape, drawn.style)
            out["edits"].append({
                "row": name, "seed": seed, "success": bool(success), "kept_shape": seen.shape == drawn.shape,
                "iou": checker.iou(source_analysis[i].silhouette, seen.silhouette),
                "psnr": checker.psnr(pixels[i], images[i]), **checker.background_scores(images[i], pixels[i], masks[i]),
                "evals": evals / len(samples), "seconds": seconds / len(samples), "blend_area": blend_area[i]})
        for i in range(min(keep_images, len(samples))):
            out["images"].setdefault(seeds[i], {"source": images[i]})[name] = pixels[i]
    for name, method, offsets, guidance, from_row in RECONSTRUCTION_ROWS:
        if reconstruction and from_row is not None and from_row in sources:
            recon[name] = sources[from_row]
    for name, latent in recon.items():
        pixels = toy.decode(latent)
        for i, seed in enumerate(seeds):
            out["recon"].append({"row": name, "seed": seed, "latent_mse": (latent[i] - z0[i]).pow(2).mean().item(),
                                 "psnr": checker.psnr(pixels[i], images[i])})
    counter.close()
    return out


def summarise(parts: list[dict], rows=EDIT_ROWS) -> tuple[list[dict], list[dict]]:
    mean = toy_edits()._mean
    recon = [r for part in parts for r in part["recon"]]
    edits = [r for part in parts for r in part["edits"]]
    vae = [p for part in parts for p in part["vae_psnr"]]
    recon_rows = [{"row": "VAE alone (encode, decode)", "images": len(vae), "latent_mse": 0.0, "psnr": mean(vae)}]
    for name, *_ in RECONSTRUCTION_ROWS:
        chosen = [r for r in recon if r["row"] == name]
        if chosen:
            recon_rows.append({"row": name, "images": len(chosen), "latent_mse": mean(r["latent_mse"] for r in chosen),
                               "psnr": mean(r["psnr"] for r in chosen)})
    edit_rows = []
    for name, method, offsets, editor, kind, options in map(edit_row, rows):
        chosen = [r for r in edits if r["row"] == name]
        if not chosen:
            continue
        areas = [r["blend_area"] for r in chosen if r["blend_area"] is not None]
        edit_rows.append({"row": name, "method": method, "offsets": offsets, "editor": editor or "none", "edit": kind,
                          **options, "images": len(chosen), **{key: mean(r[key] for r in chosen) for key in (
                              "success", "bg_psnr", "bg_ssim", "bg_mse", "iou", "kept_shape", "psnr", "evals",
                              "seconds")}, "blend_area": mean(areas) if areas else None})
    return recon_rows, edit_rows


def print_tables(cond_rows, recon_rows, edit_rows, images: int, steps: int, cfg: float, captions: int) -> None:
    table = toy_edits().print_table
    if cond_rows:
        table(f"Conditioning: {captions} held-out captions, Euler {steps}, cfg {cfg}", cond_rows,
              [("attribute", "attribute", 10, ""), ("correct", "correct", 7, "d"), ("of", "total", 4, "d"),
               ("share", "share", 6, ".2f")])
    table(f"Reconstruction: {images} held-out images, {steps} steps", recon_rows,
          [("row", "row", 38, ""), ("images", "images", 6, "d"), ("latent MSE", "latent_mse", 10, ".5f"),
           ("PSNR dB", "psnr", 7, ".2f")])
    edit_rows = [{**r, "blend_area": "-" if r["blend_area"] is None else r["blend_area"]} for r in edit_rows]
    table(f"Edits: {images} held-out solid images, {steps} steps, cfg {cfg}", edit_rows,
          [("row", "row", 38, ""), ("success", "success", 7, ".2f"), ("bg PSNR", "bg_psnr", 7, ".2f"),
           ("bg SSIM", "bg_ssim", 7, ".4f"), ("bg MSE", "bg_mse", 8, ".5f"), ("mask IoU", "iou", 8, ".3f"),
           ("shape kept", "kept_shape", 10, ".2f"), ("PSNR", "psnr", 6, ".2f"), ("evals", "evals", 5, ".0f"),
           ("s/image", "seconds", 7, ".2f"), ("blend area", "blend_area", 10, ".2f")])


FIGURE_ROWS = ("Direct Inversion, no editor", "Direct Inversion + P2P (blend)", "Direct Inversion + MasaCtrl",
               "Direct Inversion + PnP")


def save_figure(parts: list[dict], path: Path) -> None:
    """One PNG: per kept image, the source then the edits of ``FIGURE_ROWS`` (toy_edits.py's figure)."""
    toy_edits().save_figure(parts, path, rows=FIGURE_ROWS)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", type=Path, help="write the three tables here")
    parser.add_argument("--images", type=int, default=40, help="held-out images to edit (default 40)")
    parser.add_argument("--captions", type=int, default=100, help="held-out captions to sample (default 100)")
    parser.add_argument("--steps", type=int, default=STEPS, help=f"sampling / inversion steps (default {STEPS})")
    parser.add_argument("--cfg", type=float, default=CFG, help=f"guidance of samples and edits (default {CFG})")
    parser.add_argument("--group", type=int, default=10, help="images per batched call (default 10)")
    parser.add_argument("--transformer", type=Path, default=None,
                        help="transformer weights (default: benchmarks/toy/weights/flow_transformer.safetensors)")
    parser.add_argument("--figure", type=Path, default=None, help="write example edits as one PNG here")
    parser.add_argument("--figure-images", type=int, default=2, help="images per group in the figure")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    pack, data, checker, flow_model = _pack()
    start = time.perf_counter()
    toy = flow_model.load_flow(transformer=args.transformer)
    cond_rows = conditioning(pack, toy, data, checker, args.captions, args.steps, args.cfg) if args.captions else []
    cond_seconds = time.perf_counter() - start
    seeds = toy_edits().edit_seeds(args.images)
    parts = [run_group(seeds[i:i + args.group], args.steps, args.cfg, args.transformer,
                       keep_images=args.figure_images if args.figure else 0)
             for i in range(0, len(seeds), args.group)]
    recon_rows, edit_rows = summarise(parts)
    print_tables(cond_rows, recon_rows, edit_rows, len(seeds), args.steps, args.cfg, args.captions)
    report = {"model": {"transformer": "flow_transformer.safetensors" if args.transformer is None else
                        args.transformer.name, "steps": args.steps, "cfg": args.cfg, "images": len(seeds),
                        "captions": args.captions, "threads": torch.get_num_threads(),
                        "conditioning_seconds": round(cond_seconds, 1),
                        "seconds": round(time.perf_counter() - start, 1),
                        "settings": {"p2p": P2P, "masactrl": MASACTRL, "pnp": PNP}},
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
