"""The ComfyUI adapter on a tiny SD1.5-family ComfyUI model, and agreement with the diffusers adapter."""
from __future__ import annotations

import pytest
import torch

import di_testing as T


def raw_latent(model, z0):
    """The LATENT samples (raw VAE scale) whose model-space latent is z0."""
    return model.model.process_latent_out(z0)


@pytest.fixture(scope="module")
def inverted(comfy_backend, model, conds):
    z0 = T.image_like_latent()
    latent = raw_latent(model, z0)
    with torch.inference_mode():  # as inside ComfyUI's executor
        out = comfy_backend.invert(model, latent, conds["source"], conds["negative"], steps=50)
    return latent, out


@pytest.mark.parametrize("cfg", [1.0, 7.5])
def test_source_reconstruction_is_exact(comfy_backend, model, conds, inverted, cfg):
    latent, inv = inverted
    with torch.inference_mode():
        out = comfy_backend.direct_inversion(model, inv.inversion, conds["target"], conds["negative"], cfg=cfg)
        both = comfy_backend.direct_inversion(model, inv.inversion, conds["source"], conds["negative"], cfg=cfg,
                                              offsets="both")
    assert (out.source - latent).abs().max().item() <= 1e-5
    assert (both.edited - latent).abs().max().item() <= 1e-5
    assert ((out.edited - latent) ** 2).mean() > 1e-3 * latent.var()
    assert out.offsets.offsets.shape == (50,) + tuple(latent.shape)


def test_batch_of_two_images(comfy_backend, model, conds):
    z0 = torch.cat([T.image_like_latent(seed=4), T.image_like_latent(seed=5)])
    latent = raw_latent(model, z0)
    with torch.inference_mode():
        inv = comfy_backend.invert(model, latent, conds["source"], conds["negative"], steps=10)
        out = comfy_backend.direct_inversion(model, inv.inversion, conds["target"], conds["negative"], cfg=7.5)
    assert out.edited.shape == latent.shape
    assert (out.source - latent).abs().max().item() <= 1e-5


@pytest.mark.parametrize("v_prediction", [False, True])
def test_backends_agree(comfy_backend, diffusers_backend, tiny_unet, conds, v_prediction):
    """Same weights (ComfyUI's ldm <-> diffusers key map), same inversion and edit to float tolerance."""
    model = T.comfy_model_from_diffusers(tiny_unet, v_prediction=v_prediction)
    scheduler = T.sd_scheduler("v_prediction" if v_prediction else "epsilon")
    z0 = T.image_like_latent()
    embeds = {name: c[0][0] for name, c in conds.items()}
    with torch.inference_mode():
        inv_c = comfy_backend.invert(model, raw_latent(model, z0), conds["source"], conds["negative"], steps=25)
        out_c = comfy_backend.direct_inversion(model, inv_c.inversion, conds["target"], conds["negative"], cfg=7.5)
    inv_d = diffusers_backend.invert(tiny_unet, scheduler, z0, embeds["source"], steps=25)
    out_d = diffusers_backend.edit(tiny_unet, scheduler, inv_d, embeds["target"], embeds["negative"], cfg=7.5)

    def rel(a, b):
        return ((a - b).norm() / b.norm()).item()

    assert inv_c.inversion.timesteps == inv_d.timesteps
    assert rel(inv_c.inversion.z_star, inv_d.z_star) < 1e-5
    assert rel(model.model.process_latent_in(out_c.edited), out_d.edited) < 1e-4
    assert rel(model.model.process_latent_in(out_c.source), out_d.source) < 1e-5


def test_weight_patches_applied_upstream_act(comfy_backend, tiny_unet, conds):
    """LoRA reaches the model as ModelPatcher weight patches: inversion must see the patched weights."""
    z0 = T.image_like_latent()
    key = "diffusion_model.out.2.weight"
    delta = 0.5 * torch.randn(tiny_unet.conv_out.weight.shape, generator=torch.Generator().manual_seed(9))

    patched = T.comfy_model_from_diffusers(tiny_unet).clone()
    patched.add_patches({key: (delta,)}, strength_patch=1.0)
    baked = T.comfy_model_from_diffusers(tiny_unet)
    with torch.no_grad():
        baked.model.diffusion_model.out[2].weight += delta
    plain = T.comfy_model_from_diffusers(tiny_unet)

    with torch.inference_mode():
        results = [comfy_backend.invert(m, raw_latent(m, z0), conds["source"], conds["negative"], steps=10)
                   .inversion.z_star for m in (patched, baked, plain)]
    assert torch.allclose(results[0], results[1], atol=1e-5)
    assert not torch.allclose(results[0], results[2], atol=1e-3)


def test_z_T_and_sigmas_chain_into_comfyui_samplers(comfy_backend, model, conds, inverted):
    """Invert's LATENT and SIGMAS outputs drive ComfyUI's own euler sampler to the DDIM reconstruction."""
    import comfy.sample
    import comfy.samplers

    latent, inv = inverted
    with torch.inference_mode():
        baseline = comfy_backend.direct_inversion(model, inv.inversion, conds["source"], conds["negative"], cfg=1.0,
                                                  offsets="off").source
        sampler = comfy.samplers.sampler_object("euler")
        chained = comfy.sample.sample_custom(model, torch.zeros_like(inv.z_T), 1.0, sampler, inv.sampling_sigmas,
                                             conds["source"], conds["negative"], inv.z_T, seed=0)
    # ComfyUI's samplers end in k-diffusion scaling at the last sigma: x = z * sqrt(1 + sigma^2)
    scale = (1.0 + float(inv.sampling_sigmas[-1]) ** 2) ** 0.5
    assert torch.allclose(chained / scale, baseline, atol=1e-4)


def test_errors_name_the_problem_and_leave_nothing_patched(comfy_backend, model, conds, inverted, tiny_unet):
    latent, inv = inverted
    options_before = repr(model.model_options)
    patches_before = dict(model.patches)
    with torch.inference_mode():
        with pytest.raises(ValueError, match="at least 1"):
            comfy_backend.invert(model, latent, conds["source"], conds["negative"], steps=0)
        nan_latent = latent.clone()
        nan_latent[0, 0, 0, 0] = float("nan")
        with pytest.raises(ValueError, match="latent to invert contains 1 NaN"):
            comfy_backend.invert(model, nan_latent, conds["source"], conds["negative"], steps=5)
        with pytest.raises(ValueError, match=r"shape \(2, 4, 16, 16\).*\(1, 4, 16, 16\)"):
            comfy_backend.direct_inversion(model, inv.inversion, conds["target"], conds["negative"],
                                           target_start=torch.zeros(2, 4, 16, 16))
        v_model = T.comfy_model_from_diffusers(tiny_unet, v_prediction=True)
        with pytest.raises(ValueError, match="made with a 'SD15/EPS' model but is used with a 'SD15/V_PREDICTION'"):
            comfy_backend.direct_inversion(v_model, inv.inversion, conds["target"], conds["negative"])

        import comfy.model_sampling

        class Flow(comfy.model_sampling.ModelSamplingDiscreteFlow, comfy.model_sampling.CONST):
            pass

        flow = model.clone()
        flow.add_object_patch("model_sampling", Flow(model.model.model_config))
        with pytest.raises(ValueError, match="discrete-timestep eps- or v-prediction model"):
            comfy_backend.invert(flow, latent, conds["source"], conds["negative"], steps=5)

        wrong = T.comfy_conditioning(torch.randn(1, T.TOKENS, 7))
        with pytest.raises(ValueError,
                           match="target conditioning has width 7 but this model's cross-attention expects 32"):
            comfy_backend.direct_inversion(model, inv.inversion, wrong, conds["negative"])

        # an interrupt inside the sampling loop unwinds ComfyUI's set-up
        import comfy.model_management

        comfy.model_management.interrupt_current_processing(True)
        try:
            with pytest.raises(comfy.model_management.InterruptProcessingException):
                comfy_backend.direct_inversion(model, inv.inversion, conds["target"], conds["negative"])
        finally:
            comfy.model_management.interrupt_current_processing(False)
        after = comfy_backend.direct_inversion(model, inv.inversion, conds["target"], conds["negative"], cfg=7.5)
        again = comfy_backend.direct_inversion(model, inv.inversion, conds["target"], conds["negative"], cfg=7.5)
    assert repr(model.model_options) == options_before
    assert dict(model.patches) == patches_before
    assert torch.equal(after.edited, again.edited)
    assert (after.source - latent).abs().max().item() <= 1e-5


def test_sdxl_family(comfy_backend):
    """SDXL: pooled output and size conditioning go through ComfyUI's extra_conds; reconstruction is exact."""
    model = T.tiny_comfy_sdxl()
    z0 = T.image_like_latent()
    latent = raw_latent(model, z0)
    conds = [T.sdxl_conditioning(seed) for seed in (1, 2, 3)]
    with torch.inference_mode():
        inv = comfy_backend.invert(model, latent, conds[0], conds[2], steps=10)
        out = comfy_backend.direct_inversion(model, inv.inversion, conds[1], conds[2], cfg=7.5)
        plain = comfy_backend.direct_inversion(model, inv.inversion, conds[1], conds[2], cfg=7.5, offsets="off")
    assert inv.inversion.model_family == "SDXL/EPS"
    assert (out.source - latent).abs().max().item() <= 1e-5
    assert (plain.source - latent).abs().max().item() > 1e-3  # the offsets did the work
    sd15 = T.comfy_model_from_diffusers(T.tiny_diffusers_unet())
    with pytest.raises(ValueError, match="made with a 'SDXL/EPS' model but is used with a 'SD15/EPS' model"):
        comfy_backend.direct_inversion(sd15, inv.inversion, conds[1], conds[2])


@pytest.mark.parametrize("method", ["null_text", "negative_prompt", "edict"])
def test_sdxl_methods(comfy_backend, method):
    """Null-text optimises only the cross-attention context (SDXL's pooled output stays the negative's)."""
    model = T.tiny_comfy_sdxl()
    z0 = T.image_like_latent()
    latent = raw_latent(model, z0)
    conds = [T.sdxl_conditioning(seed) for seed in (1, 2, 3)]
    options = {"inner_steps": 2} if method == "null_text" else ({"interpolation": 0.5} if method == "negative_prompt" else None)
    with torch.inference_mode():
        inv = comfy_backend.invert(model, latent, conds[0], conds[2], steps=6, method=method, options=options)
        out = comfy_backend.direct_inversion(model, inv.inversion, conds[1], conds[2], cfg=7.5)
    assert torch.isfinite(out.edited).all()
    assert (model.model.process_latent_in(out.source) - z0).abs().max().item() <= 1e-5
