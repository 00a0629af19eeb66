"""ComfyUI-DirectInversion: real-image editing by inversion (DDIM + Direct Inversion) for ComfyUI.

ComfyUI loads this file and calls ``comfy_entrypoint``. Outside ComfyUI the package imports without it, so the
backend-agnostic core (``inversion``) and the diffusers adapter (``adapters.diffusers_backend``) can be used
on their own.
"""
import importlib.util

if importlib.util.find_spec("comfy_api") is not None:
    from .nodes import comfy_entrypoint  # noqa: F401

    WEB_DIRECTORY = "./web"  # the web extension: P2P alignment view, per-step charts
    __all__ = ["WEB_DIRECTORY", "comfy_entrypoint"]
