"""Null-text, negative-prompt and EDICT inversion through the diffusers adapter."""
from __future__ import annotations

import math

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


def _quantile(values: torch.Tensor, q: float) -> float:
    """The q-quantile of a tensor's entries: linear interpolation between the order statistics around q (n - 1)."""
    ordered = sorted(values.flatten().tolist())
    position = q * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (position - low) * (ordered[high] - ordered[low])


def _proximal(delta: torch.Tensor, mode: str, quantile: float) -> torch.Tensor:
    """Proximal guidance of the guidance direction ``delta`` (PnPInversion's proximal_guidance_diffusion_step), each
    sample with its own threshold thr: the ``quantile`` of its |delta|, or -quantile for a negative one. Float64.

    l0: soft thresholding, d - thr above thr, d + thr below -thr, 0 in between.
    l1: the reference shrinks l0's result once more by thr with two torch.where in sequence, positive entries first,
    then negative ones -- the second also catches the entries the first pushed below zero, so: d - 2 thr for
    d >= 2 thr, d - thr for thr < d < 2 thr, 0 for |d| <= thr, and d + 2 thr for every d < -thr.
    """
    out = delta.double().clone()
    if mode == "none":
        return out
    for b, d in enumerate(out):
        thr = -quantile if quantile < 0 else _quantile(d.abs(), quantile)
        zero = torch.zeros_like(d)
        if mode == "l0":
            out[b] = torch.where(d > thr, d - thr, torch.where(d < -thr, d + thr, zero))
        elif mode == "l1":
            out[b] = torch.where(d >= 2 * thr, d - 2 * thr,
                                 torch.where(d > thr, d - thr, torch.where(d < -thr, d + 2 * thr, zero)))
        else:
            raise AssertionError(mode)
    return out


NPI_STEPS = 4


@pytest.mark.parametrize("options", [{"interpolation": 0.7}, {"proximal": "l0", "quantile": 0.75},
                                     {"proximal": "l1", "quantile": 0.6, "interpolation": 0.25}],
                         ids=["interpolation", "l0", "l1+interpolation"])
def test_negative_prompt_interpolation_and_proximal_guidance(diffusers_backend, setup, options):
    """Every guided prediction of a negative-prompt edit, recomputed here from the UNet's own outputs (a forward hook):
    both branches' unconditional input is (1 - w) source + w null (Miyake et al.: the source prompt stands in for the
    null-text embedding, w = ``interpolation``), the guided eps is eps_u + cfg * prox(eps_c - eps_u), and each step
    is the DDIM update with it (the target's latent and x0 preview; the source's offset to the inversion)."""
    s = setup
    cfg, steps = 7.5, NPI_STEPS
    w, mode, quantile = options.get("interpolation", 0.0), options.get("proximal", "none"), options.get("quantile", 0.75)
    inv = diffusers_backend.invert(s["unet"], s["scheduler"], s["z0"], s["source"], steps=steps,
                                   method="negative_prompt", options=options)
    calls, infos = [], []
    handle = s["unet"].register_forward_hook(lambda module, args, kwargs, out: calls.append(
        (args[0].clone(), int(args[1]), kwargs["encoder_hidden_states"].clone(), out.sample.clone())), with_kwargs=True)
    try:
        diffusers_backend.edit(s["unet"], s["scheduler"], inv, s["target"], s["null"], cfg=cfg,
                               callback=lambda info: infos.append({k: v.clone() if torch.is_tensor(v) else v
                                                                    for k, v in info.items()}))
    finally:
        handle.remove()
    evaluated = steps - 1  # the last step (timestep 0 to alpha_bar[0]) has zero length: no prediction
    assert len(calls) == 2 * evaluated and len(infos) == steps
    negative = s["source"] + w * (s["null"] - s["source"])
    alphas = s["scheduler"].alphas_cumprod.double()
    stride = s["scheduler"].config.num_train_timesteps // steps
    z_star = inv.z_star.double()

    def guided(call, x, cond):
        sample, timestep, context, eps = call
        assert torch.equal(sample, torch.cat([x, x]))  # [unconditional, conditional] of the branch's latent
        torch.testing.assert_close(context, torch.cat([negative, cond]), rtol=0, atol=1e-6)
        eps_u, eps_c = eps.double().chunk(2)
        guidance = {m: _proximal(eps_c - eps_u, m, quantile) for m in ("none", "l0", "l1")}
        return eps_u + cfg * guidance[mode], timestep, guidance

    def ddim(x, eps, a, a_to):
        x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
        return a_to.sqrt() * x0 + (1 - a_to).sqrt() * eps, x0

    x_src = x_tgt = inv.z_star[-1]
    for n in range(evaluated):
        level = steps - n
        t, t_to = (level - 1) * stride, (level - 2) * stride
        eps_src, timestep_src, _ = guided(calls[2 * n], x_src, s["source"])
        eps_tgt, timestep_tgt, guidance = guided(calls[2 * n + 1], x_tgt, s["target"])
        assert timestep_src == timestep_tgt == t
        # the settings matter: another proximal mode would give the target another prediction, far beyond tolerance
        assert all((guidance[m] - guidance[mode]).abs().max() * cfg > 1e-4 for m in guidance if m != mode)
        info = infos[n]
        src_next, _ = ddim(x_src.double(), eps_src, alphas[t], alphas[t_to])
        torch.testing.assert_close(info["offset"].double(), z_star[level - 1] - src_next, rtol=0, atol=2e-6)
        torch.testing.assert_close(info["x_source"], inv.z_star[level - 1], rtol=0, atol=1e-6)  # pinned to it
        x_next, x0 = ddim(x_tgt.double(), eps_tgt, alphas[t], alphas[t_to])
        torch.testing.assert_close(info["denoised"].double(), x0, rtol=0, atol=2e-6 * x0.abs().max().item())
        torch.testing.assert_close(info["x_target"].double(), x_next, rtol=0, atol=2e-6)
        x_src, x_tgt = info["x_source"], info["x_target"]


def test_negative_prompt_options_are_checked(diffusers_backend, setup):
    s = setup
    with pytest.raises(ValueError, match="proximal guidance must be one of"):
        diffusers_backend.invert(s["unet"], s["scheduler"], s["z0"], s["source"], steps=4, method="negative_prompt",
                                 options={"proximal": "l2"})


def test_proximal_delta_by_hand(core):
    """A fixed threshold (negative quantile) of 1 on values written out: l0 shrinks by 1 what lies beyond +-1; l1 (the
    reference's sequential shrink, see ``_proximal``) gives d - 2 from 2 on, d - 1 in (1, 2), d + 2 below -1."""
    delta = torch.tensor([-3.0, -2.0, -1.5, -1.0, -0.5, 0.0, 0.5, 1.0, 1.5, 2.0, 3.0]).view(1, 1, 1, -1)
    l0 = [-2.0, -1.0, -0.5, 0.0, 0.0, 0.0, 0.0, 0.0, 0.5, 1.0, 2.0]
    l1 = [-1.0, 0.0, 0.5, 0.0, 0.0, 0.0, 0.0, 0.0, 0.5, 0.0, 1.0]
    assert core.proximal_delta(delta, "l0", -1.0).flatten().tolist() == l0
    assert core.proximal_delta(delta, "l1", -1.0).flatten().tolist() == l1
    assert core.proximal_delta(delta, "none", -1.0).flatten().tolist() == delta.flatten().tolist()


@pytest.mark.parametrize("mode", ["l0", "l1"])
@pytest.mark.parametrize("quantile", [0.75, 0.6, -0.4])
def test_proximal_delta_matches_the_reference_formula(core, mode, quantile):
    g = torch.Generator().manual_seed(0)
    # two samples of different scales: a threshold per sample is not one over the batch
    delta = torch.randn(2, 4, 8, 8, generator=g) * torch.tensor([1.0, 10.0]).view(2, 1, 1, 1)
    out = core.proximal_delta(delta, mode, quantile)
    torch.testing.assert_close(out.double(), _proximal(delta, mode, quantile), rtol=0, atol=1e-5)
    if quantile > 0 and mode == "l0":  # l0 leaves exactly the entries above the quantile
        kept = (out != 0).flatten(1).float().mean(1)
        assert kept.tolist() == pytest.approx([1 - quantile] * 2, abs=1 / 256)
    assert torch.equal(core.proximal_delta(delta, "none", quantile), delta)


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
