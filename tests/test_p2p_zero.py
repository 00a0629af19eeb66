"""Pix2Pix-Zero through both adapters: the edit direction, the cross-attention loss against an independent
computation, guidance lowering the loss at every step, the plain-sampling limit (Delta = 0, no guidance), Direct
Inversion's pinned reconstruction and the "auto" offsets, every inversion method, UNet-evaluation counts, ComfyUI
agreement inside inference mode, SDXL's pooled direction and the node."""
from __future__ import annotations

import copy

import pytest
import torch

import di_testing as T

STEPS = 5  # every guided step costs a forward and backward pass more than a plain step: short runs
XA = 0.03  # a step the tiny random UNet's attention takes without overshooting (the reference's 0.1 is for SD)


@pytest.fixture(scope="module")
def setup(edit_setup):
    """conftest's edit_setup with its latent inverted in ``STEPS`` DDIM steps."""
    return {**edit_setup, "ddim": T.invert_with(edit_setup, "ddim", steps=STEPS)}


def run(setup, target, editor=None, **kw):
    return T.diffusers_edit(setup, target, editor, **kw)


def directed(editors, s):
    """The target conditioning of a one-sentence-per-side direction: source + (E(target) - E(source))."""
    return s["source"] + editors.edit_direction([s["source"]], [s["target"]])


def test_edit_direction_is_the_difference_of_the_sentence_means(editors):
    g = torch.Generator().manual_seed(0)
    src = [torch.randn(1, 4, 3, generator=g) for _ in range(2)]
    tgt = [torch.randn(1, 4, 3, generator=g) for _ in range(3)]
    expected = (tgt[0] + tgt[1] + tgt[2]) / 3 - (src[0] + src[1]) / 2
    torch.testing.assert_close(editors.edit_direction(src, tgt), expected)
    with pytest.raises(ValueError, match="different shapes"):
        editors.edit_direction(src, [torch.randn(1, 5, 3)])
    with pytest.raises(ValueError, match="at least one"):
        editors.edit_direction([], tgt)
    with pytest.raises(ValueError, match="xa_guidance must be in"):
        editors.P2PZeroEditor(xa_guidance=-0.1)


class _ProbeProcessor:
    """Attention that keeps its float64 probabilities (an independent computation of the maps)."""

    def __init__(self, store: list):
        self.store = store

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, **kwargs):
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        q, k, v = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
        b, n, _ = q.shape
        split = lambda t: t.double().reshape(b, t.shape[1], attn.heads, -1).transpose(1, 2)  # noqa: E731
        qh, kh, vh = split(q), split(k), split(v)
        probs = torch.softmax(qh @ kh.transpose(-1, -2) / qh.shape[-1] ** 0.5, dim=-1)
        if encoder_hidden_states is not None:
            self.store.append(probs)
        out = (probs @ vh).transpose(1, 2).reshape(b, n, -1).to(q.dtype)
        return attn.to_out[1](attn.to_out[0](out)) / attn.rescale_output_factor


def _maps(unet, scheduler, z, sigma, embeds):
    """Every attn2 layer's probabilities of one conditional prediction at VP latent z, computed independently."""
    from comfyui_direct_inversion.adapters.diffusers_backend import train_sigmas

    store, original = [], unet.attn_processors
    unet.set_attn_processor(_ProbeProcessor(store))
    try:
        t = (train_sigmas(scheduler).log() - torch.tensor(sigma, dtype=torch.float64).log()).abs().argmin()
        unet(z, t, encoder_hidden_states=embeds)
    finally:
        unet.set_attn_processor(original)
    return store


def test_loss_and_step_against_an_independent_computation(diffusers_backend, editors, setup):
    """Step 0: the recorded loss is sum_layers 1/(2H) sum_(heads, queries, tokens) (M_edit - M_ref)^2 of the target
    at z*_T under the edited prompt against the source at z*_T, and the guided latent is z*_T - xa grad."""
    s = setup
    unet, scheduler, inversion = s["unet"], s["scheduler"], s["ddim"]
    target = directed(editors, s)
    out = run(s, target, editors.P2PZeroEditor(xa_guidance=XA, record=True))
    z_top, sigma = inversion.z_star[-1], float(inversion.sigmas[-1])
    with torch.no_grad():
        ref = _maps(unet, scheduler, z_top, sigma, s["source"])
    latent = z_top.clone().requires_grad_(True)
    edit = _maps(unet, scheduler, latent, sigma, target)
    assert len(edit) == len(ref) == 4  # the tiny UNet's attn2 layers (down, mid, up)
    loss = sum((e - r).pow(2).sum((2, 3)).sum(1) / (2 * e.shape[1]) for e, r in zip(edit, ref))
    first = out.editor_state.records[0]
    torch.testing.assert_close(first["before"].double(), loss.detach(), rtol=1e-4, atol=1e-7)
    (grad,) = torch.autograd.grad(loss.sum(), latent)
    after = _maps(unet, scheduler, (z_top - XA * grad).detach(), sigma, target)
    loss_after = sum((e - r).pow(2).sum((2, 3)).sum(1) / (2 * e.shape[1]) for e, r in zip(after, ref))
    torch.testing.assert_close(first["after"].double(), loss_after.detach(), rtol=1e-4, atol=1e-7)
    assert not any(p.grad is not None for p in unet.parameters()) and all(p.requires_grad for p in unet.parameters())


@pytest.mark.parametrize("offsets", ["source", "both", "off"])
def test_guidance_lowers_the_attention_distance_at_every_step(diffusers_backend, editors, setup, offsets):
    s = setup
    out = run(s, directed(editors, s), editors.P2PZeroEditor(xa_guidance=XA, record=True), offsets=offsets)
    records = out.editor_state.records
    assert [r["step"] for r in records] == list(range(STEPS - 1))  # every step that moves (the last is zero-length)
    for r in records:
        assert (r["after"] < r["before"]).all() and r["grad_rms"] > 0, r
    unguided = run(s, directed(editors, s), editors.P2PZeroEditor(xa_guidance=0.0), offsets=offsets)
    assert ((out.edited - unguided.edited) ** 2).mean() > 1e-10  # the guidance changed the edit


def test_no_direction_and_no_guidance_is_plain_sampling_along_the_source(diffusers_backend, editors, setup):
    s = setup
    zero = s["source"] + editors.edit_direction([s["source"]], [s["source"]])
    out = run(s, zero, editors.P2PZeroEditor(xa_guidance=0.0), offsets="off")
    plain = run(s, s["source"], offsets="off")
    torch.testing.assert_close(out.edited, plain.edited, rtol=0, atol=1e-6)


def test_direct_inversion_pins_the_reconstruction_and_auto_is_both(diffusers_backend, editors, setup):
    """The reconstruction branch is exact with offsets on; "auto" is the reference's "both" for this editor (the
    offsets of the source's conditional prediction go to the target too); "off" lets the source run its own path."""
    s = setup
    target = directed(editors, s)
    editor = editors.P2PZeroEditor(xa_guidance=XA)
    auto = run(s, target, editor)
    both = run(s, target, editor, offsets="both")
    source = run(s, target, editor, offsets="source")
    assert torch.equal(auto.source, s["z0"]) and torch.equal(source.source, s["z0"])
    torch.testing.assert_close(auto.edited, both.edited, rtol=0, atol=0)
    assert auto.offsets is not None and source.offsets is None
    assert ((both.edited - source.edited) ** 2).mean() > 1e-10
    # the offsets are z*_{t-1} - DDIM(z*_t, eps_c(z*_t, source)): the reference's caption-as-negative reconstruction
    unguided = run(s, s["source"], cfg=1.0, offsets="source")
    torch.testing.assert_close(auto.offsets, unguided.offsets, rtol=0, atol=1e-6)
    off = run(s, target, editor, offsets="off")
    assert not torch.equal(off.source, s["z0"])


class _Samples:
    """Counts UNet samples (batch rows) per forward, and backward passes."""

    def __init__(self, unet):
        self.batches = []
        self.handle = unet.register_forward_pre_hook(lambda m, args: self.batches.append(args[0].shape[0]))

    def close(self):
        self.handle.remove()


def test_unet_evaluations_per_step(diffusers_backend, editors, setup):
    """Per step: the source's conditional sample, the target's gradient pass (one sample), its guided prediction
    (two): 4 samples, against the reference's 6 (two CFG batches of its reconstruction and edit, and its gradient
    pass over both halves)."""
    s = setup
    counter = _Samples(s["unet"])
    try:
        run(s, directed(editors, s), editors.P2PZeroEditor(xa_guidance=XA))
    finally:
        counter.close()
    assert counter.batches == [1, 1, 2] * (STEPS - 1)


@pytest.mark.parametrize("method", ["ddim", "null_text", "negative_prompt", "edict"])
def test_every_method(diffusers_backend, editors, setup, method):
    s = setup
    inversion = T.invert_with(s, method, steps=STEPS)
    target = directed(editors, s)
    out = run(s, target, editors.P2PZeroEditor(xa_guidance=XA, record=True), inversion=inversion)
    plain = run(s, target, editors.P2PZeroEditor(xa_guidance=0.0), inversion=inversion)
    if method == "edict":  # exact without offsets; its source pair stays guided on the inversion's prompt
        torch.testing.assert_close(out.source.float(), s["z0"], rtol=0, atol=1e-4)
        assert len(out.editor_state.records) == 2 * (inversion.steps - 1)  # both updates of every moving step
    else:
        assert torch.equal(out.source, s["z0"])
    assert torch.isfinite(out.edited).all() and ((out.edited - plain.edited) ** 2).mean() > 1e-10
    assert all((r["after"] < r["before"]).all() for r in out.editor_state.records)


def test_comfyui_agrees_with_diffusers_in_inference_mode(comfy_backend, diffusers_backend, editors, setup, tiny_unet):
    """ComfyUI's executor runs nodes in inference mode: the gradient pass leaves it, the weights are not copied
    or changed, no gradient is kept, and the edit is the diffusers backend's, along Direct Inversion's sampler and
    EDICT's (the two loops that call the guidance; every method runs in the executor: test_comfyui_executor)."""
    s = setup
    model = T.comfy_model_from_diffusers(tiny_unet)
    before = copy.deepcopy(model.model_options)
    weights = {n: p.data_ptr() for n, p in model.model.diffusion_model.named_parameters()}
    cc = T.comfy_conditioning
    target = directed(editors, s)
    for method in ("ddim", "negative_prompt", "edict"):
        expected_inversion = T.invert_with(s, method, steps=STEPS)
        expected = run(s, target, editors.P2PZeroEditor(xa_guidance=XA, record=True), inversion=expected_inversion)
        with torch.inference_mode():
            inv = comfy_backend.invert(model, model.model.process_latent_out(s["z0"]), cc(s["source"]), cc(s["null"]),
                                       steps=STEPS, method=method).inversion
            out = comfy_backend.direct_inversion(model, inv, cc(target), cc(s["null"]), cfg=7.5,
                                                 editor=editors.P2PZeroEditor(xa_guidance=XA, record=True))
        edited = model.model.process_latent_in(out.edited)
        assert (edited - expected.edited).abs().max() <= 1e-4 * expected.edited.abs().max(), method
        assert out.offsets.mode == ("off" if method == "edict" else "both")
        losses = lambda state: torch.stack([r["before"] for r in state.records])  # noqa: E731
        torch.testing.assert_close(losses(out.editor_state), losses(expected.editor_state), rtol=1e-3, atol=1e-6)
    unet = model.model.diffusion_model
    assert model.model_options == before and not any(m._forward_hooks for m in unet.modules())
    assert {n: p.data_ptr() for n, p in unet.named_parameters()} == weights
    assert all(p.is_inference() or p.grad is None for p in unet.parameters())


def test_comfyui_sdxl_direction_moves_the_pooled_output_too(comfy_backend, editors):
    """SDXL: Delta is added to the per-token embeddings and the pooled output; guidance works on its layers."""
    from comfyui_direct_inversion.adapters.comfyui_prompts import directed_conditioning

    model = T.tiny_comfy_sdxl()
    source, target, negative = T.sdxl_conditioning(1), T.sdxl_conditioning(2), T.sdxl_conditioning(3)
    edited = directed_conditioning(source, [source], [target])
    torch.testing.assert_close(edited[0][0], target[0][0])
    torch.testing.assert_close(edited[0][1]["pooled_output"], target[0][1]["pooled_output"])
    latent = model.model.process_latent_out(T.image_like_latent())
    with torch.inference_mode():
        inversion = comfy_backend.invert(model, latent, source, negative, steps=STEPS).inversion
        out = comfy_backend.direct_inversion(model, inversion, edited, source, cfg=7.5,
                                             editor=editors.P2PZeroEditor(xa_guidance=XA, record=True))
        plain = comfy_backend.direct_inversion(model, inversion, edited, source, cfg=7.5,
                                               editor=editors.P2PZeroEditor(xa_guidance=0.0))
    assert (out.source - latent).abs().max().item() <= 1e-5 * latent.abs().max().item()
    records = out.editor_state.records
    assert len(records) == STEPS - 1 and all((r["after"] < r["before"]).all() for r in records)
    assert ((out.edited - plain.edited) ** 2).mean() > 1e-10


def test_directed_conditioning_checks_lengths(pack):
    from comfyui_direct_inversion.adapters.comfyui_prompts import directed_conditioning

    short = [[torch.zeros(1, 77, 8), {}]]
    long = [[torch.zeros(1, 154, 8), {}]]
    with pytest.raises(ValueError, match="154 tokens but the edit direction's sentences to 77"):
        directed_conditioning(long, [short], [short])
    with pytest.raises(ValueError, match="different shapes"):
        directed_conditioning(short, [short], [long])


def test_auto_offsets_are_source_for_every_other_editor(core, editors):
    others = [None, editors.MasaCtrlEditor(), editors.PnPEditor()]
    assert [core.resolve_offsets("auto", e) for e in others] == ["source"] * 3
    assert core.resolve_offsets("auto", editors.P2PZeroEditor()) == "both"
    assert core.resolve_offsets("off", editors.P2PZeroEditor()) == "off"
    with pytest.raises(ValueError, match="offsets must be one of"):
        core.resolve_offsets("sometimes", None)


def test_reconstruction_uses_the_editors_source_prompt(diffusers_backend, editors, setup):
    """The maps come from the editor's source conditioning (the prompt the direction was built from) when it has
    one; by default from the inversion's."""
    s = setup
    target = directed(editors, s)
    default = run(s, target, editors.P2PZeroEditor(xa_guidance=XA, record=True))
    same = run(s, target, editors.P2PZeroEditor(xa_guidance=XA, record=True, source_conditioning=s["source"]))
    other = run(s, target, editors.P2PZeroEditor(xa_guidance=XA, record=True, source_conditioning=s["null"]))
    losses = lambda out: torch.stack([r["before"] for r in out.editor_state.records])  # noqa: E731
    torch.testing.assert_close(losses(same), losses(default), rtol=0, atol=0)
    assert not torch.allclose(losses(other), losses(default))
    assert torch.equal(other.source, s["z0"])  # pinned whatever it predicts


def test_comfyui_refuses_several_conditioning_entries(comfy_backend, editors, setup, tiny_unet):
    s = setup
    model = T.comfy_model_from_diffusers(tiny_unet)
    cc = T.comfy_conditioning
    two = cc(directed(editors, s)) + cc(s["target"])
    with torch.inference_mode():
        inv = comfy_backend.invert(model, model.model.process_latent_out(s["z0"]), cc(s["source"]), cc(s["null"]),
                                   steps=STEPS).inversion
        with pytest.raises(ValueError, match="one conditioning entry per prompt"):
            comfy_backend.direct_inversion(model, inv, two, cc(s["null"]), cfg=7.5,
                                           editor=editors.P2PZeroEditor(xa_guidance=XA))
