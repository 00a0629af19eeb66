"""Test helpers: locate ComfyUI, import the pack, build tiny random-weight models.

The test model: a diffusers ``UNet2DConditionModel`` with SD1.x's layout at toy size (two levels, 32/64
channels, cross-attention dim 32), default diffusers initialisation, and its output convolution scaled by
``OUT_SCALE``. At default initialisation a random UNet predicts "noise" of the same size as its input and
uncorrelated with it; DDIM inversion then drifts as far as the signal itself. Scaling the last layer down
makes eps small and smooth in z, like a trained denoiser's residual: DDIM inversion + sampling at guidance 1
then reconstructs closely, and guidance 7.5 (which amplifies the conditional difference that inversion at
guidance 1 never saw) reconstructs measurably worse -- the behaviour the papers start from.
"""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from typing import Optional

import torch

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "comfyui_direct_inversion"
OUT_SCALE = 0.1
CONTEXT_DIM = 32
TOKENS = 8
COMFY_SKIP_REASON = (
    "ComfyUI not found: set COMFYUI_PATH to a ComfyUI checkout (or clone this pack into ComfyUI/custom_nodes/) "
    "to run the ComfyUI tests; `bash .ci/run` lays out and tests both supported versions"
)
# Set by .ci/run: a test that would skip for want of ComfyUI or Chromium fails instead.
NO_SKIP = os.environ.get("DI_TESTS_NO_SKIP", "") not in ("", "0")


def skip_or_fail(reason: str):
    """Skip for want of an optional tool (ComfyUI, Chromium), or fail where CI requires every test to run."""
    import pytest

    if NO_SKIP:
        pytest.fail(f"{reason} (DI_TESTS_NO_SKIP is set: nothing may be skipped)", pytrace=False)
    pytest.skip(reason)

# ldm (ComfyUI) layout of the same toy UNet: one res block per level, attention at level 0 only.
TINY_LDM_UNET_CONFIG = {
    "use_checkpoint": False,
    "image_size": 32,
    "in_channels": 4,
    "out_channels": 4,
    "model_channels": 32,
    "num_res_blocks": [1, 1],
    "channel_mult": [1, 2],
    "transformer_depth": [1, 0],
    "transformer_depth_output": [1, 1, 0, 0],
    "transformer_depth_middle": 1,
    "use_spatial_transformer": True,
    "use_linear_in_transformer": False,
    "legacy": False,
    "adm_in_channels": None,
    "context_dim": CONTEXT_DIM,
    "use_temporal_attention": False,
    "use_temporal_resblock": False,
}


def find_comfyui() -> Optional[Path]:
    """$COMFYUI_PATH, else the ComfyUI this pack sits in (../..)."""
    candidates = [os.environ.get("COMFYUI_PATH"), ROOT.parent.parent]
    for candidate in candidates:
        if candidate and (Path(candidate) / "comfy" / "model_management.py").is_file():
            return Path(candidate).resolve()
    return None


def comfyui_version(path: Path) -> str:
    """The version a ComfyUI folder declares (``comfyui_version.py``), or "unknown"."""
    import re

    try:
        text = (Path(path) / "comfyui_version.py").read_text()
    except OSError:
        return "unknown"
    found = re.search(r'__version__\s*=\s*"([^"]+)"', text)
    return found.group(1) if found else "unknown"


def load_pack(name: str = PACKAGE):
    """Import the repository as a package (its folder name may not be a valid module name)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, ROOT / "__init__.py", submodule_search_locations=[str(ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def tiny_diffusers_unet(seed: int = 0, out_scale: float = OUT_SCALE):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=CONTEXT_DIM,
        attention_head_dim=8,
        norm_num_groups=32,
    )
    with torch.no_grad():
        unet.conv_out.weight.mul_(out_scale)
        unet.conv_out.bias.mul_(out_scale)
    return unet.eval()


def sd_scheduler(prediction_type: str = "epsilon"):
    """SD1.x/2.x's DDIM scheduler as the reference code builds it."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                         set_alpha_to_one=False, prediction_type=prediction_type)


def image_like_latent(batch: int = 1, size: int = 16, seed: int = 1) -> torch.Tensor:
    """A smooth latent with unit-ish variance, like a VAE latent of a photo."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(batch, 4, size // 4, size // 4, generator=g)
    return torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)


PROMPT_SPREAD = 0.5


def prompt_embeds(seed: int, batch: int = 1) -> torch.Tensor:
    """Toy prompt embeddings. Real CLIP embeddings of different prompts share most of their structure (the start
    token, padding), so ours are a common base plus a prompt-specific part of relative size ``PROMPT_SPREAD``."""
    base = torch.randn(1, TOKENS, CONTEXT_DIM, generator=torch.Generator().manual_seed(0))
    own = torch.randn(batch, TOKENS, CONTEXT_DIM, generator=torch.Generator().manual_seed(1000 + seed))
    return base + PROMPT_SPREAD * own


EDIT_STEPS = 10  # steps of conftest's ``edit_setup`` inversion


def diffusers_edit(setup: dict, target, editor=None, inversion=None, cfg: float = 7.5, **kw):
    """An edit through the diffusers backend of conftest's ``edit_setup`` (its DDIM inversion unless given one)."""
    s = setup
    return s["backend"].edit(s["unet"], s["scheduler"], inversion or s["ddim"], target, s["null"], cfg=cfg,
                             editor=editor, **kw)


def invert_with(setup: dict, method: str, steps: int = EDIT_STEPS):
    """``edit_setup``'s latent inverted with ``method`` (null-text with 2 inner steps, to stay quick)."""
    s = setup
    options = {"inner_steps": 2} if method == "null_text" else None
    return s["backend"].invert(s["unet"], s["scheduler"], s["z0"], s["source"], s["null"], steps=steps, method=method,
                               options=options)


def comfy_model_from_diffusers(unet, v_prediction: bool = False):
    """A ComfyUI SD1.5-family ModelPatcher with the diffusers UNet's weights (ComfyUI's own key map)."""
    import comfy.model_management
    import comfy.model_patcher
    import comfy.model_sampling
    import comfy.supported_models
    import comfy.utils

    config = comfy.supported_models.SD15(TINY_LDM_UNET_CONFIG)
    config.set_inference_dtype(torch.float32, None)
    model = config.get_model({})
    diffusers_sd = unet.state_dict()
    key_map = comfy.utils.unet_to_diffusers(config.unet_config)
    ldm_sd = {ldm_key: diffusers_sd[diffusers_key] for diffusers_key, ldm_key in key_map.items()
              if diffusers_key in diffusers_sd}
    model.diffusion_model.load_state_dict(ldm_sd, strict=True)
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=comfy.model_management.get_torch_device(),
                                               offload_device=comfy.model_management.unet_offload_device())
    if v_prediction:
        class ModelSamplingV(comfy.model_sampling.ModelSamplingDiscrete, comfy.model_sampling.V_PREDICTION):
            pass

        patcher.add_object_patch("model_sampling", ModelSamplingV(config))
    return patcher


def comfy_conditioning(embeds: torch.Tensor) -> list:
    return [[embeds, {}]]


def tiny_comfy_vae(seed: int = 0):
    """A ComfyUI VAE (AutoencoderKL, 8x downscale, 4 latent channels) at toy width with random weights."""
    import comfy.sd
    from comfy.ldm.models.autoencoder import AutoencoderKL

    ddconfig = {"double_z": True, "z_channels": 4, "resolution": 64, "in_channels": 3, "out_ch": 3, "ch": 32,
                "ch_mult": [1, 1, 1, 1], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0}
    config = {"params": {"embed_dim": 4, "ddconfig": ddconfig}}
    shapes = {k: v.shape for k, v in AutoencoderKL(**config["params"]).state_dict().items()}
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for key, shape in shapes.items():
        if key.endswith("weight") and len(shape) > 1:
            fan_in = torch.Size(shape[1:]).numel()
            sd[key] = torch.randn(shape, generator=g) / fan_in ** 0.5
        elif key.endswith("weight"):
            sd[key] = torch.ones(shape)
        else:
            sd[key] = torch.zeros(shape)
    return comfy.sd.VAE(sd=sd, config=config)


TINY_SDXL_UNET_CONFIG = {
    **TINY_LDM_UNET_CONFIG,
    "use_linear_in_transformer": True,
    "adm_in_channels": 2816,  # SDXL's pooled CLIP-G (1280) + six 256-d size/crop embeddings
    "num_classes": "sequential",
    "transformer_depth": [0, 1],
    "transformer_depth_output": [0, 0, 1, 1],
}
SDXL_POOLED_DIM = 1280


def tiny_comfy_sdxl(seed: int = 0, out_scale: float = OUT_SCALE, pooled_dim: int = SDXL_POOLED_DIM):
    """A ComfyUI SDXL-family ModelPatcher at toy size; ComfyUI leaves weights empty, so they are set here.
    ``pooled_dim``: width of the pooled text embedding it takes (SDXL's CLIP-G: 1280; the tiny SDXL CLIP's: 16)."""
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models

    config = comfy.supported_models.SDXL({**TINY_SDXL_UNET_CONFIG, "adm_in_channels": pooled_dim + 6 * 256})
    config.unet_config["num_head_channels"] = 8  # SDXL's 64-channel heads do not fit 32 channels
    config.set_inference_dtype(torch.float32, None)
    model = config.get_model({})
    init_comfy_unet(model.diffusion_model, seed, out_scale)
    return comfy.model_patcher.ModelPatcher(model, load_device=comfy.model_management.get_torch_device(),
                                            offload_device=comfy.model_management.unet_offload_device())


@torch.no_grad()
def init_comfy_unet(unet: torch.nn.Module, seed: int = 0, out_scale: float = OUT_SCALE) -> None:
    """Random weights for a ComfyUI UNet (ComfyUI leaves them empty): fan-in scaled normal for matrices and
    convolutions, as PyTorch's default, unit norms, zero biases; the output convolution scaled by ``out_scale``."""
    g = torch.Generator().manual_seed(seed)
    for module in unet.modules():
        norm = isinstance(module, (torch.nn.GroupNorm, torch.nn.LayerNorm))
        for name, p in module.named_parameters(recurse=False):
            if norm:
                p.fill_(1.0 if name == "weight" else 0.0)
            elif p.ndim > 1:
                p.copy_(torch.randn(p.shape, generator=g) / p[0].numel() ** 0.5)
            else:
                p.zero_()
    unet.out[2].weight.mul_(out_scale)


def sdxl_conditioning(seed: int) -> list:
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(1, TOKENS, CONTEXT_DIM, generator=g),
             {"pooled_output": torch.randn(1, SDXL_POOLED_DIM, generator=g)}]]


def tiny_comfy_clip(seed: int = 0, width: int = CONTEXT_DIM):
    """A ComfyUI CLIP with SD1.x's real tokenizer (shipped with ComfyUI) and a one-layer text model of width
    ``width`` (the tiny UNets' context dim) with random weights; its output has 77 tokens, like CLIP-L's."""
    import comfy.sd
    import comfy.sd1_clip

    config = {"hidden_size": width, "intermediate_size": 2 * width, "num_attention_heads": 2, "num_hidden_layers": 1,
              "projection_dim": width, "vocab_size": 49408, "max_position_embeddings": 77, "hidden_act": "quick_gelu",
              "layer_norm_eps": 1e-5, "bos_token_id": 0, "eos_token_id": 49407, "pad_token_id": 1,
              "initializer_range": 0.02, "initializer_factor": 1.0, "model_type": "clip_text_model"}

    class Target:
        params = {"clip_model": comfy.sd1_clip.SDClipModel, "textmodel_json_config": config}
        clip = comfy.sd1_clip.SD1ClipModel
        tokenizer = comfy.sd1_clip.SD1Tokenizer

    clip = comfy.sd.CLIP(target=Target(), model_options={"dtype": torch.float32})
    _init_text_model(clip.cond_stage_model, seed)
    return clip


def tiny_comfy_sdxl_clip(seed: int = 0):
    """A ComfyUI SDXL CLIP (both tokenizers real) whose two text models are tiny: CLIP-L and CLIP-G of width
    ``CONTEXT_DIM / 2`` each (their hidden states are concatenated into the tiny SDXL UNet's context); its pooled
    output has that width too (use ``tiny_comfy_sdxl(pooled_dim=CONTEXT_DIM // 2)``)."""
    import comfy.sd
    import comfy.sdxl_clip

    width = CONTEXT_DIM // 2
    common = {"hidden_size": width, "intermediate_size": 2 * width, "num_attention_heads": 2, "num_hidden_layers": 3}
    options = {"clip_l_model_config": common, "clip_g_model_config": common, "dtype": torch.float32}

    class Target:
        params = {}
        clip = comfy.sdxl_clip.SDXLClipModel
        tokenizer = comfy.sdxl_clip.SDXLTokenizer

    clip = comfy.sd.CLIP(target=Target(), model_options=options)
    _init_text_model(clip.cond_stage_model, seed)
    return clip


def _init_text_model(model, seed: int) -> None:
    """ComfyUI leaves text-model weights empty: unit-scale embeddings, fan-in scaled linear layers, unit norms."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            norm = isinstance(module, torch.nn.LayerNorm)
            for name, p in module.named_parameters(recurse=False):
                if name == "logit_scale":
                    continue
                if norm:
                    p.fill_(1.0 if name == "weight" else 0.0)
                elif p.ndim > 1:
                    scale = 1.0 if isinstance(module, torch.nn.Embedding) else p.shape[1] ** -0.5
                    p.copy_(torch.randn(p.shape, generator=g) * scale)
                else:
                    p.zero_()


def reference_attention(q, k, v, heads, dtype: torch.dtype = torch.float64):
    """softmax(q k^T / sqrt(d)) v per head, in ``dtype`` (the probabilities materialised as a tensor), written
    independently of the editors' code."""
    import math

    b, n, _ = q.shape
    split = lambda t: t.reshape(t.shape[0], t.shape[1], heads, -1).permute(0, 2, 1, 3).to(dtype)  # noqa: E731
    qh, kh, vh = split(q), split(k), split(v)
    weights = torch.softmax(qh @ kh.transpose(-1, -2) / math.sqrt(qh.shape[-1]), dim=-1)
    return (weights @ vh).permute(0, 2, 1, 3).reshape(b, n, -1)
