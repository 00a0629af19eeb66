"""DDIM inversion (Song et al. 2021; as in Mokady et al., "Null-text Inversion", google/prompt-to-prompt), and its
counterparts on any :class:`spaces.Space` and :mod:`solvers` step: Euler inversion of flow models, RF-Solver."""
from __future__ import annotations

from typing import Optional

import torch

from .solvers import Euler
from .spaces import VP, Space
from .types import BRANCH_SOURCE, INVERSION_CAUSE, Denoiser, StepCallback, check_latent_values, check_step

__all__ = ["invert_ddim"]


@torch.no_grad()
def invert_ddim(
    model: Denoiser,
    z0: torch.Tensor,
    sigmas: torch.Tensor,
    callback: Optional[StepCallback] = None,
    branch: str = BRANCH_SOURCE,
    space: Space = VP,
    solver=None,
) -> torch.Tensor:
    """Run deterministic DDIM backwards, from the clean latent to z*_T (on ``space``, with ``solver``'s steps:
    :class:`solvers.Euler` by default, i.e. DDIM inversion on VP models and Euler inversion on flow models).

    As in the reference ``ddim_loop``, the noise prediction of step i is taken from the current latent
    z*_i at the *next* (noisier) noise level sigma_{i+1}:

        eps_i     = eps_theta(z*_i, sigma_{i+1}, c)
        z*_{i+1}  = DDIM(z*_i, eps_i; sigma_i -> sigma_{i+1})

    Args:
        model: guided noise predictor (guidance is the model's business; the reference uses 1).
        z0: ``[B, C, H, W]`` VP latent of the source image.
        sigmas: ``[steps + 1]`` ascending noise levels, ``sigmas[0]`` the clean end (``schedule.ddim_sigmas``).
        callback: called after every step with ``{"phase": "invert", "i", "steps", "sigma", "z"}``.
        branch: the conditioning branch the model should use.
        space: the model family's parametrisation (``spaces.VP`` or ``spaces.FLOW``).
        solver: the step (``solvers.Euler()`` or ``solvers.Midpoint()``).

    Returns:
        ``[steps + 1, B, C, H, W]``: z*_0 (= z0) .. z*_T.
    """
    check_latent_values("latent to invert", z0)
    levels = [float(s) for s in sigmas]
    if any(b < a for a, b in zip(levels, levels[1:])):
        raise ValueError("DDIM inversion needs ascending sigmas (clean end first).")
    sigmas_dev = sigmas.to(device=z0.device, dtype=z0.dtype)
    steps = len(levels) - 1
    z_star = z0.new_empty((steps + 1,) + tuple(z0.shape))
    z_star[0] = z0
    solver = solver or Euler()
    z = z0
    for i in range(steps):
        if levels[i + 1] != levels[i]:  # a zero-length step is the identity: no evaluation needed
            z = solver.invert_step(model, space, z, levels[i], levels[i + 1], sigmas_dev[i + 1], branch, i + 1)
            check_step("inversion", i, steps, {branch: z}, INVERSION_CAUSE)
        z_star[i + 1] = z
        if callback is not None:
            callback({"phase": "invert", "i": i, "steps": steps, "sigma": levels[i + 1], "z": z})
    return z_star
