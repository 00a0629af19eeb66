"""DDIM schedule and update, written once and shared by inversion and sampling.

Notation (Song et al., "Denoising Diffusion Implicit Models", ICLR 2021):

- ``z``: a latent in variance-preserving (VP) scaling, z_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps.
  This is what the UNet sees and what the papers' reference code keeps.
- ``sigma``: the noise level sqrt((1 - alpha_bar) / alpha_bar), ComfyUI's and k-diffusion's time variable.
  Everything here is parametrised by sigma, so both backends (discrete timesteps in diffusers, sigmas in
  ComfyUI) share one schedule.
- ``alpha_bar`` = 1 / (1 + sigma^2).

Schedule semantics follow the reference code of Prompt-to-Prompt / Null-text inversion and PnP Inversion
(``DDIMScheduler(..., set_alpha_to_one=False)``, ``steps_offset=0``): the timesteps of ``steps`` DDIM steps
are ``i * (T // steps)`` for i = 0 .. steps-1, and the clean end of the trajectory sits at ``alpha_bar[0]``
(the scheduler's ``final_alpha_cumprod``). With that offset the first inversion step and the last sampling
step go from ``alpha_bar[0]`` to itself and change nothing; we keep them so that ``steps`` means what it
means in the reference, and skip their UNet evaluation.
"""
from __future__ import annotations

import math

import torch

__all__ = ["alpha_bar", "ddim_sigmas", "ddim_step", "ddim_timesteps", "eps_to_x0"]


def alpha_bar(sigma: float) -> float:
    """alpha_bar for a noise level sigma (VP parametrisation)."""
    return 1.0 / (1.0 + sigma * sigma)


def ddim_timesteps(num_train_timesteps: int, steps: int) -> list[int]:
    """Training timesteps visited by ``steps`` DDIM steps, ascending (reference: steps_offset = 0)."""
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    if steps > num_train_timesteps:
        raise ValueError(f"steps ({steps}) cannot exceed the model's {num_train_timesteps} training timesteps")
    stride = num_train_timesteps // steps
    return [i * stride for i in range(steps)]


def ddim_sigmas(train_sigmas: torch.Tensor, steps: int) -> tuple[torch.Tensor, list[int]]:
    """The inversion trajectory's noise levels, ascending, and the timesteps they belong to.

    Args:
        train_sigmas: sigma of every training timestep (1-D, ascending in t), from the model's schedule.
        steps: number of DDIM steps.

    Returns:
        ``(sigmas, timesteps)``: ``sigmas`` has ``steps + 1`` entries (float64, CPU). ``sigmas[0]`` is the
        clean end (alpha_bar[0], i.e. timestep 0) and ``sigmas[i]`` for i >= 1 is the noise level of
        ``timesteps[i - 1]``; ``timesteps`` has ``steps`` entries.
    """
    train_sigmas = train_sigmas.detach().to("cpu", torch.float64).flatten()
    timesteps = ddim_timesteps(train_sigmas.numel(), steps)
    points = [0] + timesteps
    return train_sigmas[points].clone(), timesteps


def ddim_step(z: torch.Tensor, eps: torch.Tensor, sigma: float, sigma_to: float) -> torch.Tensor:
    """One deterministic DDIM update (DDIM eq. 12 with eta = 0) from noise level ``sigma`` to ``sigma_to``.

    x0_hat = (z_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t)
    z_to   = sqrt(alpha_bar_to) x0_hat + sqrt(1 - alpha_bar_to) eps

    The same update inverts (``sigma_to > sigma``, the reference's ``next_step``) and samples
    (``sigma_to < sigma``, its ``prev_step``). Coefficients are Python floats, so nothing is synchronised
    with the device.
    """
    a_to = alpha_bar(sigma_to)
    x0_hat = eps_to_x0(z, eps, sigma)
    return math.sqrt(a_to) * x0_hat + math.sqrt(1.0 - a_to) * eps


def eps_to_x0(z: torch.Tensor, eps: torch.Tensor, sigma: float) -> torch.Tensor:
    """x0_hat from a VP latent and its noise prediction (for previews and editors)."""
    a_t = alpha_bar(sigma)
    return (z - math.sqrt(1.0 - a_t) * eps) / math.sqrt(a_t)
