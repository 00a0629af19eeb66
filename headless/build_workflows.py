"""Writes the sample workflows in ``workflows/`` (UI format, as ComfyUI saves them) from the graphs below.

    COMFYUI_PATH=/path/to/ComfyUI python headless/build_workflows.py

Node definitions (input order, widget defaults, output types) come from the ComfyUI given, so every widget value
is written where ComfyUI's frontend expects it. Edit the graphs here and rebuild rather than editing the files.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

try:  # as part of the pack
    from .comfyui_env import PACK_ROOT, find_comfyui, node_info, start
    from .ui_to_api import has_control_widget, widget_inputs
except ImportError:  # as a script
    from comfyui_env import PACK_ROOT, find_comfyui, node_info, start
    from ui_to_api import has_control_widget, widget_inputs

SD15 = "v1-5-pruned-emaonly.safetensors"
SDXL = "sd_xl_base_1.0.safetensors"
SD35 = "sd3.5_medium_incl_clips_t5xxlfp8scaled.safetensors"  # ComfyUI's SD3.5 example checkpoint (CLIPs and T5 in it)
FLUX = "flux1-dev-fp8.safetensors"  # ComfyUI's single-file Flux dev example checkpoint
COLUMN, GAP = 380, 30


@dataclass(frozen=True)
class Out:
    node: int
    slot: int


@dataclass
class Node:
    id: int
    type: str
    inputs: dict
    title: str = ""
    text: str = ""  # Note nodes

    def __getitem__(self, slot: int) -> Out:
        return Out(self.id, slot)


@dataclass
class Graph:
    nodes_module: object
    nodes: list = field(default_factory=list)

    def add(self, type: str, title: str = "", **inputs) -> Node:
        node = Node(len(self.nodes) + 1, type, inputs, title)
        self.nodes.append(node)
        return node

    def note(self, text: str, title: str = "About this workflow") -> Node:
        node = Node(len(self.nodes) + 1, "Note", {}, title, text)
        self.nodes.append(node)
        return node

    # -- UI format ------------------------------------------------------------------------------------------------
    def to_ui(self) -> dict:
        infos = {n.type: node_info(self.nodes_module, n.type) for n in self.nodes if n.type != "Note"}
        links, ui_nodes = [], []
        depth = {}

        def depth_of(node: Node) -> int:
            if node.id not in depth:
                origins = [v.node for v in node.inputs.values() if isinstance(v, Out)]
                depth[node.id] = 1 + max((depth_of(self.nodes[o - 1]) for o in origins), default=0)
            return depth[node.id]

        columns: dict = {}
        for node in self.nodes:
            columns.setdefault(0 if node.type == "Note" else depth_of(node), []).append(node)
        outputs = {}  # node id -> list of output dicts
        for node in self.nodes:
            if node.type != "Note":
                info = infos[node.type]
                names = info.get("output_name") or info["output"]
                outputs[node.id] = [{"name": name, "type": kind, "links": [], "slot_index": i}
                                    for i, (name, kind) in enumerate(zip(names, info["output"]))]
        order = sorted(self.nodes, key=lambda n: (0 if n.type == "Note" else depth_of(n), n.id))
        positions = {}
        for column, members in columns.items():
            y = 40
            for node in members:
                height = self._height(node, infos.get(node.type))
                positions[node.id] = ([40 + column * COLUMN, y], [COLUMN - 40, height])
                y += height + GAP + 40
        for node in self.nodes:
            pos, size = positions[node.id]
            entry = {"id": node.id, "type": node.type, "pos": pos, "size": size, "flags": {},
                     "order": order.index(node), "mode": 0, "inputs": [], "outputs": [],
                     "properties": {"Node name for S&R": node.type}, "widgets_values": []}
            if node.title:
                entry["title"] = node.title
            if node.type == "Note":
                entry["properties"] = {}
                entry["widgets_values"] = [node.text]
                entry["color"], entry["bgcolor"] = "#432", "#653"
                ui_nodes.append(entry)
                continue
            info = infos[node.type]
            unknown = set(node.inputs) - {n for section in info["input"].values() for n in (section or {})}
            if unknown:
                raise ValueError(f"{node.type} has no input(s) {sorted(unknown)}")
            widgets = dict(widget_inputs(info))
            for section in ("required", "optional"):
                for name in info["input_order"].get(section, []):
                    spec = info["input"][section][name]
                    if name in widgets:
                        continue
                    value = node.inputs.get(name)
                    socket = {"name": name, "type": spec[0], "link": None}
                    if section == "optional":
                        socket["shape"] = 7
                    if isinstance(value, Out):
                        link_id = len(links) + 1
                        origin = outputs[value.node][value.slot]
                        links.append([link_id, value.node, value.slot, node.id, len(entry["inputs"]), origin["type"]])
                        origin["links"].append(link_id)
                        socket["link"] = link_id
                    elif section == "required":
                        raise ValueError(f"{node.type} #{node.id}: required input {name!r} is not connected")
                    entry["inputs"].append(socket)
            for name, spec in widgets.items():
                value = node.inputs.get(name, _default(spec))
                entry["widgets_values"].append(value)
                if has_control_widget(name, spec):
                    entry["widgets_values"].append("fixed")
                if (spec[1] if len(spec) > 1 else {}).get("image_upload"):
                    entry["widgets_values"].append("image")
            entry["outputs"] = outputs[node.id]
            ui_nodes.append(entry)
        return {"last_node_id": len(self.nodes), "last_link_id": len(links), "nodes": ui_nodes, "links": links,
                "groups": [], "config": {}, "extra": {"ds": {"scale": 0.75, "offset": [0, 0]}}, "version": 0.4}

    @staticmethod
    def _height(node: Node, info) -> int:
        if info is None:
            return 60 + 18 * (node.text.count("\n") + len(node.text) // 48)
        sockets = max(len(info["output"]), sum(1 for s in info["input"].values() for n, spec in (s or {}).items()
                                               if n not in dict(widget_inputs(info))))
        multiline = sum(1 for _, spec in widget_inputs(info) if (spec[1] if len(spec) > 1 else {}).get("multiline"))
        return 40 + 22 * sockets + 26 * len(widget_inputs(info)) + 50 * multiline


def _default(spec):
    kind = spec[0]
    options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    if "default" in options:
        return options["default"]
    choices = kind if isinstance(kind, (list, tuple)) else options.get("options", [])
    return choices[0] if choices else ""


# -- shared pieces --------------------------------------------------------------------------------------------------

def load(g: Graph, checkpoint: str = SD15, size: int = 512):
    """Checkpoint, image (resized to ``size``), its latent and the empty-prompt negative."""
    ckpt = g.add("CheckpointLoaderSimple", ckpt_name=checkpoint)
    image = g.add("LoadImage", title="Image", image="example.png")
    resized = g.add("ImageScale", title="Resize", image=image[0], upscale_method="bicubic",
                    width=size, height=size, crop="center")
    latent = g.add("VAEEncode", pixels=resized[0], vae=ckpt[2])
    negative = g.add("CLIPTextEncode", title="Negative prompt", text="", clip=ckpt[1])
    return ckpt, resized, latent, negative


def decode_and_save(g: Graph, ckpt, latent: Out, prefix: str, title: str = "Edited"):
    image = g.add("VAEDecode", samples=latent, vae=ckpt[2])
    g.add("SaveImage", title=title, images=image[0], filename_prefix=f"DirectInversion/{prefix}")
    return image


def invert(g, model: Out, latent, source, negative, method="ddim", options=None, steps=50, cfg=1.0):
    inputs = dict(model=model, latent=latent[0], source=source, negative=negative[0], method=method, steps=steps,
                  cfg=cfg)
    if options is not None:
        inputs["options"] = options[0]
    return g.add("DirectInversion_Invert", **inputs)


def sample(g, model: Out, inversion, target, negative, editor=None, cfg=7.5, offsets="source", title=""):
    inputs = dict(model=model, inversion=inversion[0], target=target, negative=negative[0], cfg=cfg, offsets=offsets)
    if editor is not None:
        inputs["editor"] = editor[0]
    return g.add("DirectInversion_Sampler", title=title, **inputs)


def p2p(g, clip: Out, source, target, **options):
    return g.add("DirectInversion_P2PEditor", clip=clip, source_prompt=source, target_prompt=target, **options)


def p2p_edit(g, name, source, target, note, method="ddim", options_node=None, checkpoint=SD15, size=512, **editor):
    ckpt, _, latent, negative = load(g, checkpoint, size)
    ed = p2p(g, ckpt[1], source, target, **editor)
    options = g.add(options_node[0], **options_node[1]) if options_node else None
    inv = invert(g, ckpt[0], latent, ed[1], negative, method=method, options=options)
    out = sample(g, ckpt[0], inv, ed[2], negative, editor=ed)
    decode_and_save(g, ckpt, out[0], name)
    g.add("SaveImage", title="Attention maps", images=out[3], filename_prefix=f"DirectInversion/{name}_maps")
    g.note(note)


# -- the workflows --------------------------------------------------------------------------------------------------

def reconstruction_check(g):
    ckpt, resized, latent, negative = load(g)
    source = g.add("CLIPTextEncode", title="Source prompt", text="a cat sitting on a bench", clip=ckpt[1])
    inv = invert(g, ckpt[0], latent, source[0], negative)
    direct = sample(g, ckpt[0], inv, source[0], negative, offsets="source", title="Direct Inversion (offsets on)")
    plain = sample(g, ckpt[0], inv, source[0], negative, offsets="off", title="DDIM baseline (offsets off)")
    a = g.add("VAEDecode", samples=direct[1], vae=ckpt[2])
    b = g.add("VAEDecode", samples=plain[1], vae=ckpt[2])
    ab = g.add("ImageStitch", image1=a[0], image2=b[0], direction="right", match_image_size=True, spacing_width=8,
               spacing_color="white")
    row = g.add("ImageStitch", image1=resized[0], image2=ab[0], direction="right", match_image_size=True,
                spacing_width=8, spacing_color="white")
    g.add("SaveImage", title="Input | Direct Inversion | DDIM", images=row[0],
          filename_prefix="DirectInversion/reconstruction_check")
    g.note("Reconstruction check. The image is DDIM-inverted (guidance 1, 50 steps) and regenerated with its own "
           "prompt at guidance 7.5, twice: with Direct Inversion's offsets (middle: the source branch equals the "
           "input's latent, so only the VAE's round trip differs) and without (right: plain DDIM drifts at this "
           "guidance). Saved side by side: input | Direct Inversion | DDIM.\n\nKnobs: Invert's steps; the "
           "samplers' cfg (the drift grows with it).")


def p2p_word_swap(g):
    p2p_edit(g, "p2p_word_swap", "a cat sitting on a bench", "a dog sitting on a bench", mode="replace",
             note="Prompt-to-Prompt word swap (cat -> dog) with Direct Inversion. The P2P Editor encodes both "
                  "prompts; replace mode swaps words one for one and gives the target the source's cross-attention "
                  "maps for 40% of the steps and its self-attention for 60%.\n\nKnobs: cross_replace_steps (higher "
                  "keeps more of the layout), self_replace_steps (higher keeps more structure, less new shape).")


def p2p_refine(g):
    p2p_edit(g, "p2p_refine", "a cat sitting on a bench", "a fluffy cat sitting on a bench", mode="refine",
             note="Prompt-to-Prompt refine: adding an attribute ('fluffy'). Refine aligns the prompts token by token "
                  "(insertions allowed) and carries the source's maps over for the words they share.\n\nKnobs: "
                  "cross_replace_steps, self_replace_steps; add reweight_words 'fluffy' for a stronger effect.")


def p2p_reweight(g):
    p2p_edit(g, "p2p_reweight", "a fluffy cat sitting on a bench", "a fluffy cat sitting on a bench",
             reweight_words="fluffy", reweight_values="3.0",
             note="Prompt-to-Prompt reweight: the same prompt twice, with the attention of 'fluffy' scaled by 3 in "
                  "the target. Values above 1 strengthen a word, below 1 (down to -2) weaken it.\n\nKnobs: "
                  "reweight_words / reweight_values (comma separated, one value per word).")


def p2p_local_blend(g):
    p2p_edit(g, "p2p_local_blend", "a cat sitting on a bench", "a dog sitting on a bench", mode="replace",
             blend_source_words="cat", blend_target_words="dog",
             note="Local blend: the word swap is confined to the object. After 20% of the steps, everything outside "
                  "the cross-attention region of 'cat' (source) and 'dog' (target) is taken from the source, so "
                  "the bench and background stay untouched.\n\nKnobs: blend_threshold (raise it if the region is "
                  "too large; look at the saved attention maps), blend_start; or connect a MASK instead of words.")


def masactrl_pose(g):
    ckpt, _, latent, negative = load(g)
    ed = g.add("DirectInversion_MasaCtrlEditor", clip=ckpt[1], source_prompt="", target_prompt="a photo of a cat jumping")
    inv = invert(g, ckpt[0], latent, ed[1], negative)
    out = sample(g, ckpt[0], inv, ed[2], negative, editor=ed)
    decode_and_save(g, ckpt, out[0], "masactrl_pose")
    g.note("MasaCtrl pose/action change (sitting -> jumping). From step 4 and from the decoder's layers on, the "
           "target's self-attention reads the source image's keys and values, so the cat keeps its look while its "
           "pose follows the target prompt. The source prompt may stay empty, as in the PnP Inversion runs.\n\n"
           "Knobs: start_step (later = more freedom for the new pose), start_layer (-1 = the reference's), "
           "mask words (e.g. cat / cat) to keep the background separate.")


def pnp_photo_to_sketch(g):
    ckpt, _, latent, negative = load(g)
    ed = g.add("DirectInversion_PnPEditor", clip=ckpt[1], source_prompt="a photo of a horse",
               target_prompt="a pencil sketch of a horse")
    inv = invert(g, ckpt[0], latent, ed[1], negative)
    out = sample(g, ckpt[0], inv, ed[2], negative, editor=ed)
    decode_and_save(g, ckpt, out[0], "pnp_photo_to_sketch")
    g.note("Plug-and-Play translation (photo -> sketch). The empty-prompt reconstruction of the image lends its "
           "decoder features (80% of the steps) and self-attention queries/keys (50%) to the target, which keeps "
           "the layout while the style follows the target prompt.\n\nKnobs: feature_injection and "
           "attention_injection (lower = freer edits), the sampler's cfg.")


def p2p_zero_cat_to_dog(g):
    ckpt, _, latent, negative = load(g)
    ed = g.add("DirectInversion_P2PZeroEditor", clip=ckpt[1], source_prompt="a cat sitting on a bench",
               target_prompt="a dog sitting on a bench", xa_guidance=0.1,
               source_sentences="a cat\na photo of a cat\na cat sitting on a bench",
               target_sentences="a dog\na photo of a dog\na dog sitting on a bench")
    inv = invert(g, ckpt[0], latent, ed[1], negative)
    out = g.add("DirectInversion_Sampler", model=ckpt[0], inversion=inv[0], target=ed[2], negative=ed[1], cfg=7.5,
                offsets="auto", editor=ed[0])  # the reference's negative prompt: the source caption
    decode_and_save(g, ckpt, out[0], "p2p_zero_cat_to_dog")
    g.note("Pix2Pix-Zero (Parmar et al.), as the PnP Inversion benchmark runs it. The target is the source prompt's "
           "embedding plus an edit direction: the mean embedding of the target sentences minus that of the source "
           "sentences (one per line; more sentences give a cleaner direction). At every step the target latent takes "
           "one gradient step (xa_guidance) toward the source branch's cross-attention maps, which keeps the "
           "structure. The sampler's negative is the source prompt and offsets are 'auto' (both branches), the "
           "reference's setting; each step costs a forward and backward pass more than a plain edit.\n\nKnobs: "
           "xa_guidance (0 = the direction alone; higher keeps more structure), the sentences, the sampler's cfg.")


def null_text_p2p(g):
    p2p_edit(g, "null_text_p2p", "a cat sitting on a bench", "a dog sitting on a bench", method="null_text",
             options_node=("DirectInversion_NullTextOptions", {}), mode="replace",
             note="The classic: Null-text inversion + Prompt-to-Prompt (Mokady et al.). The unconditional embedding "
                  "is optimised per step (10 Adam steps each) so guidance 7.5 reconstructs the image; the edit then "
                  "uses those embeddings. Slow (a minute or more): save the inversion and reuse it (see the "
                  "save/load workflows).\n\nKnobs: Null-text Options (inner_steps, early_stop, lr).")


def negative_prompt_p2p(g):
    p2p_edit(g, "negative_prompt_p2p", "a cat sitting on a bench", "a dog sitting on a bench",
             method="negative_prompt", options_node=("DirectInversion_NegativePromptOptions", {}), mode="replace",
             note="Fast: Negative-prompt inversion + Prompt-to-Prompt (Miyake et al.). The source prompt replaces "
                  "the null text during the edit: no optimisation, DDIM's speed.\n\nKnobs: interpolation toward the "
                  "negative prompt, proximal guidance (l0 / l1) with its quantile.")


def edict_edit(g):
    ckpt, _, latent, negative = load(g)
    source = g.add("CLIPTextEncode", title="Source prompt", text="a cat sitting on a bench", clip=ckpt[1])
    target = g.add("CLIPTextEncode", title="Target prompt", text="a dog sitting on a bench", clip=ckpt[1])
    options = g.add("DirectInversion_EdictOptions")
    inv = invert(g, ckpt[0], latent, source[0], negative, method="edict", options=options)
    out = sample(g, ckpt[0], inv, target[0], negative)
    decode_and_save(g, ckpt, out[0], "edict_edit")
    g.note("EDICT (Wallace et al.): two coupled latents make the inversion exactly invertible, so the source "
           "reconstructs to float precision without offsets. EDICT edits with its own guidance (3) from 80% of the "
           "schedule (strength 0.8).\n\nKnobs: EDICT Options (mix 0.93, strength, guidance, leapfrog).")


def sdxl_edit(g):
    p2p_edit(g, "sdxl_edit", "a cat sitting on a bench", "a dog sitting on a bench", checkpoint=SDXL, size=1024,
             mode="replace", blend_source_words="cat", blend_target_words="dog",
             note="SDXL edit: Direct Inversion + Prompt-to-Prompt word swap with local blend on SDXL base at "
                  "1024x1024. Both of SDXL's text encoders are aligned word by word; the editor finds SDXL's "
                  "attention layers by position.\n\nKnobs: as in the SD1.5 P2P workflows.")


def lora_controlnet_edit(g):
    ckpt, resized, latent, _ = load(g)
    lora = g.add("LoraLoader", model=ckpt[0], clip=ckpt[1], lora_name="your_style_lora.safetensors",
                 strength_model=0.8, strength_clip=0.8)
    ed = p2p(g, lora[1], "a cat sitting on a bench", "a dog sitting on a bench", mode="replace")
    negative = g.add("CLIPTextEncode", title="Negative prompt (LoRA CLIP)", text="", clip=lora[1])
    edges = g.add("Canny", image=resized[0], low_threshold=0.4, high_threshold=0.8)
    control = g.add("ControlNetLoader", control_net_name="control_v11p_sd15_canny.pth")
    applied = g.add("ControlNetApplyAdvanced", positive=ed[2], negative=negative[0], control_net=control[0],
                    image=edges[0], strength=0.6, start_percent=0.0, end_percent=0.6, vae=ckpt[2])
    inv = invert(g, lora[0], latent, ed[1], negative)
    out = g.add("DirectInversion_Sampler", model=lora[0], inversion=inv[0], target=applied[0], negative=applied[1],
                cfg=7.5, offsets="source", editor=ed[0])
    decode_and_save(g, ckpt, out[0], "lora_controlnet_edit")
    g.note("An edit with a LoRA and a ControlNet in the chain: the LoRA patches the model and CLIP that invert and "
           "edit; the canny ControlNet acts on the target branch (its positive and the shared negative), holding "
           "the edges of the original. Replace your_style_lora.safetensors with a LoRA you have.\n\nKnobs: LoRA "
           "strengths, ControlNet strength and end_percent, the P2P settings.")


def save_inversion(g):
    ckpt, _, latent, negative = load(g)
    source = g.add("CLIPTextEncode", title="Source prompt", text="a cat sitting on a bench", clip=ckpt[1])
    options = g.add("DirectInversion_NullTextOptions")
    inv = invert(g, ckpt[0], latent, source[0], negative, method="null_text", options=options)
    g.add("DirectInversion_SaveInversion", inversion=inv[0], filename_prefix="cat_on_bench")
    g.note("Invert once: a Null-text inversion (the slow step) saved to output/inversions/ as a .safetensors file "
           "(tensors + metadata, no pickles). Then open 'load_inversion_many_targets' and pick the file in Load "
           "Inversion to try several target prompts without inverting again.")


def load_inversion_many_targets(g):
    ckpt = g.add("CheckpointLoaderSimple", ckpt_name=SD15)
    inv = g.add("DirectInversion_LoadInversion", model=ckpt[0], inversion_file="cat_on_bench_00001_.safetensors")
    negative = g.add("CLIPTextEncode", title="Negative prompt", text="", clip=ckpt[1])
    for name, target in (("dog", "a dog sitting on a bench"), ("tiger", "a tiger sitting on a bench"),
                         ("fox", "a fox sitting on a bench")):
        ed = p2p(g, ckpt[1], "a cat sitting on a bench", target, mode="replace")
        out = sample(g, ckpt[0], inv, ed[2], negative, editor=ed, title=f"Edit: {name}")
        decode_and_save(g, ckpt, out[0], f"from_saved_{name}", title=f"Edited: {name}")
    g.note("Several edits of one saved inversion (made by 'save_inversion'). Load Inversion checks that the file "
           "was made with this model (LoRAs included) before anything runs. Each branch edits with its own target "
           "prompt; the source prompt must be the one the image was inverted with.")


# -- flow-matching models (SD3.5, Flux) -------------------------------------------------------------------------

def _flow_prompts(g, ckpt, source_text, target_text, flux_guidance=None):
    """Source and target prompts; on Flux each through FluxGuidance (the guidance embedding)."""
    source = g.add("CLIPTextEncode", title="Source prompt", text=source_text, clip=ckpt[1])
    target = g.add("CLIPTextEncode", title="Target prompt", text=target_text, clip=ckpt[1]) if target_text else None
    if flux_guidance is not None:
        source = g.add("FluxGuidance", title="Flux guidance (source)", conditioning=source[0], guidance=flux_guidance)
        if target is not None:
            target = g.add("FluxGuidance", title="Flux guidance (target)", conditioning=target[0],
                           guidance=flux_guidance)
    return source, target


def _flow_reconstruction(g, name, checkpoint, cfg, method, steps, flux_guidance, note):
    ckpt, resized, latent, negative = load(g, checkpoint, 1024)
    source, _ = _flow_prompts(g, ckpt, "a cat sitting on a bench", None, flux_guidance)
    inv = invert(g, ckpt[0], latent, source[0], negative, method=method, steps=steps)
    direct = sample(g, ckpt[0], inv, source[0], negative, cfg=cfg, offsets="source",
                    title="Direct Inversion (offsets on)")
    plain = sample(g, ckpt[0], inv, source[0], negative, cfg=cfg, offsets="off", title=f"{method} (offsets off)")
    a = g.add("VAEDecode", samples=direct[1], vae=ckpt[2])
    b = g.add("VAEDecode", samples=plain[1], vae=ckpt[2])
    ab = g.add("ImageStitch", image1=a[0], image2=b[0], direction="right", match_image_size=True, spacing_width=8,
               spacing_color="white")
    row = g.add("ImageStitch", image1=resized[0], image2=ab[0], direction="right", match_image_size=True,
                spacing_width=8, spacing_color="white")
    g.add("SaveImage", title=f"Input | Direct Inversion | {method}", images=row[0],
          filename_prefix=f"DirectInversion/{name}")
    g.note(note)


def _flow_edit(g, name, checkpoint, cfg, method, steps, flux_guidance, note):
    ckpt, _, latent, negative = load(g, checkpoint, 1024)
    source, target = _flow_prompts(g, ckpt, "a cat sitting on a bench", "a dog sitting on a bench", flux_guidance)
    inv = invert(g, ckpt[0], latent, source[0], negative, method=method, steps=steps)
    out = sample(g, ckpt[0], inv, target[0], negative, cfg=cfg, offsets="source", title="Direct Inversion Sampler")
    decode_and_save(g, ckpt, out[0], name)
    decode_and_save(g, ckpt, out[1], f"{name}_source", title="Source reconstruction")
    g.note(note)


def sd35_reconstruction_check(g):
    _flow_reconstruction(
        g, "sd35_reconstruction_check", SD35, cfg=4.5, method="euler", steps=30, flux_guidance=None,
        note="SD3.5 reconstruction check (flow matching). The image is inverted with Euler steps of the flow ODE "
             "(guidance 1, 30 steps of ComfyUI's simple schedule with the model's shift) and regenerated with its own "
             "prompt at SD3.5's guidance 4.5, with Direct Inversion's offsets (middle: the source branch equals the "
             "input's latent) and without (right: the plain Euler round trip drifts at this guidance). Saved side by "
             "side: input | Direct Inversion | Euler.\n\nKnobs: Invert's method (rf_solver: second-order steps, "
             "closer without offsets, two model evaluations per step) and steps; the samplers' cfg.")


def sd35_free_edit(g):
    _flow_edit(
        g, "sd35_free_edit", SD35, cfg=4.5, method="euler", steps=30, flux_guidance=None,
        note="SD3.5 edit without an editor: Euler inversion with the source prompt, then the Direct Inversion "
             "Sampler with the target prompt at guidance 4.5. The source branch follows the inversion exactly; the "
             "target branch starts from the same inverted noise, so the layout carries over as far as the prompt "
             "change allows (sd35_p2p, sd35_masactrl and sd35_pnp add an editor). Saves the edit and "
             "the source reconstruction.\n\nKnobs: Invert's method (negative_prompt: the source prompt as the "
             "negative, null_text: optimised unconditional context; rf_solver), steps, cfg.")


def flux_reconstruction_check(g):
    _flow_reconstruction(
        g, "flux_reconstruction_check", FLUX, cfg=1.0, method="euler", steps=28, flux_guidance=3.5,
        note="Flux dev reconstruction check. Flux is guidance-distilled: it samples at cfg 1 and takes its guidance "
             "(3.5) as an embedding, set here by FluxGuidance on the prompt. The image is inverted with Euler steps "
             "(28 steps of ComfyUI's simple schedule) and regenerated with its own prompt, with Direct Inversion's "
             "offsets (middle: exact) and without (right). Saved side by side: input | Direct Inversion | Euler.\n\n"
             "Knobs: FluxGuidance, Invert's method (rf_solver) and steps.")


def flux_free_edit(g):
    _flow_edit(
        g, "flux_free_edit", FLUX, cfg=1.0, method="rf_solver", steps=28, flux_guidance=3.5,
        note="Flux dev edit without an editor: RF-Solver inversion (second-order steps, two model evaluations per "
             "step) with the source prompt, then the Direct Inversion Sampler with the target prompt, both through "
             "FluxGuidance 3.5, at cfg 1 (Flux samples without CFG). The source branch follows the inversion exactly; "
             "the target starts from the same inverted noise. Saves the edit and the source reconstruction.\n\n"
             "Knobs: FluxGuidance (the edit's strength), Invert's method (euler: one evaluation per step) and steps.")


def _flowedit(g, name, checkpoint, steps, n_max, cfgs, guidance, note):
    ckpt, _, latent, negative = load(g, checkpoint, 1024)
    source = g.add("CLIPTextEncode", title="Source prompt", text="a cat sitting on a bench", clip=ckpt[1])
    target = g.add("CLIPTextEncode", title="Target prompt", text="a dog sitting on a bench", clip=ckpt[1])
    if guidance is not None:
        source = g.add("FluxGuidance", title="Flux guidance (source)", conditioning=source[0], guidance=guidance[0])
        target = g.add("FluxGuidance", title="Flux guidance (target)", conditioning=target[0], guidance=guidance[1])
    out = g.add("DirectInversion_FlowEdit", model=ckpt[0], latent=latent[0], source=source[0], target=target[0],
                negative=negative[0], steps=steps, n_max=n_max, n_min=0, n_avg=1, source_cfg=cfgs[0],
                target_cfg=cfgs[1], seed=42)
    decode_and_save(g, ckpt, out[0], name)
    g.note(note)


def sd35_flowedit(g):
    _flowedit(g, "sd35_flowedit", SD35, steps=50, n_max=33, cfgs=(3.5, 13.5), guidance=None,
              note="FlowEdit on SD3.5 (Kulikov et al.): no inversion. The image's latent moves along the difference of "
                   "the target's and the source's velocities at noised copies that share their noise, over the last "
                   "33 of 50 steps; the reference's SD3 settings: source cfg 3.5, target cfg 13.5.\n\nKnobs: n_max "
                   "(more steps: stronger edit, less of the image kept), the two cfgs, n_avg (noise draws per step), "
                   "seed.")


def flux_flowedit(g):
    _flowedit(g, "flux_flowedit", FLUX, steps=28, n_max=24, cfgs=(1.0, 1.0), guidance=(1.5, 5.5),
              note="FlowEdit on Flux dev (Kulikov et al.): no inversion. The image's latent moves along the difference "
                   "of the target's and the source's velocities over the last 24 of 28 steps; Flux samples at cfg 1, "
                   "so the guidance is FluxGuidance's: 1.5 on the source, 5.5 on the target (the reference's).\n\n"
                   "Knobs: n_max, the two FluxGuidance values, n_avg, seed.")


def _flow_editor_edit(g, name, checkpoint, editor_type, prompts, method, steps, cfg, flux_guidance, note, **settings):
    """Invert with the editor's source conditioning and edit with its target one; on Flux both through FluxGuidance."""
    ckpt, _, latent, negative = load(g, checkpoint, 1024)
    ed = g.add(editor_type, clip=ckpt[1], source_prompt=prompts[0], target_prompt=prompts[1], **settings)
    source, target = ed[1], ed[2]
    if flux_guidance is not None:
        source = g.add("FluxGuidance", title="Flux guidance (source)", conditioning=source, guidance=flux_guidance)[0]
        target = g.add("FluxGuidance", title="Flux guidance (target)", conditioning=target, guidance=flux_guidance)[0]
    inv = invert(g, ckpt[0], latent, source, negative, method=method, steps=steps)
    out = sample(g, ckpt[0], inv, target, negative, editor=ed, cfg=cfg, offsets="auto")
    decode_and_save(g, ckpt, out[0], name)
    if editor_type == "DirectInversion_P2PEditor":
        g.add("SaveImage", title="Attention maps", images=out[3], filename_prefix=f"DirectInversion/{name}_maps")
    g.note(note)


SD35_RUN = dict(method="euler", steps=30, cfg=4.5, flux_guidance=None)
FLUX_RUN = dict(method="rf_solver", steps=28, cfg=1.0, flux_guidance=2.5)
FLOW_P2P = ("a cat sitting on a bench", "a dog sitting on a bench")


def sd35_p2p(g):
    _flow_editor_edit(
        g, "sd35_p2p", SD35, "DirectInversion_P2PEditor", FLOW_P2P, **SD35_RUN, mode="replace",
        blend_source_words="cat", blend_target_words="dog",
        note="Prompt-to-Prompt on SD3.5 (cat -> dog, with local blend). SD3's joint attention runs one softmax over the "
             "text and image tokens: for 40% of the steps the target's image -> text attention is the source's "
             "(through the word mapping; a word's tokens are its CLIP-L/G and T5 positions), for 60% its image -> "
             "image attention too; after 20% of the steps everything outside the attention of 'cat' / 'dog' comes "
             "from the source. Euler inversion, 30 steps, cfg 4.5.\n\nKnobs: cross_replace_steps, "
             "self_replace_steps, blend_threshold (see the saved attention maps), reweight.")


def sd35_masactrl(g):
    _flow_editor_edit(
        g, "sd35_masactrl", SD35, "DirectInversion_MasaCtrlEditor", ("", "a photo of a cat jumping"), **SD35_RUN,
        start_step=3, start_layer=-1,
        note="MasaCtrl on SD3.5 (sitting -> jumping). From step 3 of 30 and from joint block 15 of 24 on (MasaCtrl's "
             "relative depth, start_layer -1), the target's image tokens attend to its own text and to the source "
             "image's keys and values, so the subject keeps its look while the pose follows the prompt.\n\nKnobs: "
             "start_step, start_layer (blocks in forward order), a MASK for the subject.")


def sd35_pnp(g):
    _flow_editor_edit(
        g, "sd35_pnp", SD35, "DirectInversion_PnPEditor", ("a photo of a horse", "a pencil sketch of a horse"),
        **SD35_RUN, feature_injection=0.4, attention_injection=0.25, feature_block=4, attention_from_block=4,
        note="Plug-and-Play on SD3.5 (photo -> sketch). In the second half of the joint blocks the target's image "
             "tokens take the empty-prompt reconstruction's values (the features) for the first 40% of the steps and "
             "its queries and keys (image -> image attention) for the first 25%. These windows are a starting point "
             "(the UNet reference's are 0.8 and 0.5; joint blocks carry the whole image stream, so shorter windows "
             "leave the prompt more room); not tuned on real weights.\n\nKnobs: feature_injection, "
             "attention_injection (lower = freer edits), cfg.")


def flux_p2p(g):
    _flow_editor_edit(
        g, "flux_p2p", FLUX, "DirectInversion_P2PEditor", FLOW_P2P, **FLUX_RUN, mode="replace",
        blend_source_words="cat", blend_target_words="dog",
        note="Prompt-to-Prompt on Flux dev (cat -> dog, with local blend). In every double- and single-stream block "
             "the target's image -> text attention is the source's for 40% of the steps (a word's tokens are its T5 "
             "positions), its image -> image attention for 60%; local blend from the double-stream blocks' maps. "
             "RF-Solver inversion, 28 steps, cfg 1, FluxGuidance 2.5 (RF-Solver-Edit's editing guidance is 2-2.5)."
             "\n\nKnobs: cross_replace_steps, self_replace_steps, blend_threshold, FluxGuidance.")


def flux_masactrl(g):
    _flow_editor_edit(
        g, "flux_masactrl", FLUX, "DirectInversion_MasaCtrlEditor", ("", "a photo of a cat jumping"), **FLUX_RUN,
        start_step=2, start_layer=-1,
        note="MasaCtrl on Flux dev (sitting -> jumping). From step 2 of 28 and from block 36 of 57 on (single-stream "
             "block 17; MasaCtrl's relative depth), the target's image tokens attend to its own text and to the source "
             "image's keys and values.\n\nKnobs: start_step, start_layer (double-stream blocks 0-18, then "
             "single-stream blocks 19-56), a MASK for the subject, FluxGuidance.")


def flux_pnp(g):
    _flow_editor_edit(
        g, "flux_pnp", FLUX, "DirectInversion_PnPEditor", ("a photo of a horse", "a pencil sketch of a horse"),
        **FLUX_RUN, feature_injection=0.1, attention_injection=0.1, feature_block=4, attention_from_block=4,
        note="Plug-and-Play on Flux dev (photo -> sketch) with RF-Solver-Edit's choice: in single-stream blocks "
             "20-37 the target's image tokens take the source reconstruction's values for the first 10% of the steps "
             "(RF-Solver-Edit injects for 2-3 of 25), and here its queries and keys as well.\n\nKnobs: "
             "feature_injection (values), attention_injection (queries/keys), FluxGuidance.")


WORKFLOWS = [reconstruction_check, p2p_word_swap, p2p_refine, p2p_reweight, p2p_local_blend, masactrl_pose,
             pnp_photo_to_sketch, p2p_zero_cat_to_dog, null_text_p2p, negative_prompt_p2p, edict_edit, sdxl_edit, lora_controlnet_edit,
             save_inversion, load_inversion_many_targets, sd35_reconstruction_check, sd35_free_edit,
             flux_reconstruction_check, flux_free_edit, sd35_flowedit, flux_flowedit, sd35_p2p, sd35_masactrl, sd35_pnp,
             flux_p2p, flux_masactrl, flux_pnp]


def build(nodes_module, folder: Path) -> list[Path]:
    folder.mkdir(exist_ok=True)
    written = []
    for make in WORKFLOWS:
        graph = Graph(nodes_module)
        make(graph)
        path = folder / f"{make.__name__}.json"
        path.write_text(json.dumps(graph.to_ui(), indent=1) + "\n")
        written.append(path)
    return written


def main() -> int:
    comfyui = find_comfyui()
    if comfyui is None:
        print("Set COMFYUI_PATH to a ComfyUI checkout.", file=sys.stderr)
        return 2
    nodes_module = start(comfyui, cpu=True, custom_nodes=False)
    for path in build(nodes_module, PACK_ROOT / "workflows"):
        print(path.relative_to(PACK_ROOT))
    return 0


if __name__ == "__main__":
    sys.exit(main())
