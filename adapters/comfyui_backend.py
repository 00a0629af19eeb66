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
"""
from __future__ import annotations

import hashlib
import logging
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass, replace
from typing import Callable, Iterator, Optional

import torch

import comfy.conds
import comfy.model_management
import comfy.model_sampling
import comfy.samplers
import comfy.utils
import latent_preview

from ..editors.attention import AttentionCall, FeatureCall, layer_orders
from ..inversion import (
    BRANCH_SOURCE,
    BRANCH_TARGET,
    Inversion,
    OffsetTrajectory,
    autograd_weights,
    FLOW,
    VP,
    Space,
    check_latent_layout,
    check_latent_values,
    edit,
    method_named,
    proximal_delta,
    resolve_offsets,
)

__all__ = ["BRANCH_OPTION", "LEVEL_OPTION", "DirectInversionOutput", "InvertOutput", "attention_layers",
           "decoder_features", "direct_inversion", "install_editor", "invert", "model_family", "model_fingerprint",
           "model_space"]

log = logging.getLogger("DirectInversion")

BRANCH_OPTION = "direct_inversion_branch"
LEVEL_OPTION = "direct_inversion_level"


def _model_sampling(model):
    return model.get_model_object("model_sampling")


def model_family(model) -> str:
    """Architecture and prediction type of a ModelPatcher, e.g. ``SD15/EPS``, ``SD3/FLOW``, ``Flux/FLOW``."""
    ms = _model_sampling(model)
    if model_space(model) is FLOW:
        prediction = "FLOW"
    else:
        prediction = "V_PREDICTION" if isinstance(ms, comfy.model_sampling.V_PREDICTION) else "EPS"
    return f"{type(model.model.model_config).__name__}/{prediction}"


def model_fingerprint(model) -> str:
    """A hash of the weights the model samples with (LoRA and other weight patches included).

    The model is loaded the way sampling loads it (patches applied), then 16 evenly spaced values of every
    diffusion-model parameter, rounded to float16 so the model's precision does not matter, are hashed with the
    parameter names and shapes.
    """
    comfy.model_management.load_models_gpu([model])
    digest = hashlib.sha256()
    for name, param in sorted(model.model.diffusion_model.named_parameters()):
        flat = param.detach().flatten()
        sample = flat[:: max(1, flat.numel() // 16)][:16].to("cpu", torch.float16)
        digest.update(f"{name}{tuple(param.shape)}".encode())
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()[:32]


def model_space(model) -> Space:
    """The model's family (``inversion.spaces``): VP for discrete-timestep eps/v-prediction models, flow for CONST
    flow-matching models (SD3/SD3.5, Flux); anything else (EDM, continuous or cosine schedules...) is refused."""
    ms = _model_sampling(model)
    sampling = comfy.model_sampling
    discrete_vp = (isinstance(ms, sampling.ModelSamplingDiscrete)
                   and not isinstance(ms, sampling.ModelSamplingDiscreteEDM)
                   and isinstance(ms, sampling.EPS)
                   and not isinstance(ms, (sampling.EDM, sampling.CONST)))
    if discrete_vp:
        return VP
    if isinstance(ms, sampling.CONST) and isinstance(ms, (sampling.ModelSamplingDiscreteFlow, sampling.ModelSamplingFlux)):
        return FLOW
    raise ValueError(
        f"Inversion needs a discrete-timestep eps- or v-prediction model (SD1.x, SD2.x, SDXL) or a flow-matching model "
        f"(SD3/SD3.5, Flux); this model ({type(model.model.model_config).__name__}) samples with {type(ms).__name__}."
    )


def _guidance_distilled(model) -> bool:
    """Flux (dev and schnell): sampled without CFG, its guidance an embedding."""
    return model.model.model_config.unet_config.get("image_model") == "flux"


def schedule(model, steps: int) -> tuple[torch.Tensor, list[int]]:
    """The model's trajectory noise levels (ascending) and timesteps for ``steps`` steps: DDIM's on VP models,
    ComfyUI's ``simple`` schedule on flow models (with the model's own shift)."""
    return model_space(model).trajectory(_model_sampling(model).sigmas, steps)


def _check_conditioning(model, name: str, conditioning) -> None:
    if not isinstance(conditioning, list) or not all(isinstance(c, (list, tuple)) and len(c) == 2 for c in conditioning):
        raise TypeError(f"The {name} conditioning is not a ComfyUI CONDITIONING (a list of [tensor, dict] pairs).")
    width = model.model.model_config.unet_config.get("context_dim")
    for embeds, _ in conditioning:
        if width is not None and embeds.shape[-1] != width:
            raise ValueError(f"The {name} conditioning has width {embeds.shape[-1]} but this model's cross-attention "
                             f"expects {width}: encode the prompt with this model's CLIP.")


def _with_context(processed: list, context: torch.Tensor) -> list:
    """Processed conds whose cross-attention context is replaced (null-text embeddings)."""
    return [{**c, "model_conds": {**c["model_conds"], "c_crossattn": comfy.conds.CONDCrossAttn(context)}}
            for c in processed]


def _lerp_conditioning(source: list, null: list, weight: float) -> list:
    """Negative-prompt inversion's unconditional input: (1 - w) source + w null, entry by entry."""
    if weight == 0.0:
        return source
    if len(source) != len(null) or any(s[0].shape != n[0].shape for s, n in zip(source, null)):
        raise ValueError("Negative-prompt interpolation needs a negative conditioning of the source's shape "
                         "(same number of entries and tokens); use interpolation 0 or a negative of equal length.")
    out = []
    for (s_emb, s_opts), (n_emb, n_opts) in zip(source, null):
        opts = dict(s_opts)
        if "pooled_output" in s_opts and "pooled_output" in n_opts:
            opts["pooled_output"] = torch.lerp(s_opts["pooled_output"], n_opts["pooled_output"].to(s_opts["pooled_output"]), weight)
        out.append([torch.lerp(s_emb, n_emb.to(s_emb), weight), opts])
    return out


class BranchGuider(comfy.samplers.CFGGuider):
    """A CFGGuider with one positive conditioning per branch and a shared negative.

    ``primary`` names the branch stored under ComfyUI's "positive" key (ControlNet hints applied to the positive
    conditioning reach the negative through it, as in KSampler). ``level_contexts`` (null-text) replaces the
    negative's cross-attention context per trajectory level.
    """

    def __init__(self, model_patcher, branches: dict, negative, cfg: float, primary: str,
                 level_contexts: Optional[Callable[[int], torch.Tensor]] = None):
        super().__init__(model_patcher)
        self.branch_keys = {name: ("positive" if name == primary else name) for name in branches}
        self.primary = primary
        self.level_contexts = level_contexts
        self._level_negatives = {}
        conds = {self.branch_keys[name]: cond for name, cond in branches.items()}
        conds["negative"] = negative
        self.inner_set_conds(conds)
        self.set_cfg(cfg)

    def cond(self, branch: str) -> list:
        return self.conds[self.branch_keys[branch]]

    def negative(self, level: Optional[int]) -> list:
        if self.level_contexts is None or level is None:
            return self.conds.get("negative", None)
        if level not in self._level_negatives:
            self._level_negatives[level] = _with_context(self.conds["negative"], self.level_contexts(level))
        return self._level_negatives[level]

    def predict_noise(self, x, timestep, model_options={}, seed=None):
        options = model_options.get("transformer_options", {})
        branch = options.get(BRANCH_OPTION, self.primary)
        return comfy.samplers.sampling_function(self.inner_model, x, timestep, self.negative(options.get(LEVEL_OPTION)),
                                                self.cond(branch), self.cfg, model_options=model_options, seed=seed)


def _derivative_via_denoised(denoise: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], z: torch.Tensor,
                             sigma: torch.Tensor, space: Space) -> torch.Tensor:
    """d = (x - D(x)) / sigma of the core's latent z from a ComfyUI denoiser D, which works in k-diffusion scaling
    x = z * space.k_scale (VP: sqrt(1 + sigma^2), d = eps; flow: 1, d = the velocity)."""
    x = z * space.k_scale_tensor(sigma)
    return (x - denoise(x, sigma.expand(z.shape[0]))) / sigma


class ComfyDenoiser:
    """The core's Denoiser over a BranchGuider that is inside ``sample`` (models loaded, conds processed)."""

    def __init__(self, guider: BranchGuider, model_options: dict, seed, space: Space = VP):
        self.guider = guider
        self.seed = seed
        self.model_options = model_options
        self.space = space

    def options(self, branch: str, level: Optional[int]) -> dict:
        transformer_options = {**self.model_options.get("transformer_options", {}), BRANCH_OPTION: branch,
                               LEVEL_OPTION: level}
        return {**self.model_options, "transformer_options": transformer_options}

    def __call__(self, z: torch.Tensor, sigma: torch.Tensor, branch: str, level: int,
                 guided: bool = True) -> torch.Tensor:
        options = self.options(branch, level)
        if not guided:
            return self.conditional(self.guider.cond(branch), z, sigma, options)
        return _derivative_via_denoised(
            lambda x, sigmas: self.guider(x, sigmas, model_options=options, seed=self.seed), z, sigma, self.space)

    def conditional(self, conds: list, z: torch.Tensor, sigma: torch.Tensor, options: dict) -> torch.Tensor:
        """eps of processed ``conds`` alone (no unconditional evaluation, no guidance)."""
        model = self.guider.inner_model
        return _derivative_via_denoised(
            lambda x, sigmas: comfy.samplers.calc_cond_batch(model, [conds], x, sigmas, options)[0], z, sigma,
            self.space)


def attention_layers(model) -> dict:
    """The UNet's attention layers in forward order, keyed ``(attn1|attn2, block, id, transformer_index)``, located
    by place (down / mid / up) and downsampling factor, read from the model's structure (SD1.x, SD2.x, SDXL)."""
    from comfy.ldm.modules.attention import SpatialTransformer
    from comfy.ldm.modules.diffusionmodules.openaimodel import Downsample, Upsample

    unet = model.model.diffusion_model
    if not all(hasattr(unet, name) for name in ("input_blocks", "middle_block", "output_blocks")):
        raise ValueError(f"Editors need a UNet (SD1.x, SD2.x, SDXL); this model's diffusion model is "
                         f"{type(unet).__name__}.")
    entries, factor = [], 1

    def add(block, place, modules):
        for module in modules:
            if isinstance(module, SpatialTransformer):
                for j, tb in enumerate(module.transformer_blocks):
                    entries.append((("attn1",) + block + (j,), place, factor, False, block[1]))
                    if getattr(tb, "attn2", None) is not None:
                        entries.append((("attn2",) + block + (j,), place, factor, True, block[1]))

    for i, block in enumerate(unet.input_blocks):
        add(("input", i), "down", block)
        if any(isinstance(m, Downsample) for m in block):
            factor *= 2
    add(("middle", 0), "mid", unet.middle_block)
    for i, block in enumerate(unet.output_blocks):
        add(("output", i), "up", block)
        if any(isinstance(m, Upsample) for m in block):
            factor //= 2
    return {layer.key: layer for layer in layer_orders(entries)}


def _attention_patch(layer, controller, previous: Optional[Callable]):
    """An attn1/attn2 replace patch: hands our sampler's calls to the editor's controller, the rest to ComfyUI's
    attention (or to the patch that was there before)."""
    import comfy.ldm.modules.attention as attention

    def patch(q, k, v, extra_options):
        heads = extra_options["n_heads"]

        def attend(q, k, v):
            if previous is not None:
                return previous(q, k, v, extra_options)
            return attention.optimized_attention(q, k, v, heads, attn_precision=extra_options.get("attn_precision"))

        branch, level = extra_options.get(BRANCH_OPTION), extra_options.get(LEVEL_OPTION)
        if branch is None or level is None:
            return attend(q, k, v)
        call = AttentionCall(layer=layer, heads=heads, branch=branch, level=level, chunks=_call_chunks(extra_options))
        if not controller.wants(call):
            return attend(q, k, v)
        return controller.attention(q, k, v, call, attend)

    return patch


def _separate_skip(h, transformer_options):
    """In a differentiated prediction, the encoder block's output goes on as a copy: ComfyUI adds ControlNet residuals
    to the stored skip tensors in place, which autograd refuses where the next block saved the same tensor."""
    return h.clone() if h.requires_grad else h


def decoder_features(model) -> dict:
    """Decoder block index -> the last convolution of the block's residual block: its output is the block's residual
    features before the skip connection is added (diffusers' ``resnets[i].conv2``)."""
    from comfy.ldm.modules.diffusionmodules.openaimodel import ResBlock

    unet = model.model.diffusion_model
    return {i: block[0].out_layers[-1] for i, block in enumerate(unet.output_blocks) if isinstance(block[0], ResBlock)}


def _call_chunks(transformer_options: dict) -> tuple:
    return tuple("uncond" if c == 1 else "cond" for c in transformer_options.get("cond_or_uncond", [0]))


def install_editor(model, editor, steps: int, latent_shape):
    """Start ``editor`` for a run and patch its hooks into ``model`` (a clone owned by the run): attention through
    ComfyUI's attn1/attn2 replace patch points; decoder features (if the editor wants them) through an output-block
    patch, which tells which prediction is running, and a forward hook on the block's last convolution.

    Returns ``(controller, remove)``: the editor's per-run state, and a function that removes the forward hooks
    (they sit on the shared diffusion model, not the clone: call it in ``finally``).
    """
    layers = attention_layers(model)
    controller = editor.start(list(layers.values()), steps, latent_shape)
    replaced = model.model_options.get("transformer_options", {}).get("patches_replace", {})
    for key, layer in layers.items():
        name, block = key[0], key[1:]
        previous = replaced.get(name, {}).get(block)
        if previous is not None:
            log.info("[DirectInversion] the editor runs before an existing %s patch at %s.", name, block)
        model.set_model_patch_replace(_attention_patch(layer, controller, previous), name, block[0], block[1], block[2])
    if controller.guides_target:
        model.set_model_input_block_patch_after_skip(_separate_skip)
    if not controller.feature_blocks:
        return controller, lambda: None
    features = decoder_features(model)
    missing = sorted(set(controller.feature_blocks) - set(features))
    if missing:
        raise ValueError(f"The editor wants the features of decoder block(s) {missing}, but this UNet's decoder has "
                         f"blocks 0 .. {len(model.model.diffusion_model.output_blocks) - 1}.")
    pending = {}  # decoder block -> FeatureCall of the prediction that is about to run it

    def output_block_patch(h, hsp, transformer_options):
        place, index = transformer_options.get("block", (None, None))
        branch, level = transformer_options.get(BRANCH_OPTION), transformer_options.get(LEVEL_OPTION)
        if place == "output" and index in controller.feature_blocks:
            pending[index] = None if branch is None or level is None else FeatureCall(
                block=index, branch=branch, level=level, chunks=_call_chunks(transformer_options))
        return h, hsp

    def hook_for(index):
        def hook(module, inputs, output):
            call = pending.pop(index, None)
            return None if call is None else controller.feature(output, call)
        return hook

    model.set_model_output_block_patch(output_block_patch)
    handles = [features[index].register_forward_hook(hook_for(index)) for index in sorted(controller.feature_blocks)]

    def remove():
        for handle in handles:
            handle.remove()
        pending.clear()

    return controller, remove


class ComfyNullText:
    """The core's NullTextModel: conditional eps of the source and a differentiable unconditional eps."""

    def __init__(self, denoiser: ComfyDenoiser):
        self.denoiser = denoiser
        negative = denoiser.guider.conds["negative"]
        if len(negative) != 1:
            raise ValueError("Null-text inversion optimises one negative (empty prompt) conditioning; the negative "
                             f"has {len(negative)} entries. Use a single CLIP Text Encode with an empty prompt.")
        self.null_embedding = negative[0]["model_conds"]["c_crossattn"].cond

    def _eps(self, conds: list, z: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return self.denoiser.conditional(conds, z, sigma, self.denoiser.options(BRANCH_SOURCE, None))

    def eps_source(self, z, sigma):
        return self._eps(self.denoiser.guider.cond(BRANCH_SOURCE), z, sigma)

    def eps_null(self, z, sigma, embedding):
        return self._eps(_with_context(self.denoiser.guider.conds["negative"], embedding), z, sigma)


class _CoreSampler(comfy.samplers.Sampler):
    """A SAMPLER that hands the guider to a core function, so CFGGuider.sample does all of ComfyUI's set-up."""

    def __init__(self, run: Callable[[ComfyDenoiser, torch.Tensor], torch.Tensor], space: Space):
        self.run = run
        self.space = space

    def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None,
               disable_pbar=False):
        denoiser = ComfyDenoiser(model_wrap, extra_args["model_options"], extra_args.get("seed"), self.space)
        return self.run(denoiser, latent_image)


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


def _run(model, branches: dict, negative, cfg: float, primary: str, sigmas: torch.Tensor, shape, run,
         latent_image: Optional[torch.Tensor] = None, level_contexts=None, proximal=("none", 0.75),
         prepare: Optional[Callable] = None) -> torch.Tensor:
    for name, conditioning in [*branches.items(), ("negative", negative)]:
        _check_conditioning(model, name, conditioning)
    model = model.clone()  # per-run options and patches never reach the caller's ModelPatcher
    if prepare is not None:
        prepare(model)
    if proximal[0] != "none":
        if "sampler_cfg_function" in model.model_options:
            log.warning("[DirectInversion] proximal guidance replaces the model's sampler CFG function for this edit.")
        model.set_model_sampler_cfg_function(_proximal_cfg(*proximal))
    guider = BranchGuider(model, branches, negative, cfg, primary, level_contexts)
    noise = torch.zeros(shape)
    latent = noise if latent_image is None else latent_image
    sampling_sigmas = sigmas.flip(0).to(torch.float32)
    return guider.sample(noise, latent, _CoreSampler(run, model_space(model)), sampling_sigmas, disable_pbar=True,
                         seed=0)


def _proximal_cfg(mode: str, quantile: float):
    """A sampler CFG function: uncond + scale * prox(cond - uncond); ComfyUI hands it x - denoised = sigma * eps."""

    def cfg_function(args):
        cond, uncond = args["cond"], args["uncond"]
        return uncond + args["cond_scale"] * proximal_delta(cond - uncond, mode, quantile)

    return cfg_function


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
    inverter.check_space(space, distilled=_guidance_distilled(model))
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

    z_T = _run(model, {BRANCH_SOURCE: positive}, negative, guidance, BRANCH_SOURCE, sigmas, latent.shape, run,
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
    plan = method.plan(inversion, cfg, negative, editor, lerp=_lerp_conditioning)
    if plan.guidance != cfg:
        log.info("[DirectInversion] %s edits use the inversion's guidance %.2f; cfg %.2f does not apply.",
                 inversion.method, plan.guidance, cfg)
    batch = inversion.latent_shape[0]
    held = {}

    def prepare(clone):
        if editor is not None:
            held["controller"], held["remove"] = install_editor(clone, editor, inversion.steps, inversion.latent_shape)

    def run(denoiser, latent_image):
        device = latent_image.device
        controller = held.get("controller")
        on_device = _on_device(inversion, device)
        stats = _StepStats(on_device.z_star, _Progress(model, inversion.steps))
        gradients = controller is not None and controller.guides_target
        try:
            with _autograd_models(denoiser.guider) if gradients else nullcontext():
                result = edit(denoiser, on_device, offsets=offsets,
                              x_target=None if x_target is None else x_target.to(device), callback=stats,
                              controller=controller)
        finally:
            if controller is not None:
                controller.finish()
        held["stats"] = stats.result()
        held["offsets"] = None if result.offsets is None else result.offsets.to(comfy.model_management.intermediate_device())
        return torch.cat([result.edited, result.source]).float()

    branches = {BRANCH_SOURCE: plan.source, BRANCH_TARGET: positive}
    try:
        samples = _run(model, branches, plan.negative, plan.guidance, BRANCH_TARGET, inversion.sigmas,
                       inversion.latent_shape, run, level_contexts=plan.negative_at, proximal=plan.proximal,
                       prepare=prepare)
    finally:
        if "remove" in held:
            held["remove"]()
    edited, source = samples.split(batch)
    trajectory = OffsetTrajectory(offsets=held["offsets"], sigmas=inversion.sigmas.flip(0),
                                  mode=offsets if method.uses_offsets else "off")
    return DirectInversionOutput(edited=edited, source=source, offsets=trajectory,
                                 editor_state=held.get("controller"), step_stats=held.get("stats"))


@contextmanager
def _autograd_models(guider) -> Iterator[None]:
    """``autograd_weights`` on every model the sampling loaded: the diffusion model and what the conditioning brought
    (ControlNets, which also see the latent a gradient flows to)."""
    modules = {id(guider.inner_model): guider.inner_model}
    for patcher in getattr(guider, "loaded_models", None) or []:
        module = getattr(patcher, "model", None)
        if isinstance(module, torch.nn.Module):
            modules.setdefault(id(module), module)
    with ExitStack() as stack:
        for module in modules.values():
            stack.enter_context(autograd_weights(module))
        yield


def _on_device(inversion: Inversion, device) -> Inversion:
    return replace(inversion, z_star=inversion.z_star.to(device),
                   extras={k: v.to(device) for k, v in inversion.extras.items()})
