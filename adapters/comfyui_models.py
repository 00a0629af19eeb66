"""ComfyUI models as the pack sees them: family (VP UNet or flow-matching), schedule, weights' fingerprint, and the
checks a conditioning must pass before it reaches one."""
from __future__ import annotations

import hashlib
from typing import Optional

import torch

import comfy.model_management
import comfy.model_sampling

from ..inversion import FLOW, VP, Space

__all__ = ["check_conditioning", "guidance_distilled", "model_family", "model_fingerprint", "model_space", "schedule"]


def _model_sampling(model):
    return model.get_model_object("model_sampling")


def model_family(model) -> str:
    """Architecture and prediction type of a ModelPatcher, e.g. ``SD15/EPS``, ``SD3/FLOW``, ``Flux/FLOW``."""
    ms = _model_sampling(model)
    if model_space(model) is FLOW:
        prediction = "FLOW"
    else:
        prediction = "V_PREDICTION" if isinstance(ms, comfy.model_sampling.V_PREDICTION) else "EPS"
    return f"{type(model.model.model_config).__name__}/{prediction}"


def model_fingerprint(model) -> str:
    """A hash of the weights the model samples with (LoRA and other weight patches included).

    The model is loaded the way sampling loads it (patches applied), then 16 evenly spaced values of every
    diffusion-model parameter, rounded to float16 so the model's precision does not matter, are hashed with the
    parameter names and shapes.
    """
    comfy.model_management.load_models_gpu([model])
    digest = hashlib.sha256()
    for name, param in sorted(model.model.diffusion_model.named_parameters()):
        flat = param.detach().flatten()
        sample = flat[:: max(1, flat.numel() // 16)][:16].to("cpu", torch.float16)
        digest.update(f"{name}{tuple(param.shape)}".encode())
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()[:32]


def model_space(model) -> Space:
    """The model's family (``inversion.spaces``): VP for discrete-timestep eps/v-prediction models, flow for CONST
    flow-matching models (SD3/SD3.5, Flux); anything else (EDM, continuous or cosine schedules...) is refused."""
    ms = _model_sampling(model)
    sampling = comfy.model_sampling
    discrete_vp = (isinstance(ms, sampling.ModelSamplingDiscrete)
                   and not isinstance(ms, sampling.ModelSamplingDiscreteEDM)
                   and isinstance(ms, sampling.EPS)
                   and not isinstance(ms, (sampling.EDM, sampling.CONST)))
    if discrete_vp:
        return VP
    if isinstance(ms, sampling.CONST) and isinstance(ms, (sampling.ModelSamplingDiscreteFlow, sampling.ModelSamplingFlux)):
        return FLOW  # SD3/SD3.5 and Flux (tested); other image models sampled so (AuraFlow, Lumina 2...) untested
    raise ValueError(
        f"Inversion needs a discrete-timestep eps- or v-prediction model (SD1.x, SD2.x, SDXL) or a flow-matching model "
        f"(SD3/SD3.5, Flux); this model ({type(model.model.model_config).__name__}) samples with {type(ms).__name__}."
    )


def guidance_distilled(model) -> bool:
    """Flux (dev and schnell): sampled without CFG, its guidance an embedding."""
    return model.model.model_config.unet_config.get("image_model") == "flux"


def schedule(model, steps: int) -> tuple[torch.Tensor, list[int]]:
    """The model's trajectory noise levels (ascending) and timesteps for ``steps`` steps: DDIM's on VP models,
    ComfyUI's ``simple`` schedule on flow models (with the model's own shift)."""
    return model_space(model).trajectory(_model_sampling(model).sigmas, steps)


def context_width(model) -> Optional[int]:
    """The prompt-embedding width the model takes: a UNet's cross-attention ``context_dim``, SD3's context embedder's
    input, Flux's ``context_in_dim`` (None where the config does not say)."""
    config = model.model.model_config.unet_config
    embedder = config.get("context_embedder_config") or {}
    for width in (config.get("context_dim"), config.get("context_in_dim"), embedder.get("params", {}).get("in_features")):
        if width is not None:
            return int(width)
    return None


def check_conditioning(model, name: str, conditioning) -> None:
    if not isinstance(conditioning, list) or not all(isinstance(c, (list, tuple)) and len(c) == 2 for c in conditioning):
        raise TypeError(f"The {name} conditioning is not a ComfyUI CONDITIONING (a list of [tensor, dict] pairs).")
    width = context_width(model)
    for embeds, _ in conditioning:
        if width is not None and embeds.shape[-1] != width:
            raise ValueError(f"The {name} conditioning has width {embeds.shape[-1]} but this model's cross-attention "
                             f"expects {width}: encode the prompt with this model's CLIP.")
