"""Random-weight models at benchmark sizes, the two backends behind one interface, and the measuring loop.

Sizes: ``tiny`` (the tests' toy UNet: two levels, 32/64 channels, 16x16 latents), ``sd15`` (SD1.x's UNet, 512x512
images) and ``sdxl`` (SDXL's base UNet, 1024x1024 images). Weights are random: speed and memory do not depend on
their values. The output convolution is scaled by 0.1, so that inversion behaves as with a trained model (see
tests/di_testing.py) and NT's inner loop does the same work as it would there.

Backends: ``diffusers`` (the pack's diffusers adapter over ``UNet2DConditionModel``) and ``comfyui`` (the node
path: a ComfyUI model of the same architecture -- the class ComfyUI's own model detection picks for the
diffusers UNet at the real sizes -- run through the ComfyUI adapter, with ComfyUI's attention). SDXL's extra conditioning (pooled text embedding
and size ids): ComfyUI takes it with each conditioning; for a diffusers UNet a forward pre-hook adds one
constant set to every call (a pipeline's pooled embedding differs per prompt; the cost is the same).
"""
from __future__ import annotations

import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
import di_testing  # noqa: E402  (the tests' tiny model and ComfyUI locator)

SIZES = ("tiny", "sd15", "sdxl")
BACKENDS = ("diffusers", "comfyui")
OUT_SCALE = 0.1

# SDXL base's UNet in diffusers' terms (its published config).
SDXL_UNET = dict(sample_size=128, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 block_out_channels=(320, 640, 1280), layers_per_block=2, transformer_layers_per_block=(1, 2, 10),
                 cross_attention_dim=2048, attention_head_dim=(5, 10, 20), use_linear_projection=True,
                 addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816)
# (latent side, prompt tokens, context width, pooled width or None)
SHAPES = {"tiny": (16, di_testing.TOKENS, di_testing.CONTEXT_DIM, None), "sd15": (64, 77, 768, None),
          "sdxl": (128, 77, 2048, 1280)}


def diffusers_unet(size: str, device="cpu"):
    """A random-weight ``UNet2DConditionModel`` of ``size`` on ``device`` (float32, eval mode)."""
    from diffusers import UNet2DConditionModel

    if size == "tiny":
        return di_testing.tiny_diffusers_unet(out_scale=OUT_SCALE).to(device)
    torch.manual_seed(0)
    with torch.device(device):  # initialised where it runs: SDXL's 2.6e9 weights take minutes to fill on a CPU
        if size == "sd15":  # diffusers' defaults are SD1.x's layout
            unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
        elif size == "sdxl":
            unet = UNet2DConditionModel(**SDXL_UNET)
        else:
            raise ValueError(f"unknown size {size!r}; expected one of {SIZES}")
    with torch.no_grad():
        unet.conv_out.weight.mul_(OUT_SCALE)
        unet.conv_out.bias.mul_(OUT_SCALE)
    return unet.eval()


def comfy_model(size: str, dtype: torch.dtype):
    """A random-weight ComfyUI ModelPatcher of ``size``. At SD1.5/SDXL size its
    model class and config come from ComfyUI's detection of the diffusers UNet's weight shapes (as ComfyUI's UNet
    loader does with a diffusers file); the toy UNet is no known architecture, so it gets the tests' config."""
    import comfy.model_detection
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models

    if size == "tiny":
        config = comfy.supported_models.SD15(dict(di_testing.TINY_LDM_UNET_CONFIG))
    else:
        shapes = diffusers_unet(size, "meta").state_dict()
        config = comfy.model_detection.model_config_from_unet_config(
            comfy.model_detection.unet_config_from_diffusers_unet(shapes))
        expected = {"sd15": "SD15", "sdxl": "SDXL"}[size]
        if config is None or type(config).__name__ != expected:
            raise RuntimeError(f"ComfyUI detects this {size} UNet as {type(config).__name__}, not {expected}")
    config.set_inference_dtype(dtype, None)
    model = config.get_model({})  # on the offload device, as ComfyUI's loaders make it; sampling loads it
    di_testing.init_comfy_unet(model.diffusion_model, out_scale=OUT_SCALE)
    return comfy.model_patcher.ModelPatcher(model, load_device=comfy.model_management.get_torch_device(),
                                            offload_device=comfy.model_management.unet_offload_device())


def import_comfyui(device: str) -> None:
    """Puts ComfyUI ($COMFYUI_PATH, ../.. or ~/comfy/ComfyUI) on the path, configured for ``device``."""
    if "comfy.model_management" in sys.modules:
        return
    path = di_testing.find_comfyui()
    if path is None:
        raise SystemExit(f"--backend comfyui: {di_testing.COMFY_SKIP_REASON}")
    sys.path.insert(0, str(path))
    from comfy.cli_args import args  # configured before comfy.model_management loads

    args.cpu = device == "cpu"
    import utils.extra_config  # noqa: F401  (ComfyUI's utils package, before comfy/utils.py can shadow it)


class Counted:
    """Counts the latents a UNet module is evaluated on (a forward pre-hook: one per latent in each batch)."""

    def __init__(self, module: torch.nn.Module):
        self.module, self.evaluations = module, 0
        self._ranges = []
        module.register_forward_pre_hook(self._count, with_kwargs=True)
        module.register_forward_hook(self._end_range)

    def _count(self, module, args, kwargs):
        sample = args[0] if args else kwargs.get("sample", kwargs.get("x"))
        self.evaluations += sample.shape[0]
        self._ranges.append(torch.profiler.record_function("UNet"))  # under a profiler: the UNet's share of the time
        self._ranges[-1].__enter__()

    def _end_range(self, module, args, output):
        if self._ranges:
            self._ranges.pop().__exit__(None, None, None)


def _sdxl_added_conditioning(pooled: torch.Tensor, side: int):
    """A forward pre-hook giving a diffusers SDXL UNet its per-image constants at every call's batch size."""
    time_ids = torch.tensor([[side * 8, side * 8, 0, 0, side * 8, side * 8]], dtype=pooled.dtype, device=pooled.device)

    def hook(module, args, kwargs):
        batch = (args[0] if args else kwargs["sample"]).shape[0]
        kwargs["added_cond_kwargs"] = {"text_embeds": pooled.expand(batch, -1).to(module.dtype),
                                       "time_ids": time_ids.expand(batch, -1).to(module.dtype)}
        return args, kwargs

    return hook


class Bench:
    """One random-weight model of ``size`` behind ``backend``, with a latent and three prompts (source, target,
    null); ``invert`` and ``edit`` run the pack's adapter, ``counted`` counts UNet sample-evaluations."""

    def __init__(self, size: str, backend: str, device: str, dtype: torch.dtype):
        self.size, self.backend, self.device, self.dtype = size, backend, device, dtype
        side, tokens, width, pooled_width = SHAPES[size]
        g = torch.Generator().manual_seed(1)
        embeds = [torch.randn(1, tokens, width, generator=g) for _ in range(3)]
        pooled = [torch.randn(1, pooled_width, generator=g) if pooled_width else None for _ in range(3)]
        self.latent = torch.randn(1, 4, side, side, generator=g)
        if backend == "diffusers":
            from diffusers import DDIMScheduler

            from comfyui_direct_inversion.adapters import diffusers_backend

            self.adapter = diffusers_backend
            self.unet = diffusers_unet(size, device).to(dtype)
            if pooled_width:
                self.unet.register_forward_pre_hook(_sdxl_added_conditioning(pooled[0].to(device), side),
                                                    with_kwargs=True)
            self.scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                           clip_sample=False, set_alpha_to_one=False)
            self.source, self.target, self.null = (e.to(device, dtype) for e in embeds)
            self.latent = self.latent.to(device)
            self.counted = Counted(self.unet)
        elif backend == "comfyui":
            from comfyui_direct_inversion.adapters import comfyui_backend

            self.adapter = comfyui_backend
            self.model = comfy_model(size, dtype)
            self.source, self.target, self.null = (
                [[e, {} if p is None else {"pooled_output": p}]] for e, p in zip(embeds, pooled))
            self.counted = Counted(self.model.model.diffusion_model)
        else:
            raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")

    @property
    def unet_module(self) -> torch.nn.Module:
        return self.counted.module

    def invert(self, method: str, steps: int, options: Optional[dict] = None):
        if self.backend == "diffusers":
            return self.adapter.invert(self.unet, self.scheduler, self.latent, self.source, self.null, steps=steps,
                                       method=method, options=options)
        return self.adapter.invert(self.model, self.latent, self.source, self.null, steps=steps, method=method,
                                   options=options).inversion

    def edit(self, inversion, offsets: str = "source", editor=None, cfg: float = 7.5, target=None, negative=None):
        """The adapter's edit; ``target`` and ``negative`` (conditioning in this backend's form) default to the
        bench's target and null prompts."""
        target = self.target if target is None else target
        negative = self.null if negative is None else negative
        if self.backend == "diffusers":
            return self.adapter.edit(self.unet, self.scheduler, inversion, target, negative, cfg=cfg,
                                     offsets=offsets, editor=editor)
        return self.adapter.direct_inversion(self.model, inversion, target, negative, cfg=cfg, offsets=offsets,
                                             editor=editor)

    def directed_target(self):
        """Pix2Pix-Zero's target conditioning: the source prompt plus the edit direction
        Delta = E(target) - E(source) (one sentence a side), on the embeddings and, where there is one, the pooled
        output (ComfyUI's conditioning, as the P2P-Zero Editor node makes it)."""
        from comfyui_direct_inversion.editors import edit_direction

        if self.backend == "diffusers":
            return self.source + edit_direction([self.source], [self.target]).to(self.source)
        from comfyui_direct_inversion.adapters.comfyui_prompts import directed_conditioning

        return directed_conditioning(self.source, [self.source], [self.target])

    def forward_backward(self, timestep: int = 500) -> torch.Tensor:
        """One conditional UNet evaluation (source prompt) at a latent that requires grad, and the gradient of its
        output's sum to that latent, with the weights not requiring grad (as an editor's gradient pass runs)."""
        from comfyui_direct_inversion.inversion import autograd_weights

        with autograd_weights(self.unet_module), torch.enable_grad():
            if self.backend == "diffusers":
                x = self.latent.to(self.device, copy=True).requires_grad_(True)
                out = self.unet(x.to(self.dtype), torch.tensor(timestep, device=self.device),
                                encoder_hidden_states=self.source).sample
            else:
                x, out = self._comfy_forward(timestep)
            (grad,) = torch.autograd.grad(out.float().sum(), x)
        return grad

    def _comfy_forward(self, timestep: int):
        """The ComfyUI model loaded as sampling loads it, evaluated on the source conditioning at ``timestep``'s
        sigma: (the latent requiring grad, the model's output)."""
        import comfy.model_management

        comfy.model_management.load_models_gpu([self.model])
        base, device = self.model.model, comfy.model_management.get_torch_device()
        side = SHAPES[self.size][0]
        embeds, options = self.source[0]
        adm = base.encode_adm(pooled_output=options.get("pooled_output"), width=side * 8, height=side * 8,
                              device=device)
        extra = {} if adm is None else {"y": adm.to(device)}
        sigma = base.model_sampling.sigma(torch.tensor([float(timestep)])).to(device)
        x = self.latent.to(device, copy=True).requires_grad_(True)
        return x, base.apply_model(x, sigma, c_crossattn=embeds.to(device), **extra)


def measure(once: Callable[[], dict], device: str, repeats: int, weights: torch.nn.Module) -> dict:
    """Runs ``once`` (which returns its own figures) once to warm up, then ``repeats`` times: median wall time,
    peak memory (CUDA's peak allocation on a GPU since the warm-up; the process's peak RSS on the CPU) and the
    size of the UNet's weights."""

    def timed():
        synchronize(device)
        t0 = time.perf_counter()
        figures = once()
        synchronize(device)
        return time.perf_counter() - t0, figures

    timed()
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    runs = [timed() for _ in range(repeats)]
    if device.startswith("cuda"):
        peak, kind = torch.cuda.max_memory_allocated() / 2 ** 20, "CUDA max_memory_allocated"
    else:
        peak, kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "process peak RSS"
    figures = {key: statistics.median(r[1][key] for r in runs) for key in runs[0][1]}
    return {**figures, "seconds_median": statistics.median(t for t, _ in runs), "seconds_all": [t for t, _ in runs],
            "peak_mib": peak, "peak_kind": kind,
            "weights_mib": sum(p.numel() * p.element_size() for p in weights.parameters()) / 2 ** 20}


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
