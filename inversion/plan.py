"""What an inversion method is: one object holding its options, its inversion and its edit plan.

Each method is an :class:`InversionMethod` in its own module (``ddim``, ``null_text``, ``negative_prompt``,
``edict``; ``euler`` and ``rf_solver`` for flow models); ``methods`` lists them. The adapters never branch on a
method's name: they ask the method for its options, the guidance of its inversion, an :class:`EditPlan` (the
guidance of an edit, the source branch's conditioning, the unconditional input of every level, the CFG transform)
and hand its ``sample`` their Denoiser. Conditioning stays in the backend's format; where a method combines
conditionings (negative-prompt's interpolation) the adapter passes its own ``lerp``.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from .direct import sample_direct_inversion
from .ddim import invert_ddim
from .solvers import Euler
from .spaces import SPACES, VP, Space, space_named
from .types import Denoiser, DirectInversionResult, EditController, Inversion, StepCallback, check_number

__all__ = ["EditPlan", "InversionMethod", "NoOptions", "TrajectoryMethod"]

Lerp = Callable[[Any, Any, float], Any]


@dataclass
class NoOptions:
    """The method has no options beyond steps and guidance."""


@dataclass
class EditPlan:
    """How an edit of an inversion samples, in the backend's conditioning format.

    Attributes:
        guidance: the CFG scale of both branches.
        source: the source branch's conditioning.
        negative: the unconditional input of both branches (``None``: the backend's negative is not needed).
        negative_at: per trajectory level, the unconditional cross-attention context that replaces ``negative``'s
            (null-text's optimised embeddings), or ``None``.
        proximal: ``(mode, quantile)`` of proximal guidance applied to cond - uncond (see ``guidance``).
    """

    guidance: float
    source: Any
    negative: Any
    negative_at: Optional[Callable[[int], torch.Tensor]] = None
    proximal: tuple = ("none", 0.75)


class InversionMethod:
    """Base of the inversion methods: plain inversion at the given guidance, Direct Inversion sampling.

    Class attributes: ``name`` (what nodes, files and APIs call it), ``Options`` (a dataclass validating itself in
    ``__post_init__``), ``spaces`` (the model families it applies to, names of ``spaces.SPACES``), ``solver`` (the
    step of its inversion and sampling), ``uses_offsets`` (False where the method reconstructs exactly without
    Direct Inversion's offsets), ``summary`` (one line for messages).
    """

    name: str = ""
    Options: type = NoOptions
    spaces: tuple = ("vp",)
    solver = Euler()
    uses_offsets: bool = True
    needs_null_text: bool = False
    summary: str = ""

    # ---- options and applicability ----

    def options(self, overrides: Optional[dict] = None):
        """The options object from a dict of overrides (unknown names are an error)."""
        overrides = dict(overrides or {})
        known = {f.name for f in dataclasses.fields(self.Options)}
        unknown = set(overrides) - known
        if unknown:
            raise ValueError(f"{self.name} has no option(s) {', '.join(sorted(unknown))}; "
                             f"its options are: {', '.join(sorted(known)) or 'none'}.")
        return self.Options(**overrides)

    def check_space(self, space: Space, distilled: bool = False) -> None:
        """A clear error where the method does not apply to the model's family (``distilled``: the model is sampled
        without classifier-free guidance, like Flux, whose guidance is an embedding)."""
        if space.name not in self.spaces:
            from .methods import methods_for  # the registry imports the method modules

            needs = " or ".join(SPACES[name].requirement for name in self.spaces)
            raise ValueError(f"The {self.name} inversion needs {needs}; this model is {space.label}. For it choose "
                             f"one of: {', '.join(methods_for(space))}.")

    def levels(self, steps: int, options) -> int:
        """How many levels of a ``steps``-step schedule the trajectory holds."""
        return steps

    def inner_steps(self, options) -> int:
        """Progress-bar ticks per step after the inversion's own (null-text's inner iterations)."""
        return 0

    # ---- inversion ----

    def inversion_guidance(self, options, cfg: float) -> float:
        """The guidance of the inversion pass (the references invert at 1)."""
        return check_number("The inversion's cfg", cfg, 0.0, 100.0)

    def invert(self, options, model: Denoiser, z0: torch.Tensor, sigmas: torch.Tensor, space: Space = VP,
               null_text_model=None, callback: Optional[StepCallback] = None) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """``(z_star, sigmas, extras)`` as stored in an :class:`Inversion`; ``model`` guides with
        :meth:`inversion_guidance`."""
        self.check_space(space)
        return invert_ddim(model, z0, sigmas, callback=callback, space=space, solver=self.solver), sigmas, {}

    # ---- editing ----

    def edit_guidance(self, inversion: Inversion, cfg: float) -> float:
        return check_number("The sampler's cfg", cfg, 0.0, 100.0)

    def source_conditioning(self, inversion: Inversion, editor=None):
        """An editor's own source conditioning (Plug-and-Play's empty prompt), else the inversion's."""
        override = getattr(editor, "source_conditioning", None)
        return inversion.conditioning if override is None else override

    def plan(self, inversion: Inversion, cfg: float, negative, editor=None, lerp: Optional[Lerp] = None) -> EditPlan:
        """How an edit of ``inversion`` samples with the sampler's ``cfg`` and ``negative`` conditioning."""
        return EditPlan(guidance=self.edit_guidance(inversion, cfg), source=self.source_conditioning(inversion, editor),
                        negative=negative)

    def sample(self, model: Denoiser, inversion: Inversion, offsets: str = "source",
               x_target: Optional[torch.Tensor] = None, callback: Optional[StepCallback] = None,
               controller: Optional[EditController] = None) -> DirectInversionResult:
        """Both branches from the inversion (Direct Inversion; ``model`` guides with the plan's guidance)."""
        result = sample_direct_inversion(model, inversion.z_star, inversion.sigmas, x_target=x_target,
                                         offsets=offsets, callback=callback, controller=controller,
                                         space=space_named(inversion.space), solver=self.solver)
        result.editor_state = controller
        return result


class TrajectoryMethod(InversionMethod):
    """A plain trajectory method: ``ddim`` (VP), ``euler`` and ``rf_solver`` (flow) differ in family and step."""

    def __init__(self, name: str, spaces: tuple, solver, summary: str):
        unknown = set(spaces) - set(SPACES)
        if unknown:
            raise ValueError(f"unknown spaces {unknown}")
        self.name, self.spaces, self.solver, self.summary = name, spaces, solver, summary
