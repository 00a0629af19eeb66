"""Negative-prompt inversion (Miyake et al., "Negative-prompt Inversion: Fast Image Inversion for Editing with
Text-guided Diffusion Models", 2023; as PnPInversion runs it, with its optional proximal guidance of Han et al.).

The inversion is plain DDIM (flow models: Euler) at guidance 1 with the source prompt. An edit then uses the source
prompt as the unconditional input of both branches (optionally interpolated toward the negative), so the source
branch's guided prediction is its conditional one whatever the guidance: reconstruction without optimisation. On
SD3 it carries over as is (the pooled vector is interpolated with the context); Flux dev is sampled without CFG
(guidance 1, its guidance is an embedding), where the edit is the Euler edit.
"""
from __future__ import annotations

from dataclasses import dataclass

from .guidance import PROXIMAL_MODES
from .plan import EditPlan, InversionMethod
from .types import Inversion

__all__ = ["NegativePromptMethod", "NegativePromptOptions"]


@dataclass
class NegativePromptOptions:
    """Negative-prompt inversion's edit settings, as in PnPInversion.

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


class NegativePromptMethod(InversionMethod):
    name = "negative_prompt"
    Options = NegativePromptOptions
    spaces = ("vp", "flow")
    summary = "DDIM/Euler inversion; edits take the source prompt as the negative (Miyake et al.)"

    def plan(self, inversion: Inversion, cfg: float, negative, editor=None, lerp=None) -> EditPlan:
        options = self.options(inversion.options)
        if options.interpolation == 0.0:
            unconditional = inversion.conditioning
        else:
            if lerp is None:
                raise ValueError("negative-prompt interpolation needs the backend's conditioning interpolation")
            unconditional = lerp(inversion.conditioning, negative, options.interpolation)
        return EditPlan(guidance=self.edit_guidance(inversion, cfg), source=self.source_conditioning(inversion, editor),
                        negative=unconditional, proximal=(options.proximal, options.quantile))
