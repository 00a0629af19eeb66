"""Plain data passed between the core, the adapters and the nodes.

Nothing here knows about ComfyUI or diffusers: conditioning is stored as whatever the backend that made an
inversion uses (a ComfyUI CONDITIONING list, a diffusers embedding tensor) and handed back to that backend.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Protocol

import torch

__all__ = [
    "BRANCH_SOURCE",
    "BRANCH_TARGET",
    "OFFSET_CHOICES",
    "OFFSET_MODES",
    "Denoiser",
    "DirectInversionResult",
    "EditController",
    "Inversion",
    "NullTextModel",
    "OffsetTrajectory",
    "StepCallback",
    "check_finite",
    "check_latent_layout",
    "check_latent_values",
    "check_number",
    "check_step",
]

BRANCH_SOURCE = "source"
BRANCH_TARGET = "target"

# Where Direct Inversion's per-step offsets go (PnP Inversion, Ju et al. 2024, Sec. 4 and its ablations):
#   source: the source branch only (the paper's method);
#   both:   source and target (ablation "add-target": an identity edit is exact, edits are weaker);
#   off:    nowhere (plain DDIM inversion + sampling, the baseline).
OFFSET_MODES = ("source", "both", "off")
# What users choose from: a mode, or "auto", the editor's own default (``default_offsets``: Pix2Pix-Zero's "both", as
# its reference adds the offsets to the edit branch too; "source" for the other editors and without one).
OFFSET_CHOICES = ("auto",) + OFFSET_MODES


def resolve_offsets(offsets: str, editor=None) -> str:
    """The offset mode an edit runs with: ``offsets``, or for "auto" the editor's default (else "source")."""
    if offsets not in OFFSET_CHOICES:
        raise ValueError(f"offsets must be one of {OFFSET_CHOICES}, got {offsets!r}")
    if offsets == "auto":
        return getattr(editor, "default_offsets", "source")
    return offsets

StepCallback = Callable[[dict], None]


class Denoiser(Protocol):
    """What the core needs from a diffusion model: a guided noise prediction per branch.

    ``z`` is a VP latent (the UNet's input), ``sigma`` a 0-dim tensor noise level on z's device, ``branch``
    one of :data:`BRANCH_SOURCE` / :data:`BRANCH_TARGET`, ``level`` the index of ``sigma`` in the trajectory's
    sigmas (adapters use it for per-level conditioning such as null-text embeddings). The adapter picks the
    branch's conditioning, applies classifier-free guidance with its negative conditioning and returns eps
    with z's shape and dtype. ``guided=False`` asks for the conditional prediction alone (no unconditional
    evaluation); only samplers whose result does not depend on it ask (see ``sample_direct_inversion``).
    """

    def __call__(self, z: torch.Tensor, sigma: torch.Tensor, branch: str, level: int,
                 guided: bool = True) -> torch.Tensor: ...


class EditController(Protocol):
    """What the samplers need from an editor's per-run state (the attention side is the adapters' business).

    ``source_guided``: whether the source branch's prediction must be guided even when offsets pin it to the
    inversion; ``source_unguided``: whether the source branch is predicted from its conditional half alone in every
    offset mode (an editor whose source is an unguided reconstruction); ``after_step(n, x_source, x_target)``
    returns the target latent after sampling step n (0 = first); with ``guides_target``, ``guide_target(model, x,
    sigma, level, n)`` returns the latent the target is predicted at (and stepped from), called after the source's
    prediction of the same step (Pix2Pix-Zero's cross-attention guidance).
    """

    source_guided: bool
    source_unguided: bool
    guides_target: bool

    def after_step(self, step: int, x_source: torch.Tensor, x_target: torch.Tensor) -> torch.Tensor: ...

    def guide_target(self, model: Denoiser, x: torch.Tensor, sigma: torch.Tensor, level: int,
                     step: int) -> torch.Tensor: ...


class NullTextModel(Protocol):
    """What null-text optimisation needs: the source prompt's eps and a differentiable unconditional eps.

    ``eps_null(z, sigma, embedding)`` must be differentiable with respect to ``embedding`` (a cross-attention
    context of the null prompt's shape); ``null_embedding`` is where the optimisation starts.
    """

    null_embedding: torch.Tensor

    def eps_source(self, z: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor: ...

    def eps_null(self, z: torch.Tensor, sigma: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor: ...


@dataclass
class Inversion:
    """An inverted image: the trajectory z*_0 .. z*_T and what is needed to use it safely.

    Attributes:
        method: one of ``methods.METHODS`` (``"ddim"``, ``"null_text"``, ``"negative_prompt"``, ``"edict"``;
            ``"euler"``, ``"rf_solver"`` on flow models).
        z_star: ``[steps + 1, B, C, H, W]`` latents in the model's latent space (VP scaling on VP models); ``z_star[0]`` is the
            source latent, ``z_star[-1]`` is z*_T.
        sigmas: ``[steps + 1]`` float64 noise levels of ``z_star``, ascending (see ``schedule.ddim_sigmas``).
        timesteps: the ``steps`` training timesteps of the DDIM steps, ascending.
        cfg: guidance scale the inversion was run with.
        conditioning: the source conditioning, in the format of the backend that made it.
        negative: the negative conditioning used for guidance during inversion (``None`` if cfg == 1).
        model_family: identifies the kind of model (architecture and prediction type); an inversion is only
            valid for the same family.
        options: method options (see each method's ``*Options``), as plain JSON-able values.
        extras: method-specific tensors: ``null_embeddings`` (null-text, ``[steps, 1, tokens, dim]`` in sampling
            order: row n is the unconditional context of the step from level ``steps - n``), ``y_star``
            (EDICT's second latent sequence, like ``z_star``).
        fingerprint: a hash of the model weights the inversion was made with ("" if unknown).
        space: the model family's parametrisation, ``"vp"`` or ``"flow"`` (see ``spaces``): how ``z_star`` is
            scaled and stepped.
    """

    method: str
    z_star: torch.Tensor
    sigmas: torch.Tensor
    timesteps: list[int]
    cfg: float
    conditioning: Any
    negative: Any
    model_family: str
    options: dict = field(default_factory=dict)
    extras: dict = field(default_factory=dict)
    fingerprint: str = ""
    space: str = "vp"

    @property
    def steps(self) -> int:
        return self.z_star.shape[0] - 1

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return tuple(self.z_star.shape[1:])

    def check_model(self, model_family: str, space: str = "vp") -> None:
        """A clear error unless the model is of the family the inversion was made with."""
        if space != self.space:
            from .spaces import space_named

            raise ValueError(
                f"This inversion was made with {space_named(self.space).label} ('{self.model_family}') and cannot be "
                f"used with {space_named(space).label} ('{model_family}'): the two families move latents along "
                f"different trajectories. Invert the image again with the model you sample with."
            )
        if model_family != self.model_family:
            raise ValueError(
                f"This inversion was made with a '{self.model_family}' model but is used with a "
                f"'{model_family}' model. Invert the image again with the model you sample with."
            )

    def check_latent(self, latent: torch.Tensor, what: str = "latent") -> None:
        if tuple(latent.shape) != self.latent_shape:
            raise ValueError(
                f"The {what} has shape {tuple(latent.shape)} (batch, channels, height, width) but the inversion "
                f"was made from a latent of shape {self.latent_shape}. Use the same image size and batch."
            )


@dataclass
class DirectInversionResult:
    """Output of :func:`inversion.direct.sample_direct_inversion`.

    Attributes:
        edited: ``[B, C, H, W]`` the target branch's final latent.
        source: ``[B, C, H, W]`` the source branch's final latent (the reconstruction).
        offsets: ``[steps, B, C, H, W]`` o_t = z*_{t-1} - step(z*_t), in sampling order (first row: the step
            from z*_T); recorded in every offset mode, applied as the mode says; ``None`` for EDICT and when an
            editor ran with offsets on the source only (the source's unconditional half is then not evaluated).
        editor_state: the editor's per-run controller, if an editor ran (attention maps, records).
    """

    edited: torch.Tensor
    source: torch.Tensor
    offsets: Optional[torch.Tensor]
    editor_state: Any = None


@dataclass
class OffsetTrajectory:
    """Direct Inversion's per-step offsets, as passed between nodes (type DI_OFFSETS).

    Attributes:
        offsets: ``[steps, B, C, H, W]`` in the model's latent space; row n belongs to the step from
            ``sigmas[n]`` to ``sigmas[n + 1]``; ``None`` where the method has none (EDICT).
        sigmas: ``[steps + 1]`` noise levels in sampling order (descending).
        mode: the offset mode they were applied with (see :data:`OFFSET_MODES`).
    """

    offsets: Optional[torch.Tensor]
    sigmas: torch.Tensor
    mode: str


def check_finite(name: str, tensor: torch.Tensor) -> None:
    """Raise a ValueError naming ``name`` if the tensor holds NaN or infinity."""
    if not torch.isfinite(tensor).all():
        bad = (~torch.isfinite(tensor)).sum().item()
        raise ValueError(f"The {name} contains {bad} NaN or infinite values; check the image and VAE that made it.")


# The VAE latents of SD1.x/SD2.x/SDXL, scaled as the UNet sees them, lie within about +-50; a latent far beyond that
# cannot come from an image, and its DDIM steps overflow (half precision ends at 65504).
LATENT_LIMIT = 1e4


def check_latent_values(name: str, tensor: torch.Tensor) -> None:
    """Raise a ValueError if a latent holds NaN/infinity or values no VAE gives (beyond +-``LATENT_LIMIT``)."""
    if not tensor.is_floating_point():
        raise ValueError(f"The {name} has dtype {tensor.dtype}; a latent must be floating point.")
    check_finite(name, tensor)
    peak = tensor.abs().max().item() if tensor.numel() else 0.0
    if peak > LATENT_LIMIT:
        raise ValueError(f"The {name} has values up to {peak:.3g}, far outside a VAE latent's range (about +-50); "
                         f"encode the image with the model's VAE.")


def check_latent_layout(name: str, latent: torch.Tensor, channels: int) -> None:
    """Raise a ValueError unless ``latent`` is an image latent ``[B, channels, H, W]`` of the model's channel count."""
    if latent.ndim != 4:
        raise ValueError(f"The {name} has shape {tuple(latent.shape)}; an image latent [batch, channels, height, "
                         f"width] is needed (video and audio latents are not supported).")
    if latent.shape[1] != channels:
        raise ValueError(f"The {name} has {latent.shape[1]} channels but this model works on {channels}-channel "
                         f"latents: encode the image with this model's VAE (SD3 and Flux VAEs make 16 channels, "
                         f"SD1.x/SD2.x/SDXL's 4).")


def check_number(name: str, value, low: Optional[float] = None, high: Optional[float] = None) -> float:
    """``value`` as a float, or a ValueError if it is not a finite number within [``low``, ``high``]."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}.") from None
    if not math.isfinite(number):
        raise ValueError(f"{name} must be a finite number, got {value!r}.")
    if (low is not None and number < low) or (high is not None and number > high):
        bounds = f"[{low if low is not None else '-inf'}, {high if high is not None else 'inf'}]"
        raise ValueError(f"{name} must be in {bounds}, got {number:g}.")
    return number


INVERSION_CAUSE = ("an extreme inversion cfg, or the model overflowing in half precision (start ComfyUI with "
                   "--force-fp32)")
SAMPLING_CAUSE = ("a guidance scale or editor setting (such as P2P reweight values) too extreme for this model, or the "
                  "model overflowing in half precision (start ComfyUI with --force-fp32)")


def check_step(phase: str, step: int, steps: int, latents: dict, cause: str) -> None:
    """Stop a loop at the first step that made a latent non-finite.

    ``latents`` maps a branch name to its latent(s) after step ``step`` (0-based) of ``steps``; ``cause`` says what
    usually does it. One host sync per step (a sum is finite only if every value is), next to a UNet evaluation's
    cost; the branch is looked for only once a step went wrong."""
    flat = {branch: list(t) if isinstance(t, (list, tuple)) else [t] for branch, t in latents.items()}
    total = sum(tensor.float().sum() for tensors in flat.values() for tensor in tensors)
    if bool(torch.isfinite(total)):
        return
    for branch, tensors in flat.items():
        if not all(bool(torch.isfinite(tensor).all()) for tensor in tensors):
            raise ValueError(f"{phase.capitalize()} step {step + 1} of {steps} made the {branch} latent NaN or "
                             f"infinite. Likely cause: {cause}.")

