"""Tiny random-weight flow-matching models for the tests: SD3 (MMDiT) and Flux, in diffusers and in ComfyUI with the
same weights, the schedulers they ship with, toy prompt embeddings, and (ComfyUI only) tiny CLIPs with the real
tokenizers, a 16-channel VAE and stand-ins for a checkpoint loader.

The diffusers transformers are built at toy size with default diffusers initialisation (from ``seed``), their output
projection scaled by ``out_scale``: like the tiny UNets' ``OUT_SCALE`` (see di_testing), this makes the predicted
velocity small and smooth in the latent, so that inversion round trips converge. The ComfyUI models are made from the
diffusers ones by ComfyUI's own code: ``comfy.model_detection.convert_diffusers_mmdit`` (what UNETLoader runs on a
diffusers-format file) maps the weights, ``detect_unet_config`` reads the configuration off them and
``model_config_from_unet_config`` picks the model class (``supported_models.SD3`` / ``Flux``).

Toy widths are bounded by what ComfyUI hard-codes:
- ComfyUI's MMDiT has 64-wide heads and as many heads as joint blocks (``depth``): the tiny SD3 has 2 of each (width
  128). Its text encoder always pads the context to 4096 channels, so the tiny SD3 takes a 4096-wide context (its
  ``context_embedder`` is the largest layer); the pooled vector is CLIP-L's and CLIP-G's pooled outputs side by side.
- ComfyUI reads a Flux's head layout from the real model's sizes (0.3.64 also its width and context width); those
  fields are set from the diffusers configuration instead, so the tiny Flux has 2 heads of 16 (RoPE axes 4+6+6). Its
  context is the (tiny) T5's output, its pooled vector CLIP-L's.
"""
from __future__ import annotations

from typing import Optional

import torch

import di_testing as T

OUT_SCALE = T.OUT_SCALE
TOKENS = T.TOKENS
LATENT_CHANNELS = 16

# SD3: ComfyUI's SD3 text encoder pads its output to 4096 channels, whichever encoders it has.
SD3_CONTEXT_DIM = 4096
SD3_CLIP_WIDTH = 16  # each of the tiny CLIP-L and CLIP-G
SD3_POOLED_DIM = 2 * SD3_CLIP_WIDTH
SD3_HEADS = 2  # ComfyUI's MMDiT: 64-wide heads, as many as joint blocks
SD3_HEAD_DIM = 64
SD3_POS_EMBED_MAX_SIZE = 32  # patches per side: latents up to 64x64

# Flux: context = the tiny T5's output, pooled = the tiny CLIP-L's pooled output.
FLUX_CONTEXT_DIM = 32
FLUX_POOLED_DIM = 16
FLUX_HEADS = 2
FLUX_HEAD_DIM = 16
FLUX_AXES_DIM = (4, 6, 6)  # RoPE axes (index, row, column), summing to the head width

FLUX_GUIDANCE = 3.5  # Flux-dev's default guidance (ComfyUI's default when a conditioning has none)


def _scaled_output(model, out_scale: float):
    with torch.no_grad():
        model.proj_out.weight.mul_(out_scale)
        model.proj_out.bias.mul_(out_scale)
    return model.eval()


def tiny_diffusers_sd3(seed: int = 0, out_scale: float = OUT_SCALE, qk_norm: Optional[str] = None,
                      dual_attention_layers: tuple = ()):
    """A diffusers ``SD3Transformer2DModel`` at toy size: 16 latent channels, patch 2, 2 joint blocks of 2 heads of
    64 (width 128), context width ``SD3_CONTEXT_DIM``, pooled width ``SD3_POOLED_DIM``, positional embedding for up
    to 32x32 patches. ``qk_norm="rms_norm"``: SD3.5's RMS-normed queries and keys (None: SD3's);
    ``dual_attention_layers``: the joint blocks with SD3.5-medium's second, image-only attention."""
    from diffusers import SD3Transformer2DModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = SD3Transformer2DModel(
            sample_size=2 * SD3_POS_EMBED_MAX_SIZE,
            patch_size=2,
            in_channels=LATENT_CHANNELS,
            out_channels=LATENT_CHANNELS,
            num_layers=SD3_HEADS,
            attention_head_dim=SD3_HEAD_DIM,
            num_attention_heads=SD3_HEADS,
            joint_attention_dim=SD3_CONTEXT_DIM,
            caption_projection_dim=SD3_HEADS * SD3_HEAD_DIM,
            pooled_projection_dim=SD3_POOLED_DIM,
            pos_embed_max_size=SD3_POS_EMBED_MAX_SIZE,
            qk_norm=qk_norm,
            dual_attention_layers=tuple(dual_attention_layers),
        )
    return _scaled_output(model, out_scale)


def tiny_diffusers_flux(seed: int = 0, out_scale: float = OUT_SCALE, guidance_embeds: bool = True):
    """A diffusers ``FluxTransformer2DModel`` at toy size: 16 latent channels in 2x2 patches (64 packed channels),
    one double and one single block of 2 heads of 16 (width 32), RoPE axes ``FLUX_AXES_DIM``, context width
    ``FLUX_CONTEXT_DIM``, pooled width ``FLUX_POOLED_DIM``; ``guidance_embeds``: Flux-dev's guidance embedding
    (False: Flux-schnell's layout)."""
    from diffusers import FluxTransformer2DModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = FluxTransformer2DModel(
            patch_size=1,
            in_channels=4 * LATENT_CHANNELS,
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=FLUX_HEAD_DIM,
            num_attention_heads=FLUX_HEADS,
            joint_attention_dim=FLUX_CONTEXT_DIM,
            pooled_projection_dim=FLUX_POOLED_DIM,
            guidance_embeds=guidance_embeds,
            axes_dims_rope=FLUX_AXES_DIM,
        )
    return _scaled_output(model, out_scale)


def sd3_scheduler():
    """SD3's scheduler as its checkpoints ship it: flow-matching Euler, 1000 timesteps, shift 3."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)


def flux_scheduler():
    """Flux-dev's scheduler as its checkpoint ships it: flow-matching Euler with resolution-dependent shift
    (``mu`` from the image sequence length, 0.5 at 256 tokens to 1.15 at 4096)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
                                           base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                                           max_image_seq_len=4096)


def _prompt(seed: int, tokens: int, context_dim: int, pooled_dim: int, batch: int):
    """A common base plus a prompt-specific part of relative size ``PROMPT_SPREAD`` (as di_testing.prompt_embeds),
    for the token embeddings and the pooled vector alike."""
    g = torch.Generator().manual_seed(0)
    base, base_pooled = torch.randn(1, tokens, context_dim, generator=g), torch.randn(1, pooled_dim, generator=g)
    g = torch.Generator().manual_seed(1000 + seed)
    own, own_pooled = torch.randn(batch, tokens, context_dim, generator=g), torch.randn(batch, pooled_dim, generator=g)
    return base + T.PROMPT_SPREAD * own, base_pooled + T.PROMPT_SPREAD * own_pooled


def sd3_prompt(seed: int, tokens: int = TOKENS, batch: int = 1):
    """Toy SD3 prompt: (embeds [batch, tokens, SD3_CONTEXT_DIM], pooled [batch, SD3_POOLED_DIM])."""
    return _prompt(seed, tokens, SD3_CONTEXT_DIM, SD3_POOLED_DIM, batch)


def flux_prompt(seed: int, tokens: int = TOKENS, batch: int = 1):
    """Toy Flux prompt: (embeds [batch, tokens, FLUX_CONTEXT_DIM], pooled [batch, FLUX_POOLED_DIM])."""
    return _prompt(seed, tokens, FLUX_CONTEXT_DIM, FLUX_POOLED_DIM, batch)


def comfy_flow_conditioning(embeds: torch.Tensor, pooled: torch.Tensor, guidance: Optional[float] = None) -> list:
    """ComfyUI CONDITIONING of one prompt: ``[[embeds, {"pooled_output": pooled}]]``, plus ``"guidance"`` (what
    the FluxGuidance node sets; a Flux model takes 3.5 without it) when given."""
    extra = {"pooled_output": pooled}
    if guidance is not None:
        extra["guidance"] = guidance
    return [[embeds, extra]]


def _comfy_model_from_diffusers(transformer, unet_config_fixes: dict):
    """A ComfyUI ModelPatcher (fp32) holding ``transformer``'s weights: ComfyUI's conversion of a diffusers-format
    MMDiT/Flux state dict, its configuration detection (with ``unet_config_fixes`` where ComfyUI assumes the real
    model's sizes) and its model class for that configuration; every weight must be used and every parameter set."""
    import comfy.model_detection
    import comfy.model_management
    import comfy.model_patcher

    diffusers_sd = {k: v.detach().clone() for k, v in transformer.state_dict().items()}  # converted in place
    sd = comfy.model_detection.convert_diffusers_mmdit(diffusers_sd, "")
    assert sd is not None, "ComfyUI does not recognise the diffusers state dict"
    assert not diffusers_sd, f"diffusers weights ComfyUI's conversion left out: {sorted(diffusers_sd)}"
    unet_config = comfy.model_detection.detect_unet_config(sd, "")
    unet_config.update(unet_config_fixes)
    model_config = comfy.model_detection.model_config_from_unet_config(unet_config, sd)
    assert model_config is not None, f"no ComfyUI model matches {unet_config}"
    model_config.set_inference_dtype(torch.float32, None)
    model = model_config.get_model(sd, "")
    model.diffusion_model.load_state_dict(model_config.process_unet_state_dict(sd), strict=True)
    model.eval()
    return comfy.model_patcher.ModelPatcher(model, load_device=comfy.model_management.get_torch_device(),
                                            offload_device=comfy.model_management.unet_offload_device())


def comfy_sd3_from_diffusers(transformer):
    """A ComfyUI SD3 ModelPatcher (``model_base.SD3``, ``ModelSamplingDiscreteFlow`` with shift 3) with the
    diffusers SD3 transformer's weights."""
    return _comfy_model_from_diffusers(transformer, {})


def comfy_flux_from_diffusers(transformer):
    """A ComfyUI Flux ModelPatcher (``model_base.Flux``, ``ModelSamplingFlux``; ``supported_models.Flux`` with a
    guidance embedding, ``FluxSchnell`` without) with the diffusers Flux transformer's weights."""
    config = transformer.config
    width = config.num_attention_heads * config.attention_head_dim
    fixes = {"hidden_size": width, "num_heads": config.num_attention_heads, "axes_dim": list(config.axes_dims_rope),
             "context_in_dim": config.joint_attention_dim, "vec_in_dim": config.pooled_projection_dim,
             "in_channels": config.in_channels // 4, "out_channels": (config.out_channels or config.in_channels) // 4}
    return _comfy_model_from_diffusers(transformer, fixes)


def _init_flow_text_model(model, seed: int) -> None:
    """di_testing's text-model initialisation, with T5's RMS norms (no LayerNorm subclass) set to one too."""
    T._init_text_model(model, seed)
    with torch.no_grad():
        for module in model.modules():
            if type(module).__name__ == "T5LayerNorm":
                module.weight.fill_(1.0)


def _clip_config(width: int, layers: int) -> dict:
    return {"hidden_size": width, "intermediate_size": 2 * width, "num_attention_heads": 2,
            "num_hidden_layers": layers, "projection_dim": width}


def tiny_comfy_sd3_clip(seed: int = 0):
    """A ComfyUI SD3 CLIP: ComfyUI's SD3 tokenizer (CLIP-L, CLIP-G and T5 tokenizers, all real) with CLIP-L and
    CLIP-G text models of width ``SD3_CLIP_WIDTH`` (three layers: SD3 takes penultimate hidden states) and no
    T5, as DualCLIPLoader gives. Its conditioning: [1, 77, SD3_CONTEXT_DIM] (the two CLIPs' hidden states side by
    side, zero-padded to 4096 as ComfyUI does) and ``pooled_output`` [1, SD3_POOLED_DIM]."""
    import comfy.sd
    import comfy.text_encoders.sd3_clip

    config = _clip_config(SD3_CLIP_WIDTH, 3)
    options = {"clip_l_model_config": config, "clip_g_model_config": config, "dtype": torch.float32}

    class Target:
        params = {}
        clip = comfy.text_encoders.sd3_clip.sd3_clip(clip_l=True, clip_g=True, t5=False)
        tokenizer = comfy.text_encoders.sd3_clip.SD3Tokenizer

    clip = comfy.sd.CLIP(target=Target(), model_options=options)
    _init_flow_text_model(clip.cond_stage_model, seed)
    return clip


def tiny_comfy_flux_clip(seed: int = 0):
    """A ComfyUI Flux CLIP: ComfyUI's Flux tokenizer (CLIP-L and T5, both real; T5 pads to 256 tokens) with a
    one-layer CLIP-L of width ``FLUX_POOLED_DIM`` and a one-layer T5 of width ``FLUX_CONTEXT_DIM``. Its
    conditioning: the T5 states [1, 256, FLUX_CONTEXT_DIM] and CLIP-L's ``pooled_output`` [1, FLUX_POOLED_DIM]."""
    import comfy.sd
    import comfy.text_encoders.flux

    t5 = {"d_model": FLUX_CONTEXT_DIM, "d_ff": 2 * FLUX_CONTEXT_DIM, "d_kv": FLUX_CONTEXT_DIM // 2, "num_heads": 2,
          "num_layers": 1, "num_decoder_layers": 1}
    options = {"clip_l_model_config": _clip_config(FLUX_POOLED_DIM, 1), "t5xxl_model_config": t5,
               "dtype": torch.float32}

    class Target:
        params = {}
        clip = comfy.text_encoders.flux.flux_clip(dtype_t5=torch.float32)
        tokenizer = comfy.text_encoders.flux.FluxTokenizer

    clip = comfy.sd.CLIP(target=Target(), model_options=options)
    _init_flow_text_model(clip.cond_stage_model, seed)
    return clip


def tiny_comfy_flow_vae(seed: int = 0):
    """A ComfyUI VAE (AutoencoderKL, 8x downscale, 16 latent channels as SD3's and Flux's) at toy width with random
    weights (see di_testing.tiny_comfy_vae); the latent formats' scale and shift stay with the models, as in
    ComfyUI."""
    import comfy.sd
    from comfy.ldm.models.autoencoder import AutoencoderKL

    ddconfig = {"double_z": True, "z_channels": LATENT_CHANNELS, "resolution": 64, "in_channels": 3, "out_ch": 3,
                "ch": 32, "ch_mult": [1, 1, 1, 1], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0}
    config = {"params": {"embed_dim": LATENT_CHANNELS, "ddconfig": ddconfig}}
    shapes = {k: v.shape for k, v in AutoencoderKL(**config["params"]).state_dict().items()}
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for key, shape in shapes.items():
        if key.endswith("weight") and len(shape) > 1:
            sd[key] = torch.randn(shape, generator=g) / torch.Size(shape[1:]).numel() ** 0.5
        elif key.endswith("weight"):
            sd[key] = torch.ones(shape)
        else:
            sd[key] = torch.zeros(shape)
    vae = comfy.sd.VAE(sd=sd, config=config)
    vae.latent_channels = LATENT_CHANNELS  # ComfyUI sets it when it detects a VAE, not from a given config
    return vae


def _tiny_sd3_checkpoint():
    """What CheckpointLoaderSimple gives for an SD3/SD3.5 checkpoint (MODEL, CLIP, VAE), at toy size."""
    return comfy_sd3_from_diffusers(tiny_diffusers_sd3()), tiny_comfy_sd3_clip(), tiny_comfy_flow_vae()


def _tiny_flux_checkpoint():
    """What CheckpointLoaderSimple gives for a Flux-dev checkpoint (MODEL, CLIP, VAE), at toy size."""
    return comfy_flux_from_diffusers(tiny_diffusers_flux()), tiny_comfy_flux_clip(), tiny_comfy_flow_vae()


def _flow_test_nodes() -> dict:
    from comfy_testing import input_free_node

    return {
        "DITest_TinySD3Checkpoint": input_free_node("TinySD3Checkpoint",
                                                    "Stands in for CheckpointLoaderSimple (SD3/SD3.5).",
                                                    ("MODEL", "CLIP", "VAE"), _tiny_sd3_checkpoint),
        "DITest_TinyFluxCheckpoint": input_free_node("TinyFluxCheckpoint",
                                                     "Stands in for CheckpointLoaderSimple (Flux-dev).",
                                                     ("MODEL", "CLIP", "VAE"), _tiny_flux_checkpoint),
    }


FLOW_TEST_NODES = _flow_test_nodes()
