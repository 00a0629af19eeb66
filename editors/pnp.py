"""Plug-and-Play: feature and self-attention injection (Tumanyan et al., "Plug-and-Play Diffusion Features for
Text-Driven Image-to-Image Translation", CVPR 2023; reference: MichalGeyer/pnp-diffusers ``pnp.py`` and its
``register_conv_control_efficient`` / ``register_attention_control_efficient``; as used by PnPInversion).

The source branch reconstructs the image with the empty prompt, unguided (its conditional prediction alone); the
target branch is the guided edit. During the first ``feature_injection`` fraction of the sampling steps (0.8 in the
reference) the residual features of decoder block ``feature_block`` (the output of the block's last convolution,
before the skip connection is added) are taken from the source in the target's prediction; during the first
``attention_injection`` fraction (0.5) so are the self-attention queries and keys of the decoder blocks from
``attention_from_block`` on (the target keeps its own values). Both target halves (unconditional and conditional)
get the source's one prediction's features, as in the reference's [source, uncond, cond] batch.

Positions are decoder block indices in forward order (ComfyUI's ``output_blocks``). SD1.x, SD2.x and SDXL have
three blocks per decoder level, so block 4 is the second block of the first upsampled level in all of them
(diffusers ``up_blocks[1].resnets[1]``, the reference's feature layer). Self-attention from block 4 on is the
reference's decoder layers 4-11 on SD1.x / SD2.x (8 layers); on SDXL it is blocks 4-5 (4 layers: its last level has
no attention and its first, lowest-resolution level is left alone, as the reference leaves SD1.5's block 3).
The step windows are counted as the reference counts them: ``int(steps * fraction)`` first steps.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from .attention import AttentionCall, AttentionLayer, Attend, EditController, FeatureCall, chunk_rows

__all__ = ["PnPController", "PnPEditor"]


@dataclass(frozen=True)
class PnPEditor:
    """A Plug-and-Play edit (the EDITOR from the PnP Editor node).

    Attributes:
        feature_injection: fraction of the steps (from the first) with residual-feature injection (reference 0.8).
        attention_injection: fraction of the steps with self-attention query/key injection (reference 0.5).
        feature_block: decoder block whose residual features are injected (reference: 4).
        attention_from_block: first decoder block whose self-attention queries and keys are injected (4).
        source_conditioning: the source branch's conditioning, in the backend's format (ComfyUI CONDITIONING,
            diffusers embeddings): the reference's empty prompt. ``None``: the inversion's source prompt. EDICT
            keeps the inversion's prompt whatever this is (its source pair must retrace the inversion).
    """

    feature_injection: float = 0.8
    attention_injection: float = 0.5
    feature_block: int = 4
    attention_from_block: int = 4
    source_conditioning: Any = field(default=None, compare=False)

    kind = "pnp"

    def __post_init__(self):
        for name in ("feature_injection", "attention_injection"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"PnP's {name} is a fraction of the steps (0 .. 1), got {value}")
        if self.feature_block < 0 or self.attention_from_block < 0:
            raise ValueError("PnP's decoder block indices must be >= 0")

    def start(self, layers: Sequence[AttentionLayer], steps: int, latent_shape: Sequence[int]) -> "PnPController":
        return PnPController(self, layers, steps)


def _role_rows(chunks: tuple, batch: int) -> dict:
    rows = {}
    for role in ("uncond", "cond"):
        found = chunk_rows(chunks, batch, role)
        if len(found) > 1:
            raise ValueError("PnP needs one conditioning entry per prompt (no area or combined conditioning).")
        if found:
            rows[role] = found[0]
    return rows


class PnPController(EditController):
    source_unguided = True  # the reference's source is the empty prompt's conditional prediction

    def __init__(self, editor: PnPEditor, layers: Sequence[AttentionLayer], steps: int):
        self.editor = editor
        self.steps = steps
        self.feature_steps = int(steps * editor.feature_injection)
        self.attention_steps = int(steps * editor.attention_injection)
        if not self.feature_steps and not self.attention_steps:
            self.idle_reason = (f"PnP injects nothing: feature_injection {editor.feature_injection} and "
                                f"attention_injection {editor.attention_injection} of {steps} steps are both under one "
                                f"step, so the edit runs without PnP (reference: 0.8 and 0.5).")
        # the adapters check that the feature block exists when they hook it
        self.feature_blocks = frozenset([editor.feature_block] if self.feature_steps else [])
        self.attention_keys = {layer.key for layer in layers
                               if not layer.cross and layer.place == "up" and layer.block >= editor.attention_from_block}
        if self.attention_steps and not self.attention_keys:
            last = max((layer.block for layer in layers if layer.place == "up" and not layer.cross), default=None)
            raise ValueError(f"PnP's attention_from_block is {editor.attention_from_block} but this UNet's last decoder "
                             f"block with self-attention is {last}.")
        self.cache: dict = {}

    def step_of(self, level: int) -> int:
        return self.steps - level

    def _inject(self, x: torch.Tensor, chunks: tuple, branch: str, key) -> torch.Tensor:
        """Source: remember x per chunk role; target: x with each role's rows taken from the source (the source's
        conditional rows for both halves when the source ran unguided)."""
        rows = _role_rows(chunks, x.shape[0])
        if branch == "source":
            # per role: ComfyUI may run the two halves as separate calls when memory is short
            self.cache.setdefault(key, {}).update({role: x[s] for role, s in rows.items()})
            return x
        source = self.cache.get(key)
        if source is None:
            raise RuntimeError("PnP: the source branch's features of this step are missing; the source must be "
                               "predicted before the target.")
        out = x.clone()
        for role, s in rows.items():
            out[s] = source.get(role, source.get("cond"))
        return out

    def wants(self, call: AttentionCall) -> bool:
        return call.layer.key in self.attention_keys and self.step_of(call.level) < self.attention_steps

    def attention(self, q, k, v, call: AttentionCall, attend: Attend) -> torch.Tensor:
        q = self._inject(q, call.chunks, call.branch, ("q", call.layer.key))
        k = self._inject(k, call.chunks, call.branch, ("k", call.layer.key))
        return attend(q, k, v)

    def feature(self, h: torch.Tensor, call: FeatureCall) -> torch.Tensor:
        if call.block not in self.feature_blocks or self.step_of(call.level) >= self.feature_steps:
            return h
        return self._inject(h, call.chunks, call.branch, ("feature", call.block))

    def finish(self) -> None:
        self.cache.clear()
