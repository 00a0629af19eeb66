"""Random-weight models at benchmark sizes, the two backends behind one interface, and the measuring loop.

Sizes: ``tiny`` (the tests' toy UNet: two levels, 32/64 channels, 16x16 latents), ``sd15`` (SD1.x's UNet, 512x512
images) and ``sdxl`` (SDXL's base UNet, 1024x1024 images). Weights are random: speed and memory do not depend on
their values. The output convolution is scaled by 0.1, so that inversion behaves as with a trained model (see
tests/di_testing.py) and NT's inner loop does the same work as it would there.

Flow-matching sizes (16-channel latents, ``FlowMatchEulerDiscreteScheduler``): ``tiny-sd3`` and ``tiny-flux`` (the
tests' toy SD3 and Flux transformers of tests/flow_testing.py, 16x16 latents, CPU-friendly), ``sd35-medium``
(SD3.5 medium's ``SD3Transformer2DModel``) and ``flux-dev`` (FLUX.1-dev's ``FluxTransformer2DModel``), both at
1024x1024 images (128x128 latents), with their published configurations (``SD35_MEDIUM``, ``FLUX_DEV``) and random
weights, the output projection scaled by 0.1 as the UNets' (the tiny ones are made so by flow_testing). Their
prompts are random embeddings of the pipelines' shapes; the edit guides as each family is sampled (``FLOW_GUIDANCE``:
SD3 with CFG 4.5 and a negative prompt, Flux dev with CFG 1 and embedded guidance 3.5). The real sizes are for a
GPU (SD3.5 medium's 2.5e9 and Flux dev's 1.2e10 weights); on the ``meta`` device they build without memory.

Backends: ``diffusers`` (the pack's diffusers adapter over ``UNet2DConditionModel``) and ``comfyui`` (the node
path: a ComfyUI model of the same architecture -- the class ComfyUI's own model detection picks for the
diffusers UNet at the real sizes -- run through the ComfyUI adapter, with ComfyUI's attention). SDXL's extra conditioning (pooled text embedding
and size ids): ComfyUI takes it with each conditioning; for a diffusers UNet a forward pre-hook adds one
constant set to every call (a pipeline's pooled embedding differs per prompt; the cost is the same). Flow models
in ComfyUI: ComfyUI's own conversion of the diffusers transformer's weights (``convert_diffusers_mmdit``, as its UNet
loader runs on a diffusers file), its detection of the configuration and its model class (SD3 / Flux), as
tests/flow_testing.py makes them, in the benchmark's dtype; Flux gets ComfyUI's ModelSamplingFlux node for the image
size, so that both backends sample the same levels (the shift FluxPipeline computes for that size).
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
import flow_testing  # noqa: E402  (the tests' tiny SD3 and Flux transformers, their schedulers)

UNET_SIZES = ("tiny", "sd15", "sdxl")
FLOW_SIZES = {"tiny-sd3": "sd3", "tiny-flux": "flux", "sd35-medium": "sd3", "flux-dev": "flux"}  # size: family
SIZES = UNET_SIZES + tuple(FLOW_SIZES)
BACKENDS = ("diffusers", "comfyui")
OUT_SCALE = 0.1
UNET_CFG = 7.5  # the UNet edits' classifier-free guidance
# Each flow family's edit guidance, as it is sampled: (CFG, Flux's embedded guidance). SD3/SD3.5: CFG 4.5 with a
# negative prompt (SD3.5 medium's suggested guidance); Flux dev: guidance-distilled, CFG 1 (no unconditional
# prediction) with embedded guidance 3.5 (FluxPipeline's default guidance_scale, ComfyUI's default).
FLOW_GUIDANCE = {"sd3": (4.5, None), "flux": (1.0, flow_testing.FLUX_GUIDANCE)}

# SDXL base's UNet in diffusers' terms (its published config).
SDXL_UNET = dict(sample_size=128, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 block_out_channels=(320, 640, 1280), layers_per_block=2, transformer_layers_per_block=(1, 2, 10),
                 cross_attention_dim=2048, attention_head_dim=(5, 10, 20), use_linear_projection=True,
                 addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816)
# SD3.5 medium's transformer: stabilityai/stable-diffusion-3.5-medium, transformer/config.json (MMDiT-X: 24 joint
# blocks of 24 heads of 64, the first 13 with a second, image-only attention; RMS-normed queries and keys;
# positional embedding for up to 384x384 patches -- diffusers' single-file loader tells SD3.5 medium by that
# table's 147456 = 384^2 rows). 2,243,171,520 parameters plus that 226,492,416-value table, which diffusers keeps as
# a buffer and the checkpoint as a weight: 2.47e9 in all, the published "2.5B".
SD35_MEDIUM = dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
                   num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                   pooled_projection_dim=2048, pos_embed_max_size=384, dual_attention_layers=tuple(range(13)),
                   qk_norm="rms_norm")
# FLUX.1-dev's transformer: black-forest-labs/FLUX.1-dev, transformer/config.json -- diffusers'
# FluxTransformer2DModel defaults (19 double and 38 single blocks of 24 heads of 128, RoPE axes 16+56+56, T5 context
# 4096, CLIP-L pooled 768, 2x2-packed 16-channel latents: 64 input channels) with dev's guidance embedding.
# 11,901,408,320 parameters (the published 12B; "11.9B" on its model page).
FLUX_DEV = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                axes_dims_rope=(16, 56, 56))
# (latent side, prompt tokens, context width, pooled width or None). SD3.5 / Flux dev at 1024x1024: the pipelines'
# prompt lengths, StableDiffusion3Pipeline's 77 CLIP + 256 T5 tokens (max_sequence_length=256; CLIP-L and -G
# side by side zero-padded to T5's 4096 channels; pooled: CLIP-L's 768 + CLIP-G's 1280) and FluxPipeline's 512 T5
# tokens (max_sequence_length=512; pooled: CLIP-L's 768). (ComfyUI's own text encoders pad short prompts to fewer
# tokens, SD3 154 and Flux 256; both backends get the same prompts here.)
SHAPES = {"tiny": (16, di_testing.TOKENS, di_testing.CONTEXT_DIM, None), "sd15": (64, 77, 768, None),
          "sdxl": (128, 77, 2048, 1280),
          "tiny-sd3": (16, flow_testing.TOKENS, flow_testing.SD3_CONTEXT_DIM, flow_testing.SD3_POOLED_DIM),
          "tiny-flux": (16, flow_testing.TOKENS, flow_testing.FLUX_CONTEXT_DIM, flow_testing.FLUX_POOLED_DIM),
          "sd35-medium": (128, 77 + 256, 4096, 768 + 1280), "flux-dev": (128, 512, 4096, 768)}


def is_flow(size: str) -> bool:
    return size in FLOW_SIZES


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


def diffusers_transformer(size: str, device="cpu"):
    """A random-weight flow transformer of ``size`` (``SD3Transformer2DModel`` or ``FluxTransformer2DModel``) on
    ``device`` (float32, eval mode), its output projection scaled by ``OUT_SCALE``."""
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    if size == "tiny-sd3":
        return flow_testing.tiny_diffusers_sd3(out_scale=OUT_SCALE).to(device)
    if size == "tiny-flux":
        return flow_testing.tiny_diffusers_flux(out_scale=OUT_SCALE).to(device)
    torch.manual_seed(0)
    with torch.device(device):  # initialised where it runs (Flux dev: 1.2e10 weights)
        if size == "sd35-medium":
            model = SD3Transformer2DModel(**SD35_MEDIUM)
        elif size == "flux-dev":
            model = FluxTransformer2DModel(**FLUX_DEV)
        else:
            raise ValueError(f"unknown flow size {size!r}; expected one of {tuple(FLOW_SIZES)}")
    with torch.no_grad():
        model.proj_out.weight.mul_(OUT_SCALE)
        model.proj_out.bias.mul_(OUT_SCALE)
    return model.eval()


def comfy_flow_model(size: str, dtype: torch.dtype, device="cpu"):
    """A ComfyUI ModelPatcher of flow ``size`` holding ``diffusers_transformer(size)``'s weights (made on ``device``),
    by ComfyUI's conversion, detection and model class (as tests/flow_testing.py, with ``dtype`` for inference);
    Flux with ComfyUI's ModelSamplingFlux node set for the benchmark's image size."""
    import comfy.model_detection
    import comfy.model_management
    import comfy.model_patcher

    transformer = diffusers_transformer(size, device)
    sd = comfy.model_detection.convert_diffusers_mmdit(dict(transformer.state_dict()), "")
    unet_config = comfy.model_detection.detect_unet_config(sd, "")
    family = FLOW_SIZES[size]
    if family == "flux":  # ComfyUI reads parts of Flux's layout off the real model's sizes (see flow_testing)
        config = transformer.config
        unet_config.update({"hidden_size": config.num_attention_heads * config.attention_head_dim,
                            "num_heads": config.num_attention_heads, "axes_dim": list(config.axes_dims_rope),
                            "context_in_dim": config.joint_attention_dim, "vec_in_dim": config.pooled_projection_dim,
                            "in_channels": config.in_channels // 4,
                            "out_channels": (config.out_channels or config.in_channels) // 4})
    model_config = comfy.model_detection.model_config_from_unet_config(unet_config, sd)
    expected = {"sd3": "SD3", "flux": "Flux"}[family]
    if model_config is None or type(model_config).__name__ != expected:
        raise RuntimeError(f"ComfyUI detects this {size} transformer as {type(model_config).__name__}, not {expected}")
    model_config.set_inference_dtype(dtype, None)
    model = model_config.get_model(sd, "")  # on the offload device, as ComfyUI's loaders make it
    model.diffusion_model.load_state_dict(model_config.process_unet_state_dict(sd), strict=True)
    model.eval()
    del transformer, sd
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=comfy.model_management.get_torch_device(),
                                               offload_device=comfy.model_management.unet_offload_device())
    if family == "flux":
        from comfy_extras.nodes_model_advanced import ModelSamplingFlux

        side = SHAPES[size][0] * 8
        patched = ModelSamplingFlux().patch(patcher, max_shift=1.15, base_shift=0.5, width=side, height=side)
        patcher = patched[0] if isinstance(patched, tuple) else patched.result[0]  # (ComfyUI 0.3.x / 0.3x)
    return patcher


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
    """Counts the latents a UNet or flow-transformer module is evaluated on (a forward pre-hook: one per latent in
    each batch; Flux's packed latents in diffusers, ``[B, patches, 64]``, are one per batch row too)."""

    def __init__(self, module: torch.nn.Module):
        self.module, self.evaluations = module, 0
        self._ranges = []
        module.register_forward_pre_hook(self._count, with_kwargs=True)
        module.register_forward_hook(self._end_range)

    def _count(self, module, args, kwargs):
        sample = args[0] if args else next(kwargs[k] for k in ("sample", "hidden_states", "x") if k in kwargs)
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
    null); ``invert`` and ``edit`` run the pack's adapter, ``counted`` counts the model's sample-evaluations.
    ``cfg`` is the edit's guidance (UNets 7.5; flow models their family's, with Flux's embedded ``flux_guidance``)."""

    def __init__(self, size: str, backend: str, device: str, dtype: torch.dtype):
        self.size, self.backend, self.device, self.dtype = size, backend, device, dtype
        self.flow = is_flow(size)
        self.cfg, self.flux_guidance = FLOW_GUIDANCE[FLOW_SIZES[size]] if self.flow else (UNET_CFG, None)
        side, tokens, width, pooled_width = SHAPES[size]
        g = torch.Generator().manual_seed(1)
        embeds = [torch.randn(1, tokens, width, generator=g) for _ in range(3)]
        pooled = [torch.randn(1, pooled_width, generator=g) if pooled_width else None for _ in range(3)]
        channels = flow_testing.LATENT_CHANNELS if self.flow else 4
        self.latent = torch.randn(1, channels, side, side, generator=g)
        if self.flow:
            self._flow_model(backend, embeds, pooled)
        elif backend == "diffusers":
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

    def _flow_model(self, backend: str, embeds: list, pooled: list) -> None:
        """The flow transformer behind ``backend``: diffusers' with its scheduler and ``(embeds, pooled)`` prompts, or
        ComfyUI's (same weights) with CONDITIONING (Flux's carrying its embedded guidance) and the latent in
        ComfyUI's latent space (``process_latent_out``: the adapter maps it back to the model's)."""
        if backend == "diffusers":
            from comfyui_direct_inversion.adapters import diffusers_backend

            self.adapter = diffusers_backend
            self.transformer = diffusers_transformer(self.size, self.device)
            if self.dtype != torch.float32:  # (diffusers warns of any .to(dtype) on a transformer)
                self.transformer.to(self.dtype)
            make_scheduler = {"sd3": flow_testing.sd3_scheduler, "flux": flow_testing.flux_scheduler}
            self.scheduler = make_scheduler[FLOW_SIZES[self.size]]()
            self.source, self.target, self.null = ((e.to(self.device, self.dtype), p.to(self.device, self.dtype))
                                                   for e, p in zip(embeds, pooled))
            self.latent = self.latent.to(self.device)
            self.counted = Counted(self.transformer)
        elif backend == "comfyui":
            from comfyui_direct_inversion.adapters import comfyui_backend

            self.adapter = comfyui_backend
            self.model = comfy_flow_model(self.size, self.dtype, self.device)
            self.source, self.target, self.null = (flow_testing.comfy_flow_conditioning(e, p, self.flux_guidance)
                                                   for e, p in zip(embeds, pooled))
            self.latent = self.model.model.process_latent_out(self.latent)
            self.counted = Counted(self.model.model.diffusion_model)
        else:
            raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")

    @property
    def unet_module(self) -> torch.nn.Module:
        """The counted model: the UNet, or the flow transformer."""
        return self.counted.module

    def invert(self, method: str, steps: int, options: Optional[dict] = None):
        """The adapter's inversion. Flow models' null-text optimises for the edit's guidance (``cfg``; the UNets'
        7.5 is null-text's default)."""
        extra = {}
        if self.flow:
            if method == "null_text":
                options = {"guidance": self.cfg, **(options or {})}
            if self.backend == "diffusers":
                extra = {"flux_guidance": self.flux_guidance}
        if self.backend == "diffusers":
            model = self.transformer if self.flow else self.unet
            return self.adapter.invert(model, self.scheduler, self.latent, self.source, self.null, steps=steps,
                                       method=method, options=options, **extra)
        return self.adapter.invert(self.model, self.latent, self.source, self.null, steps=steps, method=method,
                                   options=options).inversion

    def edit(self, inversion, offsets: str = "source", editor=None, cfg: Optional[float] = None, target=None,
             negative=None):
        """The adapter's edit at ``cfg`` (default: the bench's); ``target`` and ``negative`` (conditioning in this
        backend's form) default to the bench's target and null prompts."""
        cfg = self.cfg if cfg is None else cfg
        target = self.target if target is None else target
        negative = self.null if negative is None else negative
        if self.backend == "diffusers":
            if self.flow:
                return self.adapter.edit(self.transformer, self.scheduler, inversion, target, negative, cfg=cfg,
                                         offsets=offsets, editor=editor, flux_guidance=self.flux_guidance)
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
    size of the model's weights (the UNet's or flow transformer's parameters)."""

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
