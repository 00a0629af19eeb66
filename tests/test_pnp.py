"""Plug-and-Play through both adapters: injected features and queries/keys read back through hooks on the UNet's
own modules, the injection windows, identity, every inversion method, the reference's layer positions on real
SD1.5 / SDXL structures, ComfyUI agreement and cleanup, SDXL."""
from __future__ import annotations

import copy
import pytest
import torch

import di_testing as T

reference_attention = T.reference_attention

STEPS = T.EDIT_STEPS
run = T.diffusers_edit
# the tiny UNets have two decoder levels of two blocks (0-1 at 1/2 resolution, 2-3 at full, self-attention in 2-3):
# block 3 is the second block of the first upsampled level, the reference's feature position
TINY = dict(feature_block=3, attention_from_block=3)


def pnp(editors, setup, **kw):
    return editors.PnPEditor(**{**TINY, "source_conditioning": setup["null"], **kw})


class Calls:
    """Forward hooks that record every call of some modules (outputs, or inputs with ``inputs=True``)."""

    def __init__(self):
        self.calls, self.handles = {}, []

    def output(self, name, module):
        self.handles.append(module.register_forward_hook(
            lambda mod, args, out: self.calls.setdefault(name, []).append(out.detach().clone())))

    def io(self, name, module):
        self.handles.append(module.register_forward_hook(
            lambda mod, args, out: self.calls.setdefault(name, []).append((args[0].detach().clone(), out.detach().clone()))))

    def remove(self):
        for handle in self.handles:
            handle.remove()


def test_injection_read_through_hooks(diffusers_backend, editors, edit_setup):
    """Inside the windows the target's residual features and self-attention queries/keys are the source's (both
    halves get the source's one unguided prediction); after them they are the target's own; the source is never
    changed; a decoder layer before attention_from_block keeps its own attention throughout."""
    unet = edit_setup["unet"]
    resnet = unet.up_blocks[1].resnets[1]  # decoder block 3
    injected = unet.up_blocks[1].attentions[1].transformer_blocks[0].attn1  # decoder block 3
    untouched = unet.up_blocks[1].attentions[0].transformer_blocks[0].attn1  # decoder block 2
    calls = Calls()
    calls.output("own_h", resnet.conv2)  # registered before the editor's hook: the block's own features
    calls.io("resnet", resnet)  # (input, output): the features actually used are output * scale - shortcut(input)
    for name, attn in (("inj", injected), ("keep", untouched)):
        for which in ("to_q", "to_k", "to_v"):
            calls.output(f"{name}.{which}", getattr(attn, which))
        calls.handles.append(attn.to_out[0].register_forward_pre_hook(
            lambda mod, args, name=name: calls.calls.setdefault(f"{name}.out", []).append(args[0].detach().clone())))
    editor = pnp(editors, edit_setup, feature_injection=0.7, attention_injection=0.4)
    try:
        out = run(edit_setup, edit_setup["target"], editor)
    finally:
        calls.remove()
    assert torch.equal(out.source, edit_setup["z0"])
    c = calls.calls
    evaluated = STEPS - 1  # the last (zero-length) step needs no prediction
    assert len(c["own_h"]) == 2 * evaluated  # per step: the source (unguided: 1 sample), then the target (2)
    feature_steps, attention_steps = int(STEPS * 0.7), int(STEPS * 0.4)
    for n in range(evaluated):
        src_own, tgt_own = c["own_h"][2 * n], c["own_h"][2 * n + 1]
        assert src_own.shape[0] == 1 and tgt_own.shape[0] == 2
        used = []
        for x, y in c["resnet"][2 * n: 2 * n + 2]:
            shortcut = resnet.conv_shortcut(x) if resnet.conv_shortcut is not None else x
            used.append(y * resnet.output_scale_factor - shortcut)
        torch.testing.assert_close(used[0], src_own, rtol=0, atol=1e-5)
        if n < feature_steps:
            torch.testing.assert_close(used[1], src_own.expand_as(tgt_own), rtol=0, atol=1e-5)
            assert (tgt_own - src_own).abs().max() > 1e-3  # the injection replaced something different
        else:
            torch.testing.assert_close(used[1], tgt_own, rtol=0, atol=1e-5)
        q_s, k_s, v_s = (c[f"inj.{w}"][2 * n] for w in ("to_q", "to_k", "to_v"))
        q_t, k_t, v_t = (c[f"inj.{w}"][2 * n + 1] for w in ("to_q", "to_k", "to_v"))
        heads = injected.heads
        torch.testing.assert_close(c["inj.out"][2 * n].double(), reference_attention(q_s, k_s, v_s, heads),
                                   rtol=0, atol=1e-5)
        if n < attention_steps:
            expected = reference_attention(q_s.expand_as(q_t), k_s.expand_as(k_t), v_t, heads)
        else:
            expected = reference_attention(q_t, k_t, v_t, heads)
        torch.testing.assert_close(c["inj.out"][2 * n + 1].double(), expected, rtol=0, atol=1e-5)
        q_k, k_k, v_k = (c[f"keep.{w}"][2 * n + 1] for w in ("to_q", "to_k", "to_v"))
        torch.testing.assert_close(c["keep.out"][2 * n + 1].double(), reference_attention(q_k, k_k, v_k, heads),
                                   rtol=0, atol=1e-5)
    assert not resnet.conv2._forward_hooks  # the editor's hook is gone after the run


def test_identity(diffusers_backend, editors, edit_setup):
    """Target = source: the source reconstruction is exact, and the edit is closer to the source with PnP than
    without it (cfg 7.5, where the plain identity edit drifts)."""
    s = edit_setup
    plain = run(s, s["source"])
    out = run(s, s["source"], pnp(editors, s))
    assert torch.equal(out.source, s["z0"])
    mse = lambda a: ((a - s["z0"]) ** 2).mean().item()  # noqa: E731
    assert mse(out.edited) < mse(plain.edited), (mse(out.edited), mse(plain.edited))


def test_source_trajectory_and_offsets(diffusers_backend, editors, edit_setup):
    """offsets 'source': the source is the inversion's latents (no offsets kept); 'off': the source follows its own
    unguided empty-prompt DDIM path, as the reference's baseline, and the offsets that would pin it are recorded."""
    s = edit_setup
    pinned = run(s, s["target"], pnp(editors, s))
    assert pinned.offsets is None and torch.equal(pinned.source, s["z0"])
    own = run(s, s["target"], pnp(editors, s), offsets="off")
    assert own.offsets is not None and not torch.equal(own.source, s["z0"])
    unguided = run(s, s["null"], cfg=1.0, offsets="off")  # the empty prompt's own unguided DDIM path
    torch.testing.assert_close(own.source, unguided.edited, rtol=0, atol=1e-6)


def test_windows_and_errors(diffusers_backend, editors, edit_setup):
    s = edit_setup
    base = run(s, s["target"])
    none = run(s, s["target"], pnp(editors, s, feature_injection=0.0, attention_injection=0.0))
    torch.testing.assert_close(none.edited, base.edited, rtol=0, atol=1e-6)  # no window: the plain edit
    with pytest.raises(ValueError, match="attention_from_block is 4 but this UNet's last decoder block with "
                                         "self-attention is 3"):
        run(s, s["target"], editors.PnPEditor())  # the SD defaults do not exist in the tiny UNet
    with pytest.raises(ValueError, match=r"decoder block\(s\) \[7\]"):
        run(s, s["target"], pnp(editors, s, feature_block=7))
    assert not any(m._forward_hooks for m in s["unet"].modules())
    with pytest.raises(ValueError, match="fraction of the steps"):
        editors.PnPEditor(feature_injection=1.5)


@pytest.mark.parametrize("method", ["ddim", "null_text", "negative_prompt", "edict"])
def test_every_method(diffusers_backend, editors, edit_setup, method):
    s = edit_setup
    inversion = T.invert_with(s, method)
    plain = run(s, s["target"], inversion=inversion)
    out = run(s, s["target"], pnp(editors, s), inversion=inversion)
    if method == "edict":  # EDICT keeps its source on the inversion's prompt: still exact
        torch.testing.assert_close(out.source.float(), s["z0"], rtol=0, atol=1e-4)
    else:
        assert torch.equal(out.source, s["z0"])
    assert ((out.edited - plain.edited) ** 2).mean() > 1e-8


# -- the reference's positions on real structures (meta tensors: no weights) ---------------------------------------

SD15_UNET = dict(block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8)
SD21_UNET = dict(block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20),
                 use_linear_projection=True)
SDXL_UNET = dict(block_out_channels=(320, 640, 1280), cross_attention_dim=2048, attention_head_dim=(5, 10, 20),
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 transformer_layers_per_block=(1, 2, 10), use_linear_projection=True,
                 addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)


def _meta_diffusers(config):
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel(**config)


def test_reference_positions_diffusers(diffusers_backend, editors):
    """Defaults on SD1.5's structure are the reference's: features of up_blocks[1].resnets[1] and the self-attention
    of up_blocks[1].attentions[1:] and up_blocks[2:] (pnp-diffusers' res_dict {1: [1, 2], 2: [0, 1, 2], 3: [0, 1, 2]})."""
    expected = {f"up_blocks.{b}.attentions.{a}.transformer_blocks.0.attn1.processor"
                for b, ids in {1: [1, 2], 2: [0, 1, 2], 3: [0, 1, 2]}.items() for a in ids}
    for config in (SD15_UNET, SD21_UNET):
        unet = _meta_diffusers(config)
        layers = diffusers_backend.attention_layers(unet)
        controller = editors.PnPEditor().start(list(layers.values()), 50, (1, 4, 64, 64))
        assert diffusers_backend.decoder_features(unet)[4] is unet.up_blocks[1].resnets[1].conv2
        assert controller.attention_keys == expected
        assert (controller.feature_steps, controller.attention_steps) == (40, 25)
    sdxl = _meta_diffusers(SDXL_UNET)
    layers = diffusers_backend.attention_layers(sdxl)
    controller = editors.PnPEditor().start(list(layers.values()), 50, (1, 4, 128, 128))
    assert diffusers_backend.decoder_features(sdxl)[4] is sdxl.up_blocks[1].resnets[1].conv2
    assert controller.attention_keys == {f"up_blocks.1.attentions.{a}.transformer_blocks.{j}.attn1.processor"
                                         for a in (1, 2) for j in (0, 1)}


SD15_LDM = {"use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
            "legacy": False, "adm_in_channels": None, "in_channels": 4, "model_channels": 320,
            "num_res_blocks": [2, 2, 2, 2], "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "channel_mult": [1, 2, 4, 4],
            "transformer_depth_middle": 1, "use_linear_in_transformer": False, "context_dim": 768, "num_heads": 8,
            "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], "use_temporal_attention": False,
            "use_temporal_resblock": False}
SD21_LDM = {**SD15_LDM, "use_linear_in_transformer": True, "context_dim": 1024, "num_head_channels": 64}
del SD21_LDM["num_heads"]
SDXL_LDM = {"use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
            "legacy": False, "num_classes": "sequential", "adm_in_channels": 2816, "in_channels": 4,
            "model_channels": 320, "num_res_blocks": [2, 2, 2], "transformer_depth": [0, 0, 2, 2, 10, 10],
            "channel_mult": [1, 2, 4], "transformer_depth_middle": 10, "use_linear_in_transformer": True,
            "context_dim": 2048, "num_head_channels": 64, "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10],
            "use_temporal_attention": False, "use_temporal_resblock": False}


def test_reference_positions_comfyui_match_diffusers(comfy_backend, diffusers_backend, editors):
    """ComfyUI's SD1.5, SD2.1 and SDXL UNets give the same layers, blocks and feature convolution as diffusers' (matched
    through ComfyUI's own diffusers key map)."""
    import types

    import comfy.supported_models
    import comfy.utils

    for family, ldm_config, diffusers_config in ((comfy.supported_models.SD15, SD15_LDM, SD15_UNET),
                                                (comfy.supported_models.SD20, SD21_LDM, SD21_UNET),
                                                (comfy.supported_models.SDXL, SDXL_LDM, SDXL_UNET)):
        model = family(dict(ldm_config)).get_model({}, device="meta")
        patcher = types.SimpleNamespace(model=model)
        comfy_layers = comfy_backend.attention_layers(patcher)
        diffusers_layers = diffusers_backend.attention_layers(_meta_diffusers(diffusers_config))
        key_map = comfy.utils.unet_to_diffusers(model.model_config.unet_config)  # diffusers key -> ldm key

        def ldm_prefix(name):  # "down_blocks.1.attentions.0.transformer_blocks.0.attn1.processor" -> ldm module
            return key_map[name.replace(".processor", ".to_q.weight")].rsplit(".to_q.weight", 1)[0]

        def comfy_prefix(key):
            name, place, block, j = key
            blocks = {"input": "input_blocks", "output": "output_blocks", "middle": "middle_block"}[place]
            index = 1 if place == "middle" else [i for i, m in enumerate(getattr(model.diffusion_model, blocks)[block])
                                                 if type(m).__name__ == "SpatialTransformer"][0]
            middle = f"{blocks}.{index}" if place == "middle" else f"{blocks}.{block}.{index}"
            return f"{middle}.transformer_blocks.{j}.{name}"

        comfy_by_prefix = {comfy_prefix(k): layer for k, layer in comfy_layers.items()}
        assert len(comfy_by_prefix) == len(diffusers_layers)
        for name, layer in diffusers_layers.items():
            other = comfy_by_prefix[ldm_prefix(name)]
            assert (other.place, other.factor, other.cross, other.order, other.block) == (
                layer.place, layer.factor, layer.cross, layer.order, layer.block), name
        conv = comfy_backend.decoder_features(patcher)[4]
        assert conv is model.diffusion_model.output_blocks[4][0].out_layers[3]
        assert key_map["up_blocks.1.resnets.1.conv2.weight"] == "output_blocks.4.0.out_layers.3.weight"


# -- ComfyUI ------------------------------------------------------------------------------------------------------


def test_comfyui_agrees_with_diffusers_and_leaves_nothing(comfy_backend, editors, edit_setup, tiny_unet):
    model = T.comfy_model_from_diffusers(tiny_unet)
    before = copy.deepcopy(model.model_options)
    conds = {name: T.comfy_conditioning(edit_setup[name]) for name in ("source", "target", "null")}
    editor = editors.PnPEditor(**TINY, source_conditioning=conds["null"])
    with torch.inference_mode():
        inv = comfy_backend.invert(model, model.model.process_latent_out(edit_setup["z0"]), conds["source"],
                                   conds["null"], steps=STEPS)
        out = comfy_backend.direct_inversion(model, inv.inversion, conds["target"], conds["null"], cfg=7.5,
                                             editor=editor)
        for offsets in ("off", "both"):
            other = comfy_backend.direct_inversion(model, inv.inversion, conds["target"], conds["null"], cfg=7.5,
                                                   editor=editor, offsets=offsets)
            expected = run(edit_setup, edit_setup["target"], pnp(editors, edit_setup), offsets=offsets)
            edited = model.model.process_latent_in(other.edited)
            assert (edited - expected.edited).abs().max() <= 1e-4 * expected.edited.abs().max()
    expected = run(edit_setup, edit_setup["target"], pnp(editors, edit_setup))
    edited = model.model.process_latent_in(out.edited)
    assert (edited - expected.edited).abs().max() <= 1e-4 * expected.edited.abs().max()
    assert model.model_options == before
    unet = model.model.diffusion_model
    assert not any(m._forward_hooks for m in unet.modules())
    # an error inside sampling (a NaN start latent) leaves no hook either
    with torch.inference_mode(), pytest.raises(ValueError, match="NaN"):
        comfy_backend.direct_inversion(model, inv.inversion, conds["target"], conds["null"], editor=editor,
                                       target_start=torch.full_like(out.edited, float("nan")))
    assert not any(m._forward_hooks for m in unet.modules()) and model.model_options == before
    with torch.inference_mode(), pytest.raises(ValueError, match="attention_from_block is 4"):
        comfy_backend.direct_inversion(model, inv.inversion, conds["target"], conds["null"],
                                       editor=editors.PnPEditor(source_conditioning=conds["null"]))


def test_comfyui_sdxl_family(comfy_backend, editors):
    model = T.tiny_comfy_sdxl()
    source, target, negative = T.sdxl_conditioning(1), T.sdxl_conditioning(2), T.sdxl_conditioning(3)
    empty = T.sdxl_conditioning(4)
    latent = model.model.process_latent_out(T.image_like_latent())
    feature = model.model.diffusion_model.output_blocks[3][0].out_layers[3]
    seen = []
    handle = feature.register_forward_hook(lambda m, a, out: seen.append(out.shape[0]))
    try:
        with torch.inference_mode():
            inversion = comfy_backend.invert(model, latent, source, negative, steps=STEPS).inversion
            plain = comfy_backend.direct_inversion(model, inversion, target, negative, cfg=7.5)
            seen.clear()
            # the tiny SDXL has self-attention in decoder blocks 0-1 only (as SDXL, none at full resolution)
            editor = editors.PnPEditor(feature_block=3, attention_from_block=1, source_conditioning=empty)
            out = comfy_backend.direct_inversion(model, inversion, target, negative, cfg=7.5, editor=editor)
    finally:
        handle.remove()
    assert (out.source - latent).abs().max().item() <= 1e-5 * latent.abs().max().item()
    assert ((out.edited - plain.edited) ** 2).mean() > 1e-8
    assert seen == [1, 2] * (STEPS - 1)  # 3 samples per step: the unguided source, the target's two halves


def test_every_editor_on_a_v_prediction_model_agrees_across_backends(comfy_backend, diffusers_backend, editors,
                                                                      edit_setup, tiny_unet):
    """SD2.x-style v-prediction: P2P, MasaCtrl and PnP give the same edit through ComfyUI and diffusers."""
    s = edit_setup
    scheduler = T.sd_scheduler("v_prediction")
    model = T.comfy_model_from_diffusers(tiny_unet, v_prediction=True)
    conds = {name: T.comfy_conditioning(s[name]) for name in ("source", "target", "null")}
    vocab = {"a": [1], "cat": [2], "dog": [3], "sitting": [4]}
    tok = lambda text: editors.tokenize_words(text, vocab.__getitem__, 100, 101, max_len=T.TOKENS)  # noqa: E731
    words = (tok("a cat sitting"), tok("a dog sitting"))
    for make in (lambda null: editors.prompt_to_prompt(*words, max_tokens=T.TOKENS),
                 lambda null: editors.MasaCtrlEditor(start_step=2, start_layer=1),
                 lambda null: editors.PnPEditor(**TINY, source_conditioning=null)):
        inversion = diffusers_backend.invert(tiny_unet, scheduler, s["z0"], s["source"], s["null"], steps=STEPS)
        expected = diffusers_backend.edit(tiny_unet, scheduler, inversion, s["target"], s["null"], cfg=7.5,
                                          editor=make(s["null"]))
        with torch.inference_mode():
            inv = comfy_backend.invert(model, model.model.process_latent_out(s["z0"]), conds["source"], conds["null"],
                                       steps=STEPS)
            out = comfy_backend.direct_inversion(model, inv.inversion, conds["target"], conds["null"], cfg=7.5,
                                                 editor=make(conds["null"]))
        edited = model.model.process_latent_in(out.edited)
        assert (edited - expected.edited).abs().max() <= 1e-4 * expected.edited.abs().max()
        assert torch.equal(expected.source, s["z0"])
