"""Starting ComfyUI in this process (no server, no UI) and reading its node definitions.

``start(comfyui_path)`` does what ComfyUI's ``main.py`` does before it serves: configure the arguments, import
``nodes``, load the built-in extra nodes and the custom nodes (this pack included, also when it is not inside
ComfyUI's ``custom_nodes``). ``object_info()`` answers as ComfyUI's ``/object_info`` route does.
``make_executor(server)`` builds ComfyUI's ``PromptExecutor`` the way the running version's ``main.py`` does, and
``cached_outputs(executor, node_id)`` reads a node's outputs back from it: the two places where ComfyUI 0.3.64 and
0.33 differ for code that runs prompts in-process.
"""
from __future__ import annotations

import asyncio
import inspect
import os
import sys
from pathlib import Path
from typing import Optional

__all__ = ["PACK_ROOT", "cached_outputs", "find_comfyui", "make_executor", "object_info", "start"]

PACK_ROOT = Path(__file__).resolve().parent.parent


def find_comfyui(path: Optional[str] = None) -> Optional[Path]:
    """ComfyUI's folder: ``path``, else $COMFYUI_PATH, else the ComfyUI this pack sits in (``../..``)."""
    for candidate in (path, os.environ.get("COMFYUI_PATH"), PACK_ROOT.parent.parent):
        if candidate and (Path(candidate) / "comfy" / "model_management.py").is_file():
            return Path(candidate).resolve()
    return None


def start(comfyui_path: Path, cpu: bool = False, output_directory: Optional[str] = None,
          input_directory: Optional[str] = None, custom_nodes: bool = True):
    """Import and initialise ComfyUI from ``comfyui_path`` once per process; returns its ``nodes`` module."""
    if "nodes" in sys.modules and hasattr(sys.modules["nodes"], "NODE_CLASS_MAPPINGS"):
        nodes = sys.modules["nodes"]
    else:
        sys.path.insert(0, str(comfyui_path))
        from comfy.cli_args import args  # must be configured before comfy.model_management loads

        args.cpu = args.cpu or cpu
        import utils.extra_config  # noqa: F401  (main.py imports ComfyUI's utils package before nodes.py)
        import nodes

    import folder_paths

    if output_directory:
        folder_paths.set_output_directory(os.path.abspath(output_directory))
    if input_directory:
        folder_paths.set_input_directory(os.path.abspath(input_directory))
    if not any(name.startswith("DirectInversion_") for name in nodes.NODE_CLASS_MAPPINGS):
        asyncio.run(nodes.init_extra_nodes(init_custom_nodes=custom_nodes, init_api_nodes=False))
        if not any(name.startswith("DirectInversion_") for name in nodes.NODE_CLASS_MAPPINGS):
            if not asyncio.run(nodes.load_custom_node(str(PACK_ROOT))):
                raise RuntimeError(f"ComfyUI could not load the pack from {PACK_ROOT}; see the log above.")
    return nodes


def node_info(nodes, name: str) -> dict:
    """One node's definition as ``/object_info`` serves it (the fields the workflow tools use)."""
    cls = nodes.NODE_CLASS_MAPPINGS[name]
    if hasattr(cls, "GET_NODE_INFO_V1"):
        return cls.GET_NODE_INFO_V1()
    inputs = cls.INPUT_TYPES()
    return {"input": inputs, "input_order": {key: list(value) for key, value in inputs.items()},
            "output": list(cls.RETURN_TYPES), "output_name": list(getattr(cls, "RETURN_NAMES", cls.RETURN_TYPES)),
            "name": name, "display_name": nodes.NODE_DISPLAY_NAME_MAPPINGS.get(name, name),
            "output_node": bool(getattr(cls, "OUTPUT_NODE", False))}


def object_info(nodes) -> dict:
    import folder_paths

    with folder_paths.cache_helper:
        return {name: node_info(nodes, name) for name in nodes.NODE_CLASS_MAPPINGS}


def make_executor(server):
    """ComfyUI's ``PromptExecutor`` with the cache that this ComfyUI's ``main.py`` (``prompt_worker``) sets up from
    its command-line arguments (``comfy.cli_args.args``; their defaults when not parsed)."""
    import comfy.model_management
    import execution
    from comfy.cli_args import args

    cache = execution.CacheType
    if "cache_args" not in inspect.signature(execution.PromptExecutor.__init__).parameters:
        # ComfyUI 0.3.x: classic cache unless --cache-lru / --cache-none; the LRU size is passed as cache_size.
        cache_type = cache.LRU if args.cache_lru > 0 else cache.DEPENDENCY_AWARE if args.cache_none else cache.CLASSIC
        return execution.PromptExecutor(server, cache_type=cache_type, cache_size=args.cache_lru)
    # ComfyUI 0.33: the RAM-pressure cache by default, and execute() reads its headroom from cache_args (RAM in GB:
    # active 10 % of the machine's RAM within [2, 10], inactive all of it up to 128; --cache-ram overrides them).
    ram = inactive = 0.0
    if not args.cache_classic and not args.cache_none and args.cache_lru <= 0:
        total_gb = comfy.model_management.total_ram / 1024.0
        ram, inactive = min(10.0, max(2.0, total_gb * 0.10)), min(128.0, total_gb)
        ram_args = list(args.cache_ram or [])
        ram, inactive = (ram_args + [ram, inactive][len(ram_args):])[:2]
    cache_type = (cache.CLASSIC if args.cache_classic else cache.LRU if args.cache_lru > 0
                  else cache.NONE if args.cache_none else cache.RAM_PRESSURE)
    return execution.PromptExecutor(server, cache_type=cache_type,
                                    cache_args={"lru": args.cache_lru, "ram": ram, "ram_inactive": inactive})


def cached_outputs(executor, node_id: str):
    """The outputs (one list per output slot) that ``executor`` keeps for ``node_id``, or None."""
    entry = executor.caches.outputs.get(node_id)
    if inspect.isawaitable(entry):  # ComfyUI 0.33: the caches are asynchronous
        entry = asyncio.run(entry)
    return getattr(entry, "outputs", entry)  # ComfyUI 0.33 keeps a CacheEntry(ui, outputs); 0.3.x the outputs
