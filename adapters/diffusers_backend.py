"""diffusers adapter: a ``UNet2DConditionModel`` and a ``DDIMScheduler`` behind the core's Denoiser interface.

Latents here are what diffusers pipelines pass to the UNet: ``vae.encode(image).latent_dist.mean *
vae.config.scaling_factor``. Prompts are embeddings (``pipe.encode_prompt``'s output), ``[1 or B, tokens, dim]``.

    inv = invert(unet, scheduler, latent, source_embeds, steps=50)
    out = edit(unet, scheduler, inv, target_embeds, negative_embeds, cfg=7.5)
    image = vae.decode(out.edited / vae.config.scaling_factor).sample
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from ..inversion import (
    BRANCH_SOURCE,
    BRANCH_TARGET,
    DirectInversionResult,
    Inversion,
    StepCallback,
    alpha_bar,
    ddim_sigmas,
    invert_ddim,
    sample_direct_inversion,
)

__all__ = ["DiffusersDenoiser", "edit", "invert", "model_family", "train_sigmas"]

_PREDICTION_TYPES = ("epsilon", "v_prediction")


def train_sigmas(scheduler) -> torch.Tensor:
    """sigma of every training timestep of the scheduler, float64."""
    alphas_cumprod = scheduler.alphas_cumprod.to(torch.float64)
    return ((1.0 - alphas_cumprod) / alphas_cumprod).sqrt()


def model_family(unet, scheduler) -> str:
    cfg = unet.config
    return (f"diffusers:in{cfg.in_channels}-ctx{cfg.cross_attention_dim}-ch{tuple(cfg.block_out_channels)}"
            f"-{scheduler.config.prediction_type}")


class DiffusersDenoiser:
    """Guided eps prediction of a diffusers UNet for named conditioning branches.

    Args:
        unet: a ``UNet2DConditionModel``.
        scheduler: the scheduler whose ``alphas_cumprod`` and ``prediction_type`` the UNet was trained with.
        branches: prompt embeddings per branch name (``"source"``, ``"target"``).
        negative: embeddings of the negative prompt; required when ``cfg != 1``.
        cfg: classifier-free guidance scale; at 1 the negative branch is not evaluated (as in ComfyUI).
    """

    def __init__(self, unet, scheduler, branches: dict[str, torch.Tensor], negative: Optional[torch.Tensor],
                 cfg: float):
        prediction_type = scheduler.config.prediction_type
        if prediction_type not in _PREDICTION_TYPES:
            raise ValueError(f"Unsupported prediction_type {prediction_type!r}; expected one of {_PREDICTION_TYPES}.")
        if cfg != 1.0 and negative is None:
            raise ValueError("Guidance (cfg != 1) needs negative prompt embeddings.")
        self.unet = unet
        self.v_prediction = prediction_type == "v_prediction"
        self.log_sigmas = train_sigmas(scheduler).log()
        self.branches = branches
        self.negative = negative
        self.cfg = cfg

    def _timestep(self, sigma: torch.Tensor) -> int:
        return int((self.log_sigmas - math.log(float(sigma))).abs().argmin())

    def _eps(self, z: torch.Tensor, t: int, sigma: float, embeds: torch.Tensor) -> torch.Tensor:
        out = self.unet(z.to(self.unet.dtype), t, encoder_hidden_states=embeds.to(self.unet.dtype)).sample
        out = out.to(z.dtype)
        if self.v_prediction:  # eps = sqrt(alpha_bar) v + sqrt(1 - alpha_bar) z
            a_t = alpha_bar(sigma)
            out = math.sqrt(a_t) * out + math.sqrt(1.0 - a_t) * z
        return out

    def __call__(self, z: torch.Tensor, sigma: torch.Tensor, branch: str) -> torch.Tensor:
        t = self._timestep(sigma)
        batch = z.shape[0]
        cond = _to_batch(self.branches[branch], batch, z.device)
        if self.cfg == 1.0:
            return self._eps(z, t, float(sigma), cond)
        uncond = _to_batch(self.negative, batch, z.device)
        eps_uncond, eps_cond = self._eps(torch.cat([z, z]), t, float(sigma), torch.cat([uncond, cond])).chunk(2)
        return eps_uncond + self.cfg * (eps_cond - eps_uncond)


def _to_batch(embeds: torch.Tensor, batch: int, device) -> torch.Tensor:
    if embeds.shape[0] not in (1, batch):
        raise ValueError(f"Prompt embeddings have batch {embeds.shape[0]}, the latents {batch}.")
    return embeds.to(device).expand(batch, *embeds.shape[1:])


def invert(unet, scheduler, latent: torch.Tensor, prompt_embeds: torch.Tensor,
           negative_embeds: Optional[torch.Tensor] = None, steps: int = 50, cfg: float = 1.0,
           callback: Optional[StepCallback] = None) -> Inversion:
    """DDIM-invert a latent along the scheduler's schedule (reference defaults: 50 steps, guidance 1)."""
    sigmas, timesteps = ddim_sigmas(train_sigmas(scheduler), steps)
    denoiser = DiffusersDenoiser(unet, scheduler, {BRANCH_SOURCE: prompt_embeds}, negative_embeds, cfg)
    z_star = invert_ddim(denoiser, latent.float(), sigmas, callback=callback)
    return Inversion(method="ddim", z_star=z_star, sigmas=sigmas, timesteps=timesteps, cfg=cfg,
                     conditioning=prompt_embeds, negative=negative_embeds if cfg != 1.0 else None,
                     model_family=model_family(unet, scheduler))


def edit(unet, scheduler, inversion: Inversion, target_embeds: torch.Tensor, negative_embeds: torch.Tensor,
         cfg: float = 7.5, offsets: str = "source", x_target: Optional[torch.Tensor] = None,
         callback: Optional[StepCallback] = None) -> DirectInversionResult:
    """Direct Inversion sampling: the source branch follows the inversion, the target branch is the edit."""
    inversion.check_model(model_family(unet, scheduler))
    if x_target is not None:
        inversion.check_latent(x_target, "target start latent")
    denoiser = DiffusersDenoiser(unet, scheduler, {BRANCH_SOURCE: inversion.conditioning, BRANCH_TARGET: target_embeds},
                                 negative_embeds, cfg)
    return sample_direct_inversion(denoiser, inversion.z_star, inversion.sigmas, x_target=x_target,
                                   offsets=offsets, callback=callback)
