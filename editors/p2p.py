"""Prompt-to-Prompt attention control (Hertz et al., "Prompt-to-Prompt Image Editing with Cross Attention Control",
ICLR 2023; reference: google/prompt-to-prompt ``AttentionControlEdit``, ``LocalBlend``; as used by PnPInversion).

Semantics, with n the sampling step (0 = the first step, from z_T) of a run of N steps:

- cross-attention, every layer, n < int(cross_replace_steps * N): the target's conditional maps are replaced by
  the source's mapped maps (replace: through the word mapping; refine: along the global alignment, new tokens keep
  their own), then scaled per token by the equalizer (reweight). Elsewhere the target's maps are its own.
- self-attention, layers with at most ``self_max_queries`` queries (32 x 32), n < int(self_replace_steps * N): the
  target's conditional self-attention probabilities are the source's (values stay the target's).
- unconditional halves are never edited.
- local blend, from step int(blend_start * N) on: the cross-attention maps of the blend words (source words on the
  source's maps, target words on the target's maps) at the map level (the non-middle layers nearest 1/4 of the
  latent resolution, 16 x 16 for a 512-px image), summed over the steps so far, averaged over heads and layers,
  max-pooled 3 x 3, resized to the latent (nearest), normalised by their maximum and thresholded; the union of the
  two is the region the edit may change. Outside it the target latent is set to the source branch's latent. A user
  mask (1 = may change) can take the place of the words.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from .attention import (AttentionCall, AttentionLayer, Attend, EditController, attend_probs, attention_probs,
                        check_mask_batch, chunk_rows, query_grid)
from ..inversion.types import check_number
from .p2p_alignment import TokenizedPrompt, auto_mode, equalizer, refinement_mapper, replacement_mapper, word_positions

__all__ = ["P2P_MODES", "LocalBlend", "P2PController", "P2PEditor", "prompt_to_prompt"]

P2P_MODES = ("auto", "replace", "refine")
REWEIGHT_LIMIT = 100.0  # |scale| of a word's attention: beyond it a value only makes the attention overflow
MAP_FACTOR = 4  # 16 x 16 maps for a 64 x 64 latent, as the reference's local blend and attention views
SELF_MAX_QUERIES = 32 * 32


@dataclass(frozen=True)
class P2PEditor:
    """A Prompt-to-Prompt edit (the EDITOR passed from the P2P Editor node to the sampler).

    Attributes:
        mode: ``replace`` or ``refine`` (``auto`` is resolved by :func:`prompt_to_prompt`).
        source, target: the tokenised prompts (token positions as in the text encoder's output).
        cross_replace_steps, self_replace_steps: fractions of the steps with cross / self-attention replaced.
        reweight: ``((word, value), ...)`` scales of the target's attention on words of the target prompt.
        blend_source_words, blend_target_words: words whose maps form the local-blend region.
        blend_threshold: local blend's threshold on the normalised maps (reference 0.3).
        blend_start: fraction of the steps after which local blend acts (reference 0.2).
        mask: optional ``[1 or B, H, W]`` region the edit may change (1) instead of blend words.
        record: keep every edited cross-attention map of both branches and every local-blend mask (for inspection
            and tests; memory heavy).
        encoders: ``((key, source, target, window), ...)``: the prompts' positions per text encoder (tokenizer key,
            e.g. ``"l"``, ``"t5xxl"``), for models that read several encoders' states as separate tokens (SD3, Flux);
            empty: ``source`` / ``target`` are the positions of every encoder.
    """

    mode: str
    source: TokenizedPrompt
    target: TokenizedPrompt
    cross_replace_steps: float = 0.4
    self_replace_steps: float = 0.6
    reweight: tuple = ()
    blend_source_words: tuple = ()
    blend_target_words: tuple = ()
    blend_threshold: float = 0.3
    blend_start: float = 0.2
    mask: Optional[torch.Tensor] = field(default=None, compare=False)
    max_tokens: int = 77
    record: bool = False
    encoders: tuple = field(default=(), compare=False)

    kind = "prompt_to_prompt"

    @property
    def local_blend(self) -> bool:
        return self.mask is not None or bool(self.blend_source_words or self.blend_target_words)

    def cross_mapping(self) -> tuple:
        """``("replace", M [m, m])`` or ``("refine", index [m], alphas [m])`` over ``max_tokens`` positions."""
        if self.mode == "replace":
            return ("replace", replacement_mapper(self.source, self.target, self.max_tokens))
        index, alphas = refinement_mapper(self.source, self.target, self.max_tokens)
        return ("refine", index, alphas)

    def equalizer(self) -> Optional[torch.Tensor]:
        if not self.reweight:
            return None
        words, values = zip(*self.reweight)
        return equalizer(self.target, words, values, self.max_tokens)

    def start(self, layers: Sequence[AttentionLayer], steps: int, latent_shape: Sequence[int]) -> "P2PController":
        return P2PController(self, layers, steps, latent_shape)


def _fraction(name: str, value: float) -> float:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} is a fraction of the steps and must be in [0, 1], got {value}")
    return float(value)


def prompt_to_prompt(source: TokenizedPrompt, target: TokenizedPrompt, mode: str = "auto",
                     cross_replace_steps: float = 0.4, self_replace_steps: float = 0.6,
                     reweight: Sequence[tuple] = (), blend_source_words: Sequence[str] = (),
                     blend_target_words: Sequence[str] = (), blend_threshold: float = 0.3, blend_start: float = 0.2,
                     mask: Optional[torch.Tensor] = None, max_tokens: int = 77, encoders: Sequence[tuple] = ()) -> P2PEditor:
    """A checked :class:`P2PEditor`: resolves ``auto``, and fails now (not mid-sampling) on words not in their
    prompt, replace with different word counts, prompts longer than ``max_tokens`` or a mask with blend words."""
    if mode not in P2P_MODES:
        raise ValueError(f"Prompt-to-Prompt mode must be one of {P2P_MODES}, got {mode!r}")
    for prompt in (source, target):
        if len(prompt) > max_tokens:
            raise ValueError(f"The prompt {prompt.text!r} has {len(prompt)} tokens but the text encoder's window is "
                             f"{max_tokens}; shorten it for Prompt-to-Prompt.")
    if mode == "auto":
        mode = auto_mode(source, target)
    reweight = tuple((str(w), check_number(f"The reweight value of {w!r}", v, -REWEIGHT_LIMIT, REWEIGHT_LIMIT))
                     for w, v in reweight)
    editor = P2PEditor(mode=mode, source=source, target=target,
                       cross_replace_steps=_fraction("cross_replace_steps", cross_replace_steps),
                       self_replace_steps=_fraction("self_replace_steps", self_replace_steps), reweight=reweight,
                       blend_source_words=tuple(blend_source_words), blend_target_words=tuple(blend_target_words),
                       blend_threshold=float(blend_threshold), blend_start=_fraction("blend_start", blend_start),
                       mask=None if mask is None else mask.float(), max_tokens=max_tokens, encoders=tuple(encoders))
    editor.cross_mapping()  # replace with different word counts fails here
    editor.equalizer()  # a reweight word not in the target prompt fails here
    for word in editor.blend_source_words:
        word_positions(source, word)
    for word in editor.blend_target_words:
        word_positions(target, word)
    if mask is not None and (editor.blend_source_words or editor.blend_target_words):
        raise ValueError("Local blend takes either blend words or a mask, not both: disconnect the mask or clear "
                         "the blend words.")
    if mask is not None and mask.ndim not in (2, 3):
        raise ValueError(f"The local-blend mask must be [H, W] or [B, H, W], got shape {tuple(mask.shape)}")
    if not 0.0 <= blend_threshold <= 1.0:
        raise ValueError(f"blend_threshold must be in [0, 1], got {blend_threshold}")
    return editor


def map_factor(layers: Sequence[AttentionLayer]) -> Optional[int]:
    """The downsampling factor of the map level: the non-middle cross-attention factor nearest 4 (coarser on ties)."""
    factors = sorted({layer.factor for layer in layers if layer.cross and layer.place != "mid"})
    if not factors:
        return None
    return min(factors, key=lambda f: (abs(math.log2(f) - math.log2(MAP_FACTOR)), -f))


class LocalBlend:
    """Attention maps and local blend, shared by the UNet and the joint-attention Prompt-to-Prompt controllers: they
    sum head-averaged ``[B, queries, tokens]`` maps per branch in ``maps`` / ``map_calls`` and name a branch's word
    positions (``_word_spans``, ``_positions``); the editor gives the mask, blend words, threshold and start."""

    def _start(self, editor, steps: int, latent_shape: Sequence[int]) -> None:
        """The per-run settings both controllers share: step windows, the idle reason, local blend's start and the
        map and mask stores."""
        self.editor = editor
        self.steps = steps
        self.latent_hw = tuple(latent_shape[-2:])
        self.cross_steps = int(editor.cross_replace_steps * steps)
        self.self_steps = int(editor.self_replace_steps * steps)
        check_mask_batch("local-blend mask", editor.mask, latent_shape)
        if not (self.cross_steps or self.self_steps or editor.reweight or editor.local_blend):
            self.idle_reason = (f"P2P edits nothing: cross_replace_steps {editor.cross_replace_steps} and "
                                f"self_replace_steps {editor.self_replace_steps} of {steps} steps are both under one "
                                f"step, with no reweight or local blend, so the edit runs without P2P.")
        self.blend_from = int(editor.blend_start * steps)
        self.maps: dict = {}  # branch -> [B, queries, tokens] summed over steps and map layers, head-averaged
        self.map_calls: dict = {}
        self.user_mask: Optional[torch.Tensor] = None
        self.blend_masks: list = []  # (step, mask) of every blended step, with ``record``

    def average_maps(self, branch: str = "target") -> Optional[torch.Tensor]:
        """``[B, h, w, tokens]`` cross-attention maps of ``branch`` averaged over the steps and map layers so far."""
        if branch not in self.maps:
            return None
        maps = self.maps[branch] / self.map_calls[branch]
        h, w = query_grid(self.latent_hw, maps.shape[1])
        return maps.reshape(maps.shape[0], h, w, maps.shape[-1])

    def word_maps(self, branch: str = "target") -> list[tuple[str, torch.Tensor]]:
        """Per word of the branch's prompt: its ``[B, h, w]`` average map (summed over the word's tokens)."""
        maps = self.average_maps(branch)
        if maps is None:
            return []
        return [(word, maps[..., [p for p in span if p < maps.shape[-1]]].sum(-1))
                for word, span in self._word_spans(branch)]

    def _word_mask(self, branch: str, words: Sequence[str], shape) -> torch.Tensor:
        maps = self.average_maps(branch)
        if maps is None:  # no map recorded yet (e.g. EDICT at 2 steps): the target is left as it is
            return torch.ones((1, 1) + tuple(shape), dtype=torch.bool)
        positions = self._positions(branch, words)
        selected = maps[..., [p for p in positions if p < maps.shape[-1]]].sum(-1)[:, None]  # [B, 1, h, w]
        selected = F.max_pool2d(selected, 3, 1, padding=1)
        selected = F.interpolate(selected, size=shape)
        peak = selected.amax(dim=(2, 3), keepdim=True)
        return (selected / peak.clamp_min(1e-12)).gt(self.editor.blend_threshold) & (peak > 0)

    def blend_mask(self, x: torch.Tensor) -> torch.Tensor:
        """``[B or 1, 1, H, W]`` region the target may change at this step."""
        shape = tuple(x.shape[-2:])
        if self.editor.mask is not None:
            if self.user_mask is None:  # resized and moved to the device once per run
                mask = self.editor.mask
                mask = mask[None] if mask.ndim == 2 else mask
                self.user_mask = F.interpolate(mask[:, None].to(x.device, torch.float32), size=shape, mode="area")
            return self.user_mask
        region = torch.zeros((x.shape[0], 1) + shape, dtype=torch.bool, device=x.device)
        if self.editor.blend_source_words:
            region |= self._word_mask("source", self.editor.blend_source_words, shape).to(x.device)
        if self.editor.blend_target_words:
            region |= self._word_mask("target", self.editor.blend_target_words, shape).to(x.device)
        return region.float()

    def after_step(self, step: int, x_source: torch.Tensor, x_target: torch.Tensor) -> torch.Tensor:
        if not self.editor.local_blend or step < self.blend_from:
            return x_target
        mask = self.blend_mask(x_target).to(x_target.dtype)
        if self.editor.record:
            self.blend_masks.append((step, mask.detach().cpu()))
        return x_source + mask * (x_target - x_source)


class P2PController(LocalBlend, EditController):
    """One run of a :class:`P2PEditor` over a UNet's attention layers (see the module docstring)."""

    def __init__(self, editor: P2PEditor, layers: Sequence[AttentionLayer], steps: int, latent_shape: Sequence[int]):
        self._start(editor, steps, latent_shape)
        self.mapping = editor.cross_mapping()
        self.scale = editor.equalizer()
        factor = map_factor(layers)
        self.map_keys = {layer.key for layer in layers if layer.cross and layer.place != "mid" and layer.factor == factor}
        self.map_factor = factor
        self.cache: dict = {}
        self.records: list = []

    # -- which calls need the controller ------------------------------------------------------------------------
    def step_of(self, level: int) -> int:
        return self.steps - level

    def _edits(self, call: AttentionCall, queries: int) -> bool:
        n = self.step_of(call.level)
        if call.layer.cross:
            return n < self.cross_steps
        return n < self.self_steps and queries <= SELF_MAX_QUERIES

    def wants(self, call: AttentionCall) -> bool:
        n = self.step_of(call.level)
        if call.layer.cross:
            return n < self.cross_steps or call.layer.key in self.map_keys
        return n < self.self_steps

    # -- attention ----------------------------------------------------------------------------------------------
    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: AttentionCall,
                  attend: Attend) -> torch.Tensor:
        cond = chunk_rows(call.chunks, q.shape[0], "cond")
        if not cond:  # an unconditional-only batch (ComfyUI may split a prediction): never edited
            return attend(q, k, v)
        if len(cond) != 1:
            raise ValueError(f"Prompt-to-Prompt needs one conditional chunk per prediction, got {len(cond)}: use a "
                             "single conditioning entry (no area or combined conditioning) for the prompts.")
        rows = cond[0]
        edits = self._edits(call, q.shape[1])
        stores = call.layer.cross and call.layer.key in self.map_keys
        if not edits and not stores:  # e.g. self-attention with more queries than the reference replaces
            return attend(q, k, v)
        if call.branch == "source":
            qc, kc = q[rows], k[rows]
            if edits:
                self.cache[call.layer.key] = (qc, kc)
            if stores or (edits and self.editor.record):
                probs = attention_probs(qc, kc, call.heads)
                if stores:
                    self._store("source", probs)
                if edits and self.editor.record and call.layer.cross:
                    self._record(call, "source", probs)
            return attend(q, k, v)

        out = q.new_empty(q.shape[:2] + v.shape[-1:], dtype=v.dtype)
        for s in chunk_rows(call.chunks, q.shape[0], "uncond"):
            out[s] = attend(q[s], k[s], v[s])
        qc, kc, vc = q[rows], k[rows], v[rows]
        if edits:
            if call.layer.key not in self.cache:
                raise RuntimeError("Prompt-to-Prompt: the source branch's attention of this step is missing; the "
                                   "source must be predicted before the target.")
            q_src, k_src = self.cache.pop(call.layer.key)
            if q_src.shape[0] != qc.shape[0]:
                raise ValueError(f"source batch {q_src.shape[0]} and target batch {qc.shape[0]} differ")
            base = attention_probs(q_src, k_src, call.heads)
            probs = self._edit_cross(base, qc, kc, call.heads) if call.layer.cross else base
        else:
            probs = attention_probs(qc, kc, call.heads)
        if stores:
            self._store("target", probs)
        if edits and self.editor.record and call.layer.cross:
            self._record(call, "target", probs)
        out[rows] = attend_probs(probs, vc)
        return out

    def _edit_cross(self, base: torch.Tensor, q: torch.Tensor, k: torch.Tensor, heads: int) -> torch.Tensor:
        """The target's maps from the source's ``base``; its own maps (from q, k) only where refine keeps them."""
        m = base.shape[-1]
        if m > self.editor.max_tokens:
            raise ValueError(f"The conditioning has {m} tokens; Prompt-to-Prompt aligns at most {self.editor.max_tokens}.")
        if self.mapping[0] == "replace":
            mapper = self.mapping[1][:m, :m].to(base)
            probs = torch.einsum("bhpw,wn->bhpn", base, mapper)
        else:
            index = self.mapping[1][:m].clamp(max=m - 1).to(base.device)
            alphas = self.mapping[2][:m].to(base)
            probs = base[..., index] * alphas + attention_probs(q, k, heads) * (1.0 - alphas)
        if self.scale is not None:
            probs = probs * self.scale[:m].to(probs)
        return probs

    def _store(self, branch: str, probs: torch.Tensor) -> None:
        mean = probs.mean(1)
        if branch in self.maps and self.maps[branch].shape != mean.shape:
            raise ValueError("attention maps of one level have different shapes")
        self.maps[branch] = self.maps.get(branch, 0) + mean
        self.map_calls[branch] = self.map_calls.get(branch, 0) + 1

    def _record(self, call: AttentionCall, branch: str, probs: torch.Tensor) -> None:
        self.records.append({"step": self.step_of(call.level), "layer": call.layer, "branch": branch,
                             "probs": probs.detach().cpu()})

    # -- word positions for the maps and local blend (see LocalBlend) -------------------------------------------
    def _word_spans(self, branch: str) -> list[tuple[str, tuple]]:
        prompt = self.editor.target if branch == "target" else self.editor.source
        return list(zip(prompt.words, prompt.spans))

    def _positions(self, branch: str, words: Sequence[str]) -> list[int]:
        prompt = self.editor.source if branch == "source" else self.editor.target
        return sorted({p for word in words for p in word_positions(prompt, word)})

    def finish(self) -> None:
        self.cache.clear()

