"""The sample workflows: well-formed against real ComfyUI's node definitions, converted to the API format and run end
to end by ComfyUI's executor with tiny stand-ins for the checkpoints; the headless runner; ComfyUI's templates."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import di_testing as T

WORKFLOWS = sorted((T.ROOT / "workflows").glob("*.json"))
NAMES = [p.stem for p in WORKFLOWS]
# combos whose options are the user's files: the value must only be a file name of the right kind
FILE_COMBOS = {"ckpt_name": (".safetensors", ".ckpt"), "lora_name": (".safetensors",),
               "control_net_name": (".safetensors", ".pth"), "image": (".png", ".jpg"),
               "inversion_file": (".safetensors",)}
VIRTUAL = {"Note", "MarkdownNote"}
EDIT_STEPS = 4


@pytest.fixture(scope="module")
def tools(pack):
    from comfyui_direct_inversion.headless import comfyui_env, run, ui_to_api

    return comfyui_env, ui_to_api, run


@pytest.fixture(scope="module")
def info(comfy_env, tools):
    return tools[0].object_info(comfy_env[0])


def test_the_expected_workflows_are_there():
    assert set(NAMES) >= {"reconstruction_check", "p2p_word_swap", "p2p_refine", "p2p_reweight", "p2p_local_blend",
                          "masactrl_pose", "pnp_photo_to_sketch", "null_text_p2p", "negative_prompt_p2p",
                          "edict_edit", "sdxl_edit", "lora_controlnet_edit", "save_inversion",
                          "load_inversion_many_targets", "p2p_zero_cat_to_dog", "sd35_reconstruction_check",
                          "sd35_free_edit", "flux_reconstruction_check", "flux_free_edit", "sd35_flowedit",
                          "flux_flowedit", "sd35_p2p", "sd35_masactrl", "sd35_pnp", "flux_p2p", "flux_masactrl",
                          "flux_pnp"}


def _widgets_fit(node: dict, definition: dict, ui_to_api) -> list[str]:
    problems = []
    widgets = ui_to_api.widget_inputs(definition)
    values = node.get("widgets_values", [])
    expected = len(widgets) + sum(ui_to_api.has_control_widget(n, s) for n, s in widgets) + sum(
        bool((s[1] if len(s) > 1 else {}).get("image_upload")) for _, s in widgets)
    if len(values) != expected:
        problems.append(f"{len(values)} widget values for {expected} widgets")
    for name, value in ui_to_api._widget_values(node, definition).items():
        spec = dict(widgets)[name]
        kind, options = spec[0], (spec[1] if len(spec) > 1 else {})
        choices = kind if isinstance(kind, list) else options.get("options") if kind == "COMBO" else None
        if name in FILE_COMBOS:
            if not (isinstance(value, str) and value.endswith(FILE_COMBOS[name])):
                problems.append(f"{name}={value!r} is not a {'/'.join(FILE_COMBOS[name])} file name")
        elif choices is not None:
            if value not in choices:
                problems.append(f"{name}={value!r} not in {choices}")
        elif kind == "INT" or kind == "FLOAT":
            if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind == "INT" and value != int(value)):
                problems.append(f"{name}={value!r} is not {kind}")
            elif not options.get("min", -np.inf) <= value <= options.get("max", np.inf):
                problems.append(f"{name}={value} outside [{options.get('min')}, {options.get('max')}]")
        elif kind == "BOOLEAN" and not isinstance(value, bool):
            problems.append(f"{name}={value!r} is not a boolean")
        elif kind == "STRING" and not isinstance(value, str):
            problems.append(f"{name}={value!r} is not a string")
    return problems


@pytest.mark.parametrize("path", WORKFLOWS, ids=NAMES)
def test_workflow_is_well_formed(path, info, tools):
    """Parses; every node type exists; every link joins an output and an input of its declared type; widget values
    fit the node's inputs (count, type, range, combo options); a Note says what the edit does."""
    ui_to_api = tools[1]
    workflow = json.loads(path.read_text())
    nodes = {n["id"]: n for n in workflow["nodes"]}
    problems = []
    for node in workflow["nodes"]:
        if node["type"] in VIRTUAL:
            continue
        if node["type"] not in info:
            problems.append(f"#{node['id']}: unknown node type {node['type']}")
            continue
        definition = info[node["type"]]
        declared = {n: s for section in definition["input"].values() for n, s in (section or {}).items()}
        for entry in node.get("inputs", []):
            if entry["name"] not in declared:
                problems.append(f"#{node['id']} {node['type']}: no input {entry['name']!r}")
        problems += [f"#{node['id']} {node['type']}: {p}" for p in _widgets_fit(node, definition, ui_to_api)]
    for link_id, origin, slot, target, target_slot, kind in workflow["links"]:
        out_type = info[nodes[origin]["type"]]["output"][slot]
        socket = nodes[target]["inputs"][target_slot]
        in_type = info[nodes[target]["type"]]
        declared = {n: s for section in in_type["input"].values() for n, s in (section or {}).items()}[socket["name"]][0]
        if socket.get("link") != link_id or link_id not in nodes[origin]["outputs"][slot]["links"]:
            problems.append(f"link {link_id} is not recorded on both ends")
        if not (out_type == kind == declared == socket["type"]):
            problems.append(f"link {link_id}: {out_type} -> {declared} (recorded {kind})")
    assert not problems, problems
    notes = [n for n in workflow["nodes"] if n["type"] == "Note"]
    assert notes and len(notes[0]["widgets_values"][0]) > 80
    prompt = ui_to_api.convert(workflow, info)
    assert {n["class_type"] for n in prompt.values()} == {n["type"] for n in workflow["nodes"]} - VIRTUAL


def standing_in(prompt: dict, lora_name: str) -> dict:
    """The prompt with tiny stand-ins for checkpoints and ControlNets, the tiny LoRA, the test image at 128x128 and
    few steps."""
    prompt = json.loads(json.dumps(prompt))
    for node in prompt.values():
        inputs = node["inputs"]
        if node["class_type"] == "CheckpointLoaderSimple":
            node.update(class_type=_stand_in_checkpoint(inputs["ckpt_name"]), inputs={})
        elif node["class_type"] == "ControlNetLoader":
            node.update(class_type="DITest_TinyControlNet", inputs={})
        elif node["class_type"] == "LoraLoader":
            inputs["lora_name"] = lora_name
        elif node["class_type"] == "LoadImage":
            inputs["image"] = "di_test.png"
        elif node["class_type"] == "ImageScale":
            inputs.update(width=128, height=128)
        elif node["class_type"] == "DirectInversion_Invert":
            inputs["steps"] = EDIT_STEPS
        elif node["class_type"] == "DirectInversion_FlowEdit":
            inputs.update(steps=EDIT_STEPS, n_max=EDIT_STEPS - 1)
        elif node["class_type"] == "DirectInversion_MasaCtrlEditor":
            inputs["start_step"] = min(inputs["start_step"], 1)
        elif node["class_type"] == "DirectInversion_PnPEditor":  # the tiny UNets' positions of the defaults; windows
            for name in ("feature_injection", "attention_injection"):  # of at least a step of the few
                inputs[name] = max(inputs[name], 0.5)
            inputs.update(feature_block=3, attention_from_block=1 if _is_sdxl(prompt) else 3)
    return prompt


def _stand_in_checkpoint(name: str) -> str:
    """The tiny stand-in of a checkpoint of the family its file name tells."""
    for key, stand_in in (("sd3", "DITest_TinySD3Checkpoint"), ("flux", "DITest_TinyFluxCheckpoint"),
                          ("xl", "DITest_TinySDXLCheckpoint")):
        if key in name:
            return stand_in
    return "DITest_TinyCheckpoint"


def _is_sdxl(prompt: dict) -> bool:
    return any("xl" in n["inputs"].get("ckpt_name", "") for n in prompt.values())


@pytest.fixture(scope="module")
def lora(comfy_env, tmp_path_factory):
    import folder_paths

    folder = tmp_path_factory.mktemp("loras")
    from comfy_testing import write_tiny_lora

    assert write_tiny_lora(folder / "tiny_lora.safetensors") > 0
    folder_paths.add_model_folder_path("loras", str(folder))
    return "tiny_lora.safetensors"


def execute(prompt: dict):
    from test_comfyui_executor import run_prompt

    executor, _, validation = run_prompt(prompt)
    assert validation[0], validation
    errors = [d for e, d in executor.status_messages if e == "execution_error"]
    assert executor.success, errors[:1]
    return executor


def saved_images(executor) -> list[dict]:
    """Images written to the output folder (not the previews nodes show, e.g. the sampler's attention maps)."""
    return [item for result in executor.history_result["outputs"].values() for item in result.get("images", [])
            if item["type"] == "output"]


@pytest.mark.parametrize("name", [n for n in NAMES if n != "load_inversion_many_targets"])
def test_workflow_runs_in_comfyui(name, comfy_env, info, tools, lora):
    _, output_dir = comfy_env
    workflow = json.loads((T.ROOT / "workflows" / f"{name}.json").read_text())
    prompt = standing_in(tools[1].convert(workflow, info), lora)
    executor = execute(prompt)
    outputs = saved_images(executor)
    savers = [n for n in prompt.values() if n["class_type"] == "SaveImage"]
    assert len(outputs) == len(savers)
    for item in outputs:
        image = np.asarray(Image.open(output_dir / item["subfolder"] / item["filename"]))
        assert image.ndim == 3 and image.shape[0] >= 128 and image.std() > 0
    if name == "save_inversion":
        texts = [r["text"][0] for r in executor.history_result["outputs"].values() if "text" in r]
        assert len(texts) == 1 and texts[0].endswith(".safetensors")


def test_load_inversion_workflow_edits_a_saved_inversion(comfy_env, info, tools, lora):
    """save_inversion, then load_inversion_many_targets on its file: three edits of one inversion."""
    load = lambda name: json.loads((T.ROOT / "workflows" / f"{name}.json").read_text())  # noqa: E731
    saved = execute(standing_in(tools[1].convert(load("save_inversion"), info), lora))
    file_name = [r["text"][0] for r in saved.history_result["outputs"].values() if "text" in r][0]
    prompt = standing_in(tools[1].convert(load("load_inversion_many_targets"), info), lora)
    for node in prompt.values():
        if node["class_type"] == "DirectInversion_LoadInversion":
            node["inputs"]["inversion_file"] = file_name
    outputs = saved_images(execute(prompt))
    assert len(outputs) == 3


# -- conversion details ----------------------------------------------------------------------------------------------


def test_conversion_follows_the_frontend_rules(info, tools):
    """Reroutes, primitive nodes, muted and bypassed nodes, seeds' control values and converted widgets."""
    ui_to_api = tools[1]
    workflow = {
        "nodes": [
            {"id": 1, "type": "CheckpointLoaderSimple", "mode": 0, "inputs": [], "widgets_values": ["m.safetensors"],
             "outputs": [{"name": "MODEL", "type": "MODEL", "links": [1]}]},
            {"id": 2, "type": "Reroute", "mode": 0, "inputs": [{"name": "", "type": "*", "link": 1}],
             "outputs": [{"name": "", "type": "MODEL", "links": [2]}]},
            {"id": 3, "type": "KSampler", "mode": 0,
             "inputs": [{"name": "model", "type": "MODEL", "link": 2},
                        {"name": "positive", "type": "CONDITIONING", "link": None},
                        {"name": "steps", "type": "INT", "link": 3, "widget": {"name": "steps"}},
                        {"name": "latent_image", "type": "LATENT", "link": 4}],
             "widgets_values": [7, "randomize", 20, 6.5, "euler", "karras", 0.9]},
            {"id": 4, "type": "PrimitiveNode", "mode": 0, "outputs": [{"type": "INT", "links": [3]}],
             "widgets_values": [12, "fixed"]},
            {"id": 5, "type": "EmptyLatentImage", "mode": 4, "inputs": [], "widgets_values": [64, 64, 1],
             "outputs": [{"name": "LATENT", "type": "LATENT", "links": [4]}]},
            {"id": 6, "type": "Note", "mode": 0, "widgets_values": ["hello"]},
            {"id": 7, "type": "VAEDecode", "mode": 2, "inputs": [], "widgets_values": []},
        ],
        "links": [[1, 1, 0, 2, 0, "MODEL"], [2, 2, 0, 3, 0, "MODEL"], [3, 4, 0, 3, 2, "INT"],
                  [4, 5, 0, 3, 3, "LATENT"]],
    }
    prompt = ui_to_api.convert(workflow, info)
    assert set(prompt) == {"1", "3"}
    assert prompt["1"]["inputs"] == {"ckpt_name": "m.safetensors"}
    assert prompt["3"]["inputs"] == {"model": ["1", 0], "seed": 7, "steps": 12, "cfg": 6.5, "sampler_name": "euler",
                                     "scheduler": "karras", "denoise": 0.9}  # bypassed latent: no input passes
    assert ui_to_api.convert(prompt, info) == prompt  # the API format passes through
    with pytest.raises(ui_to_api.WorkflowError, match="'NoSuchNode', which this ComfyUI does not know"):
        ui_to_api.convert({"nodes": [{"id": 1, "type": "NoSuchNode"}], "links": []}, info)
    with pytest.raises(ui_to_api.WorkflowError, match="subgraphs"):
        ui_to_api.convert({"nodes": [], "links": [], "definitions": {"subgraphs": [{}]}}, info)


# -- the headless runner ---------------------------------------------------------------------------------------------


def _stand_in_file(path: Path, tmp_path: Path) -> Path:
    """A copy of a shipped workflow whose checkpoint loader is the tiny stand-in and whose Invert runs 4 steps."""
    workflow = json.loads(path.read_text())
    for node in workflow["nodes"]:
        if node["type"] == "CheckpointLoaderSimple":
            node["type"], node["widgets_values"] = "DITest_TinyCheckpoint", []
        if node["type"] == "DirectInversion_Invert":
            node["widgets_values"][1] = EDIT_STEPS  # [method, steps, cfg]
    out = tmp_path / path.name
    out.write_text(json.dumps(workflow))
    return out


def _images(folder: Path, count: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    paths = []
    for i in range(count):
        paths.append(folder / f"photo_{i}.png")
        Image.fromarray(rng.integers(0, 255, (96, 80, 3), dtype=np.uint8)).save(paths[-1])
    return paths


def test_runner_on_one_image_and_a_folder(comfy_env, comfyui_path, tools, tmp_path, capsys):
    main = lambda argv: tools[2].main(["--comfyui", str(comfyui_path), *argv])  # noqa: E731
    _, output_dir = comfy_env
    workflow = _stand_in_file(T.ROOT / "workflows" / "p2p_word_swap.json", tmp_path)
    photos = _images(tmp_path / "photos", 2)
    sets = ["--set", "Resize.width=128", "--set", "Resize.height=128"]
    assert main([str(workflow), "--image", str(photos[0]), "--target-prompt", "a dog sitting on a bench", *sets]) == 0
    printed = capsys.readouterr().out.split()
    assert len(printed) == 2 and all(Path(p).is_file() and Path(p).is_relative_to(output_dir) for p in printed)
    assert main([str(workflow), "--image", str(tmp_path / "photos"), "--source-prompt", "a cat sitting on a bench",
                     *sets]) == 0
    printed = capsys.readouterr().out.split()
    assert len(printed) == 4 and len(set(printed)) == 4  # two outputs per image


def test_runner_errors(comfy_env, comfyui_path, tools, tmp_path, capsys):
    main = lambda argv: tools[2].main(["--comfyui", str(comfyui_path), *argv])  # noqa: E731
    workflow = str(T.ROOT / "workflows" / "p2p_word_swap.json")
    assert main([workflow, "--set", "99.steps=3"]) == 2
    assert "Unknown override --set 99.steps=3: no node with id or title '99'" in capsys.readouterr().err
    assert main([workflow, "--set", "Resize.colour=3"]) == 2
    assert "ImageScale (node 3) has no input 'colour'" in capsys.readouterr().err
    assert main([workflow, "--seed", "3"]) == 2
    assert "no seed or noise_seed input" in capsys.readouterr().err
    import folder_paths

    assert main([workflow, "--checkpoint", "missing_model.safetensors"]) == 2
    err = capsys.readouterr().err
    assert "checkpoint 'missing_model.safetensors' (node 1, CheckpointLoaderSimple) not found" in err
    assert folder_paths.get_folder_paths("checkpoints")[0] in err
    assert main([workflow, "--image", str(tmp_path / "nothing.png")]) == 2
    assert "Image not found" in capsys.readouterr().err


def test_runner_command_line(tmp_path):
    """The command itself: a missing workflow file is reported before ComfyUI is even imported."""
    script = T.ROOT / "headless" / "run.py"
    result = subprocess.run([sys.executable, str(script), str(tmp_path / "missing.json")], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2 and "Workflow file not found" in result.stderr
    help_text = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=120)
    assert help_text.returncode == 0 and "--target-prompt" in help_text.stdout


# -- ComfyUI's templates browser -------------------------------------------------------------------------------------


def test_comfyui_serves_the_workflows_as_templates(comfy_env, tmp_path):
    """ComfyUI's custom-node manager lists ``workflows/`` for this pack and serves its files."""
    import asyncio

    import folder_paths
    from aiohttp import web
    from app.custom_node_manager import CustomNodeManager

    custom_nodes = tmp_path / "custom_nodes"
    custom_nodes.mkdir()
    (custom_nodes / "ComfyUI-DirectInversion").symlink_to(T.ROOT, target_is_directory=True)
    routes = web.RouteTableDef()
    app = web.Application()
    CustomNodeManager().add_routes(routes, app, [("ComfyUI-DirectInversion", str(T.ROOT))])
    statics = [r for r in app.router.resources() if r.canonical == "/api/workflow_templates/ComfyUI-DirectInversion"]
    assert statics and Path(statics[0].get_info()["directory"]) == T.ROOT / "workflows"
    handler = [r.handler for r in routes if getattr(r, "path", "") == "/workflow_templates"][0]
    saved = folder_paths.folder_names_and_paths["custom_nodes"]
    folder_paths.folder_names_and_paths["custom_nodes"] = ([str(custom_nodes)], set())
    try:
        response = asyncio.run(handler(None))
    finally:
        folder_paths.folder_names_and_paths["custom_nodes"] = saved
    listed = json.loads(response.body)
    assert sorted(listed["ComfyUI-DirectInversion"]) == NAMES
