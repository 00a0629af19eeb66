"""diffusers adapter: a ``UNet2DConditionModel`` and a ``DDIMScheduler``, or an ``SD3Transformer2DModel`` /
``FluxTransformer2DModel`` and a ``FlowMatchEulerDiscreteScheduler``, behind the core's Denoiser interface (the
models' differences live in ``diffusers_models``).

Latents here are what diffusers pipelines pass to the model before Flux's packing: ``vae.encode(image).latent_dist.mean
* vae.config.scaling_factor`` (SD3/Flux: ``(mean - shift_factor) * scaling_factor``), ``[B, C, H, W]``. Prompts are
embeddings (``pipe.encode_prompt``'s output): ``[1 or B, tokens, dim]`` for UNets, ``(prompt_embeds,
pooled_prompt_embeds)`` for SD3 and Flux.

    inv = invert(unet, scheduler, latent, source_embeds, negative_embeds, method="null_text")
    out = edit(unet, scheduler, inv, target_embeds, negative_embeds, cfg=7.5)
    image = vae.decode(out.edited / vae.config.scaling_factor).sample

    inv = invert(flux, flow_scheduler, latent, (embeds, pooled), method="euler", flux_guidance=3.5)
    out = edit(flux, flow_scheduler, inv, (target_embeds, target_pooled), None, cfg=1.0, flux_guidance=3.5)

Editors act through attention processors installed for one edit: on UNets at every attention layer
(``editors.attention``), on SD3/SD3.5 and Flux at every joint-attention call (``editors.joint``: SD3's joint blocks and
SD3.5's image-only attentions, Flux's double- and single-stream blocks).
"""
from __future__ import annotations

import dataclasses
from contextlib import contextmanager, nullcontext
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from ..inversion import (
    BRANCH_SOURCE,
    BRANCH_TARGET,
    FLOW,
    DirectInversionResult,
    FlowEditOptions,
    Inversion,
    StepCallback,
    autograd_weights,
    check_latent_layout,
    check_latent_values,
    method_named,
    proximal_delta,
    resolve_offsets,
)
from ..editors.attention import AttentionCall, FeatureCall, layer_orders
from ..editors.joint import JointCall, JointLayer, joint_layers, joint_text, start_joint
from ..inversion import edit as core_edit
from ..inversion import flow_edit as core_flow_edit
from .diffusers_models import FluxNet, Net, UNetNet, flow_prompt, network, vp_train_sigmas

__all__ = ["DiffusersDenoiser", "DiffusersNullText", "attention_layers", "decoder_features", "edit", "editor_installed",
           "flow_edit", "flow_prompt", "invert", "joint_attention_layers", "model_family", "train_sigmas"]

def train_sigmas(scheduler) -> torch.Tensor:
    """sigma of every training timestep of a DDPM-style scheduler, float64."""
    return vp_train_sigmas(scheduler)


def model_family(unet, scheduler) -> str:
    """Architecture and prediction type of a diffusers model (UNet, SD3 or Flux transformer) with its scheduler."""
    return network(unet, scheduler).family()


class _CallState:
    """Branch, level and batch layout of the model call in progress, read by the editor's attention processors;
    ``text``: the text token count of the prediction in progress (Flux: set by its double-stream blocks, read by its
    single-stream blocks, whose joint sequence does not tell it)."""

    def __init__(self, controller):
        self.controller = controller
        self.branch, self.level, self.chunks = None, None, ("cond",)
        self.text: Optional[int] = None


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
def editor_installed(unet, editor, steps: int, latent_shape, context_tokens: Optional[int] = None):
    """Attention processors of ``editor`` on ``unet`` (a UNet, or an SD3/SD3.5 or Flux transformer) for one run; the
    model's own processors come back after it, also after an error. Yields the call state (its ``controller`` is the
    editor's per-run state). ``context_tokens``: the conditioning's text token count (Prompt-to-Prompt on SD3/Flux)."""
    joint = joint_attention_layers(unet)
    if joint is not None:
        with _joint_installed(unet, editor, steps, latent_shape, *joint, context_tokens) as state:
            yield state
        return
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


# -- MM-DiTs (SD3/SD3.5, Flux) -------------------------------------------------------------------------------------
# diffusers' processors of the attention calls the joint processors replace (by class name: the deprecated Flux
# names are those of diffusers < 0.35); other processors (fused SD3 projections, IP-Adapter...) are refused.
_JOINT_PROCESSORS = {
    "sd3": ("JointAttnProcessor2_0",),
    "flux": ("FluxAttnProcessor", "FluxAttnProcessor2_0", "FluxSingleAttnProcessor2_0", "FusedFluxAttnProcessor2_0"),
}

_FAMILY_NAMES = {"sd3": "SD3", "flux": "Flux"}


def joint_attention_layers(model) -> Optional[tuple]:
    """``(family, {processor name: JointLayer})`` of an MM-DiT read from its structure: ``"sd3"`` for an
    ``SD3Transformer2DModel`` (``transformer_blocks[i].attn``: the joint attention; ``.attn2`` where SD3.5 has it: the
    image-only attention), ``"flux"`` for a ``FluxTransformer2DModel`` (``transformer_blocks[i].attn``: double-stream,
    ``single_transformer_blocks[i].attn``: single-stream); None for other models (UNets)."""
    blocks = getattr(model, "transformer_blocks", None)
    if blocks is None or not hasattr(model.config, "joint_attention_dim"):
        return None
    entries = []
    if hasattr(model, "single_transformer_blocks"):
        family = "flux"
        if len(blocks) == 0:
            raise ValueError("Editors on Flux read the text token count at its double-stream blocks; this model has "
                             "none.")
        entries += [(f"transformer_blocks.{i}.attn.processor", "double", i) for i in range(len(blocks))]
        entries += [(f"single_transformer_blocks.{i}.attn.processor", "single", i)
                    for i in range(len(model.single_transformer_blocks))]
    else:
        family = "sd3"
        for i, block in enumerate(blocks):
            entries.append((f"transformer_blocks.{i}.attn.processor", "double", i))
            if getattr(block, "attn2", None) is not None:
                entries.append((f"transformer_blocks.{i}.attn2.processor", "image", i))
    return family, {layer.key: layer for layer in joint_layers(entries)}


def _plain_attention(heads: int):
    """The joint controllers' ``attend``: scaled dot-product attention without a mask (what diffusers' SD3 and Flux
    processors run) in ``[batch, tokens, heads * head_dim]`` layout."""

    def attend(q, k, v):
        b = q.shape[0]
        split = lambda x: x.reshape(b, x.shape[1], heads, -1).transpose(1, 2)  # noqa: E731
        out = F.scaled_dot_product_attention(split(q), split(k), split(v), dropout_p=0.0, is_causal=False)
        return out.transpose(1, 2).reshape(b, q.shape[1], -1)

    return attend


def _flat(x: torch.Tensor) -> torch.Tensor:
    """``[b, heads, n, d]`` -> ``[b, n, heads * d]``."""
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], -1)


class _JointProcessor:
    """Shared by the SD3 and Flux processors: a layer's calls of our sampler that the controller wants go to it, with
    q/k/v as diffusers' processor computes them (projections, q/k norms, Flux's RoPE), in ``[text, image]`` order;
    every other call runs the processor this one replaced (``original``)."""

    def __init__(self, layer: JointLayer, state: _CallState, original):
        self.layer, self.state, self.original = layer, state, original

    def _call(self, heads: int, text: int) -> Optional[JointCall]:
        state = self.state
        if state.branch is None or state.level is None:
            return None
        call = JointCall(layer=self.layer, heads=heads, branch=state.branch, level=state.level, chunks=state.chunks,
                         text=text)
        return call if state.controller.wants(call) else None

    def _attention(self, q, k, v, call: JointCall, attention_mask) -> torch.Tensor:
        """The controller's output ``[b, n, heads * d]`` for ``[b, heads, n, d]`` q/k/v in [text, image] order."""
        if attention_mask is not None:
            raise ValueError("Editors do not support attention masks on SD3/Flux (a joint_attention_kwargs mask); "
                             "remove it or run without an editor.")
        out = self.state.controller.attention(_flat(q), _flat(k), _flat(v), call, _plain_attention(call.heads))
        return out.to(q.dtype)


class _SD3Processor(_JointProcessor):
    """``JointAttnProcessor2_0`` with the editor: the joint attention of SD3's joint blocks (diffusers concatenates
    [image, text]; the controller gets [text, image]) and SD3.5's image-only attention (``attn2``); the last block's
    text output skips ``to_add_out`` (``context_pre_only``) as there."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        joint = encoder_hidden_states is not None
        call = None
        if joint == (self.layer.kind == "double"):
            call = self._call(attn.heads, encoder_hidden_states.shape[1] if joint else 0)
        if call is None:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)
        b = hidden_states.shape[0]
        q, k, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        head_dim = k.shape[-1] // attn.heads
        split = lambda x: x.view(b, -1, attn.heads, head_dim).transpose(1, 2)  # noqa: E731
        q, k, v = split(q), split(k), split(v)
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        if joint:
            context = encoder_hidden_states
            cq, ck, cv = (split(proj(context)) for proj in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
            if getattr(attn, "norm_added_q", None) is not None:
                cq = attn.norm_added_q(cq)
            if getattr(attn, "norm_added_k", None) is not None:
                ck = attn.norm_added_k(ck)
            q, k, v = torch.cat([cq, q], dim=2), torch.cat([ck, k], dim=2), torch.cat([cv, v], dim=2)
        out = self._attention(q, k, v, call, attention_mask)
        t = call.text
        image = attn.to_out[1](attn.to_out[0](out[:, t:]))
        if not joint:
            return image
        text = out[:, :t]
        return image, (text if attn.context_pre_only else attn.to_add_out(text))


class _FluxProcessor(_JointProcessor):
    """``FluxAttnProcessor`` with the editor: double-stream blocks (projections of the image and text streams,
    concatenated [text, image], output projections ``to_out`` / ``to_add_out``) and single-stream blocks (one joint
    sequence, no output projection); q/k RMS-normed, RoPE over the joint sequence; fused projections as there."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        from diffusers.models.embeddings import apply_rotary_emb

        joint = encoder_hidden_states is not None
        if joint:
            self.state.text = encoder_hidden_states.shape[1]
        call = None
        if joint == (self.layer.kind == "double") and self.state.text is not None:
            call = self._call(attn.heads, self.state.text)
        if call is None:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        fused = getattr(attn, "fused_projections", False)
        if fused:
            q, k, v = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            q, k, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        head_dim = getattr(attn, "head_dim", None) or q.shape[-1] // attn.heads
        split = lambda x: x.unflatten(-1, (-1, head_dim))  # noqa: E731  [b, n, heads, d]
        q, k, v = split(q), split(k), split(v)
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        if joint:
            context = encoder_hidden_states
            if fused and hasattr(attn, "to_added_qkv"):
                cq, ck, cv = attn.to_added_qkv(context).chunk(3, dim=-1)
            else:
                cq, ck, cv = attn.add_q_proj(context), attn.add_k_proj(context), attn.add_v_proj(context)
            cq, ck, cv = split(cq), split(ck), split(cv)
            if getattr(attn, "norm_added_q", None) is not None:
                cq = attn.norm_added_q(cq)
            if getattr(attn, "norm_added_k", None) is not None:
                ck = attn.norm_added_k(ck)
            q, k, v = torch.cat([cq, q], dim=1), torch.cat([ck, k], dim=1), torch.cat([cv, v], dim=1)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [b, heads, n, d]
        if image_rotary_emb is not None:
            q, k = apply_rotary_emb(q, image_rotary_emb), apply_rotary_emb(k, image_rotary_emb)
        if q.shape[2] <= call.text:
            raise ValueError(f"A Flux single-stream block has {q.shape[2]} tokens, not more than the prediction's "
                             f"{call.text} text tokens.")
        out = self._attention(q, k, v, call, attention_mask)
        if not joint:
            return out
        t = call.text
        image = attn.to_out[1](attn.to_out[0](out[:, t:].contiguous()))
        return image, attn.to_add_out(out[:, :t].contiguous())


def _check_processors(family: str, processors: dict, layers: dict) -> None:
    allowed = _JOINT_PROCESSORS[family]
    for name in layers:
        if name not in processors:
            raise ValueError(f"This {_FAMILY_NAMES[family]} transformer has no attention processor {name}; editors "
                             f"know diffusers' SD3Transformer2DModel and FluxTransformer2DModel layouts.")
        kind = type(processors[name]).__name__
        if kind not in allowed:
            raise ValueError(f"Editors on {_FAMILY_NAMES[family]} stand in for diffusers' default attention processors "
                             f"({', '.join(allowed)}), but {name} has {kind} (fused projections, an adapter or "
                             f"another extension). Restore the defaults (SD3: unfuse_qkv_projections()) or edit "
                             f"without an editor.")


@contextmanager
def _joint_installed(model, editor, steps: int, latent_shape, family: str, layers: dict,
                     context_tokens: Optional[int]):
    """The joint processors of ``editor`` on an SD3/Flux transformer for one run (see ``editor_installed``)."""
    text = None
    if getattr(editor, "kind", None) == "prompt_to_prompt":
        if not editor.encoders:
            raise ValueError("Prompt-to-Prompt on SD3/Flux needs the prompts' token positions per text encoder: "
                             "make the editor with prompt_to_prompt(..., encoders=((key, source, target, window), "
                             "...)) from the pipeline's tokenizers (SD3: 'l' or 'g' with 77 tokens, then 't5xxl' with "
                             "the T5 length; Flux: 't5xxl').")
        if context_tokens is None:
            raise ValueError("Prompt-to-Prompt on SD3/Flux needs the conditioning's text token count.")
        text = joint_text(family, editor.encoders, context_tokens)
    original = model.attn_processors
    _check_processors(family, original, layers)
    controller = start_joint(editor, list(layers.values()), steps, latent_shape, family, text)
    state = _CallState(controller)
    processor = _SD3Processor if family == "sd3" else _FluxProcessor
    try:
        model.set_attn_processor({name: processor(layers[name], state, p) if name in layers else p
                                  for name, p in original.items()})
        yield state
    finally:
        try:
            model.set_attn_processor(dict(original))
        finally:
            controller.finish()


def _flow_editor(editor, net: Net, inversion: Inversion):
    """``editor`` with its own source conditioning (Plug-and-Play's empty prompt: ``(prompt_embeds,
    pooled_prompt_embeds)``) in the flow model's conditioning form, Flux's embedded guidance the inversion's."""
    own = getattr(editor, "source_conditioning", None)
    if own is None or not dataclasses.is_dataclass(editor):
        return editor
    guidance = inversion.conditioning[0][1].get("guidance") if isinstance(inversion.conditioning, list) else None
    return dataclasses.replace(editor, source_conditioning=net.prompt(own, guidance))


class DiffusersDenoiser:
    """Guided prediction of a diffusers model (see ``diffusers_models``) for named conditioning branches.

    Args:
        unet, scheduler: a ``UNet2DConditionModel`` and the scheduler it was trained with, or an SD3 / Flux
            transformer and its ``FlowMatchEulerDiscreteScheduler``.
        branches: prompt conditioning per branch name (``"source"``, ``"target"``), in the model's form.
        negative: the unconditional input; required when ``cfg != 1`` unless ``negative_at`` is given.
        cfg: classifier-free guidance scale; at 1 the unconditional input is not evaluated (as in ComfyUI).
        negative_at: per-level unconditional context (null-text), replacing ``negative``'s.
        proximal: ``(mode, quantile)`` of proximal guidance (see ``inversion.guidance``).
        net: the model's :class:`diffusers_models.Net` (made from ``unet`` and ``scheduler`` if not given).
        branch_cfg: guidance scales of particular branches (FlowEdit's source and target); the others take ``cfg``.
    """

    def __init__(self, unet, scheduler, branches: dict, negative, cfg: float,
                 negative_at: Optional[Callable[[int], torch.Tensor]] = None, proximal=("none", 0.75),
                 net: Optional[Net] = None, branch_cfg: Optional[dict] = None):
        self.net = net or network(unet, scheduler)
        self.branch_cfg = dict(branch_cfg or {})
        if any(c != 1.0 for c in [cfg, *self.branch_cfg.values()]) and negative is None and negative_at is None:
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
        cond = self.branches[branch]
        cfg = self.branch_cfg.get(branch, self.cfg)
        if cfg == 1.0 or not guided:
            self._calling(branch, level, ("cond",))
            return self.net.predict(z, sigma, [cond])
        negative = self.negative
        if self.negative_at is not None:
            negative = self.net.with_context(negative, self.negative_at(level))
        self._calling(branch, level, ("uncond", "cond"))
        eps_uncond, eps_cond = self.net.predict(z, sigma, [negative, cond]).chunk(2)
        return eps_uncond + cfg * proximal_delta(eps_cond - eps_uncond, *self.proximal)


class DiffusersNullText:
    """The core's NullTextModel over a diffusers model: the source's prediction and one with a given null context."""

    def __init__(self, unet, scheduler, source, null, net: Optional[Net] = None):
        self.net = net or network(unet, scheduler)
        self.source, self.null = source, null
        self.null_embedding = self.net.context(null)

    def eps_source(self, z, sigma):
        return self.net.predict(z, sigma, [self.source])

    def eps_null(self, z, sigma, embedding):
        return self.net.predict(z, sigma, [self.net.with_context(self.null, embedding)])


def invert(unet, scheduler, latent: torch.Tensor, prompt_embeds, negative_embeds=None, steps: int = 50,
           cfg: float = 1.0, method: str = "ddim", options: Optional[dict] = None,
           callback: Optional[StepCallback] = None, flux_guidance: Optional[float] = None) -> Inversion:
    """Invert a latent along the model's schedule with ``method`` (reference defaults: 50 steps, guidance 1;
    ``options`` overrides the method's defaults, see ``inversion.methods``).

    UNets: DDIM's schedule; SD3/Flux: the scheduler's shifted flow levels, evenly spaced from the top as ComfyUI's
    ``simple`` scheduler takes them (Flux: shifted for the latent's size, as ``FluxPipeline``; ComfyUI's Flux shifts
    so only with its ModelSamplingFlux node set to the image size). ``flux_guidance`` is
    Flux dev's embedded guidance (3.5 if not given; recorded in the conditioning). Null-text starts from
    ``negative_embeds`` (the empty prompt's embeddings) and EDICT guides with it.
    """
    net = network(unet, scheduler)
    inverter = method_named(method)
    settings = inverter.options(options)
    inverter.check_space(net.space, distilled=isinstance(net, FluxNet))
    check_latent_layout("latent to invert", latent, net.channels)
    check_latent_values("latent to invert", latent)
    sigmas, timesteps = net.space.trajectory(net.train_sigmas(latent), steps)
    guidance = inverter.inversion_guidance(settings, cfg)
    source = net.prompt(prompt_embeds, flux_guidance)
    negative = None if negative_embeds is None else net.prompt(negative_embeds, flux_guidance)
    denoiser = DiffusersDenoiser(unet, scheduler, {BRANCH_SOURCE: source}, negative, guidance, net=net)
    null_text = None
    if inverter.needs_null_text:
        if negative is None:
            raise ValueError("Null-text inversion starts from the empty prompt's embeddings: pass negative_embeds.")
        null_text = DiffusersNullText(unet, scheduler, source, negative, net=net)
    with autograd_weights(unet) if null_text is not None else nullcontext():
        z_star, sigmas, extras = inverter.invert(settings, denoiser, latent.float(), sigmas, space=net.space,
                                                 null_text_model=null_text, callback=callback)
    return Inversion(method=method, z_star=z_star, sigmas=sigmas, timesteps=timesteps, cfg=guidance,
                     conditioning=source, negative=negative, model_family=net.family(), options=vars(settings),
                     extras=extras, space=net.space.name)


def edit(unet, scheduler, inversion: Inversion, target_embeds, negative_embeds, cfg: float = 7.5,
         offsets: str = "auto", x_target: Optional[torch.Tensor] = None, callback: Optional[StepCallback] = None,
         editor=None, flux_guidance: Optional[float] = None) -> DirectInversionResult:
    """Edit an inversion: the source branch follows it, the target branch is the edit (see ``inversion.methods``).

    ``editor`` (e.g. ``editors.P2PEditor``) acts through attention processors installed for this call only; its
    per-run state comes back as the result's ``editor_state``. On SD3/SD3.5 and Flux the editors are
    Prompt-to-Prompt, MasaCtrl and Plug-and-Play on the joint attention (``editors.joint``); a P2P editor there needs
    its prompts' positions per text encoder (``prompt_to_prompt(..., encoders=...)``, windows adding up to the
    target embeddings' token count), PnP's ``source_conditioning`` is ``(prompt_embeds, pooled_prompt_embeds)``.
    ``offsets`` "auto" is the editor's default (see ``inversion.types.resolve_offsets``: Pix2Pix-Zero "both",
    otherwise "source"). ``flux_guidance``: the target's and negative's embedded guidance on Flux dev (3.5 if not
    given); the source (also PnP's own source prompt) keeps the inversion's.
    """
    net = network(unet, scheduler)
    inversion.check_model(net.family(), net.space.name)
    offsets = resolve_offsets(offsets, editor)
    if x_target is not None:
        inversion.check_latent(x_target, "target start latent")
    negative = None if negative_embeds is None else net.prompt(negative_embeds, flux_guidance)
    if editor is not None and not isinstance(net, UNetNet):
        editor = _flow_editor(editor, net, inversion)
    plan = method_named(inversion.method).plan(inversion, cfg, negative, editor, lerp=net.lerp)
    branches = {BRANCH_SOURCE: plan.source, BRANCH_TARGET: net.prompt(target_embeds, flux_guidance)}
    denoiser = DiffusersDenoiser(unet, scheduler, branches, plan.negative, plan.guidance,
                                 negative_at=plan.negative_at, proximal=plan.proximal, net=net)
    if editor is None:
        return core_edit(denoiser, inversion, offsets=offsets, x_target=x_target, callback=callback)
    context_tokens = None if isinstance(net, UNetNet) else net.context(branches[BRANCH_TARGET]).shape[1]
    with editor_installed(unet, editor, inversion.steps, inversion.latent_shape, context_tokens) as state, \
            autograd_weights(unet) if state.controller.guides_target else nullcontext():
        denoiser.call_state = state
        return core_edit(denoiser, inversion, offsets=offsets, x_target=x_target, callback=callback,
                         controller=state.controller)


def flow_edit(model, scheduler, latent: torch.Tensor, source, target, negative=None, steps: int = 28,
              source_cfg: float = 1.0, target_cfg: float = 1.0, options: Optional[dict] = None,
              source_guidance: Optional[float] = None, target_guidance: Optional[float] = None,
              callback: Optional[StepCallback] = None) -> torch.Tensor:
    """FlowEdit (``inversion.flowedit``) of a flow model's latent, without inversion: ``options`` are
    :class:`FlowEditOptions`' (n_max, n_min, n_avg, seed). SD3: CFG ``source_cfg`` / ``target_cfg`` with ``negative``
    (the reference: 50 steps, n_max 33, 3.5 / 13.5); Flux: cfg 1 and embedded ``source_guidance`` /
    ``target_guidance`` (the reference: 28 steps, n_max 24, 1.5 / 5.5)."""
    net = network(model, scheduler)
    if net.space is not FLOW:
        raise ValueError("FlowEdit edits flow-matching models (SD3/SD3.5, Flux); invert a UNet's image instead.")
    settings = FlowEditOptions(**(options or {}))
    check_latent_layout("latent to edit", latent, net.channels)
    check_latent_values("latent to edit", latent)
    sigmas, _ = net.space.trajectory(net.train_sigmas(latent), steps)
    branches = {BRANCH_SOURCE: net.prompt(source, source_guidance), BRANCH_TARGET: net.prompt(target, target_guidance)}
    negative = None if negative is None else net.prompt(negative, target_guidance)
    denoiser = DiffusersDenoiser(model, scheduler, branches, negative, target_cfg, net=net,
                                 branch_cfg={BRANCH_SOURCE: source_cfg, BRANCH_TARGET: target_cfg})
    return core_flow_edit(denoiser, latent.float(), sigmas, settings, callback)
