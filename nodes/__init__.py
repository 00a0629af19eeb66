"""ComfyUI nodes of the pack (V3 schema)."""
from __future__ import annotations

from comfy_api.latest import ComfyExtension, io

from .inversion_nodes import NODES


class DirectInversionExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODES)


async def comfy_entrypoint() -> DirectInversionExtension:
    return DirectInversionExtension()
