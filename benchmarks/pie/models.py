"""The models a PIE-Bench run edits with: a diffusers SD1.x/SD2.x pipeline folder (local files only) or the
project's trained toy model. Both give the same small interface to the runner:

``unet``, ``scheduler`` (for the pack's diffusers backend), ``resolution`` (the square size images are edited at),
``embed(texts) -> [B, 77, C]``, ``words(text) -> TokenizedPrompt`` (for Prompt-to-Prompt's word alignment),
``encode(images [B, 3, H, W] in [0, 1]) -> latents`` and ``decode(latents) -> images in [0, 1]``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import torch


class ModelError(ValueError):
    """A model folder that cannot be loaded (the message says what is missing)."""


class ToyEditModel:
    """The trained toy model of benchmarks/toy (64 x 64 images)."""

    def __init__(self, weights: Optional[Path] = None, device: str = "cpu"):
        from benchmarks.toy import model as toy_model
        from benchmarks.toy.tokenizer import tokenizer

        self.name = "toy"
        self.toy = toy_model.load(weights or toy_model.WEIGHTS)
        self.device = torch.device(device)
        for part in (self.toy.unet, self.toy.vae, self.toy.text_encoder):
            part.to(self.device)
        self.unet, self.scheduler = self.toy.unet, self.toy.scheduler
        self.resolution = 64
        self.tokenizer = tokenizer()

    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        ids = self.tokenizer(list(texts)).to(self.device)
        with torch.no_grad():
            return self.toy.text_encoder(ids)

    def words(self, text: str, editors):
        return editors.tokenize_words(text, self.tokenizer.ids, self.tokenizer.bos_token_id,
                                      self.tokenizer.eos_token_id)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return self.toy.encode(images.to(self.device))

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.toy.decode(latents)


class DiffusersEditModel:
    """A diffusers Stable Diffusion folder (``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``,
    ``scheduler/``), loaded from local files only. Images are edited at the UNet's sample size x 8 (512 for
    SD1.x). The scheduler is the folder's DDIM configuration (the pack takes its training noise levels)."""

    PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")

    def __init__(self, folder, device: str = "cpu", dtype: torch.dtype = torch.float32):
        from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
        try:
            from transformers import CLIPTextModel, CLIPTokenizer
        except ImportError as err:
            raise ModelError("a diffusers model folder needs transformers (pip install transformers)") from err

        root = Path(folder).resolve()
        missing = [p for p in self.PARTS if not (root / p).is_dir()]
        if missing:
            raise ModelError(f"{root} is not a diffusers Stable Diffusion folder: no {', '.join(missing)} "
                             "subfolder(s). Give the folder holding model_index.json, unet/, vae/, ...")
        self.name = str(root)  # the folder itself: two models of the same folder name must not share a run
        self.device = torch.device(device)
        self.dtype = dtype
        local = {"local_files_only": True}
        self.unet = UNet2DConditionModel.from_pretrained(root, subfolder="unet", torch_dtype=dtype, **local)
        self.vae = AutoencoderKL.from_pretrained(root, subfolder="vae", torch_dtype=dtype, **local)
        self.text_encoder = CLIPTextModel.from_pretrained(root, subfolder="text_encoder", torch_dtype=dtype, **local)
        self.tokenizer = CLIPTokenizer.from_pretrained(root, subfolder="tokenizer", **local)
        self.scheduler = DDIMScheduler.from_pretrained(root, subfolder="scheduler", **local)
        for part in (self.unet, self.vae, self.text_encoder):
            part.to(self.device).eval().requires_grad_(False)
        factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.resolution = int(self.unet.config.sample_size) * factor
        self.scaling_factor = float(self.vae.config.scaling_factor)

    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        ids = self.tokenizer(list(texts), padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids.to(self.device)
        with torch.no_grad():
            return self.text_encoder(ids)[0]

    def words(self, text: str, editors):
        tokenize = lambda t: self.tokenizer(t, add_special_tokens=False).input_ids  # noqa: E731
        return editors.tokenize_words(text, tokenize, self.tokenizer.bos_token_id, self.tokenizer.eos_token_id,
                                      max_len=self.tokenizer.model_max_length)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(self.device, self.dtype) * 2.0 - 1.0
        return self.vae.encode(x).latent_dist.mean.float() * self.scaling_factor

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        x = self.vae.decode((latents / self.scaling_factor).to(self.dtype)).sample.float()
        return ((x + 1.0) / 2.0).clamp(0.0, 1.0)


def load_model(spec: str, device: str = "cpu", half: bool = False):
    """``toy`` or a diffusers folder."""
    if spec == "toy":
        return ToyEditModel(device=device)
    if not Path(spec).is_dir():
        raise ModelError(f"--model takes `toy` or a local diffusers Stable Diffusion folder; {spec!r} is neither "
                         "(no downloads: give the folder of a pipeline saved with save_pretrained, or the hub "
                         "cache's snapshot folder)")
    return DiffusersEditModel(spec, device=device, dtype=torch.float16 if half else torch.float32)
