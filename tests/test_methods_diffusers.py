"""Null-text, negative-prompt and EDICT inversion through the diffusers adapter."""
from __future__ import annotations

import pytest
import torch

import di_testing as T


@pytest.fixture(scope="module")
def setup(tiny_unet):
    return {"unet": tiny_unet, "scheduler": T.sd_scheduler(), "z0": T.image_like_latent(),
            "source": T.prompt_embeds(1), "target": T.prompt_embeds(2), "null": T.prompt_embeds(3)}


def rel_mse(a, b):
    return ((a - b) ** 2).mean().item() / b.var().item()


@pytest.fixture(scope="module")
def ddim(diffusers_backend, setup):
    s = setup
    return diffusers_backend.invert(s["unet"], s["scheduler"], s["z0"], s["source"], steps=50)


@pytest.fixture(scope="module")
def null_text(diffusers_backend, setup):
    s = setup
    return diffusers_backend.invert(s["unet"], s["scheduler"], s["z0"], s["source"], s["null"], steps=50,
                                    method="null_text")


def test_null_text_optimisation_converges_or_improves_every_step(null_text):
    losses = null_text.extras["null_text_losses"]
    thresholds = null_text.extras["null_text_thresholds"]
    steps = null_text.steps
    assert null_text.extras["null_embeddings"].shape == (steps, 1, T.TOKENS, T.CONTEXT_DIM)
    for n in range(steps):
        history = losses[n][~losses[n].isnan()]
        if n == steps - 1:
            # the reference schedule's last step goes from timestep 0 to alpha_bar_0 = the same noise level: its DDIM
            # update is the identity whatever the embedding, so there is nothing to optimise (and we do not).
            assert history.numel() == 0
            continue
        assert history.numel() >= 1
        assert history[-1] <= thresholds[n] or history[-1] < history[0], (n, history.tolist())
    # the thresholds are the reference's: 1e-5 + n * 2e-5
    assert torch.allclose(thresholds, 1e-5 + torch.arange(steps, dtype=torch.float64) * 2e-5)


def test_null_text_reconstructs_far_closer_than_ddim_at_cfg_7_5(diffusers_backend, setup, ddim, null_text):
    s = setup
    plain = diffusers_backend.edit(s["unet"], s["scheduler"], ddim, s["source"], s["null"], cfg=7.5, offsets="off")
    nt = diffusers_backend.edit(s["unet"], s["scheduler"], null_text, s["source"], s["null"], cfg=7.5, offsets="off")
    plain_err, nt_err = rel_mse(plain.source, s["z0"]), rel_mse(nt.source, s["z0"])
    print(f"reconstruction at cfg 7.5, relative MSE: DDIM {plain_err:.4f}, null-text {nt_err:.4f}")
    assert nt_err * 5 <= plain_err


def test_null_text_inside_inference_mode(diffusers_backend, setup):
    s = setup
    with torch.inference_mode():
        inv = diffusers_backend.invert(s["unet"], s["scheduler"], s["z0"], s["source"], s["null"], steps=6,
                                       method="null_text")
    outside = diffusers_backend.invert(s["unet"], s["scheduler"], s["z0"], s["source"], s["null"], steps=6,
                                       method="null_text")
    assert torch.allclose(inv.extras["null_embeddings"], outside.extras["null_embeddings"], atol=1e-6)
    # only the embedding was differentiated: no weight gradients, and the weights' flags are as they were
    assert all(p.grad is None and p.requires_grad for p in s["unet"].parameters())


def test_null_text_needs_the_null_prompt(diffusers_backend, setup):
    s = setup
    with pytest.raises(ValueError, match="empty prompt's embeddings"):
        diffusers_backend.invert(s["unet"], s["scheduler"], s["z0"], s["source"], None, steps=4, method="null_text")


@pytest.mark.parametrize("cfg", [1.0, 7.5])
def test_negative_prompt_reconstruction_is_ddim_at_guidance_1(diffusers_backend, setup, ddim, cfg):
    s = setup
    npi = diffusers_backend.invert(s["unet"], s["scheduler"], s["z0"], s["source"], steps=50, method="negative_prompt")
    out = diffusers_backend.edit(s["unet"], s["scheduler"], npi, s["source"], s["null"], cfg=cfg, offsets="off")
    reference = diffusers_backend.edit(s["unet"], s["scheduler"], ddim, s["source"], s["null"], cfg=1.0, offsets="off")
    assert torch.allclose(out.source, reference.source, atol=1e-5)


def test_negative_prompt_interpolation_and_proximal_guidance(diffusers_backend, setup):
    s = setup
    plain = diffusers_backend.invert(s["unet"], s["scheduler"], s["z0"], s["source"], steps=10,
                                     method="negative_prompt")
    prox = diffusers_backend.invert(s["unet"], s["scheduler"], s["z0"], s["source"], steps=10, method="negative_prompt",
                                    options={"proximal": "l0", "quantile": 0.75})
    half = diffusers_backend.invert(s["unet"], s["scheduler"], s["z0"], s["source"], steps=10, method="negative_prompt",
                                    options={"interpolation": 0.5})
    edits = [diffusers_backend.edit(s["unet"], s["scheduler"], inv, s["target"], s["null"], cfg=7.5).edited
             for inv in (plain, prox, half)]
    assert all(torch.isfinite(e).all() for e in edits)
    assert not torch.allclose(edits[0], edits[1], atol=1e-4)  # proximal guidance changes the edit
    assert not torch.allclose(edits[0], edits[2], atol=1e-4)  # so does interpolating toward the null prompt
    with pytest.raises(ValueError, match="proximal guidance must be one of"):
        diffusers_backend.invert(s["unet"], s["scheduler"], s["z0"], s["source"], steps=4, method="negative_prompt",
                                 options={"proximal": "l2"})


def test_proximal_delta_matches_the_reference_formula(core):
    delta = torch.randn(2, 4, 8, 8)
    out = core.proximal_delta(delta, "l0", 0.75)
    for b in range(2):
        threshold = delta[b].abs().flatten().quantile(0.75)
        expected = delta[b] - delta[b].clamp(-threshold, threshold)
        assert torch.allclose(out[b], expected, atol=1e-6)
    assert (out != 0).float().mean().item() == pytest.approx(0.25, abs=0.02)
    assert torch.equal(core.proximal_delta(delta, "none", 0.75), delta)


def test_edict_reconstructs_exactly_thanks_to_float64_bookkeeping(diffusers_backend, core, setup):
    s = setup
    assert s["unet"].dtype == torch.float32
    inv = diffusers_backend.invert(s["unet"], s["scheduler"], s["z0"], s["source"], s["null"], steps=50, method="edict")
    assert inv.steps == 40 and inv.z_star.dtype == torch.float64  # strength 0.8 of 50 steps, as the reference
    out = diffusers_backend.edit(s["unet"], s["scheduler"], inv, s["source"], s["null"])
    error64 = (out.source - s["z0"]).abs().max().item()

    # the same inversion and regeneration with float32 bookkeeping
    denoiser = diffusers_backend.DiffusersDenoiser(s["unet"], s["scheduler"], {"source": s["source"],
                                                                               "target": s["source"]},
                                                   s["null"], 3.0)
    options = core.EdictOptions()
    x32, y32 = core.invert_edict(denoiser, s["z0"], inv.sigmas, options, dtype=torch.float32)
    out32 = core.sample_edict(denoiser, x32[-1], y32[-1], inv.sigmas, options, dtype=torch.float32)
    error32 = (out32.source - s["z0"]).abs().max().item()
    print(f"EDICT reconstruction max-abs error: float64 bookkeeping {error64:.2e}, float32 {error32:.2e}")
    assert error64 <= 1e-6
    assert error32 > 10 * error64


@pytest.mark.parametrize("method", ["ddim", "null_text", "negative_prompt", "edict"])
def test_every_method_edits_through_the_sampler(diffusers_backend, setup, method):
    s = setup
    inv = diffusers_backend.invert(s["unet"], s["scheduler"], s["z0"], s["source"], s["null"], steps=8, method=method)
    out = diffusers_backend.edit(s["unet"], s["scheduler"], inv, s["target"], s["null"], cfg=7.5)
    assert torch.isfinite(out.edited).all() and torch.isfinite(out.source).all()
    assert out.edited.shape == s["z0"].shape
    assert (out.source.float() - s["z0"]).abs().max() <= 1e-5  # offsets (or EDICT) reconstruct exactly
    assert rel_mse(out.edited.float(), s["z0"]) > 1e-4  # and the target prompt changed the image


def test_unknown_method_and_options_are_refused(diffusers_backend, setup):
    s = setup
    with pytest.raises(ValueError, match="Unknown inversion method 'pnp'"):
        diffusers_backend.invert(s["unet"], s["scheduler"], s["z0"], s["source"], steps=4, method="pnp")
    with pytest.raises(ValueError, match="edict has no option"):
        diffusers_backend.invert(s["unet"], s["scheduler"], s["z0"], s["source"], steps=4, method="edict",
                                 options={"lr": 1})
