"""Editor nodes (P2P, MasaCtrl, PnP, P2P-Zero) and the attention-map view: translation between ComfyUI types and ``editors``."""
from __future__ import annotations

import torch
from comfy_api.latest import io

from ..adapters.comfyui_prompts import directed_conditioning, encoder_prompts, tokenized_prompt
from ..editors import P2P_MODES, MasaCtrlEditor, P2PZeroEditor, PnPEditor, prompt_to_prompt, word_positions

CATEGORY = "inversion/editors"
EDITOR = io.Custom("EDITOR")


def parse_words(text: str) -> list[str]:
    """Comma-separated words or phrases (a phrase is space-separated words of the prompt)."""
    return [w.strip() for w in text.split(",") if w.strip()]


def parse_reweight(words: str, values: str) -> list[tuple[str, float]]:
    names = parse_words(words)
    numbers = [v.strip() for v in values.split(",") if v.strip()]
    if len(names) != len(numbers):
        raise ValueError(f"reweight needs one value per word: {len(names)} word(s) ({', '.join(names) or 'none'}) "
                         f"and {len(numbers)} value(s).")
    try:
        return [(name, float(v)) for name, v in zip(names, numbers)]
    except ValueError:
        raise ValueError(f"reweight values must be numbers separated by commas, got {values!r}") from None


def _editor_outputs() -> list:
    """Every editor node's outputs: the EDITOR and both prompts encoded."""
    return [
        EDITOR.Output("editor", display_name="editor", tooltip="For the Direct Inversion Sampler's editor input."),
        io.Conditioning.Output("source", display_name="source", tooltip="The encoded source prompt (for Invert)."),
        io.Conditioning.Output("target", display_name="target",
                               tooltip="The encoded target prompt (for the sampler)."),
    ]


def _prompts(clip, source_prompt: str, target_prompt: str):
    """Both prompts with their word positions, from the CLIP given."""
    if clip is None:
        raise RuntimeError("The clip input is invalid: the checkpoint has no text encoder.")
    return tokenized_prompt(clip, source_prompt, "source"), tokenized_prompt(clip, target_prompt, "target")


class P2PEditorNode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DirectInversion_P2PEditor",
            display_name="P2P Editor",
            category=CATEGORY,
            description=(
                "Prompt-to-Prompt (Hertz et al.) for the Direct Inversion Sampler's editor input. Encodes the source "
                "prompt (for Invert) and the target prompt (for the sampler) with the CLIP given and aligns their "
                "words. replace: a word swap (same number of words), the target takes the source's cross-attention "
                "maps through the word mapping; refine: words added or changed freely, maps carried over along a "
                "global token alignment; auto: replace when the word counts agree, otherwise refine. reweight scales "
                "the attention of target words (same prompt twice = reweight alone). Local blend keeps everything "
                "outside the blend words' attention (or the mask) from the source branch. Defaults: PIE-Bench runs of "
                "the PnP Inversion code (cross 0.4, self 0.6, blend threshold 0.3 from 0.2 of the steps). On SD3/Flux "
                "the joint attention's image -> text block plays the cross-attention and its image -> image block the "
                "self-attention (a word's tokens: its CLIP and T5 positions on SD3, T5's on Flux); put FluxGuidance "
                "after the outputs on Flux."
            ),
            inputs=[
                io.Clip.Input("clip", tooltip="The model's text encoder; its tokenizer aligns the prompts' words."),
                io.String.Input("source_prompt", multiline=True, default="a cat sitting on a bench",
                                tooltip="What the image shows."),
                io.String.Input("target_prompt", multiline=True, default="a dog sitting on a bench",
                                tooltip="What it should show."),
                io.Combo.Input("mode", options=list(P2P_MODES), default="auto",
                               tooltip="auto: replace when the prompts have the same number of words, else refine."),
                io.Float.Input("cross_replace_steps", default=0.4, min=0.0, max=1.0, step=0.05,
                               tooltip="Fraction of the steps whose cross-attention maps come from the source "
                                       "(PIE-Bench 0.4, the P2P examples 0.8)."),
                io.Float.Input("self_replace_steps", default=0.6, min=0.0, max=1.0, step=0.05,
                               tooltip="Fraction of the steps whose self-attention (UNets: layers of at most 32x32 "
                                       "queries; SD3/Flux: every joint block's image -> image attention) comes from "
                                       "the source."),
                io.String.Input("reweight_words", default="", tooltip="Comma-separated words of the target prompt to reweight."),
                io.String.Input("reweight_values", default="", tooltip="Comma-separated scales, one per reweight word "
                                                                        "(e.g. 2 strengthens, 0 removes)."),
                io.String.Input("blend_source_words", default="",
                                tooltip="Local blend: comma-separated words of the source prompt whose region may change."),
                io.String.Input("blend_target_words", default="",
                                tooltip="Local blend: comma-separated words of the target prompt whose region may change."),
                io.Float.Input("blend_threshold", default=0.3, min=0.0, max=1.0, step=0.05,
                               tooltip="Local blend's threshold on the normalised attention maps."),
                io.Float.Input("blend_start", default=0.2, min=0.0, max=1.0, step=0.05,
                               tooltip="Local blend acts from this fraction of the steps on."),
                io.Mask.Input("mask", optional=True,
                              tooltip="Local blend with your own region (1: may change) instead of blend words."),
            ],
            outputs=_editor_outputs(),
        )

    @classmethod
    def execute(cls, clip, source_prompt, target_prompt, mode, cross_replace_steps, self_replace_steps,
                reweight_words, reweight_values, blend_source_words, blend_target_words, blend_threshold, blend_start,
                mask=None) -> io.NodeOutput:
        source, target = _prompts(clip, source_prompt, target_prompt)
        editor = prompt_to_prompt(
            source.prompt, target.prompt, mode=mode, cross_replace_steps=cross_replace_steps,
            self_replace_steps=self_replace_steps, reweight=parse_reweight(reweight_words, reweight_values),
            blend_source_words=parse_words(blend_source_words), blend_target_words=parse_words(blend_target_words),
            blend_threshold=blend_threshold, blend_start=blend_start, mask=mask, max_tokens=source.window,
            encoders=encoder_prompts(clip, source, target))
        return io.NodeOutput(editor, source.encode(clip), target.encode(clip))


class MasaCtrlEditorNode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DirectInversion_MasaCtrlEditor",
            display_name="MasaCtrl Editor",
            category=CATEGORY,
            description=(
                "MasaCtrl (Cao et al.) for non-rigid edits (pose, action, viewpoint: 'a cat sitting' -> 'a cat "
                "jumping') through the Direct Inversion Sampler's editor input: from start_step and start_layer on, "
                "the target's self-attention queries attend to the source's keys and values (unconditional and "
                "conditional halves each to their own). Encodes both prompts (the source prompt may be empty, as in "
                "the PnP Inversion runs). Layers count the UNet's transformer blocks in forward order; start_layer "
                "-1 takes the reference's 10 of SD1.x/SD2.x's 16 (the decoder) or the same position elsewhere "
                "(SDXL: 44 of 70). A mask, or a word of each prompt (automatic mask from its cross-attention, "
                "threshold 0.1), makes foreground and background attend separately. On SD3/Flux the target's image "
                "tokens attend to its own text and the source's image keys and values; layers count the transformer "
                "blocks (Flux: double-stream, then single-stream), -1 is the same relative depth; mask words are not "
                "available there (a MASK is)."
            ),
            inputs=[
                io.Clip.Input("clip", tooltip="The model's text encoder."),
                io.String.Input("source_prompt", multiline=True, default="", tooltip="What the image shows (may be empty)."),
                io.String.Input("target_prompt", multiline=True, default="a photo of a cat jumping",
                                tooltip="The pose or action it should show."),
                io.Int.Input("start_step", default=4, min=0, max=1000, tooltip="First step with mutual self-attention (reference: 4 of 50)."),
                io.Int.Input("start_layer", default=-1, min=-1, max=200,
                             tooltip="First transformer block with it (forward order); -1: the family's default."),
                io.String.Input("mask_source_word", default="",
                                tooltip="Automatic mask: a word of the source prompt (the object in the image)."),
                io.String.Input("mask_target_word", default="",
                                tooltip="Automatic mask: the same object's word in the target prompt."),
                io.Float.Input("mask_threshold", default=0.1, min=0.0, max=1.0, step=0.05,
                               tooltip="Threshold of the automatic masks on the min-max normalised attention."),
                io.Mask.Input("mask", optional=True, tooltip="Foreground mask of the object (instead of mask words)."),
            ],
            outputs=_editor_outputs(),
        )

    @classmethod
    def execute(cls, clip, source_prompt, target_prompt, start_step, start_layer, mask_source_word, mask_target_word,
                mask_threshold, mask=None) -> io.NodeOutput:
        source, target = _prompts(clip, source_prompt, target_prompt)
        words = (mask_source_word.strip(), mask_target_word.strip())
        positions = ((), ())
        if any(words):
            if not all(words):
                raise ValueError("MasaCtrl's automatic mask needs a word of each prompt: set both mask_source_word "
                                 "and mask_target_word, or neither.")
            positions = (tuple(word_positions(source.prompt, words[0])), tuple(word_positions(target.prompt, words[1])))
        editor = MasaCtrlEditor(start_step=start_step, start_layer=None if start_layer < 0 else start_layer,
                                mask=None if mask is None else mask.float(), source_positions=positions[0],
                                target_positions=positions[1], mask_threshold=mask_threshold)
        return io.NodeOutput(editor, source.encode(clip), target.encode(clip))


def _encode(clip, text: str) -> list:
    if clip is None:
        raise RuntimeError("The clip input is invalid: the checkpoint has no text encoder.")
    return clip.encode_from_tokens_scheduled(clip.tokenize(text))


class PnPEditorNode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DirectInversion_PnPEditor",
            display_name="PnP Editor",
            category=CATEGORY,
            description=(
                "Plug-and-Play (Tumanyan et al.) for structure-preserving translation ('a photo of a horse' -> 'a "
                "sketch of a horse') through the Direct Inversion Sampler's editor input. The source branch "
                "reconstructs the image with the empty prompt, unguided (on the inversion's latents with offsets "
                "'source', on its own DDIM path with 'off'); during the first feature_injection of the steps the "
                "target takes the source's residual features of decoder block feature_block (before the skip is "
                "added), during the first attention_injection its self-attention queries and keys from "
                "attention_from_block on; both target halves share the one source prediction (3 UNet samples per "
                "step). The sampler's negative is the reference's negative prompt. Blocks count the decoder's blocks "
                "in forward order (SD1.x/SD2.x: 12, SDXL: 9); the defaults 4 / 4 are the reference's second resnet of "
                "the first upsampled level (diffusers up_blocks[1].resnets[1]) and self-attention of decoder layers "
                "4-11 on SD1.x/SD2.x; on SDXL they give that resnet and the self-attention of blocks 4-5. EDICT keeps "
                "its source on the inversion's prompt, guided. On SD3/Flux the target's image tokens take the source's "
                "values (feature_injection) and queries/keys (attention_injection) in the family's PnP blocks (Flux: "
                "single-stream 20-37, RF-Solver-Edit's; SD3: the second half of the joint blocks); the block inputs "
                "apply to UNets only, and shorter windows suit these models (Flux workflows: 0.1 / 0.1)."
            ),
            inputs=[
                io.Clip.Input("clip", tooltip="The model's text encoder (encodes both prompts and the empty prompt)."),
                io.String.Input("source_prompt", multiline=True, default="a photo of a horse",
                                tooltip="What the image shows (for Invert)."),
                io.String.Input("target_prompt", multiline=True, default="a sketch of a horse",
                                tooltip="What it should become."),
                io.Float.Input("feature_injection", default=0.8, min=0.0, max=1.0, step=0.05,
                               tooltip="Fraction of the steps (from the first) with residual-feature injection "
                                       "(reference 0.8)."),
                io.Float.Input("attention_injection", default=0.5, min=0.0, max=1.0, step=0.05,
                               tooltip="Fraction of the steps with self-attention query/key injection (reference 0.5)."),
                io.Int.Input("feature_block", default=4, min=0, max=64,
                             tooltip="Decoder block whose residual features are injected (forward order)."),
                io.Int.Input("attention_from_block", default=4, min=0, max=64,
                             tooltip="First decoder block whose self-attention queries and keys are injected."),
            ],
            outputs=_editor_outputs(),
        )

    @classmethod
    def execute(cls, clip, source_prompt, target_prompt, feature_injection, attention_injection, feature_block,
                attention_from_block) -> io.NodeOutput:
        editor = PnPEditor(feature_injection=feature_injection, attention_injection=attention_injection,
                           feature_block=feature_block, attention_from_block=attention_from_block,
                           source_conditioning=_encode(clip, ""))
        return io.NodeOutput(editor, _encode(clip, source_prompt), _encode(clip, target_prompt))


def parse_sentences(text: str) -> list[str]:
    """One sentence per line (sentences may hold commas); blank lines are skipped."""
    return [line.strip() for line in text.splitlines() if line.strip()]


class P2PZeroEditorNode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DirectInversion_P2PZeroEditor",
            display_name="P2P-Zero Editor",
            category=CATEGORY,
            description=(
                "Pix2Pix-Zero (Parmar et al.) for the Direct Inversion Sampler's editor input. The target conditioning "
                "is the source prompt's embedding plus an edit direction: the mean embedding of the target sentences "
                "minus that of the source sentences (one per line; empty: the target or source prompt itself). At "
                "every step the source branch (the source prompt's conditional prediction) gives cross-attention maps; "
                "the target's latent takes one gradient step of size xa_guidance toward the same maps under the "
                "edited conditioning, then is predicted and stepped as usual. With the sampler's offsets on auto, "
                "Direct Inversion's offsets go to both branches, as in the reference. For the reference's setting, "
                "connect the source output to the sampler's negative too (the reference's negative prompt is the "
                "caption), except with EDICT, whose source retraces its inversion only under the inversion's "
                "negative. The reconstruction branch uses this node's source prompt. Needs one conditioning entry "
                "per prompt (no areas or timestep ranges). Defaults: the PnP Inversion benchmark's (xa_guidance 0.1, 50 steps, cfg 7.5)."
            ),
            inputs=[
                io.Clip.Input("clip", tooltip="The model's text encoder."),
                io.String.Input("source_prompt", multiline=True, default="a cat sitting on a bench",
                                tooltip="What the image shows (for Invert)."),
                io.String.Input("target_prompt", multiline=True, default="a dog sitting on a bench",
                                tooltip="What it should show: the edit direction's target when no target sentences "
                                        "are given."),
                io.Float.Input("xa_guidance", default=0.1, min=0.0, max=100.0, step=0.01, round=False,
                               tooltip="Step size of the cross-attention guidance (reference 0.1); 0: the edit "
                                       "direction alone."),
                io.String.Input("source_sentences", multiline=True, default="",
                                tooltip="Sentences describing the source concept, one per line, averaged for the edit "
                                        "direction (empty: the source prompt)."),
                io.String.Input("target_sentences", multiline=True, default="",
                                tooltip="Sentences describing the target concept, one per line (empty: the target "
                                        "prompt)."),
            ],
            outputs=_editor_outputs(),
        )

    @classmethod
    def execute(cls, clip, source_prompt, target_prompt, xa_guidance, source_sentences, target_sentences
                ) -> io.NodeOutput:
        source = _encode(clip, source_prompt)
        sides = {}
        for side, text, fallback in (("source", source_sentences, source_prompt),
                                     ("target", target_sentences, target_prompt)):
            sentences = parse_sentences(text) or [fallback]
            sides[side] = [_encode(clip, sentence) for sentence in sentences]
        target = directed_conditioning(source, sides["source"], sides["target"])
        return io.NodeOutput(P2PZeroEditor(xa_guidance=xa_guidance, source_conditioning=source), source, target)


def maps_image(controller, tile: int = 128) -> torch.Tensor:
    """IMAGE ``[B, H, W, 3]``: per image of the batch, a labelled grid of the target prompt's per-word attention maps
    (averaged over steps and map layers, each normalised to its maximum); a placeholder if there are none."""
    from PIL import Image, ImageDraw

    words = [] if controller is None or not hasattr(controller, "word_maps") else controller.word_maps("target")
    if not words:
        image = Image.new("RGB", (tile * 2, tile // 2), (32, 32, 32))
        ImageDraw.Draw(image).text((6, tile // 5), "no attention maps: connect a P2P Editor", fill=(200, 200, 200))
        return torch.from_numpy(_pixels(image))[None]
    batch = words[0][1].shape[0]
    columns = min(len(words), 8)
    rows = -(-len(words) // columns)
    label = 18
    out = []
    for b in range(batch):
        grid = Image.new("RGB", (columns * tile, rows * (tile + label)), (0, 0, 0))
        draw = ImageDraw.Draw(grid)
        for n, (word, maps) in enumerate(words):
            m = maps[b].float()
            m = (m / m.max().clamp_min(1e-12) * 255).clamp(0, 255).to(torch.uint8).cpu().numpy()
            cell = Image.fromarray(m, mode="L").resize((tile, tile), Image.NEAREST).convert("RGB")
            x, y = (n % columns) * tile, (n // columns) * (tile + label)
            grid.paste(cell, (x, y))
            draw.text((x + 4, y + tile + 3), word[:18], fill=(255, 255, 255))
        out.append(torch.from_numpy(_pixels(grid)))
    return torch.stack(out)


def _pixels(image):
    import numpy as np

    return np.asarray(image, dtype=np.float32) / 255.0


NODES = [P2PEditorNode, MasaCtrlEditorNode, PnPEditorNode, P2PZeroEditorNode]
