"""Sampling through ComfyUI's machinery: a CFGGuider with one positive conditioning per branch, the core's Denoiser and
NullTextModel over it, and the run that lets ``CFGGuider.sample`` do all of ComfyUI's set-up (model loading,
conditioning processing, wrappers and patches, clean-up in ``finally``) around a core function.

The branch and trajectory level of a call travel in ``transformer_options`` (``BRANCH_OPTION``, ``LEVEL_OPTION``) so
that patches can tell them apart.
"""
from __future__ import annotations

import logging
from contextlib import ExitStack, contextmanager
from typing import Callable, Iterator, Optional

import torch

import comfy.conds
import comfy.samplers

from ..inversion import BRANCH_SOURCE, VP, Space, autograd_weights, proximal_delta
from .comfyui_models import check_conditioning, model_space

__all__ = ["BRANCH_OPTION", "LEVEL_OPTION", "BranchGuider", "ComfyDenoiser", "ComfyNullText", "autograd_models",
           "lerp_conditioning", "run_guided"]

log = logging.getLogger("DirectInversion")

BRANCH_OPTION = "direct_inversion_branch"
LEVEL_OPTION = "direct_inversion_level"


def _with_context(processed: list, context: torch.Tensor) -> list:
    """Processed conds whose cross-attention context is replaced (null-text embeddings)."""
    # the cond's own class: SD3 and Flux take their context as CONDRegular, which never pads it to another length
    return [{**c, "model_conds": {**c["model_conds"], "c_crossattn": c["model_conds"]["c_crossattn"]._copy_with(context)}}
            for c in processed]


def lerp_conditioning(source: list, null: list, weight: float) -> list:
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
    negative's cross-attention context per trajectory level. ``branch_cfg`` gives a branch a guidance scale of its own
    (FlowEdit guides its source and target differently); the others take ``cfg``.
    """

    def __init__(self, model_patcher, branches: dict, negative, cfg: float, primary: str,
                 level_contexts: Optional[Callable[[int], torch.Tensor]] = None, branch_cfg: Optional[dict] = None):
        super().__init__(model_patcher)
        self.branch_cfg = dict(branch_cfg or {})
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
                                                self.cond(branch), self.branch_cfg.get(branch, self.cfg),
                                                model_options=model_options, seed=seed)


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


def run_guided(model, branches: dict, negative, cfg: float, primary: str, sigmas: torch.Tensor, shape, run,
               latent_image: Optional[torch.Tensor] = None, level_contexts=None, proximal=("none", 0.75),
               prepare: Optional[Callable] = None, branch_cfg: Optional[dict] = None) -> torch.Tensor:
    """Sample ``run(denoiser, latent)`` inside ``CFGGuider.sample`` on a clone of ``model`` (per-run options and
    patches, ``prepare(clone)`` first, never reach the caller's ModelPatcher): ComfyUI loads the models, processes
    the conditionings of ``branches`` and ``negative`` and cleans up around it; returns what ``run`` returns, after
    ``process_latent_out``."""
    for name, conditioning in [*branches.items(), ("negative", negative)]:
        check_conditioning(model, name, conditioning)
    model = model.clone()  # per-run options and patches never reach the caller's ModelPatcher
    if prepare is not None:
        prepare(model)
    if proximal[0] != "none":
        if "sampler_cfg_function" in model.model_options:
            log.warning("[DirectInversion] proximal guidance replaces the model's sampler CFG function for this edit.")
        model.set_model_sampler_cfg_function(_proximal_cfg(*proximal))
    guider = BranchGuider(model, branches, negative, cfg, primary, level_contexts, branch_cfg)
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


@contextmanager
def autograd_models(guider) -> Iterator[None]:
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
