"""The ODE steps inversion and sampling take along a trajectory, over a :class:`spaces.Space`.

- :class:`Euler`: one evaluation per step. Inverting, the derivative of the step from level i to i+1 is taken at the
  current latent and the *upper* level, d(z_i, sigma_{i+1}) (DDIM inversion's convention, Mokady et al.; on flow
  models the counterpart, and the model is never asked at sigma = 0); sampling, at the step's start. First order:
  the round trip's error falls like 1/steps.
- :class:`Midpoint`: RF-Solver's second-order step (Wang et al., "Taming Rectified Flow for Inversion and Editing",
  2024: a Taylor step whose time derivative of the velocity is a finite difference over half a step, which is the
  explicit midpoint rule) in either direction: d1, half an Euler step, d2 there, a full step with d2. Two evaluations
  per step; the round trip's error falls like 1/steps^2. RF-Solver takes d1 at the step's start; here both
  evaluations are at the step's midpoint level. A first derivative off by O(h) in the noise level moves the midpoint
  by O(h^2) and the step by O(h^3), so the order stays two, and -- as with DDIM inversion's convention for Euler --
  inversion and sampling then ask the model at the same levels, so its dependence on the level cancels in a round
  trip (with d1 at the start, a model whose prediction is rough in sigma, like an untrained one, loses the second
  order), and the model is never asked at sigma = 0 (where flow models are not trained).
"""
from __future__ import annotations

import torch

from .spaces import Space
from .types import Denoiser

__all__ = ["Euler", "Midpoint"]


class Euler:
    def invert_step(self, model: Denoiser, space: Space, z: torch.Tensor, sigma: float, sigma_to: float,
                    sigma_to_dev: torch.Tensor, branch: str, level: int) -> torch.Tensor:
        """From ``sigma`` up to ``sigma_to`` (``level``: the index of ``sigma_to``)."""
        return space.step(z, model(z, sigma_to_dev, branch, level), sigma, sigma_to)

    def sample_step(self, model: Denoiser, space: Space, x: torch.Tensor, sigma: float, sigma_to: float,
                    sigma_dev: torch.Tensor, branch: str, level: int, guided: bool = True):
        """From ``sigma`` (``level``) down to ``sigma_to``; returns ``(latent, derivative used)``."""
        d = model(x, sigma_dev, branch, level, guided=guided)
        return space.step(x, d, sigma, sigma_to), d


class Midpoint:
    def _step(self, model, space, z, sigma, sigma_to, like, branch, level, guided):
        mid = 0.5 * (sigma + sigma_to)
        mid_dev = like.new_tensor(mid)
        d1 = model(z, mid_dev, branch, level, guided=guided)
        d2 = model(space.step(z, d1, sigma, mid), mid_dev, branch, level, guided=guided)
        return space.step(z, d2, sigma, sigma_to), d2

    def invert_step(self, model, space, z, sigma, sigma_to, sigma_to_dev, branch, level):
        return self._step(model, space, z, sigma, sigma_to, sigma_to_dev, branch, level, True)[0]

    def sample_step(self, model, space, x, sigma, sigma_to, sigma_dev, branch, level, guided=True):
        return self._step(model, space, x, sigma, sigma_to, sigma_dev, branch, level, guided)
