"""ComfyUI adapter: runs the core through ComfyUI's own sampling machinery.

Every prediction goes through ``CFGGuider`` (``sampling_function`` -> ``calc_cond_batch``) of a guider whose
``sample`` loads the models with ComfyUI's model management, processes the conditioning (ControlNet, areas,
masks, hooks), applies the model's wrappers and patches (LoRA, model patches, post-CFG functions) and cleans up
in ``finally``. The core only sees a Denoiser; the branch a call belongs to travels in
``transformer_options[BRANCH_OPTION]`` so that attention patches can tell the branches apart.

Latent conventions: ComfyUI's LATENT holds raw VAE latents; ``process_latent_in`` maps them to the model's
latent space, where the core works in VP scaling z. ComfyUI's samplers work in k-diffusion scaling
x = z * sqrt(1 + sigma^2); Invert's z_T LATENT output is in that scaling so it chains into KSampler /
SamplerCustom with noise disabled.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch

import comfy.model_management
import comfy.model_sampling
import comfy.samplers
import latent_preview

from ..inversion import (
    BRANCH_SOURCE,
    BRANCH_TARGET,
    Inversion,
    OffsetTrajectory,
    check_finite,
    ddim_sigmas,
    invert_ddim,
    sample_direct_inversion,
)

__all__ = ["BRANCH_OPTION", "DirectInversionOutput", "InvertOutput", "direct_inversion", "invert", "model_family"]

BRANCH_OPTION = "direct_inversion_branch"


def _model_sampling(model):
    return model.get_model_object("model_sampling")


def model_family(model) -> str:
    """Architecture and prediction type of a ModelPatcher, e.g. ``SD15/EPS``."""
    ms = _model_sampling(model)
    prediction = "V_PREDICTION" if isinstance(ms, comfy.model_sampling.V_PREDICTION) else "EPS"
    return f"{type(model.model.model_config).__name__}/{prediction}"


def _check_supported(model) -> None:
    ms = _model_sampling(model)
    discrete_vp = (isinstance(ms, comfy.model_sampling.ModelSamplingDiscrete)
                   and not isinstance(ms, comfy.model_sampling.ModelSamplingDiscreteEDM)
                   and isinstance(ms, comfy.model_sampling.EPS)
                   and not isinstance(ms, comfy.model_sampling.EDM))
    if not discrete_vp:
        raise ValueError(
            f"DDIM inversion needs a discrete-timestep eps- or v-prediction model (SD1.x, SD2.x, SDXL); "
            f"this model ({type(model.model.model_config).__name__}) samples with {type(ms).__name__}."
        )


def schedule(model, steps: int) -> tuple[torch.Tensor, list[int]]:
    """The model's DDIM trajectory noise levels (ascending) and timesteps for ``steps`` steps."""
    _check_supported(model)
    return ddim_sigmas(_model_sampling(model).sigmas, steps)


class BranchGuider(comfy.samplers.CFGGuider):
    """A CFGGuider with one positive conditioning per branch and a shared negative.

    ``primary`` names the branch stored under ComfyUI's "positive" key (ControlNet hints applied to the
    positive conditioning reach the negative through it, as in KSampler).
    """

    def __init__(self, model_patcher, branches: dict, negative, cfg: float, primary: str):
        super().__init__(model_patcher)
        self.branch_keys = {name: ("positive" if name == primary else name) for name in branches}
        self.primary = primary
        conds = {self.branch_keys[name]: cond for name, cond in branches.items()}
        conds["negative"] = negative
        self.inner_set_conds(conds)
        self.set_cfg(cfg)

    def predict_noise(self, x, timestep, model_options={}, seed=None):
        branch = model_options.get("transformer_options", {}).get(BRANCH_OPTION, self.primary)
        return comfy.samplers.sampling_function(self.inner_model, x, timestep, self.conds.get("negative", None),
                                                self.conds[self.branch_keys[branch]], self.cfg,
                                                model_options=model_options, seed=seed)


class ComfyDenoiser:
    """The core's Denoiser over a BranchGuider that is inside ``sample`` (models loaded, conds processed)."""

    def __init__(self, guider: BranchGuider, model_options: dict, seed):
        self.guider = guider
        self.seed = seed
        self.options = {}
        for branch in guider.branch_keys:
            options = dict(model_options)
            options["transformer_options"] = {**model_options.get("transformer_options", {}), BRANCH_OPTION: branch}
            self.options[branch] = options

    def __call__(self, z: torch.Tensor, sigma: torch.Tensor, branch: str) -> torch.Tensor:
        sigmas = sigma.expand(z.shape[0])
        x = z * (1.0 + sigma * sigma).sqrt()  # VP -> k-diffusion scaling
        denoised = self.guider(x, sigmas, model_options=self.options[branch], seed=self.seed)
        return (x - denoised) / sigma


class _CoreSampler(comfy.samplers.Sampler):
    """A SAMPLER that hands the guider to a core function, so CFGGuider.sample does all of ComfyUI's set-up."""

    def __init__(self, run: Callable[[ComfyDenoiser, torch.Tensor], torch.Tensor]):
        self.run = run

    def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None,
               disable_pbar=False):
        denoiser = ComfyDenoiser(model_wrap, extra_args["model_options"], extra_args.get("seed"))
        return self.run(denoiser, latent_image)


def _progress(model, steps: int, preview_key: str) -> Callable[[dict], None]:
    """Core callback -> ComfyUI progress bar, latent preview and interrupt check."""
    preview = latent_preview.prepare_callback(model, steps)

    def callback(info: dict) -> None:
        comfy.model_management.throw_exception_if_processing_interrupted()
        preview(info["i"], info[preview_key], None, info["steps"])

    return callback


def _check_conditioning(model, name: str, conditioning) -> None:
    if not isinstance(conditioning, list) or not all(isinstance(c, (list, tuple)) and len(c) == 2 for c in conditioning):
        raise TypeError(f"The {name} conditioning is not a ComfyUI CONDITIONING (a list of [tensor, dict] pairs).")
    width = model.model.model_config.unet_config.get("context_dim")
    for embeds, _ in conditioning:
        if width is not None and embeds.shape[-1] != width:
            raise ValueError(f"The {name} conditioning has width {embeds.shape[-1]} but this model's cross-attention "
                             f"expects {width}: encode the prompt with this model's CLIP.")


def _run(model, branches: dict, negative, cfg: float, primary: str, sigmas: torch.Tensor, shape, run,
         latent_image: Optional[torch.Tensor] = None) -> torch.Tensor:
    for name, conditioning in [*branches.items(), ("negative", negative)]:
        _check_conditioning(model, name, conditioning)
    guider = BranchGuider(model.clone(), branches, negative, cfg, primary)  # per-run options never reach the input
    noise = torch.zeros(shape)
    latent = noise if latent_image is None else latent_image
    sampling_sigmas = sigmas.flip(0).to(torch.float32)
    return guider.sample(noise, latent, _CoreSampler(run), sampling_sigmas, disable_pbar=True, seed=0)


def _k_scale(sigma: float) -> float:
    return math.sqrt(1.0 + sigma * sigma)


@dataclass
class InvertOutput:
    inversion: Inversion
    z_T: torch.Tensor  # LATENT samples, k-diffusion scaling at sigmas[-1], for KSampler / SamplerCustom
    sampling_sigmas: torch.Tensor  # descending, without the zero-length last step


def invert(model, latent: torch.Tensor, positive, negative, steps: int = 50, cfg: float = 1.0) -> InvertOutput:
    """DDIM-invert a LATENT's samples with a ComfyUI model (reference defaults: 50 steps, guidance 1)."""
    check_finite("latent to invert", latent)
    sigmas, timesteps = schedule(model, steps)
    held = {}

    def run(denoiser, latent_image):
        z_star = invert_ddim(denoiser, latent_image, sigmas, callback=_progress(model, steps, "z"))
        held["z_star"] = z_star.to(comfy.model_management.intermediate_device())
        return z_star[-1] * _k_scale(float(sigmas[-1]))

    z_T = _run(model, {BRANCH_SOURCE: positive}, negative, cfg, BRANCH_SOURCE, sigmas, latent.shape, run,
               latent_image=latent)
    inversion = Inversion(method="ddim", z_star=held["z_star"], sigmas=sigmas, timesteps=timesteps, cfg=cfg,
                          conditioning=positive, negative=negative, model_family=model_family(model))
    distinct = torch.cat([sigmas[:1], sigmas[1:][sigmas[1:] != sigmas[:-1]]])
    return InvertOutput(inversion=inversion, z_T=z_T, sampling_sigmas=distinct.flip(0).to(torch.float32))


@dataclass
class DirectInversionOutput:
    edited: torch.Tensor  # LATENT samples
    source: torch.Tensor  # LATENT samples
    offsets: OffsetTrajectory  # model latent space


def direct_inversion(model, inversion: Inversion, positive, negative, cfg: float = 7.5, offsets: str = "source",
                     target_start: Optional[torch.Tensor] = None) -> DirectInversionOutput:
    """Direct Inversion sampling with a ComfyUI model.

    ``target_start`` is an optional LATENT in the scaling of Invert's z_T output to start the target from.
    """
    inversion.check_model(model_family(model))
    sigmas, _ = schedule(model, inversion.steps)
    if not torch.allclose(sigmas, inversion.sigmas, rtol=1e-5, atol=0.0):
        raise ValueError("This model's noise schedule differs from the one the inversion was made with; "
                         "invert again with this model.")
    x_target = None
    if target_start is not None:
        inversion.check_latent(target_start, "target start latent")
        check_finite("target start latent", target_start)
        x_target = model.model.process_latent_in(target_start.float()) / _k_scale(float(sigmas[-1]))
    batch = inversion.latent_shape[0]
    held = {}

    def run(denoiser, latent_image):
        device = latent_image.device
        result = sample_direct_inversion(
            denoiser, inversion.z_star.to(device), inversion.sigmas,
            x_target=None if x_target is None else x_target.to(device), offsets=offsets,
            callback=_progress(model, inversion.steps, "denoised"))
        held["offsets"] = result.offsets.to(comfy.model_management.intermediate_device())
        return torch.cat([result.edited, result.source])

    samples = _run(model, {BRANCH_SOURCE: inversion.conditioning, BRANCH_TARGET: positive}, negative, cfg,
                   BRANCH_TARGET, sigmas, inversion.latent_shape, run)
    edited, source = samples.split(batch)
    return DirectInversionOutput(edited=edited, source=source,
                                 offsets=OffsetTrajectory(offsets=held["offsets"], sigmas=sigmas.flip(0), mode=offsets))
