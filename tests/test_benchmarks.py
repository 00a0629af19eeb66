"""The benchmark command: its model sizes are the real architectures, its counts are exact, its report is complete.

Timings are not asserted here (they are figures the command prints, not pass/fail conditions).
"""
from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import sys

import pytest

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


def _run(bench_run, tmp_path, backend: str) -> dict:
    path = tmp_path / f"{backend}.json"
    bench_run.main(["--steps", str(STEPS), "--repeats", "1", "--backend", backend, "--json", str(path),
                    "--cases", *CASES])
    report = json.loads(path.read_text())
    assert report == json.loads(json.dumps(report))
    return report


def _check_report(report: dict, backend: str) -> None:
    cases = {c["case"]: c for c in report["cases"]}
    assert list(cases) == CASES
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
    assert cases["reference loop (DI + P2P)"]["backend"] == "diffusers"
    assert cases["ddim + DI + P2P"]["backend"] == backend
    for case in cases.values():
        assert case["seconds_median"] > 0 and case["peak_mib"] > case["weights_mib"] > 0
        assert case["peak_kind"] == "process peak RSS" and len(case["seconds_all"]) == 1
    verdicts = {t["target"]: t["verdict"] for t in report["targets"]}
    assert len(verdicts) == 4  # no NT row, no EDICT / DDIM row: the NT and "ddim + DI" cases did not run
    assert all(v.startswith("not judged") for v in verdicts.values())  # a 3-step tiny CPU run is no target run
    assert report["run"]["size"] == "tiny" and report["environment"]["torch"]


@pytest.fixture(scope="module")
def diffusers_run(bench_run, tmp_path_factory):
    """The diffusers run's report and printed table (one run for the tests below)."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        report = _run(bench_run, tmp_path_factory.mktemp("bench"), "diffusers")
    return report, printed.getvalue()


def test_benchmark_diffusers(diffusers_run):
    report, out = diffusers_run
    _check_report(report, "diffusers")
    assert "ref/ours" in out and "targets:" in out and "reference loop (DI + P2P)" in out


def test_benchmark_comfyui_counts_as_diffusers(comfyui_path, bench_run, diffusers_run, tmp_path):
    comfy = _run(bench_run, tmp_path, "comfyui")
    _check_report(comfy, "comfyui")
    for ours, theirs in zip(comfy["cases"], diffusers_run[0]["cases"]):
        assert ours["unet_evals"] == theirs["unet_evals"], ours["case"]


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
             for name in ["ddim + DI + P2P", "ddim + DI + MasaCtrl", "ddim + DI + PnP", "reference loop (DI + P2P)"]}
    steps = 2  # as in _check_report
    assert evals == {"ddim + DI + P2P": steps + 3 * steps, "ddim + DI + MasaCtrl": steps + 4 * steps,
                     "ddim + DI + PnP": steps + 3 * steps, "reference loop (DI + P2P)": 9 * 3}
