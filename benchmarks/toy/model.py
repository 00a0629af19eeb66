"""The toy text-to-image model: CLIP tokenizer, a small causal text encoder, a 4-channel VAE and an SD1-layout UNet.

Sizes (see ``CONFIG``): 64x64 RGB images, 16x16x4 latents (the VAE downsamples 4x), a UNet with SD1.x's block
structure at toy width -- four levels, two res blocks each, cross-attention at the first three and in the middle
(16 transformer blocks, 12 input and 12 output blocks as ComfyUI counts them), so every per-family default of the
editors (MasaCtrl's start layer, PnP's blocks, Prompt-to-Prompt's map level) lands where it lands on SD1.5.
The noise schedule is SD1.x's (scaled linear 0.00085..0.012, 1000 steps, epsilon prediction).

The text encoder is CLIP's text transformer in miniature: token and position embeddings over the 49,408 CLIP
tokens and 77 positions, pre-norm causal self-attention layers, a final layer norm; its output (every position,
as SD1 uses it) is the UNet's cross-attention context. The empty prompt is the unconditional input, as on SD1.

``load()`` reads the committed weights (``weights/*.safetensors``); ``comfy_model()`` gives ComfyUI's SD15 family
the same UNet (ComfyUI's own diffusers-to-ldm key map; its GroupNorms set to the toy's 16 groups).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import nn

from .tokenizer import CONTEXT_LENGTH, tokenizer

WEIGHTS = Path(__file__).with_name("weights")
CONFIG = {
    "image_size": 64,
    "latent_size": 16,
    "context_dim": 64,
    "text_layers": 2,
    "text_heads": 4,
    "unet_channels": 32,
    "unet_heads": 8,
    "vae_channels": (16, 32, 64),
}


class TextEncoder(nn.Module):
    """A small CLIP-style text transformer (causal self-attention, pre-norm, GELU MLP)."""

    def __init__(self, vocab_size: int = 49408, dim: int = CONFIG["context_dim"], layers: int = CONFIG["text_layers"],
                 heads: int = CONFIG["text_heads"], length: int = CONTEXT_LENGTH):
        super().__init__()
        self.token_embedding = nn.Embedding(vocab_size, dim)
        self.position_embedding = nn.Parameter(torch.zeros(length, dim))
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(dim, heads, dim_feedforward=4 * dim, dropout=0.0, activation="gelu",
                                       batch_first=True, norm_first=True) for _ in range(layers))
        self.final_layer_norm = nn.LayerNorm(dim)
        self.register_buffer("causal", torch.full((length, length), float("-inf")).triu(1), persistent=False)
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.position_embedding, std=0.01)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.token_embedding(ids) + self.position_embedding[: ids.shape[1]]
        mask = self.causal[: ids.shape[1], : ids.shape[1]]
        for layer in self.layers:
            x = layer(x, src_mask=mask, is_causal=True)
        return self.final_layer_norm(x)


def make_unet():
    from diffusers import UNet2DConditionModel

    c = CONFIG["unet_channels"]
    return UNet2DConditionModel(
        sample_size=CONFIG["latent_size"], in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(c, 2 * c, 2 * c),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=CONFIG["context_dim"], attention_head_dim=CONFIG["unet_heads"], norm_num_groups=16)


def ldm_unet_config() -> dict:
    """The same UNet in ComfyUI's (ldm) terms, for ``comfy.supported_models.SD15``."""
    c = CONFIG["unet_channels"]
    return {"use_checkpoint": False, "image_size": CONFIG["latent_size"], "in_channels": 4, "out_channels": 4,
            "model_channels": c, "num_res_blocks": [1, 1, 1], "channel_mult": [1, 2, 2],
            "transformer_depth": [1, 1, 0], "transformer_depth_output": [1, 1, 1, 1, 0, 0],
            "transformer_depth_middle": 1, "use_spatial_transformer": True, "use_linear_in_transformer": False,
            "legacy": False, "adm_in_channels": None, "context_dim": CONFIG["context_dim"], "num_heads": CONFIG["unet_heads"],
            "num_head_channels": -1, "use_temporal_attention": False, "use_temporal_resblock": False}


def make_vae():
    from diffusers import AutoencoderKL

    channels = tuple(CONFIG["vae_channels"])
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=channels,
                         down_block_types=("DownEncoderBlock2D",) * len(channels),
                         up_block_types=("UpDecoderBlock2D",) * len(channels), layers_per_block=1,
                         norm_num_groups=8, sample_size=CONFIG["image_size"])


def make_scheduler():
    """SD1.x's DDIM scheduler (as the reference code builds it)."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         clip_sample=False, set_alpha_to_one=False, prediction_type="epsilon")


class VAEImages:
    """Images [B, 3, H, W] in [0, 1] <-> the toy VAE's scaled latents (its posterior mean), for a model holding
    ``vae`` and ``scaling_factor``."""

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return self.vae.encode(images.float() * 2.0 - 1.0).latent_dist.mean * self.scaling_factor

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return ((self.vae.decode(latents.float() / self.scaling_factor).sample + 1.0) / 2.0).clamp(0.0, 1.0)


@dataclass
class ToyModel(VAEImages):
    """The loaded model. Images are ``[B, 3, 64, 64]`` in [0, 1]; latents are scaled like SD's."""

    text_encoder: TextEncoder
    vae: object
    unet: object
    scheduler: object
    scaling_factor: float

    def embed(self, prompts: Sequence[str] | str) -> torch.Tensor:
        ids = tokenizer()(prompts)
        with torch.no_grad():
            return self.text_encoder(ids)


def save_part(module: nn.Module, path: Path, metadata: Optional[dict] = None, dtype=torch.float32) -> None:
    from safetensors.torch import save_file

    state = {k: v.detach().to(dtype).contiguous() for k, v in module.state_dict().items()}
    save_file(state, str(path), metadata={k: json.dumps(v) for k, v in (metadata or {}).items()})


def _load_part(module: nn.Module, path: Path) -> dict:
    from safetensors import safe_open
    from safetensors.torch import load_file

    if not path.is_file():
        raise FileNotFoundError(f"The toy model's weights {path} are missing: run `python -m benchmarks.toy.train` "
                                f"to train them (or check out the repository's committed weights).")
    state = {k: v.float() for k, v in load_file(str(path)).items()}
    module.load_state_dict(state, strict=True)
    with safe_open(str(path), "pt") as handle:
        return {k: json.loads(v) for k, v in (handle.metadata() or {}).items()}


def load(weights: Path = WEIGHTS) -> ToyModel:
    """The toy model from ``weights`` (default: the committed weights), in eval mode, float32, on the CPU."""
    weights = Path(weights)
    text_encoder, vae, unet = TextEncoder(), make_vae(), make_unet()
    _load_part(text_encoder, weights / "text_encoder.safetensors")
    meta = _load_part(vae, weights / "vae.safetensors")
    _load_part(unet, weights / "unet.safetensors")
    for module in (text_encoder, vae, unet):
        module.eval().requires_grad_(False)
    return ToyModel(text_encoder, vae, unet, make_scheduler(), float(meta["scaling_factor"]))


def comfy_model(unet):
    """A ComfyUI SD15-family ModelPatcher holding ``unet``'s weights (needs ComfyUI importable)."""
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models
    import comfy.utils

    config = comfy.supported_models.SD15(ldm_unet_config())
    config.set_inference_dtype(torch.float32, None)
    model = config.get_model({})
    state = unet.state_dict()
    key_map = comfy.utils.unet_to_diffusers(config.unet_config)
    model.diffusion_model.load_state_dict({ldm: state[name] for name, ldm in key_map.items() if name in state},
                                          strict=True)
    # ComfyUI's ldm UNet builds every GroupNorm with 32 groups; the toy UNet was trained with 16 (its narrowest
    # level has 32 channels). Group count is not a weight: set it on the modules.
    for module in model.diffusion_model.modules():
        if isinstance(module, nn.GroupNorm):
            module.num_groups = unet.config.norm_num_groups
    return comfy.model_patcher.ModelPatcher(model, load_device=comfy.model_management.get_torch_device(),
                                            offload_device=comfy.model_management.unet_offload_device())
