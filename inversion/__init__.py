"""Backend-agnostic inversion and Direct Inversion sampling (plain PyTorch; imports neither ComfyUI nor diffusers)."""
from .ddim import invert_ddim
from .direct import sample_direct_inversion
from .edict import EdictOptions, edict_levels, invert_edict, sample_edict
from .flowedit import FlowEditOptions, flow_edit
from .guidance import PROXIMAL_MODES, proximal_delta
from .methods import (
    METHODS,
    DdimOptions,
    EditPlan,
    InversionMethod,
    NegativePromptOptions,
    edit,
    edit_guidance,
    edit_source_conditioning,
    invert,
    inversion_guidance,
    method_named,
    method_options,
    methods_for,
)
from .null_text import NullTextOptions, NullTextResult, autograd_weights, optimize_null_text
from .schedule import alpha_bar, ddim_sigmas, ddim_step, ddim_timesteps, eps_to_x0
from .solvers import Euler, Midpoint
from .spaces import FLOW, SPACES, VP, Space, flow_sigmas, space_named
from .types import (
    BRANCH_SOURCE,
    BRANCH_TARGET,
    OFFSET_CHOICES,
    OFFSET_MODES,
    Denoiser,
    DirectInversionResult,
    EditController,
    Inversion,
    NullTextModel,
    OffsetTrajectory,
    StepCallback,
    check_finite,
    check_latent_layout,
    check_latent_values,
    check_number,
    check_step,
    resolve_offsets,
)

__all__ = [
    "FLOW", "FlowEditOptions", "flow_edit", "SPACES", "VP", "EditPlan", "Euler", "InversionMethod", "Midpoint", "Space", "flow_sigmas",
    "method_named", "methods_for", "space_named",
    "BRANCH_SOURCE", "BRANCH_TARGET", "METHODS", "OFFSET_CHOICES", "OFFSET_MODES", "PROXIMAL_MODES",
    "DdimOptions", "Denoiser", "DirectInversionResult", "EdictOptions", "EditController", "Inversion", "NegativePromptOptions",
    "NullTextModel", "NullTextOptions", "NullTextResult", "OffsetTrajectory", "StepCallback",
    "alpha_bar", "autograd_weights", "check_finite", "check_latent_layout", "check_latent_values", "check_number",
    "check_step", "ddim_sigmas", "ddim_step", "ddim_timesteps", "edict_levels",
    "edit", "edit_guidance", "edit_source_conditioning", "eps_to_x0", "invert", "invert_ddim", "inversion_guidance", "invert_edict", "method_options", "optimize_null_text",
    "proximal_delta", "resolve_offsets", "sample_direct_inversion", "sample_edict",
]
