"""Null-text inversion (Mokady et al., "Null-text Inversion for Editing Real Images using Guided Diffusion
Models", CVPR 2023; reference: google/prompt-to-prompt ``NullInversion.null_optimization``)."""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator, Optional

import torch

from .ddim import invert_ddim
from .plan import EditPlan, InversionMethod
from .spaces import VP, Space
from .types import BRANCH_SOURCE, Inversion, NullTextModel, StepCallback, check_number, check_step

__all__ = ["NullTextMethod", "NullTextOptions", "NullTextResult", "autograd_weights", "optimize_null_text"]


@dataclass
class NullTextOptions:
    """The reference's settings (``NullInversion.invert`` defaults and ``null_optimization``)."""

    guidance: float = 7.5  # GUIDANCE_SCALE
    inner_steps: int = 10  # num_inner_steps
    early_stop: float = 1e-5  # epsilon; the threshold at sampling step n is early_stop + n * early_stop_slope
    early_stop_slope: float = 2e-5
    lr: float = 1e-2  # Adam's learning rate at sampling step n is lr * (1 - n / lr_decay_steps)
    lr_decay_steps: float = 100.0

    def __post_init__(self):
        if self.inner_steps < 1:
            raise ValueError(f"null-text inner_steps must be at least 1, got {self.inner_steps}")
        check_number("null-text guidance", self.guidance, 1.0, 100.0)
        check_number("null-text early_stop", self.early_stop, 0.0)
        check_number("null-text early_stop_slope", self.early_stop_slope, 0.0)
        check_number("null-text lr_decay_steps", self.lr_decay_steps, 1.0)
        if check_number("null-text lr", self.lr, 0.0, 10.0) <= 0:
            raise ValueError(f"null-text lr must be positive, got {self.lr}")


@dataclass
class NullTextResult:
    """Attributes:
        embeddings: ``[steps, ...]`` the optimised unconditional context per sampling step (row n: the step from
            level ``steps - n``), starting from the null prompt's.
        losses: per sampling step, the loss before each Adam update; empty for zero-length steps, whose DDIM
            update is the identity, so no embedding can change it.
        thresholds: per sampling step, the early-stop threshold.
    """

    embeddings: torch.Tensor
    losses: list = field(default_factory=list)
    thresholds: list = field(default_factory=list)


def optimize_null_text(model: NullTextModel, z_star: torch.Tensor, sigmas: torch.Tensor,
                       options: Optional[NullTextOptions] = None,
                       callback: Optional[StepCallback] = None, space: Space = VP) -> NullTextResult:
    """Optimise one unconditional embedding per step so that guided DDIM sampling retraces z*.

    For sampling step n (from level t to t-1), starting from the previous step's embedding (the null prompt's
    at n = 0), Adam minimises

        L(emb) = || DDIM(z_n, eps_u(z_n, emb) + w (eps_c(z_n) - eps_u(z_n, emb)); t -> t-1) - z*_{t-1} ||^2

    for up to ``inner_steps`` updates, stopping once L < early_stop + n * early_stop_slope; then
    z_{n+1} = DDIM(z_n, ...) with the optimised embedding. z_0 = z*_T.

    Works inside ``torch.inference_mode()``: it leaves inference mode for the optimisation; the adapter makes the
    model's weights usable by autograd (see :func:`autograd_weights`).

    Args:
        model: the source prompt's eps and a differentiable unconditional eps.
        z_star: ``[steps + 1, B, C, H, W]`` the DDIM inversion trajectory (guidance 1, as the reference).
        sigmas: ``[steps + 1]`` ascending noise levels of ``z_star``.
        space: the model family's parametrisation; "DDIM" above is its step (Euler on flow models), so on SD3 the
            same optimisation fits the unconditional context (not the pooled vector) of each step.
        callback: called after every inner iteration with ``{"phase": "null_text_inner", "i", "steps", "inner",
            "inner_steps", "loss"}`` and after every step with ``{"phase": "null_text", "i", "steps", "z"}``.
    """
    options = options or NullTextOptions()
    levels = [float(s) for s in sigmas]
    steps = len(levels) - 1
    with torch.inference_mode(False), torch.enable_grad():
        z_star = z_star.clone()  # normal tensors: inference tensors cannot take part in autograd
        sigmas_dev = sigmas.to(device=z_star.device, dtype=z_star.dtype)
        embedding = model.null_embedding.detach().clone()
        latent = z_star[steps]
        rows, losses, thresholds = [], [], []
        for n, t in enumerate(range(steps, 0, -1)):
            sigma, sigma_prev = levels[t], levels[t - 1]
            threshold = options.early_stop + n * options.early_stop_slope
            history = []
            if sigma_prev != sigma:
                with torch.no_grad():
                    eps_c = model.eps_source(latent, sigmas_dev[t])
                embedding = embedding.detach().clone().requires_grad_(True)  # Adam updates in place
                optimizer = torch.optim.Adam([embedding], lr=options.lr * (1.0 - n / options.lr_decay_steps))
                for j in range(options.inner_steps):
                    eps_u = model.eps_null(latent, sigmas_dev[t], embedding)
                    eps = eps_u + options.guidance * (eps_c - eps_u)
                    loss = torch.nn.functional.mse_loss(space.step(latent, eps, sigma, sigma_prev), z_star[t - 1])
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    history.append(loss.item())
                    if callback is not None:
                        callback({"phase": "null_text_inner", "i": n, "steps": steps, "inner": j,
                                  "inner_steps": options.inner_steps, "loss": history[-1]})
                    if history[-1] < threshold:
                        break
                embedding = embedding.detach()
                with torch.no_grad():
                    eps_u = model.eps_null(latent, sigmas_dev[t], embedding)
                    latent = space.step(latent, eps_u + options.guidance * (eps_c - eps_u), sigma, sigma_prev)
                check_step("null-text", n, steps, {BRANCH_SOURCE: latent},
                           "a null-text learning rate or guidance too large for this model, or the model overflowing "
                           "in half precision (start ComfyUI with --force-fp32)")
            rows.append(embedding)
            losses.append(history)
            thresholds.append(threshold)
            if callback is not None:
                callback({"phase": "null_text", "i": n, "steps": steps, "z": latent,
                          "inner_steps": options.inner_steps})
    return NullTextResult(embeddings=torch.stack(rows), losses=losses, thresholds=thresholds)


class NullTextMethod(InversionMethod):
    """Null-text inversion: the DDIM (flow: Euler) trajectory at the inversion's guidance, then one optimised
    unconditional context per step; edits use that context as both branches' unconditional input at every level."""

    name = "null_text"
    Options = NullTextOptions
    spaces = ("vp", "flow")
    needs_null_text = True
    summary = "DDIM/Euler inversion + per-step optimised null embedding (Mokady et al.)"

    def inner_steps(self, options) -> int:
        return options.inner_steps

    def check_space(self, space: Space, distilled: bool = False) -> None:
        super().check_space(space)
        if distilled:
            raise ValueError("Null-text inversion optimises the unconditional input of classifier-free guidance, but "
                             "Flux is guidance-distilled and sampled without CFG (its guidance is an embedding): use "
                             "euler or rf_solver.")

    def invert(self, options, model, z0, sigmas, space=VP, null_text_model=None, callback=None):
        self.check_space(space)
        if null_text_model is None:
            raise ValueError("null-text inversion needs a NullTextModel")
        z_star = invert_ddim(model, z0, sigmas, callback=callback, space=space, solver=self.solver)
        result = optimize_null_text(null_text_model, z_star, sigmas, options, callback, space=space)
        losses = torch.full((len(result.losses), options.inner_steps), float("nan"), dtype=torch.float64)
        for n, history in enumerate(result.losses):
            losses[n, :len(history)] = torch.tensor(history, dtype=torch.float64)
        return z_star, sigmas, {"null_embeddings": result.embeddings.detach(), "null_text_losses": losses,
                                "null_text_thresholds": torch.tensor(result.thresholds, dtype=torch.float64)}

    def plan(self, inversion: Inversion, cfg: float, negative, editor=None, lerp=None) -> EditPlan:
        table = inversion.extras["null_embeddings"]
        return EditPlan(guidance=self.edit_guidance(inversion, cfg), source=self.source_conditioning(inversion, editor),
                        negative=inversion.negative, negative_at=lambda level: table[inversion.steps - level])


@contextmanager
def autograd_weights(module: torch.nn.Module) -> Iterator[None]:
    """Let autograd differentiate *through* a module's weights, never *for* them, without copying them.

    Tensors created under ``torch.inference_mode()`` (as ComfyUI loads weights) cannot be saved for backward.
    Inside this context every such parameter and buffer is replaced by a normal tensor that shares its memory
    (a DLPack alias; a copy only for dtypes DLPack cannot carry), and parameters that require grad stop requiring
    it, so backward computes no weight gradients (no ``.grad`` buffers, half the backward work). Everything is put
    back on exit, also on error.
    """
    swapped, frozen = [], []
    try:
        for sub in module.modules():
            for store, make in ((sub._parameters, lambda t: torch.nn.Parameter(t, requires_grad=False)),
                                (sub._buffers, lambda t: t)):
                for name, tensor in list(store.items()):
                    if tensor is not None and tensor.is_inference():
                        swapped.append((store, name, tensor))
                        store[name] = make(_alias(tensor))
        for param in module.parameters():
            if param.requires_grad:
                frozen.append(param)
                param.requires_grad_(False)
        yield
    finally:
        for param in frozen:
            param.requires_grad_(True)
        for store, name, tensor in reversed(swapped):
            store[name] = tensor


def _alias(tensor: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode(False):
        try:
            return torch.from_dlpack(tensor.detach())
        except (RuntimeError, TypeError, BufferError):
            return tensor.detach().clone()
