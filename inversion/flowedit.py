"""FlowEdit: inversion-free editing of flow-matching models by velocity differences (Kulikov et al., "FlowEdit:
Inversion-Free Text-Based Editing Using Pre-Trained Flow Models", 2024; reference: fallenshock/FlowEdit
``FlowEditSD3`` / ``FlowEditFLUX``).

The edit moves the clean source latent along the difference of the target's and the source's velocities, taken at
noised copies that share their noise, so what the prompts agree on cancels:

    z_edit = x_src
    for the steps from sigma_i to sigma_{i+1} with steps - i <= n_max (the first steps are skipped):
        for k in 1 .. n_avg:   n ~ N(0, I)
            z_src = (1 - sigma_i) x_src + sigma_i n
            z_tar = z_edit + z_src - x_src
            V    += (v(z_tar, sigma_i, target) - v(z_src, sigma_i, source)) / n_avg
        z_edit += (sigma_{i+1} - sigma_i) V                       while steps - i > n_min
    the last n_min steps sample the target from z_edit's noised copy with plain Euler steps.

No inversion: each step costs n_avg x (source + target) predictions. The source and target are guided with their own
scales (the reference: SD3 3.5 and 13.5, Flux's embedded guidance 1.5 and 5.5); the adapters give the Denoiser's two
branches those. With equal prompts and guidance the velocities cancel and the result is the input (to float
rounding: z_edit + z_src - x_src is z_src only to rounding).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .spaces import FLOW
from .types import (
    BRANCH_SOURCE,
    BRANCH_TARGET,
    SAMPLING_CAUSE,
    Denoiser,
    StepCallback,
    check_latent_values,
    check_number,
    check_step,
)

__all__ = ["FlowEditOptions", "flow_edit"]


@dataclass
class FlowEditOptions:
    """The reference's settings; its SD3 experiments: 50 steps, n_max 33, source guidance 3.5, target 13.5; Flux dev:
    28 steps, n_max 24, embedded guidance 1.5 and 5.5; both n_min 0, n_avg 1."""

    n_max: int = 33  # steps - i <= n_max: the edit starts n_max steps before the end
    n_min: int = 0  # the last n_min steps sample the target alone
    n_avg: int = 1  # noise draws averaged per step
    seed: int = 0

    def __post_init__(self):
        for name in ("n_max", "n_min", "n_avg", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"FlowEdit {name} must be an integer, got {value!r}")
        if self.n_avg < 1:
            raise ValueError(f"FlowEdit n_avg must be at least 1, got {self.n_avg}")
        if not 0 <= self.n_min <= self.n_max:
            raise ValueError(f"FlowEdit needs 0 <= n_min <= n_max, got n_min {self.n_min}, n_max {self.n_max}")


@torch.no_grad()
def flow_edit(model: Denoiser, x_src: torch.Tensor, sigmas: torch.Tensor, options: Optional[FlowEditOptions] = None,
              callback: Optional[StepCallback] = None) -> torch.Tensor:
    """FlowEdit of the clean flow latent ``x_src`` (the model's latent space).

    Args:
        model: velocity predictor (a flow model's Denoiser) with a source and a target branch, each guided as the
            edit wants.
        x_src: ``[B, C, H, W]`` the source image's latent.
        sigmas: ``[steps + 1]`` ascending noise levels, 0 first (``spaces.FLOW.trajectory``); the edit runs down them.
        options: :class:`FlowEditOptions`.
        callback: called after every step that runs with ``{"phase": "flow_edit", "i", "steps", "sigma", "z",
            "denoised"}`` (``i`` counts the steps that run, of ``steps``: those with steps - i <= n_max).

    Returns:
        ``[B, C, H, W]`` the edited latent.
    """
    options = options or FlowEditOptions()
    check_latent_values("latent to edit", x_src)
    levels = [float(s) for s in sigmas.flip(0)]  # descending: sigma_max .. 0
    if levels[-1] != 0.0 or any(b > a for a, b in zip(levels, levels[1:])):
        raise ValueError("FlowEdit runs down a flow schedule ending at sigma 0.")
    steps = len(levels) - 1
    check_number("FlowEdit n_max", options.n_max, 1, steps)
    sigmas_dev = torch.tensor(levels, dtype=x_src.dtype).to(x_src.device)
    generator = torch.Generator().manual_seed(options.seed)  # on the CPU: the same edit on every device
    noise = lambda: torch.randn(x_src.shape, generator=generator, dtype=torch.float32).to(x_src)  # noqa: E731
    first = steps - options.n_max
    z_edit, x_tar = x_src.clone(), None
    for i in range(first, steps):
        sigma, sigma_to = levels[i], levels[i + 1]
        level = steps - i  # the index of sigma in the ascending schedule
        if steps - i > options.n_min:
            delta = torch.zeros_like(x_src)
            for _ in range(options.n_avg):
                z_src = (1.0 - sigma) * x_src + sigma * noise()
                z_tar = z_edit + z_src - x_src
                v_src = model(z_src, sigmas_dev[i], BRANCH_SOURCE, level)
                v_tar = model(z_tar, sigmas_dev[i], BRANCH_TARGET, level)
                delta += (v_tar - v_src) / options.n_avg
            z_edit = FLOW.step(z_edit, delta, sigma, sigma_to)
            current, denoised = z_edit, z_edit
        else:
            if x_tar is None:  # the last n_min steps: the target alone, from z_edit's noised copy
                x_tar = z_edit + (1.0 - sigma) * x_src + sigma * noise() - x_src
            v_tar = model(x_tar, sigmas_dev[i], BRANCH_TARGET, level)
            denoised = FLOW.denoised(x_tar, v_tar, sigma)
            x_tar = FLOW.step(x_tar, v_tar, sigma, sigma_to)
            current = x_tar
        check_step("FlowEdit", i - first, options.n_max, {BRANCH_TARGET: current}, SAMPLING_CAUSE)
        if callback is not None:
            callback({"phase": "flow_edit", "i": i - first, "steps": options.n_max, "sigma": sigma_to, "z": current,
                      "denoised": denoised})
    return z_edit if x_tar is None else x_tar
