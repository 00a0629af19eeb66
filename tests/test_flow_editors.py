"""Editors on flow models (SD3/SD3.5, Flux) through ComfyUI: Prompt-to-Prompt, MasaCtrl and Plug-and-Play on the
joint attention of the tiny random-weight MM-DiTs of ``flow_testing``, checked against q/k/v and attention outputs
hooked independently of the editors (a test attention override that the editors chain, and forward pre-hooks on
the blocks' output projections), identity edits, every flow inversion method with every editor, and that nothing
stays patched after a run, an error or a cancel."""
from __future__ import annotations

import math

import pytest
import torch

import flow_testing as F
from test_flow_inversion import build, comfy_flow, flow_latent

STEPS = 6
KINDS = ("sd3", "flux")
PROMPTS = ("a cat sitting on a bench", "a dog sitting on a bench")


@pytest.fixture(scope="module", params=KINDS)
def setup(request, comfy_backend):
    kind = request.param
    s = build(kind)
    model = comfy_flow(kind, s["model"])
    clip = F.tiny_comfy_sd3_clip() if kind == "sd3" else F.tiny_comfy_flux_clip()
    return {"kind": kind, "model": model, "clip": clip}


def encode(clip, text: str, guidance=None) -> list:
    cond = clip.encode_from_tokens_scheduled(clip.tokenize(text))
    if guidance is not None:
        cond = [[c, dict(o, guidance=guidance)] for c, o in cond]
    return cond


def p2p_editor(clip, source=PROMPTS[0], target=PROMPTS[1], **kwargs):
    from comfyui_direct_inversion.nodes.editor_nodes import P2PEditorNode

    settings = dict(mode="auto", cross_replace_steps=1.0, self_replace_steps=0.0, reweight_words="", reweight_values="",
                    blend_source_words="", blend_target_words="", blend_threshold=0.3, blend_start=0.0)
    settings.update(kwargs)
    return P2PEditorNode.execute(clip, source, target, **settings).result


def invert(comfy_backend, setup, method="euler", source=PROMPTS[0], steps=STEPS):
    model, clip = setup["model"], setup["clip"]
    latent = model.model.process_latent_out(flow_latent())
    options = {"inner_steps": 2} if method == "null_text" else None
    return latent, comfy_backend.invert(model, latent, encode(clip, source), encode(clip, ""), steps=steps,
                                        method=method, options=options).inversion


class Hooks:
    """What the backend's attention computes at every call of our sampler (a test override the editor chains: it
    sees q/k/v as ComfyUI's attention gets them) and what the image stream's output projection receives."""

    def __init__(self, model):
        from comfyui_direct_inversion.adapters.comfyui_editors import BLOCK_OPTION
        from comfyui_direct_inversion.adapters.comfyui_sampling import BRANCH_OPTION, LEVEL_OPTION

        self.calls, self.outputs = [], []
        keys = (BLOCK_OPTION, BRANCH_OPTION, LEVEL_OPTION)

        def override(func, *args, **kwargs):
            options = kwargs.get("transformer_options") or {}
            q, k, v = args[:3]
            flat = [x.transpose(1, 2).reshape(x.shape[0], x.shape[2], -1) if kwargs.get("skip_reshape")
                    else x.reshape(x.shape[0], x.shape[1], -1) for x in (q, k, v)]
            heads = args[3] if len(args) > 3 else kwargs["heads"]
            block, branch, level = (options.get(key) for key in keys)
            self.calls.append({"block": block, "branch": branch, "level": level, "heads": heads,
                               "chunks": tuple(options.get("cond_or_uncond", [0])), "q": flat[0].clone(),
                               "k": flat[1].clone(), "v": flat[2].clone()})
            return func(*args, **kwargs)

        self.clone = model.clone()
        options = dict(self.clone.model_options.get("transformer_options", {}))
        options["optimized_attention_override"] = override
        self.clone.model_options["transformer_options"] = options
        net = model.model.diffusion_model
        projections = ([b.x_block.attn.proj for b in net.joint_blocks] if hasattr(net, "joint_blocks")
                       else [b.img_attn.proj for b in net.double_blocks])
        self.handles = [p.register_forward_pre_hook(self._output_hook(i)) for i, p in enumerate(projections)]

    def _output_hook(self, index):
        def hook(module, inputs):
            self.outputs.append((index, len(self.calls), inputs[0].detach().clone()))
        return hook

    def close(self):
        for handle in self.handles:
            handle.remove()

    def joint(self, branch):
        """Joint-attention calls (double and single blocks) of a branch, keyed (level, kind, index)."""
        return {(c["level"], c["block"][0], c["block"][1]): c for c in self.calls
                if c["branch"] == branch and c["block"] is not None
                and c["q"].shape[1] == c["block"][2] + c["block"][3]}

    def output_after(self, call_position: int):
        """The image stream's attention output that follows the call at ``call_position``."""
        for index, position, out in self.outputs:
            if position > call_position:
                return out
        raise AssertionError("no output projection after that call")


def split_heads(x, heads):
    b, n, d = x.shape
    return x.double().reshape(b, n, heads, d // heads).transpose(1, 2)


def probs(q, k, heads):
    qh, kh = split_heads(q, heads), split_heads(k, heads)
    return torch.softmax(qh @ kh.transpose(-1, -2) / math.sqrt(qh.shape[-1]), -1)


def run_edit(comfy_backend, setup, inversion, editor, target, hooks=None, offsets="auto", cfg=1.0, guidance=None):
    model = hooks.clone if hooks is not None else setup["model"]
    negative = encode(setup["clip"], "")
    with torch.inference_mode():
        return comfy_backend.direct_inversion(model, inversion, target, negative, cfg=cfg, offsets=offsets,
                                              editor=editor)


# -- Prompt-to-Prompt -----------------------------------------------------------------------------------------------
def test_p2p_replace_takes_the_source_text_block(comfy_backend, setup):
    """At full replace the target's image -> text probabilities are the source's (cat -> dog: one token each, so the
    word mapping is the identity) at every joint layer and step, recomputed from the hooked q/k/v; its image ->
    image block stays its own; the attention output the image stream receives is exactly that mix over the
    target's values; text queries keep their own attention."""
    editor, source, target = p2p_editor(setup["clip"])
    editor = editor.__class__(**{**editor.__dict__, "record": True})
    with torch.inference_mode():
        _, inversion = invert(comfy_backend, setup)
    hooks = Hooks(setup["model"])
    try:
        state = run_edit(comfy_backend, setup, inversion, editor, target, hooks).editor_state
    finally:
        hooks.close()
    src, tgt = hooks.joint("source"), hooks.joint("target")
    assert src.keys() == tgt.keys() and len(tgt) == STEPS * (2 if setup["kind"] == "sd3" else 2)
    positions = {id(c): i for i, c in enumerate(hooks.calls)}
    checked_outputs = 0
    for key, t_call in tgt.items():
        s_call, heads, t = src[key], t_call["heads"], t_call["block"][2]
        p_src, p_tgt = probs(s_call["q"], s_call["k"], heads), probs(t_call["q"], t_call["k"], heads)
        mixed = torch.cat([p_src[:, :, t:, :t], p_tgt[:, :, t:, t:]], -1)
        expected = (mixed @ split_heads(t_call["v"], heads)).transpose(1, 2).flatten(2)
        assert not torch.allclose(p_src[:, :, t:, :t], p_tgt[:, :, t:, :t], atol=1e-6)  # the edit changes something
        records = [r for r in state.records if r["layer"].key == key[1:] and r["step"] == STEPS - key[0]]
        text = torch.cat([r["text"] for r in sorted(records, key=lambda r: r["heads"].start)], 1)
        assert torch.allclose(text.double(), p_src[:, :, t:, :t], atol=1e-5)
        if key[1] == "double":
            out = hooks.output_after(positions[id(t_call)])
            assert torch.allclose(out.double(), expected.to(out.device), atol=1e-5)
            own = (p_tgt @ split_heads(t_call["v"], heads)).transpose(1, 2).flatten(2)
            assert not torch.allclose(out.double(), own[:, t:], atol=1e-5)
            checked_outputs += 1
    assert checked_outputs >= STEPS

def test_p2p_self_block_refine_and_reweight(comfy_backend, setup):
    """Self replace gives the image -> image block of the source; refine (a word added) carries the aligned tokens'
    source probabilities and keeps the new word's own; reweight scales the word's column."""
    with torch.inference_mode():
        _, inversion = invert(comfy_backend, setup)
    editor, _, target = p2p_editor(setup["clip"], target="a small dog sitting on a bench", cross_replace_steps=0.5,
                                   self_replace_steps=1.0, reweight_words="small", reweight_values="2")
    assert editor.mode == "refine"
    editor = editor.__class__(**{**editor.__dict__, "record": True})
    hooks = Hooks(setup["model"])
    try:
        state = run_edit(comfy_backend, setup, inversion, editor, target, hooks).editor_state
    finally:
        hooks.close()
    src, tgt = hooks.joint("source"), hooks.joint("target")
    text = state.text
    small = text.positions("target", ["small"])
    index, alphas = text.refine_mapper()
    assert all(alphas[p] == 0 for p in small) and alphas.sum() >= text.tokens - len(small) - 1
    cross_steps, seen = int(0.5 * STEPS), set()
    for r in state.records:
        key = (STEPS - r["step"], r["layer"].kind, r["layer"].index)
        s_call, t_call = src[key], tgt[key]
        t, hs = s_call["block"][2], r["heads"]
        p_src = probs(s_call["q"], s_call["k"], s_call["heads"])[:, hs, t:]
        p_tgt = probs(t_call["q"], t_call["k"], t_call["heads"])[:, hs, t:]
        assert torch.allclose(r["image"].double(), p_src[..., t:], atol=1e-5)  # self replace
        if r["step"] < cross_steps:
            expected = p_src[..., :t][..., index] * alphas.double() + p_tgt[..., :t] * (1 - alphas.double())
            expected[..., small] *= 2.0
            assert torch.allclose(r["text"].double(), expected, atol=1e-5)
        else:
            assert torch.allclose(r["text"].double(), p_tgt[..., :t], atol=1e-5)
        seen.add(r["step"] < cross_steps)
    assert seen == {True, False}


@pytest.mark.parametrize("how", ["mask", "words"])
def test_p2p_local_blend_keeps_the_source_outside(comfy_backend, setup, how):
    """Outside the blend region (a mask, or the words' maps from the image -> text block) the edited latent is the
    source branch's at every blended step; inside it differs."""
    with torch.inference_mode():
        latent, inversion = invert(comfy_backend, setup)
    if how == "mask":
        mask = torch.zeros(1, 128, 128)
        mask[:, :, :64] = 1.0
        editor, _, target = p2p_editor(setup["clip"], mask=mask)
    else:
        editor, _, target = p2p_editor(setup["clip"], blend_source_words="cat", blend_target_words="dog",
                                       blend_threshold=0.9)  # random weights: flat maps
    editor = editor.__class__(**{**editor.__dict__, "record": True})
    out = run_edit(comfy_backend, setup, inversion, editor, target)
    state = out.editor_state
    assert len(state.blend_masks) == STEPS
    region = state.blend_masks[-1][1]
    edited = setup["model"].model.process_latent_in(out.edited)
    source = setup["model"].model.process_latent_in(out.source)
    keep = (region == 0).expand_as(edited)
    assert 0 < keep.float().mean() < 1
    assert (edited - source)[keep].abs().max() <= 1e-6
    assert (edited - source)[~keep].abs().max() > 1e-4
    if how == "words":
        maps = dict(state.word_maps("target"))
        assert set(maps) == set(PROMPTS[1].split()) and maps["dog"].shape[-2:] == (8, 8)


# -- MasaCtrl ----------------------------------------------------------------------------------------------------------
def test_masactrl_attends_over_the_source_keys_and_values(comfy_backend, setup):
    """From start_step and start_layer on, the target's image queries attend to its own text keys/values and the
    source's image keys/values (hooked from the source's call): the backend's attention gets exactly these, per half,
    and the image stream receives that attention; text queries keep their own; before start_step and below
    start_layer the target attends to itself."""
    from comfyui_direct_inversion.editors import MasaCtrlEditor

    clip = setup["clip"]
    with torch.inference_mode():
        _, inversion = invert(comfy_backend, setup)
    start_layer = 1 if setup["kind"] == "sd3" else 0  # tiny SD3: 2 joint blocks; tiny Flux: 1 double, 1 single
    editor = MasaCtrlEditor(start_step=2, start_layer=start_layer)
    hooks = Hooks(setup["model"])
    try:
        run_edit(comfy_backend, setup, inversion, editor, encode(clip, "a photo of a cat jumping"), hooks, cfg=2.0)
    finally:
        hooks.close()
    src = hooks.joint("source")
    checked = {"edited": 0, "own": 0}
    for position, call in enumerate(hooks.calls):
        if call["branch"] != "target" or call["block"] is None:
            continue
        kind, index, t, image = call["block"]
        key = (call["level"], kind, index)
        s_call, heads = src[key], call["heads"]
        edited = STEPS - call["level"] >= 2 and index >= start_layer
        if call["q"].shape[1] == t + image:  # the target's own joint attention (not edited here)
            assert not edited
            expected = probs(call["q"][:, t:], call["k"], heads) @ split_heads(call["v"], heads)
            checked["own"] += kind == "double"
        elif call["q"].shape[1] == t:  # edited: the text queries over the target's own keys
            assert edited and call["k"].shape[1] == t + image
            continue
        else:  # edited: one half's image queries over [own text, the same half of the source's image] keys
            assert edited and call["q"].shape[1] == image and len(call["chunks"]) == 2
            row = len([c for c in hooks.calls[:position] if c["branch"] == "target" and c["level"] == call["level"]
                       and c["block"] == call["block"] and c["q"].shape[1] == image])  # halves in batch order
            text = hooks.calls[position - 1 - row]
            assert text["q"].shape[1] == t
            assert torch.equal(call["k"][:, :t], text["k"][row:row + 1, :t])
            assert torch.equal(call["k"][:, t:], s_call["k"][row:row + 1, t:])
            assert torch.equal(call["v"][:, t:], s_call["v"][row:row + 1, t:])
            expected = probs(call["q"], call["k"], heads) @ split_heads(call["v"], heads)
            checked["edited"] += kind == "double"
        if kind == "double":
            out = hooks.output_after(position)  # the whole batch; an edited call is one half of it
            rows = out[row:row + 1] if call["q"].shape[1] == image else out
            assert torch.allclose(rows.double(), expected.transpose(1, 2).flatten(2), atol=1e-5)
    assert checked["edited"] >= 2 and checked["own"] >= 1


def test_masactrl_mask_and_default_layer(comfy_backend, setup):
    """A mask splits the image keys into foreground / background attention (text keys in both); start_layer -1 is
    MasaCtrl's relative depth; mask words are refused on flow models with a clear error."""
    from comfyui_direct_inversion.editors import MasaCtrlEditor
    from comfyui_direct_inversion.editors.joint import default_joint_start

    with torch.inference_mode():
        latent, inversion = invert(comfy_backend, setup)
    mask = torch.zeros(128, 128)
    mask[32:96, 32:96] = 1.0
    editor = MasaCtrlEditor(start_step=0, start_layer=0, mask=mask, record=True)
    out = run_edit(comfy_backend, setup, inversion, editor, encode(setup["clip"], "a photo of a cat jumping"))
    records = out.editor_state.records
    assert records and torch.isfinite(out.edited).all()
    r = {key: value[0] if torch.is_tensor(value) else value for key, value in records[-1].items()}
    t, heads = r["text"], r["heads"]
    m = (torch.nn.functional.interpolate(mask[None, None], size=(8, 8)).flatten(1) > 0.5)[0]
    keys, values = torch.cat([r["k"][:t], r["k_source"]]), torch.cat([r["v"][:t], r["v_source"]])
    logits = split_heads(r["q"][None, t:], heads) @ split_heads(keys[None], heads).transpose(-1, -2) / math.sqrt(
        r["q"].shape[-1] // heads)
    text = torch.ones(t, dtype=torch.bool)
    parts = []
    for allowed in (torch.cat([text, m]), torch.cat([text, ~m])):
        p = torch.softmax(logits.masked_fill(~allowed, float("-inf")), -1)
        parts.append((p @ split_heads(values[None], heads)).transpose(1, 2).flatten(2)[0])
    expected = parts[0] * m[:, None] + parts[1] * (~m)[:, None]
    assert torch.allclose(r["out"][t:].double(), expected, atol=1e-5)
    assert default_joint_start(24) == 15 and default_joint_start(57) == 36
    with pytest.raises(ValueError, match="automatic mask .* not available on SD3/Flux"):
        run_edit(comfy_backend, setup, inversion, MasaCtrlEditor(source_positions=(1,), target_positions=(1,)),
                 encode(setup["clip"], "a cat"))


# -- Plug-and-Play ---------------------------------------------------------------------------------------------------
def test_pnp_injects_inside_its_window(comfy_backend, setup):
    """In the family's PnP layers the backend's attention gets the source's image values during the first
    feature_injection steps and the source's image queries/keys during the first attention_injection steps, and
    the target's own afterwards; other layers are untouched."""
    from comfyui_direct_inversion.editors import PnPEditor
    from comfyui_direct_inversion.editors.joint import FLOW_LAYERS

    clip = setup["clip"]
    with torch.inference_mode():
        _, inversion = invert(comfy_backend, setup)
    editor = PnPEditor(feature_injection=0.5, attention_injection=0.34, source_conditioning=encode(clip, ""))
    hooks = Hooks(setup["model"])
    try:
        run_edit(comfy_backend, setup, inversion, editor, encode(clip, "a sketch of a cat"), hooks, cfg=2.0)
    finally:
        hooks.close()
    choice = FLOW_LAYERS[setup["kind"]]
    src = hooks.joint("source")
    seen = set()
    for key, t_call in hooks.joint("target").items():
        level, kind, index = key
        step, s_call, t = STEPS - level, src[key], t_call["block"][2]
        assert len(s_call["chunks"]) == 1 and len(t_call["chunks"]) == 2  # unguided source, guided target
        injected = kind == choice.pnp_kind and index >= 0 and (kind, index) in pnp_layers(setup["kind"])
        for name, window in (("v", 3), ("q", 2), ("k", 2)):
            for row in range(2):
                same = torch.equal(t_call[name][row, t:], s_call[name][0, t:])
                assert same == (injected and step < window), (key, name, row)
            seen.add((injected, step < window))
    assert seen == {(True, True), (True, False), (False, True), (False, False)}


def pnp_layers(kind):
    # tiny SD3: joint blocks from round(2 * 0.5) = 1; tiny Flux: single blocks from min(round(1 * 20 / 38), 0) = 0
    return {("double", 1)} if kind == "sd3" else {("single", 0)}


# -- every method with every editor, identity edits ---------------------------------------------------------------
def editors_for(clip, source, target):
    from comfyui_direct_inversion.editors import MasaCtrlEditor, PnPEditor

    p2p, _, _ = p2p_editor(clip, source=source, target=target, self_replace_steps=0.6, cross_replace_steps=0.4)
    return {"p2p": p2p, "masactrl": MasaCtrlEditor(start_step=1, start_layer=0),
            "pnp": PnPEditor(source_conditioning=encode(clip, ""))}


@pytest.mark.parametrize("method", ["euler", "rf_solver", "negative_prompt", "null_text"])
def test_every_flow_method_with_every_editor(comfy_backend, setup, method):
    """Every inversion method of the family runs with every editor: the source branch reconstructs the image, the
    edit is finite and differs from the free edit; with the target prompt = the source prompt and offsets 'both'
    the edit reproduces the image exactly."""
    from comfyui_direct_inversion.editors import PnPEditor
    from comfyui_direct_inversion.inversion import FLOW, methods_for

    if method not in methods_for(FLOW) or (setup["kind"] == "flux" and method == "null_text"):
        pytest.skip(f"{method} is not a method for {setup['kind']}")
    clip = setup["clip"]
    cfg = 1.0 if setup["kind"] == "flux" else 3.0
    with torch.inference_mode():
        latent, inversion = invert(comfy_backend, setup, method)
        free = run_edit(comfy_backend, setup, inversion, None, encode(clip, PROMPTS[1]), cfg=cfg).edited
    for name, editor in editors_for(clip, *PROMPTS).items():
        out = run_edit(comfy_backend, setup, inversion, editor, encode(clip, PROMPTS[1]), cfg=cfg)
        assert torch.isfinite(out.edited).all(), name
        if method != "negative_prompt" or name != "pnp":  # PnP's source is the empty prompt's own reconstruction
            assert (out.source - latent).abs().max() <= 1e-4, name
        assert (out.edited - free).abs().max() > 1e-5, name
    identity = editors_for(clip, PROMPTS[0], PROMPTS[0])
    identity["pnp"] = PnPEditor(source_conditioning=encode(clip, PROMPTS[0]))  # PnP's source runs unguided:
    for name, editor in identity.items():  # the same prediction as the target's at cfg 1
        out = run_edit(comfy_backend, setup, inversion, editor, encode(clip, PROMPTS[0]),
                       cfg=1.0 if name == "pnp" else cfg, offsets="both")
        assert (out.edited - latent).abs().max() <= 1e-4, name


# -- nothing stays patched ------------------------------------------------------------------------------------------
def test_nothing_stays_patched_and_previous_patches_are_chained(comfy_backend, setup):
    """After a run, an error inside the run and a cancel, the model has no editor patches and no forward hooks,
    and a plain edit gives what it gave before; an attention override and a block patch that were on the model
    still run under the editor."""
    import comfy.model_management

    from comfyui_direct_inversion.editors import MasaCtrlEditor

    model, clip = setup["model"], setup["clip"]
    with torch.inference_mode():
        _, inversion = invert(comfy_backend, setup)
    target = encode(clip, "a photo of a cat jumping")
    options_before = repr(model.model_options)
    hooks_before = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.model.modules())
    plain = run_edit(comfy_backend, setup, inversion, None, target).edited

    def unpatched():
        assert repr(model.model_options) == options_before
        assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.model.modules()) == hooks_before
        assert torch.equal(run_edit(comfy_backend, setup, inversion, None, target).edited, plain)

    run_edit(comfy_backend, setup, inversion, MasaCtrlEditor(start_step=0, start_layer=0), target)
    unpatched()
    p2p, _, p2p_target = p2p_editor(clip)
    with pytest.raises(ValueError, match="text tokens"):  # a target prompt not from the P2P Editor's CLIP
        run_edit(comfy_backend, setup, inversion, p2p, [[p2p_target[0][0][:, :5], p2p_target[0][1]]])
    unpatched()
    calls = {"n": 0}

    def interrupt_after_two(apply_model, args):
        calls["n"] += 1
        if calls["n"] > 2:
            comfy.model_management.interrupt_current_processing(True)
        return apply_model(args["input"], args["timestep"], **args["c"])

    cancelling = model.clone()
    cancelling.set_model_unet_function_wrapper(interrupt_after_two)
    with pytest.raises(comfy.model_management.InterruptProcessingException):
        with torch.inference_mode():
            comfy_backend.direct_inversion(cancelling, inversion, target, encode(clip, ""), cfg=1.0,
                                           editor=MasaCtrlEditor(start_step=0, start_layer=0))
    comfy.model_management.interrupt_current_processing(False)
    unpatched()
    # an existing override and block patch keep running under the editor
    seen = {"override": 0, "block": 0}
    chained = model.clone()

    def previous_override(func, *args, **kwargs):
        seen["override"] += 1
        return func(*args, **kwargs)

    def previous_block(args, extra):
        seen["block"] += 1
        return extra["original_block"](args)

    chained.model_options["transformer_options"] = dict(chained.model_options.get("transformer_options", {}),
                                                        optimized_attention_override=previous_override)
    chained.set_model_patch_replace(previous_block, "dit", "double_block", 0)
    edited = run_edit(comfy_backend, {**setup, "model": chained}, inversion, MasaCtrlEditor(start_step=0, start_layer=0),
                      target).edited
    assert seen["override"] > 0 and seen["block"] == 2 * STEPS
    alone = run_edit(comfy_backend, setup, inversion, MasaCtrlEditor(start_step=0, start_layer=0), target).edited
    assert torch.equal(edited, alone)


def test_editors_not_for_flow_models_are_refused(comfy_backend, setup):
    from comfyui_direct_inversion.editors import P2PZeroEditor

    with torch.inference_mode():
        _, inversion = invert(comfy_backend, setup)
    with pytest.raises(ValueError, match="does not work on SD3/Flux's joint attention"):
        run_edit(comfy_backend, setup, inversion, P2PZeroEditor(source_conditioning=encode(setup["clip"], "a cat")),
                 encode(setup["clip"], "a dog"))


def test_sd35_image_only_attention_is_edited(comfy_backend):
    """SD3.5-medium's joint blocks with a second, image-only attention (x_block_self_attn): every editor runs, and the
    image-only calls are edited as self-attention (P2P's self fraction: the source's probabilities; MasaCtrl: the
    source's keys and values), recomputed from the hooked calls."""
    from comfyui_direct_inversion.adapters.comfyui_editors import joint_attention_layers

    transformer = F.tiny_diffusers_sd3(qk_norm="rms_norm", dual_attention_layers=(0,))
    model = F.comfy_sd3_from_diffusers(transformer)
    family, layers = joint_attention_layers(model)
    assert family == "sd3" and [layer.key for layer in layers.values()] == [("double", 0), ("image", 0), ("double", 1)]
    setup = {"kind": "sd3", "model": model, "clip": F.tiny_comfy_sd3_clip()}
    clip = setup["clip"]
    with torch.inference_mode():
        latent, inversion = invert(comfy_backend, setup)
    editors = editors_for(clip, *PROMPTS)
    editors = {name: editor.__class__(**{**editor.__dict__, "record": True}) if name != "pnp" else editor
               for name, editor in editors.items()}
    for name, editor in editors.items():
        hooks = Hooks(model)
        try:
            out = run_edit(comfy_backend, setup, inversion, editor, encode(clip, PROMPTS[1]), hooks, cfg=2.0)
        finally:
            hooks.close()
        assert torch.isfinite(out.edited).all() and (out.source - latent).abs().max() <= 1e-4
        source_image = {c["level"]: c for c in hooks.calls if c["branch"] == "source" and c["block"] is not None
                        and c["q"].shape[1] == c["block"][3]}
        assert len(source_image) == STEPS
        records = [r for r in getattr(out.editor_state, "records", []) if r["layer"].kind == "image"]
        if name == "p2p":  # self fraction 0.6 of 6 steps: the source's image-only probabilities in steps 0-2
            assert sorted({r["step"] for r in records}) == [0, 1, 2]
            for r in records:
                s_call = source_image[STEPS - r["step"]]
                rows = slice(0, 1) if s_call["chunks"] == (0,) else [s_call["chunks"].index(0)]
                expected = probs(s_call["q"][rows], s_call["k"][rows], s_call["heads"])[:, r["heads"]]
                assert torch.allclose(r["image"].double(), expected, atol=1e-5)
        if name == "masactrl":  # from step 1 on: the target's image-only queries over the source's keys and values
            assert sorted({r["step"] for r in records}) == list(range(1, STEPS))
            for r in records:
                s_call = source_image[STEPS - r["step"]]
                row = s_call["chunks"].index(0 if r["role"] == "cond" else 1)
                assert torch.equal(r["k_source"][0], s_call["k"][row]) and torch.equal(r["v_source"][0], s_call["v"][row])
                expected = probs(r["q"], r["k_source"], r["heads"]) @ split_heads(r["v_source"], r["heads"])
                assert torch.allclose(r["out"].double(), expected.transpose(1, 2).flatten(2), atol=1e-5)
