"""What an editor sees of a UNet's attention, and the attention arithmetic editors share (plain PyTorch).

An adapter describes the UNet's attention layers once (:class:`AttentionLayer`: where the layer sits, at which
downsampling factor, whether it is self- or cross-attention) and then, at every attention call the editor asked
for, hands the editor's controller the projected queries, keys and values with an :class:`AttentionCall` saying
which branch and trajectory level the call belongs to and what each chunk of the batch is. The controller returns
the attention output (before the output projection); it calls ``attend`` (the backend's own, optimised attention)
wherever it does not need the probabilities.

Batch layout: a call's batch is ``len(chunks)`` chunks of equal size, in the order of ``chunks``; chunk roles are
``"cond"`` (the branch's prompt) and ``"uncond"`` (the negative / null prompt).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Hashable, Optional, Sequence

import torch

__all__ = ["AttentionCall", "AttentionLayer", "Attend", "EditController", "FeatureCall", "attention_probs", "attend_probs", "check_mask_batch",
           "chunk_rows", "layer_orders", "query_grid"]

PLACES = ("down", "mid", "up")

Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class AttentionLayer:
    """One attention layer of a UNet.

    Attributes:
        key: the adapter's identifier of the layer (unique within the UNet).
        place: ``"down"``, ``"mid"`` or ``"up"``.
        factor: downsampling factor of its queries relative to the latent (1, 2, 4, 8).
        cross: True for cross-attention (keys from the prompt), False for self-attention.
        order: position among the UNet's layers of the same kind (self or cross), in forward order.
        block: index of the UNet block holding it among the blocks of its place, in forward order (ComfyUI's
            ``input_blocks`` / ``output_blocks`` index; the diffusers adapter counts its resnets the same way).
    """

    key: Hashable
    place: str
    factor: int
    cross: bool
    order: int
    block: int = 0


@dataclass(frozen=True)
class FeatureCall:
    """One evaluation of a decoder block's residual features (the block's last convolution, before the skip is
    added): the decoder block index, the branch and level of the prediction and the batch's chunk roles."""

    block: int
    branch: str
    level: int
    chunks: tuple


@dataclass(frozen=True)
class AttentionCall:
    """One attention call: the layer, the branch and level of the prediction, and the batch's chunk roles."""

    layer: AttentionLayer
    heads: int
    branch: str
    level: int
    chunks: tuple


def check_mask_batch(name: str, mask: Optional[torch.Tensor], latent_shape: Sequence[int]) -> None:
    """A user mask ``[H, W]`` or ``[B, H, W]`` must have batch 1 or the latents' batch."""
    if mask is not None and mask.ndim == 3 and mask.shape[0] not in (1, latent_shape[0]):
        raise ValueError(f"The {name} has batch {mask.shape[0]} but the latents have batch {latent_shape[0]}; give one "
                         f"mask for all images or one per image.")


def layer_orders(layers: Sequence[tuple]) -> list[AttentionLayer]:
    """AttentionLayers from ``(key, place, factor, cross, block)`` tuples in forward order (orders counted per
    kind)."""
    counts = {True: 0, False: 0}
    out = []
    for key, place, factor, cross, block in layers:
        if place not in PLACES:
            raise ValueError(f"unknown UNet place {place!r}")
        out.append(AttentionLayer(key=key, place=place, factor=int(factor), cross=bool(cross),
                                  order=counts[bool(cross)], block=int(block)))
        counts[bool(cross)] += 1
    return out


def chunk_rows(chunks: Sequence[str], batch: int, role: str) -> list[slice]:
    """Row slices of the chunks with ``role`` in a batch of ``batch`` rows."""
    if batch % len(chunks):
        raise ValueError(f"a batch of {batch} rows does not split into {len(chunks)} chunks")
    size = batch // len(chunks)
    return [slice(i * size, (i + 1) * size) for i, c in enumerate(chunks) if c == role]


def query_grid(latent_hw: Sequence[int], queries: int) -> tuple[int, int]:
    """The ``(h, w)`` grid of a layer's ``queries`` over a latent of size ``latent_hw`` (the UNet halves sizes
    rounding up)."""
    factor = math.sqrt(latent_hw[0] * latent_hw[1] / queries)
    h = round(latent_hw[0] / factor)
    if h <= 0 or h * (queries // h) != queries:
        raise ValueError(f"cannot place {queries} queries on a {tuple(latent_hw)} latent")
    return h, queries // h


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    b, n, d = x.shape
    return x.reshape(b, n, heads, d // heads).transpose(1, 2)


def attention_probs(q: torch.Tensor, k: torch.Tensor, heads: int) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) per head, in float32: ``[batch, heads, queries, keys]``."""
    qh, kh = _heads(q.float(), heads), _heads(k.float(), heads)
    scale = 1.0 / math.sqrt(qh.shape[-1])
    return torch.softmax(qh @ kh.transpose(-1, -2) * scale, dim=-1)


def attend_probs(probs: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Attention output of probabilities ``[b, h, n, m]`` over values ``[b, m, h*d]``: ``[b, n, h*d]`` in v's dtype."""
    b, h, n, _ = probs.shape
    vh = _heads(v.float(), h)
    return (probs @ vh).transpose(1, 2).reshape(b, n, -1).to(v.dtype)


class EditController:
    """Per-run state of an editor. Subclasses override what they need.

    ``wants(call)`` tells the adapter whether the controller needs to see a call at all (elsewhere the backend's
    attention runs untouched); ``attention`` computes a call's output; ``after_step`` may change the target latent
    after each sampling step (local blend); ``source_guided`` says whether the source branch needs its guided
    prediction (False: its conditional half alone, when offsets pin the source to the inversion anyway);
    ``source_unguided`` asks for the source's conditional half alone in every offset mode (Plug-and-Play's source
    is an unguided reconstruction). ``feature_blocks`` names the decoder blocks whose residual features the
    controller wants to see (``feature`` is then called with them at every prediction). ``guides_target`` says that
    the sampler must call ``guide_target`` before every target prediction (Pix2Pix-Zero's gradient step on the
    latent). ``idle_reason`` is set when the editor's settings make it do nothing in this run (the adapters warn with
    it).
    """

    idle_reason: Optional[str] = None
    source_guided: bool = False
    source_unguided: bool = False
    guides_target: bool = False
    feature_blocks: frozenset = frozenset()

    def wants(self, call: AttentionCall) -> bool:
        return False

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: AttentionCall,
                  attend: Attend) -> torch.Tensor:
        return attend(q, k, v)

    def feature(self, h: torch.Tensor, call: FeatureCall) -> torch.Tensor:
        return h

    def after_step(self, step: int, x_source: torch.Tensor, x_target: torch.Tensor) -> torch.Tensor:
        return x_target

    def guide_target(self, model, x: torch.Tensor, sigma: torch.Tensor, level: int, step: int) -> torch.Tensor:
        """The target latent to predict at, at sampling step ``step`` (``model``: the core's Denoiser, which the
        controller may evaluate); called only if ``guides_target``."""
        return x

    def finish(self) -> None:
        """Called once sampling has ended (normally or not): drop cached tensors."""

