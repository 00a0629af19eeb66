"""Prompt-to-Prompt through the ComfyUI adapter (attention replace patches on a ModelPatcher clone): agreement with
the diffusers adapter, the UNet sample budget, cleanliness after runs and errors, SDXL, prompt alignment with
ComfyUI's real tokenizers, the P2P Editor node and the attention-map image."""
from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

import di_testing as T

STEPS = 10
VOCAB = {"a": [1], "cat": [2], "dog": [3], "on": [7], "bench": [8], "motorbike": [9, 10]}


def p2p(editors, source, target, **options):
    tok = lambda text: editors.tokenize_words(text, lambda word: VOCAB[word], 100, 101, max_len=T.TOKENS)  # noqa: E731
    return editors.prompt_to_prompt(tok(source), tok(target), max_tokens=T.TOKENS, **options)


@pytest.fixture(scope="module")
def inverted(comfy_backend, model, conds):
    z0 = T.image_like_latent()
    latent = model.model.process_latent_out(z0)
    with torch.inference_mode():
        out = comfy_backend.invert(model, latent, conds["source"], conds["negative"], steps=STEPS)
    return latent, out.inversion


def test_backends_agree_with_p2p(comfy_backend, editors, tiny_unet, model, conds):
    from comfyui_direct_inversion.adapters import diffusers_backend

    editor = dataclasses.replace(p2p(editors, "a cat on a bench", "a motorbike on a bench", cross_replace_steps=0.5,
                                     self_replace_steps=0.6, reweight=[("motorbike", 2.0)], blend_source_words=["cat"],
                                     blend_target_words=["motorbike"], blend_threshold=0.9), record=True)
    scheduler = T.sd_scheduler()
    z0 = T.image_like_latent()
    embeds = {name: c[0][0] for name, c in conds.items()}
    with torch.inference_mode():
        inv_c = comfy_backend.invert(model, model.model.process_latent_out(z0), conds["source"], conds["negative"],
                                     steps=STEPS)
        out_c = comfy_backend.direct_inversion(model, inv_c.inversion, conds["target"], conds["negative"], cfg=7.5,
                                               editor=editor)
    inv_d = diffusers_backend.invert(tiny_unet, scheduler, z0, embeds["source"], steps=STEPS)
    out_d = diffusers_backend.edit(tiny_unet, scheduler, inv_d, embeds["target"], embeds["negative"], cfg=7.5,
                                   editor=editor)
    edited_c = model.model.process_latent_in(out_c.edited)
    assert (edited_c - out_d.edited).abs().max() <= 1e-4 * out_d.edited.abs().max()
    assert len(out_c.editor_state.blend_masks) == len(out_d.editor_state.blend_masks) > 0
    for (i, a), (j, b) in zip(out_c.editor_state.blend_masks, out_d.editor_state.blend_masks):
        assert i == j and torch.equal(a, b)


def test_identity_edit_is_closer_and_source_exact(comfy_backend, editors, model, conds, inverted):
    latent, inversion = inverted
    editor = p2p(editors, "a cat on a bench", "a cat on a bench", cross_replace_steps=1.0, self_replace_steps=1.0)
    with torch.inference_mode():
        plain = comfy_backend.direct_inversion(model, inversion, conds["source"], conds["negative"], cfg=3.0)
        out = comfy_backend.direct_inversion(model, inversion, conds["source"], conds["negative"], cfg=3.0,
                                             editor=editor)
    assert (out.source - latent).abs().max().item() <= 1e-5
    # guidance 3 for the reason given in test_p2p_diffusers' identity test
    assert ((out.edited - latent) ** 2).mean() < 0.98 * ((plain.edited - latent) ** 2).mean()


def test_at_most_three_unet_samples_per_edit_step(comfy_backend, editors, model, conds, inverted):
    _, inversion = inverted
    samples = []

    def counting(apply_model, args):
        samples.append(args["input"].shape[0])
        return apply_model(args["input"], args["timestep"], **args["c"])

    counted = model.clone()
    counted.set_model_unet_function_wrapper(counting)
    editor = p2p(editors, "a cat on a bench", "a dog on a bench", blend_target_words=["dog"])
    with torch.inference_mode():
        out = comfy_backend.direct_inversion(counted, inversion, conds["target"], conds["negative"], cfg=7.5,
                                             editor=editor)
    assert sum(samples) == 3 * (STEPS - 1)  # the last DDIM step is zero-length and not evaluated
    assert out.offsets.offsets is None


def test_nothing_stays_patched(comfy_backend, editors, model, conds, inverted):
    _, inversion = inverted
    before = copy.deepcopy(model.model_options)
    editor = p2p(editors, "a cat on a bench", "a dog on a bench")
    with torch.inference_mode():
        comfy_backend.direct_inversion(model, inversion, conds["target"], conds["negative"], cfg=7.5, editor=editor)
    assert model.model_options == before
    broken = p2p(editors, "a cat on a bench", "a dog on a bench", mask=torch.ones(3, 16, 16), blend_start=0.5)
    with pytest.raises(ValueError, match="mask has batch 3"), torch.inference_mode():
        comfy_backend.direct_inversion(model, inversion, conds["target"], conds["negative"], cfg=7.5, editor=broken)
    assert model.model_options == before
    # the model samples as before: a plain edit equals one made before any editor ran
    with torch.inference_mode():
        a = comfy_backend.direct_inversion(model, inversion, conds["target"], conds["negative"], cfg=7.5)
        b = comfy_backend.direct_inversion(model.clone(), inversion, conds["target"], conds["negative"], cfg=7.5)
    assert torch.equal(a.edited, b.edited)


def test_existing_attention_patch_still_acts(comfy_backend, editors, model, conds, inverted):
    """An attn2 replace patch applied upstream runs wherever the editor does not take over."""
    _, inversion = inverted
    calls = []

    def upstream(q, k, v, extra_options):
        import comfy.ldm.modules.attention as attention

        calls.append(extra_options["block"])
        return attention.optimized_attention(q, k, v, extra_options["n_heads"])

    patched = model.clone()
    patched.set_model_attn2_replace(upstream, "output", 3, 0)
    editor = p2p(editors, "a cat on a bench", "a dog on a bench", cross_replace_steps=0.0, self_replace_steps=0.0)
    with torch.inference_mode():
        comfy_backend.direct_inversion(patched, inversion, conds["target"], conds["negative"], cfg=7.5, editor=editor)
    assert calls and all(block == ("output", 3) for block in calls)


def test_sdxl_family(comfy_backend, editors):
    model = T.tiny_comfy_sdxl()
    layers = comfy_backend.attention_layers(model)
    assert {(layer.place, layer.factor) for layer in layers.values()} == {("down", 2), ("mid", 2), ("up", 2)}
    source, target, negative = T.sdxl_conditioning(1), T.sdxl_conditioning(2), T.sdxl_conditioning(3)
    latent = model.model.process_latent_out(T.image_like_latent())
    editor = dataclasses.replace(p2p(editors, "a cat on a bench", "a motorbike on a bench", cross_replace_steps=1.0,
                                     self_replace_steps=1.0, blend_target_words=["motorbike"],
                                     blend_threshold=0.9), record=True)
    with torch.inference_mode():
        inversion = comfy_backend.invert(model, latent, source, negative, steps=STEPS).inversion
        plain = comfy_backend.direct_inversion(model, inversion, target, negative, cfg=7.5)
        out = comfy_backend.direct_inversion(model, inversion, target, negative, cfg=7.5, editor=editor)
    assert (out.source - latent).abs().max().item() <= 1e-5 * latent.abs().max().item()
    assert ((out.edited - plain.edited) ** 2).mean() > 1e-6 * latent.var()
    assert out.editor_state.blend_masks
    # the target's cross-attention is the source's, mapped, at every cross-attention layer (found by resolution)
    mapper = editor.cross_mapping()[1][:T.TOKENS, :T.TOKENS]
    records = out.editor_state.records
    src = {(r["step"], r["layer"].key): r["probs"] for r in records if r["branch"] == "source"}
    tgt = {(r["step"], r["layer"].key): r["probs"] for r in records if r["branch"] == "target"}
    assert {key for _, key in tgt} == {layer.key for layer in layers.values() if layer.cross}
    for key, probs in tgt.items():
        torch.testing.assert_close(probs, torch.einsum("bhpw,wn->bhpn", src[key], mapper), rtol=0, atol=1e-6)


# -- prompts through ComfyUI's tokenizers ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def prompts(comfyui_path, pack):
    from comfyui_direct_inversion.adapters import comfyui_prompts

    return comfyui_prompts


def test_alignment_with_the_real_sd1_and_sdxl_tokenizers(prompts, editors):
    import comfy.sd1_clip
    import comfy.sdxl_clip

    for tokenizer in (comfy.sd1_clip.SD1Tokenizer(), comfy.sdxl_clip.SDXLTokenizer()):
        source = prompts.tokenized_prompt_with(tokenizer.tokenize_with_weights, "a photo of a cat on a bench").prompt
        target = prompts.tokenized_prompt_with(tokenizer.tokenize_with_weights,
                                               "a photo of a teddybear on a bench").prompt
        assert source.ids[0] == 49406 and source.ids[-1] == 49407 and len(source.spans) == 8
        assert len(target.spans[4]) == 2  # "teddybear" is two CLIP tokens
        assert editors.word_positions(target, "Teddybear,") == [5, 6]  # case, punctuation ignored
        mapper = editors.prompt_to_prompt(source, target).cross_mapping()[1]
        assert torch.equal(mapper[5, 5:7], torch.tensor([0.5, 0.5]))  # cat's map spread over teddybear's tokens
        assert mapper[6, 7] == 1.0  # "on" after the longer word
        full = tokenizer.tokenize_with_weights("a photo of a teddybear on a bench")
        for chunks in full.values():
            assert [t[0] for t in chunks[0][:len(target.ids)]] == list(target.ids)
    with pytest.raises(ValueError, match="could not be matched to its tokens"):
        prompts.tokenized_prompt_with(tokenizer.tokenize_with_weights, "a (red cat:1.2) on a bench")
    with pytest.raises(ValueError, match="does not fit the text encoder's window of 77 tokens"):
        prompts.tokenized_prompt_with(tokenizer.tokenize_with_weights, "cat " * 80)


@pytest.fixture(scope="module")
def node_classes(comfyui_path, pack):
    from comfyui_direct_inversion.nodes import editor_nodes

    return editor_nodes


def test_p2p_editor_node(node_classes, editors):
    clip = T.tiny_comfy_clip()
    node = node_classes.P2PEditorNode
    defaults = dict(mode="auto", cross_replace_steps=0.4, self_replace_steps=0.6, reweight_words="",
                    reweight_values="", blend_source_words="", blend_target_words="", blend_threshold=0.3,
                    blend_start=0.2)
    out = node.execute(clip, "a cat sitting on a bench", "a dog sitting on a bench", **defaults)
    editor, source, target = out.result
    assert editor.mode == "replace" and editor.source.words[1] == "cat"
    assert source[0][0].shape == (1, 77, T.CONTEXT_DIM) and not torch.equal(source[0][0], target[0][0])
    refine = node.execute(clip, "a cat sitting on a bench", "a fluffy cat sitting on a bench",
                          **{**defaults, "reweight_words": "fluffy", "reweight_values": "2",
                             "blend_target_words": "fluffy cat"}).result[0]
    assert refine.mode == "refine" and refine.reweight == (("fluffy", 2.0),)
    with pytest.raises(ValueError, match="replace needs prompts with the same number of words"):
        node.execute(clip, "a cat", "a fluffy cat", **{**defaults, "mode": "replace"})
    with pytest.raises(ValueError, match="one value per word"):
        node.execute(clip, "a cat", "a dog", **{**defaults, "reweight_words": "dog, a", "reweight_values": "2"})
    with pytest.raises(ValueError, match="'horse' is not a word of the prompt 'a dog'"):
        node.execute(clip, "a cat", "a dog", **{**defaults, "blend_target_words": "horse"})


def test_attention_maps_image(comfy_backend, editors, node_classes, model, conds, inverted):
    _, inversion = inverted
    editor = p2p(editors, "a cat on a bench", "a dog on a bench")
    with torch.inference_mode():
        out = comfy_backend.direct_inversion(model, inversion, conds["target"], conds["negative"], cfg=7.5,
                                             editor=editor)
    words = out.editor_state.word_maps("target")
    assert [w for w, _ in words] == ["a", "dog", "on", "a", "bench"]
    image = node_classes.maps_image(out.editor_state, tile=64)
    assert image.shape == (1, 64 + 18, 5 * 64, 3) and 0.0 <= image.min() and image.max() <= 1.0
    # each tile is its word's map scaled to its maximum: the brightest pixel of every tile is white
    for n in range(5):
        assert image[0, :64, n * 64:(n + 1) * 64].max() == 1.0
    assert node_classes.maps_image(None).shape[-1] == 3
