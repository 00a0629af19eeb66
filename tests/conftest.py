"""Shared fixtures. ComfyUI is found through $COMFYUI_PATH, ../.. or ~/comfy/ComfyUI (see di_testing)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import di_testing  # noqa: E402

COMFYUI = di_testing.find_comfyui()
if COMFYUI is not None:
    sys.path.insert(0, str(COMFYUI))
    from comfy.cli_args import args  # noqa: E402  (must be configured before comfy.model_management loads)

    args.cpu = True
    # ComfyUI's nodes.py puts ComfyUI/comfy first on sys.path, where comfy/utils.py would then shadow ComfyUI's
    # `utils` package; main.py imports that package before nodes.py, and so do we.
    import utils.extra_config  # noqa: E402,F401


def pytest_report_header(config):
    if COMFYUI is None:
        return f"ComfyUI: not found -- {di_testing.COMFY_SKIP_REASON}"
    return f"ComfyUI: {COMFYUI}"


@pytest.fixture(scope="session")
def pack():
    """The pack imported as a package (with its ComfyUI nodes when ComfyUI is available)."""
    return di_testing.load_pack()


@pytest.fixture(scope="session")
def comfyui_path():
    if COMFYUI is None:
        pytest.skip(di_testing.COMFY_SKIP_REASON)
    return COMFYUI


@pytest.fixture(scope="session")
def tiny_unet():
    return di_testing.tiny_diffusers_unet()


@pytest.fixture(scope="session")
def core(pack):
    from comfyui_direct_inversion import inversion

    return inversion


@pytest.fixture(scope="session")
def editors(pack):
    from comfyui_direct_inversion import editors

    return editors


@pytest.fixture(scope="session")
def diffusers_backend(pack):
    from comfyui_direct_inversion.adapters import diffusers_backend

    return diffusers_backend


@pytest.fixture(scope="session")
def comfy_backend(comfyui_path, pack):
    from comfyui_direct_inversion.adapters import comfyui_backend

    return comfyui_backend



@pytest.fixture(scope="session")
def edit_setup(diffusers_backend, tiny_unet):
    """The tiny diffusers UNet, a latent, three prompts and the latent's DDIM inversion in ``EDIT_STEPS`` steps."""
    s = {"backend": diffusers_backend, "unet": tiny_unet, "scheduler": di_testing.sd_scheduler(),
         "z0": di_testing.image_like_latent(), "source": di_testing.prompt_embeds(1),
         "target": di_testing.prompt_embeds(2), "null": di_testing.prompt_embeds(3)}
    s["ddim"] = diffusers_backend.invert(s["unet"], s["scheduler"], s["z0"], s["source"], steps=di_testing.EDIT_STEPS)
    return s


@pytest.fixture(scope="module")
def model(comfy_backend, tiny_unet):
    """A ComfyUI SD1.5-family ModelPatcher with the tiny diffusers UNet's weights (one per test module)."""
    return di_testing.comfy_model_from_diffusers(tiny_unet)


@pytest.fixture(scope="session")
def conds():
    """ComfyUI conditioning of the toy source, target and negative prompts."""
    return {name: di_testing.comfy_conditioning(di_testing.prompt_embeds(seed)) for name, seed in
            (("source", 1), ("target", 2), ("negative", 3))}
