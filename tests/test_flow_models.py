"""The tiny flow-matching models of flow_testing: diffusers and ComfyUI predict the same velocity from the same
weights (SD3 and Flux, Flux with its guidance embedding), the tiny CLIPs and VAE work with them through ComfyUI's
nodes, and everything stays tiny.

The diffusers side is called as its pipelines call it (pipeline_stable_diffusion_3.py: ``timestep`` = sigma * 1000;
pipeline_flux.py: packed 2x2 latents, image/text position ids, ``timestep`` = sigma, ``guidance`` per sample); the
ComfyUI side as its samplers do (conditioning through ``process_conds``, prediction through ``calc_cond_batch``),
velocity = (x - D(x)) / sigma of ComfyUI's denoiser D.
"""
from __future__ import annotations

import pytest
import torch

import flow_testing as F

SIGMAS = (1.0, 0.6, 0.05)
ATOL = 1e-5  # relative to the largest velocity: float32 rounding
# ComfyUI's velocity is (x - D(x)) / sigma: the rounding of D(x) at the size of x comes back divided by sigma
X_ROUNDING = 2 * torch.finfo(torch.float32).eps
SD3_MAX_PARAMS = 2_000_000  # the 4096-wide context embedder is a third of it
FLUX_MAX_PARAMS = 200_000
CLIP_MAX_PARAMS = 10_000_000


def latent(batch: int = 1, size: int = 16, seed: int = 1) -> torch.Tensor:
    """A smooth 16-channel latent of unit-ish variance."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(batch, F.LATENT_CHANNELS, size // 4, size // 4, generator=g)
    return torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)


def pack(x: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, (H/2)(W/2), 4C], 2x2 patches row-major, channel-major inside (FluxPipeline._pack_latents)."""
    b, c, h, w = x.shape
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), 4 * c)


def unpack(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    b, _, c4 = x.shape
    return x.view(b, h // 2, w // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c4 // 4, h, w)


def image_ids(h: int, w: int) -> torch.Tensor:
    """[(H/2)(W/2), 3]: (0, row, column) of each packed patch (FluxPipeline._prepare_latent_image_ids)."""
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] += torch.arange(h // 2)[:, None]
    ids[..., 2] += torch.arange(w // 2)[None, :]
    return ids.reshape(-1, 3)


@torch.no_grad()
def diffusers_sd3_velocity(transformer, x, sigma: float, embeds, pooled):
    b = x.shape[0]
    return transformer(hidden_states=x, timestep=torch.full((b,), sigma * 1000.0),
                       encoder_hidden_states=embeds.expand(b, -1, -1), pooled_projections=pooled.expand(b, -1)).sample


@torch.no_grad()
def diffusers_flux_velocity(transformer, x, sigma: float, embeds, pooled, guidance=F.FLUX_GUIDANCE):
    b, _, h, w = x.shape
    g = torch.full((b,), float(guidance)) if transformer.config.guidance_embeds else None
    out = transformer(hidden_states=pack(x), timestep=torch.full((b,), sigma), guidance=g,
                      encoder_hidden_states=embeds.expand(b, -1, -1), pooled_projections=pooled.expand(b, -1),
                      txt_ids=torch.zeros(embeds.shape[1], 3), img_ids=image_ids(h, w)).sample
    return unpack(out, h, w)


@torch.no_grad()
def comfy_velocity(patcher, x, sigma: float, conditioning):
    """(x - D(x)) / sigma, D from ``calc_cond_batch`` on conditioning processed as ComfyUI's samplers process it
    (between the patcher's ``pre_run`` and ``cleanup``, as ComfyUI's sampling runs it)."""
    import comfy.sampler_helpers
    import comfy.samplers

    positive = comfy.sampler_helpers.convert_cond(conditioning)
    conds = comfy.samplers.process_conds(patcher.model, x, {"positive": positive}, x.device)["positive"]
    sigmas = torch.full((x.shape[0],), sigma)
    patcher.pre_run()
    try:
        denoised = comfy.samplers.calc_cond_batch(patcher.model, [conds], x, sigmas, patcher.model_options)[0]
    finally:
        patcher.cleanup()
    return (x - denoised) / sigma


def assert_close(ours, theirs, x, sigma: float):
    """Equal up to float32 rounding: of the velocity itself, and of x - D(x) at the size of x, divided by sigma."""
    scale = theirs.abs().max().item()
    diff = (ours - theirs).abs().max().item()
    tolerance = ATOL * scale + X_ROUNDING * x.abs().max().item() / sigma
    assert 0 < scale and diff <= tolerance, f"max |diff| {diff:.3g} at output scale {scale:.3g}, sigma {sigma}"


def n_params(module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.fixture(scope="module")
def sd3():
    return F.tiny_diffusers_sd3()


@pytest.fixture(scope="module")
def flux():
    return F.tiny_diffusers_flux()


def test_diffusers_models_are_tiny_deterministic_and_predict_small_velocities(sd3, flux):
    assert n_params(sd3) < SD3_MAX_PARAMS and n_params(flux) < FLUX_MAX_PARAMS
    for make, model in ((F.tiny_diffusers_sd3, sd3), (F.tiny_diffusers_flux, flux)):
        rng_state = torch.random.get_rng_state()
        again, other = make(0), make(1)
        assert torch.equal(torch.random.get_rng_state(), rng_state), "the global RNG was touched"
        same = zip(model.state_dict().values(), again.state_dict().values())
        assert all(torch.equal(a, b) for a, b in same)
        assert not torch.equal(model.proj_out.weight, other.proj_out.weight)

    x = latent(size=32)  # the largest latent the tests use
    v = diffusers_sd3_velocity(sd3, x, 0.5, *F.sd3_prompt(1))
    assert v.shape == x.shape and 0.01 < v.std() < 0.5
    v = diffusers_flux_velocity(flux, x, 0.5, *F.flux_prompt(1))
    assert v.shape == x.shape and 0.01 < v.std() < 0.5
    embeds, pooled = F.sd3_prompt(1, tokens=5, batch=2)
    assert embeds.shape == (2, 5, F.SD3_CONTEXT_DIM) and pooled.shape == (2, F.SD3_POOLED_DIM)
    assert not torch.equal(F.flux_prompt(1)[0], F.flux_prompt(2)[0])


def test_schedulers_are_the_shipped_ones():
    sd3 = F.sd3_scheduler()
    assert sd3.config.shift == 3.0 and not sd3.config.use_dynamic_shifting and sd3.config.num_train_timesteps == 1000
    sd3.set_timesteps(4)
    assert sd3.sigmas[0] == pytest.approx(1.0) and sd3.timesteps[0] == pytest.approx(1000.0)
    flux = F.flux_scheduler()
    assert flux.config.use_dynamic_shifting and (flux.config.base_shift, flux.config.max_shift) == (0.5, 1.15)
    flux.set_timesteps(4, mu=0.5)
    assert flux.sigmas[0] == pytest.approx(1.0) and flux.sigmas[-1] == 0


def test_comfy_model_classes(comfyui_path, sd3, flux):
    import comfy.model_base
    import comfy.model_sampling
    import comfy.supported_models

    model = F.comfy_sd3_from_diffusers(sd3).model
    assert type(model) is comfy.model_base.SD3 and type(model.model_config) is comfy.supported_models.SD3
    assert isinstance(model.model_sampling, comfy.model_sampling.ModelSamplingDiscreteFlow)
    assert isinstance(model.model_sampling, comfy.model_sampling.CONST) and model.model_sampling.shift == 3.0
    assert model.get_dtype() == torch.float32 and n_params(model.diffusion_model) < SD3_MAX_PARAMS

    model = F.comfy_flux_from_diffusers(flux).model
    assert type(model) is comfy.model_base.Flux and type(model.model_config) is comfy.supported_models.Flux
    assert isinstance(model.model_sampling, comfy.model_sampling.ModelSamplingFlux)
    assert model.diffusion_model.params.guidance_embed and model.diffusion_model.num_heads == F.FLUX_HEADS
    assert model.get_dtype() == torch.float32 and n_params(model.diffusion_model) < FLUX_MAX_PARAMS

    schnell = F.comfy_flux_from_diffusers(F.tiny_diffusers_flux(guidance_embeds=False)).model
    assert type(schnell.model_config) is comfy.supported_models.FluxSchnell
    assert not schnell.diffusion_model.params.guidance_embed


@pytest.mark.parametrize("batch", [1, 2])
def test_sd3_velocity_matches_diffusers(comfyui_path, sd3, batch):
    model = F.comfy_sd3_from_diffusers(sd3)
    embeds, pooled = F.sd3_prompt(1)
    conditioning = F.comfy_flow_conditioning(embeds, pooled)
    x = latent(batch)
    for sigma in SIGMAS:
        theirs = diffusers_sd3_velocity(sd3, x, sigma, embeds, pooled)
        assert_close(comfy_velocity(model, x, sigma, conditioning), theirs, x, sigma)


def test_sd35_qk_norm_velocity_matches_diffusers(comfyui_path):
    sd35 = F.tiny_diffusers_sd3(qk_norm="rms_norm")
    model = F.comfy_sd3_from_diffusers(sd35)
    assert model.model.diffusion_model.joint_blocks[0].x_block.attn.ln_q is not None
    embeds, pooled = F.sd3_prompt(2)
    x = latent(2, seed=3)
    assert_close(comfy_velocity(model, x, 0.6, F.comfy_flow_conditioning(embeds, pooled)),
                 diffusers_sd3_velocity(sd35, x, 0.6, embeds, pooled), x, 0.6)


@pytest.mark.parametrize("batch", [1, 2])
def test_flux_velocity_matches_diffusers(comfyui_path, flux, batch):
    model = F.comfy_flux_from_diffusers(flux)
    embeds, pooled = F.flux_prompt(1)
    x = latent(batch)
    by_guidance = {}
    for guidance in (F.FLUX_GUIDANCE, 6.0):
        conditioning = F.comfy_flow_conditioning(embeds, pooled, guidance=guidance)
        for sigma in SIGMAS:
            ours = comfy_velocity(model, x, sigma, conditioning)
            assert_close(ours, diffusers_flux_velocity(flux, x, sigma, embeds, pooled, guidance), x, sigma)
            by_guidance.setdefault(guidance, []).append(ours)
    # the guidance embedding acts, and ComfyUI takes 3.5 when the conditioning has no guidance
    assert (by_guidance[6.0][0] - by_guidance[F.FLUX_GUIDANCE][0]).abs().max() > 1e-3 * by_guidance[6.0][0].abs().max()
    default = comfy_velocity(model, x, SIGMAS[0], F.comfy_flow_conditioning(embeds, pooled))
    assert torch.equal(default, by_guidance[F.FLUX_GUIDANCE][0])


def test_flux_schnell_velocity_matches_diffusers(comfyui_path):
    schnell = F.tiny_diffusers_flux(seed=2, guidance_embeds=False)
    model = F.comfy_flux_from_diffusers(schnell)
    embeds, pooled = F.flux_prompt(3)
    x = latent(1, size=32)
    assert_close(comfy_velocity(model, x, 0.6, F.comfy_flow_conditioning(embeds, pooled)),
                 diffusers_flux_velocity(schnell, x, 0.6, embeds, pooled), x, 0.6)


@pytest.mark.parametrize("name, dims", [("DITest_TinySD3Checkpoint", (F.SD3_CONTEXT_DIM, F.SD3_POOLED_DIM)),
                                        ("DITest_TinyFluxCheckpoint", (F.FLUX_CONTEXT_DIM, F.FLUX_POOLED_DIM))])
def test_checkpoint_stand_ins_work_through_comfy_nodes(comfyui_path, name, dims):
    """CLIPTextEncode on the tiny CLIP gives conditioning the tiny model takes; the VAE round-trips a 64x64 image
    through a [1, 16, 8, 8] latent that the model takes too (in its latent space), and KSampler samples it."""
    import comfy.sd
    import nodes

    model, clip, vae = F.FLOW_TEST_NODES[name]().make()
    assert isinstance(clip, comfy.sd.CLIP) and isinstance(vae, comfy.sd.VAE)
    assert n_params(clip.cond_stage_model) < CLIP_MAX_PARAMS

    (conditioning,) = nodes.CLIPTextEncode().encode(clip, "a photo of a cat")
    embeds, extra = conditioning[0]
    assert embeds.shape[0] == 1 and embeds.shape[2] == dims[0] and extra["pooled_output"].shape == (1, dims[1])
    assert embeds.abs().max() > 0 and extra["pooled_output"].abs().max() > 0

    image = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(0))
    (samples,) = nodes.VAEEncode().encode(vae, image)
    assert samples["samples"].shape == (1, F.LATENT_CHANNELS, 8, 8)
    (decoded,) = nodes.VAEDecode().decode(vae, samples)
    assert decoded.shape == image.shape and torch.isfinite(decoded).all()

    x = model.model.process_latent_in(samples["samples"])
    v = comfy_velocity(model, x, 0.6, conditioning)
    assert v.shape == x.shape and torch.isfinite(v).all() and v.abs().max() > 0

    (negative,) = nodes.CLIPTextEncode().encode(clip, "")
    (sampled,) = nodes.KSampler().sample(model, 0, 2, 2.0, "euler", "simple", conditioning, negative, samples,
                                         denoise=0.8)
    assert sampled["samples"].shape == samples["samples"].shape and torch.isfinite(sampled["samples"]).all()
