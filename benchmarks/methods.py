"""Per-method figures: UNet sample-evaluations, wall time and peak memory of inversion + one Direct Inversion edit.

    python benchmarks/methods.py                       # tiny random-weight UNet on the CPU (a minute or two)
    python benchmarks/methods.py --size sd15 --device cuda --dtype float16   # SD1.5 architecture, 512x512

Random weights: speed and memory do not depend on their values. UNet sample-evaluations are counted by a wrapper
around the UNet (one per latent in each batch it is called with), so the figure is exact and machine-independent.
Wall time is the median of --repeats runs after one warm-up. Peak memory is CUDA's peak allocation on a GPU, and
the process's peak resident size on the CPU (each method runs in its own process for that). Writes a JSON file of
the figures (--json).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("ddim", "null_text", "negative_prompt", "edict")


def load_pack():
    spec = importlib.util.spec_from_file_location("comfyui_direct_inversion", ROOT / "__init__.py",
                                                  submodule_search_locations=[str(ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["comfyui_direct_inversion"] = module
    spec.loader.exec_module(module)
    return module


class Counted:
    """A UNet with a forward pre-hook that counts the latents it is evaluated on (``evaluations``); ``unet`` is the
    model itself, so editors reach its modules."""

    def __init__(self, unet):
        self.unet, self.evaluations = unet, 0
        unet.register_forward_pre_hook(self._count, with_kwargs=True)

    def _count(self, module, args, kwargs):
        sample = args[0] if args else kwargs["sample"]
        self.evaluations += sample.shape[0]

    def __call__(self, *args, **kwargs):
        return self.unet(*args, **kwargs)


def measure(once, device: str, repeats: int, unet) -> dict:
    """Runs ``once`` (returning its figures) after one warm-up, ``repeats`` times: median wall time, peak memory
    (CUDA peak allocation on a GPU, process peak RSS on the CPU) and the UNet's weights."""

    def timed():
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        figures = once()
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0, figures

    timed()  # warm-up
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    runs = [timed() for _ in range(repeats)]
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2 ** 20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"figures": runs[0][1], "seconds_median": statistics.median(t for t, _ in runs),
            "seconds_all": [t for t, _ in runs], "peak_mib": peak,
            "weights_mib": sum(p.numel() * p.element_size() for p in unet.parameters()) / 2 ** 20,
            "peak_kind": "cuda max_memory_allocated" if device == "cuda" else "process peak RSS"}


def build(size: str, device: str, dtype: torch.dtype):
    from diffusers import DDIMScheduler, UNet2DConditionModel

    torch.manual_seed(0)
    if size == "tiny":
        unet = UNet2DConditionModel(sample_size=16, layers_per_block=1, block_out_channels=(32, 64),
                                    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                                    attention_head_dim=8)
        latent_size, tokens, width = 16, 8, 32
    else:  # the SD1.x architecture (diffusers' defaults are its config), 512x512 images
        unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
        latent_size, tokens, width = 64, 77, 768
    with torch.no_grad():
        unet.conv_out.weight.mul_(0.1)
        unet.conv_out.bias.mul_(0.1)
    unet = unet.to(device, dtype).eval()
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randn(1, tokens, width, generator=g).to(device, dtype) for _ in range(3)]
    latent = torch.randn(1, 4, latent_size, latent_size, generator=g).to(device)
    return Counted(unet), scheduler, latent, prompts


def run_method(method: str, args) -> dict:
    from comfyui_direct_inversion.adapters import diffusers_backend as di

    dtype = getattr(torch, args.dtype)
    unet, scheduler, latent, (source, target, null) = build(args.size, args.device, dtype)
    options = {"inner_steps": args.inner_steps} if method == "null_text" and args.inner_steps else None

    def once():
        start = unet.evaluations
        inversion = di.invert(unet.unet, scheduler, latent, source, null, steps=args.steps, method=method,
                              options=options)
        inverted = unet.evaluations - start
        di.edit(unet.unet, scheduler, inversion, target, null, cfg=7.5)
        return inverted, unet.evaluations - start - inverted

    figures = measure(once, args.device, args.repeats, unet.unet)
    inverted, edited = figures.pop("figures")
    return {"method": method, "size": args.size, "device": args.device, "dtype": args.dtype, "steps": args.steps,
            "unet_evals_inversion": inverted, "unet_evals_edit": edited, "unet_evals_total": inverted + edited,
            **figures}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=("tiny", "sd15"), default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--inner-steps", type=int, default=0, help="null-text inner steps (default: the reference's 10)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--json", default="benchmarks/methods.json")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one method, print its JSON
    args = parser.parse_args()
    load_pack()
    if args.one:
        print(json.dumps(run_method(args.one, args)))
        return
    results = []
    for method in args.methods:
        if args.device == "cpu":  # a fresh process per method, so that peak RSS is the method's own
            cmd = [sys.executable, __file__, "--one", method] + [a for a in sys.argv[1:]]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
            results.append(json.loads(out))
        else:
            results.append(run_method(method, args))
    ddim_time = next((r["seconds_median"] for r in results if r["method"] == "ddim"), None)
    print(f"\n{args.size} UNet, {args.device}, {args.dtype}, {args.steps} steps: inversion + one edit (cfg 7.5)")
    print(f"{'method':<16}{'UNet evals (inv + edit)':>26}{'median s':>11}{'x ddim':>8}{'peak MiB':>11}")
    for r in results:
        ratio = f"{r['seconds_median'] / ddim_time:.2f}" if ddim_time else "-"
        evals = f"{r['unet_evals_inversion']} + {r['unet_evals_edit']} = {r['unet_evals_total']}"
        print(f"{r['method']:<16}{evals:>26}{r['seconds_median']:>11.3f}{ratio:>8}{r['peak_mib']:>11.0f}")
    print(f"(peak: {results[0]['peak_kind']}; UNet weights {results[0]['weights_mib']:.0f} MiB)")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(results, indent=2))
    print(f"figures written to {args.json}")


if __name__ == "__main__":
    main()
