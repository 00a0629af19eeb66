"""The four inversion methods: their options and how an edit samples from each (shared by both adapters).

How each method's edit differs (what the adapters do with the negative/unconditional input):

=================  ==========================================  ===========================================
method             unconditional input of both branches        sampling
=================  ==========================================  ===========================================
ddim               the sampler's negative                      Direct Inversion (offsets as chosen)
null_text          the per-step optimised embedding            Direct Inversion (offsets as chosen)
negative_prompt    the source prompt (lerp toward the          Direct Inversion (offsets as chosen),
                   negative by ``interpolation``)              optional proximal guidance
edict              the sampler's negative                      EDICT's coupled update, guidance from the
                                                               inversion (no offsets: it is exact already)
=================  ==========================================  ===========================================
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Optional

import torch

from .ddim import invert_ddim
from .direct import sample_direct_inversion
from .edict import EdictOptions, edict_levels, invert_edict, sample_edict
from .guidance import PROXIMAL_MODES
from .null_text import NullTextOptions, optimize_null_text
from .types import Denoiser, DirectInversionResult, EditController, Inversion, StepCallback, check_number

__all__ = ["METHODS", "DdimOptions", "NegativePromptOptions", "edit", "edit_guidance", "edit_source_conditioning", "invert", "inversion_guidance",
           "method_options"]

METHODS = ("ddim", "null_text", "negative_prompt", "edict")

log = logging.getLogger("DirectInversion")


@dataclass
class DdimOptions:
    """Plain DDIM inversion has no options beyond steps and guidance."""


@dataclass
class NegativePromptOptions:
    """Negative-prompt inversion (Miyake et al., "Negative-prompt Inversion", 2023), as in PnPInversion.

    interpolation: 0 uses the source prompt as the unconditional input; 1 the negative (null) prompt
        (the reference's ``npi_interp``).
    proximal: proximal guidance at edit time, ``none``, ``l0`` (the reference's PIE-Bench setting) or ``l1``.
    quantile: the proximal threshold's quantile of |eps_c - eps_u| (reference 0.75).
    """

    interpolation: float = 0.0
    proximal: str = "none"
    quantile: float = 0.75

    def __post_init__(self):
        if not 0.0 <= self.interpolation <= 1.0:
            raise ValueError(f"negative-prompt interpolation must be in [0, 1], got {self.interpolation}")
        if self.proximal not in PROXIMAL_MODES:
            raise ValueError(f"proximal guidance must be one of {PROXIMAL_MODES}, got {self.proximal!r}")
        if not -1.0 <= self.quantile < 1.0:
            raise ValueError(f"proximal quantile must be in [-1, 1), got {self.quantile}")


_OPTIONS = {"ddim": DdimOptions, "null_text": NullTextOptions, "negative_prompt": NegativePromptOptions,
            "edict": EdictOptions}


def method_options(method: str, options: Optional[dict] = None):
    """The options object of ``method`` from a dict of overrides (unknown names are an error)."""
    if method not in _OPTIONS:
        raise ValueError(f"Unknown inversion method {method!r}; available: {', '.join(METHODS)}.")
    cls = _OPTIONS[method]
    options = dict(options or {})
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(options) - known
    if unknown:
        raise ValueError(f"{method} has no option(s) {', '.join(sorted(unknown))}; "
                         f"its options are: {', '.join(sorted(known)) or 'none'}.")
    return cls(**options)


def edit_guidance(inversion: Inversion, cfg: float) -> float:
    """Guidance of an edit: EDICT keeps the guidance it was inverted with (the reference uses 3 for both)."""
    check_number("The sampler's cfg", cfg, 0.0, 100.0)
    if inversion.method == "edict":
        return method_options("edict", inversion.options).guidance
    return cfg


def edit_source_conditioning(inversion: Inversion, editor=None):
    """The source branch's conditioning of an edit: an editor's own (Plug-and-Play's empty prompt), except for EDICT,
    whose source pair retraces the inversion only with the prompt it was inverted with; else the inversion's."""
    override = getattr(editor, "source_conditioning", None)
    return inversion.conditioning if override is None or inversion.method == "edict" else override


@torch.no_grad()
def edit(model: Denoiser, inversion: Inversion, offsets: str = "source", x_target: Optional[torch.Tensor] = None,
         callback: Optional[StepCallback] = None, controller: Optional[EditController] = None) -> DirectInversionResult:
    """Sample the source and target branches from an inversion, as its method prescribes (``controller``: an
    editor's per-run state, see :class:`EditController`). An editor whose settings make it do nothing is warned about
    (its ``idle_reason``)."""
    idle = getattr(controller, "idle_reason", None)
    if idle:
        log.warning("[DirectInversion] %s", idle)
    if inversion.method == "edict":
        if x_target is not None:
            raise ValueError("EDICT edits start from the inverted pair; a target start latent cannot be used.")
        options = method_options("edict", inversion.options)
        result = sample_edict(model, inversion.z_star[-1], inversion.extras["y_star"][-1], inversion.sigmas,
                              options, callback, controller=controller)
        return DirectInversionResult(edited=result.edited, source=result.source, offsets=None, editor_state=controller)
    result = sample_direct_inversion(model, inversion.z_star, inversion.sigmas, x_target=x_target, offsets=offsets,
                                     callback=callback, controller=controller)
    result.editor_state = controller
    return result


def inversion_guidance(method: str, options, cfg: float) -> float:
    """Guidance of the inversion pass: EDICT uses its own (3 in the reference), the others ``cfg`` (reference 1)."""
    check_number("The inversion's cfg", cfg, 0.0, 100.0)
    return options.guidance if method == "edict" else cfg


@torch.no_grad()
def invert(method: str, options, model: Denoiser, z0: torch.Tensor, sigmas: torch.Tensor,
           null_text_model=None, callback: Optional[StepCallback] = None) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Run ``method``'s inversion. Returns ``(z_star, sigmas, extras)`` as stored in an :class:`Inversion`.

    ``model`` must guide with :func:`inversion_guidance`; ``null_text_model`` is needed for null-text only.
    """
    if method == "edict":
        top = edict_levels(len(sigmas) - 1, options.strength)
        x_star, y_star = invert_edict(model, z0, sigmas[:top + 1], options, callback)
        return x_star, sigmas[:top + 1].clone(), {"y_star": y_star}
    z_star = invert_ddim(model, z0, sigmas, callback=callback)
    if method != "null_text":
        return z_star, sigmas, {}
    if null_text_model is None:
        raise ValueError("null-text inversion needs a NullTextModel")
    result = optimize_null_text(null_text_model, z_star, sigmas, options, callback)
    losses = torch.full((len(result.losses), options.inner_steps), float("nan"), dtype=torch.float64)
    for n, history in enumerate(result.losses):
        losses[n, :len(history)] = torch.tensor(history, dtype=torch.float64)
    return z_star, sigmas, {"null_embeddings": result.embeddings.detach(), "null_text_losses": losses,
                            "null_text_thresholds": torch.tensor(result.thresholds, dtype=torch.float64)}
