"""The toy flow-matching text-to-image model: an SD3-style MM-DiT over the toy VAE's latents.

It reuses the toy UNet model's frozen parts (``model.py``: the CLIP tokenizer, the 2-layer text encoder of width
64, the 4-channel VAE) and adds a diffusers ``SD3Transformer2DModel`` at toy size (``FLOW_CONFIG``):

- input: the VAE's 16x16x4 latents (scaled by the VAE's scaling factor, as the UNet gets them), 2x2 patches, so 64
  image tokens with SD3's fixed sin-cos position embedding over the 8x8 patch grid (``pos_embed_max_size`` 8);
- text: the text encoder's 77 output states (width 64, ``joint_attention_dim``) as the context, as SD3 reads
  CLIP's 77-token window; the **pooled** vector is the state at the first end-of-text token, as CLIP's pooled
  output is taken (the causal encoder's state there has read the whole caption), width 64;
- 4 joint blocks of width 128: 2 heads of 64 (SD3's head width), RMS-normed queries and keys (SD3.5's
  ``qk_norm``, for stable training at a toy's learning rate); about 2.3 M parameters;
- rectified flow (SD3's): x_t = (1 - t) x_0 + t noise, the model predicts the velocity noise - x_0 at timestep
  1000 t; sampled and inverted with a ``FlowMatchEulerDiscreteScheduler`` with ``shift`` 1.0. SD3's shift 3.0 is
  for 1024x1024 images (4096 tokens): SD3's paper shifts by sqrt(tokens / base tokens), which for 64 tokens is
  below 1; 1.0 (no shift) keeps the sampled levels those the model trained on (logit-normal around t = 0.5, see
  ``flow_train.py``) and spends the steps evenly across the noise levels of these flat, low-detail pictures.

``load_flow()`` returns a :class:`ToyFlowModel` with what the pack's diffusers backend takes: the transformer and
its scheduler for ``invert`` / ``edit``, prompts as ``(prompt_embeds, pooled_prompt_embeds)`` (``prompt()``), and
the VAE's ``encode`` / ``decode`` (images ``[B, 3, 64, 64]`` in [0, 1]).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from .model import CONFIG, WEIGHTS, TextEncoder, VAEImages, _load_part, make_vae
from .tokenizer import tokenizer

FLOW_WEIGHTS = WEIGHTS / "flow_transformer.safetensors"
FLOW_CONFIG = {
    "patch_size": 2,
    "layers": 4,
    "heads": 2,
    "head_dim": 64,
    "qk_norm": "rms_norm",
    "shift": 1.0,
}


def make_transformer():
    """The toy MM-DiT (random weights, diffusers' initialisation)."""
    from diffusers import SD3Transformer2DModel

    c = FLOW_CONFIG
    latent, patch = CONFIG["latent_size"], c["patch_size"]
    return SD3Transformer2DModel(
        sample_size=latent, patch_size=patch, in_channels=4, out_channels=4, num_layers=c["layers"],
        attention_head_dim=c["head_dim"], num_attention_heads=c["heads"], joint_attention_dim=CONFIG["context_dim"],
        caption_projection_dim=c["heads"] * c["head_dim"], pooled_projection_dim=CONFIG["context_dim"],
        pos_embed_max_size=latent // patch, qk_norm=c["qk_norm"])


def make_flow_scheduler():
    """Flow-matching Euler, 1000 training timesteps, shift ``FLOW_CONFIG["shift"]`` (see the module docstring)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=FLOW_CONFIG["shift"])


def pooled_states(ids: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
    """The state at each prompt's first end-of-text token (CLIP's pooled output), ``[B, width]``."""
    eos = (ids == tokenizer().eos_token_id).int().argmax(dim=1)
    return states[torch.arange(states.shape[0]), eos]


@dataclass
class ToyFlowModel(VAEImages):
    """The loaded flow model. Images are ``[B, 3, 64, 64]`` in [0, 1]; latents are the toy UNet model's."""

    text_encoder: TextEncoder
    vae: object
    transformer: object
    scheduler: object
    scaling_factor: float
    metadata: dict

    @torch.no_grad()
    def prompt(self, prompts: Sequence[str] | str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(prompt_embeds [B, 77, 64], pooled_prompt_embeds [B, 64])``, the flow backends' prompt form."""
        ids = tokenizer()(prompts)
        states = self.text_encoder(ids)
        return states, pooled_states(ids, states)


def load_flow(weights: Path = WEIGHTS, transformer: Path | None = None) -> ToyFlowModel:
    """The flow model: the toy text encoder and VAE from ``weights`` (default: the committed ones) and the
    transformer from ``transformer`` (default ``weights/flow_transformer.safetensors``), in eval mode, float32, on
    the CPU, with its scheduler."""
    weights = Path(weights)
    transformer_path = Path(transformer) if transformer is not None else weights / FLOW_WEIGHTS.name
    text_encoder, vae, net = TextEncoder(), make_vae(), make_transformer()
    _load_part(text_encoder, weights / "text_encoder.safetensors")
    vae_meta = _load_part(vae, weights / "vae.safetensors")
    if not transformer_path.is_file():
        raise FileNotFoundError(f"The toy flow model's weights {transformer_path} are missing: run `python -m "
                                f"benchmarks.toy.flow_train` to train them (or check out the committed weights).")
    meta = _load_part(net, transformer_path)
    for module in (text_encoder, vae, net):
        module.eval().requires_grad_(False)
    return ToyFlowModel(text_encoder, vae, net, make_flow_scheduler(), float(vae_meta["scaling_factor"]),
                        json.loads(json.dumps(meta)))
