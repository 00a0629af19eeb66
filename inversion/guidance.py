"""Classifier-free guidance variants shared by the adapters."""
from __future__ import annotations

import torch

__all__ = ["PROXIMAL_MODES", "proximal_delta"]

PROXIMAL_MODES = ("none", "l0", "l1")


def proximal_delta(delta: torch.Tensor, mode: str, quantile: float) -> torch.Tensor:
    """Proximal guidance (Han et al., "Improving Tuning-Free Real Image Editing with Proximal Guidance"; as in
    PnPInversion's ``proximal_guidance_diffusion_step``): shrink the guidance direction delta = eps_c - eps_u.

    The threshold is the ``quantile`` of |delta| per sample (a negative ``quantile`` is a fixed threshold -quantile).
    ``l0`` keeps only entries above it, shrunk by it (delta - clamp(delta, -thr, thr)); ``l1`` then applies the
    reference's two ``torch.where`` shrinks in turn, which is lopsided: delta - 2 thr for delta >= 2 thr, delta - thr
    for thr < delta < 2 thr, and delta + 2 thr for every delta < -thr (so entries in (-2 thr, -thr) change sign), as
    PnPInversion computes it. The reference takes the quantile over its whole [source, target] batch; here each
    image of each branch gets its own.
    """
    if mode == "none":
        return delta
    if mode not in PROXIMAL_MODES:
        raise ValueError(f"proximal guidance must be one of {PROXIMAL_MODES}, got {mode!r}")
    if quantile > 0:
        flat = delta.abs().flatten(1).float()
        threshold = torch.quantile(flat, quantile, dim=1).to(delta.dtype).view(-1, *([1] * (delta.ndim - 1)))
    else:
        threshold = torch.full((1,) * delta.ndim, -quantile, dtype=delta.dtype, device=delta.device)
    shrunk = delta - torch.maximum(torch.minimum(delta, threshold), -threshold)
    if mode == "l1":
        shrunk = torch.where(shrunk > 0, shrunk - threshold, shrunk)
        shrunk = torch.where(shrunk < 0, shrunk + threshold, shrunk)
    return shrunk
