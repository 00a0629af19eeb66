"""Invert, Direct Inversion Sampler, method options and Save/Load Inversion nodes: translation between ComfyUI
types and the ComfyUI adapter."""
from __future__ import annotations

import logging
import os

import folder_paths
from comfy_api.latest import io, ui as comfy_ui

from ..adapters import comfyui_backend as backend
from ..inversion import METHODS, OFFSET_CHOICES, PROXIMAL_MODES, Inversion
from ..inversion.storage import load_inversion, save_inversion
from .editor_nodes import EDITOR, maps_image
from .web_api import chart

log = logging.getLogger("DirectInversion")

CATEGORY = "inversion"
INVERSION = io.Custom("INVERSION")
INVERSION_OPTIONS = io.Custom("INVERSION_OPTIONS")
DI_OFFSETS = io.Custom("DI_OFFSETS")
INVERSIONS_FOLDER = "inversions"


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
                "Inverts a real image's latent into the diffusion model's noise along its schedule and keeps the "
                "trajectory for the Direct Inversion Sampler. UNet models (SD1.x/SD2.x/SDXL): ddim: plain DDIM "
                "inversion. null_text: DDIM, then one optimised unconditional embedding per step (Mokady et al.). "
                "negative_prompt: DDIM, edited with the source prompt as the unconditional input (Miyake et al.). "
                "edict: exact inversion with two coupled latents (Wallace et al.). Flow models (SD3/SD3.5, Flux): "
                "euler: the flow ODE run backwards; rf_solver: RF-Solver's second-order steps (two evaluations per "
                "step, closer without offsets); negative_prompt and null_text as above. Defaults follow the papers' "
                "reference code; connect a method's Options node to change them."
            ),
            inputs=[
                io.Model.Input("model", tooltip="An SD1.x, SD2.x, SDXL, SD3/SD3.5 or Flux model (LoRA and model patches "
                                                "applied upstream act)."),
                io.Latent.Input("latent", tooltip="The VAE-encoded source image."),
                io.Conditioning.Input("source", tooltip="The source prompt: a description of the image as it is."),
                io.Conditioning.Input("negative", tooltip="The empty prompt: guidance when cfg > 1, null-text's starting "
                                                          "embedding, EDICT's unconditional input."),
                io.Combo.Input("method", options=list(METHODS), default="ddim",
                               tooltip="UNets: ddim, null_text (slow, most faithful), negative_prompt (fast, no "
                                       "optimisation), edict (exact). Flow models (SD3, Flux): euler, rf_solver "
                                       "(second order), negative_prompt, null_text."),
                io.Int.Input("steps", default=50, min=1, max=1000,
                             tooltip="Number of steps (DDIM's on UNets, the simple schedule on flow models); the "
                                     "sampler uses the same schedule."),
                io.Float.Input("cfg", default=1.0, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="Guidance of the DDIM inversion pass (reference: 1). EDICT uses its own (3)."),
                INVERSION_OPTIONS.Input("options", optional=True,
                                        tooltip="Options of the chosen method, from its Options node (defaults otherwise)."),
            ],
            outputs=[
                INVERSION.Output("inversion", display_name="inversion",
                                 tooltip="The inverted trajectory, for the Direct Inversion Sampler."),
                io.Latent.Output("z_T", display_name="z_T",
                                 tooltip="The inverted noise latent, scaled for KSamplerAdvanced/SamplerCustom "
                                         "with add_noise disabled (UNet models: ComfyUI rescales a flow model's "
                                         "input latent, so there use the Direct Inversion Sampler)."),
                io.Sigmas.Output("sigmas", display_name="sigmas",
                                 tooltip="The DDIM schedule for SamplerCustom (euler or ddim) from z_T."),
            ],
        )

    @classmethod
    def execute(cls, model, latent, source, negative, method, steps, cfg, options=None) -> io.NodeOutput:
        overrides = None
        if options is not None:
            if options["method"] != method:
                raise ValueError(f"The connected options are for {options['method']} but the method is {method}; "
                                 f"connect the {method} Options node or change the method.")
            overrides = options["options"]
        out = backend.invert(model, _samples(latent, "latent"), source, negative, steps=steps, cfg=cfg, method=method,
                             options=overrides)
        return io.NodeOutput(out.inversion, {"samples": out.z_T}, out.sampling_sigmas, ui=inversion_chart(out.inversion))


def _options_node(node_id: str, display_name: str, method: str, description: str, inputs: list) -> type:
    """An Options node: its widgets, as a dict, for the Invert node's ``options`` input."""

    class OptionsNode(io.ComfyNode):
        @classmethod
        def define_schema(cls) -> io.Schema:
            return io.Schema(node_id=node_id, display_name=display_name, category=CATEGORY, description=description,
                             inputs=inputs,
                             outputs=[INVERSION_OPTIONS.Output("options", display_name="options",
                                                               tooltip=f"For Invert with method {method}.")])

        @classmethod
        def execute(cls, **values) -> io.NodeOutput:
            return io.NodeOutput({"method": method, "options": values})

    OptionsNode.__name__ = OptionsNode.__qualname__ = node_id
    return OptionsNode


NullTextOptions = _options_node(
    "DirectInversion_NullTextOptions", "Null-text Options", "null_text",
    "Null-text inversion settings (reference: google/prompt-to-prompt NullInversion).",
    [io.Float.Input("guidance", default=7.5, min=1.0, max=30.0, step=0.1, tooltip="Guidance the embeddings are optimised for (use the sampler's cfg)."),
     io.Int.Input("inner_steps", default=10, min=1, max=100, tooltip="Adam iterations per step at most."),
     io.Float.Input("early_stop", default=1e-5, min=0.0, max=1.0, step=1e-6, round=False,
                    tooltip="Stop a step's optimisation once the loss < early_stop + step * 2e-5."),
     io.Float.Input("lr", default=1e-2, min=1e-5, max=1.0, step=1e-4, round=False,
                    tooltip="Adam learning rate at the first step, decaying by 1% per step.")])

NegativePromptOptions = _options_node(
    "DirectInversion_NegativePromptOptions", "Negative-prompt Options", "negative_prompt",
    "Negative-prompt inversion settings (Miyake et al.; proximal guidance as in the PnPInversion code).",
    [io.Float.Input("interpolation", default=0.0, min=0.0, max=1.0, step=0.05,
                    tooltip="0: the source prompt is the unconditional input; 1: the negative prompt."),
     io.Combo.Input("proximal", options=list(PROXIMAL_MODES), default="none",
                    tooltip="Proximal guidance: keep only the strongest part of the guidance (PIE-Bench runs: l0)."),
     io.Float.Input("quantile", default=0.75, min=-1.0, max=0.99, step=0.05,
                    tooltip="Proximal threshold: this quantile of |cond - uncond| (negative: a fixed threshold).")])

EdictOptions = _options_node(
    "DirectInversion_EdictOptions", "EDICT Options", "edict",
    "EDICT settings (reference: salesforce/EDICT EDICT_editing).",
    [io.Float.Input("mix", default=0.93, min=0.51, max=1.0, step=0.01, tooltip="Mixing weight p of the coupled latents."),
     io.Float.Input("strength", default=0.8, min=0.01, max=1.0, step=0.01,
                    tooltip="Fraction of the steps to invert and regenerate (higher: stronger edits)."),
     io.Float.Input("guidance", default=3.0, min=1.0, max=30.0, step=0.1,
                    tooltip="Guidance of both inversion and generation (the sampler's cfg does not apply)."),
     io.Boolean.Input("leapfrog", default=True, tooltip="Alternate which latent is updated first.")])


class FlowEdit(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DirectInversion_FlowEdit",
            display_name="FlowEdit (SD3/Flux)",
            category=CATEGORY,
            description=(
                "Inversion-free editing of flow-matching models (Kulikov et al., FlowEdit): the image's latent moves "
                "along the difference of the target's and the source's velocities at noised copies sharing their "
                "noise, so what the prompts agree on cancels. No Invert node. The first steps - n_max steps are "
                "skipped (larger n_max: stronger edits, less of the image kept); the last n_min sample the target "
                "alone. The reference's settings: SD3/SD3.5 50 steps, n_max 33, cfg 3.5 (source) and 13.5 (target); "
                "Flux dev 28 steps, n_max 24, cfg 1 with FluxGuidance 1.5 on the source and 5.5 on the target."
            ),
            inputs=[
                io.Model.Input("model", tooltip="An SD3/SD3.5 or Flux model."),
                io.Latent.Input("latent", tooltip="The VAE-encoded source image."),
                io.Conditioning.Input("source", tooltip="The source prompt: the image as it is (Flux: through "
                                                        "FluxGuidance, reference 1.5)."),
                io.Conditioning.Input("target", tooltip="The target prompt (Flux: through FluxGuidance, reference 5.5)."),
                io.Conditioning.Input("negative", tooltip="Negative conditioning of both prompts' guidance (unused at "
                                                          "cfg 1)."),
                io.Int.Input("steps", default=28, min=1, max=1000,
                             tooltip="Steps of the model's simple schedule (reference: SD3 50, Flux 28)."),
                io.Int.Input("n_max", default=24, min=1, max=1000,
                             tooltip="The edit runs the last n_max steps (reference: SD3 33 of 50, Flux 24 of 28)."),
                io.Int.Input("n_min", default=0, min=0, max=1000,
                             tooltip="The last n_min steps sample the target alone (reference: 0)."),
                io.Int.Input("n_avg", default=1, min=1, max=16,
                             tooltip="Noise draws averaged per step (each costs both predictions again)."),
                io.Float.Input("source_cfg", default=1.0, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="Guidance of the source prediction (SD3: 3.5; Flux: 1)."),
                io.Float.Input("target_cfg", default=1.0, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="Guidance of the target prediction (SD3: 13.5; Flux: 1)."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Seed of the noise FlowEdit draws."),
            ],
            outputs=[io.Latent.Output("edited", display_name="edited", tooltip="The edited image's latent.")],
        )

    @classmethod
    def execute(cls, model, latent, source, target, negative, steps, n_max, n_min, n_avg, source_cfg, target_cfg,
                seed) -> io.NodeOutput:
        samples = backend.flow_edit(model, _samples(latent, "latent"), source, target, negative, steps=steps,
                                    source_cfg=source_cfg, target_cfg=target_cfg,
                                    options={"n_max": n_max, "n_min": n_min, "n_avg": n_avg, "seed": seed})
        return io.NodeOutput({"samples": samples})


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
                "Without an editor the target branch is plain DDIM sampling along the target prompt; with one (P2P "
                "Editor) the target takes the source's attention as the editor says. Null-text uses its "
                "optimised embeddings and negative-prompt the source prompt as unconditional input; EDICT samples its "
                "coupled latents (exact without offsets)."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The model the inversion was made with (same family and schedule)."),
                INVERSION.Input("inversion", tooltip="From the Invert or Load Inversion node."),
                io.Conditioning.Input("target", tooltip="The target prompt: the image as it should become."),
                io.Conditioning.Input("negative", tooltip="Negative conditioning for classifier-free guidance of both branches "
                                                          "(null-text uses its own; negative-prompt interpolates toward it)."),
                io.Float.Input("cfg", default=7.5, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="Classifier-free guidance scale of both branches (reference: 7.5)."),
                io.Combo.Input("offsets", options=list(OFFSET_CHOICES), default="auto",
                               tooltip="auto: the editor's default (P2P-Zero: both, as its reference; otherwise "
                                       "source). source: Direct Inversion (offsets keep the source branch on the trajectory). "
                                       "both: offsets on the target too (identity edits exact, edits weaker). "
                                       "off: no offsets, the method's own sampling, for comparison."),
                io.Latent.Input("target_start", optional=True,
                                tooltip="Optional start of the target branch in the scaling of Invert's z_T output "
                                        "(default: z_T itself)."),
                EDITOR.Input("editor", optional=True,
                             tooltip="An editor (P2P, MasaCtrl, PnP or P2P-Zero Editor; on SD3/Flux P2P, MasaCtrl or PnP, "
                                     "on their joint attention) acting on the target branch; its target "
                                     "conditioning goes to the target input."),
            ],
            outputs=[
                io.Latent.Output("edited", display_name="edited",
                                 tooltip="The target branch: the edited image's latent."),
                io.Latent.Output("source_reconstruction", display_name="source_reconstruction",
                                 tooltip="The source branch: equals the source latent with offsets on."),
                DI_OFFSETS.Output("step_offsets", display_name="step_offsets",
                                  tooltip="Per-step offsets o_t (model latent space) with their sigmas; "
                                          "empty (None) when an editor runs with offsets=source, which "
                                          "skips the source's unconditional prediction."),
                io.Image.Output("attention_maps", display_name="attention_maps",
                                tooltip="The editor's cross-attention maps per word of the target "
                                        "prompt (averaged over the steps), what local blend and "
                                        "reweight act on."),
            ],
        )

    @classmethod
    def execute(cls, model, inversion, target, negative, cfg, offsets, target_start=None, editor=None) -> io.NodeOutput:
        start = None if target_start is None else _samples(target_start, "target_start")
        out = backend.direct_inversion(model, inversion, target, negative, cfg=cfg, offsets=offsets,
                                       target_start=start, editor=editor)
        maps = maps_image(out.editor_state)
        ui = chart("Direct Inversion: per step (RMS)", {
            "source error": out.step_stats["source_error"], "offset": out.step_stats["offset_rms"]})
        if hasattr(out.editor_state, "word_maps"):  # the attention maps, shown on the node
            ui.update(comfy_ui.PreviewImage(maps, cls=cls).as_dict())
        idle = getattr(out.editor_state, "idle_reason", None)
        if idle:  # settings that make the editor do nothing: said on the node too (the web extension shows it)
            ui["direct_inversion_warnings"] = [idle]
        return io.NodeOutput({"samples": out.edited}, {"samples": out.source}, out.offsets, maps, ui=ui)


def inversion_chart(inversion) -> dict:
    """Per inversion step: the RMS step size of the trajectory and, for null-text, the first and last inner loss."""
    z = inversion.z_star.float()
    series = {"step size": (z[1:] - z[:-1]).flatten(1).pow(2).mean(1).sqrt().tolist()}
    losses = inversion.extras.get("null_text_losses")
    if losses is not None:
        series["NT loss (first)"] = losses[:, 0].tolist()
        last = [row[~row.isnan()][-1].item() if (~row.isnan()).any() else float("nan") for row in losses]
        series["NT loss (last)"] = last
    return chart(f"{inversion.method} inversion: per step", series)


def _inversions_dir() -> str:
    return os.path.join(folder_paths.get_output_directory(), INVERSIONS_FOLDER)


def saved_inversions() -> list[str]:
    """Saved inversion files, relative to the output directory's inversions folder."""
    root = _inversions_dir()
    found = []
    for folder, _, files in os.walk(root):
        found += [os.path.relpath(os.path.join(folder, f), root) for f in files if f.endswith(".safetensors")]
    return sorted(found)


class SaveInversion(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DirectInversion_SaveInversion",
            display_name="Save Inversion",
            category=CATEGORY,
            description=f"Writes an inversion to ComfyUI's output/{INVERSIONS_FOLDER} folder as a .safetensors file, "
                        "so an expensive inversion (null-text) is made once and reused across edits and restarts.",
            inputs=[
                INVERSION.Input("inversion"),
                io.String.Input("filename_prefix", default="inversion",
                                tooltip=f"File name prefix inside output/{INVERSIONS_FOLDER}; a counter is added."),
            ],
            outputs=[],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, inversion, filename_prefix) -> io.NodeOutput:
        root = _inversions_dir()
        os.makedirs(root, exist_ok=True)
        folder, name, counter, subfolder, _ = folder_paths.get_save_image_path(filename_prefix, root)
        path = os.path.join(folder, f"{name}_{counter:05}_.safetensors")
        save_inversion(inversion, path)
        log.info("[DirectInversion] inversion saved to %s", path)
        return io.NodeOutput(ui={"text": [os.path.relpath(path, root)]})


class LoadInversion(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DirectInversion_LoadInversion",
            display_name="Load Inversion",
            category=CATEGORY,
            description=f"Reads an inversion saved by Save Inversion from output/{INVERSIONS_FOLDER}, and checks it "
                        "belongs to this model (family and weights) and, if a latent is given, to its size.",
            inputs=[
                io.Model.Input("model", tooltip="The model to edit with: it must be the one the inversion was made with."),
                io.Combo.Input("inversion_file", options=saved_inversions(),
                               tooltip=f"A file in output/{INVERSIONS_FOLDER}."),
                io.Latent.Input("latent", optional=True, tooltip="Optional: the source image's latent, to check the size."),
            ],
            outputs=[INVERSION.Output("inversion", display_name="inversion")],
        )

    @classmethod
    def execute(cls, model, inversion_file, latent=None) -> io.NodeOutput:
        root = os.path.abspath(_inversions_dir())
        path = os.path.abspath(os.path.join(root, inversion_file))
        if os.path.commonpath((root, path)) != root or not os.path.isfile(path):
            raise ValueError(f"No saved inversion {inversion_file!r} in {root}.")
        inversion = load_inversion(path)
        check_loaded(inversion, model, inversion_file)
        if latent is not None:
            inversion.check_latent(latent["samples"], "latent")
        return io.NodeOutput(inversion)


def check_loaded(inversion: Inversion, model, name: str) -> None:
    """A loaded inversion must come from this model: family first, then the weights' fingerprint."""
    inversion.check_model(backend.model_family(model), backend.model_space(model).name)
    fingerprint = backend.model_fingerprint(model)
    if inversion.fingerprint != fingerprint:
        raise ValueError(f"{name} was made with other model weights (fingerprint {inversion.fingerprint}, this model "
                         f"{fingerprint}): a LoRA, checkpoint or merge differs. Invert again with this model.")


NODES = [Invert, NullTextOptions, NegativePromptOptions, EdictOptions, DirectInversionSampler, FlowEdit, SaveInversion,
         LoadInversion]
