"""ComfyUI adapter: runs the core through ComfyUI's own sampling machinery.

Every prediction goes through ``CFGGuider`` (``sampling_function`` -> ``calc_cond_batch``) of a guider whose
``sample`` loads the models with ComfyUI's model management, processes the conditioning (ControlNet, areas,
masks, hooks), applies the model's wrappers and patches (LoRA, model patches, CFG functions) and cleans up in
``finally``. The core only sees a Denoiser; the branch and trajectory level of a call travel in
``transformer_options`` (``BRANCH_OPTION``, ``LEVEL_OPTION``) so that patches can tell them apart.

Model families: UNets with discrete eps/v-prediction sampling (SD1.x, SD2.x, SDXL) are the VP space; models whose
``model_sampling`` is CONST flow matching (``ModelSamplingDiscreteFlow``: SD3/SD3.5, ``ModelSamplingFlux``: Flux) are
the flow space (see ``inversion.spaces``). Both are driven through the same guider: the core's Denoiser returns
(x - D(x)) / sigma of ComfyUI's denoiser D, which is eps on VP models and the velocity on flow models.

Latent conventions: ComfyUI's LATENT holds raw VAE latents; ``process_latent_in`` maps them to the model's
latent space, where the core works in VP scaling z (flow: the latent itself). ComfyUI's samplers work in k-diffusion
scaling x = z * sqrt(1 + sigma^2) (flow: x = z); Invert's z_T LATENT output is in that scaling so, on VP models, it
chains into KSampler / SamplerCustom with noise disabled.

The adapter is split by concern: ``comfyui_models`` (family, schedule, fingerprint, conditioning checks),
``comfyui_sampling`` (the branch guider, the core's Denoiser over it, the guided run), ``comfyui_editors`` (attention
and feature patches for editors); this module runs inversions and edits with them.
"""
from __future__ import annotations

import dataclasses
import logging
from contextlib import nullcontext
from dataclasses import dataclass, replace
from typing import Callable, Optional

import torch

import comfy.model_management
import comfy.utils
import latent_preview

from ..inversion import (
    BRANCH_SOURCE,
    BRANCH_TARGET,
    FLOW,
    FlowEditOptions,
    Inversion,
    OffsetTrajectory,
    autograd_weights,
    check_latent_layout,
    check_latent_values,
    check_number,
    edit,
    flow_edit as core_flow_edit,
    method_named,
    resolve_offsets,
)
from .comfyui_editors import attention_layers, decoder_features, install_editor
from .comfyui_models import guidance_distilled, model_family, model_fingerprint, model_space, schedule
from .comfyui_sampling import BRANCH_OPTION, LEVEL_OPTION, ComfyNullText, autograd_models, lerp_conditioning, run_guided

__all__ = ["BRANCH_OPTION", "LEVEL_OPTION", "DirectInversionOutput", "InvertOutput", "attention_layers",
           "decoder_features", "direct_inversion", "flow_edit", "install_editor", "invert", "model_family", "model_fingerprint",
           "model_space", "schedule"]

log = logging.getLogger("DirectInversion")


class _Progress:
    """Core callbacks -> one ComfyUI progress bar (with latent previews) and the interrupt check.

    Inversion ticks once per DDIM step, then null-text once per inner iteration (a step that stops early
    jumps to its end); sampling ticks once per step.
    """

    def __init__(self, model, steps: int, inner_steps: int = 0):
        self.steps = steps
        self.total = steps + steps * inner_steps
        self.bar = comfy.utils.ProgressBar(self.total)
        self.previewer = latent_preview.get_previewer(model.load_device, model.model.latent_format)

    def _tick(self, done: int, latent: Optional[torch.Tensor] = None) -> None:
        preview = None
        if latent is not None and self.previewer is not None:
            preview = self.previewer.decode_latent_to_preview_image("JPEG", latent.float())
        self.bar.update_absolute(done, self.total, preview)

    def __call__(self, info: dict) -> None:
        comfy.model_management.throw_exception_if_processing_interrupted()
        phase, i = info["phase"], info["i"]
        if phase == "null_text_inner":
            self._tick(self.steps + i * info["inner_steps"] + info["inner"] + 1)
        elif phase == "null_text":
            self._tick(self.steps + (i + 1) * info["inner_steps"], info["z"])
        else:
            self._tick(i + 1, info["z"] if phase == "invert" else info["denoised"])


@dataclass
class InvertOutput:
    inversion: Inversion
    z_T: torch.Tensor  # LATENT samples, k-diffusion scaling at the top level, for KSampler / SamplerCustom
    sampling_sigmas: torch.Tensor  # descending, without the zero-length last step


def invert(model, latent: torch.Tensor, positive, negative, steps: int = 50, cfg: float = 1.0, method: str = "ddim",
           options: Optional[dict] = None) -> InvertOutput:
    """Invert a LATENT's samples with a ComfyUI model (reference defaults: 50 steps, guidance 1; ``options``
    overrides the method's defaults, see ``inversion.methods``)."""
    inverter = method_named(method)
    settings = inverter.options(options)
    space = model_space(model)
    inverter.check_space(space, distilled=guidance_distilled(model))
    check_latent_layout("latent to invert", latent, model.model.latent_format.latent_channels)
    check_latent_values("latent to invert", latent)
    sigmas, timesteps = schedule(model, steps)
    guidance = inverter.inversion_guidance(settings, cfg)
    fingerprint = model_fingerprint(model)
    held = {}

    def run(denoiser, latent_image):
        null_text = ComfyNullText(denoiser) if inverter.needs_null_text else None
        with autograd_weights(denoiser.guider.inner_model) if null_text else nullcontext():
            z_star, levels, extras = inverter.invert(settings, denoiser, latent_image, sigmas, space=space,
                                                     null_text_model=null_text,
                                                     callback=_Progress(model, steps, inverter.inner_steps(settings)))
        held.update(z_star=z_star, sigmas=levels, extras=extras)
        return z_star[-1].float() * space.k_scale(levels[-1])

    z_T = run_guided(model, {BRANCH_SOURCE: positive}, negative, guidance, BRANCH_SOURCE, sigmas, latent.shape, run,
                     latent_image=latent)
    device = comfy.model_management.intermediate_device()
    inversion = Inversion(method=method, z_star=held["z_star"].to(device), sigmas=held["sigmas"], timesteps=timesteps,
                          cfg=guidance, conditioning=positive, negative=negative, model_family=model_family(model),
                          options=vars(settings), fingerprint=fingerprint, space=space.name,
                          extras={k: v.to(device) for k, v in held["extras"].items()})
    levels = held["sigmas"]
    distinct = torch.cat([levels[:1], levels[1:][levels[1:] != levels[:-1]]])
    return InvertOutput(inversion=inversion, z_T=z_T, sampling_sigmas=distinct.flip(0).to(torch.float32))


@dataclass
class DirectInversionOutput:
    edited: torch.Tensor  # LATENT samples
    source: torch.Tensor  # LATENT samples
    offsets: OffsetTrajectory  # model latent space
    editor_state: object = None  # the editor's controller (attention maps), if an editor ran
    # per sampling step: RMS of the source branch's distance to the inversion trajectory after the step
    # ("source_error") and of the Direct Inversion offset ("offset_rms", where offsets were computed)
    step_stats: dict = None


class _StepStats:
    """Collects per-step figures from the core's callbacks as device tensors (no host sync inside the loop)."""

    def __init__(self, z_star: torch.Tensor, forward: Callable[[dict], None]):
        self.z_star, self.forward = z_star, forward
        self.source_error, self.offset_rms = [], []

    def __call__(self, info: dict) -> None:
        if info.get("phase") == "sample":
            t = info["steps"] - info["i"] - 1
            self.source_error.append((info["x_source"].float() - self.z_star[t].float()).pow(2).mean().sqrt())
            if info.get("offset") is not None:
                self.offset_rms.append(info["offset"].float().pow(2).mean().sqrt())
        self.forward(info)

    def result(self) -> dict:
        as_list = lambda values: torch.stack(values).tolist() if values else []  # noqa: E731
        return {"source_error": as_list(self.source_error), "offset_rms": as_list(self.offset_rms)}


def direct_inversion(model, inversion: Inversion, positive, negative, cfg: float = 7.5, offsets: str = "auto",
                     target_start: Optional[torch.Tensor] = None, editor=None) -> DirectInversionOutput:
    """Edit an inversion with a ComfyUI model: the source branch follows it, the target branch is the edit.

    ``target_start`` is an optional LATENT in the scaling of Invert's z_T output to start the target from.
    ``editor`` (e.g. ``editors.P2PEditor``) acts through attention patches on this run's model clone; its per-run
    state is returned as ``editor_state``. ``offsets`` "auto" is the editor's default (see ``resolve_offsets``); an
    editor that guides the target's latent by gradient (Pix2Pix-Zero) runs with the weights usable by autograd.
    """
    space = model_space(model)
    inversion.check_model(model_family(model), space.name)
    chosen, offsets = offsets, resolve_offsets(offsets, editor)
    sigmas, _ = schedule(model, len(inversion.timesteps))
    if not torch.allclose(sigmas[:len(inversion.sigmas)], inversion.sigmas, rtol=1e-5, atol=0.0):
        raise ValueError("This model's noise schedule differs from the one the inversion was made with; "
                         "invert again with this model.")
    method = method_named(inversion.method)
    x_target = None
    if target_start is not None:
        inversion.check_latent(target_start, "target start latent")
        check_latent_values("target start latent", target_start)
        x_target = model.model.process_latent_in(target_start.float()) / space.k_scale(inversion.sigmas[-1])
    if not method.uses_offsets and offsets != "off" and chosen != "auto":
        log.info("[DirectInversion] %s reconstructs exactly without offsets; offsets=%s does not apply.",
                 inversion.method, offsets)
    editor = _source_guidance(model, editor, inversion)
    plan = method.plan(inversion, cfg, negative, editor, lerp=lerp_conditioning)
    _warn_distilled_cfg(model, plan.guidance)
    if plan.guidance != cfg:
        log.info("[DirectInversion] %s edits use the inversion's guidance %.2f; cfg %.2f does not apply.",
                 inversion.method, plan.guidance, cfg)
    batch = inversion.latent_shape[0]
    held = {}  # this run's state: the installed editor (closed in finally), the run's figures

    def prepare(clone):
        if editor is not None:
            held["editor"] = install_editor(clone, editor, inversion.steps, inversion.latent_shape,
                                            context_tokens=positive[0][0].shape[1] if positive else None)

    def run(denoiser, latent_image):
        device = latent_image.device
        controller = held["editor"].controller if "editor" in held else None
        on_device = _on_device(inversion, device)
        stats = _StepStats(on_device.z_star, _Progress(model, inversion.steps))
        gradients = controller is not None and controller.guides_target
        with autograd_models(denoiser.guider) if gradients else nullcontext():
            result = edit(denoiser, on_device, offsets=offsets,
                          x_target=None if x_target is None else x_target.to(device), callback=stats,
                          controller=controller)
        held["stats"] = stats.result()
        held["offsets"] = None if result.offsets is None else result.offsets.to(comfy.model_management.intermediate_device())
        return torch.cat([result.edited, result.source]).float()

    branches = {BRANCH_SOURCE: plan.source, BRANCH_TARGET: positive}
    try:
        samples = run_guided(model, branches, plan.negative, plan.guidance, BRANCH_TARGET, inversion.sigmas,
                             inversion.latent_shape, run, level_contexts=plan.negative_at, proximal=plan.proximal,
                             prepare=prepare)
    finally:
        if "editor" in held:
            held["editor"].close()
    edited, source = samples.split(batch)
    trajectory = OffsetTrajectory(offsets=held["offsets"], sigmas=inversion.sigmas.flip(0),
                                  mode=offsets if method.uses_offsets else "off")
    return DirectInversionOutput(edited=edited, source=source, offsets=trajectory,
                                 editor_state=held["editor"].controller if "editor" in held else None,
                                 step_stats=held.get("stats"))


def _source_guidance(model, editor, inversion: Inversion):
    """On Flux, an editor's own source prompt (PnP's empty prompt, encoded by the editor node, where no FluxGuidance
    reaches it) takes the inversion's embedded guidance, as its source branch retraces the inversion."""
    own = getattr(editor, "source_conditioning", None)
    if not own or not guidance_distilled(model) or not dataclasses.is_dataclass(editor):
        return editor
    guidance = next((o["guidance"] for _, o in inversion.conditioning if o.get("guidance") is not None), None)
    if guidance is None:
        return editor
    entries = [[c, {**o, "guidance": guidance}] for c, o in own]
    return dataclasses.replace(editor, source_conditioning=entries)


def _warn_distilled_cfg(model, cfg: float) -> None:
    if cfg != 1.0 and guidance_distilled(model):
        log.warning("[DirectInversion] Flux is guidance-distilled: cfg %.2f runs classifier-free guidance on it (twice "
                    "the cost, usually worse). Use cfg 1 and set the guidance with FluxGuidance.", cfg)


def _on_device(inversion: Inversion, device) -> Inversion:
    return replace(inversion, z_star=inversion.z_star.to(device),
                   extras={k: v.to(device) for k, v in inversion.extras.items()})


def flow_edit(model, latent: torch.Tensor, source, target, negative, steps: int = 28, source_cfg: float = 1.0,
              target_cfg: float = 1.0, options: Optional[dict] = None) -> torch.Tensor:
    """FlowEdit (``inversion.flowedit``) of a LATENT's samples with a flow model, without inversion; returns LATENT
    samples. The source and target are guided with their own cfg (SD3); Flux's guidance comes with each
    conditioning (FluxGuidance). ``options``: :class:`FlowEditOptions`' (n_max, n_min, n_avg, seed)."""
    if model_space(model) is not FLOW:
        raise ValueError("FlowEdit edits flow-matching models (SD3/SD3.5, Flux); for a UNet model invert the image and "
                         "use the Direct Inversion Sampler.")
    settings = FlowEditOptions(**(options or {}))
    check_latent_layout("latent to edit", latent, model.model.latent_format.latent_channels)
    check_latent_values("latent to edit", latent)
    for name, cfg in (("source", source_cfg), ("target", target_cfg)):
        check_number(f"FlowEdit's {name} cfg", cfg, 0.0, 100.0)
    for cfg in (source_cfg, target_cfg):
        _warn_distilled_cfg(model, cfg)
    sigmas, _ = schedule(model, steps)
    if settings.n_max > steps:
        raise ValueError(f"FlowEdit's n_max ({settings.n_max}) cannot exceed its steps ({steps}).")

    def run(denoiser, latent_image):
        return core_flow_edit(denoiser, latent_image, sigmas, settings, callback=_Progress(model, settings.n_max))

    return run_guided(model, {BRANCH_SOURCE: source, BRANCH_TARGET: target}, negative, target_cfg, BRANCH_TARGET,
                      sigmas, latent.shape, run, latent_image=latent,
                      branch_cfg={BRANCH_SOURCE: source_cfg, BRANCH_TARGET: target_cfg})
