"""MasaCtrl through both adapters: mutual self-attention checked against attention computed in the test, its
start step and layer, masks, identity, every inversion method, SDXL and the MasaCtrl Editor node."""
from __future__ import annotations

import dataclasses
import pytest
import torch

import di_testing as T

reference_attention = T.reference_attention

STEPS = T.EDIT_STEPS
run = T.diffusers_edit


def test_layers_and_default_start(diffusers_backend, editors, edit_setup):
    layers = diffusers_backend.attention_layers(edit_setup["unet"])
    self_layers = [layer for layer in layers.values() if not layer.cross]
    assert [layer.order for layer in self_layers] == list(range(4))
    assert editors.default_start_layer(16) == 10 and editors.default_start_layer(70) == 44
    with pytest.raises(ValueError, match="start_layer is 9 but this UNet has 4 transformer blocks"):
        run(edit_setup, edit_setup["target"], editors.MasaCtrlEditor(start_layer=9))


def test_target_attends_to_the_source_keys_and_values(diffusers_backend, editors, edit_setup):
    """At edited steps and layers the target's output is attention of its queries over the source's keys/values
    (captured from the source's own projections here); elsewhere nothing is edited."""
    unet = edit_setup["unet"]
    layers = diffusers_backend.attention_layers(unet)
    captured = []  # (module name, which, output) of every to_k / to_v call, in call order
    handles = []
    for name in layers:
        module = unet.get_submodule(name.rsplit(".", 1)[0])
        for which in ("to_k", "to_v"):
            handles.append(getattr(module, which).register_forward_hook(
                lambda mod, args, out, name=name, which=which: captured.append((name, which, out.detach().clone()))))
    editor = editors.MasaCtrlEditor(start_step=3, start_layer=2, record=True)
    try:
        out = run(edit_setup, edit_setup["target"], editor)
    finally:
        for handle in handles:
            handle.remove()
    records = out.editor_state.records
    edited = {layer.key for layer in layers.values() if not layer.cross and layer.order >= 2}
    assert {(r["step"], r["layer"].key, r["role"]) for r in records} == {
        (n, key, role) for n in range(3, STEPS - 1) for key in edited for role in ("uncond", "cond")}
    for r in records:
        expected = reference_attention(r["q"], r["k"], r["v"], r["heads"])
        torch.testing.assert_close(r["out"].double(), expected, rtol=0, atol=1e-5)
    # the keys/values used are the source's: the first to_k/to_v call of that layer in that step is the source's
    per_layer = {}
    for name, which, tensor in captured:
        per_layer.setdefault((name, which), []).append(tensor)
    for r in records:
        key = r["layer"].key
        row = 0 if r["role"] == "uncond" else 1  # the diffusers denoiser batches [uncond, cond]
        calls_per_step = 2  # source, then target
        n_call = (r["step"]) * calls_per_step  # every evaluated step calls the layer twice
        k_src = per_layer[(key, "to_k")][n_call].chunk(2)[row]
        v_src = per_layer[(key, "to_v")][n_call].chunk(2)[row]
        assert torch.equal(r["k"], k_src) and torch.equal(r["v"], v_src)


def test_identity_and_exact_source(diffusers_backend, editors, edit_setup):
    """The source stays exact under MasaCtrl, and mutual self-attention of an image with itself changes nothing:
    with the target prompt = the source's and offsets on both branches, the target stays on the source's path."""
    editor = editors.MasaCtrlEditor(start_step=0, start_layer=0)
    out = run(edit_setup, edit_setup["source"], editor)
    assert torch.equal(out.source, edit_setup["z0"])
    both = run(edit_setup, edit_setup["source"], editor, offsets="both")
    torch.testing.assert_close(both.edited, edit_setup["z0"], rtol=0, atol=1e-5)
    # (MasaCtrl pulling a *drifting* identity edit toward the source is not visible in this toy UNet, whose
    # self-attention is a small part of the network: measured MSE to the source 0.01353 without, 0.01357 with, cfg 3)


def test_masks(diffusers_backend, editors, edit_setup):
    base = run(edit_setup, edit_setup["target"], editors.MasaCtrlEditor(start_step=2, start_layer=1))
    ones = run(edit_setup, edit_setup["target"], editors.MasaCtrlEditor(start_step=2, start_layer=1,
                                                                        mask=torch.ones(16, 16)))
    zeros = run(edit_setup, edit_setup["target"], editors.MasaCtrlEditor(start_step=2, start_layer=1,
                                                                         mask=torch.zeros(16, 16)))
    torch.testing.assert_close(ones.edited, base.edited, rtol=0, atol=1e-5)
    torch.testing.assert_close(zeros.edited, base.edited, rtol=0, atol=1e-5)  # only the background path
    mask = torch.zeros(16, 16)
    mask[3:11, 5:13] = 1.0
    half = run(edit_setup, edit_setup["target"], dataclasses.replace(
        editors.MasaCtrlEditor(start_step=2, start_layer=1, mask=mask), record=True))
    assert (half.edited - base.edited).abs().max() > 1e-5
    for r in half.editor_state.records:
        m_src, m_tgt = r["masks"]
        fg_queries = m_tgt[0]
        expected_fg = reference_attention(r["q"], r["k"][:, m_src[0]], r["v"][:, m_src[0]], r["heads"])
        expected_bg = reference_attention(r["q"], r["k"][:, ~m_src[0]], r["v"][:, ~m_src[0]], r["heads"])
        torch.testing.assert_close(r["out"][:, fg_queries].double(), expected_fg[:, fg_queries], rtol=0, atol=1e-5)
        torch.testing.assert_close(r["out"][:, ~fg_queries].double(), expected_bg[:, ~fg_queries], rtol=0, atol=1e-5)


def test_automatic_mask_from_words(diffusers_backend, editors, edit_setup):
    editor = editors.MasaCtrlEditor(start_step=2, start_layer=1, source_positions=(2,), target_positions=(2,),
                                    record=True)
    out = run(edit_setup, edit_setup["target"], editor)
    masks = [r["masks"] for r in out.editor_state.records]
    assert masks and all(m is not None for m in masks)  # the map level (factor 1 here) runs before the decoder
    assert any(0 < m[1].sum() < m[1].numel() for m in masks)
    with pytest.raises(ValueError, match="either a mask or mask words"):
        editors.MasaCtrlEditor(mask=torch.ones(4, 4), source_positions=(1,), target_positions=(1,))


@pytest.mark.parametrize("method", ["ddim", "null_text", "negative_prompt", "edict"])
def test_every_method(diffusers_backend, editors, edit_setup, method):
    s = edit_setup
    inversion = T.invert_with(s, method)
    plain = run(s, s["target"], inversion=inversion)
    out = run(s, s["target"], editors.MasaCtrlEditor(start_step=2, start_layer=1), inversion=inversion)
    if method == "edict":
        torch.testing.assert_close(out.source.float(), s["z0"], rtol=0, atol=1e-4)
    else:
        assert torch.equal(out.source, s["z0"])
        assert out.offsets is not None  # the source is guided for MasaCtrl: offsets are computed
    assert ((out.edited - plain.edited) ** 2).mean() > 1e-8


# -- ComfyUI ------------------------------------------------------------------------------------------------------


def test_comfyui_agrees_with_diffusers_and_leaves_no_patch(comfy_backend, editors, edit_setup, tiny_unet):
    import copy

    model = T.comfy_model_from_diffusers(tiny_unet)
    before = copy.deepcopy(model.model_options)
    conds = {name: T.comfy_conditioning(edit_setup[name]) for name in ("source", "target", "null")}
    mask = torch.zeros(16, 16)
    mask[3:11, 5:13] = 1.0
    for editor in (editors.MasaCtrlEditor(start_step=2, start_layer=1),
                   editors.MasaCtrlEditor(start_step=2, start_layer=1, mask=mask),
                   editors.MasaCtrlEditor(start_step=2, start_layer=1, source_positions=(2,), target_positions=(2,))):
        with torch.inference_mode():
            inv = comfy_backend.invert(model, model.model.process_latent_out(edit_setup["z0"]), conds["source"],
                                       conds["null"],
                                       steps=STEPS)
            out = comfy_backend.direct_inversion(model, inv.inversion, conds["target"], conds["null"], cfg=7.5,
                                                 editor=editor)
        expected = run(edit_setup, edit_setup["target"], editor)
        edited = model.model.process_latent_in(out.edited)
        assert (edited - expected.edited).abs().max() <= 1e-4 * expected.edited.abs().max()
    assert model.model_options == before


def test_comfyui_sdxl_family(comfy_backend, editors):
    model = T.tiny_comfy_sdxl()
    source, target, negative = T.sdxl_conditioning(1), T.sdxl_conditioning(2), T.sdxl_conditioning(3)
    latent = model.model.process_latent_out(T.image_like_latent())
    layers = [layer for layer in comfy_backend.attention_layers(model).values() if not layer.cross]
    editor = editors.MasaCtrlEditor(start_step=2, record=True)
    with torch.inference_mode():
        inversion = comfy_backend.invert(model, latent, source, negative, steps=STEPS).inversion
        plain = comfy_backend.direct_inversion(model, inversion, target, negative, cfg=7.5)
        out = comfy_backend.direct_inversion(model, inversion, target, negative, cfg=7.5, editor=editor)
    assert (out.source - latent).abs().max().item() <= 1e-5 * latent.abs().max().item()
    assert ((out.edited - plain.edited) ** 2).mean() > 1e-8
    start = editors.default_start_layer(len(layers))
    assert {r["layer"].key for r in out.editor_state.records} == {l.key for l in layers if l.order >= start}
    for r in out.editor_state.records:
        torch.testing.assert_close(r["out"].double(), reference_attention(r["q"], r["k"], r["v"], r["heads"]),
                                   rtol=0, atol=1e-5)
