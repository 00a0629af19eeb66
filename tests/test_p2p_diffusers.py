"""Prompt-to-Prompt through the diffusers adapter (attention processors): the issue's tests 1-4, 6 and 7.

Prompts are tokenised with a toy word-piece vocabulary (positions are what P2P needs; the embeddings are the toy
prompt embeddings of ``di_testing``, ``TOKENS`` tokens long, so prompts here have at most that many tokens).
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

import di_testing as T

VOCAB = {"a": [1], "cat": [2], "dog": [3], "fluffy": [4, 5], "sitting": [6], "on": [7], "bench": [8],
         "motorbike": [9, 10]}
STEPS = T.EDIT_STEPS
run = T.diffusers_edit


def tok(editors, text):
    return editors.tokenize_words(text, lambda word: VOCAB[word], 100, 101, max_len=T.TOKENS)


def p2p(editors, source, target, **options):
    return editors.prompt_to_prompt(tok(editors, source), tok(editors, target), max_tokens=T.TOKENS, **options)


def mse(a, b):
    return ((a - b) ** 2).mean().item()


def test_identity_edit_with_full_replacement_is_closer_to_the_source(diffusers_backend, editors, edit_setup):
    editor = p2p(editors, "a cat sitting on a bench", "a cat sitting on a bench", cross_replace_steps=1.0,
                 self_replace_steps=1.0)
    # Guidance 3: the target branch drifts from the image on its own (DDIM inverted at guidance 1) and the source's
    # attention pulls it back. P2P edits the conditional half only, as the reference does; in this toy UNet whose
    # attention is a small part of the network, at guidance 7.5 the amplified mismatch between the edited
    # conditional and the unedited unconditional half outweighs that pull (measured: 0.0649 -> 0.0662), so the
    # test reads the editor's effect at a guidance where it is not drowned.
    plain = run(edit_setup, edit_setup["source"], cfg=3.0)
    edited = run(edit_setup, edit_setup["source"], editor, cfg=3.0)
    assert torch.equal(edited.source, edit_setup["z0"])  # Direct Inversion: the reconstruction is exact
    assert mse(edited.edited, edit_setup["z0"]) < 0.98 * mse(plain.edited, edit_setup["z0"])


def test_replace_target_cross_attention_is_the_mapped_source_attention(diffusers_backend, editors, edit_setup):
    # "motorbike" is two tokens for one: the mapper spreads "cat"'s map over both and shifts the rest
    editor = dataclasses.replace(p2p(editors, "a cat on a bench", "a motorbike on a bench", cross_replace_steps=1.0,
                                     self_replace_steps=1.0), record=True)
    out = run(edit_setup, edit_setup["target"], editor)
    records = out.editor_state.records
    mapper = editor.cross_mapping()[1][:T.TOKENS, :T.TOKENS]
    assert not torch.equal(mapper, torch.eye(T.TOKENS))
    source = {(r["step"], r["layer"].key): r["probs"] for r in records if r["branch"] == "source"}
    target = {(r["step"], r["layer"].key): r["probs"] for r in records if r["branch"] == "target"}
    cross_layers = [layer for layer in diffusers_backend.attention_layers(edit_setup["unet"]).values() if layer.cross]
    assert set(target) == {(n, layer.key) for n in range(STEPS - 1) for layer in cross_layers}  # last step: no eval
    for key, probs in target.items():
        expected = torch.einsum("bhpw,wn->bhpn", source[key], mapper)
        torch.testing.assert_close(probs, expected, rtol=0, atol=1e-6)
        # the word swap itself: both motorbike tokens carry cat's map, split in two
        torch.testing.assert_close(probs[..., 2], source[key][..., 2] / 2, rtol=0, atol=1e-6)


def test_reweight_one_is_a_no_op_and_zero_removes_the_word(diffusers_backend, editors, edit_setup):
    base = p2p(editors, "a cat on a bench", "a dog on a bench", cross_replace_steps=1.0, self_replace_steps=0.5)
    ones = p2p(editors, "a cat on a bench", "a dog on a bench", cross_replace_steps=1.0, self_replace_steps=0.5,
               reweight=[("dog", 1.0)])
    zero = dataclasses.replace(p2p(editors, "a cat on a bench", "a dog on a bench", cross_replace_steps=1.0,
                                   self_replace_steps=0.5, reweight=[("dog", 0.0)]), record=True)
    out_base, out_ones = run(edit_setup, edit_setup["target"], base), run(edit_setup, edit_setup["target"], ones)
    assert torch.equal(out_ones.edited, out_base.edited)
    out_zero = run(edit_setup, edit_setup["target"], zero)
    target = [r["probs"] for r in out_zero.editor_state.records if r["branch"] == "target"]
    assert target and all(torch.all(p[..., 2] == 0) for p in target)  # "dog" is token 2
    assert all(p[..., 1].abs().sum() > 0 for p in target)
    assert mse(out_zero.edited, out_base.edited) > 1e-6


def _trajectory(edit_setup, editor, **kw):
    steps = []
    out = run(edit_setup, edit_setup["target"], editor, callback=lambda info: steps.append(
        (info["i"], info["x_source"].clone(), info["x_target"].clone())), **kw)
    return out, steps


def test_local_blend_keeps_the_source_outside_the_mask(diffusers_backend, editors, edit_setup):
    mask = torch.zeros(1, 16, 16)
    mask[:, 4:12, 2:9] = 1.0
    editor = p2p(editors, "a cat on a bench", "a dog on a bench", blend_start=0.3, mask=mask)
    out, steps = _trajectory(edit_setup, editor)
    start = int(0.3 * STEPS)
    outside = mask[:, None].expand_as(edit_setup["z0"]) == 0
    for i, x_src, x_tgt in steps:
        if i >= start:
            assert torch.equal(x_tgt[outside], x_src[outside]), i
        elif i == 0:
            assert not torch.equal(x_tgt[outside], x_src[outside])
    assert not torch.equal(out.edited[~outside], out.source[~outside])  # inside, the edit acts


def test_local_blend_with_words_keeps_the_source_outside_their_attention(diffusers_backend, editors, edit_setup):
    # a random UNet's cross-attention is nearly uniform over the image (each word's normalised map lies in
    # [0.75, 1]), so the reference threshold 0.3 selects everything; 0.9 selects a part
    editor = dataclasses.replace(p2p(editors, "a cat on a bench", "a dog on a bench", blend_source_words=["cat"],
                                     blend_target_words=["dog"], blend_threshold=0.9), record=True)
    out, steps = _trajectory(edit_setup, editor)
    masks = dict(out.editor_state.blend_masks)
    assert sorted(masks) == list(range(int(0.2 * STEPS), STEPS))
    for i, x_src, x_tgt in steps:
        if i in masks:
            outside = masks[i].expand_as(x_tgt) == 0
            assert 0 < outside.sum() < outside.numel(), "the blend region should be part of the image"
            assert torch.equal(x_tgt[outside], x_src[outside]), i
    with pytest.raises(ValueError, match="'horse' is not a word of the prompt 'a dog on a bench'"):
        p2p(editors, "a cat on a bench", "a dog on a bench", blend_target_words=["horse"])


def test_clear_errors(editors):
    with pytest.raises(ValueError, match="replace needs prompts with the same number of words.*use refine"):
        p2p(editors, "a cat on bench", "a fluffy cat on bench", mode="replace")
    assert p2p(editors, "a cat on bench", "a fluffy cat on bench").mode == "refine"
    assert p2p(editors, "a cat on a bench", "a dog on a bench").mode == "replace"
    with pytest.raises(ValueError, match="'horse' is not a word of the prompt"):
        p2p(editors, "a cat", "a dog", reweight=[("horse", 2.0)])
    with pytest.raises(ValueError, match="either blend words or a mask"):
        p2p(editors, "a cat", "a dog", blend_target_words=["dog"], mask=torch.ones(4, 4))


@pytest.mark.parametrize("method", ["ddim", "null_text", "negative_prompt", "edict"])
def test_every_inversion_method_with_p2p(diffusers_backend, editors, edit_setup, method):
    s = edit_setup
    inversion = T.invert_with(s, method)
    editor = p2p(editors, "a cat on bench", "a fluffy cat on bench", blend_target_words=["fluffy cat"])
    assert editor.mode == "refine"
    plain = run(s, s["target"], inversion=inversion)
    out = run(s, s["target"], editor, inversion=inversion)
    assert torch.isfinite(out.edited).all()
    if method == "edict":
        torch.testing.assert_close(out.source.float(), s["z0"], rtol=0, atol=1e-4)  # exact up to float32 UNet
    else:
        assert torch.equal(out.source, s["z0"])
    assert mse(out.edited, plain.edited) > 1e-8  # the editor acted
    assert all(type(p).__name__ != "_EditorProcessor" for p in s["unet"].attn_processors.values())


class SampleCounter:
    def __init__(self, unet):
        self.samples = []
        self.handle = unet.register_forward_pre_hook(lambda module, args, kwargs: self.samples.append(args[0].shape[0]),
                                                     with_kwargs=True)


def test_at_most_three_unet_samples_per_edit_step(diffusers_backend, editors, edit_setup):
    editor = p2p(editors, "a cat on a bench", "a dog on a bench", blend_target_words=["dog"])
    counter = SampleCounter(edit_setup["unet"])
    try:
        out = run(edit_setup, edit_setup["target"], editor)
    finally:
        counter.handle.remove()
    evaluated_steps = STEPS - 1  # the last DDIM step is zero-length
    assert sum(counter.samples) == 3 * evaluated_steps
    assert out.offsets is None  # the source's guided prediction (and so its offset) is never computed
    assert torch.equal(out.source, edit_setup["z0"])
    counter = SampleCounter(edit_setup["unet"])
    try:
        run(edit_setup, edit_setup["target"], editor, offsets="both")  # the target needs the guided offsets
    finally:
        counter.handle.remove()
    assert sum(counter.samples) == 4 * evaluated_steps


def test_processors_come_back_after_an_error(diffusers_backend, editors, edit_setup):
    before = dict(edit_setup["unet"].attn_processors)
    editor = p2p(editors, "a cat on a bench", "a dog on a bench", mask=torch.ones(3, 16, 16))  # wrong batch

    with pytest.raises(ValueError, match="mask has batch 3"):
        run(edit_setup, edit_setup["target"], editor)
    assert edit_setup["unet"].attn_processors == before
