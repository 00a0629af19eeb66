"""Editors on ComfyUI models: the UNet's attention layers and decoder blocks located by place, the attn1/attn2
replace patches and the output-block patch that hand our sampler's calls to an editor's controller; on MM-DiTs
(SD3/SD3.5, Flux) the ``dit`` block replace patches and the attention override that hand the joint attention's calls
to an editor's joint controller (``editors.joint``).

Everything is set on the run's model clone (its ``model_options``), which the run drops afterwards, so nothing stays
patched after a run, an error or a cancel; patches and an attention override that were there before are chained.
"""
from __future__ import annotations

import logging
from typing import Callable, Optional

from ..editors.attention import AttentionCall, FeatureCall, layer_orders
from ..editors.joint import JointCall, joint_layers, joint_text, start_joint
from .comfyui_sampling import BRANCH_OPTION, LEVEL_OPTION

__all__ = ["BLOCK_OPTION", "InstalledEditor", "attention_layers", "decoder_features", "install_editor", "joint_attention_layers"]

BLOCK_OPTION = "direct_inversion_block"  # transformer option: (kind, index, text tokens, image tokens) of an MM-DiT block
OVERRIDE = "optimized_attention_override"

log = logging.getLogger("DirectInversion")


def attention_layers(model) -> dict:
    """The UNet's attention layers in forward order, keyed ``(attn1|attn2, block, id, transformer_index)``, located
    by place (down / mid / up) and downsampling factor, read from the model's structure (SD1.x, SD2.x, SDXL)."""
    from comfy.ldm.modules.attention import SpatialTransformer
    from comfy.ldm.modules.diffusionmodules.openaimodel import Downsample, Upsample

    unet = model.model.diffusion_model
    if not all(hasattr(unet, name) for name in ("input_blocks", "middle_block", "output_blocks")):
        raise ValueError(f"Editors need a UNet (SD1.x, SD2.x, SDXL) or an MM-DiT (SD3/SD3.5, Flux); this model's diffusion model is "
                         f"{type(unet).__name__}.")
    entries, factor = [], 1

    def add(block, place, modules):
        for module in modules:
            if isinstance(module, SpatialTransformer):
                for j, tb in enumerate(module.transformer_blocks):
                    entries.append((("attn1",) + block + (j,), place, factor, False, block[1]))
                    if getattr(tb, "attn2", None) is not None:
                        entries.append((("attn2",) + block + (j,), place, factor, True, block[1]))

    for i, block in enumerate(unet.input_blocks):
        add(("input", i), "down", block)
        if any(isinstance(m, Downsample) for m in block):
            factor *= 2
    add(("middle", 0), "mid", unet.middle_block)
    for i, block in enumerate(unet.output_blocks):
        add(("output", i), "up", block)
        if any(isinstance(m, Upsample) for m in block):
            factor //= 2
    return {layer.key: layer for layer in layer_orders(entries)}


def _attention_patch(layer, controller, previous: Optional[Callable]):
    """An attn1/attn2 replace patch: hands our sampler's calls to the editor's controller, the rest to ComfyUI's
    attention (or to the patch that was there before)."""
    import comfy.ldm.modules.attention as attention

    def patch(q, k, v, extra_options):
        heads = extra_options["n_heads"]

        def attend(q, k, v):
            if previous is not None:
                return previous(q, k, v, extra_options)
            return attention.optimized_attention(q, k, v, heads, attn_precision=extra_options.get("attn_precision"))

        branch, level = extra_options.get(BRANCH_OPTION), extra_options.get(LEVEL_OPTION)
        if branch is None or level is None:
            return attend(q, k, v)
        call = AttentionCall(layer=layer, heads=heads, branch=branch, level=level, chunks=_call_chunks(extra_options))
        if not controller.wants(call):
            return attend(q, k, v)
        return controller.attention(q, k, v, call, attend)

    return patch


def _separate_skip(h, transformer_options):
    """In a differentiated prediction, the encoder block's output goes on as a copy: ComfyUI adds ControlNet residuals
    to the stored skip tensors in place, which autograd refuses where the next block saved the same tensor."""
    return h.clone() if h.requires_grad else h


def decoder_features(model) -> dict:
    """Decoder block index -> the last convolution of the block's residual block: its output is the block's residual
    features before the skip connection is added (diffusers' ``resnets[i].conv2``)."""
    from comfy.ldm.modules.diffusionmodules.openaimodel import ResBlock

    unet = model.model.diffusion_model
    return {i: block[0].out_layers[-1] for i, block in enumerate(unet.output_blocks) if isinstance(block[0], ResBlock)}


def _call_chunks(transformer_options: dict) -> tuple:
    return tuple("uncond" if c == 1 else "cond" for c in transformer_options.get("cond_or_uncond", [0]))


class InstalledEditor:
    """An editor's per-run state on a run's model clone: its ``controller`` and what must be undone after the run
    (forward hooks on the shared diffusion model). ``close`` removes the hooks and finishes the controller, once, also
    when the run never started (an error while ComfyUI loaded the models)."""

    def __init__(self, controller, remove: Callable[[], None]):
        self.controller = controller
        self._remove = remove
        self.closed = False

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            self._remove()
        finally:
            self.controller.finish()


def joint_attention_layers(model) -> Optional[tuple]:
    """``(family, {key: JointLayer})`` of an MM-DiT (SD3/SD3.5: ``"sd3"``, Flux: ``"flux"``) read from the model's
    structure, or None for other models."""
    net = model.model.diffusion_model
    entries = []
    if hasattr(net, "joint_blocks"):
        family = "sd3"
        if getattr(net, "register_length", 0):
            raise ValueError("Editors need the text tokens alone before the image tokens; this MMDiT adds register "
                             "tokens to them.")
        for i, block in enumerate(net.joint_blocks):
            entries.append((("double", i), "double", i))
            if getattr(block.x_block, "x_block_self_attn", False):
                entries.append((("image", i), "image", i))
    elif hasattr(net, "double_blocks") and hasattr(net, "single_blocks"):
        family = "flux"
        if any(getattr(block, "flipped_img_txt", False) for block in net.double_blocks):
            raise ValueError("Editors need the text tokens before the image tokens; this model's double blocks put "
                             "them after.")
        entries += [(("double", i), "double", i) for i in range(len(net.double_blocks))]
        entries += [(("single", i), "single", i) for i in range(len(net.single_blocks))]
    else:
        return None
    return family, {layer.key: layer for layer in joint_layers(entries)}


def _block_patch(kind: str, index: int, state: dict, previous: Optional[Callable]):
    """A ``dit`` block replace patch: runs the block (or the patch that was there before) with its kind, index and
    token counts in a copy of the transformer options, where the attention override reads them."""

    def patch(args, extra):
        if kind == "double":
            state["text"], state["image"] = args["txt"].shape[1], args["img"].shape[1]
        options = dict(args["transformer_options"])
        options[BLOCK_OPTION] = (kind, index, state.get("text", 0), state.get("image", 0))
        args = dict(args, transformer_options=options)
        return previous(args, extra) if previous is not None else extra["original_block"](args)

    return patch


def _flat(x, skip_reshape: bool):
    """[b, heads, n, d] (skip_reshape) or [b, n, heads, d] / [b, n, heads * d] -> [b, n, heads * d]."""
    if skip_reshape:
        return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], -1)
    return x.reshape(x.shape[0], x.shape[1], -1)


def _attention_override(layers: dict, controller, previous: Optional[Callable]):
    """ComfyUI's ``optimized_attention_override``: our sampler's calls at MM-DiT blocks go to the joint controller
    (in ``[b, n, heads * d]`` layout; its ``attend`` is ComfyUI's attention, or the override that was there before),
    everything else runs untouched."""

    warned: list = []

    def override(func, *args, **kwargs):
        def untouched():
            return previous(func, *args, **kwargs) if previous is not None else func(*args, **kwargs)

        options = kwargs.get("transformer_options") or {}
        block, branch, level = options.get(BLOCK_OPTION), options.get(BRANCH_OPTION), options.get(LEVEL_OPTION)
        if block is None or branch is None or level is None or len(args) < 3:
            return untouched()
        kind, index, text, image = block
        q, k, v = args[:3]
        heads = args[3] if len(args) > 3 else kwargs.get("heads")
        skip_reshape = kwargs.get("skip_reshape", False)
        tokens = q.shape[2] if skip_reshape else q.shape[1]
        if tokens == text + image and (kind, index) in layers:
            layer, text_tokens = layers[(kind, index)], text
        elif tokens == image and ("image", index) in layers:
            layer, text_tokens = layers[("image", index)], 0
        else:
            if not warned:
                warned.append(True)
                log.warning("[DirectInversion] an attention call of %s block %d has %d tokens, not its %d text + %d "
                            "image tokens (a patch that adds tokens, or reference latents): the editor leaves such "
                            "calls alone.", kind, index, tokens, text, image)
            return untouched()
        call = JointCall(layer=layer, heads=heads, branch=branch, level=level, chunks=_call_chunks(options),
                         text=text_tokens)
        if not controller.wants(call):
            return untouched()
        if kwargs.get("mask") is not None:
            raise ValueError("Editors do not support attention masks on SD3/Flux (a masked conditioning or a model "
                             "patch that sets one); remove it or run without an editor.")
        rest = {key: value for key, value in kwargs.items() if key not in ("heads", "skip_reshape", "skip_output_reshape")}

        def attend(q, k, v):
            flat_kwargs = dict(rest, skip_reshape=False, skip_output_reshape=False)
            if previous is not None:
                return previous(func, q, k, v, heads, **flat_kwargs)
            return func(q, k, v, heads, **flat_kwargs)

        out = controller.attention(_flat(q, skip_reshape), _flat(k, skip_reshape), _flat(v, skip_reshape), call, attend)
        if kwargs.get("skip_output_reshape", False):
            out = out.reshape(out.shape[0], out.shape[1], heads, -1).transpose(1, 2)
        return out

    return override


def _install_joint(model, editor, steps: int, latent_shape, family: str, layers: dict,
                   context_tokens: Optional[int]) -> InstalledEditor:
    text = None
    if getattr(editor, "kind", None) == "prompt_to_prompt":
        if not editor.encoders:
            raise ValueError("This P2P editor has no per-encoder token positions; make it with the P2P Editor node "
                             "and this model's CLIP.")
        if context_tokens is None:
            raise ValueError("Prompt-to-Prompt on SD3/Flux needs the target conditioning's text tokens; connect the "
                             "P2P Editor's target output.")
        text = joint_text(family, editor.encoders, context_tokens)
    controller = start_joint(editor, list(layers.values()), steps, latent_shape, family, text)
    options = model.model_options.setdefault("transformer_options", {})
    replaced = options.get("patches_replace", {}).get("dit", {})
    state: dict = {}
    for key in layers:
        kind, index = key
        if kind == "image":
            continue
        block = f"{kind}_block"
        model.set_model_patch_replace(_block_patch(kind, index, state, replaced.get((block, index))), "dit", block, index)
    model.model_options["transformer_options"] = dict(model.model_options["transformer_options"])
    model.model_options["transformer_options"][OVERRIDE] = _attention_override(
        layers, controller, model.model_options["transformer_options"].get(OVERRIDE))
    return InstalledEditor(controller, state.clear)


def install_editor(model, editor, steps: int, latent_shape, context_tokens: Optional[int] = None) -> InstalledEditor:
    """Start ``editor`` for a run and patch its hooks into ``model`` (a clone owned by the run): attention through
    ComfyUI's attn1/attn2 replace patch points; decoder features (if the editor wants them) through an output-block
    patch, which tells which prediction is running, and a forward hook on the block's last convolution.

    On an MM-DiT (SD3/SD3.5, Flux) every transformer block gets a ``dit`` block replace patch that names the block
    in the transformer options, and the clone's transformer options an ``optimized_attention_override`` that hands
    the joint attention's calls to the editor's joint controller; ``context_tokens`` is the conditioning's number of
    text tokens (Prompt-to-Prompt's positions).

    Returns an :class:`InstalledEditor`: the editor's per-run state and the forward hooks (they sit on the shared
    diffusion model, not the clone), which its ``close`` removes: call it in ``finally``.
    """
    if "multigpu_clones" in model.model_options:
        raise ValueError("Editors do not run on ComfyUI's multi-GPU sampling (the model has device clones): the "
                         "branches' attention must meet on one device. Edit on one GPU.")
    joint = joint_attention_layers(model)
    if joint is not None:
        return _install_joint(model, editor, steps, latent_shape, *joint, context_tokens)
    layers = attention_layers(model)
    controller = editor.start(list(layers.values()), steps, latent_shape)
    replaced = model.model_options.get("transformer_options", {}).get("patches_replace", {})
    for key, layer in layers.items():
        name, block = key[0], key[1:]
        previous = replaced.get(name, {}).get(block)
        if previous is not None:
            log.info("[DirectInversion] the editor runs before an existing %s patch at %s.", name, block)
        model.set_model_patch_replace(_attention_patch(layer, controller, previous), name, block[0], block[1], block[2])
    if controller.guides_target:
        model.set_model_input_block_patch_after_skip(_separate_skip)
    if not controller.feature_blocks:
        return InstalledEditor(controller, lambda: None)
    features = decoder_features(model)
    missing = sorted(set(controller.feature_blocks) - set(features))
    if missing:
        raise ValueError(f"The editor wants the features of decoder block(s) {missing}, but this UNet's decoder has "
                         f"blocks 0 .. {len(model.model.diffusion_model.output_blocks) - 1}.")
    pending = {}  # decoder block -> FeatureCall of the prediction that is about to run it

    def output_block_patch(h, hsp, transformer_options):
        place, index = transformer_options.get("block", (None, None))
        branch, level = transformer_options.get(BRANCH_OPTION), transformer_options.get(LEVEL_OPTION)
        if place == "output" and index in controller.feature_blocks:
            pending[index] = None if branch is None or level is None else FeatureCall(
                block=index, branch=branch, level=level, chunks=_call_chunks(transformer_options))
        return h, hsp

    def hook_for(index):
        def hook(module, inputs, output):
            call = pending.pop(index, None)
            return None if call is None else controller.feature(output, call)
        return hook

    model.set_model_output_block_patch(output_block_patch)
    handles = [features[index].register_forward_hook(hook_for(index)) for index in sorted(controller.feature_blocks)]

    def remove():
        for handle in handles:
            handle.remove()
        pending.clear()

    return InstalledEditor(controller, remove)
