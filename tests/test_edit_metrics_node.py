"""The Edit Metrics node: ComfyUI IMAGE/MASK batches in, ``evaluation.metrics.region_scores`` of every pair out (FLOAT
batch means, a text on the node); its errors; one run through ComfyUI's executor; and the text shown on the node by
the web extension in ComfyUI's frontend (Chromium, as tests/test_web.py)."""
from __future__ import annotations

import json
import math
import urllib.request

import pytest
import torch

import di_testing as T
from test_web import server  # noqa: F401  (the fixture: ComfyUI's server with the pack, for the browser test)

ARTIFACTS = T.ROOT / "test-artifacts"

KEYS = ("psnr_outside", "ssim_outside", "mse_outside", "psnr_inside", "ssim_inside", "mse_inside", "lpips_outside",
        "lpips_inside")
H, W = 32, 40


@pytest.fixture(scope="module")
def node(comfyui_path, pack):
    from comfyui_direct_inversion.nodes import metric_nodes

    return metric_nodes


@pytest.fixture(scope="module")
def metrics(pack):
    from comfyui_direct_inversion.evaluation import metrics

    return metrics


def images(batch: int = 1, seed: int = 0, channels: int = 3) -> torch.Tensor:
    """A ComfyUI IMAGE [B, H, W, C] in [0, 1]: smooth random pictures (SSIM and PSNR in their usual ranges)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(batch, channels, H // 4, W // 4, generator=g)
    return torch.nn.functional.interpolate(coarse, size=(H, W), mode="bilinear").permute(0, 2, 3, 1).contiguous()


def edit_of(source: torch.Tensor, strength: float, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (source + strength * torch.randn(source.shape, generator=g)).clamp(0, 1)


def box_mask(batch: int = 1, top: int = 8, left: int = 10, size: int = 12, h: int = H, w: int = W) -> torch.Tensor:
    mask = torch.zeros(batch, h, w)
    mask[:, top:top + size, left:left + size] = 1.0
    return mask


def chw(image: torch.Tensor) -> torch.Tensor:
    return image[..., :3].permute(2, 0, 1)


def run(node, source, edited, mask=None, lpips=False):
    """The node's FLOAT outputs by name, and its text."""
    out = node.EditMetrics.execute(source, edited, mask, lpips)
    assert len(out.result) == len(KEYS)
    text = out.ui["text"]
    assert len(text) == 1 and isinstance(text[0], str)
    return dict(zip(KEYS, out.result)), text[0]


def same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, rel=1e-5, abs=1e-9)


def identical(a: dict, b: dict) -> bool:
    """The same outputs exactly (nan where the other is nan)."""
    return all(a[k] == b[k] or (math.isnan(a[k]) and math.isnan(b[k])) for k in KEYS)


def assert_scores(got: dict, expected: dict):
    for key in KEYS[:6]:
        assert same(got[key], float(expected[key])), (key, got[key], float(expected[key]))


def test_one_pair_equals_region_scores(node, metrics):
    source = images()
    edited = edit_of(source, 0.05)
    edited[0, 8:20, 10:22] = edit_of(source, 0.3, seed=2)[0, 8:20, 10:22]  # the edit, stronger in the box
    mask = box_mask()
    got, text = run(node, source, edited, mask)
    expected = metrics.region_scores(chw(source[0]), chw(edited[0]), mask=mask[0])
    assert_scores(got, expected)
    assert got["psnr_outside"] > got["psnr_inside"] + 5 and got["mse_outside"] < got["mse_inside"]
    assert 0 < got["ssim_inside"] < got["ssim_outside"] < 1
    assert math.isnan(got["lpips_outside"]) and math.isnan(got["lpips_inside"])
    lines = text.splitlines()
    assert lines[0] == (f"outside the mask: PSNR {got['psnr_outside']:.2f} dB, SSIM {got['ssim_outside']:.4f}, "
                        f"MSE {got['mse_outside']:.3g}")
    assert lines[1] == (f"inside the mask: PSNR {got['psnr_inside']:.2f} dB, SSIM {got['ssim_inside']:.4f}, "
                        f"MSE {got['mse_inside']:.3g}")
    assert len(lines) == 2

    # without a mask: the whole image outside, nothing inside
    got, text = run(node, source, edited)
    assert_scores(got, metrics.region_scores(chw(source[0]), chw(edited[0])))
    assert math.isnan(got["psnr_inside"]) and math.isfinite(got["psnr_outside"])
    assert text == (f"whole image (no mask): PSNR {got['psnr_outside']:.2f} dB, SSIM {got['ssim_outside']:.4f}, "
                    f"MSE {got['mse_outside']:.3g}")


def test_alpha_is_dropped_and_identical_images_say_so(node, metrics):
    source, edited = images(channels=4), edit_of(images(channels=4), 0.1)
    with_alpha, _ = run(node, source, edited, box_mask())
    without, _ = run(node, source[..., :3], edited[..., :3], box_mask())
    assert identical(with_alpha, without)
    got, text = run(node, source, source.clone(), box_mask())
    assert got["mse_outside"] == 0 and got["mse_inside"] == 0
    assert "PSNR inf dB (identical)" in text.splitlines()[0]


def test_source_of_one_against_an_edited_batch_gives_means(node, metrics):
    source = images()
    edited = torch.cat([edit_of(source, s, seed=n) for n, s in enumerate((0.02, 0.05, 0.1))])
    mask = box_mask()
    got, text = run(node, source, edited, mask)
    pairs = [metrics.region_scores(chw(source[0]), chw(edited[n]), mask=mask[0]) for n in range(3)]
    assert_scores(got, {k: sum(float(p[k]) for p in pairs) / 3 for k in KEYS[:6]})
    lines = text.splitlines()
    assert lines[0] == "mean of 3 pairs (empty regions left out):"
    assert lines[1] == f"  outside the mask: PSNR {got['psnr_outside']:.2f} dB, SSIM {got['ssim_outside']:.4f}, " \
                       f"MSE {got['mse_outside']:.3g}"
    for n, p in enumerate(pairs):
        at = lines.index(f"image {n + 1}:")
        assert lines[at + 1].startswith(f"  outside the mask: PSNR {float(p['psnr_outside']):.2f} dB")
        assert lines[at + 2].startswith(f"  inside the mask: PSNR {float(p['psnr_inside']):.2f} dB")
    # PSNR falls with the noise: the pairs are not all the first one
    assert float(pairs[0]["psnr_outside"]) > float(pairs[1]["psnr_outside"]) > float(pairs[2]["psnr_outside"])


def test_equal_batches_pair_up_with_their_own_masks(node, metrics):
    source = images(batch=2, seed=3)
    edited = torch.stack([edit_of(source[0], 0.03), edit_of(source[1], 0.08, seed=4)])
    masks = torch.cat([box_mask(), box_mask(top=2, left=2, size=20)])
    got, _ = run(node, source, edited, masks)
    pairs = [metrics.region_scores(chw(source[n]), chw(edited[n]), mask=masks[n]) for n in range(2)]
    assert_scores(got, {k: (float(pairs[0][k]) + float(pairs[1][k])) / 2 for k in KEYS[:6]})


def test_empty_regions_are_nan_said_and_left_out_of_the_mean(node, metrics):
    source = images()
    edited = edit_of(source, 0.05)
    got, text = run(node, source, edited, torch.zeros(1, H, W))
    assert math.isnan(got["psnr_inside"]) and math.isnan(got["ssim_inside"]) and math.isnan(got["mse_inside"])
    assert text.splitlines()[1] == "inside the mask: empty region"
    got, text = run(node, source, edited, torch.ones(1, H, W))
    assert math.isnan(got["psnr_outside"]) and math.isfinite(got["psnr_inside"])
    assert text.splitlines()[0] == "outside the mask: empty region"

    # a batch where one mask is empty: the inside means are the other pair's
    edited = torch.cat([edited, edit_of(source, 0.1, seed=5)])
    masks = torch.cat([torch.zeros(1, H, W), box_mask()])
    got, text = run(node, source, edited, masks)
    second = metrics.region_scores(chw(source[0]), chw(edited[1]), mask=masks[1])
    for key in ("psnr_inside", "ssim_inside", "mse_inside"):
        assert same(got[key], float(second[key]))
    lines = text.splitlines()
    assert lines[lines.index("image 1:") + 2] == "  inside the mask: empty region"
    assert lines[lines.index("image 2:") + 2].startswith(f"  inside the mask: PSNR {float(second['psnr_inside']):.2f}")


def test_a_mask_of_another_size_is_resized_nearest(node, metrics):
    source = images()
    edited = edit_of(source, 0.05)
    small = box_mask(top=4, left=5, size=6, h=H // 2, w=W // 2)  # the same box at half size
    got, _ = run(node, source, edited, small)
    assert_scores(got, metrics.region_scores(chw(source[0]), chw(edited[0]), mask=box_mask()[0]))
    # a single [H, W] mask, and a soft one (above 0.5 is inside)
    got2, _ = run(node, source, edited, small[0] * 0.8)
    assert identical(got2, got)
    # and downscaling: a 2x mask
    big = box_mask(top=16, left=20, size=24, h=2 * H, w=2 * W)
    got3, _ = run(node, source, edited, big)
    assert identical(got3, got)
    # any ratio: each pixel takes the mask pixel under its centre (as PIL's NEAREST resize)
    import numpy as np
    from PIL import Image

    odd = (torch.rand(1, 13, 17, generator=torch.Generator().manual_seed(7)) > 0.5).float()
    pil = Image.fromarray(odd[0].numpy().astype(np.uint8) * 255).resize((W, H), Image.NEAREST)
    resized = torch.from_numpy(np.asarray(pil) > 127).float()
    got4, _ = run(node, source, edited, odd)
    assert_scores(got4, metrics.region_scores(chw(source[0]), chw(edited[0]), mask=resized))


@pytest.mark.parametrize("source_shape, edited_shape, mask_shape, message", [
    ((1, H, W, 3), (1, H, W + 8, 3), None, f"The source image is {W}x{H} and the edited image {W + 8}x{H}"),
    ((1, H, W, 3), (1, H + 2, W, 3), (1, H, W), f"The source image is {W}x{H} and the edited image {W}x{H + 2}"),
    ((2, H, W, 3), (3, H, W, 3), None, "The source batch has 2 images and the edited batch 3"),
    ((3, H, W, 3), (1, H, W, 3), None, "The source batch has 3 images and the edited batch 1"),
    ((1, H, W, 3), (3, H, W, 3), (2, H, W), "The mask batch has 2 masks for 3 image pair"),
    ((1, H, W), (1, H, W, 3), None, "The source input is not an IMAGE"),
    ((1, H, W, 3), (1, H, W, 3), (1, 1, 1, H, W), "The mask input is not a MASK"),
])
def test_bad_inputs_are_clear_value_errors(node, source_shape, edited_shape, mask_shape, message):
    mask = None if mask_shape is None else torch.ones(mask_shape)
    with pytest.raises(ValueError, match=message):
        node.EditMetrics.execute(torch.rand(source_shape), torch.rand(edited_shape), mask, False)


def test_lpips_when_asked_for(node, metrics, monkeypatch, tmp_path):
    source = images()
    edited = edit_of(source, 0.05)
    # unavailable (no weights where load_lpips looks): said on the node, nan outputs, the other scores as usual
    monkeypatch.setattr(node, "_lpips_model", None)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    got, text = run(node, source, edited, box_mask(), lpips=True)
    assert text.splitlines()[-1].startswith("LPIPS skipped: the SqueezeNet 1.1 ImageNet weights are not at")
    assert str(tmp_path) in text.splitlines()[-1]
    assert math.isnan(got["lpips_outside"]) and math.isnan(got["lpips_inside"]) and math.isfinite(got["psnr_outside"])
    monkeypatch.setattr(metrics, "load_lpips", lambda backbone=None: (None, "no weights in the cache"))
    _, text = run(node, source, edited, box_mask(), lpips=True)
    assert text.splitlines()[-1] == "LPIPS not computed: no weights in the cache"
    _, text = run(node, source, edited, box_mask(), lpips=False)
    assert "LPIPS" not in text

    # available: LPIPS with a random backbone (no weights needed) goes to region_scores, its scores come out
    model = metrics.Lpips(None)
    loads = []
    monkeypatch.setattr(metrics, "load_lpips", lambda backbone=None: (loads.append(1) or model, "loaded"))
    got, text = run(node, source, edited, box_mask(), lpips=True)
    expected = metrics.region_scores(chw(source[0]), chw(edited[0]), mask=box_mask()[0], lpips=model)
    assert got["lpips_outside"] == pytest.approx(expected["lpips_outside"], rel=1e-5)
    assert got["lpips_inside"] == pytest.approx(expected["lpips_inside"], rel=1e-5)
    assert got["lpips_outside"] != got["lpips_inside"] and math.isfinite(got["lpips_inside"])
    lines = text.splitlines()
    assert lines[0].endswith(f"LPIPS {got['lpips_outside']:.4f}")
    assert lines[1].endswith(f"LPIPS {got['lpips_inside']:.4f}")
    run(node, source, edited, box_mask(), lpips=True)
    assert loads == [1]  # loaded once
    got, _ = run(node, source, edited, box_mask(), lpips=False)
    assert math.isnan(got["lpips_outside"])


def test_edit_metrics_in_the_executor(comfy_env, metrics):
    """The scores of a small graph (``metrics_graph``) run by ComfyUI's executor: the FLOAT outputs and the text."""
    from test_comfyui_executor import output_of, run_prompt

    executor, _, validation = run_prompt(metrics_graph())
    assert validation[0], validation
    assert "execution_success" in [e for e, _ in executor.status_messages], executor.status_messages[-2:]
    source, edited = output_of(executor, "1", 0), output_of(executor, "2", 0)
    mask = torch.zeros(128, 128)
    mask[16:48, 16:48] = 1.0
    expected = metrics.region_scores(chw(source[0]), chw(edited[0]), mask=mask)
    got = {key: output_of(executor, "6", i) for i, key in enumerate(KEYS)}
    assert_scores(got, expected)
    assert got["psnr_outside"] < 40 and got["psnr_inside"] < 40  # the blur changed both regions
    text = executor.history_result["outputs"]["6"]["text"][0]
    assert f"PSNR {got['psnr_outside']:.2f} dB" in text.splitlines()[0]
    assert f"SSIM {got['ssim_inside']:.4f}" in text.splitlines()[1]


def metrics_graph() -> dict:
    """LoadImage (the 128x128 test image) -> ImageBlur as the edit; a 64x64 mask with a 16x16 box (ComfyUI's mask
    nodes), resized by the node to 32x32 at (16, 16); Edit Metrics as the only output node."""
    return {
        "1": {"class_type": "LoadImage", "inputs": {"image": "di_test.png"}},
        "2": {"class_type": "ImageBlur", "inputs": {"image": ["1", 0], "blur_radius": 2, "sigma": 1.0}},
        "3": {"class_type": "SolidMask", "inputs": {"value": 0.0, "width": 64, "height": 64}},
        "4": {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": 16, "height": 16}},
        "5": {"class_type": "MaskComposite", "inputs": {"destination": ["3", 0], "source": ["4", 0], "x": 8, "y": 8,
                                                        "operation": "add"}},
        "6": {"class_type": "DirectInversion_EditMetrics",
              "inputs": {"source": ["1", 0], "edited": ["2", 0], "mask": ["5", 0], "lpips": False}},
    }


def test_browser_shows_the_scores_on_the_node(server):
    """ComfyUI's official frontend with the pack's web extension: after a run the node shows the text it sent (the
    frontend itself shows such text only on its PreviewAny and SaveText nodes)."""
    from test_web import frontend_page

    url, _ = server
    with frontend_page(url, 1400, 900) as (page, errors):
        page.evaluate("async (g) => { await window.app.loadApiJson(g, 'edit_metrics.json'); }", metrics_graph())
        assert page.query_selector(".di-metrics") is None  # nothing before a run
        page.evaluate("() => window.app.queuePrompt(0, 1)")
        page.wait_for_function("() => [...document.querySelectorAll('.di-metrics')]"
                               ".some(e => e.textContent.includes('PSNR'))", timeout=120_000)
        shown = page.evaluate("() => [...document.querySelectorAll('.di-metrics')].map(e => e.textContent)")
        page.wait_for_timeout(500)  # a redraw of the canvas places the widget
        fits = page.evaluate("() => { const e = document.querySelector('.di-metrics');"
                             " return [e.scrollWidth - e.clientWidth, e.scrollHeight - e.clientHeight,"
                             " e.clientHeight]; }")
        page.evaluate("() => { const c = window.app.canvas; c.selectItems?.(); c.fitViewToSelectionAnimated?.();"
                      " c.deselectAll?.(); }")
        page.wait_for_timeout(700)
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "edit_metrics.png"))
    history = json.loads(urllib.request.urlopen(url + "/history", timeout=30).read())
    sent = [entry["outputs"]["6"]["text"][0] for entry in history.values() if "6" in entry.get("outputs", {})]
    assert len(shown) == 1 and sent and shown[0] == sent[-1]
    assert shown[0].startswith("outside the mask: PSNR ") and "\ninside the mask: PSNR " in shown[0]
    assert fits[0] <= 1 and fits[1] <= 1 and fits[2] >= 2 * 15, fits  # the whole text visible, nothing clipped
    assert not [e for e in errors if "direct_inversion" in e.lower()], errors
