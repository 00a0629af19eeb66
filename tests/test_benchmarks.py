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
