"""The schedule/step seam: how a model family's latents move along its ODE, written once for every method.

ComfyUI's samplers (after k-diffusion) see every model as a denoiser D(x, sigma) on k-scaled latents x and step with
Euler on the derivative d = (x - D(x)) / sigma. That one formula is both families' deterministic sampler:

- **VP** (SD1.x / SD2.x / SDXL, eps or v-prediction; ComfyUI's ``ModelSamplingDiscrete``): x = z sqrt(1 + sigma^2)
  for the VP latent z the UNet sees, d is the noise prediction eps, and Euler in x from sigma to sigma' is exactly
  the DDIM update of z (Song et al., eta = 0). The core keeps z (the papers' reference code keeps it), so a VP step
  is :func:`schedule.ddim_step` on z.
- **Flow** (SD3 / SD3.5, Flux; ComfyUI's ``CONST`` with ``ModelSamplingDiscreteFlow`` / ``ModelSamplingFlux``):
  x = (1 - sigma) x0 + sigma noise is the latent itself (no scaling), D = x - sigma v, so d is the velocity v and
  Euler is the rectified-flow step x' = x + (sigma' - sigma) v.

So the core's samplers, inversions and null-text take a :class:`Space` and never ask which family they run:
a :class:`Denoiser` returns d for its family, ``space.step`` moves a latent, ``space.denoised`` gives the clean
estimate for previews, ``space.k_scale`` converts to the adapters' k-diffusion scaling, and ``space.trajectory``
chooses the noise levels of ``steps`` steps from the model's training levels.

The two schedules are each family's reference: VP keeps PnP Inversion's / Prompt-to-Prompt's DDIM timesteps (clean
end at alpha_bar[0]); flow takes ComfyUI's ``simple`` scheduler (evenly spaced training levels from the top, as SD3
and Flux are sampled) and ends at sigma = 0, the clean image. No model is ever evaluated at sigma = 0.
"""
from __future__ import annotations

import math

import torch

from .schedule import ddim_sigmas, ddim_step, eps_to_x0

__all__ = ["FLOW", "SPACES", "VP", "Space", "flow_sigmas", "space_named"]


class Space:
    """A model family's parametrisation: its step, clean estimate, k-diffusion scaling and trajectory schedule."""

    name: str = ""
    label: str = ""  # for messages: what kind of model this is
    requirement: str = ""  # for messages: what a method of this family only needs

    def step(self, z: torch.Tensor, d: torch.Tensor, sigma: float, sigma_to: float) -> torch.Tensor:
        """One deterministic step of the latent ``z`` with derivative ``d`` from ``sigma`` to ``sigma_to`` (either
        direction: inversion goes up, sampling down)."""
        raise NotImplementedError

    def denoised(self, z: torch.Tensor, d: torch.Tensor, sigma: float) -> torch.Tensor:
        """The clean-latent estimate (previews, editors)."""
        raise NotImplementedError

    def k_scale(self, sigma: float) -> float:
        """x / z: the k-diffusion latent the adapters' samplers see over the latent the core keeps."""
        raise NotImplementedError

    def k_scale_tensor(self, sigma: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def trajectory(self, train_sigmas: torch.Tensor, steps: int) -> tuple[torch.Tensor, list[int]]:
        """``(sigmas, timesteps)``: ``steps + 1`` ascending float64 noise levels (clean end first) and the ``steps``
        training-timestep indices (ascending) they come from, for a model whose training levels are
        ``train_sigmas`` (1-D, ascending in t)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"Space({self.name!r})"


class _VP(Space):
    name = "vp"
    label = "a diffusion UNet (SD1.x/SD2.x/SDXL, eps or v-prediction)"
    requirement = "a discrete-timestep eps- or v-prediction model (SD1.x, SD2.x, SDXL)"

    def step(self, z, d, sigma, sigma_to):
        return ddim_step(z, d, sigma, sigma_to)

    def denoised(self, z, d, sigma):
        return eps_to_x0(z, d, sigma)

    def k_scale(self, sigma):
        return math.sqrt(1.0 + float(sigma) ** 2)

    def k_scale_tensor(self, sigma):
        return (1.0 + sigma * sigma).sqrt()

    def trajectory(self, train_sigmas, steps):
        return ddim_sigmas(train_sigmas, steps)


class _Flow(Space):
    name = "flow"
    label = "a flow-matching model (SD3/SD3.5, Flux)"
    requirement = "a flow-matching model (SD3/SD3.5, Flux)"

    def step(self, z, d, sigma, sigma_to):
        return z + (sigma_to - sigma) * d

    def denoised(self, z, d, sigma):
        return z - sigma * d

    def k_scale(self, sigma):
        return 1.0

    def k_scale_tensor(self, sigma):
        return torch.ones_like(sigma)

    def trajectory(self, train_sigmas, steps):
        return flow_sigmas(train_sigmas, steps)


def flow_sigmas(train_sigmas: torch.Tensor, steps: int) -> tuple[torch.Tensor, list[int]]:
    """ComfyUI's ``simple`` schedule of a flow model, ascending: 0, then the training levels at indices
    ``n - 1 - int(k * (n / steps))`` for k = steps-1 .. 0 (``n`` training levels; the top one is the model's
    sigma_max), in ComfyUI's floating-point arithmetic, so the same levels for every step count.
    (diffusers' ``FlowMatchEulerDiscreteScheduler.set_timesteps`` spaces the time down to its smallest training level
    instead; the diffusers adapter takes this schedule too, so both backends visit the same levels where their
    training levels are the same function of t and ``steps`` picks the same t from both grids -- e.g. SD3 always,
    Flux with ComfyUI's ModelSamplingFlux set to the image size and ``steps`` dividing 1000.)"""
    train_sigmas = train_sigmas.detach().to("cpu", torch.float64).flatten()
    n = train_sigmas.numel()
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    if steps > n:
        raise ValueError(f"steps ({steps}) cannot exceed the model's {n} training levels")
    stride = n / steps  # as comfy.samplers.simple_scheduler computes it
    timesteps = sorted(n - 1 - int(k * stride) for k in range(steps))
    sigmas = torch.cat([train_sigmas.new_zeros(1), train_sigmas[timesteps]])
    return sigmas, timesteps


VP = _VP()
FLOW = _Flow()
SPACES = {space.name: space for space in (VP, FLOW)}


def space_named(name: str) -> Space:
    if name not in SPACES:
        raise ValueError(f"Unknown model space {name!r}; known: {', '.join(SPACES)}.")
    return SPACES[name]
