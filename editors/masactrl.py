"""MasaCtrl: mutual self-attention control (Cao et al., "MasaCtrl: Tuning-free Mutual Self-Attention Control for
Consistent Image Synthesis and Editing", ICCV 2023; reference: TencentARC/MasaCtrl ``MutualSelfAttentionControl``,
``MutualSelfAttentionControlMask``, ``MutualSelfAttentionControlMaskAuto``; as used by PnPInversion).

From sampling step ``start_step`` on (an absolute step count, 4 of 50 in the reference) and at the self-attention
layers from ``start_layer`` on (counted in forward order over the UNet's transformer blocks: 10 of SD1.5's 16, the
decoder), the target's self-attention queries attend to the source's keys and values: the target's unconditional
half to the source's unconditional half, its conditional half to the source's conditional half. Cross-attention is
untouched. The source needs its guided (two-half) prediction, so an edit step costs 4 UNet samples.

Mask-guided: with a foreground mask M (a MASK input, or from the cross-attention of a chosen word), the target's
queries attend separately to the source's foreground keys (M_source = 1) and background keys (M_source = 0); the
two outputs are recombined with the target's mask, fg * M_target + bg * (1 - M_target). A user mask serves as both.
The automatic masks (``MaskAuto``) come from the cross-attention maps at the map level (the non-middle layers
nearest 1/4 of the latent resolution) of the current step, averaged over heads and layers, min-max normalised and
thresholded (0.1): the source word's maps from the source's prediction, the target word's from the target's layers
already run in this step; a layer reached before any target map exists attends without masks, as the reference.
Unlike the reference, which keeps the source's normalised map soft (only exact 0 / 1 values mask anything), both
automatic masks are thresholded.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from .attention import (AttentionCall, AttentionLayer, Attend, EditController, attention_probs, check_mask_batch, chunk_rows,
                        query_grid)
from ..inversion.types import check_number
from .p2p import map_factor

__all__ = ["MasaCtrlController", "MasaCtrlEditor", "default_start_layer", "masked_attention"]

REFERENCE_LAYERS, REFERENCE_START_LAYER = 16, 10  # SD1.5's transformer blocks and the reference's start layer


def default_start_layer(total: int) -> int:
    """The reference's start layer (10 of SD1.5's 16 blocks), at the same position of a UNet with ``total`` blocks
    (SDXL: 44 of 70)."""
    return round(total * REFERENCE_START_LAYER / REFERENCE_LAYERS)


@dataclass(frozen=True)
class MasaCtrlEditor:
    """A MasaCtrl edit (the EDITOR from the MasaCtrl Editor node).

    Attributes:
        start_step: first sampling step with mutual self-attention (reference 4).
        start_layer: first transformer block (forward order) with it; ``None``: :func:`default_start_layer`.
        mask: optional ``[1 or B, H, W]`` foreground mask of both images.
        source_positions, target_positions: token positions of the words whose cross-attention makes automatic
            masks (source word on the source image, target word on the edited one); empty: no automatic mask.
        mask_threshold: threshold of the automatic masks (reference 0.1).
        record: keep the target's inputs and outputs at every edited call (inspection and tests; memory heavy).
    """

    start_step: int = 4
    start_layer: Optional[int] = None
    mask: Optional[torch.Tensor] = field(default=None, compare=False)
    source_positions: tuple = ()
    target_positions: tuple = ()
    mask_threshold: float = 0.1
    record: bool = False

    kind = "masactrl"

    def __post_init__(self):
        if self.start_step < 0 or (self.start_layer is not None and self.start_layer < 0):
            raise ValueError("MasaCtrl's start_step and start_layer must be >= 0")
        if self.mask is not None and (self.source_positions or self.target_positions):
            raise ValueError("MasaCtrl takes either a mask or mask words, not both.")
        if bool(self.source_positions) != bool(self.target_positions):
            raise ValueError("MasaCtrl's automatic mask needs a word of the source prompt and one of the target prompt.")
        if self.mask is not None and self.mask.ndim not in (2, 3):
            raise ValueError(f"The MasaCtrl mask must be [H, W] or [B, H, W], got shape {tuple(self.mask.shape)}")
        check_number("MasaCtrl's mask_threshold", self.mask_threshold, 0.0, 1.0)

    @property
    def auto_mask(self) -> bool:
        return bool(self.source_positions)

    def start(self, layers: Sequence[AttentionLayer], steps: int, latent_shape: Sequence[int]) -> "MasaCtrlController":
        return MasaCtrlController(self, layers, steps, latent_shape)


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
                     key_mask: torch.Tensor) -> torch.Tensor:
    """Attention of q over the keys where ``key_mask`` (``[B, keys]`` bool) holds; rows with no key give 0."""
    b, n, _ = q.shape
    split = lambda t: t.float().reshape(b, t.shape[1], heads, -1).transpose(1, 2)  # noqa: E731
    qh, kh, vh = split(q), split(k), split(v)
    logits = qh @ kh.transpose(-1, -2) / math.sqrt(qh.shape[-1])
    logits = logits.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    probs = torch.softmax(logits, dim=-1).nan_to_num(0.0)
    return (probs @ vh).transpose(1, 2).reshape(b, n, -1).to(v.dtype)


class MasaCtrlController(EditController):
    source_guided = True  # the target's unconditional half attends to the source's unconditional half

    def __init__(self, editor: MasaCtrlEditor, layers: Sequence[AttentionLayer], steps: int, latent_shape):
        self.editor = editor
        self.steps = steps
        self.latent_hw = tuple(latent_shape[-2:])
        check_mask_batch("MasaCtrl mask", editor.mask, latent_shape)
        if editor.start_step >= steps:
            self.idle_reason = (f"MasaCtrl's start_step is {editor.start_step} but the edit has {steps} steps: mutual "
                                f"self-attention never starts and the edit runs without MasaCtrl. Lower start_step "
                                f"(reference: 4 of 50).")
        self_layers = [layer for layer in layers if not layer.cross]
        self.total_layers = len(self_layers)
        self.start_layer = editor.start_layer if editor.start_layer is not None else default_start_layer(len(self_layers))
        if self.start_layer >= len(self_layers):
            raise ValueError(f"MasaCtrl's start_layer is {self.start_layer} but this UNet has {len(self_layers)} "
                             f"transformer blocks (0 .. {len(self_layers) - 1}); use -1 for the default.")
        self.edited_keys = {layer.key for layer in self_layers if layer.order >= self.start_layer}
        factor = map_factor(layers)
        self.map_factor = factor
        self.map_keys = {layer.key for layer in layers if layer.cross and layer.place != "mid" and layer.factor == factor}
        self.cache: dict = {}
        self.maps: dict = {}  # branch -> (level, [maps [B, queries, tokens] of this step])
        self.records: list = []
        self.user_masks: dict = {}  # the user mask per query grid

    def step_of(self, level: int) -> int:
        return self.steps - level

    def wants(self, call: AttentionCall) -> bool:
        if self.step_of(call.level) < self.editor.start_step:
            return False
        if call.layer.cross:
            return self.editor.auto_mask and call.layer.key in self.map_keys
        return call.layer.key in self.edited_keys

    def attention(self, q, k, v, call: AttentionCall, attend: Attend) -> torch.Tensor:
        if call.layer.cross:
            self._store_maps(q, k, call)
            return attend(q, k, v)
        roles = {}
        for role in ("uncond", "cond"):
            rows = chunk_rows(call.chunks, q.shape[0], role)
            if len(rows) > 1:
                raise ValueError("MasaCtrl needs one conditioning entry per prompt (no area or combined conditioning).")
            if rows:
                roles[role] = rows[0]
        if call.branch == "source":
            # per role: ComfyUI may run the two halves as separate calls when memory is short
            self.cache.setdefault(call.layer.key, {}).update({role: (k[s], v[s]) for role, s in roles.items()})
            return attend(q, k, v)
        source = self.cache.get(call.layer.key)
        if source is None or any(role not in source for role in roles):
            raise RuntimeError("MasaCtrl: the source branch's keys and values of this step are missing; the source "
                               "must be predicted (with the same halves) before the target.")
        masks = self._masks(q.shape[1], call, q.device)
        out = q.new_empty(q.shape[:2] + v.shape[-1:], dtype=v.dtype)
        for role, s in roles.items():
            k_src, v_src = source[role]
            if masks is None:
                out[s] = attend(q[s], k_src, v_src)
            else:
                m_src, m_tgt = masks
                fg = masked_attention(q[s], k_src, v_src, call.heads, m_src)
                bg = masked_attention(q[s], k_src, v_src, call.heads, ~m_src)
                w = m_tgt[..., None].to(fg.dtype)
                out[s] = fg * w + bg * (1.0 - w)
            if self.editor.record:
                self.records.append({"step": self.step_of(call.level), "layer": call.layer, "role": role,
                                     "q": q[s].detach().cpu(), "k": k_src.detach().cpu(), "v": v_src.detach().cpu(),
                                     "out": out[s].detach().cpu(), "heads": call.heads,
                                     "masks": None if masks is None else tuple(m.cpu() for m in masks)})
        return out

    # -- masks ----------------------------------------------------------------------------------------------------
    def _store_maps(self, q, k, call: AttentionCall) -> None:
        rows = chunk_rows(call.chunks, q.shape[0], "cond")
        if not rows:
            return
        probs = attention_probs(q[rows[0]], k[rows[0]], call.heads).mean(1)
        level, maps = self.maps.get(call.branch, (None, []))
        if level != call.level:
            maps = []
        maps.append(probs)
        self.maps[call.branch] = (call.level, maps)

    def _word_mask(self, branch: str, positions: tuple, level: int, grid: tuple) -> Optional[torch.Tensor]:
        stored_level, maps = self.maps.get(branch, (None, []))
        if stored_level != level or not maps:
            return None
        average = torch.stack(maps).mean(0)  # [B, hw, tokens]
        h, w = query_grid(self.latent_hw, average.shape[1])
        image = average[..., [p for p in positions if p < average.shape[-1]]].sum(-1).reshape(-1, 1, h, w)
        low = image.amin(dim=(2, 3), keepdim=True)
        high = image.amax(dim=(2, 3), keepdim=True)
        image = (image - low) / (high - low).clamp_min(1e-12)
        image = F.interpolate(image, size=grid)
        return image.flatten(1) >= self.editor.mask_threshold

    def _masks(self, queries: int, call: AttentionCall, device) -> Optional[tuple]:
        """(source key mask, target query mask), each ``[B, queries]`` bool, or None (attend without masks)."""
        grid = query_grid(self.latent_hw, queries)
        if self.editor.mask is not None:
            if grid not in self.user_masks:  # one resize per layer resolution, not per call
                mask = self.editor.mask
                mask = mask[None] if mask.ndim == 2 else mask
                resized = F.interpolate(mask[:, None].float(), size=grid).flatten(1) > 0.5
                self.user_masks[grid] = resized.to(device)
            return self.user_masks[grid], self.user_masks[grid]
        if not self.editor.auto_mask:
            return None
        source = self._word_mask("source", self.editor.source_positions, call.level, grid)
        target = self._word_mask("target", self.editor.target_positions, call.level, grid)
        if source is None or target is None:
            return None
        return source, target

    def finish(self) -> None:
        self.cache.clear()
        self.maps.clear()
