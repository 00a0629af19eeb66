"""Editors on ComfyUI models: the UNet's attention layers and decoder blocks located by place, the attn1/attn2
replace patches and the output-block patch that hand our sampler's calls to an editor's controller."""
from __future__ import annotations

import logging
from typing import Callable, Optional

from ..editors.attention import AttentionCall, FeatureCall, layer_orders
from .comfyui_sampling import BRANCH_OPTION, LEVEL_OPTION

__all__ = ["InstalledEditor", "attention_layers", "decoder_features", "install_editor"]

log = logging.getLogger("DirectInversion")


def attention_layers(model) -> dict:
    """The UNet's attention layers in forward order, keyed ``(attn1|attn2, block, id, transformer_index)``, located
    by place (down / mid / up) and downsampling factor, read from the model's structure (SD1.x, SD2.x, SDXL)."""
    from comfy.ldm.modules.attention import SpatialTransformer
    from comfy.ldm.modules.diffusionmodules.openaimodel import Downsample, Upsample

    unet = model.model.diffusion_model
    if not all(hasattr(unet, name) for name in ("input_blocks", "middle_block", "output_blocks")):
        raise ValueError(f"Editors need a UNet (SD1.x, SD2.x, SDXL); this model's diffusion model is "
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


def install_editor(model, editor, steps: int, latent_shape) -> InstalledEditor:
    """Start ``editor`` for a run and patch its hooks into ``model`` (a clone owned by the run): attention through
    ComfyUI's attn1/attn2 replace patch points; decoder features (if the editor wants them) through an output-block
    patch, which tells which prediction is running, and a forward hook on the block's last convolution.

    Returns an :class:`InstalledEditor`: the editor's per-run state and the forward hooks (they sit on the shared
    diffusion model, not the clone), which its ``close`` removes: call it in ``finally``.
    """
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
