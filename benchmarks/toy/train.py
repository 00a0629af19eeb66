"""Train the toy text-to-image model on the CPU: ``python -m benchmarks.toy.train [--out DIR]``.

Seeded and deterministic for a given thread count. The committed weights came from the defaults (see README,
"The toy model"). Three stages, each printing its losses and times:

1. data: ``--samples`` images of ``data.draw(seed)`` for seeds 0 .. samples-1 (held-out images start far above);
2. VAE: an AutoencoderKL (4 latent channels, 4x downsampling) trained as a deterministic autoencoder on its
   posterior mean (what the pipelines encode with), L1 + L2 reconstruction and a small penalty on the latents'
   size; its latent scaling factor is 1 / std of the training latents, as SD's 0.18215 was chosen;
3. UNet and text encoder together, on the VAE's latents: epsilon prediction on SD1.x's noise schedule with
   min-SNR-5 loss weighting, 10% of captions dropped to the empty prompt (for classifier-free guidance), AdamW
   with warm-up and cosine decay, and an exponential moving average of the weights, which is what is saved;
4. the VAE's decoder alone, further, with the encoder frozen (as SD's fine-tuned decoders): the latent space the
   UNet learned stays the same. ``--decoder-only`` runs just this stage on the VAE already in ``--out``.
"""
from __future__ import annotations

import argparse
import copy
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from . import data
from .model import WEIGHTS, TextEncoder, make_scheduler, make_unet, make_vae, save_part
from .tokenizer import tokenizer

DEFAULTS = {"samples": 16384, "vae_steps": 300, "decoder_steps": 600, "decoder_lr": 1e-3, "vae_batch": 32, "vae_lr": 2e-3, "unet_steps": 1500,
            "unet_batch": 64, "unet_lr": 1e-3, "caption_dropout": 0.1, "ema": 0.999, "seed": 0, "min_snr": 5.0,
            "latent_weight": 1e-4}


class _Clock:
    def __init__(self):
        self.start = time.perf_counter()

    def __call__(self) -> float:
        return time.perf_counter() - self.start


def _log(stage: str, step: int, steps: int, loss: float, clock: _Clock, every: int) -> None:
    if step == 1 or step == steps or step % every == 0:
        print(f"[{stage}] step {step:5d}/{steps}  loss {loss:.5f}  {clock():7.1f} s", flush=True)


def _lr(step: int, steps: int, peak: float, warmup: int = 100) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def _ema_update(ema: torch.nn.Module, live: torch.nn.Module, decay: float) -> None:
    with torch.no_grad():
        for e, p in zip(ema.parameters(), live.parameters()):
            e.lerp_(p, 1.0 - decay)


def _image_batch(opt, step: int, steps: int, peak: float, images: torch.Tensor, batch: int,
                 generator: torch.Generator) -> torch.Tensor:
    """Set the step's learning rate (50 warm-up steps, cosine) and draw a batch of images scaled to [-1, 1]."""
    for group in opt.param_groups:
        group["lr"] = _lr(step - 1, steps, peak, warmup=min(50, steps))
    rows = torch.randint(len(images), (batch,), generator=generator)
    return images[rows] * 2.0 - 1.0


def train_vae(images: torch.Tensor, args, generator: torch.Generator):
    vae = make_vae().train()
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    clock = _Clock()
    for step in range(1, args.vae_steps + 1):
        x = _image_batch(opt, step, args.vae_steps, args.vae_lr, images, args.vae_batch, generator)
        z = vae.encode(x).latent_dist.mean
        recon = vae.decode(z).sample
        rec = F.l1_loss(recon, x) + F.mse_loss(recon, x)
        loss = rec + args.latent_weight * z.pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        _log("vae", step, args.vae_steps, rec.item(), clock, 25)
    return vae.eval().requires_grad_(False)


def finetune_decoder(vae, images: torch.Tensor, args, generator: torch.Generator):
    """Train the decoder further with the encoder frozen (as SD's fine-tuned decoders were): the latent space, and
    so the UNet trained on it, stays as it is; colours and edges come back sharper."""
    opt = torch.optim.AdamW(vae.decoder.parameters(), lr=args.decoder_lr, weight_decay=0.0)
    vae.decoder.requires_grad_(True).train()
    clock = _Clock()
    for step in range(1, args.decoder_steps + 1):
        x = _image_batch(opt, step, args.decoder_steps, args.decoder_lr, images, args.vae_batch, generator)
        with torch.no_grad():
            z = vae.encode(x).latent_dist.mean
        recon = vae.decode(z).sample
        loss = F.l1_loss(recon, x) + F.mse_loss(recon, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        _log("decoder", step, args.decoder_steps, loss.item(), clock, 50)
    return vae.eval().requires_grad_(False)


@torch.no_grad()
def encode_all(vae, images: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    return torch.cat([vae.encode(images[i:i + chunk] * 2.0 - 1.0).latent_dist.mean
                      for i in range(0, len(images), chunk)])


def train_denoiser(latents: torch.Tensor, ids: torch.Tensor, empty_ids: torch.Tensor, args,
                   generator: torch.Generator):
    unet, text_encoder = make_unet().train(), TextEncoder().train()
    ema_unet, ema_text = copy.deepcopy(unet).eval(), copy.deepcopy(text_encoder).eval()
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=args.unet_lr, weight_decay=0.01)
    alphas_cumprod = make_scheduler().alphas_cumprod.float()
    clock = _Clock()
    for step in range(1, args.unet_steps + 1):
        for group in opt.param_groups:
            group["lr"] = _lr(step - 1, args.unet_steps, args.unet_lr, warmup=min(100, args.unet_steps))
        rows = torch.randint(len(latents), (args.unet_batch,), generator=generator)
        z0, tokens = latents[rows], ids[rows].clone()
        drop = torch.rand(args.unet_batch, generator=generator) < args.caption_dropout
        tokens[drop] = empty_ids
        t = torch.randint(0, len(alphas_cumprod), (args.unet_batch,), generator=generator)
        noise = torch.randn(z0.shape, generator=generator)
        a = alphas_cumprod[t].view(-1, 1, 1, 1)
        zt = a.sqrt() * z0 + (1.0 - a).sqrt() * noise
        pred = unet(zt, t, encoder_hidden_states=text_encoder(tokens)).sample
        snr = (a / (1.0 - a)).view(-1)
        weight = torch.clamp(snr, max=args.min_snr) / snr
        per_sample = (pred - noise).pow(2).mean(dim=(1, 2, 3))
        loss = (weight * per_sample).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(args.ema, (1.0 + step) / (10.0 + step))
        _ema_update(ema_unet, unet, decay)
        _ema_update(ema_text, text_encoder, decay)
        _log("unet", step, args.unet_steps, per_sample.mean().item(), clock, 50)
    return ema_unet.requires_grad_(False), ema_text.requires_grad_(False)


def main(argv=None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=WEIGHTS, help="folder for the three safetensors files")
    parser.add_argument("--decoder-only", action="store_true",
                        help="load the VAE in --out, run only stage 4 (decoder fine-tuning) and write the VAE back")
    for name, value in DEFAULTS.items():
        parser.add_argument("--" + name.replace("_", "-"), type=type(value), default=value)
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    total = _Clock()
    print(f"toy model training on the CPU ({torch.get_num_threads()} threads): {vars(args)}", flush=True)

    clock = _Clock()
    samples = [data.draw(seed) for seed in range(data.TRAIN_SEED, data.TRAIN_SEED + args.samples)]
    images = data.render(samples)["images"]
    tok = tokenizer()
    ids = tok([s.caption for s in samples])
    empty_ids = tok("")[0]
    print(f"[data] {len(samples)} images {tuple(images.shape[1:])} rendered and tokenized in {clock():.1f} s", flush=True)

    decoder_generator = torch.Generator().manual_seed(args.seed + 1)  # stage 4 draws its own batches
    if args.decoder_only:
        from .model import _load_part

        vae = make_vae()
        meta = _load_part(vae, args.out / "vae.safetensors")
        vae = finetune_decoder(vae, images, args, decoder_generator)
        meta["training"] = {k: v for k, v in vars(args).items() if k not in ("out", "decoder_only")}
        meta["seconds"] = round(meta.get("seconds", 0.0) + total(), 1)
        save_part(vae, args.out / "vae.safetensors", meta)
        print(f"[done] decoder fine-tuned and written to {args.out} in {total():.1f} s", flush=True)
        return args.out
    vae = train_vae(images, args, generator)
    clock = _Clock()
    latents = encode_all(vae, images)
    scaling_factor = float(1.0 / latents.std())
    latents = latents * scaling_factor
    print(f"[vae] training latents {tuple(latents.shape)} encoded in {clock():.1f} s; scaling factor "
          f"{scaling_factor:.5f}", flush=True)

    unet, text_encoder = train_denoiser(latents, ids, empty_ids, args, generator)
    vae = finetune_decoder(vae, images, args, decoder_generator)
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"training": {k: v for k, v in vars(args).items() if k != "out"}, "seconds": round(total(), 1)}
    save_part(vae, args.out / "vae.safetensors", {"scaling_factor": scaling_factor, **meta})
    save_part(unet, args.out / "unet.safetensors", meta)
    save_part(text_encoder, args.out / "text_encoder.safetensors", meta, dtype=torch.float16)
    size = sum((args.out / f).stat().st_size for f in ("vae.safetensors", "unet.safetensors", "text_encoder.safetensors"))
    print(f"[done] weights written to {args.out} ({size / 1e6:.1f} MB) in {total():.1f} s", flush=True)
    return args.out


if __name__ == "__main__":
    main()
