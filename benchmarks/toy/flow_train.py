"""Train the toy flow model's transformer on the CPU: ``python -m benchmarks.toy.flow_train [--out DIR]``.

The toy text encoder and VAE (``benchmarks/toy/weights``, trained by ``train.py``) stay frozen; only the MM-DiT of
``flow_model.py`` is trained. Seeded and deterministic for a given thread count; it prints losses and times.

1. data: ``--samples`` images of ``data.draw(seed)`` for seeds 0 .. samples-1 (the toy UNet's training set;
   held-out images start far above), encoded once by the VAE (posterior mean times its scaling factor) and kept;
   the text encoder's states and pooled vectors of the 144 distinct captions and of the empty prompt, computed once;
2. the transformer: rectified flow as SD3 trains it: x_t = (1 - t) x_0 + t noise, mean squared error of the
   predicted velocity against noise - x_0, t drawn **logit-normal** (sigmoid of a standard normal, SD3's
   ``logit_normal`` with mean 0 and scale 1), the model called at timestep 1000 t; 10 % of captions dropped to the
   empty prompt (its states and pooled vector) for classifier-free guidance; AdamW with warm-up and cosine decay,
   gradient clipping at 1, and an exponential moving average of the weights, which is what is saved (float16,
   ``flow_transformer.safetensors``, with the training settings, loss summary and seconds as metadata).
"""
from __future__ import annotations

import argparse
import copy
import math
import time
from pathlib import Path

import torch

from . import data
from .flow_model import FLOW_WEIGHTS, make_transformer, pooled_states
from .model import WEIGHTS, TextEncoder, _load_part, make_vae, save_part
from .tokenizer import tokenizer

DEFAULTS = {"samples": 16384, "steps": 1800, "batch": 48, "lr": 1e-3, "warmup": 100, "caption_dropout": 0.1,
            "ema": 0.995, "seed": 0, "weight_decay": 0.01, "log_every": 50}


class _Clock:
    def __init__(self):
        self.start = time.perf_counter()

    def __call__(self) -> float:
        return time.perf_counter() - self.start


def _lr(step: int, steps: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


@torch.no_grad()
def prepare(weights: Path, samples: int, chunk: int = 256) -> dict:
    """Latents of the training images and the text encoder's output per caption (frozen parts, computed once)."""
    text_encoder, vae = TextEncoder(), make_vae()
    _load_part(text_encoder, weights / "text_encoder.safetensors")
    scaling = float(_load_part(vae, weights / "vae.safetensors")["scaling_factor"])
    text_encoder.eval(), vae.eval()
    drawn = [data.draw(seed) for seed in range(data.TRAIN_SEED, data.TRAIN_SEED + samples)]
    captions = [s.caption for s in drawn]
    latents = []
    for first in range(0, samples, chunk):
        images = data.render(drawn[first:first + chunk])["images"]
        latents.append(vae.encode(images * 2.0 - 1.0).latent_dist.mean * scaling)
    distinct = sorted(set(captions)) + [""]
    ids = tokenizer()(distinct)
    states = text_encoder(ids)
    index = {caption: i for i, caption in enumerate(distinct)}
    return {"latents": torch.cat(latents), "states": states, "pooled": pooled_states(ids, states),
            "caption_index": torch.tensor([index[c] for c in captions]), "empty_index": index[""]}


def train(prepared: dict, args, log=print) -> tuple[torch.nn.Module, dict]:
    """The EMA transformer and a loss summary (the mean loss of each ``log_every`` steps)."""
    generator = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)
    model = make_transformer().train()
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    params = list(model.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    latents, states, pooled = prepared["latents"], prepared["states"], prepared["pooled"]
    caption_index = prepared["caption_index"]
    clock, window, curve = _Clock(), [], []
    for step in range(1, args.steps + 1):
        for group in opt.param_groups:
            group["lr"] = _lr(step - 1, args.steps, args.lr, min(args.warmup, args.steps))
        rows = torch.randint(len(latents), (args.batch,), generator=generator)
        x0, which = latents[rows], caption_index[rows].clone()
        which[torch.rand(args.batch, generator=generator) < args.caption_dropout] = prepared["empty_index"]
        t = torch.sigmoid(torch.randn(args.batch, generator=generator))  # logit-normal(0, 1)
        noise = torch.randn(x0.shape, generator=generator)
        tt = t.view(-1, 1, 1, 1)
        xt = (1.0 - tt) * x0 + tt * noise
        pred = model(hidden_states=xt, timestep=t * 1000.0, encoder_hidden_states=states[which],
                     pooled_projections=pooled[which]).sample
        loss = (pred - (noise - x0)).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(args.ema, (1.0 + step) / (10.0 + step))
        with torch.no_grad():
            for e, p in zip(ema.parameters(), model.parameters()):
                e.lerp_(p, 1.0 - decay)
        window.append(loss.item())
        if step % args.log_every == 0 or step == args.steps:
            curve.append({"step": step, "loss": sum(window) / len(window), "seconds": round(clock(), 1)})
            window = []
        if step == 1 or step == args.steps or step % args.log_every == 0:
            shown = curve[-1]["loss"] if curve and curve[-1]["step"] == step else loss.item()
            log(f"[flow] step {step:5d}/{args.steps}  loss {shown:.5f}  lr {opt.param_groups[0]['lr']:.2e}  "
                f"{clock():7.1f} s")
    return ema, {"curve": curve, "seconds": round(clock(), 1)}


def main(argv=None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=WEIGHTS, help="folder for flow_transformer.safetensors")
    parser.add_argument("--weights", type=Path, default=WEIGHTS, help="folder of the toy text encoder and VAE")
    for name, value in DEFAULTS.items():
        parser.add_argument("--" + name.replace("_", "-"), type=type(value), default=value)
    args = parser.parse_args(argv)
    total = _Clock()
    print(f"toy flow model training on the CPU ({torch.get_num_threads()} threads): "
          f"{ {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()} }", flush=True)
    clock = _Clock()
    prepared = prepare(args.weights, args.samples)
    print(f"[data] {args.samples} images rendered and encoded to {tuple(prepared['latents'].shape[1:])} latents "
          f"(std {prepared['latents'].std():.3f}), {len(prepared['states'])} distinct prompts, in {clock():.1f} s",
          flush=True)
    ema, summary = train(prepared, args, log=lambda line: print(line, flush=True))
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / FLOW_WEIGHTS.name
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "weights")}
    meta = {"training": settings, "loss_curve": summary["curve"], "train_seconds": summary["seconds"],
            "seconds": round(total(), 1), "threads": torch.get_num_threads()}
    save_part(ema, path, meta, dtype=torch.float16)
    print(f"[done] EMA transformer written to {path} ({path.stat().st_size / 1e6:.1f} MB) in {total():.1f} s",
          flush=True)
    return path


if __name__ == "__main__":
    main()
