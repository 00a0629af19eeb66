"""Shared fixtures. ComfyUI is found through $COMFYUI_PATH or ../.. (see di_testing). Every test that needs ComfyUI
(through the ``comfyui_path`` fixture) is marked ``comfyui``: ``-m comfyui`` runs those alone, ``-m "not comfyui"``
the rest."""
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


def pytest_configure(config):
    config.addinivalue_line("markers", "comfyui: needs ComfyUI (marked automatically from the comfyui_path fixture)")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "comfyui_path" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.comfyui)


def pytest_report_header(config):
    if COMFYUI is None:
        return f"ComfyUI: not found -- {di_testing.COMFY_SKIP_REASON}"
    return f"ComfyUI {di_testing.comfyui_version(COMFYUI)}: {COMFYUI}"


@pytest.fixture(scope="session")
def pack():
    """The pack imported as a package (with its ComfyUI nodes when ComfyUI is available)."""
    return di_testing.load_pack()


@pytest.fixture(scope="session")
def comfyui_path():
    if COMFYUI is None:
        di_testing.skip_or_fail(di_testing.COMFY_SKIP_REASON)
    return COMFYUI


@pytest.fixture
def every_progress_tick(comfyui_path, monkeypatch):
    """ComfyUI's progress hook sees every update of a ProgressBar. ComfyUI 0.33 throttles the hook (at most one call
    per 0.1 s and 0.5 %, except the first, the last and those with a preview); tests that count the ticks of our
    nodes turn that off. ComfyUI 0.3.64 has no throttle."""
    import comfy.utils

    for name in ("PROGRESS_THROTTLE_MIN_INTERVAL", "PROGRESS_THROTTLE_MIN_PERCENT"):
        if hasattr(comfy.utils, name):
            monkeypatch.setattr(comfy.utils, name, 0)


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


@pytest.fixture(scope="session")
def comfy_env(comfyui_path, tmp_path_factory):
    """ComfyUI's nodes with the pack and the test nodes loaded, input/output folders of the session (the input holds
    a 128x128 test image ``di_test.png``); returns (nodes module, output folder)."""
    import asyncio

    import folder_paths
    import nodes
    import numpy as np
    from comfy_testing import TEST_NODES
    from flow_testing import FLOW_TEST_NODES
    from PIL import Image

    asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
    assert asyncio.run(nodes.load_custom_node(str(di_testing.ROOT))), "ComfyUI failed to load the pack"
    nodes.NODE_CLASS_MAPPINGS.update(TEST_NODES)
    nodes.NODE_CLASS_MAPPINGS.update(FLOW_TEST_NODES)

    input_dir = tmp_path_factory.mktemp("input")
    output_dir = tmp_path_factory.mktemp("output")
    folder_paths.set_input_directory(str(input_dir))
    folder_paths.set_output_directory(str(output_dir))
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (128, 128, 3), dtype=np.uint8)).save(input_dir / "di_test.png")
    return nodes, output_dir
