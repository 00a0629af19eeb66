"""ComfyUI nodes of the pack (V3 schema)."""
from __future__ import annotations

from comfy_api.latest import ComfyExtension, io

from .editor_nodes import NODES as EDITOR_NODES
from .inversion_nodes import NODES as INVERSION_NODES
from .metric_nodes import NODES as METRIC_NODES
from .web_api import register


def _register_routes() -> None:
    """The web extension's route, on ComfyUI's server when there is one (not in a bare executor)."""
    try:
        from server import PromptServer
    except ImportError:
        return
    if getattr(PromptServer, "instance", None) is not None:
        register(PromptServer.instance.routes)


_register_routes()


class DirectInversionExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [*INVERSION_NODES, *EDITOR_NODES, *METRIC_NODES]


async def comfy_entrypoint() -> DirectInversionExtension:
    return DirectInversionExtension()
