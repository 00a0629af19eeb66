"""The inversion methods (one :class:`plan.InversionMethod` each) and the functions the adapters call through them.

=================  ===========  ==========================================  =====================================
method             families     unconditional input of both branches        sampling
=================  ===========  ==========================================  =====================================
ddim               VP           the sampler's negative                      Direct Inversion (offsets as chosen)
euler              flow         the sampler's negative                      Direct Inversion, Euler steps
rf_solver          flow         the sampler's negative                      Direct Inversion, RF-Solver's
                                                                            second-order (midpoint) steps
null_text          VP, flow     the per-step optimised embedding            Direct Inversion (offsets as chosen)
negative_prompt    VP, flow     the source prompt (lerp toward the          Direct Inversion (offsets as chosen),
                                negative by ``interpolation``)              optional proximal guidance
edict              VP           the sampler's negative                      EDICT's coupled update, guidance from
                                                                            the inversion (no offsets: it is exact)
=================  ===========  ==========================================  =====================================

VP: SD1.x/SD2.x/SDXL UNets (eps or v-prediction); flow: SD3/SD3.5 and Flux (see ``spaces``).
"""
from __future__ import annotations

import logging
from typing import Optional

import torch

from .edict import EdictMethod
from .negative_prompt import NegativePromptMethod, NegativePromptOptions
from .null_text import NullTextMethod
from .plan import EditPlan, InversionMethod, NoOptions, TrajectoryMethod
from .solvers import Euler, Midpoint
from .spaces import VP, Space
from .types import Denoiser, DirectInversionResult, EditController, Inversion, StepCallback

__all__ = ["METHODS", "DdimOptions", "EditPlan", "InversionMethod", "NegativePromptOptions", "edit", "edit_guidance",
           "edit_source_conditioning", "invert", "inversion_guidance", "method_named", "method_options",
           "methods_for"]

log = logging.getLogger("DirectInversion")

DdimOptions = NoOptions  # plain DDIM inversion has no options beyond steps and guidance

_REGISTRY: dict[str, InversionMethod] = {method.name: method for method in (
    TrajectoryMethod("ddim", ("vp",), Euler(), "DDIM inversion (UNet models)"),
    NullTextMethod(),
    NegativePromptMethod(),
    EdictMethod(),
    TrajectoryMethod("euler", ("flow",), Euler(), "Euler inversion of the flow ODE (flow models)"),
    TrajectoryMethod("rf_solver", ("flow",), Midpoint(),
                     "RF-Solver's second-order inversion, two evaluations per step (flow models)"),
)}

METHODS = tuple(_REGISTRY)


def method_named(name: str) -> InversionMethod:
    if name not in _REGISTRY:
        raise ValueError(f"Unknown inversion method {name!r}; available: {', '.join(METHODS)}.")
    return _REGISTRY[name]


def methods_for(space: Space) -> tuple[str, ...]:
    """The methods that apply to a model family."""
    return tuple(name for name, method in _REGISTRY.items() if space.name in method.spaces)


def method_options(method: str, options: Optional[dict] = None):
    """The options object of ``method`` from a dict of overrides (unknown names are an error)."""
    return method_named(method).options(options)


def inversion_guidance(method: str, options, cfg: float) -> float:
    """Guidance of the inversion pass: EDICT uses its own (3 in the reference), the others ``cfg`` (reference 1)."""
    return method_named(method).inversion_guidance(options, cfg)


def edit_guidance(inversion: Inversion, cfg: float) -> float:
    """Guidance of an edit: EDICT keeps the guidance it was inverted with (the reference uses 3 for both)."""
    return method_named(inversion.method).edit_guidance(inversion, cfg)


def edit_source_conditioning(inversion: Inversion, editor=None):
    """The source branch's conditioning of an edit (see ``InversionMethod.source_conditioning``)."""
    return method_named(inversion.method).source_conditioning(inversion, editor)


@torch.no_grad()
def invert(method: str, options, model: Denoiser, z0: torch.Tensor, sigmas: torch.Tensor,
           null_text_model=None, callback: Optional[StepCallback] = None,
           space: Space = VP) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Run ``method``'s inversion. Returns ``(z_star, sigmas, extras)`` as stored in an :class:`Inversion`.

    ``model`` must guide with :func:`inversion_guidance`; ``null_text_model`` is needed for null-text only.
    """
    return method_named(method).invert(options, model, z0, sigmas, space=space, null_text_model=null_text_model,
                                       callback=callback)


@torch.no_grad()
def edit(model: Denoiser, inversion: Inversion, offsets: str = "source", x_target: Optional[torch.Tensor] = None,
         callback: Optional[StepCallback] = None, controller: Optional[EditController] = None) -> DirectInversionResult:
    """Sample the source and target branches from an inversion, as its method prescribes (``controller``: an
    editor's per-run state, see :class:`EditController`). An editor whose settings make it do nothing is warned about
    (its ``idle_reason``)."""
    idle = getattr(controller, "idle_reason", None)
    if idle:
        log.warning("[DirectInversion] %s", idle)
    return method_named(inversion.method).sample(model, inversion, offsets=offsets, x_target=x_target,
                                                 callback=callback, controller=controller)
