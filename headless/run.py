"""Run a ComfyUI workflow file without the UI, on one image or a folder of images.

    python custom_nodes/ComfyUI-DirectInversion/headless/run.py WORKFLOW.json --image photo.png \\
        --target-prompt "a dog sitting on a bench" [--source-prompt ...] [--checkpoint NAME] [--seed N] \\
        [--set NODE.INPUT=VALUE ...] [--comfyui PATH] [--output-directory DIR] [--cpu]

The workflow (UI format as ComfyUI saves it, or API format) is converted to ComfyUI's API format, the overrides are
applied, and ComfyUI's own validation and executor run it in this process, once per image; the outputs land where
ComfyUI writes them (its output directory, or ``--output-directory``). ComfyUI is found through ``--comfyui``,
$COMFYUI_PATH, or the ComfyUI this pack is installed in.

Overrides: ``--image`` sets every Load Image node; ``--source-prompt`` / ``--target-prompt`` set the inputs named
``source_prompt`` / ``target_prompt`` (the editor nodes) and the text of nodes titled "Source prompt" / "Target
prompt"; ``--checkpoint`` sets every ``ckpt_name``; ``--seed`` every ``seed`` / ``noise_seed``; ``--set`` any input
of a node given by id or title (the value is read as JSON when it parses, else as text). An override that matches
nothing in the workflow is an error.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import uuid
from pathlib import Path
from typing import Optional

try:  # as part of the pack
    from .comfyui_env import find_comfyui, make_executor, object_info, start
    from .ui_to_api import WorkflowError, convert
except ImportError:  # as a script
    from comfyui_env import find_comfyui, make_executor, object_info, start
    from ui_to_api import WorkflowError, convert

__all__ = ["RunError", "apply_overrides", "main", "run_workflow"]

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"}
INPUT_SUBFOLDER = "headless"


class RunError(Exception):
    """A problem with the command line or the workflow, reported as one message (exit status 2)."""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="run.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("workflow", help="workflow .json (UI or API format)")
    p.add_argument("--image", help="an image file or a folder of images (each is run in turn)")
    p.add_argument("--source-prompt", help="what the image shows")
    p.add_argument("--target-prompt", help="what it should show")
    p.add_argument("--checkpoint", help="checkpoint file name (as in ComfyUI's models/checkpoints)")
    p.add_argument("--seed", type=int, help="seed of every seed / noise_seed input")
    p.add_argument("--set", action="append", default=[], metavar="NODE.INPUT=VALUE",
                   help="set any input; NODE is a node id or title (repeatable)")
    p.add_argument("--comfyui", help="ComfyUI folder (default: $COMFYUI_PATH, else the ComfyUI this pack sits in)")
    p.add_argument("--output-directory", help="where outputs go (default: ComfyUI's output directory)")
    p.add_argument("--cpu", action="store_true", help="run on the CPU")
    return p


def _images(path: str) -> list[Path]:
    source = Path(path)
    if source.is_dir():
        found = sorted(p for p in source.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not found:
            raise RunError(f"No images ({', '.join(sorted(IMAGE_SUFFIXES))}) in the folder {source}.")
        return found
    if not source.is_file():
        raise RunError(f"Image not found: {source}")
    return [source]


def _nodes_with(prompt: dict, name: str) -> list[str]:
    return [node_id for node_id, node in prompt.items() if name in node["inputs"]]


def _titled(prompt: dict, title: str) -> list[str]:
    return [node_id for node_id, node in prompt.items()
            if node.get("_meta", {}).get("title", "").strip().lower() == title.lower()]


def _set_all(prompt: dict, name: str, value, option: str, extra: Optional[list] = None) -> None:
    targets = _nodes_with(prompt, name)
    for node_id in targets:
        prompt[node_id]["inputs"][name] = value
    for node_id, input_name in extra or []:
        prompt[node_id]["inputs"][input_name] = value
    if not targets and not extra:
        raise RunError(f"Unknown override {option}: no node of this workflow has a {name!r} input.")


def _parse_set(item: str) -> tuple[str, str, object]:
    if "=" not in item or "." not in item.split("=", 1)[0]:
        raise RunError(f"--set takes NODE.INPUT=VALUE, got {item!r}")
    target, raw = item.split("=", 1)
    node, name = target.rsplit(".", 1)
    try:
        value = json.loads(raw)
    except ValueError:
        value = raw
    return node, name, value


def apply_overrides(prompt: dict, info: dict, source_prompt=None, target_prompt=None, checkpoint=None, seed=None,
                    sets=()) -> dict:
    """The API prompt with the command line's overrides applied (a new dict)."""
    prompt = json.loads(json.dumps(prompt))
    for option, value, name, title in (("--source-prompt", source_prompt, "source_prompt", "Source prompt"),
                                       ("--target-prompt", target_prompt, "target_prompt", "Target prompt")):
        if value is not None:
            _set_all(prompt, name, value, option, [(n, "text") for n in _titled(prompt, title)])
    if checkpoint is not None:
        _set_all(prompt, "ckpt_name", checkpoint, "--checkpoint")
    if seed is not None:
        nodes = [(n, k) for n, node in prompt.items() for k in ("seed", "noise_seed") if k in node["inputs"]]
        if not nodes:
            raise RunError("Unknown override --seed: this workflow has no seed or noise_seed input (the inversion "
                           "methods are deterministic).")
        for node_id, name in nodes:
            prompt[node_id]["inputs"][name] = seed
    for item in sets:
        node, name, value = _parse_set(item)
        matches = [node] if node in prompt else _titled(prompt, node)
        if not matches:
            raise RunError(f"Unknown override --set {item}: no node with id or title {node!r}.")
        for node_id in matches:
            definition = info[prompt[node_id]["class_type"]]["input"]
            known = {n for section in definition.values() for n in (section or {})}
            if name not in known:
                raise RunError(f"Unknown override --set {item}: {prompt[node_id]['class_type']} (node {node_id}) has "
                               f"no input {name!r}; its inputs are {', '.join(sorted(known))}.")
            prompt[node_id]["inputs"][name] = value
    return prompt


def _check_models(prompt: dict) -> None:
    """Model files named by the prompt must exist; the message names the folders ComfyUI looked in."""
    import folder_paths

    for node_id, node in prompt.items():
        for name, folder in (("ckpt_name", "checkpoints"), ("lora_name", "loras"), ("control_net_name", "controlnet"),
                             ("vae_name", "vae")):
            value = node["inputs"].get(name)
            if isinstance(value, str) and folder_paths.get_full_path(folder, value) is None:
                looked = folder_paths.get_folder_paths(folder)
                raise RunError(f"{folder[:-1] if folder.endswith('s') else folder} {value!r} (node {node_id}, "
                               f"{node['class_type']}) not found; ComfyUI looked in: {', '.join(looked)}. Put the file "
                               f"there or pass another name (--checkpoint / --set {node_id}.{name}=...).")


class _Server:
    """What ComfyUI's executor needs of its server: messages are kept (errors are printed from them)."""

    def __init__(self):
        self.client_id = None
        self.last_node_id = None
        self.last_prompt_id = None
        self.messages = []

    def send_sync(self, event, data, sid=None):
        self.messages.append((event, data))


def _progress(bar_factory):
    """A ComfyUI global progress hook that shows each node's steps on one progress bar."""
    state = {"bar": None, "node": None}

    def hook(value, total, preview=None, node_id=None, **_):
        from comfy_execution.utils import get_executing_context

        context = get_executing_context()
        node = context.node_id if context is not None else node_id
        if state["bar"] is None or state["node"] != node or state["bar"].total != total:
            if state["bar"] is not None:
                state["bar"].close()
            state["bar"] = bar_factory(total=total, desc=f"  node {node}", leave=False)
            state["node"] = node
        state["bar"].n = value
        state["bar"].refresh()

    def close():
        if state["bar"] is not None:
            state["bar"].close()
            state["bar"] = None

    return hook, close


def run_prompt(prompt: dict, bar_factory) -> list[str]:
    """Validate and execute an API prompt with ComfyUI's executor; returns the saved files (relative to the output
    directory). Raises RunError with ComfyUI's messages when validation or execution fails."""
    import asyncio

    import comfy.utils
    import execution

    prompt_id = str(uuid.uuid4())
    valid, error, outputs, node_errors = asyncio.run(execution.validate_prompt(prompt_id, prompt, None))
    if not valid:
        details = "; ".join(f"node {n} ({e.get('class_type')}): " + ", ".join(
            f"{x.get('message')} {x.get('details', '')}".strip() for x in e.get("errors", []))
                            for n, e in (node_errors or {}).items())
        raise RunError(f"ComfyUI rejected the workflow: {error.get('message')} {error.get('details', '')} {details}")
    server = _Server()
    executor = make_executor(server)
    hook, close = _progress(bar_factory)
    comfy.utils.set_progress_bar_global_hook(hook)
    try:
        executor.execute(prompt, prompt_id, {}, outputs)
    finally:
        close()
        comfy.utils.set_progress_bar_global_hook(None)
    if not executor.success:
        failure = [data for event, data in executor.status_messages if event in ("execution_error",
                                                                                 "execution_interrupted")]
        message = failure[0].get("exception_message", "interrupted") if failure else "unknown error"
        node = failure[0].get("node_id") if failure else "?"
        raise RunError(f"Node {node} failed: {message}")
    saved = []
    for result in (executor.history_result or {}).get("outputs", {}).values():
        for item in result.get("images", []):
            if item.get("type") == "output":
                saved.append(os.path.join(item.get("subfolder", ""), item["filename"]))
    return saved


def run_workflow(workflow_path: str, images: Optional[list] = None, bar_factory=None, **overrides) -> list[str]:
    """Run a workflow file (ComfyUI already started) over ``images`` (or as it is); returns the saved files."""
    import folder_paths

    if bar_factory is None:
        from tqdm import tqdm as bar_factory
    path = Path(workflow_path)
    try:
        workflow = json.loads(path.read_text())
    except ValueError as e:
        raise RunError(f"{path} is not JSON: {e}") from None
    info = object_info(sys.modules["nodes"])
    try:
        prompt = apply_overrides(convert(workflow, info), info, **overrides)
    except WorkflowError as e:
        raise RunError(f"{path}: {e}") from None
    loaders = [node_id for node_id, node in prompt.items() if node["class_type"] == "LoadImage"]
    if images and not loaders:
        raise RunError("Unknown override --image: this workflow has no Load Image node.")
    _check_models(prompt)
    saved = []
    runs = images or [None]
    for image in bar_factory(runs, desc="images", unit="image", disable=len(runs) < 2):
        run = json.loads(json.dumps(prompt))
        if image is not None:
            folder = Path(folder_paths.get_input_directory()) / INPUT_SUBFOLDER
            folder.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(image, folder / Path(image).name)
            for node_id in loaders:
                run[node_id]["inputs"]["image"] = f"{INPUT_SUBFOLDER}/{Path(image).name}"
        saved.extend(run_prompt(run, bar_factory))
    return saved


def main(argv: Optional[list] = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if not Path(args.workflow).is_file():
            raise RunError(f"Workflow file not found: {args.workflow}")
        images = _images(args.image) if args.image else None
        comfyui = find_comfyui(args.comfyui)
        if comfyui is None:
            raise RunError("ComfyUI not found: pass --comfyui PATH or set COMFYUI_PATH (or install this pack in "
                           "ComfyUI/custom_nodes).")
        start(comfyui, cpu=args.cpu, output_directory=args.output_directory)
        import folder_paths

        saved = run_workflow(args.workflow, images, source_prompt=args.source_prompt,
                             target_prompt=args.target_prompt, checkpoint=args.checkpoint, seed=args.seed,
                             sets=args.set)
    except RunError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    output = folder_paths.get_output_directory()
    for name in saved:
        print(os.path.join(output, name))
    return 0


if __name__ == "__main__":
    sys.exit(main())
