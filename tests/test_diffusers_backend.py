"""Inversion and Direct Inversion through the diffusers adapter (UNet2DConditionModel + DDIMScheduler)."""
from __future__ import annotations

import math

import pytest
import torch

import di_testing as T


@pytest.fixture(scope="module")
def scheduler():
    return T.sd_scheduler()


@pytest.fixture(scope="module")
def prompts():
    return {"source": T.prompt_embeds(1), "target": T.prompt_embeds(2), "negative": T.prompt_embeds(3)}


@pytest.fixture(scope="module")
def inverted(diffusers_backend, tiny_unet, scheduler, prompts):
    z0 = T.image_like_latent()
    return z0, diffusers_backend.invert(tiny_unet, scheduler, z0, prompts["source"], steps=50)


def rel_mse(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b) ** 2).mean().item() / b.var().item()


def test_ddim_step_matches_diffusers_scheduler(pack, tiny_unet):
    from comfyui_direct_inversion.inversion import ddim_step

    from comfyui_direct_inversion.adapters.diffusers_backend import train_sigmas

    scheduler = T.sd_scheduler()
    scheduler.set_timesteps(50)
    sigmas = train_sigmas(scheduler)
    z = torch.randn(1, 4, 8, 8)
    eps = torch.randn_like(z)
    for t in (980, 500, 20, 0):
        expected = scheduler.step(eps, t, z).prev_sample
        sigma_prev = sigmas[t - 20] if t >= 20 else sigmas[0]  # final_alpha_cumprod = alphas_cumprod[0]
        assert torch.allclose(ddim_step(z, eps, float(sigmas[t]), float(sigma_prev)), expected, atol=1e-5)


@pytest.mark.parametrize("cfg", [1.0, 7.5])
def test_source_reconstruction_is_exact(diffusers_backend, tiny_unet, scheduler, prompts, inverted, cfg):
    z0, inv = inverted
    out = diffusers_backend.edit(tiny_unet, scheduler, inv, prompts["target"], prompts["negative"], cfg=cfg)
    assert (out.source - z0).abs().max().item() <= 1e-5
    assert rel_mse(out.edited, z0) > 1e-3  # the target branch is a different image
    both = diffusers_backend.edit(tiny_unet, scheduler, inv, prompts["source"], prompts["negative"], cfg=cfg,
                                  offsets="both")
    assert (both.edited - z0).abs().max().item() <= 1e-5


def test_baseline_reconstructs_at_cfg_1_and_worse_at_7_5(diffusers_backend, tiny_unet, scheduler, prompts, inverted):
    z0, inv = inverted
    errors = {}
    for cfg in (1.0, 7.5):
        out = diffusers_backend.edit(tiny_unet, scheduler, inv, prompts["source"], prompts["negative"], cfg=cfg,
                                     offsets="off")
        assert torch.equal(out.source, out.edited)  # target = source prompt, no offsets: the same DDIM sampling
        errors[cfg] = rel_mse(out.source, z0)
    print(f"DDIM inversion + sampling, relative MSE: cfg 1 {errors[1.0]:.4f}, cfg 7.5 {errors[7.5]:.4f}")
    assert errors[1.0] < 0.02  # close
    assert errors[7.5] > 10 * errors[1.0]  # and measurably worse with guidance


def test_v_prediction_reconstruction_is_exact(diffusers_backend, tiny_unet, prompts):
    scheduler = T.sd_scheduler("v_prediction")
    z0 = T.image_like_latent()
    inv = diffusers_backend.invert(tiny_unet, scheduler, z0, prompts["source"], steps=20)
    out = diffusers_backend.edit(tiny_unet, scheduler, inv, prompts["target"], prompts["negative"], cfg=7.5)
    assert (out.source - z0).abs().max().item() <= 1e-5
    assert inv.model_family.endswith("v_prediction")


def test_v_prediction_converts_to_eps(diffusers_backend, tiny_unet, prompts):
    """eps from a v-prediction UNet = sqrt(alpha_bar) v + sqrt(1 - alpha_bar) z, at the scheduler's timestep."""
    scheduler = T.sd_scheduler("v_prediction")
    denoiser = diffusers_backend.DiffusersDenoiser(tiny_unet, scheduler, {"source": prompts["source"]}, None, 1.0)
    z = T.image_like_latent()
    t = 500
    sigma = torch.tensor(float(diffusers_backend.train_sigmas(scheduler)[t]))
    with torch.no_grad():
        v = tiny_unet(z, t, encoder_hidden_states=prompts["source"]).sample
        a = scheduler.alphas_cumprod[t].item()
        assert torch.allclose(denoiser(z, sigma, "source", 25), math.sqrt(a) * v + math.sqrt(1 - a) * z, atol=1e-5)


def test_batches_of_images(diffusers_backend, tiny_unet, scheduler, prompts):
    z0 = torch.cat([T.image_like_latent(seed=1), T.image_like_latent(seed=2)])
    inv = diffusers_backend.invert(tiny_unet, scheduler, z0, prompts["source"], steps=10)
    out = diffusers_backend.edit(tiny_unet, scheduler, inv, prompts["target"], prompts["negative"], cfg=7.5)
    assert (out.source - z0).abs().max().item() <= 1e-5
    single = diffusers_backend.edit(tiny_unet, scheduler, diffusers_backend.invert(tiny_unet, scheduler, z0[1:],
                                                                                   prompts["source"], steps=10),
                                    prompts["target"], prompts["negative"], cfg=7.5)
    assert torch.allclose(out.edited[1:], single.edited, atol=1e-4)


def test_errors_name_the_problem(diffusers_backend, tiny_unet, scheduler, prompts, inverted):
    _, inv = inverted
    other = T.tiny_diffusers_unet()
    other.register_to_config(cross_attention_dim=64)  # stands for a model of another family
    with pytest.raises(ValueError, match="made with a 'diffusers:.*ctx32.*' model"):
        diffusers_backend.edit(other, scheduler, inv, prompts["target"], prompts["negative"])
    with pytest.raises(ValueError, match=r"shape \(2, 4, 16, 16\).*\(1, 4, 16, 16\)"):
        diffusers_backend.edit(tiny_unet, scheduler, inv, prompts["target"], prompts["negative"],
                               x_target=torch.zeros(2, 4, 16, 16))
    with pytest.raises(ValueError, match="needs negative prompt embeddings"):
        diffusers_backend.edit(tiny_unet, scheduler, inv, prompts["target"], None, cfg=7.5)
    with pytest.raises(ValueError, match="at least 1"):
        diffusers_backend.invert(tiny_unet, scheduler, T.image_like_latent(), prompts["source"], steps=0)
    nan_latent = T.image_like_latent()
    nan_latent[0, 1, 2, 3] = float("nan")
    with pytest.raises(ValueError, match="latent to invert contains 1 NaN"):
        diffusers_backend.invert(tiny_unet, scheduler, nan_latent, prompts["source"], steps=5)
