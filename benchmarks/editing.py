"""Edits side by side: inversion method x editor x Direct Inversion on/off, and a reference-style loop.

    python benchmarks/editing.py                                   # tiny random-weight UNet, CPU
    python benchmarks/editing.py --size sd15 --device cuda --dtype float16

Each case is one inversion plus one edit of one image through the diffusers adapter, with the UNet behind the
counting wrapper of ``methods.py`` (UNet sample-evaluations per image: exact, machine-independent), timed as the
median of --repeats runs after a warm-up, with peak memory (CUDA peak allocation on a GPU; process peak RSS on the
CPU, where every case runs in its own process).

The reference-style loop reproduces the structure of the PnPInversion code's DDIM + Direct Inversion + P2P path,
written here for the comparison: DDIM inversion with the source prompt (one sample per step); a separate offset
pass over the trajectory with the edit's full batch ([source, target] x [unconditional, conditional], four samples
per step); the edit with the same four samples per step; float32 throughout; attention probabilities materialised
as a tensor at every attention layer (as its attention store does). 50 steps: 50 + 200 + 200 = 450 samples.
"""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from methods import build, load_pack, measure  # noqa: E402

CASES = [  # (name, method, editor, offsets)
    ("ddim + DI", "ddim", None, "source"),
    ("ddim (DI off)", "ddim", None, "off"),
    ("ddim + DI + P2P", "ddim", "p2p", "source"),
    ("ddim + P2P (DI off)", "ddim", "p2p", "off"),
    ("ddim + DI + MasaCtrl", "ddim", "masactrl", "source"),
    ("ddim + DI + PnP", "ddim", "pnp", "source"),
    ("null_text + P2P", "null_text", "p2p", "off"),
    ("negative_prompt + P2P", "negative_prompt", "p2p", "off"),
    ("edict + P2P", "edict", "p2p", "off"),
    ("reference loop (DI + P2P)", "reference", None, "source"),
]


def make_editor(kind, editors, unet, null, tokens: int):
    if kind is None:
        return None
    if kind == "p2p":
        vocab = {"a": [1], "cat": [2], "dog": [3], "sitting": [4], "on": [5], "bench": [6]}
        tok = lambda text: editors.tokenize_words(text, vocab.__getitem__, 100, 101, max_len=tokens)  # noqa: E731
        return editors.prompt_to_prompt(tok("a cat sitting on a bench"), tok("a dog sitting on a bench"),
                                        max_tokens=tokens)
    if kind == "masactrl":
        return editors.MasaCtrlEditor()
    # PnP: the reference's positions where the UNet has them (SD1.5), else the tiny UNet's equivalents
    blocks = sum(len(b.resnets) for b in unet.unet.up_blocks)
    position = 4 if blocks >= 12 else 3
    return editors.PnPEditor(feature_block=position, attention_from_block=position, source_conditioning=null)


class _ProbsProcessor:
    """Attention with the probabilities materialised (softmax(q k^T / sqrt(d)) as a tensor), in float32."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        q, k, v = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
        b, n, _ = q.shape
        split = lambda t: t.float().reshape(b, t.shape[1], attn.heads, -1).transpose(1, 2)  # noqa: E731
        qh, kh, vh = split(q), split(k), split(v)
        probs = torch.softmax(qh @ kh.transpose(-1, -2) / math.sqrt(qh.shape[-1]), dim=-1)
        out = (probs @ vh).transpose(1, 2).reshape(b, n, -1).to(q.dtype)
        return attn.to_out[1](attn.to_out[0](out)) / attn.rescale_output_factor


def reference_loop(unet, scheduler, latent, source, target, null, steps: int, cfg: float = 7.5):
    """DDIM inversion, a separate offset pass and a four-sample edit per step, float32 (see the module doc)."""
    unet.unet.float()
    unet.unet.set_attn_processor(_ProbsProcessor())
    alphas = scheduler.alphas_cumprod.to(latent.device, torch.float32)
    stride = scheduler.config.num_train_timesteps // steps
    timesteps = [i * stride for i in range(steps)]  # ascending, as the inversion walks

    def alpha(t):
        return alphas[t] if t >= 0 else alphas[0]

    def step(x, eps, t, t_next):  # DDIM from timestep t to t_next
        a, a_next = alpha(t), alpha(t_next)
        x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
        return a_next.sqrt() * x0 + (1 - a_next).sqrt() * eps

    def eps(x, t, embeds):
        return unet(x.float(), torch.tensor(t, device=x.device), encoder_hidden_states=embeds.float()).sample

    with torch.no_grad():
        z = [latent.float()]
        for i, t in enumerate(timesteps):  # inversion: one sample per step
            z.append(step(z[-1], eps(z[-1], t, source), t - stride, t))
        embeds = torch.cat([null, null, source, target]).float()

        def guided(x_src, x_tgt, t):
            e = eps(torch.cat([x_src, x_tgt, x_src, x_tgt]), t, embeds)
            uncond, cond = e.chunk(2)
            return uncond + cfg * (cond - uncond)

        offsets = []
        for n, t in enumerate(reversed(timesteps)):  # the offset pass: the full batch, four samples per step
            zt = z[len(timesteps) - n]
            e = guided(zt, zt, t)[:1]
            offsets.append(z[len(timesteps) - n - 1] - step(zt, e, t, t - stride))
        x_src = x_tgt = z[-1]
        for n, t in enumerate(reversed(timesteps)):  # the edit: four samples per step
            e = guided(x_src, x_tgt, t)
            x_src = step(x_src, e[:1], t, t - stride) + offsets[n]
            x_tgt = step(x_tgt, e[1:], t, t - stride)
    return x_tgt


def run_case(name: str, args) -> dict:
    from comfyui_direct_inversion import editors
    from comfyui_direct_inversion.adapters import diffusers_backend as di

    _, method, editor_kind, offsets = next(c for c in CASES if c[0] == name)
    dtype = getattr(torch, args.dtype)
    unet, scheduler, latent, (source, target, null) = build(args.size, args.device, dtype)
    options = {"inner_steps": args.inner_steps} if method == "null_text" and args.inner_steps else None
    editor = make_editor(editor_kind, editors, unet, null, source.shape[1])

    def once():
        start = unet.evaluations
        if method == "reference":
            reference_loop(unet, scheduler, latent, source, target, null, args.steps)
            return unet.evaluations - start
        inversion = di.invert(unet.unet, scheduler, latent, source, null, steps=args.steps, method=method,
                              options=options)
        di.edit(unet.unet, scheduler, inversion, target, null, cfg=7.5, offsets=offsets, editor=editor)
        return unet.evaluations - start

    figures = measure(once, args.device, args.repeats, unet.unet)
    return {"case": name, "size": args.size, "device": args.device, "dtype": args.dtype, "steps": args.steps,
            "unet_evals": figures.pop("figures"), **figures}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=("tiny", "sd15"), default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--inner-steps", type=int, default=0, help="null-text inner steps (default: the reference's 10)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cases", nargs="+", default=[c[0] for c in CASES], choices=[c[0] for c in CASES])
    parser.add_argument("--json", default="benchmarks/editing.json")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one case, print its JSON
    args = parser.parse_args()
    load_pack()
    if args.one:
        print(json.dumps(run_case(args.one, args)))
        return
    results = []
    for name in args.cases:
        if args.device == "cpu":  # a fresh process per case, so that peak RSS is the case's own
            cmd = [sys.executable, __file__, "--one", name, "--size", args.size, "--device", args.device, "--dtype",
                   args.dtype, "--steps", str(args.steps), "--repeats", str(args.repeats), "--inner-steps",
                   str(args.inner_steps)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
            results.append(json.loads(out))
        else:
            results.append(run_case(name, args))
    reference = next((r for r in results if r["case"].startswith("reference")), None)
    print(f"\n{args.size} UNet, {args.device}, {args.dtype}, {args.steps} steps: one inversion + one edit per image")
    print(f"{'case':<28}{'UNet evals':>11}{'median s':>11}{'peak MiB':>10}{'ref/ours time':>15}{'ref/ours evals':>16}")
    for r in results:
        speed = f"{reference['seconds_median'] / r['seconds_median']:.2f}" if reference else "-"
        evals = f"{reference['unet_evals'] / r['unet_evals']:.2f}" if reference else "-"
        print(f"{r['case']:<28}{r['unet_evals']:>11}{r['seconds_median']:>11.3f}{r['peak_mib']:>10.0f}{speed:>15}"
              f"{evals:>16}")
    print(f"(peak: {results[0]['peak_kind']}; UNet weights {results[0]['weights_mib']:.0f} MiB)")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(results, indent=2))
    print(f"figures written to {args.json}")


if __name__ == "__main__":
    main()
