"""Backend-agnostic inversion and Direct Inversion sampling (plain PyTorch; imports neither ComfyUI nor diffusers)."""
from .ddim import invert_ddim
from .direct import sample_direct_inversion
from .schedule import alpha_bar, ddim_sigmas, ddim_step, ddim_timesteps, eps_to_x0
from .types import (
    BRANCH_SOURCE,
    BRANCH_TARGET,
    OFFSET_MODES,
    Denoiser,
    DirectInversionResult,
    Inversion,
    OffsetTrajectory,
    StepCallback,
    check_finite,
)

__all__ = [
    "BRANCH_SOURCE",
    "BRANCH_TARGET",
    "OFFSET_MODES",
    "Denoiser",
    "DirectInversionResult",
    "Inversion",
    "OffsetTrajectory",
    "StepCallback",
    "alpha_bar",
    "check_finite",
    "ddim_sigmas",
    "ddim_step",
    "ddim_timesteps",
    "eps_to_x0",
    "invert_ddim",
    "sample_direct_inversion",
]
