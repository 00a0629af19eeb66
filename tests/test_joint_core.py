"""The joint-attention editors' core (editors/joint.py) on synthetic calls: source/target pairing when a prediction's
halves are batched for one evaluation and split for another, PnP's caches dropped after its windows, the text
layout of several encoders (and its ambiguity), and P2P's per-encoder prompts from a ComfyUI-like CLIP."""
from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def joint(pack):
    from comfyui_direct_inversion.editors import joint

    return joint


@pytest.fixture(scope="module")
def editors(pack):
    from comfyui_direct_inversion import editors

    return editors


def _layers(joint):
    return joint.joint_layers([(("double", 0), "double", 0), (("single", 0), "single", 0)])


def _qkv(seed, batch, tokens=12, width=8):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, tokens, width, generator=g) for _ in range(3)]


def _attend(q, k, v):
    heads = 2
    split = lambda x: x.reshape(x.shape[0], x.shape[1], heads, -1).transpose(1, 2)  # noqa: E731
    out = torch.nn.functional.scaled_dot_product_attention(split(q), split(k), split(v))
    return out.transpose(1, 2).reshape(q.shape[0], q.shape[1], -1)


def test_evaluations_pair_up_when_halves_are_batched_once_and_split_once(joint, editors):
    """RF-Solver evaluates twice per step. If ComfyUI runs one evaluation's halves in one call and the other's in two
    (memory), the target's i-th evaluation still reads the source's i-th keys and values, per half."""
    layers = _layers(joint)
    controller = joint.JointMasaCtrl(editors.MasaCtrlEditor(start_step=0, start_layer=0), layers, 4, (1, 16, 4, 4),
                                     "flux")
    layer, text, level = layers[0], 4, 4
    call = lambda branch, chunks: joint.JointCall(layer=layer, heads=2, branch=branch, level=level,  # noqa: E731
                                                  chunks=chunks, text=text)
    first = _qkv(1, 2)   # source, evaluation 1: [uncond, cond] in one call
    second = _qkv(2, 2)  # source, evaluation 2: split into a cond call and an uncond call
    controller.attention(*first, call("source", ("uncond", "cond")), _attend)
    controller.attention(*(x[1:] for x in second), call("source", ("cond",)), _attend)
    controller.attention(*(x[:1] for x in second), call("source", ("uncond",)), _attend)
    q, k, v = _qkv(3, 2)
    out = controller.attention(q, k, v, call("target", ("uncond", "cond")), _attend)
    for row in range(2):  # evaluation 1: the source's first call's keys
        keys = torch.cat([k[row:row + 1, :text], first[1][row:row + 1, text:]], 1)
        values = torch.cat([v[row:row + 1, :text], first[2][row:row + 1, text:]], 1)
        assert torch.allclose(out[row:row + 1, text:], _attend(q[row:row + 1, text:], keys, values), atol=1e-6)
    out = controller.attention(q[1:], k[1:], v[1:], call("target", ("cond",)), _attend)  # evaluation 2, cond half
    keys = torch.cat([k[1:, :text], second[1][1:, text:]], 1)
    values = torch.cat([v[1:, :text], second[2][1:, text:]], 1)
    assert torch.allclose(out[:, text:], _attend(q[1:, text:], keys, values), atol=1e-6)


def test_pnp_drops_the_source_tensors_after_its_windows(joint, editors):
    layers = _layers(joint)
    controller = joint.JointPnP(editors.PnPEditor(feature_injection=0.5, attention_injection=0.25), layers, 4,
                                (1, 16, 4, 4), "flux")
    single = layers[1]
    for level in (4, 3):  # steps 0 and 1: inside the feature window
        call = joint.JointCall(layer=single, heads=2, branch="source", level=level, chunks=("cond",), text=4)
        assert controller.wants(call)
        controller.attention(*_qkv(level, 1), call, _attend)
        assert controller.cache
    late = joint.JointCall(layer=single, heads=2, branch="source", level=2, chunks=("cond",), text=4)
    assert not controller.wants(late) and not controller.cache


def test_text_layout_of_several_encoders(joint, editors):
    """SD3's text tokens are CLIP's window, then T5's: the word mapping, equalizer and word positions are per segment
    (T5 without a start token); a token count two encoder combinations could make is refused."""
    vocab = {"a": [1], "cat": [2], "dog": [3], "big": [4], "on": [5], "mat": [6]}
    clip = lambda t: editors.tokenize_words(t, vocab.__getitem__, 100, 101, max_len=8)  # noqa: E731
    t5 = lambda t: editors.tokenize_words(t, lambda w: [10, vocab[w][0]] if w == "cat" else vocab[w], None, 1,  # noqa: E731
                                          max_len=9)
    src, tgt = "a cat on a mat", "a dog on a mat"
    encoders = [("l", clip(src), clip(tgt), 8), ("g", clip(src), clip(tgt), 8), ("t5xxl", t5(src), t5(tgt), 9)]
    text = joint.joint_text("sd3", encoders, 17)
    assert [offset for offset, *_ in text.segments] == [0, 8]
    assert text.positions("source", ["cat"]) == [2, 9, 10] and text.positions("target", ["dog"]) == [2, 9]
    mapper = text.replace_mapper()
    assert mapper.shape == (17, 17) and torch.equal(mapper[:8, :8], torch.eye(8))
    assert mapper[9, 9] == 1.0 and mapper[10, 9] == 1.0 and mapper[8, 8] == 1.0  # 'cat' (2 T5 tokens) -> 'dog' (1)
    scale = text.equalizer((("dog", 2.0),))
    assert scale[2] == 2.0 and scale[9] == 2.0 and scale.sum() == 17 + 2
    assert joint.joint_text("sd3", encoders, 8).segments[0][0] == 0  # CLIP alone
    with pytest.raises(ValueError, match="could come from several"):
        joint.joint_text("sd3", [("l", clip(src), clip(tgt), 8), ("t5xxl", t5(src), t5(tgt), 8)], 8)
    with pytest.raises(ValueError, match="no combination"):
        joint.joint_text("flux", encoders, 17)


def test_p2p_prompts_of_the_encoders_a_clip_has(pack, editors):
    """ComfyUI's SD3 tokenizer tokenises for CLIP-L, CLIP-G and T5 whatever is loaded: only the loaded encoders'
    positions are kept; prompts with different T5 lengths are refused."""
    from types import SimpleNamespace

    from comfyui_direct_inversion.adapters.comfyui_prompts import EncodablePrompt, encoder_prompts

    vocab = {"a": [1], "cat": [2], "dog": [3]}
    tok = lambda t, n: editors.tokenize_words(t, vocab.__getitem__, None, 1, max_len=n)  # noqa: E731

    def prompt(text, t5_window):
        encoders = {"l": (tok(text, 77), 77), "g": (tok(text, 77), 77), "t5xxl": (tok(text, t5_window), t5_window)}
        return EncodablePrompt(prompt=encoders["l"][0], tokens={}, window=77, encoders=encoders)

    clip_only = SimpleNamespace(cond_stage_model=SimpleNamespace(clip_l=object(), clip_g=object(), t5xxl=None))
    t5_only = SimpleNamespace(cond_stage_model=SimpleNamespace(clip_l=None, clip_g=None, t5xxl=object()))
    assert [e[0] for e in encoder_prompts(clip_only, prompt("a cat", 77), prompt("a dog", 77))] == ["l", "g"]
    assert [e[0] for e in encoder_prompts(t5_only, prompt("a cat", 77), prompt("a dog", 77))] == ["t5xxl"]
    with pytest.raises(ValueError, match="makes 77 and the target prompt 80 tokens of the t5xxl"):
        encoder_prompts(t5_only, prompt("a cat", 77), prompt("a dog", 80))
