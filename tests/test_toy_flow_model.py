"""The trained toy flow model (benchmarks/toy/flow_model.py: an SD3-style MM-DiT over the toy VAE's latents): its
weights, its training script, and what the editors on joint attention do on a flow model that has learned something.

The bounds are set from ``python benchmarks/toy_flow_edits.py`` (benchmarks/results/toy_flow_edits.json), with a
margin for the fewer images tested here; each comment gives the measured figure.
"""
from __future__ import annotations

import importlib.util
import sys

import pytest
import torch

import di_testing

ROOT = di_testing.ROOT
if str(ROOT) not in sys.path:  # appended: the repository's nodes/ package must not shadow ComfyUI's nodes module
    sys.path.append(str(ROOT))

from benchmarks.toy import data, flow_model, model  # noqa: E402

TEST_IMAGES = 4
STEPS = 28


def _toy_flow_edits():
    name = "di_benchmarks_toy_flow_edits"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / "toy_flow_edits.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


@pytest.fixture(scope="module")
def flow():
    return flow_model.load_flow()


def test_committed_flow_weights_are_small_and_load(flow):
    path = flow_model.FLOW_WEIGHTS
    assert path.is_file() and path.stat().st_size <= 6 * 10 ** 6
    config = flow.transformer.config
    assert config.joint_attention_dim == config.pooled_projection_dim == model.CONFIG["context_dim"]
    assert config.in_channels == 4 and config.num_layers == flow_model.FLOW_CONFIG["layers"]
    assert flow.scheduler.config.shift == flow_model.FLOW_CONFIG["shift"]
    assert flow.metadata["training"]["steps"] > 0 and flow.metadata["loss_curve"]
    embeds, pooled = flow.prompt(["a solid red circle on a white background", ""])
    assert embeds.shape == (2, 77, 64) and pooled.shape == (2, 64)
    # the pooled vector is the end-of-text token's state (position 9 for this caption, 1 for the empty prompt)
    assert torch.equal(pooled[0], embeds[0, 9]) and torch.equal(pooled[1], embeds[1, 1])
    z = flow.encode(data.batch([3])["images"])
    with torch.no_grad():
        v = flow.transformer(hidden_states=z, timestep=torch.tensor([500.0]), encoder_hidden_states=embeds[:1],
                             pooled_projections=pooled[:1]).sample
    assert v.shape == z.shape == (1, 4, 16, 16) and torch.isfinite(v).all()


def test_flow_training_script_runs(tmp_path, capsys):
    from benchmarks.toy import flow_train

    path = flow_train.main(["--out", str(tmp_path), "--samples", "16", "--steps", "2", "--batch", "4",
                            "--log-every", "1"])
    printed = capsys.readouterr().out
    assert "[data] 16 images" in printed and "[flow] step     2/2  loss" in printed and "[done]" in printed
    trained = flow_model.load_flow(transformer=path)
    assert trained.metadata["training"]["steps"] == 2 and len(trained.metadata["loss_curve"]) == 2
    assert all(torch.isfinite(p).all() for p in trained.transformer.parameters())


# --------------------------------------------------------------------------------- conditioning and edits

# Bounds from benchmarks/results/toy_flow_edits.json (100 captions, 40 images, Euler 28 steps, cfg 4.5), with margin
# for the fewer captions and images here:
COLOUR_SHARE = 0.6  # sampled colour right: measured 0.89 (shape 0.45, style 0.58: not learned well, not tested)
BACKGROUND_SHARE = 0.8  # measured 1.00
SWAP_SUCCESS = 0.75  # colour swap without an editor: measured 1.00
# Colour-swap success with an editor: measured 0.90 (PnP) and 0.93 (P2P); MasaCtrl keeps more of the source's colour,
# 0.78 (2 of the 4 test images), so its bound only asks that it edits at all.
EDITOR_SUCCESS = {"Direct Inversion + PnP": 0.5, "Direct Inversion + P2P": 0.5, "Direct Inversion + MasaCtrl": 0.25}
BG_GAIN = 3.0  # dB background PSNR over no editor, MasaCtrl / PnP: measured +6.4 / +6.8 (colour), +7.6 / +6.4 (identity)
MASACTRL_IOU_GAIN = 0.05  # silhouette IoU over no editor, colour swap: measured 0.770 vs 0.639
IDENTITY_PSNR_GAIN = 2.0  # dB whole-image PSNR, MasaCtrl identity edit over none: measured +4.0 (24.15 vs 20.13)
TEST_ROWS = ("Direct Inversion, no editor", "Direct Inversion + P2P", "Direct Inversion + MasaCtrl",
             "Direct Inversion + PnP", "Direct Inversion, no editor (identity)",
             "Direct Inversion + MasaCtrl (identity)", "Direct Inversion + PnP (identity)")


def test_samples_follow_the_captions_colour_and_background(flow):
    bench = _toy_flow_edits()
    pack, _, checker, _ = bench._pack()
    rows = {r["attribute"]: r for r in bench.conditioning(pack, flow, data, checker, 12, STEPS, bench.CFG)}
    assert rows["colour"]["share"] >= COLOUR_SHARE and rows["background"]["share"] >= BACKGROUND_SHARE, rows


@pytest.fixture(scope="module")
def edits():
    """The benchmark's rows ``TEST_ROWS`` for its first ``TEST_IMAGES`` edit images (the same code path)."""
    bench = _toy_flow_edits()
    seeds = bench.toy_edits().edit_seeds(TEST_IMAGES)
    rows = tuple(r for r in bench.EDIT_ROWS if r[0] in TEST_ROWS)
    assert len(rows) == len(TEST_ROWS)
    part = bench.run_group(seeds, STEPS, bench.CFG, rows=rows, reconstruction=False)
    return {r["row"]: r for r in bench.summarise([part], rows)[1]}


def test_masactrl_and_pnp_keep_the_background_of_a_colour_swap(edits):
    plain = edits["Direct Inversion, no editor"]
    assert plain["success"] >= SWAP_SUCCESS, plain
    for name in ("Direct Inversion + MasaCtrl", "Direct Inversion + PnP"):
        row = edits[name]
        assert row["success"] >= EDITOR_SUCCESS[name], row
        assert row["bg_psnr"] >= plain["bg_psnr"] + BG_GAIN and row["bg_mse"] < plain["bg_mse"], (plain, row)
    masactrl = edits["Direct Inversion + MasaCtrl"]
    assert masactrl["iou"] >= plain["iou"] + MASACTRL_IOU_GAIN, (plain, masactrl)


def test_identity_edits_stay_closer_to_the_source_with_masactrl_and_pnp(edits):
    """Target prompt = source prompt: the free target branch drifts at cfg 4.5 (Euler inversion at cfg 1); MasaCtrl's
    source keys/values and PnP's source values/queries/keys pull it back."""
    plain = edits["Direct Inversion, no editor (identity)"]
    masactrl, pnp = edits["Direct Inversion + MasaCtrl (identity)"], edits["Direct Inversion + PnP (identity)"]
    assert masactrl["psnr"] >= plain["psnr"] + IDENTITY_PSNR_GAIN, (plain, masactrl)
    for row in (masactrl, pnp):
        assert row["bg_psnr"] >= plain["bg_psnr"] + BG_GAIN and row["bg_ssim"] > plain["bg_ssim"], (plain, row)


def test_p2p_edits_a_flow_model(edits):
    """P2P's colour swap changes the colour on the MM-DiT. Its background is not tested: over the benchmark's 40
    images it is about that of no editor (+0.9 dB mean PSNR but a higher mean MSE; on the first 10 images from -13
    to +15 dB per image), and local blend's region covers most of the latent (0.92 at threshold 0.3: the 8x8 word
    maps are diffuse), so there is no property to bound on a few images."""
    p2p = edits["Direct Inversion + P2P"]
    assert p2p["success"] >= EDITOR_SUCCESS["Direct Inversion + P2P"], p2p
