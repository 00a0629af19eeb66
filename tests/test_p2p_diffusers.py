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


def _probs(q, k, heads, scale):
    """softmax(q k^T * scale) per head, float64, written here: ``[b, heads, queries, keys]``."""
    split = lambda t: t.double().reshape(t.shape[0], t.shape[1], heads, -1).transpose(1, 2)  # noqa: E731
    return torch.softmax(split(q) @ split(k).transpose(-1, -2) * scale, dim=-1)


def _layer_output(attn, probs, v):
    """The attention layer's output from probabilities and values: heads merged, then ``attn.to_out``."""
    b, heads, n, _ = probs.shape
    vh = v.double().reshape(v.shape[0], v.shape[1], heads, -1).transpose(1, 2)
    merged = (probs @ vh).transpose(1, 2).reshape(b, n, -1)
    linear, dropout = attn.to_out
    assert isinstance(dropout, torch.nn.Dropout) and not attn.residual_connection
    weight, bias = linear.weight.detach().double(), linear.bias.detach().double()
    return torch.nn.functional.linear(merged, weight, bias) / attn.rescale_output_factor


def test_layer_outputs_recomputed_from_the_projections_the_layers_made(diffusers_backend, editors, edit_setup):
    """Every attention layer's output, recomputed here from the q, k, v its own projections computed (forward hooks
    on to_q / to_k / to_v and on the layer): the source's own attention; the target's unconditional half its own;
    its conditional half, inside the windows, the source's probabilities (cross-attention: through the word mapping,
    then reweighted) over the target's values, and its own attention after them."""
    unet = edit_setup["unet"]
    layers = diffusers_backend.attention_layers(unet)
    modules = {name: unet.get_submodule(name.rsplit(".", 1)[0]) for name in layers}
    calls = {}  # (layer, "q" / "k" / "v" / "out") -> one tensor per call of the layer, in call order
    handles = []
    for name, attn in modules.items():
        for which, module in (("q", attn.to_q), ("k", attn.to_k), ("v", attn.to_v), ("out", attn)):
            handles.append(module.register_forward_hook(
                lambda mod, args, out, key=(name, which): calls.setdefault(key, []).append(out.detach().clone())))
    cross_steps, self_steps = 5, 3  # int(0.5 * 10), int(0.3 * 10)
    editor = p2p(editors, "a cat on a bench", "a motorbike on a bench", cross_replace_steps=0.5,
                 self_replace_steps=0.3, reweight=[("motorbike", 2.0)])
    try:
        out = run(edit_setup, edit_setup["target"], editor)
    finally:
        for handle in handles:
            handle.remove()
    assert torch.equal(out.source, edit_setup["z0"])
    # the word mapping, written out: <start> a cat on a bench <end> -> <start> a motorbike(2 tokens) on a bench <end>;
    # "cat"'s map is split over motorbike's two tokens, whose attention the reweight then doubles
    mapper = torch.zeros(T.TOKENS, T.TOKENS, dtype=torch.float64)
    for src, tgt, weight in [(0, 0, 1), (1, 1, 1), (2, 2, 0.5), (2, 3, 0.5), (3, 4, 1), (4, 5, 1), (5, 6, 1), (6, 7, 1)]:
        mapper[src, tgt] = weight
    reweight = torch.tensor([1, 1, 2, 2, 1, 1, 1, 1], dtype=torch.float64)
    assert torch.equal(editor.cross_mapping()[1][:T.TOKENS, :T.TOKENS].double(), mapper)

    evaluated = STEPS - 1  # the last step has zero length: no prediction
    changes = {}  # (layer, step) -> how far the edit moved the conditional half's output
    for name, attn in modules.items():
        cross = layers[name].cross
        q, k, v, got = (calls[(name, which)] for which in ("q", "k", "v", "out"))
        assert len(got) == 2 * evaluated  # per step: the source (its conditional half alone), then the target
        for n in range(evaluated):
            (q_s, q_t), (k_s, k_t), (v_s, v_t) = (x[2 * n: 2 * n + 2] for x in (q, k, v))
            out_s, out_t = got[2 * n], got[2 * n + 1]
            assert q_s.shape[0] == 1 and q_t.shape[0] == 2  # the target batches [unconditional, conditional]
            if cross:
                assert k_s.shape[1] == T.TOKENS
            source_probs = _probs(q_s, k_s, attn.heads, attn.scale)
            torch.testing.assert_close(out_s.double(), _layer_output(attn, source_probs, v_s), rtol=0, atol=1e-5)
            own = _probs(q_t, k_t, attn.heads, attn.scale)
            edits = n < (cross_steps if cross else self_steps)
            if not edits:
                cond = own[1:]
            elif cross:
                cond = torch.einsum("bhpw,wn->bhpn", source_probs, mapper) * reweight
            else:
                cond = source_probs
            expected = _layer_output(attn, torch.cat([own[:1], cond]), v_t)
            torch.testing.assert_close(out_t.double(), expected, rtol=0, atol=1e-5)
            if edits:
                changes[(layers[name], n)] = (_layer_output(attn, own[1:], v_t[1:]) - expected[1:]).abs().max()
    # the edited calls (four layers of each kind in the tiny UNet) are told apart from unedited ones far beyond the
    # tolerance -- except the first self-attention layer at the first step, whose input the two branches share (z_T,
    # before any cross-attention has seen the prompts)
    assert sorted((layer.cross, layer.order, n) for layer, n in changes) == sorted(
        [(True, i, n) for i in range(4) for n in range(cross_steps)] +
        [(False, i, n) for i in range(4) for n in range(self_steps)])
    for (layer, n), change in changes.items():
        if layer.cross:
            assert change > 0.1, (layer.key, n)
        elif (layer.order, n) != (0, 0):
            assert change > 0.01, (layer.key, n)


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


def test_local_blend_before_any_map_leaves_the_target_alone(diffusers_backend, editors, edit_setup):
    """EDICT at 2 steps blends after its first step, before the source's maps exist: the target is kept as it is
    (this raised AttributeError once)."""
    inversion = T.invert_with(edit_setup, "edict", steps=2)
    editor = dataclasses.replace(p2p(editors, "a cat on a bench", "a dog on a bench", blend_source_words=["cat"],
                                     blend_target_words=["dog"]), record=True)
    out = T.diffusers_edit(edit_setup, edit_setup["target"], editor, inversion=inversion)
    assert torch.isfinite(out.edited).all()
    assert out.editor_state.blend_masks and all(bool((m == 1).all()) for _, m in out.editor_state.blend_masks)


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
