"""The pack inside real ComfyUI: loaded by ComfyUI's own loader, run by its executor, and its quick CI test."""
from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid

import pytest
import torch

import di_testing as T
from comfy_testing import FakeServer, comfyui_env


def run_prompt(prompt: dict):
    """Validate and execute an API-format prompt the way ComfyUI's server does, with the executor that this ComfyUI's
    main.py builds; return (executor, server, validation)."""
    import execution

    prompt_id = str(uuid.uuid4())
    validation = asyncio.run(execution.validate_prompt(prompt_id, prompt, None))
    server = FakeServer()
    executor = comfyui_env().make_executor(server)
    if validation[0]:
        executor.execute(prompt, prompt_id, {}, validation[2])
    return executor, server, validation


def executing_node(node_id=None):
    """The node a progress tick belongs to (ComfyUI's ProgressBar passes node_id=None; the executor knows)."""
    from comfy_execution.utils import get_executing_context

    context = get_executing_context()
    return context.node_id if context is not None else node_id


def output_of(executor, node_id: str, index: int):
    return comfyui_env().cached_outputs(executor, node_id)[index][0]


def run_edit(graph: dict):
    """Run an edit graph that must succeed; return (executor, VAEEncode's latent (node 3), the sampler's (node 5)
    edited and source_reconstruction latents)."""
    executor, _, validation = run_prompt(graph)
    assert validation[0], validation
    assert "execution_success" in [e for e, _ in executor.status_messages], executor.status_messages[-2:]
    samples = [output_of(executor, node, i)["samples"] for node, i in (("3", 0), ("5", 0), ("5", 1))]
    return (executor, *samples)


def edit_graph(steps=10, offsets="source", cfg=7.5):
    return {
        "1": {"class_type": "LoadImage", "inputs": {"image": "di_test.png"}},
        "2": {"class_type": "DITest_TinySD15", "inputs": {}},
        "3": {"class_type": "VAEEncode", "inputs": {"pixels": ["1", 0], "vae": ["2", 1]}},
        "4": {"class_type": "DirectInversion_Invert",
              "inputs": {"model": ["2", 0], "latent": ["3", 0], "source": ["2", 2], "negative": ["2", 4],
                         "method": "ddim", "steps": steps, "cfg": 1.0}},
        "5": {"class_type": "DirectInversion_Sampler",
              "inputs": {"model": ["2", 0], "inversion": ["4", 0], "target": ["2", 3], "negative": ["2", 4],
                         "cfg": cfg, "offsets": offsets}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["2", 1]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": "di_edit"}},
        # chaining into ComfyUI's own sampler: z_T and the schedule from Invert, noise off
        "8": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}},
        "9": {"class_type": "SamplerCustom",
              "inputs": {"model": ["2", 0], "add_noise": False, "noise_seed": 0, "cfg": 1.0, "positive": ["2", 2],
                         "negative": ["2", 4], "sampler": ["8", 0], "sigmas": ["4", 2], "latent_image": ["4", 1]}},
        "10": {"class_type": "VAEDecode", "inputs": {"samples": ["9", 0], "vae": ["2", 1]}},
        "11": {"class_type": "SaveImage", "inputs": {"images": ["10", 0], "filename_prefix": "di_chain"}},
    }


def test_nodes_are_registered_under_inversion(comfy_env):
    nodes, _ = comfy_env
    for node_id, display in (("DirectInversion_Invert", "Invert (DDIM/NT/NP/EDICT)"),
                             ("DirectInversion_Sampler", "Direct Inversion Sampler")):
        node = nodes.NODE_CLASS_MAPPINGS[node_id]
        assert node.CATEGORY == "inversion"
        assert nodes.NODE_DISPLAY_NAME_MAPPINGS[node_id] == display


def test_edit_graph_runs_in_the_executor(comfy_env, every_progress_tick):
    import comfy.utils

    _, output_dir = comfy_env
    pngs = lambda: {p.name for p in output_dir.iterdir() if p.suffix == ".png"}  # noqa: E731
    before = pngs()
    ticks = []
    comfy.utils.set_progress_bar_global_hook(
        lambda value, total, preview, node_id=None: ticks.append((executing_node(node_id), value, total)))
    try:
        executor, server, validation = run_prompt(edit_graph())
    finally:
        comfy.utils.set_progress_bar_global_hook(None)
    assert validation[0], validation
    events = [event for event, _ in executor.status_messages]
    assert "execution_success" in events, executor.status_messages[-3:]

    encoded = output_of(executor, "3", 0)["samples"]
    edited, source = output_of(executor, "5", 0)["samples"], output_of(executor, "5", 1)["samples"]
    assert (source - encoded).abs().max().item() <= 1e-5  # Direct Inversion's guarantee, through the whole graph
    assert edited.shape == encoded.shape and not torch.allclose(edited, encoded, atol=1e-3)
    offsets = output_of(executor, "5", 2)
    assert offsets.offsets.shape == (10,) + tuple(encoded.shape) and offsets.mode == "source"
    # one image from each SaveImage of the graph (other tests write to the same folder)
    written = sorted(pngs() - before)
    assert len(written) == 2 and written[0].startswith("di_chain_") and written[1].startswith("di_edit_"), written
    # one progress tick per step, on both of our nodes
    assert [v for n, v, t in ticks if n == "4"] == list(range(1, 11))
    assert [v for n, v, t in ticks if n == "5"] == list(range(1, 11))

    # SamplerCustom from z_T along Invert's sigmas is the DDIM reconstruction (offsets off, cfg 1)
    chained = output_of(executor, "9", 0)["samples"]
    baseline, _, _ = run_prompt({**edit_graph(offsets="off", cfg=1.0),
                                 "5": {**edit_graph()["5"], "inputs": {**edit_graph()["5"]["inputs"], "target": ["2",
                                                                                                                 2],
                                                                       "cfg": 1.0, "offsets": "off"}}})
    reference = output_of(baseline, "5", 1)["samples"]
    sigma_min = float(output_of(executor, "4", 2)[-1])
    assert torch.allclose(chained / (1 + sigma_min ** 2) ** 0.5, reference, atol=1e-4)


def test_interrupt_stops_between_steps(comfy_env, every_progress_tick):
    import comfy.model_management
    import comfy.utils

    steps_seen = []

    def hook(value, total, preview, node_id=None):
        if executing_node(node_id) == "5":
            steps_seen.append(value)
            if value == 3:
                comfy.model_management.interrupt_current_processing(True)

    comfy.utils.set_progress_bar_global_hook(hook)
    try:
        executor, _, _ = run_prompt(edit_graph(steps=8))
    finally:
        comfy.utils.set_progress_bar_global_hook(None)
        comfy.model_management.interrupt_current_processing(False)
    events = [event for event, _ in executor.status_messages]
    assert "execution_interrupted" in events
    assert steps_seen == [1, 2, 3]


def test_bad_inputs_get_clear_errors(comfy_env):
    graph = edit_graph()
    graph["4"]["inputs"]["steps"] = 0
    _, _, validation = run_prompt(graph)
    assert not validation[0]
    assert "steps" in str(validation[3]["4"]["errors"]) and "Value 0 smaller than min of 1" in str(validation[3]["4"])

    graph = edit_graph()
    graph["12"] = {"class_type": "DITest_NaNLatent", "inputs": {}}
    graph["4"]["inputs"]["latent"] = ["12", 0]
    executor, _, validation = run_prompt(graph)
    errors = [data for event, data in executor.status_messages if event == "execution_error"]
    assert errors and errors[0]["node_id"] == "4"
    assert "latent to invert contains 1 NaN" in errors[0]["exception_message"]


def test_pack_loads_in_quick_ci_run(comfyui_path, tmp_path):
    """`python main.py --cpu --quick-test-for-ci` with the pack in custom_nodes: no import failure."""
    base = tmp_path / "base"
    (base / "custom_nodes").mkdir(parents=True)
    os.symlink(T.ROOT, base / "custom_nodes" / "ComfyUI-DirectInversion")
    run = subprocess.run([sys.executable, "main.py", "--cpu", "--quick-test-for-ci", "--base-directory", str(base)],
                         cwd=comfyui_path, capture_output=True, text=True, timeout=600)
    log = run.stdout + run.stderr
    assert run.returncode == 0, log[-3000:]
    lines = [line for line in log.splitlines() if "ComfyUI-DirectInversion" in line and "seconds" in line]
    assert lines and "IMPORT FAILED" not in lines[0], log[-3000:]


METHOD_OPTIONS = {
    "null_text": ("DirectInversion_NullTextOptions", {"guidance": 7.5, "inner_steps": 3, "early_stop": 1e-5,
                                                      "lr": 1e-2}),
    "negative_prompt": ("DirectInversion_NegativePromptOptions", {"interpolation": 0.0, "proximal": "l0",
                                                                  "quantile": 0.75}),
    "edict": ("DirectInversion_EdictOptions", {"mix": 0.93, "strength": 0.8, "guidance": 3.0, "leapfrog": True}),
}


@pytest.mark.parametrize("method", ["ddim", "null_text", "negative_prompt", "edict"])
def test_every_method_saves_loads_and_edits_in_the_executor(comfy_env, method):
    _, output_dir = comfy_env
    graph = edit_graph(steps=10)
    graph["4"]["inputs"]["method"] = method
    if method in METHOD_OPTIONS:
        node, values = METHOD_OPTIONS[method]
        graph["12"] = {"class_type": node, "inputs": values}
        graph["4"]["inputs"]["options"] = ["12", 0]
    graph["13"] = {"class_type": "DirectInversion_SaveInversion",
                   "inputs": {"inversion": ["4", 0], "filename_prefix": f"test_{method}"}}
    executor, encoded, edited, source = run_edit(graph)
    assert torch.isfinite(edited).all() and edited.shape == encoded.shape
    assert (source - encoded).abs().max().item() <= 1e-4  # exact up to the VAE latent scale (x 1/0.18215)
    saved = sorted((output_dir / "inversions").glob(f"test_{method}_*.safetensors"))
    assert len(saved) == 1

    # a later run loads the saved inversion instead of inverting again, and edits identically
    graph = edit_graph(steps=10)
    graph["4"] = {"class_type": "DirectInversion_LoadInversion",
                  "inputs": {"model": ["2", 0], "inversion_file": saved[0].name, "latent": ["3", 0]}}
    graph.pop("9"), graph.pop("10"), graph.pop("11"), graph.pop("8")
    again, _, validation = run_prompt(graph)
    assert validation[0], validation
    assert "execution_success" in [e for e, _ in again.status_messages], again.status_messages[-2:]
    assert torch.equal(output_of(again, "5", 0)["samples"], edited)


def test_options_of_another_method_are_refused(comfy_env):
    graph = edit_graph(steps=4)
    graph["12"] = {"class_type": "DirectInversion_EdictOptions", "inputs": METHOD_OPTIONS["edict"][1]}
    graph["4"]["inputs"]["options"] = ["12", 0]
    executor, _, _ = run_prompt(graph)
    errors = [data for event, data in executor.status_messages if event == "execution_error"]
    assert errors and "options are for edict but the method is ddim" in errors[0]["exception_message"]


def editor_graph(method: str, editor_node: str, editor_inputs: dict, steps: int = 10) -> dict:
    """The edit graph with a CLIP -> editor node (21) giving Invert its source and the sampler its target and editor,
    an empty-prompt negative (22) and the method's options node (12)."""
    graph = edit_graph(steps=steps)
    for node in ("8", "9", "10", "11"):
        graph.pop(node)
    graph["20"] = {"class_type": "DITest_TinyClip", "inputs": {}}
    graph["21"] = {"class_type": editor_node, "inputs": {"clip": ["20", 0], **editor_inputs}}
    graph["22"] = {"class_type": "CLIPTextEncode", "inputs": {"clip": ["20", 0], "text": ""}}
    graph["4"]["inputs"].update(source=["21", 1], negative=["22", 0], method=method)
    graph["5"]["inputs"].update(target=["21", 2], negative=["22", 0], editor=["21", 0])
    if method in METHOD_OPTIONS:
        node, values = METHOD_OPTIONS[method]
        graph["12"] = {"class_type": node, "inputs": values}
        graph["4"]["inputs"]["options"] = ["12", 0]
    return graph


P2P_INPUTS = {"source_prompt": "a cat sitting on a bench", "target_prompt": "a fluffy dog sitting on a bench",
              "mode": "auto", "cross_replace_steps": 0.4, "self_replace_steps": 0.6, "reweight_words": "fluffy",
              "reweight_values": "1.5", "blend_source_words": "cat", "blend_target_words": "fluffy dog",
              "blend_threshold": 0.3, "blend_start": 0.2}


@pytest.mark.parametrize("method", ["ddim", "null_text", "negative_prompt", "edict"])
def test_every_method_with_the_p2p_editor_in_the_executor(comfy_env, method):
    """CLIP -> P2P Editor -> (source) Invert, (target, editor) Direct Inversion Sampler -> VAE Decode, plus the
    attention-map image, as a user wires it."""
    _, output_dir = comfy_env
    graph = editor_graph(method, "DirectInversion_P2PEditor", P2P_INPUTS)
    graph["23"] = {"class_type": "SaveImage", "inputs": {"images": ["5", 3], "filename_prefix": f"maps_{method}"}}
    executor, encoded, edited, source = run_edit(graph)
    assert torch.isfinite(edited).all() and edited.shape == encoded.shape
    assert (source - encoded).abs().max().item() <= 1e-4
    assert (edited - source).abs().max().item() > 1e-3
    maps = output_of(executor, "5", 3)
    words = len(P2P_INPUTS["target_prompt"].split())
    assert maps.shape[0] == 1 and maps.shape[2] == words * 128 and maps.max() == 1.0
    assert len(list(output_dir.glob(f"maps_{method}_*.png"))) == 1


MASACTRL_INPUTS = {"source_prompt": "", "target_prompt": "a photo of a cat jumping", "start_step": 2,
                   "start_layer": -1, "mask_source_word": "", "mask_target_word": "", "mask_threshold": 0.1}


@pytest.mark.parametrize("method", ["ddim", "null_text", "negative_prompt", "edict"])
def test_every_method_with_the_masactrl_editor_in_the_executor(comfy_env, method):
    """CLIP -> MasaCtrl Editor (empty source prompt, as the PnP Inversion runs) -> Invert / Direct Inversion Sampler."""
    graph = editor_graph(method, "DirectInversion_MasaCtrlEditor", MASACTRL_INPUTS)
    _, encoded, edited, source = run_edit(graph)
    assert torch.isfinite(edited).all() and (source - encoded).abs().max().item() <= 1e-4
    assert (edited - source).abs().max().item() > 1e-3


def test_masactrl_editor_node_errors(comfy_env):
    graph = edit_graph(steps=4)
    graph["20"] = {"class_type": "DITest_TinyClip", "inputs": {}}
    graph["21"] = {"class_type": "DirectInversion_MasaCtrlEditor",
                   "inputs": {"clip": ["20", 0], **MASACTRL_INPUTS, "source_prompt": "a cat sitting",
                              "mask_source_word": "cat", "mask_target_word": "dog"}}
    graph["5"]["inputs"].update(target=["21", 2], editor=["21", 0])
    executor, _, _ = run_prompt(graph)
    errors = [data for event, data in executor.status_messages if event == "execution_error"]
    assert errors and "'dog' is not a word of the prompt 'a photo of a cat jumping'" in errors[0]["exception_message"]


# the tiny SD1.5 model's decoder has blocks 0-3, self-attention in 2-3; block 3 is the reference's feature position
PNP_INPUTS = {"source_prompt": "a photo of a horse", "target_prompt": "a sketch of a horse", "feature_injection": 0.8,
              "attention_injection": 0.5, "feature_block": 3, "attention_from_block": 3}


@pytest.mark.parametrize("method", ["ddim", "null_text", "negative_prompt", "edict"])
def test_every_method_with_the_pnp_editor_in_the_executor(comfy_env, method):
    """CLIP -> PnP Editor (its own empty-prompt source) -> Invert / Direct Inversion Sampler."""
    graph = editor_graph(method, "DirectInversion_PnPEditor", PNP_INPUTS)
    _, encoded, edited, source = run_edit(graph)
    assert torch.isfinite(edited).all() and (source - encoded).abs().max().item() <= 1e-4
    assert (edited - source).abs().max().item() > 1e-3


def test_pnp_editor_node_errors(comfy_env):
    graph = editor_graph("ddim", "DirectInversion_PnPEditor", {**PNP_INPUTS, "feature_block": 4,
                                                               "attention_from_block": 4}, steps=4)
    executor, _, _ = run_prompt(graph)
    errors = [data for event, data in executor.status_messages if event == "execution_error"]
    assert errors and ("PnP's attention_from_block is 4 but this UNet's last decoder block with self-attention is 3"
                       in errors[0]["exception_message"])


P2P_ZERO_INPUTS = {"source_prompt": "a cat sitting on a bench", "target_prompt": "a dog sitting on a bench",
                   "xa_guidance": 0.03, "source_sentences": "a cat\na photo of a cat, sitting",
                   "target_sentences": "a dog\na photo of a dog, sitting"}


@pytest.mark.parametrize("method", ["ddim", "null_text", "negative_prompt", "edict"])
def test_every_method_with_the_p2p_zero_editor_in_the_executor(comfy_env, method):
    """CLIP -> P2P-Zero Editor -> Invert / Direct Inversion Sampler (offsets auto: both), with the reference's negative
    prompt (the source caption) on the sampler: the gradient pass runs inside the executor's inference mode. EDICT
    keeps the inversion's negative: its source pair retraces the inversion only under the guidance it was made with."""
    graph = editor_graph(method, "DirectInversion_P2PZeroEditor", P2P_ZERO_INPUTS, steps=4)
    graph["5"]["inputs"]["offsets"] = "auto"
    if method != "edict":
        graph["5"]["inputs"]["negative"] = ["21", 1]
    executor, encoded, edited, source = run_edit(graph)
    assert torch.isfinite(edited).all() and (source - encoded).abs().max().item() <= 1e-4
    assert (edited - source).abs().max().item() > 1e-3
    assert output_of(executor, "5", 2).mode == ("off" if method == "edict" else "both")


def test_p2p_zero_with_a_controlnet_on_the_target(comfy_env):
    """A ControlNet sees the latent the guidance differentiates: its weights (loaded in inference mode) take part in
    the backward pass too."""
    graph = editor_graph("ddim", "DirectInversion_P2PZeroEditor", P2P_ZERO_INPUTS, steps=4)
    graph["30"] = {"class_type": "DITest_TinyControlNet", "inputs": {}}
    graph["31"] = {"class_type": "ControlNetApplyAdvanced",
                   "inputs": {"positive": ["21", 2], "negative": ["21", 1], "control_net": ["30", 0],
                              "image": ["1", 0], "strength": 0.8, "start_percent": 0.0, "end_percent": 1.0}}
    graph["5"]["inputs"].update(offsets="auto", target=["31", 0], negative=["31", 1])
    _, encoded, edited, source = run_edit(graph)
    assert torch.isfinite(edited).all() and (source - encoded).abs().max().item() <= 1e-4
    assert (edited - source).abs().max().item() > 1e-3


def test_p2p_zero_editor_node_builds_the_direction(comfy_env):
    """target = source + mean(target sentences) - mean(source sentences), one sentence per line (commas kept)."""
    nodes, _ = comfy_env
    node = nodes.NODE_CLASS_MAPPINGS["DirectInversion_P2PZeroEditor"]
    clip = T.tiny_comfy_clip()
    encode = lambda text: clip.encode_from_tokens_scheduled(clip.tokenize(text))[0][0]  # noqa: E731
    with torch.inference_mode():
        out = node.execute(clip, **P2P_ZERO_INPUTS)
        editor, source, target = out.result if hasattr(out, "result") else out
        expected = (encode(P2P_ZERO_INPUTS["source_prompt"]) + (encode("a dog") + encode("a photo of a dog, sitting")) / 2
                    - (encode("a cat") + encode("a photo of a cat, sitting")) / 2)
        torch.testing.assert_close(target[0][0], expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(source[0][0], encode(P2P_ZERO_INPUTS["source_prompt"]))
        assert editor.xa_guidance == 0.03 and editor.default_offsets == "both"
        # no sentences: the prompts themselves, so the target conditioning is the target prompt's embedding
        out = node.execute(clip, **{**P2P_ZERO_INPUTS, "source_sentences": " \n", "target_sentences": ""})
        _, _, target = out.result if hasattr(out, "result") else out
        torch.testing.assert_close(target[0][0], encode(P2P_ZERO_INPUTS["target_prompt"]), rtol=1e-5, atol=1e-5)


EDITOR_NODES = {"p2p": ("DirectInversion_P2PEditor", P2P_INPUTS),
                "masactrl": ("DirectInversion_MasaCtrlEditor", MASACTRL_INPUTS),
                # the tiny SDXL model has self-attention in decoder blocks 0-1 only (as SDXL: none at full resolution)
                "pnp": ("DirectInversion_PnPEditor", {**PNP_INPUTS, "attention_from_block": 1}),
                "p2p_zero": ("DirectInversion_P2PZeroEditor", P2P_ZERO_INPUTS)}


@pytest.mark.parametrize("editor", ["p2p", "masactrl", "pnp", "p2p_zero"])
def test_editors_on_an_sdxl_family_model_in_the_executor(comfy_env, editor):
    """SDXL: both tokenizers align the P2P prompts; the editors find their layers by place and resolution."""
    graph = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "di_test.png"}},
        "2": {"class_type": "DITest_TinySDXL", "inputs": {}},
        "3": {"class_type": "VAEEncode", "inputs": {"pixels": ["1", 0], "vae": ["2", 1]}},
        "21": {"class_type": EDITOR_NODES[editor][0], "inputs": {"clip": ["2", 2], **EDITOR_NODES[editor][1]}},
        "22": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["2", 2], "text": ""}},
        "4": {"class_type": "DirectInversion_Invert",
              "inputs": {"model": ["2", 0], "latent": ["3", 0], "source": ["21", 1], "negative": ["22", 0],
                         "method": "ddim", "steps": 10, "cfg": 1.0}},
        "5": {"class_type": "DirectInversion_Sampler",
              "inputs": {"model": ["2", 0], "inversion": ["4", 0], "target": ["21", 2], "negative": ["22", 0],
                         "cfg": 7.5, "offsets": "source", "editor": ["21", 0]}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["2", 1]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": f"sdxl_{editor}"}},
    }
    _, encoded, edited, source = run_edit(graph)
    assert torch.isfinite(edited).all() and (source - encoded).abs().max().item() <= 1e-4 * encoded.abs().max().item()
    assert (edited - source).abs().max().item() > 1e-3


def test_nodes_send_per_step_charts_and_the_attention_maps(comfy_env):
    """What the web extension draws: Invert's chart (step size, null-text losses), the sampler's (source error,
    offsets where computed) and the P2P attention-map preview."""
    graph = editor_graph("null_text", "DirectInversion_P2PEditor", P2P_INPUTS, steps=4)
    executor, _, _, _ = run_edit(graph)
    invert = executor.history_result["outputs"]["4"]["direct_inversion_chart"][0]
    assert set(invert["series"]) == {"step size", "NT loss (first)", "NT loss (last)"}
    assert len(invert["series"]["step size"]) == 4 and invert["steps"] == 4
    last, first = invert["series"]["NT loss (last)"], invert["series"]["NT loss (first)"]
    assert all(b <= a for a, b in zip(first[:-1], last[:-1]) if a is not None and b is not None)
    sampler = executor.history_result["outputs"]["5"]
    chart = sampler["direct_inversion_chart"][0]
    assert list(chart["series"]) == ["source error"]  # P2P pins the source: no offsets computed
    assert max(chart["series"]["source error"]) == 0.0  # and the source stays on the trajectory
    assert len(sampler["images"]) == 1 and sampler["images"][0]["type"] == "temp"
    plain = edit_graph(steps=4, offsets="off")
    executor, _, _, _ = run_edit(plain)
    chart = executor.history_result["outputs"]["5"]["direct_inversion_chart"][0]
    assert set(chart["series"]) == {"source error", "offset"} and max(chart["series"]["source error"]) > 0
