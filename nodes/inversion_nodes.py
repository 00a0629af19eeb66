"""Invert and Direct Inversion Sampler nodes: translation between ComfyUI types and the ComfyUI adapter."""
from __future__ import annotations

import logging

from comfy_api.latest import io

from ..adapters import comfyui_backend as backend
from ..inversion import OFFSET_MODES

log = logging.getLogger("DirectInversion")

CATEGORY = "inversion"
INVERSION = io.Custom("INVERSION")
DI_OFFSETS = io.Custom("DI_OFFSETS")
METHODS = ["ddim"]


def _samples(latent: dict, name: str):
    if "noise_mask" in latent:
        log.warning("[DirectInversion] the %s's noise_mask is ignored: inversion and sampling cover the whole image.", name)
    return latent["samples"]


class Invert(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DirectInversion_Invert",
            display_name="Invert (DDIM/NT/NP/EDICT)",
            category=CATEGORY,
            description=(
                "Inverts a real image's latent into the diffusion model's noise: runs deterministic DDIM backwards "
                "with the source prompt and keeps the whole trajectory z*_0 .. z*_T for the Direct Inversion Sampler. "
                "Defaults follow the papers' reference code (50 steps, guidance 1)."
            ),
            inputs=[
                io.Model.Input("model", tooltip="An SD1.x, SD2.x or SDXL model (LoRA and model patches applied upstream act)."),
                io.Latent.Input("latent", tooltip="The VAE-encoded source image."),
                io.Conditioning.Input("source", tooltip="The source prompt: a description of the image as it is."),
                io.Conditioning.Input("negative", tooltip="Negative conditioning, used when cfg > 1 (usually an empty prompt)."),
                io.Combo.Input("method", options=METHODS, default="ddim",
                               tooltip="ddim: plain DDIM inversion, the basis of Direct Inversion."),
                io.Int.Input("steps", default=50, min=1, max=1000,
                             tooltip="Number of DDIM steps; the sampler uses the same schedule."),
                io.Float.Input("cfg", default=1.0, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="Guidance during inversion. 1 (the reference) inverts most faithfully."),
            ],
            outputs=[
                INVERSION.Output("inversion", tooltip="The inverted trajectory, for the Direct Inversion Sampler."),
                io.Latent.Output("z_T", tooltip="The inverted noise latent, scaled for KSamplerAdvanced/SamplerCustom "
                                                 "with add_noise disabled."),
                io.Sigmas.Output("sigmas", tooltip="The DDIM schedule for SamplerCustom (euler or ddim) from z_T."),
            ],
        )

    @classmethod
    def execute(cls, model, latent, source, negative, method, steps, cfg) -> io.NodeOutput:
        if method not in METHODS:
            raise ValueError(f"Unknown inversion method {method!r}; available: {', '.join(METHODS)}.")
        out = backend.invert(model, _samples(latent, "latent"), source, negative, steps=steps, cfg=cfg)
        return io.NodeOutput(out.inversion, {"samples": out.z_T}, out.sampling_sigmas)


class DirectInversionSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DirectInversion_Sampler",
            display_name="Direct Inversion Sampler",
            category=CATEGORY,
            description=(
                "Edits an inverted image (Ju et al., PnP Inversion, ICLR 2024): a source branch and a target branch are "
                "sampled with DDIM from z*_T; after every step the source branch is put back on the inversion "
                "trajectory by the offset z*_(t-1) - step(z*_t), so it reconstructs the image exactly at any cfg. "
                "Without an editor the target branch is plain DDIM sampling along the target prompt."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The model the inversion was made with (same family and schedule)."),
                INVERSION.Input("inversion", tooltip="From the Invert node."),
                io.Conditioning.Input("target", tooltip="The target prompt: the image as it should become."),
                io.Conditioning.Input("negative", tooltip="Negative conditioning for classifier-free guidance of both branches."),
                io.Float.Input("cfg", default=7.5, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="Classifier-free guidance scale of both branches (reference: 7.5)."),
                io.Combo.Input("offsets", options=list(OFFSET_MODES), default="source",
                               tooltip="source: Direct Inversion (offsets keep the source branch on the trajectory). "
                                       "both: offsets on the target too (identity edits exact, edits weaker). "
                                       "off: plain DDIM inversion + sampling, for comparison."),
                io.Latent.Input("target_start", optional=True,
                                tooltip="Optional start of the target branch in the scaling of Invert's z_T output "
                                        "(default: z_T itself)."),
            ],
            outputs=[
                io.Latent.Output("edited", tooltip="The target branch: the edited image's latent."),
                io.Latent.Output("source_reconstruction", tooltip="The source branch: equals the source latent with offsets on."),
                DI_OFFSETS.Output("step_offsets", tooltip="Per-step offsets o_t (model latent space) with their sigmas."),
            ],
        )

    @classmethod
    def execute(cls, model, inversion, target, negative, cfg, offsets, target_start=None) -> io.NodeOutput:
        start = None if target_start is None else _samples(target_start, "target_start")
        out = backend.direct_inversion(model, inversion, target, negative, cfg=cfg, offsets=offsets,
                                       target_start=start)
        return io.NodeOutput({"samples": out.edited}, {"samples": out.source}, out.offsets)


NODES = [Invert, DirectInversionSampler]
