"""Null-text, negative-prompt and EDICT through the ComfyUI adapter; saved inversions."""
from __future__ import annotations

import os
from typing import Optional

import pytest
import torch

import di_testing as T


@pytest.fixture(scope="module")
def inference_model(comfy_backend, tiny_unet):
    """Built under inference_mode, as ComfyUI's executor loads checkpoints: its weights are inference tensors."""
    with torch.inference_mode():
        model = T.comfy_model_from_diffusers(tiny_unet)
    assert all(p.is_inference() for p in model.model.parameters())
    return model


@pytest.fixture(scope="module")
def latent(inference_model):
    return inference_model.model.process_latent_out(T.image_like_latent())


def bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.contiguous().flatten().view(torch.uint8), b.contiguous().flatten().view(torch.uint8))


def invert(backend, model, latent, conds, method, steps=8, options=None):
    with torch.inference_mode():
        return backend.invert(model, latent, conds["source"], conds["negative"], steps=steps, method=method,
                              options=options).inversion


def test_null_text_in_inference_mode_leaves_weights_alone(comfy_backend, inference_model, latent, conds, pack):
    params = {name: p for name, p in inference_model.model.named_parameters()}
    inv = invert(comfy_backend, inference_model, latent, conds, "null_text")
    assert inv.extras["null_embeddings"].shape == (8, 1, T.TOKENS, T.CONTEXT_DIM)
    assert not torch.equal(inv.extras["null_embeddings"][0], conds["negative"][0][0])  # it was optimised
    # the very same parameter objects, still inference tensors, no gradients anywhere
    after = dict(inference_model.model.named_parameters())
    assert all(after[name] is p and p.is_inference() and p.grad is None for name, p in params.items())


def test_null_text_matches_the_diffusers_backend(comfy_backend, inference_model, latent, conds, tiny_unet):
    from comfyui_direct_inversion.adapters import diffusers_backend

    inv_c = invert(comfy_backend, inference_model, latent, conds, "null_text", steps=6)
    inv_d = diffusers_backend.invert(tiny_unet, T.sd_scheduler(), T.image_like_latent(), conds["source"][0][0],
                                     conds["negative"][0][0], steps=6, method="null_text")
    delta = (inv_c.extras["null_embeddings"] - inv_d.extras["null_embeddings"]).norm()
    moved = (inv_d.extras["null_embeddings"] - conds["negative"][0][0]).norm()
    assert delta < 1e-3 * moved


@pytest.mark.parametrize("method", ["null_text", "negative_prompt", "edict"])
def test_methods_edit_through_the_comfyui_sampler(comfy_backend, inference_model, latent, conds, method):
    inv = invert(comfy_backend, inference_model, latent, conds, method)
    with torch.inference_mode():
        out = comfy_backend.direct_inversion(inference_model, inv, conds["target"], conds["negative"], cfg=7.5)
    assert torch.isfinite(out.edited).all()
    z0 = inference_model.model.process_latent_in(latent)
    assert (inference_model.model.process_latent_in(out.source) - z0).abs().max().item() <= 1e-5
    assert ((out.edited - latent) ** 2).mean() > 1e-4 * latent.var()


def test_edict_reconstruction_is_exact_in_comfyui(comfy_backend, inference_model, latent, conds):
    inv = invert(comfy_backend, inference_model, latent, conds, "edict", steps=50)
    with torch.inference_mode():
        out = comfy_backend.direct_inversion(inference_model, inv, conds["source"], conds["negative"])
    z0 = inference_model.model.process_latent_in(latent)
    assert inv.steps == 40
    assert (inference_model.model.process_latent_in(out.source) - z0).abs().max().item() <= 1e-6


def test_negative_prompt_at_interpolation_0_is_ddim_at_guidance_1(comfy_backend, inference_model, latent, conds):
    npi = invert(comfy_backend, inference_model, latent, conds, "negative_prompt", steps=20)
    ddim = invert(comfy_backend, inference_model, latent, conds, "ddim", steps=20)
    with torch.inference_mode():
        out = comfy_backend.direct_inversion(inference_model, npi, conds["source"], conds["negative"], cfg=7.5,
                                             offsets="off")
        ref = comfy_backend.direct_inversion(inference_model, ddim, conds["source"], conds["negative"], cfg=1.0,
                                             offsets="off")
    assert torch.allclose(out.source, ref.source, atol=1e-4)


class CancelAfter:
    """Presses Cancel (ComfyUI's interrupt flag, as the server sets it from its own thread) as the UNet starts its
    ``at``-th evaluation, and counts the evaluations that still start afterwards. It needs no progress hook, whose
    calls ComfyUI 0.33 throttles. ComfyUI 0.33 also checks the flag in every layer of its own ops, so there the
    evaluation under way stops too; on 0.3.64 only our loops' checks stop it."""

    def __init__(self, model, at: Optional[int] = None):
        self.at, self.calls, self.after = at, 0, 0
        self.handle = model.model.diffusion_model.register_forward_pre_hook(self._count)

    def _count(self, module, args):
        import comfy.model_management

        self.calls += 1
        if self.at is not None and self.calls > self.at:
            self.after += 1
        if self.calls == self.at:
            comfy.model_management.interrupt_current_processing(True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        import comfy.model_management

        self.handle.remove()
        comfy.model_management.interrupt_current_processing(False)


def _run_loop(backend, model, latent, conds, loop: str, inversions: dict):
    """One long loop: an inversion (``invert:METHOD``) or sampling from a prepared inversion (``sample:METHOD``)."""
    kind, method = loop.split(":")
    if kind == "invert":
        return invert(backend, model, latent, conds, method).z_star
    with torch.inference_mode():
        return backend.direct_inversion(model, inversions[method], conds["target"], conds["negative"], cfg=7.5).edited


# loop -> (the loop that runs before it inside the same call, which Cancel must land past; the evaluation of the loop
# during which Cancel is pressed; the most evaluations that may still start). Every loop checks the flag after each
# step, so only the rest of that step may run: DDIM inversion at cfg 1 makes one evaluation a step, EDICT two (its
# two updates), Direct Inversion sampling two (source and target), EDICT sampling four (two updates, two branches).
# Null-text checks after every inner iteration: pressed during the first inner iteration, nothing more may start.
CANCEL_CASES = {"invert:ddim": (None, 3, 0), "invert:null_text": ("invert:ddim", 2, 0), "invert:edict": (None, 3, 1),
                "sample:ddim": (None, 3, 1), "sample:edict": (None, 3, 3)}


@pytest.mark.parametrize("loop", sorted(CANCEL_CASES))
def test_cancel_stops_every_long_loop_and_leaves_the_model_clean(comfy_backend, inference_model, latent, conds, loop):
    import comfy.model_management

    inversions = {m: invert(comfy_backend, inference_model, latent, conds, m) for m in ("ddim", "edict")}
    options, patches = repr(inference_model.model_options), dict(inference_model.patches)
    params = dict(inference_model.model.named_parameters())
    flags = {n: p.requires_grad for n, p in params.items()}
    with CancelAfter(inference_model) as full:
        before = _run_loop(comfy_backend, inference_model, latent, conds, loop, inversions)
    first, offset, most_after = CANCEL_CASES[loop]
    skipped = 0
    if first is not None:
        with CancelAfter(inference_model) as counted:
            _run_loop(comfy_backend, inference_model, latent, conds, first, inversions)
        skipped = counted.calls
    at = skipped + offset
    assert full.calls >= at + most_after + 2  # Cancel lands before the last step: later steps would have run
    with CancelAfter(inference_model, at=at) as cancel:
        with pytest.raises(comfy.model_management.InterruptProcessingException):
            _run_loop(comfy_backend, inference_model, latent, conds, loop, inversions)
    assert cancel.after <= most_after, f"{cancel.after} UNet evaluations started after Cancel"
    assert not comfy.model_management.processing_interrupted()  # the flag was consumed by the stop
    # nothing stays patched, the weights are untouched, and the next run gives the same result
    assert repr(inference_model.model_options) == options and dict(inference_model.patches) == patches
    after = dict(inference_model.model.named_parameters())
    assert all(after[n] is p and p.is_inference() and p.requires_grad == flags[n] and p.grad is None
               for n, p in params.items())
    assert not inference_model.model.diffusion_model._forward_pre_hooks
    assert torch.is_grad_enabled()  # the test's own (default) mode is back
    assert torch.equal(_run_loop(comfy_backend, inference_model, latent, conds, loop, inversions), before)


def test_save_load_round_trip_and_errors(comfy_backend, inference_model, latent, conds, tiny_unet, tmp_path, pack):
    from comfyui_direct_inversion.inversion.storage import InversionFileError, load_inversion, save_inversion
    from comfyui_direct_inversion.nodes.inversion_nodes import check_loaded

    for method in ("null_text", "edict"):
        inv = invert(comfy_backend, inference_model, latent, conds, method, steps=6)
        path = str(tmp_path / f"{method}.safetensors")
        save_inversion(inv, path)
        back = load_inversion(path)
        assert bitwise_equal(back.z_star, inv.z_star) and bitwise_equal(back.sigmas, inv.sigmas)
        assert back.extras.keys() == inv.extras.keys()
        assert all(bitwise_equal(back.extras[k], inv.extras[k]) for k in inv.extras)  # NaN padding included
        assert bitwise_equal(back.conditioning[0][0], inv.conditioning[0][0])
        assert bitwise_equal(back.negative[0][0], inv.negative[0][0])
        for field in ("method", "options", "timesteps", "cfg", "model_family", "fingerprint"):
            assert getattr(back, field) == getattr(inv, field), field
        check_loaded(back, inference_model, "file")  # same model: accepted
        with torch.inference_mode():  # and it edits like the original
            a = comfy_backend.direct_inversion(inference_model, inv, conds["target"], conds["negative"])
            b = comfy_backend.direct_inversion(inference_model, back, conds["target"], conds["negative"])
        assert torch.equal(a.edited, b.edited)

    data = open(path, "rb").read()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(InversionFileError, match="truncated or not a safetensors file"):
        load_inversion(str(truncated))

    # a file whose trajectory does not fit its recorded latent shape
    from safetensors.torch import load_file, save_file
    from safetensors import safe_open

    with safe_open(path, framework="pt") as handle:
        meta = handle.metadata()
    tensors = load_file(path)
    tensors["z_star"] = tensors["z_star"][:, :, :, :8].contiguous()
    reshaped = tmp_path / "reshaped.safetensors"
    save_file(tensors, str(reshaped), metadata=meta)
    with pytest.raises(InversionFileError, match=r"inconsistent: its trajectory has shape \(5, 1, 4, 8, 16\)"):
        load_inversion(str(reshaped))
    # another image size than the latent it is used with
    with pytest.raises(ValueError, match=r"shape \(1, 4, 8, 8\).*\(1, 4, 16, 16\)"):
        back.check_latent(torch.zeros(1, 4, 8, 8), "latent")

    other = T.comfy_model_from_diffusers(T.tiny_diffusers_unet(seed=5))
    with pytest.raises(ValueError, match="made with other model weights"):
        check_loaded(back, other, "edict.safetensors")
    patched = inference_model.clone()  # a LoRA-like weight patch changes the fingerprint too
    patched.add_patches({"diffusion_model.out.2.weight": (torch.ones_like(tiny_unet.conv_out.weight),)}, 0.1)
    with pytest.raises(ValueError, match="made with other model weights"):
        check_loaded(back, patched, "edict.safetensors")
    assert os.path.getsize(path) > 0
