"""Editors on flow models (SD3/SD3.5, Flux) through the diffusers backend: Prompt-to-Prompt, MasaCtrl and
Plug-and-Play on the joint attention of the tiny random-weight transformers of ``flow_testing``.

Checked against what the ComfyUI backend edits with the same weights, and, without ComfyUI, against q/k/v and
attention outputs hooked independently of the editors' processors (forward hooks on SD3's projection linears, where
no RoPE applies, labelled with the prediction in progress, and pre-hooks on the output projections); identity edits,
every flow inversion method with every editor, SD3.5's image-only attention, and that the transformer's attention
processors are its own again after a run and after an error. Prompts are toy embeddings; P2P's token positions come
from a toy vocabulary (``encoders``: one text encoder whose window is the embeddings' ``TOKENS``).
"""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch

import flow_testing as F
from test_flow_inversion import STEPS as AGREE_STEPS
from test_flow_inversion import build, comfy_flow

STEPS = 6
KINDS = ("sd3", "flux")
TOKENS = F.TOKENS
ENCODER = {"sd3": ("l", 100), "flux": ("t5xxl", None)}  # tokenizer key, start token (T5 has none)
VOCAB = {"a": [1], "cat": [2], "dog": [3], "small": [4], "on": [7], "bench": [8], "motorbike": [9, 10]}
PROMPTS = ("a cat on a bench", "a dog on a bench")


def p2p_editor(editors, kind, source=PROMPTS[0], target=PROMPTS[1], **options):
    """A P2P editor over the toy vocabulary with the family's text encoder (window ``TOKENS``)."""
    key, start = ENCODER[kind]

    def tok(text):
        return editors.tokenize_words(text, lambda word: VOCAB[word], start, 101, max_len=TOKENS)

    src, tgt = tok(source), tok(target)
    settings = dict(cross_replace_steps=1.0, self_replace_steps=0.0)
    settings.update(options)
    return editors.prompt_to_prompt(src, tgt, max_tokens=TOKENS, encoders=((key, src, tgt, TOKENS),), **settings)


@pytest.fixture(scope="module", params=KINDS)
def setup(request, diffusers_backend):
    s = build(request.param)
    s["inversion"] = diffusers_backend.invert(s["model"], s["scheduler"], s["z0"], s["source"], s["null"],
                                              steps=STEPS, method="euler")
    return s


@pytest.fixture(scope="module")
def sd3(diffusers_backend):
    s = build("sd3")
    s["inversion"] = diffusers_backend.invert(s["model"], s["scheduler"], s["z0"], s["source"], s["null"],
                                              steps=STEPS, method="euler")
    return s


def run(d, s, editor, target=None, inversion=None, **kwargs):
    kwargs.setdefault("cfg", 1.0)
    return d.edit(s["model"], s["scheduler"], inversion or s["inversion"], s["target"] if target is None else target,
                  s["null"], editor=editor, **kwargs)


class SD3Hooks:
    """What SD3's attention layers compute at every call, independently of the editor's processors: the outputs of
    the projection linears (``to_q/k/v``: image stream; ``add_q/k/v_proj``: text stream) and the inputs of the output
    projections (``to_out[0]``: image stream; ``to_add_out``: text stream, absent in the last block), each call
    labelled with the prediction in progress (branch, level, chunks) read from a wrapper of
    ``DiffusersDenoiser._calling``."""

    NAMES = {"to_q": "q", "to_k": "k", "to_v": "v", "add_q_proj": "cq", "add_k_proj": "ck", "add_v_proj": "cv"}

    def __init__(self, d, model, monkeypatch):
        self.calls, self.label, self.current = [], None, {}
        calling = d.DiffusersDenoiser._calling

        def labelled(denoiser, branch, level, chunks):
            self.label = (branch, level, tuple(chunks))
            return calling(denoiser, branch, level, chunks)

        monkeypatch.setattr(d.DiffusersDenoiser, "_calling", labelled)
        self.handles = []
        for i, block in enumerate(model.transformer_blocks):
            for name in ("attn", "attn2"):
                attn = getattr(block, name, None)
                if attn is None:
                    continue
                place = (i, name)
                for linear, field in self.NAMES.items():
                    module = getattr(attn, linear, None)
                    if module is not None:
                        self.handles.append(module.register_forward_hook(self._projection(place, field)))
                self.handles.append(attn.to_out[0].register_forward_pre_hook(self._output(place, "out")))
                if getattr(attn, "to_add_out", None) is not None:
                    self.handles.append(attn.to_add_out.register_forward_pre_hook(self._output(place, "text_out")))

    def _projection(self, place, field):
        def hook(module, inputs, output):
            if field == "q":  # each attention call projects q first
                self.current[place] = {"label": self.label, "block": place[0], "name": place[1]}
                self.calls.append(self.current[place])
            self.current[place][field] = output.detach().clone()
        return hook

    def _output(self, place, field):
        def hook(module, inputs):
            self.current[place][field] = inputs[0].detach().clone()
        return hook

    def close(self):
        for handle in self.handles:
            handle.remove()

    def by_branch(self, branch, name="attn"):
        """A branch's calls of our sampler at one kind of attention, keyed (level, block)."""
        out = {}
        for c in self.calls:
            if c["label"] is not None and c["label"][0] == branch and c["name"] == name:
                key = (c["label"][1], c["block"])
                assert key not in out  # Euler: one prediction per level and branch
                out[key] = c
        return out


def joint_qkv(call, attn=None):
    """The call's q, k, v in [text, image] order (text: none for SD3.5's image-only attention), q/k normed as the
    layer norms them."""
    def normed(x, norm):
        if norm is None:
            return x
        b, n, _ = x.shape
        return norm(x.reshape(b, n, attn.heads, -1)).reshape(b, n, -1)

    q, k, v = call["q"], call["k"], call["v"]
    if attn is not None:
        q, k = normed(q, attn.norm_q), normed(k, attn.norm_k)
    if "cq" in call:
        cq, ck = call["cq"], call["ck"]
        if attn is not None:
            cq, ck = normed(cq, attn.norm_added_q), normed(ck, attn.norm_added_k)
        q, k, v = torch.cat([cq, q], 1), torch.cat([ck, k], 1), torch.cat([call["cv"], v], 1)
    return q, k, v


def split_heads(x, heads):
    b, n, d = x.shape
    return x.double().reshape(b, n, heads, d // heads).transpose(1, 2)


def merge_heads(x):
    return x.transpose(1, 2).flatten(2)


def probs(q, k, heads):
    qh, kh = split_heads(q, heads), split_heads(k, heads)
    return torch.softmax(qh @ kh.transpose(-1, -2) / math.sqrt(qh.shape[-1]), -1)


def attention(q, k, v, heads):
    return merge_heads(probs(q, k, heads) @ split_heads(v, heads))


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


# -- the processors compute what diffusers' processors compute ---------------------------------------------------------
@pytest.mark.parametrize("kind", ["sd3", "sd3.5", "flux"])
def test_taken_calls_compute_what_diffusers_computes(diffusers_backend, editors, kind):
    """Calls the controller takes but leaves as they are (MasaCtrl's source branch caches the image keys/values and
    attends) give the model's own guided prediction: the processors' projections, q/k norms, Flux's RoPE, token order
    and output projections (the last SD3 block's text too) are diffusers' own, at every attention layer."""
    d = diffusers_backend
    s = build("flux" if kind == "flux" else "sd3")
    if kind == "sd3.5":
        s["model"] = tiny_sd35()
    net = d.network(s["model"], s["scheduler"])
    conds = [net.prompt(s["null"]), net.prompt(s["source"])]
    z = s["z0"] + 0.5 * torch.randn(s["z0"].shape, generator=torch.Generator().manual_seed(5))
    sigma = torch.tensor(0.7)
    own = net.predict(z, sigma, conds)
    _, layers = d.joint_attention_layers(s["model"])
    with d.editor_installed(s["model"], editors.MasaCtrlEditor(start_step=0, start_layer=0), STEPS, z.shape) as state:
        state.branch, state.level, state.chunks = "source", STEPS, ("uncond", "cond")
        taken = net.predict(z, sigma, conds)
        assert {key for key, _ in state.controller.cache} == set(layers)
    assert rel(taken, own) < 1e-6
    assert rel(own, net.predict(z, sigma, conds[1:] * 2)) > 1e-4  # the halves differ: mixed-up rows would show


# -- the same edit as ComfyUI's ----------------------------------------------------------------------------------------
def agreement_editors(editors, kind, null):
    return {"p2p": p2p_editor(editors, kind, PROMPTS[0], "a motorbike on a bench", cross_replace_steps=0.6,
                              self_replace_steps=0.4),
            "masactrl": editors.MasaCtrlEditor(start_step=1, start_layer=0),
            "pnp": editors.PnPEditor(source_conditioning=null)}


@pytest.mark.parametrize("kind", KINDS)
def test_backends_give_the_same_edit(comfy_backend, diffusers_backend, editors, kind):
    """Same weights, the same inversion and the same editor through ComfyUI's patches and diffusers' processors: the
    edits agree to float tolerance for P2P, MasaCtrl and PnP, far within what each editor changes."""
    s = build(kind)
    model = comfy_flow(kind, s["model"])
    cfg, guidance = (4.5, None) if kind == "sd3" else (1.0, 3.0)
    conds = {name: F.comfy_flow_conditioning(*s[name], guidance=guidance) for name in ("source", "target", "null")}
    d = diffusers_backend
    with torch.inference_mode():
        latent = model.model.process_latent_out(s["z0"])
        inv_c = comfy_backend.invert(model, latent, conds["source"], conds["null"], steps=AGREE_STEPS,
                                     method="euler").inversion
    inv_d = d.invert(s["model"], s["scheduler"], s["z0"], s["source"], s["null"], steps=AGREE_STEPS, method="euler",
                     flux_guidance=guidance)
    free = d.edit(s["model"], s["scheduler"], inv_d, s["target"], s["null"], cfg=cfg, flux_guidance=guidance).edited
    # PnP's own source prompt as the PnP Editor node encodes it: without FluxGuidance (it takes the inversion's 3.0,
    # not ComfyUI's default 3.5, as the diffusers backend does)
    comfy_editors = agreement_editors(editors, kind, F.comfy_flow_conditioning(*s["null"]))
    for name, editor in agreement_editors(editors, kind, s["null"]).items():
        with torch.inference_mode():
            out_c = comfy_backend.direct_inversion(model, inv_c, conds["target"], conds["null"], cfg=cfg,
                                                   editor=comfy_editors[name])
        out_d = d.edit(s["model"], s["scheduler"], inv_d, s["target"], s["null"], cfg=cfg, editor=editor,
                       flux_guidance=guidance)
        edited_c = model.model.process_latent_in(out_c.edited)
        assert rel(edited_c, out_d.edited) < 1e-4, name
        # the backends' difference is small beside what the editor changes (measured: under 0.2 %)
        assert (edited_c - out_d.edited).norm() < 0.01 * (out_d.edited - free).norm(), name


# -- Prompt-to-Prompt --------------------------------------------------------------------------------------------------
def test_p2p_replace_text_block_is_the_mapped_source_block(diffusers_backend, editors, sd3, monkeypatch):
    """At full replace ("cat" -> "motorbike", two tokens: a word mapping that is not the identity), the target's
    image -> text probabilities at every joint layer and step are the source's mapped through the word mapping,
    recomputed from the hooked q/k; the image stream's attention output is exactly [mapped text block, own image
    block] over the target's values; the text stream's (first block) is the target's own attention."""
    d = diffusers_backend
    editor = dataclasses.replace(p2p_editor(editors, "sd3", PROMPTS[0], "a motorbike on a bench"), record=True)
    hooks = SD3Hooks(d, sd3["model"], monkeypatch)
    try:
        state = run(d, sd3, editor).editor_state
    finally:
        hooks.close()
    mapper = state.text.replace_mapper().double()
    assert not torch.equal(mapper, torch.eye(TOKENS, dtype=torch.float64))
    src, tgt = hooks.by_branch("source"), hooks.by_branch("target")
    assert src.keys() == tgt.keys() and len(tgt) == STEPS * 2
    heads, t = F.SD3_HEADS, TOKENS
    text_checked = 0
    for (level, block), t_call in tgt.items():
        q_s, k_s, _ = joint_qkv(src[(level, block)])
        q_t, k_t, v_t = joint_qkv(t_call)
        p_src, p_tgt = probs(q_s, k_s, heads), probs(q_t, k_t, heads)
        mapped = p_src[:, :, t:, :t] @ mapper
        assert not torch.allclose(mapped, p_tgt[:, :, t:, :t], atol=1e-4)  # the edit changes something
        records = sorted((r for r in state.records if r["layer"].index == block and r["step"] == STEPS - level),
                         key=lambda r: r["heads"].start)
        assert torch.allclose(torch.cat([r["text"] for r in records], 1).double(), mapped, atol=1e-6)
        expected = merge_heads(torch.cat([mapped, p_tgt[:, :, t:, t:]], -1) @ split_heads(v_t, heads))
        assert torch.allclose(t_call["out"].double(), expected, atol=1e-5)
        assert not torch.allclose(t_call["out"].double(), attention(q_t, k_t, v_t, heads)[:, t:], atol=1e-5)
        if "text_out" in t_call:
            assert torch.allclose(t_call["text_out"].double(), attention(q_t, k_t, v_t, heads)[:, :t], atol=1e-5)
            text_checked += 1
    assert text_checked == STEPS


def test_p2p_self_block_refine_and_reweight(diffusers_backend, editors, sd3, monkeypatch):
    """Self replace gives the source's image -> image block; refine (a word added) carries the aligned tokens'
    source probabilities and keeps the new word's own; reweight scales the word's column; all against the hooked
    q/k."""
    d = diffusers_backend
    editor = p2p_editor(editors, "sd3", target="a small cat on a bench", cross_replace_steps=0.5,
                        self_replace_steps=1.0, reweight=(("small", 2.0),))
    assert editor.mode == "refine"
    hooks = SD3Hooks(d, sd3["model"], monkeypatch)
    try:
        state = run(d, sd3, dataclasses.replace(editor, record=True)).editor_state
    finally:
        hooks.close()
    src, tgt = hooks.by_branch("source"), hooks.by_branch("target")
    text = state.text
    small = text.positions("target", ["small"])
    index, alphas = text.refine_mapper()
    assert all(alphas[p] == 0 for p in small)
    cross_steps, seen, t = int(0.5 * STEPS), set(), TOKENS
    assert len(state.records) >= STEPS * 2
    for r in state.records:
        key = (STEPS - r["step"], r["layer"].index)
        p_src = probs(*joint_qkv(src[key])[:2], F.SD3_HEADS)[:, r["heads"], t:]
        p_tgt = probs(*joint_qkv(tgt[key])[:2], F.SD3_HEADS)[:, r["heads"], t:]
        assert torch.allclose(r["image"].double(), p_src[..., t:], atol=1e-6)
        if r["step"] < cross_steps:
            expected = p_src[..., :t][..., index] * alphas.double() + p_tgt[..., :t] * (1 - alphas.double())
            expected[..., small] *= 2.0
        else:
            expected = p_tgt[..., :t]
        assert torch.allclose(r["text"].double(), expected, atol=1e-6)
        seen.add(r["step"] < cross_steps)
    assert seen == {True, False}


@pytest.mark.parametrize("how", ["mask", "words"])
def test_p2p_local_blend_keeps_the_source_outside(diffusers_backend, editors, setup, how):
    """Outside the blend region (a mask, or the words' maps from the image -> text block) the edited latent is the
    source branch's; inside it differs."""
    if how == "mask":
        mask = torch.zeros(1, 128, 128)
        mask[:, :, :64] = 1.0
        editor = p2p_editor(editors, setup["kind"], mask=mask, blend_start=0.0)
    else:
        editor = p2p_editor(editors, setup["kind"], blend_source_words=("cat",), blend_target_words=("dog",),
                            blend_threshold=0.9, blend_start=0.0)  # random weights: flat maps
    out = run(diffusers_backend, setup, dataclasses.replace(editor, record=True))
    state = out.editor_state
    assert len(state.blend_masks) == STEPS
    keep = (state.blend_masks[-1][1] == 0).expand_as(out.edited)
    assert 0 < keep.float().mean() < 1
    assert (out.edited - out.source)[keep].abs().max() <= 1e-6
    assert (out.edited - out.source)[~keep].abs().max() > 1e-4
    if how == "words":
        maps = dict(state.word_maps("target"))
        assert set(maps) == set(PROMPTS[1].split()) and maps["dog"].shape[-2:] == (8, 8)


# -- MasaCtrl ----------------------------------------------------------------------------------------------------------
def test_masactrl_attends_over_the_source_keys_and_values(diffusers_backend, editors, sd3, monkeypatch):
    """From start_step on, the target's image queries attend to its own text keys/values and the source's image
    keys/values (each half to the same half of the guided source), recomputed from the hooked projections; its text
    queries keep their own attention; before start_step the target attends to itself."""
    d = diffusers_backend
    hooks = SD3Hooks(d, sd3["model"], monkeypatch)
    try:
        run(d, sd3, editors.MasaCtrlEditor(start_step=2, start_layer=0), cfg=2.0)
    finally:
        hooks.close()
    src, heads, t = hooks.by_branch("source"), F.SD3_HEADS, TOKENS
    checked = {"edited": 0, "own": 0}
    for key, t_call in hooks.by_branch("target").items():
        s_call = src[key]
        assert t_call["label"][2] == s_call["label"][2] == ("uncond", "cond")
        q, k, v = joint_qkv(t_call)
        _, k_s, v_s = joint_qkv(s_call)
        edited = STEPS - key[0] >= 2
        keys = torch.cat([k[:, :t], k_s[:, t:]], 1) if edited else k
        values = torch.cat([v[:, :t], v_s[:, t:]], 1) if edited else v
        assert torch.allclose(t_call["out"].double(), attention(q[:, t:], keys, values, heads), atol=1e-5)
        if edited:
            assert not torch.allclose(t_call["out"].double(), attention(q, k, v, heads)[:, t:], atol=1e-5)
        if "text_out" in t_call:
            assert torch.allclose(t_call["text_out"].double(), attention(q, k, v, heads)[:, :t], atol=1e-5)
        checked["edited" if edited else "own"] += 1
    assert checked == {"edited": 2 * (STEPS - 2), "own": 2 * 2}


# -- Plug-and-Play -----------------------------------------------------------------------------------------------------
def test_pnp_injects_inside_its_window(diffusers_backend, editors, sd3, monkeypatch):
    """In SD3's PnP layers (the second half of the joint blocks: block 1 of 2) the target's image tokens attend with
    the source's image values during the first feature_injection steps and the source's image queries/keys during
    the first attention_injection steps (the unguided source's row for both target halves), recomputed from the
    hooked projections; the other block and later steps attend with their own."""
    d = diffusers_backend
    editor = editors.PnPEditor(feature_injection=0.5, attention_injection=0.34, source_conditioning=sd3["null"])
    hooks = SD3Hooks(d, sd3["model"], monkeypatch)
    try:
        run(d, sd3, editor, cfg=2.0)
    finally:
        hooks.close()
    src, heads, t = hooks.by_branch("source"), F.SD3_HEADS, TOKENS
    seen = set()
    for (level, block), t_call in hooks.by_branch("target").items():
        s_call, step = src[(level, block)], STEPS - level
        assert len(s_call["label"][2]) == 1 and len(t_call["label"][2]) == 2  # unguided source, guided target
        q, k, v = (x.clone() for x in joint_qkv(t_call))
        q_s, k_s, v_s = joint_qkv(s_call)
        injected = block == 1
        if injected and step < 2:  # int(0.34 * 6)
            q[:, t:], k[:, t:] = q_s[:, t:], k_s[:, t:]
        if injected and step < 3:  # int(0.5 * 6)
            v[:, t:] = v_s[:, t:]
        assert torch.allclose(t_call["out"].double(), attention(q, k, v, heads)[:, t:], atol=1e-5), (level, block)
        own = attention(*joint_qkv(t_call), heads)[:, t:]
        assert torch.allclose(t_call["out"].double(), own, atol=1e-5) == (not injected or step >= 3)
        seen.add((injected, step < 3))
    assert seen == {(True, True), (True, False), (False, True), (False, False)}


# -- every method with every editor, identity edits --------------------------------------------------------------------
def method_editors(editors, kind, source, target, null):
    return {"p2p": p2p_editor(editors, kind, source, target, self_replace_steps=0.6, cross_replace_steps=0.4),
            "masactrl": editors.MasaCtrlEditor(start_step=1, start_layer=0),
            "pnp": editors.PnPEditor(source_conditioning=null)}


@pytest.mark.parametrize("method", ["euler", "rf_solver", "negative_prompt", "null_text"])
def test_every_flow_method_with_every_editor(diffusers_backend, editors, setup, method):
    """Every inversion method of the family runs with every editor: the source branch reconstructs the image, the
    edit is finite and differs from the free edit; with the target prompt = the source prompt and offsets 'both'
    the edit reproduces the image exactly."""
    d, s = diffusers_backend, setup
    if s["kind"] == "flux" and method == "null_text":
        pytest.skip("null-text needs CFG; Flux is guidance-distilled")
    cfg = 1.0 if s["kind"] == "flux" else 3.0
    options = {"inner_steps": 2} if method == "null_text" else None
    inversion = d.invert(s["model"], s["scheduler"], s["z0"], s["source"], s["null"], steps=STEPS, method=method,
                         options=options)
    free = run(d, s, None, inversion=inversion, cfg=cfg).edited
    for name, editor in method_editors(editors, s["kind"], *PROMPTS, s["null"]).items():
        out = run(d, s, editor, inversion=inversion, cfg=cfg)
        assert torch.isfinite(out.edited).all(), name
        if method != "negative_prompt" or name != "pnp":  # PnP's source is the empty prompt's own reconstruction
            assert (out.source - s["z0"]).abs().max() <= 1e-4, name
        assert (out.edited - free).abs().max() > 1e-5, name
    identity = method_editors(editors, s["kind"], PROMPTS[0], PROMPTS[0], s["source"])  # PnP's source: the
    for name, editor in identity.items():  # source prompt, unguided: the target's prediction at cfg 1
        out = run(d, s, editor, target=s["source"], inversion=inversion, cfg=1.0 if name == "pnp" else cfg,
                  offsets="both")
        assert (out.edited - s["z0"]).abs().max() <= 1e-4, name


# -- processors restored, refusals -------------------------------------------------------------------------------------
def test_processors_are_the_models_own_after_a_run_and_an_error(diffusers_backend, editors, setup):
    """After a run, an error inside the run (a step callback that raises) and an error before it, the transformer
    has its own attention processors (the same objects) and a plain edit gives what it gave before."""
    d, s, model = diffusers_backend, setup, setup["model"]
    before = model.attn_processors
    plain = run(d, s, None).edited

    def unchanged():
        after = model.attn_processors
        assert after.keys() == before.keys() and all(after[name] is before[name] for name in before)
        assert torch.equal(run(d, s, None).edited, plain)

    masactrl = editors.MasaCtrlEditor(start_step=0, start_layer=0)
    assert rel(run(d, s, masactrl).edited, plain) > 1e-4
    unchanged()
    calls = {"n": 0}

    def stop_after_two(info):
        calls["n"] += 1
        if calls["n"] > 2:
            raise RuntimeError("stopped")

    with pytest.raises(RuntimeError, match="stopped"):
        run(d, s, masactrl, callback=stop_after_two)
    unchanged()
    # the prompts aligned over 7 tokens
    with pytest.raises(ValueError, match="has 8 text tokens, which no combination"):
        editor = p2p_editor(editors, s["kind"])
        run(d, s, dataclasses.replace(editor, encoders=tuple((k, a, b, 7) for k, a, b, _ in editor.encoders)))
    unchanged()


def test_editors_refused_with_clear_errors(diffusers_backend, editors, setup):
    """Editors without a joint-attention version, P2P without per-encoder positions, and attention processors
    other than diffusers' defaults are refused before the run."""
    d, s = diffusers_backend, setup
    with pytest.raises(ValueError, match="does not work on SD3/Flux's joint attention"):
        run(d, s, editors.P2PZeroEditor(source_conditioning=s["source"]))
    with pytest.raises(ValueError, match="token positions per text encoder"):
        run(d, s, dataclasses.replace(p2p_editor(editors, s["kind"]), encoders=()))
    model = s["model"]
    before = model.attn_processors
    name = next(iter(before))

    class Custom:
        def __call__(self, *args, **kwargs):
            return before[name](*args, **kwargs)

    model.set_attn_processor({key: Custom() if key == name else p for key, p in before.items()})
    try:
        with pytest.raises(ValueError, match=f"{name} has Custom"):
            run(d, s, editors.MasaCtrlEditor())
    finally:
        model.set_attn_processor(dict(before))


def test_flux_fused_projections(diffusers_backend, editors):
    """Flux with fused q/k/v projections edits as with separate ones; SD3's fused processor is refused."""
    d = diffusers_backend
    s = build("flux")
    inversion = d.invert(s["model"], s["scheduler"], s["z0"], s["source"], steps=4, method="euler")
    editor = editors.MasaCtrlEditor(start_step=0, start_layer=0)
    separate = run(d, s, editor, inversion=inversion).edited
    s["model"].fuse_qkv_projections()
    assert all(getattr(m, "fused_projections", False) for m in s["model"].modules() if hasattr(m, "to_qkv"))
    fused = run(d, s, editor, inversion=inversion).edited
    assert rel(fused, separate) < 1e-5 and rel(fused, run(d, s, None, inversion=inversion).edited) > 1e-4
    s = build("sd3")
    inversion = d.invert(s["model"], s["scheduler"], s["z0"], s["source"], steps=2, method="euler")
    s["model"].fuse_qkv_projections()
    with pytest.raises(ValueError, match="FusedJointAttnProcessor2_0.*unfuse_qkv_projections"):
        run(d, s, editor, inversion=inversion)


# -- SD3.5: the image-only attention -----------------------------------------------------------------------------------
def tiny_sd35():
    """The tiny SD3 with SD3.5's RMS-normed queries/keys and a second, image-only attention in joint block 0."""
    from diffusers import SD3Transformer2DModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = SD3Transformer2DModel(
            sample_size=2 * F.SD3_POS_EMBED_MAX_SIZE, patch_size=2, in_channels=F.LATENT_CHANNELS,
            out_channels=F.LATENT_CHANNELS, num_layers=F.SD3_HEADS, attention_head_dim=F.SD3_HEAD_DIM,
            num_attention_heads=F.SD3_HEADS, joint_attention_dim=F.SD3_CONTEXT_DIM,
            caption_projection_dim=F.SD3_HEADS * F.SD3_HEAD_DIM, pooled_projection_dim=F.SD3_POOLED_DIM,
            pos_embed_max_size=F.SD3_POS_EMBED_MAX_SIZE, qk_norm="rms_norm", dual_attention_layers=(0,))
    return F._scaled_output(model, F.OUT_SCALE)


def test_sd35_image_attention_is_edited(diffusers_backend, editors, monkeypatch):
    """On SD3.5's layout every editor runs; P2P's self replace gives the image-only attention the source's
    probabilities and MasaCtrl gives it the source's keys and values, both recomputed from the hooked, RMS-normed
    projections; PnP (joint blocks only) edits too."""
    d = diffusers_backend
    s = build("sd3")
    s["model"] = model = tiny_sd35()
    family, layers = d.joint_attention_layers(model)
    assert family == "sd3" and [(layer.kind, layer.index, layer.order) for layer in layers.values()] == [
        ("double", 0, 0), ("image", 0, 0), ("double", 1, 1)]
    s["inversion"] = d.invert(model, s["scheduler"], s["z0"], s["source"], s["null"], steps=STEPS, method="euler")
    free = run(d, s, None).edited
    attn2, heads, checked = model.transformer_blocks[0].attn2, F.SD3_HEADS, 0

    p2p = p2p_editor(editors, "sd3", cross_replace_steps=0.5, self_replace_steps=0.5)
    p2p = dataclasses.replace(p2p, record=True)
    hooks = SD3Hooks(d, model, monkeypatch)
    try:
        out = run(d, s, p2p)
    finally:
        hooks.close()
    src = hooks.by_branch("source", "attn2")
    for r in out.editor_state.records:
        if r["layer"].kind == "image":
            q, k, _ = joint_qkv(src[(STEPS - r["step"], 0)], attn2)
            assert torch.allclose(r["image"].double(), probs(q, k, heads)[:, r["heads"]], atol=1e-6)
            checked += 1
    assert checked == int(0.5 * STEPS) and rel(out.edited, free) > 1e-5

    hooks = SD3Hooks(d, model, monkeypatch)
    try:
        out = run(d, s, editors.MasaCtrlEditor(start_step=1, start_layer=0))
    finally:
        hooks.close()
    src, checked = hooks.by_branch("source", "attn2"), 0
    for key, t_call in hooks.by_branch("target", "attn2").items():
        q, k, v = joint_qkv(t_call, attn2)
        _, k_s, v_s = joint_qkv(src[key], attn2)
        edited = STEPS - key[0] >= 1
        expected = attention(q, k_s, v_s, heads) if edited else attention(q, k, v, heads)
        assert torch.allclose(t_call["out"].double(), expected, atol=1e-5)
        checked += edited
    assert checked == STEPS - 1 and rel(out.edited, free) > 1e-5

    out = run(d, s, editors.PnPEditor(source_conditioning=s["null"]))
    assert torch.isfinite(out.edited).all() and rel(out.edited, free) > 1e-5
