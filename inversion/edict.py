"""EDICT: exact inversion with coupled transformations (Wallace et al., "EDICT: Exact Diffusion Inversion via
Coupled Transformations", CVPR 2023; reference: salesforce/EDICT ``coupled_stablediffusion``).

Two latents (x, y) are updated alternately, each with a noise prediction made from the other, then mixed:

    x' = a_t x + b_t eps(y, t)          (DDIM with a_t = sqrt(abar_{t-1} / abar_t),
    y' = a_t y + b_t eps(x', t)          b_t = sqrt(1 - abar_{t-1}) - a_t sqrt(1 - abar_t))
    x'' = p x' + (1 - p) y'
    y'' = (1 - p) x'' + p y'

with the order of the two updates swapped every other step ("leapfrog"). Every operation can be undone
algebraically, so inversion is exact. All bookkeeping (mixing, un-mixing, the a_t/b_t updates) runs in float64
whatever the model's dtype: the model only ever sees a copy in its own dtype.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from .plan import InversionMethod
from .schedule import alpha_bar
from .spaces import VP
from .types import (
    BRANCH_SOURCE,
    BRANCH_TARGET,
    INVERSION_CAUSE,
    SAMPLING_CAUSE,
    Denoiser,
    DirectInversionResult,
    EditController,
    Inversion,
    StepCallback,
    check_latent_values,
    check_number,
    check_step,
)

__all__ = ["EdictMethod", "EdictOptions", "edict_levels", "invert_edict", "sample_edict"]


@dataclass
class EdictOptions:
    """The reference's ``EDICT_editing`` defaults."""

    mix: float = 0.93  # mix_weight p
    strength: float = 0.8  # init_image_strength: invert / regenerate over this fraction of the steps
    guidance: float = 3.0  # guidance_scale of inversion and generation
    leapfrog: bool = True  # leapfrog_steps

    def __post_init__(self):
        check_number("EDICT guidance", self.guidance, 1.0, 100.0)
        if not 0.5 < self.mix <= 1.0:
            raise ValueError(f"EDICT mix must be in (0.5, 1], got {self.mix}")
        if not 0.0 < self.strength <= 1.0:
            raise ValueError(f"EDICT strength must be in (0, 1], got {self.strength}")


def edict_levels(steps: int, strength: float) -> int:
    """How many of ``steps`` levels EDICT inverts: the reference's ``int(steps * init_image_strength)``."""
    levels = int(steps * strength)
    if levels < 1:
        raise ValueError(f"EDICT strength {strength} leaves no step of {steps} to invert; raise steps or strength.")
    return levels


def _coefficients(sigma: float, sigma_prev: float) -> tuple[float, float]:
    a_t, a_prev = alpha_bar(sigma), alpha_bar(sigma_prev)
    a = math.sqrt(a_prev / a_t)
    return a, math.sqrt(1.0 - a_prev) - a * math.sqrt(1.0 - a_t)


def _order(n: int, leapfrog: bool) -> tuple[int, int]:
    """Which latent (0: x, 1: y) sampling step n updates first."""
    return (1, 0) if leapfrog and n % 2 else (0, 1)


def _eps(model: Denoiser, z: torch.Tensor, sigma: torch.Tensor, branch: str, level: int,
         dtype: torch.dtype) -> torch.Tensor:
    return model(z, sigma, branch, level).to(dtype)


@torch.no_grad()
def invert_edict(model: Denoiser, z0: torch.Tensor, sigmas: torch.Tensor, options: Optional[EdictOptions] = None,
                 callback: Optional[StepCallback] = None, dtype: torch.dtype = torch.float64,
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Invert a latent into an EDICT pair, undoing the generation steps from level 0 up to ``len(sigmas) - 1``.

    Returns ``(x_star, y_star)``, each ``[levels + 1, B, C, H, W]``: the pair at every level. ``dtype`` is the
    bookkeeping precision (float64; anything else only to show why).
    """
    options = options or EdictOptions()
    check_latent_values("latent to invert", z0)
    p = options.mix
    levels = [float(s) for s in sigmas]
    top = len(levels) - 1
    sigmas_dev = sigmas.to(device=z0.device, dtype=dtype)
    pair = [z0.to(dtype), z0.to(dtype)]
    x_star = pair[0].new_empty((top + 1,) + tuple(z0.shape))
    y_star = torch.empty_like(x_star)
    x_star[0], y_star[0] = pair
    for t in range(1, top + 1):
        n = top - t  # the sampling step (from level t) that this undoes, counted as generation counts it
        a, b = _coefficients(levels[t], levels[t - 1])
        # undo the mixing
        y_new = (pair[1] - (1.0 - p) * pair[0]) / p
        x_new = (pair[0] - (1.0 - p) * y_new) / p
        pair = [x_new, y_new]
        first, second = _order(n, options.leapfrog)
        for i, j in ((second, first), (first, second)):  # undo the two updates in reverse order
            eps = _eps(model, pair[j], sigmas_dev[t], BRANCH_SOURCE, t, dtype) if b != 0.0 else 0.0
            pair[i] = (pair[i] - b * eps) / a
        check_step("EDICT inversion", t - 1, top, {BRANCH_SOURCE: pair}, INVERSION_CAUSE)
        x_star[t], y_star[t] = pair
        if callback is not None:
            callback({"phase": "invert", "i": t - 1, "steps": top, "z": pair[0]})
    return x_star, y_star


@dataclass
class EdictResult:
    """Final pairs of the two branches (float64); ``edited``/``source`` are their x latents."""

    edited: torch.Tensor
    source: torch.Tensor
    target_pair: tuple
    source_pair: tuple


@torch.no_grad()
def sample_edict(model: Denoiser, x_top: torch.Tensor, y_top: torch.Tensor, sigmas: torch.Tensor,
                 options: Optional[EdictOptions] = None, callback: Optional[StepCallback] = None,
                 dtype: torch.dtype = torch.float64, controller: Optional[EditController] = None) -> EdictResult:
    """Regenerate from an EDICT pair along a source branch (exact reconstruction) and a target branch (the edit).

    ``sigmas`` are the ascending levels 0 .. top of the inverted pair (``x_top``, ``y_top`` at level top);
    ``dtype`` is the bookkeeping precision. Each of a step's two updates is made for the source, then for the
    target (the branches are independent, so the order only matters to an editor, which carries the source's
    attention over to the target's prediction of the same update); a ``controller``'s ``after_step`` then acts
    on both latents of the target's pair, against the source's. A controller that ``guides_target`` moves the target's
    latent each update predicts at (the pair's other latent) before the prediction, after the source's of that update.
    """
    options = options or EdictOptions()
    p = options.mix
    levels = [float(s) for s in sigmas]
    top = len(levels) - 1
    sigmas_dev = sigmas.to(device=x_top.device, dtype=dtype)
    pairs = {branch: [x_top.to(dtype), y_top.to(dtype)] for branch in (BRANCH_SOURCE, BRANCH_TARGET)}
    guides_target = controller is not None and controller.guides_target
    for n, t in enumerate(range(top, 0, -1)):
        a, b = _coefficients(levels[t], levels[t - 1])
        first, second = _order(n, options.leapfrog)
        for i, j in ((first, second), (second, first)):
            for branch, pair in pairs.items():
                if guides_target and branch == BRANCH_TARGET and b != 0.0:
                    pair[j] = controller.guide_target(model, pair[j], sigmas_dev[t], t, n)
                eps = _eps(model, pair[j], sigmas_dev[t], branch, t, dtype) if b != 0.0 else 0.0
                pair[i] = a * pair[i] + b * eps
        for pair in pairs.values():
            x_mixed = p * pair[0] + (1.0 - p) * pair[1]
            pair[1] = (1.0 - p) * x_mixed + p * pair[1]
            pair[0] = x_mixed
        if controller is not None:
            src, tgt = pairs[BRANCH_SOURCE], pairs[BRANCH_TARGET]
            pairs[BRANCH_TARGET] = [controller.after_step(n, src[k], tgt[k]) for k in range(2)]
        check_step("EDICT sampling", n, top, pairs, SAMPLING_CAUSE)
        if callback is not None:
            callback({"phase": "sample", "i": n, "steps": top, "denoised": pairs[BRANCH_TARGET][0], "x_source": pairs[BRANCH_SOURCE][0],
                      "x_target": pairs[BRANCH_TARGET][0]})
    src, tgt = pairs[BRANCH_SOURCE], pairs[BRANCH_TARGET]
    return EdictResult(edited=tgt[0], source=src[0], target_pair=tuple(tgt), source_pair=tuple(src))


class EdictMethod(InversionMethod):
    """EDICT: exact coupled inversion over part of the schedule (``strength``); edits retrace it with its own guidance
    and the inversion's prompt as the source (no offsets: it is exact already). VP models only."""

    name = "edict"
    Options = EdictOptions
    spaces = ("vp",)
    uses_offsets = False
    summary = "exact coupled inversion (Wallace et al.), UNet models"

    def levels(self, steps: int, options) -> int:
        return edict_levels(steps, options.strength)

    def inversion_guidance(self, options, cfg: float) -> float:
        check_number("The inversion's cfg", cfg, 0.0, 100.0)
        return options.guidance

    def invert(self, options, model, z0, sigmas, space=VP, null_text_model=None, callback=None):
        self.check_space(space)
        top = self.levels(len(sigmas) - 1, options)
        x_star, y_star = invert_edict(model, z0, sigmas[:top + 1], options, callback)
        return x_star, sigmas[:top + 1].clone(), {"y_star": y_star}

    def edit_guidance(self, inversion: Inversion, cfg: float) -> float:
        """EDICT keeps the guidance it was inverted with (the reference uses 3 for both)."""
        check_number("The sampler's cfg", cfg, 0.0, 100.0)
        return self.options(inversion.options).guidance

    def source_conditioning(self, inversion: Inversion, editor=None):
        """The source pair retraces the inversion only with the prompt it was inverted with."""
        return inversion.conditioning

    def sample(self, model, inversion, offsets="source", x_target=None, callback=None, controller=None):
        if x_target is not None:
            raise ValueError("EDICT edits start from the inverted pair; a target start latent cannot be used.")
        result = sample_edict(model, inversion.z_star[-1], inversion.extras["y_star"][-1], inversion.sigmas,
                              self.options(inversion.options), callback, controller=controller)
        return DirectInversionResult(edited=result.edited, source=result.source, offsets=None, editor_state=controller)
