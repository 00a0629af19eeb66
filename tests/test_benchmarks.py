"""The benchmark command: its model sizes are the real architectures, its counts are exact, its report is complete.

Timings are not asserted here (they are figures the command prints, not pass/fail conditions).
"""
from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import math
import platform
import statistics
import sys

import pytest
import torch

import di_testing

BENCHMARKS = di_testing.ROOT / "benchmarks"


def _load(name: str):
    module_name = f"di_benchmarks_{name}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(module_name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench_run(pack):
    return _load("run")


@pytest.fixture(scope="module")
def harness(pack):
    return _load("harness")


# Parameter counts of the published UNets: SD1.5's (runwayml/stable-diffusion-v1-5) and SDXL base 1.0's.
PUBLISHED_PARAMETERS = {"sd15": 859_520_964, "sdxl": 2_567_463_684}


@pytest.mark.parametrize("size", ["sd15", "sdxl"])
def test_benchmark_sizes_are_the_published_unets(harness, size):
    unet = harness.diffusers_unet(size, "meta")  # shapes only: no memory, no time
    assert sum(p.numel() for p in unet.parameters()) == PUBLISHED_PARAMETERS[size]
    side = harness.SHAPES[size][0]
    assert unet.config.sample_size == side and side * 8 == {"sd15": 512, "sdxl": 1024}[size]


@pytest.mark.parametrize("size,expected", [("sd15", "SD15"), ("sdxl", "SDXL")])
def test_comfyui_recognises_the_benchmark_unets(comfyui_path, harness, size, expected):
    import comfy.model_detection

    state = harness.diffusers_unet(size, "meta").state_dict()
    config = comfy.model_detection.model_config_from_unet_config(
        comfy.model_detection.unet_config_from_diffusers_unet(state))
    assert type(config).__name__ == expected


STEPS = 3
CASES = ["ddim + DI + P2P", "edict", "reference loop (DI + P2P)"]
# what each case runs (method, editor, offsets), as the benchmark's documentation describes it
CASE_SETUP = {"ddim + DI + P2P": ("ddim", "p2p", "source"), "edict": ("edict", None, "off"),
              "reference loop (DI + P2P)": ("reference", None, "source")}
CASE_FIELDS = {"case", "method", "editor", "offsets", "backend", "size", "device", "dtype", "steps", "unet_evals",
               "seconds_median", "seconds_all", "peak_mib", "peak_kind", "weights_mib"}
INVERSION_FIELDS = {"unet_evals_inversion", "seconds_inversion"}  # cases of the pack's adapters only
TARGET_RUN = "not judged: set for size sd15, device cuda, dtype float16, steps 50"


def _run(bench_run, tmp_path, backend: str) -> dict:
    path = tmp_path / f"{backend}.json"
    returned = bench_run.main(["--steps", str(STEPS), "--repeats", "1", "--backend", backend, "--json", str(path),
                               "--cases", *CASES])
    report = json.loads(path.read_text())
    assert report == returned  # the file holds the whole report the command made, nothing lost or stale
    return report


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _check_report(report: dict, backend: str) -> None:
    assert set(report) == {"run", "environment", "cases", "targets"}
    assert report["run"] == {"size": "tiny", "backend": backend, "device": "cpu", "dtype": "float32",
                             "steps": STEPS, "repeats": 1, "inner_steps": 0}
    env = report["environment"]
    assert env["torch"] == torch.__version__ and env["python"] == platform.python_version()
    assert env["machine"] == platform.machine() and "gpu" not in env  # a CPU run names no GPU
    assert isinstance(env["cpu_threads"], int) and env["cpu_threads"] >= 1

    cases = {c["case"]: c for c in report["cases"]}
    assert list(cases) == CASES
    # the tiny UNet's float32 weights, counted here: every case measures that model (ComfyUI's copy has the
    # same weights), the reference loop included (it runs the UNet in float32)
    tiny = di_testing.tiny_diffusers_unet()
    weights_mib = sum(p.numel() for p in tiny.parameters()) * 4 / 2 ** 20
    for name, case in cases.items():
        own = name != "reference loop (DI + P2P)"
        assert set(case) == CASE_FIELDS | (INVERSION_FIELDS if own else set()), name
        assert (case["method"], case["editor"], case["offsets"]) == CASE_SETUP[name]
        assert (case["size"], case["device"], case["dtype"], case["steps"]) == ("tiny", "cpu", "float32", STEPS)
        assert case["backend"] == (backend if own else "diffusers")
        assert isinstance(case["unet_evals"], int) and case["unet_evals"] > 0
        assert case["weights_mib"] == pytest.approx(weights_mib, rel=1e-12), name
        # one timed run after the warm-up: its time is the median; a few seconds at most for 3 tiny steps
        assert len(case["seconds_all"]) == 1 and all(_finite(t) and t > 0 for t in case["seconds_all"])
        assert case["seconds_median"] == statistics.median(case["seconds_all"]) < 600
        # peak RSS of a process that imported torch and ran the tiny model: above its weights, below 64 GiB
        assert _finite(case["peak_mib"]) and case["weights_mib"] + 50 < case["peak_mib"] < 64 * 1024
        assert case["peak_kind"] == "process peak RSS"
        if own:  # the inversion is part of the timed run and of its evaluations
            assert _finite(case["seconds_inversion"]) and 0 < case["seconds_inversion"] < case["seconds_median"]
            inverted = case["unet_evals_inversion"]
            assert isinstance(inverted, int) and 0 < inverted < case["unet_evals"]
    steps = STEPS - 1  # the last of the schedule's steps has zero length and is not evaluated
    # DDIM inversion: 1 sample a step; the edit: source conditional + target unconditional and conditional
    assert cases["ddim + DI + P2P"]["unet_evals_inversion"] == steps
    assert cases["ddim + DI + P2P"]["unet_evals"] == steps + 3 * steps
    # EDICT: the reference's int(0.8 * steps) levels (one zero-length); two updates a step, each a guided
    # (unconditional + conditional) prediction, for the inversion and for each branch of the edit
    edict_steps = int(0.8 * STEPS) - 1
    assert cases["edict"]["unet_evals_inversion"] == 2 * 2 * edict_steps
    assert cases["edict"]["unet_evals"] == 2 * 2 * edict_steps + 2 * 2 * 2 * edict_steps
    # the reference-style loop: inversion (1), offset pass (4) and edit (4) at every step
    assert cases["reference loop (DI + P2P)"]["unet_evals"] == 9 * STEPS
    # the targets: the rows whose cases ran (no NT row, no EDICT / DDIM row: the NT and "ddim + DI" cases did not),
    # each with the figure it is about, none judged (a 3-step tiny CPU run is no target run)
    ours, ref = cases["ddim + DI + P2P"], cases["reference loop (DI + P2P)"]
    rows = {t["target"]: t for t in report["targets"]}
    assert all(set(t) == {"target", "value", "limit", "unit", "at_most", "verdict"} for t in report["targets"])
    expected = {  # target: (value, limit, unit, at most, verdict)
        "UNet evals per image, DDIM + DI + P2P (inversion included)": (ours["unet_evals"], 200, "", True,
                                                                       "not judged: set for 50 steps"),
        "DDIM + DI + P2P edit, inversion included": (ours["seconds_median"], 1.5, " s", True, TARGET_RUN),
        "peak memory over the UNet's weights, DDIM + DI + P2P": ((ours["peak_mib"] - ours["weights_mib"]) / 1024, 2.0,
                                                                 " GiB", True, TARGET_RUN),
        "reference loop / ours, time": (ref["seconds_median"] / ours["seconds_median"], 5.0, "x", False, TARGET_RUN)}
    assert list(rows) == list(expected)
    for name, (value, limit, unit, at_most, verdict) in expected.items():
        row = rows[name]
        assert _finite(row["value"]) and row["value"] == pytest.approx(value, rel=1e-12), name
        assert (row["limit"], row["unit"], row["at_most"], row["verdict"]) == (limit, unit, at_most, verdict), name


@pytest.fixture(scope="module")
def diffusers_run(bench_run, tmp_path_factory):
    """The diffusers run's report and printed table (one run for the tests below)."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        report = _run(bench_run, tmp_path_factory.mktemp("bench"), "diffusers")
    return report, printed.getvalue()


def test_benchmark_diffusers(bench_run, diffusers_run):
    report, out = diffusers_run
    _check_report(report, "diffusers")
    assert "ref/ours" in out and "targets:" in out and "reference loop (DI + P2P)" in out
    lines = out.splitlines()
    for case in report["cases"]:  # the printed table shows the report's figures
        line = next(line for line in lines if line.startswith(case["case"] + " "))
        inv = case.get("unet_evals_inversion")
        evals = str(case["unet_evals"]) if inv is None else f"{inv} + {case['unet_evals'] - inv} = {case['unet_evals']}"
        assert line[bench_run.NAME_WIDTH:bench_run.NAME_WIDTH + 22].strip() == evals, line
        assert f"{case['seconds_median']:.3f}" in line, line


def test_benchmark_comfyui_counts_as_diffusers(comfyui_path, bench_run, diffusers_run, tmp_path):
    comfy = _run(bench_run, tmp_path, "comfyui")
    _check_report(comfy, "comfyui")
    for ours, theirs in zip(comfy["cases"], diffusers_run[0]["cases"]):
        assert ours["unet_evals"] == theirs["unet_evals"], ours["case"]


P2P_ZERO_CASES = {"ddim + P2P-Zero": ("ddim", "p2p_zero", "off"),
                  "ddim + DI + P2P-Zero": ("ddim", "p2p_zero", "both"),
                  "one forward + backward (latent grad)": ("forward_backward", None, None)}


def _p2p_zero_rows(bench_run, backend: str) -> dict:
    """The P2P-Zero rows and the forward + backward row, in this process (a subprocess each costs seconds more),
    checked, with the table the command prints of them."""
    args = bench_run.parse_args(["--steps", str(STEPS), "--repeats", "1", "--backend", backend])
    rows = {name: bench_run.run_case(name, args) for name in P2P_ZERO_CASES}
    steps = STEPS - 1  # as in _check_report
    for name, (method, editor, offsets) in P2P_ZERO_CASES.items():
        row = rows[name]
        assert (row["method"], row["editor"], row["offsets"], row["backend"]) == (method, editor, offsets, backend)
        assert set(row) == CASE_FIELDS | (INVERSION_FIELDS if editor else set()), name
        assert len(row["seconds_all"]) == 1 and _finite(row["seconds_median"]) and row["seconds_median"] > 0
        assert _finite(row["peak_mib"]) and row["peak_mib"] > row["weights_mib"] + 50
    for name in ("ddim + P2P-Zero", "ddim + DI + P2P-Zero"):
        # DDIM inversion: 1 a step; the edit: the source's conditional prediction, the target's gradient pass (its
        # forward; the backward is no forward call) and the target's guided prediction (2)
        assert rows[name]["unet_evals_inversion"] == steps, name
        assert rows[name]["unet_evals"] == steps + (1 + 1 + 2) * steps, name
    assert rows["one forward + backward (latent grad)"]["unet_evals"] == 1
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        bench_run.print_table(rows, args, [])
    lines = printed.getvalue().splitlines()
    for name, row in rows.items():
        line = next(line for line in lines if line.startswith(name + " "))
        inv = row.get("unet_evals_inversion")
        evals = str(row["unet_evals"]) if inv is None else f"{inv} + {row['unet_evals'] - inv} = {row['unet_evals']}"
        assert line[bench_run.NAME_WIDTH:bench_run.NAME_WIDTH + 22].strip() == evals, line
    return rows


def test_p2p_zero_rows_diffusers(bench_run):
    _p2p_zero_rows(bench_run, "diffusers")


def test_p2p_zero_rows_comfyui(comfyui_path, bench_run):
    _p2p_zero_rows(bench_run, "comfyui")


def _check_bench(bench_run, backend: str):
    """P2P-Zero's target is source + Delta (one sentence a side: the target, to rounding); the forward + backward
    case's gradient reaches a copy of the latent, one evaluation, and the weights require grad as before after it."""
    bench = sys.modules[bench_run.Bench.__module__].Bench("tiny", backend, "cpu", torch.float32)
    assert bench_run.edit_prompts("p2p", bench) == {}  # the other editors edit with the bench's target and null
    prompts = bench_run.edit_prompts("p2p_zero", bench)
    assert set(prompts) == {"target", "negative"} and prompts["negative"] is bench.source
    directed = prompts["target"]
    if backend == "diffusers":
        torch.testing.assert_close(directed, bench.target)
    else:
        ((embeds, options),) = directed
        torch.testing.assert_close(embeds, bench.target[0][0])
        assert options == {}
    requires = [p.requires_grad for p in bench.unet_module.parameters()]
    grad = bench.forward_backward()
    assert grad.shape == bench.latent.shape and torch.isfinite(grad).all() and grad.abs().sum() > 0
    assert not bench.latent.requires_grad and bench.counted.evaluations == 1
    assert [p.requires_grad for p in bench.unet_module.parameters()] == requires
    assert all(p.grad is None for p in bench.unet_module.parameters())  # no weight gradients were made
    return bench


def test_bench_p2p_zero_target_and_gradient_diffusers(bench_run):
    _check_bench(bench_run, "diffusers")


def test_bench_p2p_zero_target_and_gradient_comfyui(comfyui_path, bench_run):
    bench = _check_bench(bench_run, "comfyui")
    # where the conditioning has a pooled output (SDXL), the direction moves it too
    bench.source = [[bench.source[0][0], {"pooled_output": torch.ones(1, 4)}]]
    bench.target = [[bench.target[0][0], {"pooled_output": torch.full((1, 4), 3.0)}]]
    torch.testing.assert_close(bench.directed_target()[0][1]["pooled_output"], torch.full((1, 4), 3.0))


def _fake(seconds: float, evals: int = 196, peak: float = 3000.0, weights: float = 1640.0, inversion: float = 0.2):
    return {"seconds_median": seconds, "unet_evals": evals, "peak_mib": peak, "weights_mib": weights,
            "seconds_inversion": inversion}


def test_targets_are_judged_on_the_target_run_only(bench_run):
    results = {"ddim + DI": _fake(1.0, 245), "edict": _fake(3.0, 468), "null_text + DI": _fake(12.0, 833, inversion=11.0),
               "ddim + DI + P2P": _fake(1.2, 196, peak=1640.0 + 2.5 * 1024), "reference loop (DI + P2P)": _fake(4.8, 450)}
    args = bench_run.parse_args(["--size", "sd15", "--device", "cuda", "--dtype", "float16"])
    verdicts = {t["target"].split(",")[0].split(" (")[0]: t["verdict"] for t in bench_run.check_targets(results, args)}
    assert verdicts["UNet evals per image"] == "met"
    assert verdicts["DDIM + DI + P2P edit"] == "met"
    assert verdicts["null-text inversion"] == "missed by 1 s (10% over)"
    assert verdicts["EDICT / DDIM time"] == "missed by 0.5x (20% over)"
    assert verdicts["peak memory over the UNet's weights"] == "missed by 0.5 GiB (25% over)"
    assert verdicts["reference loop / ours"] == "missed: 1.25x short"
    cpu = bench_run.parse_args(["--size", "sd15"])
    judged = {t["target"]: t["verdict"] for t in bench_run.check_targets(results, cpu)}
    assert [v for v in judged.values() if not v.startswith("not judged")] == ["met"]  # the UNet-evaluation count


def test_sdxl_layout_runs_every_editor_and_the_reference(bench_run, monkeypatch):
    """The SDXL paths (added time/pooled conditioning, linear projections, a decoder of nine blocks) on a shrunk
    SDXL layout, so that the GPU command at SDXL size does not meet them for the first time."""
    harness = sys.modules[bench_run.Bench.__module__]  # the harness module the command itself uses
    small = dict(harness.SDXL_UNET, block_out_channels=(16, 32, 32), transformer_layers_per_block=(1, 1, 2),
                 attention_head_dim=(2, 2, 4), cross_attention_dim=32, norm_num_groups=8, sample_size=16,
                 addition_time_embed_dim=8, projection_class_embeddings_input_dim=16 + 6 * 8)
    monkeypatch.setitem(harness.SHAPES, "sdxl", (16, 77, 32, 16))
    monkeypatch.setattr(harness, "SDXL_UNET", small)
    unet = harness.diffusers_unet("sdxl", "meta")
    assert unet.config.addition_embed_type == "text_time" and sum(p.numel() for p in unet.parameters()) < 5e6
    args = bench_run.parse_args(["--size", "sdxl", "--steps", "3", "--repeats", "1"])
    evals = {name: bench_run.run_case(name, args)["unet_evals"]
             for name in ["ddim + DI + P2P", "ddim + DI + MasaCtrl", "ddim + DI + PnP", "ddim + DI + P2P-Zero",
                          "one forward + backward (latent grad)", "reference loop (DI + P2P)"]}
    steps = 2  # as in _check_report
    assert evals == {"ddim + DI + P2P": steps + 3 * steps, "ddim + DI + MasaCtrl": steps + 4 * steps,
                     "ddim + DI + PnP": steps + 3 * steps, "ddim + DI + P2P-Zero": steps + 4 * steps,
                     "one forward + backward (latent grad)": 1, "reference loop (DI + P2P)": 9 * 3}


# -- flow sizes ------------------------------------------------------------------------------------------------------
# Parameter counts of the published transformers: SD3.5 medium's (stabilityai/stable-diffusion-3.5-medium: its
# parameters plus the 384x384-patch positional-embedding table, a buffer in diffusers and a weight in the
# checkpoint, 2.47e9 in all, the published "2.5B") and FLUX.1-dev's (black-forest-labs/FLUX.1-dev, "12B").
PUBLISHED_FLOW = {"sd35-medium": (2_243_171_520, 2_469_663_936, "SD3"),
                  "flux-dev": (11_901_408_320, 11_901_408_320, "Flux")}  # parameters, checkpoint values, ComfyUI


@pytest.fixture(scope="module")
def meta_transformers(harness):
    """The real-size flow transformers on the meta device (shapes only); SD3.5's positional table takes seconds."""
    return {size: harness.diffusers_transformer(size, "meta") for size in PUBLISHED_FLOW}


@pytest.mark.parametrize("size", list(PUBLISHED_FLOW))
def test_flow_benchmark_sizes_are_the_published_transformers(harness, meta_transformers, size):
    model = meta_transformers[size]
    parameters, stored, _ = PUBLISHED_FLOW[size]
    assert sum(p.numel() for p in model.parameters()) == parameters
    assert sum(t.numel() for t in model.state_dict().values()) == stored
    side, tokens, width, pooled = harness.SHAPES[size]
    config = model.config
    assert side * 8 == 1024 and (width, pooled) == (config.joint_attention_dim, config.pooled_projection_dim)
    if size == "sd35-medium":  # 64x64 patches of a 128x128 latent, within the positional table
        assert config.sample_size == side and side // config.patch_size <= config.pos_embed_max_size
        assert tokens == 77 + 256 and type(model).__name__ == "SD3Transformer2DModel"
    else:
        assert config.guidance_embeds and tokens == 512 and type(model).__name__ == "FluxTransformer2DModel"


def test_flow_tiny_sizes_are_the_tests_models(harness):
    import flow_testing

    for size, make in (("tiny-sd3", flow_testing.tiny_diffusers_sd3), ("tiny-flux", flow_testing.tiny_diffusers_flux)):
        ours, theirs = harness.diffusers_transformer(size).state_dict(), make().state_dict()
        assert list(ours) == list(theirs) and all(torch.equal(ours[k], theirs[k]) for k in ours), size
    assert [s for s in harness.SIZES if harness.is_flow(s)] == ["tiny-sd3", "tiny-flux", "sd35-medium", "flux-dev"]


@pytest.mark.parametrize("size", list(PUBLISHED_FLOW))
def test_comfyui_recognises_the_flow_benchmark_transformers(comfyui_path, meta_transformers, size):
    import comfy.model_detection

    state = dict(meta_transformers[size].state_dict())
    converted = comfy.model_detection.convert_diffusers_mmdit(state, "")
    assert not state  # every diffusers weight has its ComfyUI place
    config = comfy.model_detection.model_config_from_unet_config(
        comfy.model_detection.detect_unet_config(converted, ""), converted)
    assert type(config).__name__ == PUBLISHED_FLOW[size][2]
    assert sum(t.numel() for t in converted.values()) == PUBLISHED_FLOW[size][1]


def test_flow_cases_follow_the_size(bench_run):
    assert bench_run.parse_args([]).cases == bench_run.CASE_NAMES  # UNet sizes: their cases, unchanged
    editors = ["euler + DI + P2P", "euler + DI + MasaCtrl", "euler + DI + PnP", "rf_solver + DI + P2P"]
    sd3 = ["euler + DI", "euler (DI off)", "rf_solver + DI", "negative_prompt + DI", "null_text + DI"] + editors
    for size in ("tiny-sd3", "sd35-medium"):
        assert bench_run.parse_args(["--size", size]).cases == sd3
    for size in ("tiny-flux", "flux-dev"):
        assert bench_run.parse_args(["--size", size]).cases == sd3[:3] + editors
    for argv in (["--size", "tiny-flux", "--cases", "null_text + DI"], ["--size", "tiny-sd3", "--cases", "ddim + DI"],
                 ["--cases", "euler + DI"]):
        with pytest.raises(SystemExit), contextlib.redirect_stderr(io.StringIO()):
            bench_run.parse_args(argv)
    assert bench_run.check_targets({}, bench_run.parse_args(["--size", "sd35-medium", "--device", "cuda"])) == []


FLOW_SETUP = {"euler + DI": ("euler", "source"), "euler (DI off)": ("euler", "off"),
              "rf_solver + DI": ("rf_solver", "source"), "negative_prompt + DI": ("negative_prompt", "source"),
              "null_text + DI": ("null_text", "source"), "euler + DI + P2P": ("euler", "source", "p2p"),
              "euler + DI + MasaCtrl": ("euler", "source", "masactrl"), "euler + DI + PnP": ("euler", "source", "pnp"),
              "rf_solver + DI + P2P": ("rf_solver", "source", "p2p")}


def _flow_rows(bench_run, backend: str) -> dict:
    """Every flow case of both tiny sizes, in this process, checked against the count formulas of the command's
    documentation (N steps, none of zero length; g samples per guided prediction: SD3 at CFG 4.5 2, Flux at CFG 1
    1; the source branch: guided (g) without an editor and with MasaCtrl, its conditional prediction alone (1) with P2P,
    whose offsets pin it anyway, and with PnP, whose source is unguided), with the table the command prints of them."""
    n = STEPS
    rows = {}
    for size, g in (("tiny-sd3", 2), ("tiny-flux", 1)):
        args = bench_run.parse_args(["--size", size, "--steps", str(n), "--repeats", "1", "--backend", backend])
        rows[size] = {name: bench_run.run_case(name, args) for name in args.cases}
        expected = {"euler + DI": (n, n + 2 * g * n), "euler (DI off)": (n, n + 2 * g * n),
                    "rf_solver + DI": (2 * n, 2 * n + 2 * 2 * g * n), "negative_prompt + DI": (n, n + 2 * g * n),
                    "euler + DI + P2P": (n, n + (1 + g) * n), "euler + DI + MasaCtrl": (n, n + 2 * g * n),
                    "euler + DI + PnP": (n, n + (1 + g) * n), "rf_solver + DI + P2P": (2 * n, 2 * n + 2 * (1 + g) * n)}
        for name, row in rows[size].items():
            assert (row["method"], row["offsets"], row["editor"]) == (FLOW_SETUP[name] + (None,))[:3], name
            assert (row["backend"], row["size"], row["steps"]) == (backend, size, n)
            assert set(row) == CASE_FIELDS | INVERSION_FIELDS, name
            assert len(row["seconds_all"]) == 1 and _finite(row["seconds_median"]) and row["seconds_median"] > 0
            assert _finite(row["peak_mib"]) and row["peak_mib"] > row["weights_mib"] > 0
            if name == "null_text + DI":  # N + sum(2 + k_n), 0 < k_n <= 10 (early stops), then the edit's 4N
                assert n + 3 * n <= row["unet_evals_inversion"] <= n + 12 * n
                assert row["unet_evals"] - row["unet_evals_inversion"] == 2 * g * n
            else:
                assert (row["unet_evals_inversion"], row["unet_evals"]) == expected[name], (size, name)
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            bench_run.print_table(rows[size], args, bench_run.check_targets(rows[size], args))
        out = printed.getvalue()
        assert ("SD3 transformer" if g == 2 else "Flux transformer") in out and "ref/ours" not in out
        assert "targets: none" in out
        for name, row in rows[size].items():
            line = next(line for line in out.splitlines() if line.startswith(name + " "))
            inv = row["unet_evals_inversion"]
            assert line[bench_run.NAME_WIDTH:bench_run.NAME_WIDTH + 22].strip() == \
                f"{inv} + {row['unet_evals'] - inv} = {row['unet_evals']}", line
    assert list(rows["tiny-flux"]) == ["euler + DI", "euler (DI off)", "rf_solver + DI", "euler + DI + P2P",
                                       "euler + DI + MasaCtrl", "euler + DI + PnP", "rf_solver + DI + P2P"]
    return rows


def _null_text_count(harness, backend: str) -> int:
    """Null-text's inversion on the tiny SD3 counts N (Euler at guidance 1) + per step 2 + its inner iterations,
    which the inversion records (a loss per iteration)."""
    bench = harness.Bench("tiny-sd3", backend, "cpu", torch.float32)
    inversion = bench.invert("null_text", STEPS)
    inner = int((~torch.isnan(inversion.extras["null_text_losses"])).sum())
    assert inversion.options["guidance"] == 4.5 and 0 < inner <= 10 * STEPS  # fitted for the edit's CFG
    assert bench.counted.evaluations == STEPS + 2 * STEPS + inner
    return bench.counted.evaluations


@pytest.fixture(scope="module")
def flow_rows_diffusers(bench_run):
    return _flow_rows(bench_run, "diffusers")


def test_flow_counts_diffusers(harness, flow_rows_diffusers):
    _null_text_count(harness, "diffusers")


def test_flow_counts_comfyui_as_diffusers(comfyui_path, bench_run, harness, flow_rows_diffusers):
    rows = _flow_rows(bench_run, "comfyui")
    for size, cases in rows.items():
        for name, row in cases.items():  # the same weights: the same counts, null-text's early stops included
            theirs = flow_rows_diffusers[size][name]
            assert (row["unet_evals_inversion"], row["unet_evals"]) == \
                (theirs["unet_evals_inversion"], theirs["unet_evals"]), (size, name)
            assert row["weights_mib"] == pytest.approx(theirs["weights_mib"], rel=1e-12)
    assert _null_text_count(harness, "comfyui") == _null_text_count(harness, "diffusers")


def test_flow_benchmark_report(bench_run, tmp_path):
    """The command end to end on a flow size (its case in a process of its own): the report's run records the edit's
    guidance, no targets, the figures of the rows above."""
    path = tmp_path / "flux.json"
    with contextlib.redirect_stdout(io.StringIO()):
        returned = bench_run.main(["--size", "tiny-flux", "--steps", str(STEPS), "--repeats", "1", "--json", str(path),
                                   "--cases", "rf_solver + DI"])
    report = json.loads(path.read_text())
    assert report == returned and report["targets"] == []
    assert report["run"] == {"size": "tiny-flux", "backend": "diffusers", "device": "cpu", "dtype": "float32",
                             "steps": STEPS, "repeats": 1, "inner_steps": 0, "cfg": 1.0, "flux_guidance": 3.5}
    (case,) = report["cases"]
    assert (case["case"], case["unet_evals_inversion"], case["unet_evals"]) == ("rf_solver + DI", 2 * STEPS, 6 * STEPS)
    assert case["peak_kind"] == "process peak RSS" and case["weights_mib"] + 50 < case["peak_mib"]


def _shrunk_real_flow_layouts(bench_run, monkeypatch, backend: str) -> None:
    """The real flow sizes' paths (configured transformers, SD3.5's MMDiT-X dual attention and RMS-normed queries and
    keys, ComfyUI's detection of them, Flux dev's guidance embedding) on shrunk layouts, so that the GPU command does
    not meet them for the first time: their counts are the tiny sizes'."""
    harness = sys.modules[bench_run.Bench.__module__]
    monkeypatch.setattr(harness, "SD35_MEDIUM", dict(harness.SD35_MEDIUM, sample_size=16, num_layers=2,
                                                     num_attention_heads=2, caption_projection_dim=128,
                                                     joint_attention_dim=64, pooled_projection_dim=32,
                                                     pos_embed_max_size=16, dual_attention_layers=(0,)))
    monkeypatch.setattr(harness, "FLUX_DEV", dict(harness.FLUX_DEV, num_layers=1, num_single_layers=1,
                                                  num_attention_heads=2, attention_head_dim=16, axes_dims_rope=(4, 6, 6),
                                                  joint_attention_dim=32, pooled_projection_dim=16))
    monkeypatch.setitem(harness.SHAPES, "sd35-medium", (16, 8, 64, 32))
    monkeypatch.setitem(harness.SHAPES, "flux-dev", (16, 8, 32, 16))
    for size, g in (("sd35-medium", 2), ("flux-dev", 1)):
        assert sum(p.numel() for p in harness.diffusers_transformer(size, "meta").parameters()) < 5e6
        args = bench_run.parse_args(["--size", size, "--steps", str(STEPS), "--repeats", "1", "--backend", backend])
        row = bench_run.run_case("euler + DI", args)
        assert (row["unet_evals_inversion"], row["unet_evals"]) == (STEPS, STEPS + 2 * g * STEPS), size


def test_real_flow_layouts_run(bench_run, monkeypatch):
    _shrunk_real_flow_layouts(bench_run, monkeypatch, "diffusers")


def test_real_flow_layouts_run_comfyui(comfyui_path, bench_run, monkeypatch):
    _shrunk_real_flow_layouts(bench_run, monkeypatch, "comfyui")
