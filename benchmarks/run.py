"""UNet (and flow-transformer) sample-evaluations, time and memory per inversion method and editor, beside a
reference-style loop.

    python benchmarks/run.py                                   # tiny random-weight UNet on the CPU (minutes)
    python benchmarks/run.py --size sd15 --device cuda --dtype float16                    # SD1.5, 512x512
    python benchmarks/run.py --size sdxl --device cuda --dtype float16 --repeats 1        # SDXL, 1024x1024
    python benchmarks/run.py --size tiny-sd3                   # tiny SD3 / Flux transformers on the CPU (minutes):
    python benchmarks/run.py --size tiny-flux                  #   the flow rows, see below
    python benchmarks/run.py --size sd35-medium --device cuda --dtype bfloat16 --repeats 1   # SD3.5 medium, 1024x1024
    python benchmarks/run.py --size flux-dev --device cuda --dtype bfloat16 --repeats 1      # Flux dev, 1024x1024
    python benchmarks/run.py --backend comfyui ...            # through ComfyUI (needs a ComfyUI checkout)

Every case is one inversion plus one edit of one image (cfg 7.5; but the forward + backward case, see below), run
in a process of its own, with the models of benchmarks/harness.py (random weights; speed does not depend on their
values):
- UNet sample-evaluations per image, counted by a forward pre-hook on the UNet (one per latent in each batch it
  is called with): exact and machine-independent;
- wall time: the median of --repeats runs after one warm-up run (the inversion's share is timed too);
- peak memory: CUDA's peak allocation on a GPU, the process's peak RSS on the CPU.

Pix2Pix-Zero ("ddim + P2P-Zero": offsets off; "ddim + DI + P2P-Zero": offsets "both", the reference's Direct
Inversion path) edits with the reference's prompts: the target conditioning is the source prompt plus
edit_direction([source], [target]) (on the pooled output too where there is one), the negative prompt is the
source caption. At every step of non-zero length it runs the source's conditional prediction (1 sample), one
differentiable conditional prediction of the target with a backward pass to the latent (1 sample forward), and the
target's guided prediction (2): its count is of forwards, 4 samples a step, plus one backward pass a step that the
pre-hook does not see. The reference (PnPInversion's pix2pix_zero edit_pipeline.py) runs each pass on its CFG
batch -- reconstruction 2, gradient pass 2 forward + 2 backward, edit 2: 6 samples and 2 backwards a step, 300
forward samples at 50 steps, plus its inversion's. "one forward + backward (latent grad)" is one conditional
sample at a latent that requires grad, with its backward to that latent (the weights not requiring grad): 1
evaluation, the peak to hold P2P-Zero's against.

The reference-style loop reproduces the structure of the PnPInversion code's DDIM + Direct Inversion + P2P
path, written here for the comparison: DDIM inversion with the source prompt (one sample per step); a separate
offset pass over the trajectory with the edit's full batch ([source, target] x [unconditional, conditional]:
four samples per step); the edit with the same four samples per step; float32 throughout; attention
probabilities materialised as a tensor at every attention layer (as its attention store does). At 50 steps:
50 + 200 + 200 = 450 samples. It runs on the diffusers UNet of the same size, device and starting precision.

The table ends with the issue's targets, each marked met or missed (and by how much) where this run's
configuration is the one the target is set for. Figures go to a JSON file (--json).

Flow rows (--size tiny-sd3 / tiny-flux / sd35-medium / flux-dev; benchmarks/harness.py has the models): the same
measures, with the transformer's sample-evaluations counted (the JSON keeps the key names: "unet_evals" counts the
transformer's), for FLOW_CASES: "euler + DI", "euler (DI off)", "rf_solver + DI" and, SD3 sizes only (Flux dev is
guidance-distilled: sampled at CFG 1, where negative-prompt inversion is Euler's, and null-text is refused),
"negative_prompt + DI" and "null_text + DI", and the editors on joint attention: "euler + DI + P2P", "euler + DI +
MasaCtrl", "euler + DI + PnP" and "rf_solver + DI + P2P" (editors/joint.py; P2P a one-word swap over the family's
text tokens, MasaCtrl and PnP with their defaults). Every inversion runs at guidance 1
(Flux: embedded guidance 3.5); the edit guides as the family is sampled, SD3 at CFG 4.5 with a negative prompt,
Flux dev at CFG 1 with embedded guidance 3.5, and records the run's "cfg" and "flux_guidance" in the JSON. No
targets are judged (they are set for SD1.5). A flow schedule of N steps has N + 1 distinct levels (sigma = 0,
the image, then N training levels up to the top one), so no step has zero length and every one is evaluated
(unlike DDIM's N - 1 above); with g the samples of one guided prediction (SD3: 2, unconditional and conditional;
Flux at CFG 1: 1), per image:
- euler + DI: N (inversion, one conditional sample a step) + N * 2g (the edit: the source's and the target's
  guided predictions each step; with offsets "source" and no editor the source is still guided, since its
  prediction gives the offset). SD3: 5N, Flux: 3N.
- euler (DI off): the same as DI on (the offsets cost nothing: the source's prediction is made either way).
- rf_solver + DI: RF-Solver's midpoint steps, two evaluations each, in the inversion and in both branches of the
  edit: 2N + 2N * 2g. SD3: 10N, Flux: 6N.
- negative_prompt + DI (SD3): N + 4N, as euler + DI (its source's unconditional input is the source prompt, a
  guided prediction still of two samples).
- null_text + DI (SD3): N + sum over the N steps of (2 + k_n) + 4N, where k_n <= --inner-steps (default 10) is the
  step's inner Adam iterations before the early stop (one differentiable unconditional sample each, its backward
  not a forward call), 2 the step's conditional prediction and its final unconditional one: an inversion of at
  most 13N at 10 inner steps. The tiny SD3's prompts move its prediction little, so its losses start below the
  early-stop threshold and every step stops after one iteration (4N, 200 at 50 steps): its row is null-text's
  least cost; a trained model's early steps run more iterations.
- with an editor, the source branch's prediction is guided (g) with MasaCtrl (its target's unconditional half
  attends to the source's), its conditional half alone (1) with P2P (the offsets pin the source anyway) and with PnP
  (its source is the empty prompt's unguided reconstruction): euler + DI + P2P / PnP: N + N * (1 + g), SD3 4N,
  Flux 3N; euler + DI + MasaCtrl: as euler + DI; rf_solver + DI + P2P: 2N + 2N * (1 + g). Their attention costs
  differ: P2P computes the probabilities of the image queries (head-chunked, float32) at every joint layer it edits
  or reads maps from, MasaCtrl attends the image queries a second time over the source's image keys, PnP swaps
  tensors only.
The diffusers and ComfyUI backends count the same (ComfyUI's model holds the diffusers one's weights, so even
null-text's early stops agree).
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import (BACKENDS, FLOW_GUIDANCE, FLOW_SIZES, SHAPES, SIZES, Bench, di_testing,  # noqa: E402
                     import_comfyui, is_flow, measure, synchronize)

CASES = [  # (name, inversion method, editor, offsets)
    ("ddim + DI", "ddim", None, "source"),
    ("ddim (DI off)", "ddim", None, "off"),
    ("null_text + DI", "null_text", None, "source"),
    ("negative_prompt + DI", "negative_prompt", None, "source"),
    ("edict", "edict", None, "off"),
    ("ddim + DI + P2P", "ddim", "p2p", "source"),
    ("ddim + P2P (DI off)", "ddim", "p2p", "off"),
    ("ddim + DI + MasaCtrl", "ddim", "masactrl", "source"),
    ("ddim + DI + PnP", "ddim", "pnp", "source"),
    ("null_text + P2P", "null_text", "p2p", "off"),
    ("negative_prompt + P2P", "negative_prompt", "p2p", "off"),
    ("edict + P2P", "edict", "p2p", "off"),
    ("ddim + P2P-Zero", "ddim", "p2p_zero", "off"),
    ("ddim + DI + P2P-Zero", "ddim", "p2p_zero", "both"),
    ("one forward + backward (latent grad)", "forward_backward", None, None),
    ("reference loop (DI + P2P)", "reference", None, "source"),
]
CASE_NAMES = [c[0] for c in CASES]
FLOW_CASES = [  # the flow sizes' cases (SD3/SD3.5 and Flux), in the same form
    ("euler + DI", "euler", None, "source"),
    ("euler (DI off)", "euler", None, "off"),
    ("rf_solver + DI", "rf_solver", None, "source"),
    ("negative_prompt + DI", "negative_prompt", None, "source"),
    ("null_text + DI", "null_text", None, "source"),
    ("euler + DI + P2P", "euler", "p2p", "source"),
    ("euler + DI + MasaCtrl", "euler", "masactrl", "source"),
    ("euler + DI + PnP", "euler", "pnp", "source"),
    ("rf_solver + DI + P2P", "rf_solver", "p2p", "source"),
]
FLOW_CASE_NAMES = [c[0] for c in FLOW_CASES]
# Cases of the SD3 family only: Flux dev is guidance-distilled and sampled at CFG 1, where negative-prompt inversion is
# Euler inversion, and null-text (which fits CFG's unconditional input) is refused.
SD3_ONLY = ("negative_prompt + DI", "null_text + DI")
CASE_TABLE = {c[0]: c for c in CASES + FLOW_CASES}  # (the two tables' shared names are the same case)
ALL_CASE_NAMES = list(CASE_TABLE)
NAME_WIDTH = max(len(name) for name in ALL_CASE_NAMES) + 2  # the table's case column
OURS, REFERENCE = "ddim + DI + P2P", "reference loop (DI + P2P)"


def cases_for(size: str) -> list[str]:
    """The cases a size runs (and may run): the UNet table's for UNet sizes, the flow table's for flow sizes (Flux's
    without the SD3-only ones)."""
    if not is_flow(size):
        return list(CASE_NAMES)
    return [name for name in FLOW_CASE_NAMES if FLOW_SIZES[size] == "sd3" or name not in SD3_ONLY]


def make_editor(kind, size: str, bench: Bench):
    from comfyui_direct_inversion import editors

    if kind is None:
        return None
    if kind == "p2p":  # a one-word swap, with word positions from a toy vocabulary
        tokens = SHAPES[size][1]
        vocab = {"a": [1], "cat": [2], "dog": [3], "sitting": [4], "on": [5], "bench": [6]}
        if is_flow(size):  # per text encoder, as the P2P Editor node gives them
            encoders = flow_encoders(size, vocab)
            key, source, target, window = encoders[0]
            return editors.prompt_to_prompt(source, target, max_tokens=window, encoders=encoders)
        tok = lambda text: editors.tokenize_words(text, vocab.__getitem__, 100, 101, max_len=tokens)  # noqa: E731
        return editors.prompt_to_prompt(tok("a cat sitting on a bench"), tok("a dog sitting on a bench"),
                                        max_tokens=tokens)
    if kind == "masactrl":
        return editors.MasaCtrlEditor()
    if kind == "p2p_zero":
        return editors.P2PZeroEditor()
    if is_flow(size):  # the family's PnP blocks (editors.joint.FLOW_LAYERS)
        return editors.PnPEditor(source_conditioning=bench.null)
    # PnP: the reference's decoder positions (4) where the UNet has them, the toy UNet's equivalent (3) there
    position = 3 if size == "tiny" else 4
    return editors.PnPEditor(feature_block=position, attention_from_block=position, source_conditioning=bench.null)


def flow_encoders(size: str, vocab: dict) -> list:
    """P2P's per-encoder prompts for a flow size's text tokens: SD3.5's 77 CLIP then 256 T5 tokens, Flux dev's 512 T5
    tokens (T5: no start token, end 1); the tiny sizes' tokens as one CLIP window (SD3) or T5 window (Flux)."""
    from comfyui_direct_inversion import editors

    def tok(text, clip, window):
        start, end = (100, 101) if clip else (None, 1)
        return editors.tokenize_words(text, vocab.__getitem__, start, end, max_len=window)

    prompts = ("a cat sitting on a bench", "a dog sitting on a bench")
    if size == "sd35-medium":
        windows = [("l", True, 77), ("t5xxl", False, 256)]
    else:
        windows = [("l", True, SHAPES[size][1])] if FLOW_SIZES[size] == "sd3" else [("t5xxl", False, SHAPES[size][1])]
    return [(key, tok(prompts[0], clip, window), tok(prompts[1], clip, window), window) for key, clip, window in windows]


def edit_prompts(kind, bench: Bench) -> dict:
    """The edit's conditioning where it is not the bench's target and null prompts: P2P-Zero's target is the source
    prompt plus the edit direction, its negative prompt the source (the reference's caption)."""
    if kind == "p2p_zero":
        return {"target": bench.directed_target(), "negative": bench.source}
    return {}


class _ProbsProcessor:
    """Attention with the probabilities materialised (softmax(q k^T / sqrt(d)) as a tensor), in float32."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        q, k, v = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
        out = di_testing.reference_attention(q, k, v, attn.heads, torch.float32).to(q.dtype)
        return attn.to_out[1](attn.to_out[0](out)) / attn.rescale_output_factor


def reference_loop(bench: Bench, steps: int, cfg: float = 7.5) -> None:
    """DDIM inversion, a separate offset pass and a four-sample edit per step, float32 (see the module doc).
    ``bench.unet`` must already be float32 with ``_ProbsProcessor`` installed."""
    unet, latent, device = bench.unet, bench.latent, bench.latent.device
    alphas = bench.scheduler.alphas_cumprod.to(device, torch.float32)
    stride = bench.scheduler.config.num_train_timesteps // steps
    timesteps = [i * stride for i in range(steps)]  # ascending, as the inversion walks

    def alpha(t):
        return alphas[t] if t >= 0 else alphas[0]

    def step(x, eps, t, t_next):  # DDIM from timestep t to t_next
        a, a_next = alpha(t), alpha(t_next)
        x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
        return a_next.sqrt() * x0 + (1 - a_next).sqrt() * eps

    def eps(x, t, embeds):
        return unet(x, torch.tensor(t, device=device), encoder_hidden_states=embeds).sample

    with torch.no_grad():
        source, target, null = (e.float() for e in (bench.source, bench.target, bench.null))
        z = [latent.float()]
        for t in timesteps:  # inversion: one sample per step
            z.append(step(z[-1], eps(z[-1], t, source), t - stride, t))
        embeds = torch.cat([null, null, source, target])

        def guided(x_src, x_tgt, t):
            e = eps(torch.cat([x_src, x_tgt, x_src, x_tgt]), t, embeds)
            uncond, cond = e.chunk(2)
            return uncond + cfg * (cond - uncond)

        offsets = []
        for n, t in enumerate(reversed(timesteps)):  # the offset pass: the full batch, four samples per step
            zt = z[steps - n]
            e = guided(zt, zt, t)[:1]
            offsets.append(z[steps - n - 1] - step(zt, e, t, t - stride))
        x_src = x_tgt = z[-1]
        for n, t in enumerate(reversed(timesteps)):  # the edit: four samples per step
            e = guided(x_src, x_tgt, t)
            x_src = step(x_src, e[:1], t, t - stride) + offsets[n]
            x_tgt = step(x_tgt, e[1:], t, t - stride)


def run_case(name: str, args) -> dict:
    _, method, editor_kind, offsets = CASE_TABLE[name]
    dtype = getattr(torch, args.dtype)
    backend = "diffusers" if method == "reference" else args.backend
    if backend == "comfyui":
        import_comfyui(args.device)
    di_testing.load_pack()
    bench = Bench(args.size, backend, args.device, dtype)
    counted = bench.counted
    if method == "reference":
        bench.unet.float()
        bench.unet.set_attn_processor(_ProbsProcessor())

        def once():
            start = counted.evaluations
            reference_loop(bench, args.steps)
            return {"unet_evals": counted.evaluations - start}
    elif method == "forward_backward":
        def once():
            start = counted.evaluations
            bench.forward_backward()
            return {"unet_evals": counted.evaluations - start}
    else:
        editor = make_editor(editor_kind, args.size, bench)
        prompts = edit_prompts(editor_kind, bench)
        options = {"inner_steps": args.inner_steps} if method == "null_text" and args.inner_steps else None

        def once():
            start = counted.evaluations
            t0 = _now(args.device)
            inversion = bench.invert(method, args.steps, options)
            inverted, seconds = counted.evaluations - start, _now(args.device) - t0
            bench.edit(inversion, offsets=offsets, editor=editor, **prompts)
            return {"unet_evals": counted.evaluations - start, "unet_evals_inversion": inverted,
                    "seconds_inversion": seconds}

    figures = measure(once, args.device, args.repeats, bench.unet_module)
    if args.profile:
        profile(once, args.device, name)
    return {"case": name, "method": method, "editor": editor_kind, "offsets": offsets, "backend": backend,
            "size": args.size, "device": args.device, "dtype": args.dtype, "steps": args.steps, **figures}


def profile(once, device: str, name: str) -> None:
    """One more run under PyTorch's profiler: the operators by self time, and the "UNet" range (every UNet call)
    against the whole run, on stderr."""
    from torch.profiler import ProfilerActivity

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    synchronize(device)
    with torch.profiler.profile(activities=activities) as prof:
        t0 = time.perf_counter()
        once()
        synchronize(device)
        total = time.perf_counter() - t0
    events = prof.key_averages()
    sort = "self_cuda_time_total" if device.startswith("cuda") else "self_cpu_time_total"
    print(f"\nprofile of {name!r} ({total:.3f} s under the profiler):", file=sys.stderr)
    print(events.table(sort_by=sort, row_limit=25), file=sys.stderr)
    unet = next((e for e in events if e.key == "UNet"), None)
    if unet is not None:
        device_total = getattr(unet, "device_time_total", getattr(unet, "cuda_time_total", 0)) / 1e6
        print(f"UNet calls: {unet.count}, CPU-side total {unet.cpu_time_total / 1e6:.3f} s"
              + (f", device total {device_total:.3f} s" if device.startswith("cuda") else "")
              + f" of {total:.3f} s", file=sys.stderr)


def _now(device: str) -> float:
    synchronize(device)
    return time.perf_counter()


# -- targets ---------------------------------------------------------------------------------------------------
TARGET_RUN = {"size": "sd15", "device": "cuda", "dtype": "float16", "steps": 50}


def check_targets(results: dict, args) -> list[dict]:
    """The issue's targets against this run: measured value, limit, and met / missed-by where this run's
    configuration is the one the target is set for (UNet evaluations: any device and precision at 50 steps). They
    are set for the SD1.5 UNet's cases: a flow size has none."""
    if is_flow(args.size):
        return []
    on_target_run = (args.size, args.device.split(":")[0], args.dtype, args.steps) == tuple(TARGET_RUN.values())
    rows = []

    def target(what, value, limit, unit, at_most=True, judged=on_target_run, judged_on=None):
        if value is None:
            return
        met = value <= limit if at_most else value >= limit
        if not judged:
            verdict = "not judged: set for " + (", ".join(f"{k} {v}" for k, v in TARGET_RUN.items())
                                                if judged_on is None else judged_on)
        elif met:
            verdict = "met"
        elif at_most:
            verdict = f"missed by {value - limit:.3g}{unit} ({100 * (value / limit - 1):.0f}% over)"
        else:
            verdict = f"missed: {limit / value:.2f}x short"
        rows.append({"target": what, "value": value, "limit": limit, "unit": unit, "at_most": at_most,
                     "verdict": verdict})

    get = lambda case, key: results[case][key] if case in results else None  # noqa: E731
    target("UNet evals per image, DDIM + DI + P2P (inversion included)", get(OURS, "unet_evals"), 200, "",
           judged=args.steps == 50, judged_on="50 steps")
    target("DDIM + DI + P2P edit, inversion included", get(OURS, "seconds_median"), 1.5, " s")
    target("null-text inversion", get("null_text + DI", "seconds_inversion"), 10.0, " s")
    if "edict" in results and "ddim + DI" in results:
        target("EDICT / DDIM time (inversion + edit)",
               results["edict"]["seconds_median"] / results["ddim + DI"]["seconds_median"], 2.5, "x")
    if OURS in results:
        target("peak memory over the UNet's weights, DDIM + DI + P2P",
               (results[OURS]["peak_mib"] - results[OURS]["weights_mib"]) / 1024, 2.0, " GiB")
    if OURS in results and REFERENCE in results:
        target("reference loop / ours, time", results[REFERENCE]["seconds_median"] / results[OURS]["seconds_median"],
               5.0, "x", at_most=False)
    return rows


# -- the command -----------------------------------------------------------------------------------------------
def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=SIZES, default="tiny")
    parser.add_argument("--backend", choices=BACKENDS, default="diffusers")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--inner-steps", type=int, default=0, help="null-text inner steps (default: the reference's 10)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cases", nargs="+", choices=ALL_CASE_NAMES, metavar="CASE",
                        help="cases to run (default: all of the size's): UNet sizes: " + "; ".join(CASE_NAMES)
                             + ". Flow sizes: " + "; ".join(FLOW_CASE_NAMES) + f" ({' and '.join(SD3_ONLY)}: "
                             "SD3 sizes only)")
    parser.add_argument("--json", help="where to write the figures (default: benchmarks/results/"
                                       "<size>-<backend>-<device>-<dtype>.json)")
    parser.add_argument("--profile", action="store_true",
                        help="after measuring, profile one more run of each case (PyTorch profiler; tables on stderr)")
    parser.add_argument("--one", choices=ALL_CASE_NAMES, help=argparse.SUPPRESS)  # internal: one case, JSON on stdout
    args = parser.parse_args(argv)
    allowed = cases_for(args.size)
    if args.cases is None:
        args.cases = allowed
    wrong = [name for name in args.cases + ([args.one] if args.one else []) if name not in allowed]
    if wrong:
        parser.error(f"size {args.size} has no case {', '.join(map(repr, wrong))}; its cases: {'; '.join(allowed)}")
    return args


def child_command(name: str, args) -> list[str]:
    return [sys.executable, __file__, "--one", name, "--size", args.size, "--backend", args.backend, "--device",
            args.device, "--dtype", args.dtype, "--steps", str(args.steps), "--repeats", str(args.repeats),
            "--inner-steps", str(args.inner_steps)] + (["--profile"] if args.profile else [])


def environment(args) -> dict:
    info = {"torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
            "cpu_threads": torch.get_num_threads()}
    if args.device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(args.device)
    return info


def print_table(results: dict, args, targets: list[dict]) -> None:
    flow = is_flow(args.size)
    ref = None if flow else results.get(REFERENCE)
    base = results.get("euler + DI" if flow else "ddim + DI")
    if flow:
        family = FLOW_SIZES[args.size]
        cfg, guidance = FLOW_GUIDANCE[family]
        model = {"sd3": "SD3 transformer", "flux": "Flux transformer"}[family]
        edit = f"cfg {cfg:g}, " + ("a negative prompt" if guidance is None else f"embedded guidance {guidance:g}")
        evals_head, base_head, base_width = "evals (inv+edit)", "x euler+DI", 11
    else:
        model, edit, evals_head, base_head, base_width = "UNet", "cfg 7.5", "UNet evals (inv+edit)", "x ddim+DI", 10
    print(f"\n{args.size} {model} ({args.backend}), {args.device}, {args.dtype}, {args.steps} steps: one inversion + "
          f"one edit per image ({edit}), median of {args.repeats}")
    header = (f"{'case':<{NAME_WIDTH}}{evals_head:>22}{'median s':>10}{'inv s':>8}{base_head:>{base_width}}"
              f"{'peak MiB':>10}" + ("" if flow else f"{'ref/ours s':>11}{'ref/ours evals':>15}"))
    print(header)
    print("-" * len(header))
    for name, r in results.items():
        inv = r.get("unet_evals_inversion")
        evals = f"{r['unet_evals']}" if inv is None else f"{inv} + {r['unet_evals'] - inv} = {r['unet_evals']}"
        inv_s = f"{r['seconds_inversion']:.3f}" if "seconds_inversion" in r else "-"
        vs_ddim = f"{r['seconds_median'] / base['seconds_median']:.2f}" if base else "-"
        speed = f"{ref['seconds_median'] / r['seconds_median']:.2f}" if ref else "-"
        saved = f"{ref['unet_evals'] / r['unet_evals']:.2f}" if ref else "-"
        print(f"{name:<{NAME_WIDTH}}{evals:>22}{r['seconds_median']:>10.3f}{inv_s:>8}{vs_ddim:>{base_width}}"
              f"{r['peak_mib']:>10.0f}" + ("" if flow else f"{speed:>11}{saved:>15}"))
    first = next(iter(results.values()))
    if flow:
        print(f"(peak: {first['peak_kind']}; transformer weights {first['weights_mib']:.1f} MiB)")
        print("\ntargets: none (they are set for the SD1.5 UNet)")
        return
    print(f"(peak: {first['peak_kind']}; UNet weights {first['weights_mib']:.0f} MiB; reference loop in float32)")
    print("\ntargets:" if targets else "\ntargets: none of their cases ran")
    for t in targets:
        print(f"  {t['target']}: {t['value']:.3g}{t['unit']} ({'<=' if t['at_most'] else '>='} {t['limit']:g}"
              f"{t['unit']}) -- {t['verdict']}")


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.one:
        print(json.dumps(run_case(args.one, args)))
        return {}
    results = {}
    for name in args.cases:  # a process per case: its peak memory is its own, nothing of the last case lingers
        done = subprocess.run(child_command(name, args), capture_output=True, text=True)
        if done.returncode != 0:
            sys.stderr.write(done.stdout + done.stderr)
            raise SystemExit(f"benchmark case {name!r} failed (exit {done.returncode}); its output is above")
        if args.profile:
            sys.stderr.write(done.stderr)
        results[name] = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"  {name}: {results[name]['seconds_median']:.3f} s", flush=True)
    targets = check_targets(results, args)
    print_table(results, args, targets)
    path = Path(args.json or Path(__file__).parent / "results" /
                f"{args.size}-{args.backend}-{args.device.replace(':', '')}-{args.dtype}.json")
    run = {k: getattr(args, k) for k in ("size", "backend", "device", "dtype", "steps", "repeats", "inner_steps")}
    if is_flow(args.size):  # the edit's guidance (UNet sizes: cfg 7.5 throughout)
        run["cfg"], run["flux_guidance"] = FLOW_GUIDANCE[FLOW_SIZES[args.size]]
    report = {"run": run,
              "environment": environment(args), "cases": list(results.values()), "targets": targets}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"figures written to {path}")
    return report


if __name__ == "__main__":
    main()
