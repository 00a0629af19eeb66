"""diffusers models behind one small interface (``Net``), for the diffusers adapter.

- :class:`UNetNet`: ``UNet2DConditionModel`` with a DDPM-style scheduler (``DDIMScheduler``...), eps or
  v-prediction: the VP space. Conditioning: an embedding tensor ``[1 or B, tokens, dim]``.
- :class:`SD3Net`: ``SD3Transformer2DModel`` with ``FlowMatchEulerDiscreteScheduler``: the flow space.
- :class:`FluxNet`: ``FluxTransformer2DModel`` with ``FlowMatchEulerDiscreteScheduler``: the flow space; latents are
  packed into 2x2 patches here, as ``FluxPipeline`` packs them, and the guidance embedding (Flux dev) is fed.

Flow conditioning is ``(prompt_embeds, pooled_prompt_embeds)`` as the pipelines' ``encode_prompt`` returns them, kept
as a one-entry list ``[[prompt_embeds, {"pooled_output": pooled, "guidance": g}]]`` (ComfyUI's CONDITIONING layout,
which saved inversions store as is); ``guidance`` is Flux's embedded guidance (3.5 when not given, as ComfyUI's).

Every ``Net.predict`` returns d = (x - D(x)) / sigma: eps on VP models, the velocity on flow models.
"""
from __future__ import annotations

import math
from typing import Any, Optional

import torch

from ..inversion import FLOW, VP

__all__ = ["FLUX_DEFAULT_GUIDANCE", "FluxNet", "Net", "SD3Net", "UNetNet", "flow_prompt", "flow_train_sigmas", "network",
           "vp_train_sigmas"]

_PREDICTION_TYPES = ("epsilon", "v_prediction")
FLUX_DEFAULT_GUIDANCE = 3.5  # ComfyUI's Flux default without a FluxGuidance node; FluxPipeline's guidance_scale


def vp_train_sigmas(scheduler) -> torch.Tensor:
    """sigma of every training timestep of a DDPM-style scheduler, float64."""
    alphas_cumprod = scheduler.alphas_cumprod.to(torch.float64)
    return ((1.0 - alphas_cumprod) / alphas_cumprod).sqrt()


def flow_train_sigmas(scheduler, mu: Optional[float] = None) -> torch.Tensor:
    """sigma of every training timestep t = k / N (k = 1 .. N) of a ``FlowMatchEulerDiscreteScheduler``, float64,
    shifted as it shifts them: by ``shift`` (SD3: 3), or with dynamic shifting (Flux) by exp(mu) / (exp(mu) +
    1/t - 1), ``mu`` from the image size (``FluxPipeline``'s ``calculate_shift``). These are ComfyUI's
    ``ModelSamplingDiscreteFlow`` / ``ModelSamplingFlux`` levels."""
    config = scheduler.config
    unsupported = [name for name in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "invert_sigmas",
                                     "stochastic_sampling") if config.get(name, False)]
    if config.get("shift_terminal") is not None:
        unsupported.append("shift_terminal")
    if unsupported:
        raise ValueError(f"The scheduler's {', '.join(unsupported)} is not supported: use the model's plain "
                         f"FlowMatchEulerDiscreteScheduler configuration.")
    n = int(config.num_train_timesteps)
    t = torch.arange(1, n + 1, dtype=torch.float64) / n
    if config.get("use_dynamic_shifting", False):
        if mu is None:
            raise ValueError("This scheduler shifts its schedule by the image size (Flux): give mu.")
        if config.get("time_shift_type", "exponential") != "exponential":
            raise ValueError(f"time_shift_type {config.time_shift_type!r} is not supported (Flux uses exponential).")
        return math.exp(mu) / (math.exp(mu) + (1.0 / t - 1.0))
    shift = float(config.shift)
    return shift * t / (1.0 + (shift - 1.0) * t)


def flow_prompt(embeds, pooled: Optional[torch.Tensor] = None, guidance: Optional[float] = None) -> list:
    """Flow conditioning from ``(prompt_embeds, pooled_prompt_embeds)`` (or a tuple of them, or a conditioning list
    already); ``guidance``, if given, sets Flux's embedded guidance where the conditioning has none."""
    if isinstance(embeds, list):
        if len(embeds) != 1 or not (isinstance(embeds[0], (list, tuple)) and len(embeds[0]) == 2):
            raise ValueError("Flow conditioning must have exactly one [prompt_embeds, {'pooled_output': ...}] entry.")
        context, extra = embeds[0]
        extra = dict(extra)
    else:
        if isinstance(embeds, tuple):
            if pooled is not None or len(embeds) != 2:
                raise ValueError("Give flow prompts as (prompt_embeds, pooled_prompt_embeds).")
            embeds, pooled = embeds
        context, extra = embeds, {"pooled_output": pooled}
    if not isinstance(context, torch.Tensor) or context.ndim != 3:
        raise ValueError("Flow prompt embeddings must be a [batch, tokens, width] tensor.")
    if not isinstance(extra.get("pooled_output"), torch.Tensor) or extra["pooled_output"].ndim != 2:
        raise ValueError("SD3 and Flux need the pooled prompt embeddings ([batch, width]) beside the prompt's: pass "
                         "(prompt_embeds, pooled_prompt_embeds) as encode_prompt returns them.")
    if guidance is not None and "guidance" not in extra:
        extra["guidance"] = float(guidance)
    return [[context, extra]]


def _batch(tensor: torch.Tensor, batch: int, device, what: str = "Prompt embeddings") -> torch.Tensor:
    if tensor.shape[0] not in (1, batch):
        raise ValueError(f"{what} have batch {tensor.shape[0]}, the latents {batch}.")
    return tensor.to(device).expand(batch, *tensor.shape[1:])


class Net:
    """A diffusers model's prediction and conditioning handling (see the module docstring)."""

    space = VP

    def __init__(self, model, scheduler):
        self.model, self.scheduler = model, scheduler

    @property
    def channels(self) -> int:
        return int(self.model.config.in_channels)

    def family(self) -> str:
        raise NotImplementedError

    def train_sigmas(self, latent: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def prompt(self, conditioning, guidance: Optional[float] = None) -> Any:
        """The user's conditioning in this net's form."""
        return conditioning

    def predict(self, z: torch.Tensor, sigma: torch.Tensor, conds: list) -> torch.Tensor:
        """d for ``z`` under each conditioning of ``conds`` in one batch: ``[len(conds) * B, ...]``."""
        raise NotImplementedError

    def context(self, cond) -> torch.Tensor:
        """The cross-attention context of a conditioning (what null-text optimises)."""
        return cond

    def with_context(self, cond, context: torch.Tensor):
        return context

    def lerp(self, source, null, weight: float):
        """Negative-prompt inversion's unconditional input: (1 - w) source + w null."""
        if weight == 0.0:
            return source
        if null is None or null.shape != source.shape:
            raise ValueError("Interpolating toward the null prompt needs negative embeddings of the source's shape.")
        return torch.lerp(source, null.to(source), weight)


class UNetNet(Net):
    """eps of a diffusers UNet at a noise level (v-prediction converted)."""

    space = VP

    def __init__(self, unet, scheduler):
        super().__init__(unet, scheduler)
        if not hasattr(scheduler, "alphas_cumprod"):
            raise ValueError(f"A UNet samples with a DDPM-style scheduler (DDIMScheduler...), not "
                             f"{type(scheduler).__name__}.")
        prediction_type = scheduler.config.prediction_type
        if prediction_type not in _PREDICTION_TYPES:
            raise ValueError(f"Unsupported prediction_type {prediction_type!r}; expected one of {_PREDICTION_TYPES}.")
        self.unet = unet
        self.v_prediction = prediction_type == "v_prediction"
        self.log_sigmas = vp_train_sigmas(scheduler).log()

    def family(self) -> str:
        cfg = self.unet.config
        return (f"diffusers:in{cfg.in_channels}-ctx{cfg.cross_attention_dim}-ch{tuple(cfg.block_out_channels)}"
                f"-{self.scheduler.config.prediction_type}")

    def train_sigmas(self, latent):
        return vp_train_sigmas(self.scheduler)

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        """The training timestep nearest ``sigma``, as a 0-dim tensor on sigma's device (no host round trip)."""
        if self.log_sigmas.device != sigma.device:
            self.log_sigmas = self.log_sigmas.to(sigma.device)
        return (self.log_sigmas - sigma.double().log()).abs().argmin()

    def eps(self, z: torch.Tensor, sigma: torch.Tensor, embeds: torch.Tensor) -> torch.Tensor:
        out = self.unet(z.to(self.unet.dtype), self.timestep(sigma),
                        encoder_hidden_states=embeds.to(self.unet.dtype)).sample.to(z.dtype)
        if self.v_prediction:  # eps = sqrt(alpha_bar) v + sqrt(1 - alpha_bar) z, alpha_bar = 1 / (1 + sigma^2)
            a_t = 1.0 / (1.0 + sigma.double() ** 2)
            out = a_t.sqrt().to(z.dtype) * out + (1.0 - a_t).sqrt().to(z.dtype) * z
        return out

    def predict(self, z, sigma, conds):
        batch = z.shape[0]
        embeds = [_batch(c, batch, z.device) for c in conds]
        if len(conds) == 1:
            return self.eps(z, sigma, embeds[0])
        return self.eps(torch.cat([z] * len(conds)), sigma, torch.cat(embeds))


class _FlowNet(Net):
    space = FLOW

    def __init__(self, model, scheduler):
        super().__init__(model, scheduler)
        if hasattr(scheduler, "alphas_cumprod") or not hasattr(scheduler.config, "shift"):
            raise ValueError(f"{type(model).__name__} samples with FlowMatchEulerDiscreteScheduler, not "
                             f"{type(scheduler).__name__}.")

    def prompt(self, conditioning, guidance=None):
        return flow_prompt(conditioning, guidance=guidance)

    def _parts(self, conds: list, batch: int, device):
        contexts, pooled, guidance = [], [], []
        for cond in conds:
            context, extra = cond[0]
            contexts.append(_batch(context, batch, device))
            pooled.append(_batch(extra["pooled_output"], batch, device, "Pooled prompt embeddings"))
            guidance.append(float(extra.get("guidance", FLUX_DEFAULT_GUIDANCE)))
        if len({c.shape[1] for c in contexts}) != 1:
            raise ValueError("The prompts' embeddings have different token counts; encode them padded to one length "
                             "(the pipelines' max_sequence_length).")
        return torch.cat(contexts), torch.cat(pooled), guidance

    def context(self, cond):
        return cond[0][0]

    def with_context(self, cond, context):
        return [[context, cond[0][1]]]

    def lerp(self, source, null, weight):
        if weight == 0.0:
            return source
        if null is None or null[0][0].shape != source[0][0].shape:
            raise ValueError("Interpolating toward the null prompt needs negative embeddings of the source's shape.")
        (s_ctx, s_extra), (n_ctx, n_extra) = source[0], null[0]
        pooled = torch.lerp(s_extra["pooled_output"], n_extra["pooled_output"].to(s_extra["pooled_output"]), weight)
        return [[torch.lerp(s_ctx, n_ctx.to(s_ctx), weight), {**s_extra, "pooled_output": pooled}]]

    def train_sigmas(self, latent):
        return flow_train_sigmas(self.scheduler)


class SD3Net(_FlowNet):
    """The velocity of an ``SD3Transformer2DModel`` (timestep = 1000 sigma, as the SD3 pipeline passes it)."""

    def family(self) -> str:
        cfg = self.model.config
        return (f"diffusers:sd3-in{cfg.in_channels}-ctx{cfg.joint_attention_dim}-pool{cfg.pooled_projection_dim}"
                f"-layers{cfg.num_layers}-flow")

    def predict(self, z, sigma, conds):
        dtype = self.model.dtype
        context, pooled, _ = self._parts(conds, z.shape[0], z.device)
        x = torch.cat([z] * len(conds))
        timestep = (sigma.float() * 1000.0).expand(x.shape[0])  # float32, as the SD3 pipeline and ComfyUI embed it
        out = self.model(hidden_states=x.to(dtype), timestep=timestep, encoder_hidden_states=context.to(dtype),
                         pooled_projections=pooled.to(dtype)).sample
        return out.to(z.dtype)


class FluxNet(_FlowNet):
    """The velocity of a ``FluxTransformer2DModel``: latents packed into 2x2 patches with their position ids, the
    timestep sigma, the guidance embedding where the model has one (Flux dev), as ``FluxPipeline`` calls it."""

    @property
    def channels(self) -> int:
        return int(self.model.config.in_channels) // 4

    def family(self) -> str:
        cfg = self.model.config
        return (f"diffusers:flux-in{cfg.in_channels}-ctx{cfg.joint_attention_dim}-pool{cfg.pooled_projection_dim}"
                f"-layers{cfg.num_layers}x{cfg.num_single_layers}-guidance{int(bool(cfg.guidance_embeds))}-flow")

    def train_sigmas(self, latent):
        config = self.scheduler.config
        mu = None
        if config.get("use_dynamic_shifting", False):  # FluxPipeline's calculate_shift
            tokens = (latent.shape[-2] // 2) * (latent.shape[-1] // 2)
            base, top = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
            low, high = config.get("base_shift", 0.5), config.get("max_shift", 1.15)
            slope = (high - low) / (top - base)
            mu = tokens * slope + low - slope * base
        return flow_train_sigmas(self.scheduler, mu)

    def predict(self, z, sigma, conds):
        dtype = self.model.dtype
        b, c, h, w = z.shape
        if h % 2 or w % 2:
            raise ValueError(f"Flux packs latents into 2x2 patches: height and width must be even, got {h}x{w}.")
        context, pooled, guidance = self._parts(conds, b, z.device)
        x = torch.cat([z] * len(conds))
        n = x.shape[0]
        packed = x.view(n, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(n, (h // 2) * (w // 2), c * 4)
        rows = torch.arange(h // 2, device=z.device, dtype=dtype)[:, None].expand(h // 2, w // 2)
        cols = torch.arange(w // 2, device=z.device, dtype=dtype)[None, :].expand(h // 2, w // 2)
        img_ids = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(-1, 3)
        txt_ids = torch.zeros(context.shape[1], 3, device=z.device, dtype=dtype)
        embed = None
        if self.model.config.guidance_embeds:
            embed = torch.tensor(guidance, device=z.device, dtype=torch.float32).repeat_interleave(b).to(dtype)
        out = self.model(hidden_states=packed.to(dtype), timestep=sigma.to(dtype).expand(n), guidance=embed,
                         pooled_projections=pooled.to(dtype), encoder_hidden_states=context.to(dtype),
                         txt_ids=txt_ids, img_ids=img_ids).sample
        out = out.view(n, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(n, c, h, w)
        return out.to(z.dtype)


def network(model, scheduler) -> Net:
    """The :class:`Net` of a diffusers model: UNet, SD3 or Flux transformer."""
    kind = type(model).__name__
    if hasattr(model.config, "guidance_embeds") and hasattr(model.config, "num_single_layers"):
        return FluxNet(model, scheduler)
    if hasattr(model.config, "joint_attention_dim") and hasattr(model.config, "pooled_projection_dim"):
        return SD3Net(model, scheduler)
    if hasattr(model.config, "cross_attention_dim"):
        return UNetNet(model, scheduler)
    raise ValueError(f"Unsupported diffusers model {kind}: UNet2DConditionModel (SD1.x/SD2.x/SDXL), "
                     f"SD3Transformer2DModel or FluxTransformer2DModel.")
