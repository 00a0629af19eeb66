"""Direct Inversion sampling (Ju et al., "PnP Inversion: Boosting Diffusion-based Editing with 3 Lines of
Code", ICLR 2024; reference code cure-lab/PnPInversion, ``direct_inversion_p2p_guidance_forward``)."""
from __future__ import annotations

from typing import Optional

import torch

from .solvers import Euler
from .spaces import VP, Space
from .types import (
    BRANCH_SOURCE,
    BRANCH_TARGET,
    OFFSET_MODES,
    Denoiser,
    DirectInversionResult,
    EditController,
    SAMPLING_CAUSE,
    StepCallback,
    check_latent_values,
    check_step,
)

__all__ = ["sample_direct_inversion"]


@torch.no_grad()
def sample_direct_inversion(
    model: Denoiser,
    z_star: torch.Tensor,
    sigmas: torch.Tensor,
    x_target: Optional[torch.Tensor] = None,
    offsets: str = "source",
    callback: Optional[StepCallback] = None,
    controller: Optional[EditController] = None,
    space: Space = VP,
    solver=None,
) -> DirectInversionResult:
    """Two-branch DDIM sampling along an inversion trajectory, with Direct Inversion's offsets (on ``space``, with
    ``solver``'s steps: DDIM on VP models, Euler or RF-Solver's midpoint on flow models; "DDIM" below is that step).

    Both branches start from z*_T (the target may start elsewhere). At the step from sigma_t to sigma_{t-1}:

        z_src' = DDIM(z_src, eps_theta(z_src, sigma_t, c_src); t -> t-1)
        z_tgt' = DDIM(z_tgt, eps_theta(z_tgt, sigma_t, c_tgt); t -> t-1)
        o_t    = z*_{t-1} - z_src'                      (the paper's "difference", Alg. 1)
        z_src  = z_src' + o_t   (= z*_{t-1})            unless offsets == "off"
        z_tgt  = z_tgt' + o_t                           only if offsets == "both"

    o_t comes from the source prediction this step makes anyway; the reference spends a separate pass of
    UNet evaluations on it. Since z_src = z*_t on entry of every step, o_t is the same offset.

    Args:
        model: guided noise predictor with a source and a target branch.
        z_star: ``[steps + 1, B, C, H, W]`` inversion trajectory (``Inversion.z_star``).
        sigmas: ``[steps + 1]`` ascending noise levels of ``z_star``.
        x_target: optional start of the target branch (default z*_T), shape ``[B, C, H, W]``.
        offsets: one of :data:`OFFSET_MODES`.
        controller: an editor's per-run state (see :class:`EditController`): the source is predicted before the
            target at every step so the editor can carry the source's attention over, and ``after_step`` may change
            the target latent. With offsets == "source" the source's latent is pinned to z*_{t-1} whatever it
            predicts, so only its conditional half is evaluated (the offsets are then not computed: ``None``); a
            controller with ``source_unguided`` (Plug-and-Play, Pix2Pix-Zero) gets the source's conditional half alone in
            every mode; one that ``guides_target`` (Pix2Pix-Zero) moves the target's latent before its prediction.
        space, solver: the model family's parametrisation and the step (see :mod:`spaces`, :mod:`solvers`).
        callback: called after every step with ``{"phase": "sample", "i", "steps", "sigma", "x_source", "x_target",
            "denoised", "offset"}`` (``denoised``: the target's x0 prediction, for previews).

    Returns:
        :class:`DirectInversionResult` with the edited latent, the source reconstruction and the offsets.
    """
    if offsets not in OFFSET_MODES:
        raise ValueError(f"offsets must be one of {OFFSET_MODES}, got {offsets!r}")
    levels = [float(s) for s in sigmas]
    if len(levels) != z_star.shape[0]:
        raise ValueError(f"{len(levels)} sigmas for a trajectory of {z_star.shape[0]} latents")
    check_latent_values("inversion trajectory", z_star)
    steps = len(levels) - 1
    sigmas_dev = sigmas.to(device=z_star.device, dtype=z_star.dtype)
    solver = solver or Euler()

    x_src = z_star[steps]
    x_tgt = z_star[steps] if x_target is None else x_target.to(z_star)
    check_latent_values("target start latent", x_tgt)
    pinned_only = controller is not None and offsets == "source" and not controller.source_guided
    source_guided = not (pinned_only or (controller is not None and controller.source_unguided))
    guides_target = controller is not None and controller.guides_target
    offset_rows = None if pinned_only else z_star.new_zeros((steps,) + tuple(x_src.shape))
    for n, t in enumerate(range(steps, 0, -1)):
        sigma, sigma_prev = levels[t], levels[t - 1]
        if sigma_prev != sigma:  # a zero-length step is the identity: no evaluation needed
            src_next, _ = solver.sample_step(model, space, x_src, sigma, sigma_prev, sigmas_dev[t], BRANCH_SOURCE, t,
                                             guided=source_guided)
            if guides_target:
                x_tgt = controller.guide_target(model, x_tgt, sigmas_dev[t], t, n)
            tgt_next, d_tgt = solver.sample_step(model, space, x_tgt, sigma, sigma_prev, sigmas_dev[t], BRANCH_TARGET, t)
            denoised = space.denoised(x_tgt, d_tgt, sigma) if callback is not None else None  # previews only
        else:
            src_next, tgt_next, denoised = x_src, x_tgt, x_tgt
        if pinned_only:
            offset, x_src, x_tgt = None, z_star[t - 1], tgt_next
        else:
            offset = z_star[t - 1] - src_next
            offset_rows[n] = offset
            x_src = src_next if offsets == "off" else src_next + offset
            x_tgt = tgt_next + offset if offsets == "both" else tgt_next
        if controller is not None:
            x_tgt = controller.after_step(n, x_src, x_tgt)
        check_step("sampling", n, steps, {BRANCH_SOURCE: x_src, BRANCH_TARGET: x_tgt}, SAMPLING_CAUSE)
        if callback is not None:
            callback({"phase": "sample", "i": n, "steps": steps, "sigma": sigma_prev, "x_source": x_src, "x_target": x_tgt,
                      "denoised": denoised, "offset": offset})
    return DirectInversionResult(edited=x_tgt, source=x_src, offsets=offset_rows)
