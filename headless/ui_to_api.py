"""Workflow files as ComfyUI saves them (the UI format: nodes with widget values, a list of links) -> the API format
ComfyUI's executor and ``/prompt`` take (``{id: {"class_type", "inputs"}}``).

ComfyUI's frontend does this conversion in the browser (``graphToPrompt``); ComfyUI core has none. This module
needs no ComfyUI: it takes the node definitions in the form ComfyUI's ``/object_info`` serves them.

What it follows, as the frontend does:
- widget values are assigned in the order of the node's widget inputs (inputs whose type is a value type or a
  combo, unless ``forceInput``); an INT input that has a "control after generate" widget (``seed``,
  ``noise_seed`` or ``control_after_generate``) is followed by that widget's value ("fixed", "randomize", ...),
  which is skipped; trailing values (an image upload button's) are ignored;
- a linked input (also a widget converted to an input) takes ``[origin id, origin slot]``;
- ``Note``, ``MarkdownNote`` and other nodes without a definition that only annotate are dropped; ``Reroute``
  nodes are followed to their origin; a ``PrimitiveNode``'s value is written into the inputs it feeds;
- muted nodes (mode 2) are dropped with the inputs they feed; bypassed nodes (mode 4) pass the first input of the
  same type through.
Subgraphs and group nodes are refused with a message.
"""
from __future__ import annotations

from typing import Any, Optional

__all__ = ["WorkflowError", "VALUE_TYPES", "convert", "widget_inputs"]

VALUE_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
CONTROL_VALUES = {"fixed", "increment", "decrement", "randomize"}
ANNOTATION_TYPES = {"Note", "MarkdownNote"}
MUTED, BYPASSED = 2, 4


class WorkflowError(ValueError):
    """A workflow file that cannot be converted (the message says where)."""


def _spec(entry) -> tuple[Any, dict]:
    kind = entry[0]
    options = entry[1] if len(entry) > 1 and isinstance(entry[1], dict) else {}
    return kind, options


def is_widget(entry) -> bool:
    kind, options = _spec(entry)
    if options.get("forceInput"):
        return False
    return isinstance(kind, (list, tuple)) or kind in VALUE_TYPES


def has_control_widget(name: str, entry) -> bool:
    kind, options = _spec(entry)
    return kind == "INT" and (name in ("seed", "noise_seed") or bool(options.get("control_after_generate")))


def widget_inputs(info: dict) -> list[tuple[str, Any]]:
    """``(name, spec)`` of a node definition's widget inputs, in the order the frontend shows (and saves) them."""
    out = []
    order = info.get("input_order") or {k: list(v) for k, v in info.get("input", {}).items()}
    for section in ("required", "optional"):
        specs = info.get("input", {}).get(section, {}) or {}
        for name in order.get(section, list(specs)):
            if name in specs and is_widget(specs[name]):
                out.append((name, specs[name]))
    return out


def _all_inputs(info: dict) -> dict:
    specs = {}
    for section in ("required", "optional"):
        specs.update(info.get("input", {}).get(section, {}) or {})
    return specs


def _widget_values(node: dict, info: dict) -> dict:
    values = node.get("widgets_values")
    if values is None:
        return {}
    if isinstance(values, dict):  # some nodes save their widgets by name
        return {name: values[name] for name, _ in widget_inputs(info) if name in values}
    out, i = {}, 0
    for name, spec in widget_inputs(info):
        if i >= len(values):
            break
        out[name] = values[i]
        i += 1
        if has_control_widget(name, spec) and i < len(values) and values[i] in CONTROL_VALUES:
            i += 1
    return out


def convert(workflow: dict, object_info: dict) -> dict:
    """The API-format prompt of a UI-format ``workflow``, with node definitions ``object_info`` (``/object_info``'s
    answer: class name -> definition). Raises :class:`WorkflowError` for unknown node types and broken links."""
    if not isinstance(workflow, dict) or "nodes" not in workflow:
        if isinstance(workflow, dict) and workflow and all(isinstance(v, dict) and "class_type" in v
                                                           for v in workflow.values()):
            return workflow  # already in the API format
        raise WorkflowError("Not a ComfyUI workflow: no 'nodes' list (save it from ComfyUI with Workflow > Save).")
    if (workflow.get("definitions") or {}).get("subgraphs"):
        raise WorkflowError("Workflows with subgraphs are not supported; unpack the subgraphs in ComfyUI first.")
    nodes = {int(n["id"]): n for n in workflow["nodes"]}
    links = {}
    for link in workflow.get("links", []):
        if isinstance(link, dict):
            link = [link["id"], link["origin_id"], link["origin_slot"], link["target_id"], link["target_slot"],
                    link.get("type")]
        links[int(link[0])] = (int(link[1]), int(link[2]), int(link[3]), int(link[4]), link[5])

    def definition(node: dict) -> Optional[dict]:
        info = object_info.get(node["type"])
        if info is None and node["type"] not in ANNOTATION_TYPES | {"Reroute", "PrimitiveNode"}:
            raise WorkflowError(f"Node #{node['id']} has type {node['type']!r}, which this ComfyUI does not know "
                                f"(a missing custom node pack?).")
        return info

    def resolve(link_id: int, seen=()) -> Optional[tuple]:
        """(origin node id, origin slot) or ("value", v) or None (a muted origin) for a link."""
        if link_id not in links:
            raise WorkflowError(f"Link {link_id} is referenced by a node but missing from the workflow's links.")
        origin_id, origin_slot, _, _, kind = links[link_id]
        if origin_id in seen:
            raise WorkflowError(f"Reroute/bypass loop through node #{origin_id}.")
        origin = nodes.get(origin_id)
        if origin is None:
            raise WorkflowError(f"Link {link_id} starts at node #{origin_id}, which is not in the workflow.")
        mode = origin.get("mode", 0)
        if origin["type"] == "Reroute":
            upstream = (origin.get("inputs") or [{}])[0].get("link")
            return None if upstream is None else resolve(int(upstream), seen + (origin_id,))
        if origin["type"] == "PrimitiveNode":
            return ("value", (origin.get("widgets_values") or [None])[0])
        if mode == MUTED:
            return None
        if mode == BYPASSED:
            out_type = (origin.get("outputs") or [])[origin_slot].get("type") if origin.get("outputs") else kind
            for entry in origin.get("inputs") or []:
                if entry.get("link") is not None and entry.get("type") == out_type:
                    return resolve(int(entry["link"]), seen + (origin_id,))
            return None
        return str(origin_id), origin_slot

    prompt = {}
    for node_id, node in sorted(nodes.items()):
        if node["type"] in ANNOTATION_TYPES | {"Reroute", "PrimitiveNode"} or node.get("mode", 0) in (MUTED, BYPASSED):
            continue
        info = definition(node)
        if info is None:
            continue
        inputs = _widget_values(node, info)
        specs = _all_inputs(info)
        for entry in node.get("inputs") or []:
            name = entry.get("name") or (entry.get("widget") or {}).get("name")
            if entry.get("link") is None:
                continue
            if name not in specs:
                raise WorkflowError(f"Node #{node_id} ({node['type']}) has a link into {name!r}, which is not one "
                                    f"of its inputs.")
            source = resolve(int(entry["link"]))
            if source is None:
                inputs.pop(name, None)
            elif source[0] == "value":
                inputs[name] = source[1]
            else:
                inputs[name] = [source[0], source[1]]
        api = {"class_type": node["type"], "inputs": inputs}
        if node.get("title"):
            api["_meta"] = {"title": node["title"]}
        prompt[str(node_id)] = api
    return prompt
