"""The benchmark's cases through ComfyUI, headless: per image, the graph of the sample workflows (Load Checkpoint,
Load Image, resize, VAE Encode, the editor node, Invert, Direct Inversion Sampler, VAE Decode, Save Image), run by
ComfyUI's own validation and executor in this process (headless/run.py).

Pix2Pix-Zero as in the workflow p2p_zero_cat_to_dog: the P2P-Zero Editor node builds the edit direction from the
benchmark's prompts (one sentence per side, ``cases.direction_sentences``); its source conditioning goes to Invert
and to the sampler's negative (the reference's caption as negative prompt), its target (source + direction) to the
sampler's target, and the sampler's offsets are the case's (with Direct Inversion "both", what "auto" resolves to).
"""
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import torch

from . import data as pie
from .cases import Case, direction_sentences
from .run import load_image, resize

INPUT_SUBFOLDER = "piebench"
OUTPUT_PREFIX = "piebench_edit"
DIFFUSION_MODELS = ("UNetModel", "MMDiT", "Flux")


class ComfyRunner:
    """Runs cases with a checkpoint of ComfyUI's models/checkpoints. ``loader`` replaces CheckpointLoaderSimple by
    another node class with the same outputs (the tests use a tiny stand-in)."""

    def __init__(self, pack_name: str, comfyui_path, checkpoint: str, resolution: int = 512, cpu: bool = False,
                 loader: str = "CheckpointLoaderSimple"):
        import importlib

        env = importlib.import_module(f"{pack_name}.headless.comfyui_env")
        self.headless = importlib.import_module(f"{pack_name}.headless.run")
        self.editors = importlib.import_module(f"{pack_name}.editors")
        path = env.find_comfyui(str(comfyui_path) if comfyui_path else None)
        if path is None:
            raise pie.DataError("ComfyUI not found: pass --comfyui-path PATH or set COMFYUI_PATH")
        env.start(path, cpu=cpu)
        import folder_paths

        self.folder_paths = folder_paths
        if loader == "CheckpointLoaderSimple" and checkpoint not in folder_paths.get_filename_list("checkpoints"):
            raise pie.DataError(f"checkpoint {checkpoint!r} is not in ComfyUI's checkpoints folder(s) "
                                f"({', '.join(folder_paths.get_folder_paths('checkpoints'))})")
        self.checkpoint, self.loader, self.resolution = checkpoint, loader, int(resolution)
        self.name = f"comfyui:{checkpoint}"
        self.settings = {"backend": "comfyui", "resolution": self.resolution}
        import comfy.model_management

        self.device = comfy.model_management.get_torch_device()
        self.evals = 0
        self._hook = torch.nn.modules.module.register_module_forward_pre_hook(self._count)

    def _count(self, module, args):
        # the diffusion model's own forward (ComfyUI's diffusion_model: a UNetModel for SD1.x/SD2.x/SDXL)
        if args and type(module).__name__ in DIFFUSION_MODELS and torch.is_tensor(args[0]):
            self.evals += int(args[0].shape[0])

    def close(self) -> None:
        self._hook.remove()

    def _missing_blend_words(self, entry: pie.Entry) -> str:
        """Why the blend words cannot be used (a word not in its prompt, by the P2P editor's own word matching), or
        "" when they can."""
        one_id_per_word = lambda text: [0] * len(text.split())  # noqa: E731  (matching is by words)
        problems = []
        for word, text in zip(entry.blended_words, (entry.source_prompt, entry.target_prompt)):
            try:
                self.editors.word_positions(self.editors.tokenize_words(text, one_id_per_word, 1, 2), word)
            except ValueError as err:
                problems.append(str(err))
        return "; ".join(problems)

    def prompt(self, case: Case, entry: pie.Entry, image_name: str, blend: bool = True) -> dict:
        """The API-format graph of one edit (``blend``: P2P's local blend and reweight from ``blended_word``)."""
        s = case.settings
        source_text = "" if case.empty_source else entry.source_prompt
        g: dict = {}

        def add(class_type, **inputs):
            node_id = str(len(g) + 1)
            g[node_id] = {"class_type": class_type, "inputs": inputs}
            return node_id

        ckpt = add(self.loader, **({"ckpt_name": self.checkpoint} if self.loader == "CheckpointLoaderSimple" else {}))
        image = add("LoadImage", image=image_name)
        resized = add("ImageScale", image=[image, 0], upscale_method="bicubic", width=self.resolution,
                      height=self.resolution, crop="disabled")
        latent = add("VAEEncode", pixels=[resized, 0], vae=[ckpt, 2])
        negative = add("CLIPTextEncode", text="", clip=[ckpt, 1])
        editor = None
        if case.editor == "p2p":
            words = {}
            if s.p2p_blend and entry.blended_words and blend:
                words = {"blend_source_words": entry.blended_words[0], "blend_target_words": entry.blended_words[1]}
                if s.p2p_reweight != 1.0:
                    words |= {"reweight_words": entry.blended_words[1], "reweight_values": str(s.p2p_reweight)}
            editor = add("DirectInversion_P2PEditor", clip=[ckpt, 1], source_prompt=source_text,
                         target_prompt=entry.target_prompt, mode=s.p2p_mode, cross_replace_steps=s.p2p_cross,
                         self_replace_steps=s.p2p_self, reweight_words="", reweight_values="",
                         blend_source_words="", blend_target_words="", blend_threshold=0.3, blend_start=0.2)
            g[editor]["inputs"].update(words)
        elif case.editor == "masactrl":
            editor = add("DirectInversion_MasaCtrlEditor", clip=[ckpt, 1], source_prompt=source_text,
                         target_prompt=entry.target_prompt, start_step=s.masactrl_step,
                         start_layer=-1 if s.masactrl_layer is None else s.masactrl_layer, mask_source_word="",
                         mask_target_word="", mask_threshold=0.1)
        elif case.editor == "pnp":
            editor = add("DirectInversion_PnPEditor", clip=[ckpt, 1], source_prompt=source_text,
                         target_prompt=entry.target_prompt, feature_injection=s.pnp_feature,
                         attention_injection=s.pnp_attention, feature_block=s.pnp_block,
                         attention_from_block=s.pnp_block)
        elif case.editor == "p2p_zero":
            sources, targets = direction_sentences(entry)
            editor = add("DirectInversion_P2PZeroEditor", clip=[ckpt, 1], source_prompt=source_text,
                         target_prompt=entry.target_prompt, xa_guidance=s.p2p_zero_guidance,
                         source_sentences="\n".join(sources), target_sentences="\n".join(targets))
        if editor is None:
            source = [add("CLIPTextEncode", text=source_text, clip=[ckpt, 1]), 0]
            target = [add("CLIPTextEncode", text=entry.target_prompt, clip=[ckpt, 1]), 0]
        else:
            source, target = [editor, 1], [editor, 2]
        inversion = add("DirectInversion_Invert", model=[ckpt, 0], latent=[latent, 0], source=source,
                        negative=[negative, 0], method=case.method, steps=s.steps, cfg=1.0)
        edit_negative = [negative, 0]
        if case.editor == "p2p_zero":  # the source prompt (the reference's caption), encoded by the editor node
            edit_negative = source
        elif case.negative_prompt(entry):
            edit_negative = [add("CLIPTextEncode", text=case.negative_prompt(entry), clip=[ckpt, 1]), 0]
        sampler = {"model": [ckpt, 0], "inversion": [inversion, 0], "target": target, "negative": edit_negative,
                   "cfg": s.cfg, "offsets": case.offsets}
        if editor is not None:
            sampler["editor"] = [editor, 0]
        edited = add("DirectInversion_Sampler", **sampler)
        decoded = add("VAEDecode", samples=[edited, 0], vae=[ckpt, 2])
        add("SaveImage", images=[decoded, 0], filename_prefix=f"{OUTPUT_PREFIX}/{entry.key}")
        return g

    def edit(self, case: Case, entry: pie.Entry) -> tuple[torch.Tensor, dict]:
        source = load_image(entry.image_file)
        folder = Path(self.folder_paths.get_input_directory()) / INPUT_SUBFOLDER
        folder.mkdir(parents=True, exist_ok=True)
        name = f"{entry.key}{entry.image_file.suffix}"
        shutil.copyfile(entry.image_file, folder / name)
        self.evals, notes = 0, []
        start = time.perf_counter()
        from tqdm import tqdm

        quiet = lambda **kw: tqdm(disable=True, **kw)  # noqa: E731
        blend = True
        if case.editor == "p2p" and entry.blended_words and case.settings.p2p_blend:
            missing = self._missing_blend_words(entry)
            if missing:  # as the diffusers path: local blend and reweight dropped, noted
                notes.append(f"local blend and reweight dropped: {missing}")
                blend = False
        try:
            saved = self.headless.run_prompt(self.prompt(case, entry, f"{INPUT_SUBFOLDER}/{name}", blend=blend),
                                             quiet)
        finally:
            (folder / name).unlink(missing_ok=True)
        seconds = time.perf_counter() - start
        if len(saved) != 1:
            raise RuntimeError(f"the graph saved {len(saved)} images, expected 1")
        output = Path(self.folder_paths.get_output_directory()) / saved[0]
        edited = load_image(output)
        os.remove(output)  # the edit is kept at the data's resolution in the benchmark's folder, not twice
        image = resize(edited[None], source.shape[-2:])[0]
        return image, {"key": entry.key, "image_path": entry.image_path, "type": entry.type_id,
                       "seconds": round(seconds, 3), "unet_evals": self.evals, "notes": notes}
