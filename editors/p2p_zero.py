"""Pix2Pix-Zero: an edit direction in the text embedding and cross-attention guidance (Parmar et al., "Zero-shot
Image-to-Image Translation", SIGGRAPH 2023, Alg. 1; reference as the PnP Inversion benchmark runs it:
cure-lab/PnPInversion ``run_editing_pix2pix_zero.py`` and ``models/pix2pix_zero/edit_pipeline.py``).

Semantics, at every sampling step from level t:

- **Edit direction.** The target branch's conditioning is the source prompt's embedding plus
  Delta = mean_j E(target sentence j) - mean_i E(source sentence i), on every token (the node builds it:
  :func:`edit_direction`). Only the conditional input changes; the unconditional input stays the sampler's.
- **Reconstruction (source) branch.** Predicted from its conditional half alone (the reference samples it with the
  caption as both prompt and negative prompt, so its guidance is the identity). Its cross-attention probabilities
  M_ref are kept for every attn2 layer, per head.
- **Cross-attention guidance.** Before the target's prediction, its latent takes one gradient step

      x_t <- x_t - xa_guidance * grad_x L,   L = sum_layers 1/(2 H) sum_heads sum_(queries, tokens) (M_edit - M_ref)^2

  where M_edit are the target's cross-attention probabilities under the edited conditioning (its conditional half
  alone). The reference averages its loss over the batch of both CFG halves and the heads (``mean(0)`` over 2 H
  rows); the 1/2 keeps its step size, so ``xa_guidance`` means what the reference's ``guidance_amount`` means (0.1).
- Then the target is predicted, guided as usual, at the updated latent, and the DDIM step continues from it.

Where this differs from the reference code (on purpose; README, "Pix2Pix-Zero"): the reference runs the gradient
pass on its CFG batch, so the unconditional and conditional halves of the latent get separate gradient steps (the
unconditional half's loss compares maps under its negative prompt, the caption), the next latent continues from the
unconditional half and the conditional prediction is made at the other half. Here, as in the paper's Algorithm 1,
one latent takes the step of the edited conditioning's loss and both halves are predicted at it: one conditional
gradient pass instead of two, and no prediction mixes two latents.

The source's maps are computed from its queries and keys in float32 beside the backend's attention (which still
makes its output); the target's gradient pass computes its attn2 outputs from its own probabilities so the loss
differentiates through them. Self-attention layers are never touched.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch

from .attention import AttentionCall, AttentionLayer, Attend, EditController, attend_probs, attention_probs, chunk_rows
from ..inversion.types import BRANCH_SOURCE, BRANCH_TARGET, check_number

__all__ = ["P2PZeroController", "P2PZeroEditor", "edit_direction"]

REFERENCE_BATCH = 2  # the reference's loss averages over both CFG halves of its batch (see the module docstring)
# The loss is scaled by this power of two for the backward pass and the gradient unscaled (exactly): in a float16
# UNet the gradients reaching the queries (~1e-5) would otherwise fall below float16's normal range.
LOSS_SCALE = 2.0 ** 12
ENTRY_ERROR = ("P2P-Zero needs one conditioning entry per prompt, without areas, masks or timestep ranges (its "
               "maps are compared layer by layer); combine or remove the extra conditioning.")


def edit_direction(source: Sequence[torch.Tensor], target: Sequence[torch.Tensor]) -> torch.Tensor:
    """Delta = mean(target embeddings) - mean(source embeddings), each ``[1, tokens, dim]`` (or any equal shape).

    The reference's ``construct_direction``: the mean over each side's sentences of the text encoder's output."""
    if not source or not target:
        raise ValueError("The edit direction needs at least one source and one target sentence.")
    shapes = {tuple(e.shape) for e in (*source, *target)}
    if len(shapes) != 1:
        raise ValueError(f"The sentences encode to different shapes {sorted(shapes)}; keep every sentence within the "
                         f"text encoder's window (75 tokens) so all encode to the same number of tokens.")
    mean = lambda embeds: torch.stack([e.float() for e in embeds]).mean(0)  # noqa: E731
    return mean(target) - mean(source)


@dataclass(frozen=True)
class P2PZeroEditor:
    """A Pix2Pix-Zero edit (the EDITOR from the P2P-Zero Editor node). The edit direction is in the target
    conditioning the node makes (source + Delta); the editor holds the guidance.

    Attributes:
        xa_guidance: step size of the cross-attention guidance (reference ``xa_guidance`` 0.1); 0: the edit
            direction alone.
        record: keep, per guided step, the cross-attention loss before and after the step (one extra conditional
            UNet evaluation per step; for inspection and tests).
        source_conditioning: the reconstruction branch's conditioning in the backend's format (the node passes the
            source prompt it built the direction from); ``None``: the inversion's. EDICT keeps the inversion's.
    """

    xa_guidance: float = 0.1
    record: bool = False
    source_conditioning: Any = field(default=None, compare=False)

    kind = "p2p_zero"
    # The reference adds Direct Inversion's offsets to the edit branch too (its ``latent_list`` path): "both".
    default_offsets = "both"

    def __post_init__(self):
        check_number("P2P-Zero's xa_guidance", self.xa_guidance, 0.0, 100.0)

    def start(self, layers: Sequence[AttentionLayer], steps: int, latent_shape: Sequence[int]) -> "P2PZeroController":
        return P2PZeroController(self, layers, steps)


class P2PZeroController(EditController):
    """One run of a :class:`P2PZeroEditor` (see the module docstring)."""

    source_unguided = True  # the reference's reconstruction: the caption as prompt and negative prompt
    guides_target = True

    def __init__(self, editor: P2PZeroEditor, layers: Sequence[AttentionLayer], steps: int):
        self.editor = editor
        self.cross_keys = {layer.key for layer in layers if layer.cross}
        if not self.cross_keys:
            raise ValueError("P2P-Zero guides cross-attention maps, but this UNet has no cross-attention layers.")
        self.active = editor.xa_guidance > 0 or editor.record
        self.reference: dict = {}  # layer key -> the source's conditional probabilities [B, H, Q, K] of this step
        self.terms: Optional[dict] = None  # layer key -> its loss [B] while a target gradient pass runs
        self.records: list = []  # per guided step: {"step", "before", "after", "grad_rms"} when recording

    def wants(self, call: AttentionCall) -> bool:
        if not self.active or call.layer.key not in self.cross_keys:
            return False
        return call.branch == BRANCH_SOURCE or self.terms is not None

    def attention(self, q, k, v, call: AttentionCall, attend: Attend) -> torch.Tensor:
        rows = chunk_rows(call.chunks, q.shape[0], "cond")
        if len(rows) > 1:
            raise ValueError(ENTRY_ERROR)
        if not rows:
            return attend(q, k, v)
        s = rows[0]
        key = call.layer.key
        if call.branch == BRANCH_SOURCE:
            if key in self.reference:  # a second conditional call of this layer in one prediction: several entries
                raise ValueError(ENTRY_ERROR)
            with torch.no_grad():
                self.reference[key] = attention_probs(q[s], k[s], call.heads)
            return attend(q, k, v)
        if self.terms is None:
            return attend(q, k, v)
        reference = self.reference.get(key)
        if reference is None:
            raise RuntimeError("P2P-Zero: the source branch's cross-attention maps of this step are missing; the "
                               "source must be predicted (with its conditional half) before the target.")
        probs = attention_probs(q[s], k[s], call.heads)
        if key in self.terms or probs.shape != reference.shape:
            raise ValueError(ENTRY_ERROR)
        self.terms[key] = (probs - reference).pow(2).sum((2, 3)).sum(1) / (REFERENCE_BATCH * call.heads)
        if s == slice(0, q.shape[0]):
            return attend_probs(probs, v)
        out = attend(q, k, v).clone()
        out[s] = attend_probs(probs, v[s])
        return out

    def _loss(self, model, x: torch.Tensor, sigma: torch.Tensor, level: int) -> torch.Tensor:
        """The cross-attention loss per image ``[B]`` of the target at ``x`` (differentiable if x requires grad)."""
        self.terms = {}
        try:
            model(x, sigma, BRANCH_TARGET, level, guided=False)
            if set(self.terms) != set(self.reference):
                raise RuntimeError(f"P2P-Zero: the target's gradient pass reached {len(self.terms)} cross-attention "
                                   f"layers, the source's prediction {len(self.reference)}; they must be the same.")
            return torch.stack(list(self.terms.values())).sum(0)
        finally:
            self.terms = None

    def guide_target(self, model, x: torch.Tensor, sigma: torch.Tensor, level: int, step: int) -> torch.Tensor:
        """The target latent after one cross-attention guidance step (``model``: the core's Denoiser)."""
        if not self.active:
            return x
        try:
            return self._guide(model, x, sigma, level, step)
        finally:
            self.reference.clear()  # maps of this prediction only: a later step must bring its own

    def _guide(self, model, x: torch.Tensor, sigma: torch.Tensor, level: int, step: int) -> torch.Tensor:
        lr = self.editor.xa_guidance
        # Leave inference mode (ComfyUI's executor) and no_grad (the samplers): the latent gets a gradient. The
        # adapter has made the weights usable by autograd (autograd_weights); inputs are cloned into normal tensors.
        with torch.inference_mode(False), torch.enable_grad():
            latent = x.detach().clone().requires_grad_(True)
            level_sigma = sigma.detach().clone()
            loss = self._loss(model, latent, level_sigma, level)
            (grad,) = torch.autograd.grad(loss.sum() * LOSS_SCALE, latent)
            grad = grad.float() / LOSS_SCALE
            if not torch.isfinite(grad).all():
                raise ValueError(f"P2P-Zero's guidance gradient at step {step + 1} is NaN or infinite: the model "
                                 f"overflowed in half precision (start ComfyUI with --force-fp32).")
            guided = (latent - lr * grad).detach()
        if self.editor.record:
            with torch.no_grad():
                after = self._loss(model, guided.to(x.dtype), sigma, level)
            self.records.append({"step": step, "before": loss.detach().cpu(), "after": after.detach().cpu(),
                                 "grad_rms": grad.pow(2).mean().sqrt().item()})
        return guided.to(x.dtype)

    def finish(self) -> None:
        self.reference.clear()
        self.terms = None
