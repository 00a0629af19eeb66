"""Editors on joint (MM-DiT) attention: SD3/SD3.5 and Flux (plain PyTorch).

A joint-attention layer runs one softmax over ``[text tokens, image tokens]``: image queries attend to text keys
(the role a UNet's cross-attention plays) and to image keys (its self-attention) at once. Each editor's idea is
carried over as follows (n = sampling step, N steps):

- **Prompt-to-Prompt.** For the target's conditional image queries, the image -> text block of the probabilities is
  the source's, mapped through the word mapping (replace / refine) and scaled by the equalizer (reweight) for
  n < int(cross_replace_steps * N); the image -> image block is the source's for n < int(self_replace_steps * N)
  (SD3.5's image-only attention too). Elsewhere each block is the target's own; text queries and unconditional rows
  are never edited. The two blocks come from two softmaxes, so an edited row sums to about 1, not exactly (as a
  reweighted row of the UNet's P2P). Local blend and the attention view read the image -> text block at the map
  layers, averaged over heads, layers and steps; the text tokens of a word are its positions in every text encoder
  whose states the model reads (SD3: CLIP-L/G, then T5; Flux: T5).
- **MasaCtrl.** From ``start_step`` and ``start_layer`` on, the target's image queries attend to the target's own
  text keys and values and to the source's image keys and values (the text block is untouched, as MasaCtrl leaves a
  UNet's cross-attention alone); each half to the same half of the source. A mask splits the image keys into
  foreground and background attention as on UNets (text keys belong to both).
- **Plug-and-Play.** In the family's PnP layers the target's image tokens take the source's values (the features,
  after RF-Solver-Edit's value injection, which replaces the text tokens' values too and takes them from the inversion
  with the source prompt; here only the image tokens', from PnP's source branch, the empty prompt's reconstruction)
  for n < int(feature_injection * N) and the source's queries and keys (the image -> image attention, PnP's
  self-attention injection) for n < int(attention_injection * N). The target's text tokens attend to the injected
  image keys and values too, so their outputs change as well.

Layers are numbered in forward order over the model's transformer blocks (SD3: joint blocks; Flux: double-stream
blocks, then single-stream blocks); SD3.5's image-only attention of a joint block shares the block's number. Which
layers each editor uses per family is :data:`FLOW_LAYERS`.

Probabilities are computed only for the calls whose blocks an editor reads or replaces, in float32, a few heads at a
time (``PROBS_BUDGET`` bytes per probability tensor of a chunk; the source's, the target's and their mix live at once);
every other call runs the backend's attention.

Tensors: q, k, v are ``[batch, tokens, heads * head_dim]``; a call's batch is chunks of equal size in the order of
``chunks`` (``"cond"`` / ``"uncond"``), as in :mod:`.attention`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Hashable, Optional, Sequence

import torch
import torch.nn.functional as F

from .attention import Attend, EditController, check_mask_batch, chunk_rows, query_grid
from .masactrl import REFERENCE_LAYERS, REFERENCE_START_LAYER
from .p2p import LocalBlend
from .p2p_alignment import equalizer, refinement_mapper, replacement_mapper, word_positions

__all__ = ["FLOW_LAYERS", "FlowLayers", "JointCall", "JointLayer", "JointMasaCtrl", "JointP2P", "JointPnP", "JointText",
           "default_joint_start", "head_chunks", "joint_layers", "joint_text", "softmax_probs", "start_joint"]

KINDS = ("double", "single", "image")
PROBS_BUDGET = 1 << 28  # bytes of float32 probabilities per head chunk


@dataclass(frozen=True)
class JointLayer:
    """One attention call site of an MM-DiT.

    Attributes:
        key: the adapter's identifier.
        kind: ``"double"`` (a joint block's [text, image] attention: SD3's joint blocks, Flux's double-stream
            blocks), ``"single"`` (a Flux single-stream block's, over the same joint sequence) or ``"image"`` (SD3.5's
            second, image-only attention of a joint block).
        index: the block's index among the blocks of its kind (``"image"``: its joint block's).
        order: the block's position among all transformer blocks in forward order (double, then single).
    """

    key: Hashable
    kind: str
    index: int
    order: int


@dataclass(frozen=True)
class JointCall:
    """One attention call: the layer, heads, branch and level of the prediction, chunk roles and the number of text
    tokens at the start of the sequence (0 for ``"image"`` layers)."""

    layer: JointLayer
    heads: int
    branch: str
    level: int
    chunks: tuple
    text: int


def joint_layers(blocks: Sequence[tuple]) -> list[JointLayer]:
    """JointLayers from ``(key, kind, index)`` in forward order; ``"image"`` entries follow their joint block."""
    out, order = [], -1
    for key, kind, index in blocks:
        if kind not in KINDS:
            raise ValueError(f"unknown joint-attention layer kind {kind!r}")
        if kind != "image":
            order += 1
        out.append(JointLayer(key=key, kind=kind, index=int(index), order=order))
    return out


@dataclass(frozen=True)
class FlowLayers:
    """One family's layer choices.

    Attributes:
        maps: kinds whose image -> text probabilities make the attention maps (local blend, attention view).
        pnp_kind: the kind of PnP's layers; ``pnp_from``: they are that kind's blocks from this fraction of their
            count on (rounded), so a model with fewer blocks keeps the same relative depth.
        text: the text encoders whose states make the model's text tokens, in sequence order, each as the tokenizer
            keys that share its positions (ComfyUI's and diffusers' SD3 put CLIP-L/G's states, then T5's; Flux reads
            T5's). An encoder the CLIP lacks is left out.
    """

    maps: tuple
    pnp_kind: str
    pnp_from: float
    text: tuple


FLOW_LAYERS = {
    # SD3/SD3.5 (MMDiT: 24 joint blocks on SD3-medium / SD3.5-medium, 38 on SD3.5-large): maps from every joint block;
    # PnP in the second half of the joint blocks (PnP's UNet layers are the second half of its attention layers).
    "sd3": FlowLayers(maps=("double",), pnp_kind="double", pnp_from=0.5, text=(("l", "g"), ("t5xxl",))),
    # Flux (19 double-stream, 38 single-stream blocks): maps from the double-stream blocks (the single-stream blocks
    # rewrite the text tokens with the image's); PnP in single-stream blocks 20-37 of 38, RF-Solver-Edit's layers.
    "flux": FlowLayers(maps=("double",), pnp_kind="single", pnp_from=20 / 38, text=(("t5xxl",),)),
}


def _layers_of(family: str) -> FlowLayers:
    if family not in FLOW_LAYERS:
        raise ValueError(f"No editor layer choices for the model family {family!r} (known: {', '.join(FLOW_LAYERS)}).")
    return FLOW_LAYERS[family]


# -- text positions ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class JointText:
    """The model's text tokens as segments, one per text encoder whose states it reads, in sequence order:
    ``(offset, source prompt, target prompt)``, and the total number of text tokens."""

    segments: tuple
    tokens: int

    def replace_mapper(self) -> torch.Tensor:
        """``[T, T]`` block-diagonal word mapping (target map t = sum_s M[s, t] * source map s)."""
        mapper = torch.eye(self.tokens)
        for offset, source, target, end in self._spans():
            mapper[offset:end, offset:end] = replacement_mapper(source, target, end - offset)
        return mapper

    def refine_mapper(self) -> tuple[torch.Tensor, torch.Tensor]:
        index, alphas = torch.arange(self.tokens), torch.ones(self.tokens)
        for offset, source, target, end in self._spans():
            i, a = refinement_mapper(source, target, end - offset)
            index[offset:end], alphas[offset:end] = i + offset, a
        return index, alphas

    def equalizer(self, reweight: Sequence[tuple]) -> Optional[torch.Tensor]:
        if not reweight:
            return None
        words, values = zip(*reweight)
        scale = torch.ones(self.tokens)
        for offset, _, target, end in self._spans():
            scale[offset:end] = equalizer(target, words, values, end - offset)
        return scale

    def positions(self, branch: str, words: Sequence[str]) -> list[int]:
        """Positions of ``words`` of the branch's prompt in every segment."""
        out = set()
        for offset, source, target in self.segments:
            prompt = source if branch == "source" else target
            out |= {offset + p for word in words for p in word_positions(prompt, word)}
        return sorted(out)

    def words(self, branch: str) -> list[tuple[str, list[int]]]:
        """Per word of the branch's prompt: its positions in every segment."""
        first = self.segments[0][1 if branch == "source" else 2]
        return [(word, [offset + p for offset, s, t in self.segments
                        for p in (s if branch == "source" else t).spans[w]])
                for w, word in enumerate(first.words)]

    def _spans(self):
        bounds = [offset for offset, *_ in self.segments[1:]] + [self.tokens]
        for (offset, source, target), end in zip(self.segments, bounds):
            yield offset, source, target, end


def joint_text(family: str, encoders: Sequence[tuple], tokens: int) -> JointText:
    """The :class:`JointText` of a conditioning of ``tokens`` text tokens, from a P2P editor's per-encoder prompts
    ``((key, source, target, window), ...)``: the family's encoders (:data:`FLOW_LAYERS`) the CLIP has, in order,
    whose windows add up to ``tokens`` (SD3 without T5: CLIP's 77 alone)."""
    by_key = {key: (source, target, window) for key, source, target, window in encoders}
    present = [next(key for key in group if key in by_key) for group in _layers_of(family).text
               if any(key in by_key for key in group)]
    matches = [present[first:first + size] for size in range(len(present), 0, -1)
               for first in range(len(present) - size + 1)
               if sum(by_key[key][2] for key in present[first:first + size]) == tokens]
    windows = ", ".join(f"{key} {by_key[key][2]}" for key in present) or "none"
    if len(matches) > 1:
        raise ValueError(f"The conditioning's {tokens} text tokens could come from several of the P2P Editor's text "
                         f"encoders (windows: {windows}); the editor cannot tell whose word positions to use. Give "
                         f"the P2P Editor the CLIP the model runs with.")
    if matches:
        segments, offset = [], 0
        for key in matches[0]:
            source, target, window = by_key[key]
            segments.append((offset, source, target))
            offset += window
        return JointText(segments=tuple(segments), tokens=tokens)
    raise ValueError(f"The conditioning has {tokens} text tokens, which no combination of the P2P Editor's text "
                     f"encoders makes (windows: {windows}); connect the P2P Editor's source and target outputs, encoded "
                     f"with this model's CLIP.")


# -- probabilities ----------------------------------------------------------------------------------------------------
def _split(x: torch.Tensor, heads: int) -> torch.Tensor:
    b, n, d = x.shape
    return x.float().reshape(b, n, heads, d // heads).transpose(1, 2)


def _merge(x: torch.Tensor) -> torch.Tensor:
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


def head_chunks(batch: int, heads: int, queries: int, keys: int, budget: int = PROBS_BUDGET) -> list[slice]:
    """Head slices whose float32 ``[batch, heads, queries, keys]`` probabilities fit ``budget`` bytes (at least 1)."""
    size = max(1, min(heads, budget // max(1, 4 * batch * queries * keys)))
    return [slice(h, min(h + size, heads)) for h in range(0, heads, size)]


def softmax_probs(qh: torch.Tensor, kh: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) of per-head ``[b, h, n, d]`` tensors, float32."""
    return torch.softmax(qh @ kh.transpose(-1, -2) / math.sqrt(qh.shape[-1]), dim=-1)


def _role_rows(chunks: tuple, batch: int, editor: str) -> dict:
    rows = {}
    for role in ("uncond", "cond"):
        found = chunk_rows(chunks, batch, role)
        if len(found) > 1:
            raise ValueError(f"{editor} needs one conditioning entry per prompt (no area or combined conditioning).")
        if found:
            rows[role] = found[0]
    return rows


class _JointController(EditController):
    """Shared by the joint controllers: steps, the layer list, the image token grid."""

    editor_name = "The editor"

    def __init__(self, layers: Sequence[JointLayer], steps: int, latent_shape: Sequence[int], family: str):
        self.layers = list(layers)
        self.steps = steps
        self.latent_hw = tuple(latent_shape[-2:])
        self.family = family
        self.choice = _layers_of(family)
        self.blocks = 1 + max((layer.order for layer in self.layers), default=-1)
        self.records: list = []
        self.cache: dict = {}
        self._counts: dict = {}

    def finish(self) -> None:
        self.cache.clear()
        self._counts.clear()

    def slot(self, call: JointCall) -> tuple:
        """The cache key of a call: its layer and which evaluation of the level it is in its branch (RF-Solver
        evaluates twice per step; the target's i-th evaluation reads the source's i-th). Counted per half, so that
        a prediction ComfyUI runs in one call for one evaluation and split by halves for another (when memory is
        short) still pairs up."""
        count = 0
        for role in dict.fromkeys(call.chunks):
            key = (call.branch, call.layer.key, role)
            level, seen = self._counts.get(key, (None, -1))
            seen = seen + 1 if level == call.level else 0
            self._counts[key] = (call.level, seen)
            count = max(count, seen)
        return call.layer.key, count

    def step_of(self, level: int) -> int:
        return self.steps - level

    def missing_source(self):
        return RuntimeError(f"{self.editor_name}: the source branch's attention of this step is missing; the source "
                            "must be predicted (with the same halves) before the target.")


# -- Prompt-to-Prompt -------------------------------------------------------------------------------------------------
class JointP2P(LocalBlend, _JointController):
    """Prompt-to-Prompt on joint attention (see the module docstring); ``maps`` / ``word_maps`` / ``blend_mask`` /
    ``after_step`` as :class:`.p2p.P2PController`'s."""

    editor_name = "Prompt-to-Prompt"

    def __init__(self, editor, text: JointText, layers, steps: int, latent_shape, family: str):
        super().__init__(layers, steps, latent_shape, family)
        self._start(editor, steps, latent_shape)
        self.text = text
        if editor.mode == "replace":
            self.mapping = ("replace", text.replace_mapper())
        else:
            self.mapping = ("refine",) + text.refine_mapper()
        self.scale = text.equalizer(editor.reweight)
        self.map_keys = {layer.key for layer in self.layers if layer.kind in self.choice.maps}

    def _edits(self, call: JointCall) -> tuple[bool, bool]:
        n = self.step_of(call.level)
        cross = call.layer.kind != "image" and n < self.cross_steps
        return cross, n < self.self_steps

    def wants(self, call: JointCall) -> bool:
        cross, self_ = self._edits(call)
        return cross or self_ or call.layer.key in self.map_keys

    def attention(self, q, k, v, call: JointCall, attend: Attend) -> torch.Tensor:
        rows = chunk_rows(call.chunks, q.shape[0], "cond")
        if not rows:
            return attend(q, k, v)
        if len(rows) != 1:
            raise ValueError(f"Prompt-to-Prompt needs one conditional chunk per prediction, got {len(rows)}: use a "
                             "single conditioning entry (no area or combined conditioning) for the prompts.")
        rows, t = rows[0], call.text
        if t and t != self.text.tokens:
            raise ValueError(f"The conditioning has {t} text tokens but the P2P Editor aligned the prompts over "
                             f"{self.text.tokens}; encode the prompts with the P2P Editor's source and target outputs.")
        cross, self_ = self._edits(call)
        stores = call.layer.key in self.map_keys
        qc, kc, vc = q[rows], k[rows], v[rows]
        slot = self.slot(call)
        if call.branch == "source":
            if cross or self_:
                self.cache[slot] = (qc[:, t:].clone(), kc.clone())  # copies: the call's tensors can go
            if stores:
                self._store("source", self._text_block(qc[:, t:], kc, call.heads, t))
            return attend(q, k, v)

        out = attend(q, k, v)  # text queries and unconditional rows: the target's own attention
        if not (cross or self_):
            if stores:
                self._store("target", self._text_block(qc[:, t:], kc, call.heads, t))
            return out
        source = self.cache.pop(slot, None)
        if source is None:
            raise self.missing_source()
        q_src, k_src = source
        if q_src.shape[0] != qc.shape[0]:
            raise ValueError(f"source batch {q_src.shape[0]} and target batch {qc.shape[0]} differ")
        image, text_maps = self._edited(qc[:, t:], kc, vc, q_src, k_src, call, cross, self_, stores)
        out[rows, t:] = image
        if stores:
            self._store("target", text_maps)
        return out

    def _text_block(self, q_img, k, heads: int, t: int) -> torch.Tensor:
        """Head-averaged image -> text probabilities ``[b, image, text]``."""
        qh, kh = _split(q_img, heads), _split(k, heads)
        total = 0
        for hs in head_chunks(qh.shape[0], heads, qh.shape[2], kh.shape[2]):
            total = total + softmax_probs(qh[:, hs], kh[:, hs])[..., :t].sum(1)
        return total / heads

    def _edited(self, q_img, k, v, q_src, k_src, call: JointCall, cross: bool, self_: bool, stores: bool):
        """The target's image rows' output from the edited probabilities, and (if stored) their head-averaged image
        -> text block."""
        heads, t = call.heads, call.text
        qh, kh, vh = _split(q_img, heads), _split(k, heads), _split(v, heads)
        qs, ks = _split(q_src, heads), _split(k_src, heads)
        out = torch.empty_like(qh[..., :vh.shape[-1]])
        text_maps = 0
        if t:
            own_needed = not (cross and self_) or (cross and self.mapping[0] == "refine")
        else:
            own_needed = not self_
        for hs in head_chunks(qh.shape[0], heads, qh.shape[2], kh.shape[2]):
            base = softmax_probs(qs[:, hs], ks[:, hs])
            own = softmax_probs(qh[:, hs], kh[:, hs]) if own_needed else None
            if t:
                text = self._map_text(base[..., :t], None if own is None else own[..., :t]) if cross else own[..., :t]
                image = base[..., t:] if self_ else own[..., t:]
                probs = torch.cat([text, image], dim=-1)
                if stores:
                    text_maps = text_maps + text.sum(1)
                if self.editor.record:
                    self.records.append({"step": self.step_of(call.level), "layer": call.layer, "heads": hs,
                                         "text": text.detach().cpu(), "source_text": base[..., :t].detach().cpu(),
                                         "image": image.detach().cpu()})
            else:
                probs = base if self_ else own
                if self.editor.record:
                    self.records.append({"step": self.step_of(call.level), "layer": call.layer, "heads": hs,
                                         "image": probs.detach().cpu()})
            out[:, hs] = probs @ vh[:, hs]
        return _merge(out).to(v.dtype), (text_maps / heads if stores else None)

    def _map_text(self, base_text: torch.Tensor, own_text: Optional[torch.Tensor]) -> torch.Tensor:
        """The source's image -> text block carried to the target's tokens (replace / refine: where the target's own
        block ``own_text`` stays), reweighted."""
        if self.mapping[0] == "replace":
            probs = base_text @ self.mapping[1].to(base_text)
        else:
            index, alphas = self.mapping[1].to(base_text.device), self.mapping[2].to(base_text)
            probs = base_text[..., index] * alphas + own_text * (1.0 - alphas)
        if self.scale is not None:
            probs = probs * self.scale.to(probs)
        return probs

    def _store(self, branch: str, maps: torch.Tensor) -> None:
        self.maps[branch] = self.maps.get(branch, 0) + maps
        self.map_calls[branch] = self.map_calls.get(branch, 0) + 1

    # -- word positions for the maps and local blend (see p2p.LocalBlend) ------------------------------------
    def _word_spans(self, branch: str) -> list[tuple[str, list]]:
        return self.text.words(branch)

    def _positions(self, branch: str, words: Sequence[str]) -> list[int]:
        return self.text.positions(branch, words)


# -- MasaCtrl -------------------------------------------------------------------------------------------------------
def default_joint_start(blocks: int) -> int:
    """MasaCtrl's reference start layer (10 of SD1.5's 16) at the same relative depth of ``blocks`` blocks."""
    return round(blocks * REFERENCE_START_LAYER / REFERENCE_LAYERS)


def _masked(q, k, v, heads: int, key_mask: torch.Tensor) -> torch.Tensor:
    """Attention of q over the keys where ``key_mask`` ([b, keys] bool) holds (rows with none give 0), head-chunked."""
    qh, kh, vh = _split(q, heads), _split(k, heads), _split(v, heads)
    out = torch.empty_like(qh[..., :vh.shape[-1]])
    for hs in head_chunks(qh.shape[0], heads, qh.shape[2], kh.shape[2]):
        logits = qh[:, hs] @ kh[:, hs].transpose(-1, -2) / math.sqrt(qh.shape[-1])
        logits = logits.masked_fill(~key_mask[:, None, None, :], float("-inf"))
        out[:, hs] = torch.softmax(logits, dim=-1).nan_to_num(0.0) @ vh[:, hs]
    return _merge(out).to(v.dtype)


class JointMasaCtrl(_JointController):
    source_guided = True
    editor_name = "MasaCtrl"

    def __init__(self, editor, layers, steps: int, latent_shape, family: str):
        super().__init__(layers, steps, latent_shape, family)
        self.editor = editor
        if editor.auto_mask:
            raise ValueError("MasaCtrl's automatic mask (mask words) is not available on SD3/Flux yet; give a MASK "
                             "instead, or clear the mask words.")
        check_mask_batch("MasaCtrl mask", editor.mask, latent_shape)
        if editor.start_step >= steps:
            self.idle_reason = (f"MasaCtrl's start_step is {editor.start_step} but the edit has {steps} steps: mutual "
                                f"self-attention never starts and the edit runs without MasaCtrl. Lower start_step "
                                f"(reference: 4 of 50).")
        self.start_layer = editor.start_layer if editor.start_layer is not None else default_joint_start(self.blocks)
        if self.start_layer >= self.blocks:
            raise ValueError(f"MasaCtrl's start_layer is {self.start_layer} but this model has {self.blocks} "
                             f"transformer blocks (0 .. {self.blocks - 1}); use -1 for the default.")
        self.edited_keys = {layer.key for layer in self.layers if layer.order >= self.start_layer}
        self.user_masks: dict = {}

    def wants(self, call: JointCall) -> bool:
        return self.step_of(call.level) >= self.editor.start_step and call.layer.key in self.edited_keys

    def attention(self, q, k, v, call: JointCall, attend: Attend) -> torch.Tensor:
        roles = _role_rows(call.chunks, q.shape[0], "MasaCtrl")
        t, slot = call.text, self.slot(call)
        if call.branch == "source":
            self.cache.setdefault(slot, {}).update({role: (k[s, t:].clone(), v[s, t:].clone())
                                                    for role, s in roles.items()})
            return attend(q, k, v)
        source = self.cache.get(slot)
        if source is None or any(role not in source for role in roles):
            raise self.missing_source()
        out = q.new_empty(q.shape[:2] + v.shape[-1:], dtype=v.dtype)
        if t:  # text queries: the target's own attention
            out[:, :t] = attend(q[:, :t], k, v)
        mask = self._mask(q.shape[1] - t, q.device)
        for role, s in roles.items():
            k_src, v_src = source[role]
            keys, values = torch.cat([k[s, :t], k_src], 1), torch.cat([v[s, :t], v_src], 1)
            q_img = q[s, t:]
            if mask is None:
                image = attend(q_img, keys, values)
            else:
                text = torch.ones(mask.shape[0], t, dtype=torch.bool, device=mask.device)
                fg = _masked(q_img, keys, values, call.heads, torch.cat([text, mask], 1).expand(q_img.shape[0], -1))
                bg = _masked(q_img, keys, values, call.heads, torch.cat([text, ~mask], 1).expand(q_img.shape[0], -1))
                w = mask[..., None].to(fg.dtype)
                image = fg * w + bg * (1.0 - w)
            out[s, t:] = image
            if self.editor.record:
                self.records.append({"step": self.step_of(call.level), "layer": call.layer, "role": role,
                                     "heads": call.heads, "text": t, "q": q[s].detach().cpu(), "k": k[s].detach().cpu(),
                                     "v": v[s].detach().cpu(), "k_source": k_src.detach().cpu(),
                                     "v_source": v_src.detach().cpu(), "out": out[s].detach().cpu()})
        return out

    def _mask(self, tokens: int, device) -> Optional[torch.Tensor]:
        if self.editor.mask is None:
            return None
        if tokens not in self.user_masks:
            grid = query_grid(self.latent_hw, tokens)
            mask = self.editor.mask
            mask = mask[None] if mask.ndim == 2 else mask
            self.user_masks[tokens] = (F.interpolate(mask[:, None].float(), size=grid).flatten(1) > 0.5).to(device)
        return self.user_masks[tokens]



# -- Plug-and-Play -----------------------------------------------------------------------------------------------------
class JointPnP(_JointController):
    source_unguided = True
    editor_name = "PnP"

    def __init__(self, editor, layers, steps: int, latent_shape, family: str):
        super().__init__(layers, steps, latent_shape, family)
        self.editor = editor
        self.feature_steps = int(steps * editor.feature_injection)
        self.attention_steps = int(steps * editor.attention_injection)
        if not self.feature_steps and not self.attention_steps:
            self.idle_reason = (f"PnP injects nothing: feature_injection {editor.feature_injection} and "
                                f"attention_injection {editor.attention_injection} of {steps} steps are both under one "
                                f"step, so the edit runs without PnP.")
        kind = self.choice.pnp_kind
        count = 1 + max((layer.index for layer in self.layers if layer.kind == kind), default=-1)
        first = min(round(count * self.choice.pnp_from), count - 1)
        self.injected_keys = {layer.key for layer in self.layers if layer.kind == kind and layer.index >= first}
        if not self.injected_keys:
            raise ValueError(f"PnP on {family} injects into {kind} blocks, but this model has none.")

    def wants(self, call: JointCall) -> bool:
        n = self.step_of(call.level)
        if n >= self.feature_steps and n >= self.attention_steps:
            self.cache.clear()  # past both windows: the source's tensors are not needed any more
            return False
        return call.layer.key in self.injected_keys

    def attention(self, q, k, v, call: JointCall, attend: Attend) -> torch.Tensor:
        roles = _role_rows(call.chunks, q.shape[0], "PnP")
        t, slot = call.text, self.slot(call)
        if call.branch == "source":
            self.cache.setdefault(slot, {}).update({role: (q[s, t:].clone(), k[s, t:].clone(), v[s, t:].clone())
                                                    for role, s in roles.items()})
            return attend(q, k, v)
        source = self.cache.get(slot)
        if source is None:
            raise self.missing_source()
        n = self.step_of(call.level)
        q, k, v = q.clone(), k.clone(), v.clone()
        for role, s in roles.items():
            q_src, k_src, v_src = source.get(role, source.get("cond"))
            if n < self.attention_steps:
                q[s, t:], k[s, t:] = q_src, k_src
            if n < self.feature_steps:
                v[s, t:] = v_src
            if getattr(self.editor, "record", False):
                self.records.append({"step": n, "layer": call.layer, "role": role, "text": t,
                                     "q": q[s].detach().cpu(), "k": k[s].detach().cpu(), "v": v[s].detach().cpu(),
                                     "q_source": q_src.detach().cpu(), "k_source": k_src.detach().cpu(),
                                     "v_source": v_src.detach().cpu()})
        return attend(q, k, v)



def start_joint(editor, layers: Sequence[JointLayer], steps: int, latent_shape: Sequence[int], family: str,
                text: Optional[JointText] = None) -> EditController:
    """The per-run controller of ``editor`` (a P2P / MasaCtrl / PnP editor) on an MM-DiT's joint attention;
    ``text``: the model's text tokens (Prompt-to-Prompt)."""
    kind = getattr(editor, "kind", None)
    if kind == "prompt_to_prompt":
        if text is None:
            raise ValueError("Prompt-to-Prompt on SD3/Flux needs the prompts' token positions per text encoder.")
        return JointP2P(editor, text, layers, steps, latent_shape, family)
    if kind == "masactrl":
        return JointMasaCtrl(editor, layers, steps, latent_shape, family)
    if kind == "pnp":
        return JointPnP(editor, layers, steps, latent_shape, family)
    raise ValueError(f"The {kind or type(editor).__name__} editor does not work on SD3/Flux's joint attention "
                     f"(available there: P2P, MasaCtrl, PnP).")

