"""Direct Inversion on flow-matching models (SD3/SD3.5, Flux): the schedule/step seam, exact reconstruction, the
convergence order of Euler and RF-Solver inversion, agreement of the ComfyUI and diffusers adapters on the same
weights, wrong-family errors, saved inversions and Cancel, on the tiny random-weight models of ``flow_testing``."""
from __future__ import annotations

import math

import pytest
import torch

import di_testing as T
import flow_testing as F

STEPS = 8
FAMILIES = {"sd3": (F.tiny_diffusers_sd3, F.sd3_scheduler, F.sd3_prompt),
            "flux": (F.tiny_diffusers_flux, F.flux_scheduler, F.flux_prompt)}


def flow_latent(batch: int = 1, size: int = 16, seed: int = 1) -> torch.Tensor:
    """A 16-channel model-space latent with an image's spatial correlation (smoothed noise)."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(batch, F.LATENT_CHANNELS, size, size, generator=g)
    return torch.nn.functional.avg_pool2d(noise, 3, stride=1, padding=1) * 2.0


def build(kind: str, out_scale: float = F.OUT_SCALE, dtype=torch.float32) -> dict:
    make, scheduler, prompt = FAMILIES[kind]
    s = {"kind": kind, "model": make(out_scale=out_scale).to(dtype), "scheduler": scheduler(),
         "z0": flow_latent().to(dtype)}
    for name, seed in (("source", 1), ("target", 2), ("null", 3)):
        s[name] = tuple(t.to(dtype) for t in prompt(seed))
    return s


@pytest.fixture(scope="module", params=list(FAMILIES))
def flow(request, diffusers_backend):
    return build(request.param)


def rms(a: torch.Tensor) -> float:
    return a.float().pow(2).mean().sqrt().item()


# -- the seam ----------------------------------------------------------------------------------------------------


def test_vp_step_is_euler_on_the_denoiser_derivative(core):
    """The DDIM step of the VP latent z is Euler in k-diffusion's x = z sqrt(1 + sigma^2) on (x - D)/sigma = eps; the
    flow step is Euler on the velocity (x is the latent)."""
    g = torch.Generator().manual_seed(0)
    z, eps = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64), torch.randn(2, 4, 8, 8, generator=g,
                                                                                     dtype=torch.float64)
    for sigma, sigma_to in ((2.0, 0.5), (0.3, 4.0)):
        x = z * math.sqrt(1 + sigma ** 2)
        euler = x + (sigma_to - sigma) * eps  # k-diffusion Euler with d = (x - D)/sigma = eps
        stepped = core.VP.step(z, eps, sigma, sigma_to) * math.sqrt(1 + sigma_to ** 2)
        assert torch.allclose(stepped, euler, atol=1e-12)
        denoised = x - sigma * eps
        assert torch.allclose(core.VP.denoised(z, eps, sigma), denoised, atol=1e-12)
    assert torch.allclose(core.FLOW.step(z, eps, 0.8, 0.5), z - 0.3 * eps, atol=1e-12)
    assert torch.allclose(core.FLOW.denoised(z, eps, 0.8), z - 0.8 * eps)


def test_flow_schedule_is_comfyuis_simple_schedule(core):
    """Ascending: 0, then the training levels ComfyUI's simple scheduler picks (every n/steps-th from the top)."""
    train = torch.linspace(0.001, 1.0, 1000, dtype=torch.float64)
    sigmas, timesteps = core.flow_sigmas(train, 8)
    assert sigmas[0] == 0 and sigmas[-1] == train[-1]
    assert timesteps == [124, 249, 374, 499, 624, 749, 874, 999]
    assert torch.equal(sigmas[1:], train[timesteps])
    with pytest.raises(ValueError, match="at least 1"):
        core.flow_sigmas(train, 0)


def test_methods_per_family(core):
    assert core.methods_for(core.VP) == ("ddim", "null_text", "negative_prompt", "edict")
    assert core.methods_for(core.FLOW) == ("null_text", "negative_prompt", "euler", "rf_solver")
    with pytest.raises(ValueError, match="edict inversion needs a discrete-timestep.*choose one of: null_text, "
                                         "negative_prompt, euler, rf_solver"):
        core.method_named("edict").check_space(core.FLOW)
    with pytest.raises(ValueError, match="euler inversion needs a flow-matching model"):
        core.method_named("euler").check_space(core.VP)


# -- diffusers ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["euler", "rf_solver", "negative_prompt"])
def test_source_reconstruction_is_exact(diffusers_backend, flow, method):
    """Direct Inversion's source branch ends at the input latent to float rounding at guidance 1 and at the
    family's default (SD3: CFG 4.5 with a negative; Flux dev: CFG 1 with embedded guidance 3.5, and 1)."""
    s, d = flow, diffusers_backend
    settings = [(1.0, None), (4.5, None)] if s["kind"] == "sd3" else [(1.0, 1.0), (1.0, 3.5)]
    for cfg, guidance in settings:
        inv = d.invert(s["model"], s["scheduler"], s["z0"], s["source"], s["null"], steps=STEPS, method=method,
                       flux_guidance=guidance)
        assert inv.space == "flow" and inv.z_star.shape == (STEPS + 1,) + tuple(s["z0"].shape)
        out = d.edit(s["model"], s["scheduler"], inv, s["target"], s["null"], cfg=cfg, flux_guidance=guidance)
        assert (out.source - s["z0"]).abs().max().item() <= 1e-5
        assert rms(out.edited - s["z0"]) > 1e-3  # the target prompt edits
        both = d.edit(s["model"], s["scheduler"], inv, s["source"], s["null"], cfg=cfg, offsets="both",
                      flux_guidance=guidance)
        assert (both.edited - s["z0"]).abs().max().item() <= 1e-5  # identity edit with offsets on both branches
        off = d.edit(s["model"], s["scheduler"], inv, s["target"], s["null"], cfg=cfg, offsets="off",
                     flux_guidance=guidance)
        if method != "rf_solver":  # (RF-Solver's round trip is near rounding on this smooth model)
            assert (off.source - s["z0"]).abs().max().item() > 1e-5  # the offsets did the work


def test_flux_guidance_embedding_is_honoured(diffusers_backend):
    s, d = build("flux"), diffusers_backend
    inv = d.invert(s["model"], s["scheduler"], s["z0"], s["source"], steps=STEPS, method="euler", flux_guidance=2.0)
    assert inv.conditioning[0][1]["guidance"] == 2.0
    edits = [d.edit(s["model"], s["scheduler"], inv, s["target"], None, cfg=1.0, flux_guidance=g).edited
             for g in (1.0, 3.5, None)]
    assert rms(edits[0] - edits[1]) > 1e-4
    assert torch.equal(edits[1], edits[2])  # 3.5 is the default, as in ComfyUI


def test_negative_prompt_reconstructs_at_any_guidance_without_offsets(diffusers_backend):
    """SD3 with the source prompt as the negative: the guided source prediction is the conditional one, so the
    round trip at CFG 7 is the round trip at guidance 1; Euler with an empty negative drifts far more."""
    s, d = build("sd3"), diffusers_backend
    npi = d.invert(s["model"], s["scheduler"], s["z0"], s["source"], s["null"], steps=STEPS, method="negative_prompt")
    euler = d.invert(s["model"], s["scheduler"], s["z0"], s["source"], s["null"], steps=STEPS, method="euler")
    at_1 = d.edit(s["model"], s["scheduler"], euler, s["source"], s["null"], cfg=1.0, offsets="off").source
    np_7 = d.edit(s["model"], s["scheduler"], npi, s["source"], s["null"], cfg=7.0, offsets="off").source
    euler_7 = d.edit(s["model"], s["scheduler"], euler, s["source"], s["null"], cfg=7.0, offsets="off").source
    assert torch.allclose(np_7, at_1, atol=1e-6)
    assert rms(euler_7 - s["z0"]) > 5 * rms(np_7 - s["z0"])


def test_null_text_on_sd3(diffusers_backend):
    """Null-text falls out of the shared code: the unconditional context of each step is optimised (the pooled vector
    stays the null prompt's) and the optimised CFG round trip beats plain Euler's at the same guidance."""
    s, d = build("sd3"), diffusers_backend
    options = {"inner_steps": 10, "guidance": 4.5, "early_stop": 0.0, "early_stop_slope": 0.0, "lr": 0.5}
    nt = d.invert(s["model"], s["scheduler"], s["z0"], s["source"], s["null"], steps=STEPS, method="null_text",
                  options=options)
    euler = d.invert(s["model"], s["scheduler"], s["z0"], s["source"], s["null"], steps=STEPS, method="euler")
    assert nt.extras["null_embeddings"].shape == (STEPS,) + tuple(s["null"][0].shape)
    nt_off = d.edit(s["model"], s["scheduler"], nt, s["source"], s["null"], cfg=4.5, offsets="off").source
    euler_off = d.edit(s["model"], s["scheduler"], euler, s["source"], s["null"], cfg=4.5, offsets="off").source
    losses = nt.extras["null_text_losses"]
    assert (losses[:, -1] < losses[:, 0]).all()  # every step's optimisation lowered its loss
    assert rms(nt_off - s["z0"]) < 0.8 * rms(euler_off - s["z0"])  # (the tiny model's context acts weakly)
    flux = build("flux")
    with pytest.raises(ValueError, match="Flux is guidance-distilled"):
        d.invert(flux["model"], flux["scheduler"], flux["z0"], flux["source"], flux["null"], steps=2,
                 method="null_text")


def test_convergence_order(diffusers_backend):
    """The round trip (invert, sample back with offsets off, guidance 1) of Euler inversion errs like 1/steps (first
    order); RF-Solver's errs faster (second-order steps; their round trip cancels to third order). Float64, with a
    velocity large enough (output scale 1) for the error to stay above rounding at 32 steps."""
    d = diffusers_backend
    slopes = {}
    for kind in FAMILIES:
        s = build(kind, out_scale=1.0, dtype=torch.float64)
        for method in ("euler", "rf_solver"):
            errors = []
            for steps in (4, 8, 16, 32):
                inv = d.invert(s["model"], s["scheduler"], s["z0"], s["source"], steps=steps, method=method)
                out = d.edit(s["model"], s["scheduler"], inv, s["source"], None, cfg=1.0, offsets="off")
                errors.append(rms(out.source - s["z0"]))
            fit = [math.log2(b / a) for a, b in zip(errors, errors[1:])]
            slopes[kind, method] = (errors, fit)
    print({k: (["%.2e" % e for e in v[0]], ["%.2f" % f for f in v[1]]) for k, v in slopes.items()})
    for kind in FAMILIES:
        euler, rf = slopes[kind, "euler"], slopes[kind, "rf_solver"]
        assert all(-1.2 < f < -0.8 for f in euler[1][1:]), euler
        assert all(f < -1.9 for f in rf[1]), rf
        assert all(r < e / 20 for r, e in zip(rf[0], euler[0]))


def test_wrong_family_is_refused(diffusers_backend, tiny_unet, flow):
    s, d = flow, diffusers_backend
    unet_inversion = d.invert(tiny_unet, T.sd_scheduler(), T.image_like_latent(), T.prompt_embeds(1), steps=4)
    with pytest.raises(ValueError, match=r"made with a diffusion UNet .* cannot be used with a flow-matching model"):
        d.edit(s["model"], s["scheduler"], unet_inversion, s["target"], None, cfg=1.0)
    flow_inversion = d.invert(s["model"], s["scheduler"], s["z0"], s["source"], steps=4, method="euler")
    with pytest.raises(ValueError, match=r"made with a flow-matching model .* cannot be used with a diffusion UNet"):
        d.edit(tiny_unet, T.sd_scheduler(), flow_inversion, T.prompt_embeds(2), T.prompt_embeds(3))
    for method in ("ddim", "edict"):
        with pytest.raises(ValueError, match=f"{method} inversion needs a discrete-timestep"):
            d.invert(s["model"], s["scheduler"], s["z0"], s["source"], s["null"], steps=4, method=method)
    with pytest.raises(ValueError, match="euler inversion needs a flow-matching model"):
        d.invert(tiny_unet, T.sd_scheduler(), T.image_like_latent(), T.prompt_embeds(1), steps=4, method="euler")
    with pytest.raises(ValueError, match="pooled prompt embeddings"):
        d.invert(s["model"], s["scheduler"], s["z0"], s["source"][0], steps=4, method="euler")
    with pytest.raises(ValueError, match="not DDIMScheduler"):
        d.invert(s["model"], T.sd_scheduler(), s["z0"], s["source"], steps=4, method="euler")
    with pytest.raises(ValueError, match="does not work on SD3/Flux's joint attention"):
        d.edit(s["model"], s["scheduler"], flow_inversion, s["target"], None, cfg=1.0,
               editor=object())


def test_saved_flow_inversion_keeps_its_family(diffusers_backend, storage_module, tmp_path):
    s, d = build("flux"), diffusers_backend
    inv = d.invert(s["model"], s["scheduler"], s["z0"], s["source"], steps=4, method="rf_solver", flux_guidance=2.5)
    path = tmp_path / "flux.safetensors"
    storage_module.save_inversion(inv, str(path))
    loaded = storage_module.load_inversion(str(path))
    assert loaded.space == "flow" and loaded.method == "rf_solver"
    assert loaded.conditioning[0][1]["guidance"] == 2.5
    assert torch.equal(loaded.z_star, inv.z_star)
    a = d.edit(s["model"], s["scheduler"], inv, s["target"], None, cfg=1.0)
    b = d.edit(s["model"], s["scheduler"], loaded, s["target"], None, cfg=1.0)
    assert torch.equal(a.edited, b.edited)


@pytest.fixture(scope="module")
def storage_module(pack):
    from comfyui_direct_inversion.inversion import storage

    return storage


# -- ComfyUI --------------------------------------------------------------------------------------------------------


def comfy_flow(kind: str, transformer):
    """The ComfyUI model with ``transformer``'s weights; Flux with ComfyUI's ModelSamplingFlux node set for a 128x128
    image (the shift FluxPipeline computes for that size, so both backends sample the same levels)."""
    if kind == "sd3":
        return F.comfy_sd3_from_diffusers(transformer)
    from comfy_extras.nodes_model_advanced import ModelSamplingFlux

    model = F.comfy_flux_from_diffusers(transformer)
    patched = ModelSamplingFlux().patch(model, max_shift=1.15, base_shift=0.5, width=128, height=128)
    return patched[0] if isinstance(patched, tuple) else patched.result[0]


def comfy_conds(s: dict, guidance=None) -> dict:
    return {name: F.comfy_flow_conditioning(*s[name], guidance=guidance) for name in ("source", "target", "null")}


@pytest.mark.parametrize("kind,method", [(kind, method) for kind in FAMILIES
                                         for method in ("euler", "rf_solver", "negative_prompt", "null_text")
                                         if (kind, method) != ("flux", "null_text")])
def test_backends_agree(comfy_backend, diffusers_backend, kind, method):
    """Same weights, same inversion and edit through ComfyUI's guider and through diffusers, to float tolerance."""
    s = build(kind)
    model = comfy_flow(kind, s["model"])
    cfg, guidance = (4.5, None) if kind == "sd3" else (1.0, 3.0)
    conds = comfy_conds(s, guidance)
    options = {"inner_steps": 2, "guidance": cfg} if method == "null_text" else None
    with torch.inference_mode():
        latent = model.model.process_latent_out(s["z0"])
        inv_c = comfy_backend.invert(model, latent, conds["source"], conds["null"], steps=STEPS, method=method,
                                     options=options)
        out_c = comfy_backend.direct_inversion(model, inv_c.inversion, conds["target"], conds["null"], cfg=cfg)
        off_c = comfy_backend.direct_inversion(model, inv_c.inversion, conds["target"], conds["null"], cfg=cfg,
                                               offsets="off")
    inv_d = diffusers_backend.invert(s["model"], s["scheduler"], s["z0"], s["source"], s["null"], steps=STEPS,
                                     method=method, options=options, flux_guidance=guidance)
    out_d = diffusers_backend.edit(s["model"], s["scheduler"], inv_d, s["target"], s["null"], cfg=cfg,
                                   flux_guidance=guidance)
    off_d = diffusers_backend.edit(s["model"], s["scheduler"], inv_d, s["target"], s["null"], cfg=cfg, offsets="off",
                                   flux_guidance=guidance)

    def rel(a, b):
        return ((a - b).norm() / b.norm()).item()

    inversion = inv_c.inversion
    assert inversion.space == "flow" and inversion.model_family == ("SD3/FLOW" if kind == "sd3" else "Flux/FLOW")
    assert inversion.timesteps == [t * (10 if kind == "flux" else 1) + (9 if kind == "flux" else 0)
                                   for t in inv_d.timesteps]  # ComfyUI's Flux has 10000 levels, diffusers' 1000
    assert torch.allclose(inversion.sigmas, inv_d.sigmas, rtol=1e-6, atol=0)
    assert rel(inversion.z_star, inv_d.z_star) < 1e-5
    edited_c = model.model.process_latent_in(out_c.edited)
    assert rel(edited_c, out_d.edited) < 1e-4
    assert rel(model.model.process_latent_in(off_c.source), off_d.source) < 1e-4
    assert (out_c.source - latent).abs().max().item() <= 1e-5
    if method == "null_text":
        assert rel(inversion.extras["null_embeddings"], inv_d.extras["null_embeddings"]) < 1e-4


def test_comfyui_wrong_family_saved_files_and_cancel(comfy_backend, model, conds, tmp_path):
    """A VP inversion with a flow model and the reverse are refused with the families named; a saved flow inversion
    keeps its family; an interrupt between steps unwinds and leaves the model unpatched."""
    import comfy.model_management

    from comfyui_direct_inversion.inversion.storage import load_inversion, save_inversion
    from comfyui_direct_inversion.nodes.inversion_nodes import check_loaded

    s = build("sd3")
    sd3 = comfy_flow("sd3", s["model"])
    flow_conds = comfy_conds(s)
    with torch.inference_mode():
        latent = sd3.model.process_latent_out(s["z0"])
        flow_inv = comfy_backend.invert(sd3, latent, flow_conds["source"], flow_conds["null"], steps=4,
                                        method="euler").inversion
        vp_inv = comfy_backend.invert(model, model.model.process_latent_out(T.image_like_latent()), conds["source"],
                                      conds["negative"], steps=4).inversion
        with pytest.raises(ValueError, match=r"made with a diffusion UNet .*'SD15/EPS'.* cannot be used with a "
                                             r"flow-matching model .*'SD3/FLOW'"):
            comfy_backend.direct_inversion(sd3, vp_inv, flow_conds["target"], flow_conds["null"])
        with pytest.raises(ValueError, match=r"made with a flow-matching model .*'SD3/FLOW'.* cannot be used with a "
                                             r"diffusion UNet"):
            comfy_backend.direct_inversion(model, flow_inv, conds["target"], conds["negative"])
        with pytest.raises(ValueError, match="ddim inversion needs a discrete-timestep"):
            comfy_backend.invert(sd3, latent, flow_conds["source"], flow_conds["null"], steps=4, method="ddim")
        flux = comfy_flow("flux", F.tiny_diffusers_flux())
        with pytest.raises(ValueError, match="Flux is guidance-distilled"):
            comfy_backend.invert(flux, torch.zeros(1, 16, 8, 8), flow_conds["source"], flow_conds["null"], steps=2,
                                 method="null_text")

        path = tmp_path / "sd3.safetensors"
        save_inversion(flow_inv, str(path))
        loaded = load_inversion(str(path))
        assert loaded.space == "flow"
        check_loaded(loaded, sd3, "sd3.safetensors")
        with pytest.raises(ValueError, match="made with a flow-matching model"):
            check_loaded(loaded, model, "sd3.safetensors")

        options_before, patches_before = repr(sd3.model_options), dict(sd3.patches)
        calls = []

        def interrupt_after_two(apply_model, args):
            calls.append(1)
            if len(calls) == 2:
                comfy.model_management.interrupt_current_processing(True)
            return apply_model(args["input"], args["timestep"], **args["c"])

        wrapped = sd3.clone()
        wrapped.set_model_unet_function_wrapper(interrupt_after_two)
        try:
            with pytest.raises(comfy.model_management.InterruptProcessingException):
                comfy_backend.direct_inversion(wrapped, loaded, flow_conds["target"], flow_conds["null"], cfg=4.5)
        finally:
            comfy.model_management.interrupt_current_processing(False)
        assert len(calls) == 2  # stopped at the next step's check, before any further evaluation
        after = comfy_backend.direct_inversion(sd3, loaded, flow_conds["target"], flow_conds["null"], cfg=4.5)
    assert repr(sd3.model_options) == options_before and dict(sd3.patches) == patches_before
    assert (after.source - latent).abs().max().item() <= 1e-5


def run_with_ticks(graph: dict):
    """Run an API prompt that must succeed through ComfyUI's executor; returns it and the progress ticks (value,
    total) of the run."""
    import comfy.utils
    from test_comfyui_executor import run_prompt

    ticks = []
    comfy.utils.set_progress_bar_global_hook(lambda value, total, preview, node_id=None: ticks.append((value, total)))
    try:
        executor, _, validation = run_prompt(graph)
    finally:
        comfy.utils.set_progress_bar_global_hook(None)
    assert validation[0], validation
    assert "execution_success" in [e for e, _ in executor.status_messages], executor.status_messages[-2:]
    return executor, ticks


@pytest.mark.parametrize("kind", list(FAMILIES))
def test_executor_inverts_and_edits_flow_checkpoints(comfy_env, every_progress_tick, kind):
    """Through ComfyUI's executor, from a checkpoint loader's stand-in and real text encoding (Flux: through
    FluxGuidance): Invert (rf_solver) and the Direct Inversion Sampler reconstruct the VAE's latent exactly, one
    progress tick per step on each node."""
    from test_comfyui_executor import output_of

    checkpoint = "DITest_TinySD3Checkpoint" if kind == "sd3" else "DITest_TinyFluxCheckpoint"
    source_in, target_in = (["11", 0], ["12", 0]) if kind == "flux" else (["4", 0], ["5", 0])  # Flux: FluxGuidance
    graph = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "di_test.png"}},
        "2": {"class_type": checkpoint, "inputs": {}},
        "3": {"class_type": "VAEEncode", "inputs": {"pixels": ["1", 0], "vae": ["2", 2]}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"text": "a cat sitting on a bench", "clip": ["2", 1]}},
        "5": {"class_type": "CLIPTextEncode", "inputs": {"text": "a dog sitting on a bench", "clip": ["2", 1]}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["2", 1]}},
        "7": {"class_type": "DirectInversion_Invert",
              "inputs": {"model": ["2", 0], "latent": ["3", 0], "source": source_in, "negative": ["6", 0],
                         "method": "rf_solver", "steps": 5, "cfg": 1.0}},
        "8": {"class_type": "DirectInversion_Sampler",
              "inputs": {"model": ["2", 0], "inversion": ["7", 0], "target": target_in, "negative": ["6", 0],
                         "cfg": 4.5 if kind == "sd3" else 1.0, "offsets": "auto"}},
        "9": {"class_type": "VAEDecode", "inputs": {"samples": ["8", 0], "vae": ["2", 2]}},
        "10": {"class_type": "SaveImage", "inputs": {"images": ["9", 0], "filename_prefix": f"di_{kind}"}},
    }
    if kind == "flux":
        graph["11"] = {"class_type": "FluxGuidance", "inputs": {"conditioning": ["4", 0], "guidance": 3.5}}
        graph["12"] = {"class_type": "FluxGuidance", "inputs": {"conditioning": ["5", 0], "guidance": 3.5}}
    executor, ticks = run_with_ticks(graph)
    encoded = output_of(executor, "3", 0)["samples"]
    edited, source = output_of(executor, "8", 0)["samples"], output_of(executor, "8", 1)["samples"]
    assert encoded.shape[1] == 16
    assert (source - encoded).abs().max().item() <= 1e-5
    assert not torch.allclose(edited, encoded, atol=1e-3)
    inversion = output_of(executor, "7", 0)
    assert inversion.space == "flow" and inversion.method == "rf_solver"
    assert [v for v, t in ticks if t == 5] == list(range(1, 6)) * 2  # Invert's five steps, then the sampler's


@pytest.mark.parametrize("kind", list(FAMILIES))
def test_schedule_is_comfyuis_simple_scheduler_for_every_step_count(comfy_backend, kind):
    """Invert's levels are the ones KSampler's "simple" scheduler samples, for any step count (ComfyUI's own function,
    its floating-point stride included: at 38 of 1000 levels a k * n / steps stride would pick another level)."""
    import comfy.samplers

    model = comfy_flow(kind, FAMILIES[kind][0]())
    model_sampling = model.get_model_object("model_sampling")
    for steps in [1, 2, 7, 8, 28, 30, 38, 50, 76, 95, 132, 152, 190]:
        ours, _ = comfy_backend.schedule(model, steps)
        theirs = comfy.samplers.simple_scheduler(model_sampling, steps)
        assert torch.equal(ours.flip(0).to(torch.float32), theirs), steps


def test_comfyui_flow_checks_and_warnings(comfy_backend, caplog, tmp_path):
    """A prompt encoded for another model is refused by width on SD3 and Flux; CFG on Flux is warned about; a saved
    VP inversion keeps the fields earlier versions read (no "space"), a flow one records it."""
    import json

    from safetensors import safe_open

    from comfyui_direct_inversion.inversion.storage import save_inversion

    for kind in FAMILIES:
        s = build(kind)
        model = comfy_flow(kind, s["model"])
        conds = comfy_conds(s)
        wrong = F.comfy_flow_conditioning(torch.zeros(1, 4, 7), s["source"][1])
        with torch.inference_mode():
            latent = model.model.process_latent_out(s["z0"])
            with pytest.raises(ValueError, match="source conditioning has width 7 but this model's cross-attention "
                                                 "expects"):
                comfy_backend.invert(model, latent, wrong, conds["null"], steps=2, method="euler")
            inv = comfy_backend.invert(model, latent, conds["source"], conds["null"], steps=2, method="euler")
            caplog.clear()
            comfy_backend.direct_inversion(model, inv.inversion, conds["target"], conds["null"], cfg=2.0)
        warned = "Flux is guidance-distilled: cfg 2.00" in caplog.text
        assert warned == (kind == "flux")
    path = str(tmp_path / "space_check.safetensors")
    save_inversion(inv.inversion, path)
    with safe_open(path, framework="pt") as handle:
        assert json.loads(handle.metadata()["inversion"])["space"] == "flow"
    vp = T.comfy_model_from_diffusers(T.tiny_diffusers_unet())
    with torch.inference_mode():
        vp_inv = comfy_backend.invert(vp, vp.model.process_latent_out(T.image_like_latent()),
                                      T.comfy_conditioning(T.prompt_embeds(1)), T.comfy_conditioning(T.prompt_embeds(3)),
                                      steps=2).inversion
    save_inversion(vp_inv, path)
    with safe_open(path, framework="pt") as handle:
        assert "space" not in json.loads(handle.metadata()["inversion"])


def test_sd3_timestep_is_embedded_in_float32(diffusers_backend):
    """In half precision the diffusers SD3 path still passes the timestep in float32 (as the SD3 pipeline and ComfyUI
    embed it: bf16 would round 1000 sigma by up to 2)."""
    s = build("sd3")
    model = s["model"].to(torch.bfloat16)
    seen = []
    handle = model.register_forward_pre_hook(lambda m, args, kwargs: seen.append(kwargs["timestep"].dtype),
                                             with_kwargs=True)
    try:
        diffusers_backend.invert(model, s["scheduler"], s["z0"], s["source"], steps=2, method="euler")
    finally:
        handle.remove()
    assert seen and all(dtype == torch.float32 for dtype in seen)
