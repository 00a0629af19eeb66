"""diffusers adapter: a ``UNet2DConditionModel`` and a ``DDIMScheduler`` behind the core's Denoiser interface.

Latents here are what diffusers pipelines pass to the UNet: ``vae.encode(image).latent_dist.mean *
vae.config.scaling_factor``. Prompts are embeddings (``pipe.encode_prompt``'s output), ``[1 or B, tokens, dim]``.

    inv = invert(unet, scheduler, latent, source_embeds, negative_embeds, method="null_text")
    out = edit(unet, scheduler, inv, target_embeds, negative_embeds, cfg=7.5)
    image = vae.decode(out.edited / vae.config.scaling_factor).sample
"""
from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Callable, Optional

import torch

from ..inversion import (
    BRANCH_SOURCE,
    BRANCH_TARGET,
    DirectInversionResult,
    Inversion,
    StepCallback,
    autograd_weights,
    check_latent_layout,
    check_latent_values,
    ddim_sigmas,
    edit_guidance,
    edit_source_conditioning,
    inversion_guidance,
    method_options,
    proximal_delta,
    resolve_offsets,
)
from ..editors.attention import AttentionCall, FeatureCall, layer_orders
from ..inversion import edit as core_edit
from ..inversion import invert as core_invert

__all__ = ["DiffusersDenoiser", "DiffusersNullText", "attention_layers", "decoder_features", "edit", "editor_installed", "invert",
           "model_family", "train_sigmas"]

_PREDICTION_TYPES = ("epsilon", "v_prediction")


def train_sigmas(scheduler) -> torch.Tensor:
    """sigma of every training timestep of the scheduler, float64."""
    alphas_cumprod = scheduler.alphas_cumprod.to(torch.float64)
    return ((1.0 - alphas_cumprod) / alphas_cumprod).sqrt()


def model_family(unet, scheduler) -> str:
    cfg = unet.config
    return (f"diffusers:in{cfg.in_channels}-ctx{cfg.cross_attention_dim}-ch{tuple(cfg.block_out_channels)}"
            f"-{scheduler.config.prediction_type}")


class _UNet:
    """eps of a diffusers UNet at a noise level (v-prediction converted)."""

    def __init__(self, unet, scheduler):
        prediction_type = scheduler.config.prediction_type
        if prediction_type not in _PREDICTION_TYPES:
            raise ValueError(f"Unsupported prediction_type {prediction_type!r}; expected one of {_PREDICTION_TYPES}.")
        self.unet = unet
        self.v_prediction = prediction_type == "v_prediction"
        self.log_sigmas = train_sigmas(scheduler).log()

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


class _CallState:
    """Branch, level and batch layout of the UNet call in progress, read by the editor's attention processors."""

    def __init__(self, controller):
        self.controller = controller
        self.branch, self.level, self.chunks = None, None, ("cond",)


def _layer_sort_key(name: str) -> tuple:
    parts = name.split(".")
    place = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}[parts[0]]
    numbers = tuple(int(p) for p in parts if p.isdigit())
    return (place,) + numbers + (parts[-2],)


def _block_starts(blocks, extra: int = 0) -> list[int]:
    """Index of each diffusers block's first resnet among ComfyUI-style UNet blocks (one per resnet; ``extra``
    adds one per down-sampler, as ComfyUI's input blocks hold down-samplers on their own)."""
    starts, count = [], 0
    for block in blocks:
        starts.append(count)
        count += len(block.resnets) + (extra if getattr(block, "downsamplers", None) else 0)
    return starts


def attention_layers(unet) -> dict:
    """The UNet's attention layers by processor name, in forward order, located by resolution, place and block
    (blocks counted as ComfyUI counts them: input block 0 is the input convolution, one block per resnet, one per
    down-sampler)."""
    names = sorted(unet.attn_processors, key=_layer_sort_key)
    levels = len(unet.down_blocks)
    down_starts = [1 + start for start in _block_starts(unet.down_blocks, extra=1)]
    up_starts = _block_starts(unet.up_blocks)
    entries = []
    for name in names:
        parts = name.split(".")
        if parts[0] == "down_blocks":
            place, factor = "down", 2 ** int(parts[1])
            block = down_starts[int(parts[1])] + int(parts[3])
        elif parts[0] == "mid_block":
            place, factor, block = "mid", 2 ** (levels - 1), 0
        else:
            place, factor = "up", 2 ** (len(unet.up_blocks) - 1 - int(parts[1]))
            block = up_starts[int(parts[1])] + int(parts[3])
        entries.append((name, place, factor, parts[-2] == "attn2", block))
    return {layer.key: layer for layer in layer_orders(entries)}


def decoder_features(unet) -> dict:
    """Decoder block index -> its resnet's ``conv2``, whose output is the block's residual features before the skip
    connection is added (ComfyUI's ``output_blocks[i][0].out_layers[-1]``)."""
    starts = _block_starts(unet.up_blocks)
    return {start + i: resnet.conv2 for start, block in zip(starts, unet.up_blocks) for i, resnet in enumerate(block.resnets)}


class _EditorProcessor:
    """An attention processor that hands q, k, v to the editor's controller (diffusers' AttnProcessor2_0 otherwise)."""

    def __init__(self, layer, state: _CallState):
        self.layer = layer
        self.state = state

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        if attention_mask is not None or attn.spatial_norm is not None or attn.group_norm is not None \
                or getattr(attn, "norm_q", None) is not None:
            raise NotImplementedError("Editors support the plain attention of UNet2DConditionModel transformer blocks.")
        residual = hidden_states
        shape = hidden_states.shape
        if hidden_states.ndim == 4:
            hidden_states = hidden_states.flatten(2).transpose(1, 2)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        if encoder_hidden_states is not None and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        q, k, v = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
        heads = attn.heads

        def attend(q, k, v):
            b = q.shape[0]
            split = lambda t: t.reshape(b, t.shape[1], heads, -1).transpose(1, 2)  # noqa: E731
            out = torch.nn.functional.scaled_dot_product_attention(split(q), split(k), split(v))
            return out.transpose(1, 2).reshape(b, q.shape[1], -1)

        state = self.state
        call = AttentionCall(layer=self.layer, heads=heads, branch=state.branch, level=state.level, chunks=state.chunks)
        if state.controller.wants(call):
            out = state.controller.attention(q, k, v, call, attend)
        else:
            out = attend(q, k, v)
        out = attn.to_out[1](attn.to_out[0](out.to(q.dtype)))
        if len(shape) == 4:
            out = out.transpose(1, 2).reshape(shape)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


@contextmanager
def editor_installed(unet, editor, steps: int, latent_shape):
    """Attention processors of ``editor`` on ``unet`` for one run; the UNet's own processors come back after it,
    also after an error. Yields the call state (its ``controller`` is the editor's per-run state)."""
    original = unet.attn_processors
    layers = attention_layers(unet)
    state = _CallState(editor.start(list(layers.values()), steps, latent_shape))
    controller = state.controller
    features = decoder_features(unet)
    missing = sorted(set(controller.feature_blocks) - set(features))
    if missing:
        raise ValueError(f"The editor wants the features of decoder block(s) {missing}, but this UNet's decoder has "
                         f"blocks 0 .. {len(features) - 1}.")

    def hook_for(index):
        def hook(module, inputs, output):
            if state.branch is None:
                return None
            return controller.feature(output, FeatureCall(block=index, branch=state.branch, level=state.level,
                                                          chunks=state.chunks))
        return hook

    handles = []
    try:
        unet.set_attn_processor({name: _EditorProcessor(layer, state) for name, layer in layers.items()})
        handles = [features[i].register_forward_hook(hook_for(i)) for i in sorted(controller.feature_blocks)]
        yield state
    finally:
        for handle in handles:
            handle.remove()
        unet.set_attn_processor(original)
        controller.finish()


class DiffusersDenoiser(_UNet):
    """Guided eps prediction of a diffusers UNet for named conditioning branches.

    Args:
        unet, scheduler: a ``UNet2DConditionModel`` and the scheduler it was trained with.
        branches: prompt embeddings per branch name (``"source"``, ``"target"``).
        negative: embeddings of the unconditional input; required when ``cfg != 1`` unless ``negative_at`` is given.
        cfg: classifier-free guidance scale; at 1 the unconditional input is not evaluated (as in ComfyUI).
        negative_at: per-level unconditional embeddings (null-text), overriding ``negative``.
        proximal: ``(mode, quantile)`` of proximal guidance (see ``inversion.guidance``).
    """

    def __init__(self, unet, scheduler, branches: dict, negative: Optional[torch.Tensor], cfg: float,
                 negative_at: Optional[Callable[[int], torch.Tensor]] = None, proximal=("none", 0.75)):
        super().__init__(unet, scheduler)
        if cfg != 1.0 and negative is None and negative_at is None:
            raise ValueError("Guidance (cfg != 1) needs negative prompt embeddings.")
        self.branches = branches
        self.negative = negative
        self.negative_at = negative_at
        self.cfg = cfg
        self.proximal = proximal

    call_state: Optional[_CallState] = None  # set while an editor is installed

    def _calling(self, branch: str, level: int, chunks: tuple) -> None:
        if self.call_state is not None:
            self.call_state.branch, self.call_state.level, self.call_state.chunks = branch, level, chunks

    def __call__(self, z: torch.Tensor, sigma: torch.Tensor, branch: str, level: int,
                 guided: bool = True) -> torch.Tensor:
        cond = _to_batch(self.branches[branch], z.shape[0], z.device)
        if self.cfg == 1.0 or not guided:
            self._calling(branch, level, ("cond",))
            return self.eps(z, sigma, cond)
        negative = self.negative if self.negative_at is None else self.negative_at(level)
        uncond = _to_batch(negative, z.shape[0], z.device)
        self._calling(branch, level, ("uncond", "cond"))
        eps_uncond, eps_cond = self.eps(torch.cat([z, z]), sigma, torch.cat([uncond, cond])).chunk(2)
        return eps_uncond + self.cfg * proximal_delta(eps_cond - eps_uncond, *self.proximal)


class DiffusersNullText(_UNet):
    """The core's NullTextModel over a diffusers UNet."""

    def __init__(self, unet, scheduler, source: torch.Tensor, null: torch.Tensor):
        super().__init__(unet, scheduler)
        self.source = source
        self.null_embedding = null

    def eps_source(self, z, sigma):
        return self.eps(z, sigma, _to_batch(self.source, z.shape[0], z.device))

    def eps_null(self, z, sigma, embedding):
        return self.eps(z, sigma, _to_batch(embedding, z.shape[0], z.device))


def _to_batch(embeds: torch.Tensor, batch: int, device) -> torch.Tensor:
    if embeds.shape[0] not in (1, batch):
        raise ValueError(f"Prompt embeddings have batch {embeds.shape[0]}, the latents {batch}.")
    return embeds.to(device).expand(batch, *embeds.shape[1:])


def invert(unet, scheduler, latent: torch.Tensor, prompt_embeds: torch.Tensor,
           negative_embeds: Optional[torch.Tensor] = None, steps: int = 50, cfg: float = 1.0, method: str = "ddim",
           options: Optional[dict] = None, callback: Optional[StepCallback] = None) -> Inversion:
    """Invert a latent along the scheduler's DDIM schedule with ``method`` (reference defaults: 50 steps,
    guidance 1; ``options`` overrides the method's defaults, see ``inversion.methods``).

    Null-text starts from ``negative_embeds`` (the empty prompt's embeddings) and EDICT guides with it.
    """
    settings = method_options(method, options)
    check_latent_layout("latent to invert", latent, unet.config.in_channels)
    check_latent_values("latent to invert", latent)
    sigmas, timesteps = ddim_sigmas(train_sigmas(scheduler), steps)
    guidance = inversion_guidance(method, settings, cfg)
    denoiser = DiffusersDenoiser(unet, scheduler, {BRANCH_SOURCE: prompt_embeds}, negative_embeds, guidance)
    null_text = None
    if method == "null_text":
        if negative_embeds is None:
            raise ValueError("Null-text inversion starts from the empty prompt's embeddings: pass negative_embeds.")
        null_text = DiffusersNullText(unet, scheduler, prompt_embeds, negative_embeds)
    with autograd_weights(unet) if method == "null_text" else nullcontext():
        z_star, sigmas, extras = core_invert(method, settings, denoiser, latent.float(), sigmas, null_text, callback)
    return Inversion(method=method, z_star=z_star, sigmas=sigmas, timesteps=timesteps, cfg=guidance,
                     conditioning=prompt_embeds, negative=negative_embeds, model_family=model_family(unet, scheduler),
                     options=vars(settings), extras=extras)


def edit(unet, scheduler, inversion: Inversion, target_embeds: torch.Tensor, negative_embeds: Optional[torch.Tensor],
         cfg: float = 7.5, offsets: str = "auto", x_target: Optional[torch.Tensor] = None,
         callback: Optional[StepCallback] = None, editor=None) -> DirectInversionResult:
    """Edit an inversion: the source branch follows it, the target branch is the edit (see ``inversion.methods``).

    ``editor`` (e.g. ``editors.P2PEditor``) acts through attention processors installed for this call only; its
    per-run state comes back as the result's ``editor_state``. ``offsets`` "auto" is the editor's default (see
    ``inversion.types.resolve_offsets``: Pix2Pix-Zero "both", otherwise "source").
    """
    inversion.check_model(model_family(unet, scheduler))
    offsets = resolve_offsets(offsets, editor)
    if x_target is not None:
        inversion.check_latent(x_target, "target start latent")
    settings = method_options(inversion.method, inversion.options)
    branches = {BRANCH_SOURCE: edit_source_conditioning(inversion, editor), BRANCH_TARGET: target_embeds}
    negative_at, proximal = None, ("none", 0.75)
    if inversion.method == "negative_prompt":
        negative_embeds = _interpolate(inversion.conditioning, negative_embeds, settings.interpolation)
        proximal = (settings.proximal, settings.quantile)
    elif inversion.method == "null_text":
        table = inversion.extras["null_embeddings"]
        negative_at = lambda level: table[inversion.steps - level]  # noqa: E731
    denoiser = DiffusersDenoiser(unet, scheduler, branches, negative_embeds, edit_guidance(inversion, cfg),
                                 negative_at=negative_at, proximal=proximal)
    if editor is None:
        return core_edit(denoiser, inversion, offsets=offsets, x_target=x_target, callback=callback)
    with editor_installed(unet, editor, inversion.steps, inversion.latent_shape) as state, \
            autograd_weights(unet) if state.controller.guides_target else nullcontext():
        denoiser.call_state = state
        return core_edit(denoiser, inversion, offsets=offsets, x_target=x_target, callback=callback,
                         controller=state.controller)


def _interpolate(source: torch.Tensor, null: Optional[torch.Tensor], weight: float) -> torch.Tensor:
    """Negative-prompt inversion's unconditional input: (1 - w) source + w null."""
    if weight == 0.0:
        return source
    if null is None or null.shape != source.shape:
        raise ValueError("Interpolating toward the null prompt needs negative embeddings of the source's shape.")
    return torch.lerp(source, null.to(source), weight)
