"""Bad inputs through ComfyUI's executor, as a user (or a script posting to /prompt) gives them: each run stops at the
node that got the input, with a message saying what is wrong; a NaN image is never returned as success; settings
that make an editor do nothing are said in the log and on the node. After each, a good prompt gives the same result
as before."""
from __future__ import annotations

import logging

import pytest
import torch

from test_comfyui_executor import (MASACTRL_INPUTS, P2P_INPUTS, PNP_INPUTS, edit_graph, editor_graph, output_of,
                                   run_prompt)

NAN = float("nan")


def failure(graph: dict) -> dict:
    """The execution_error of a graph that must fail at run time (after validation)."""
    executor, _, validation = run_prompt(graph)
    assert validation[0], validation
    errors = [data for event, data in executor.status_messages if event == "execution_error"]
    assert errors, f"the graph succeeded: {[e for e, _ in executor.status_messages]}"
    assert not executor.success
    return errors[0]


@pytest.fixture(scope="module")
def good_edit(comfy_env):
    """The good P2P edit's latents; every test runs it again afterwards and must get the same."""
    graph = editor_graph("ddim", "DirectInversion_P2PEditor", P2P_INPUTS, steps=4)

    def run():
        executor, _, validation = run_prompt(graph)
        assert validation[0] and executor.success, executor.status_messages[-2:]
        return output_of(executor, "5", 0)["samples"]

    first = run()
    assert torch.isfinite(first).all()
    return lambda: torch.equal(run(), first)


def p2p_graph(**inputs) -> dict:
    return editor_graph("ddim", "DirectInversion_P2PEditor", {**P2P_INPUTS, **inputs}, steps=4)


@pytest.mark.parametrize("value", ["inf", "1e30", "nan", "-inf", "101"])
def test_p2p_reweight_values_must_be_finite_and_in_range(good_edit, value):
    error = failure(p2p_graph(reweight_values=value))
    assert error["node_id"] == "21"
    message = error["exception_message"]
    assert "The reweight value of 'fluffy' must be" in message, message
    assert ("finite" in message) if value in ("inf", "nan", "-inf") else ("[-100.0, 100.0]" in message)
    assert good_edit()


@pytest.mark.parametrize("node, name", [("5", "The sampler's cfg"), ("4", "The inversion's cfg")])
def test_nan_cfg_through_the_api_is_refused(good_edit, node, name):
    graph = edit_graph(steps=4)
    graph[node]["inputs"]["cfg"] = NAN
    error = failure(graph)
    assert error["node_id"] == node
    assert f"{name} must be a finite number, got nan" in error["exception_message"]
    assert good_edit()


@pytest.mark.parametrize("latent, message", [
    ("DITest_HugeLatent", "far outside a VAE latent's range"),
    ("DITest_Latent16", "has 16 channels but this model works on 4-channel latents"),
    ("DITest_IntLatent", "has dtype torch.int64; a latent must be floating point"),
])
def test_latents_no_vae_gives_are_refused_at_invert(good_edit, latent, message):
    graph = edit_graph(steps=4)
    graph["12"] = {"class_type": latent, "inputs": {}}
    graph["4"]["inputs"]["latent"] = ["12", 0]
    error = failure(graph)
    assert error["node_id"] == "4" and message in error["exception_message"], error["exception_message"]
    assert good_edit()


def test_a_step_that_turns_nan_stops_the_run_naming_step_and_branch(good_edit, output_dir_images):
    """The model's target predictions turn NaN late in sampling (as an fp16 overflow does): the sampler stops at that
    step instead of returning a black image."""
    before = output_dir_images()
    graph = edit_graph(steps=10)
    for node in ("8", "9", "10", "11"):  # the SamplerCustom chain, which saves an image of its own
        graph.pop(node)
    graph["2"]["class_type"] = "DITest_OverflowingSD15"
    error = failure(graph)
    assert error["node_id"] == "5"
    message = error["exception_message"]
    assert "Sampling step" in message and "of 10 made the target latent NaN or infinite" in message, message
    assert "--force-fp32" in message
    step = int(message.split("Sampling step ")[1].split(" ")[0])
    assert 1 < step <= 10  # not the first step: sigma falls below 3 late
    assert output_dir_images() == before  # nothing saved
    assert good_edit()


@pytest.fixture
def output_dir_images(comfy_env):
    _, output_dir = comfy_env
    return lambda: sorted(p.name for p in output_dir.iterdir() if p.suffix == ".png")


@pytest.mark.parametrize("editor", ["masactrl", "p2p"])
def test_a_mask_batch_that_fits_no_latent_is_refused(good_edit, editor):
    node, inputs = {"masactrl": ("DirectInversion_MasaCtrlEditor", MASACTRL_INPUTS),
                    "p2p": ("DirectInversion_P2PEditor", {**P2P_INPUTS, "blend_source_words": "",
                                                           "blend_target_words": ""})}[editor]
    graph = editor_graph("ddim", node, inputs, steps=4)
    graph["30"] = {"class_type": "DITest_Mask3", "inputs": {}}
    graph["21"]["inputs"]["mask"] = ["30", 0]
    error = failure(graph)
    assert error["node_id"] == "5"
    assert "mask has batch 3 but the latents have batch 1" in error["exception_message"], error["exception_message"]
    assert good_edit()


@pytest.mark.parametrize("editor, inputs, words", [
    ("DirectInversion_MasaCtrlEditor", {**MASACTRL_INPUTS, "start_step": 4}, "MasaCtrl's start_step is 4 but the edit has 4 steps"),
    ("DirectInversion_PnPEditor", {**PNP_INPUTS, "feature_injection": 0.2, "attention_injection": 0.1}, "PnP injects nothing"),
    ("DirectInversion_P2PEditor", {**P2P_INPUTS, "cross_replace_steps": 0.2, "self_replace_steps": 0.0,
                                   "reweight_words": "", "reweight_values": "", "blend_source_words": "",
                                   "blend_target_words": ""}, "P2P edits nothing"),
])
def test_an_editor_that_would_do_nothing_is_said_on_the_node_and_in_the_log(good_edit, caplog, editor, inputs, words):
    graph = editor_graph("ddim", editor, inputs, steps=4)
    with caplog.at_level(logging.WARNING, logger="DirectInversion"):
        executor, _, validation = run_prompt(graph)
    assert validation[0] and executor.success, executor.status_messages[-2:]
    warnings = executor.history_result["outputs"]["5"]["direct_inversion_warnings"]
    assert len(warnings) == 1 and words in warnings[0]
    assert any(words in r.getMessage() for r in caplog.records)
    # the edit is indeed the plain two-branch sampling: the target as without an editor
    plain = editor_graph("ddim", editor, inputs, steps=4)
    plain["5"]["inputs"].pop("editor")
    without, _, _ = run_prompt(plain)
    assert "direct_inversion_warnings" not in without.history_result["outputs"]["5"]
    assert torch.allclose(output_of(executor, "5", 0)["samples"], output_of(without, "5", 0)["samples"], atol=1e-5)
    assert good_edit()


def test_a_working_editor_sends_no_warning(comfy_env):
    executor, _, _ = run_prompt(editor_graph("ddim", "DirectInversion_MasaCtrlEditor", MASACTRL_INPUTS, steps=4))
    assert executor.success and "direct_inversion_warnings" not in executor.history_result["outputs"]["5"]


@pytest.mark.parametrize("tamper, message", [
    (lambda t, m: t.update(z_star=t["z_star"].to(torch.int64)), "the tensor 'z_star' has dtype int64"),
    (lambda t, m: m.pop("latent_shape"), "the field 'latent_shape' is missing"),
    (lambda t, m: m.update(timesteps=m["timesteps"][:2]), "it is inconsistent: its trajectory has 4 steps"),
])
def test_load_inversion_refuses_a_damaged_file(good_edit, comfy_env, tamper, message):
    """Save Inversion writes a file; once damaged, Load Inversion says what is wrong with it (the sampler never runs)."""
    import json

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    _, output_dir = comfy_env
    graph = edit_graph(steps=4)
    graph["13"] = {"class_type": "DirectInversion_SaveInversion",
                   "inputs": {"inversion": ["4", 0], "filename_prefix": "damaged/inv"}}
    executor, _, _ = run_prompt(graph)
    assert executor.success
    path = sorted((output_dir / "inversions" / "damaged").glob("inv_*.safetensors"))[-1]
    tensors = load_file(str(path))
    with safe_open(str(path), framework="pt") as handle:
        meta = json.loads(handle.metadata()["inversion"])
    tamper(tensors, meta)
    save_file(tensors, str(path), metadata={"inversion": json.dumps(meta)})

    graph = edit_graph(steps=4)
    graph["4"] = {"class_type": "DirectInversion_LoadInversion",
                  "inputs": {"model": ["2", 0], "inversion_file": f"damaged/{path.name}", "latent": ["3", 0]}}
    for node in ("8", "9", "10", "11"):
        graph.pop(node)
    error = failure(graph)
    assert error["node_id"] == "4"
    assert error["exception_message"].startswith(f"Cannot read {path.name}: ") and message in error["exception_message"]
    assert good_edit()
