"""ComfyUI-side test helpers: a stand-in for the server, test-only nodes (tiny models standing in for checkpoints,
ControlNets and the like) and a tiny LoRA file for a tiny model."""
from __future__ import annotations

import torch

import di_testing as T

def comfyui_env():
    """The pack's ``headless.comfyui_env``: what differs between ComfyUI versions for running prompts in-process
    (building the executor, reading its cached outputs) is adapted there, for the tests as for the headless runner."""
    T.load_pack()
    from comfyui_direct_inversion.headless import comfyui_env as env

    return env


class FakeServer:
    """What PromptExecutor needs of ComfyUI's server: it records the messages instead of sending them."""

    def __init__(self):
        self.client_id = None
        self.last_node_id = None
        self.last_prompt_id = None
        self.messages = []

    def send_sync(self, event, data, sid=None):
        self.messages.append((event, data))


def input_free_node(name: str, doc: str, return_types: tuple, make):
    """A test-only ComfyUI node without inputs whose output is ``make()``."""

    class Node:
        __doc__ = doc
        RETURN_TYPES = return_types
        FUNCTION = "make"
        CATEGORY = "testing"

        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {}}

        def make(self):
            return make()

    Node.__name__ = Node.__qualname__ = name
    return Node


def _tiny_sd15():
    model = T.comfy_model_from_diffusers(T.tiny_diffusers_unet())
    conds = [T.comfy_conditioning(T.prompt_embeds(seed)) for seed in (1, 2, 3)]
    return (model, T.tiny_comfy_vae(), *conds)


def _nan_latent():
    samples = torch.zeros(1, 4, 16, 16)
    samples[0, 0, 3, 3] = float("nan")
    return ({"samples": samples},)


def _overflowing_sd15():
    """The tiny SD1.5 set-up whose UNet returns NaN for the sampler's target branch once sigma falls below 3 (as an
    fp16 overflow would), while inversion and the source branch run normally."""
    T.load_pack()
    from comfyui_direct_inversion.adapters.comfyui_backend import BRANCH_OPTION
    from comfyui_direct_inversion.inversion import BRANCH_TARGET

    model, *rest = _tiny_sd15()
    model = model.clone()

    def wrapper(apply_model, args):
        out = apply_model(args["input"], args["timestep"], **args["c"])
        options = args["c"].get("transformer_options", {})
        if options.get(BRANCH_OPTION) == BRANCH_TARGET and float(args["timestep"].max()) < 3.0:
            out = out * float("nan")
        return out

    model.set_model_unet_function_wrapper(wrapper)
    return (model, *rest)


def _latent(samples: torch.Tensor):
    return ({"samples": samples},)


TEST_NODES = {
    "DITest_TinySD15": input_free_node("TinySD15", "A tiny SD1.5-family model, VAE and three prompts' conditioning.",
                                       ("MODEL", "VAE", "CONDITIONING", "CONDITIONING", "CONDITIONING"), _tiny_sd15),
    "DITest_TinyClip": input_free_node("TinyClip", "A CLIP with SD1.x's real tokenizer and a tiny random text model.",
                                       ("CLIP",), lambda: (T.tiny_comfy_clip(),)),
    "DITest_TinySDXL": input_free_node("TinySDXL", "A tiny SDXL-family model, VAE and CLIP (both tokenizers real).",
                                       ("MODEL", "VAE", "CLIP"),
                                       lambda: (T.tiny_comfy_sdxl(pooled_dim=T.CONTEXT_DIM // 2), T.tiny_comfy_vae(),
                                                T.tiny_comfy_sdxl_clip())),
    "DITest_NaNLatent": input_free_node("NaNLatent", "A LATENT with a NaN in it.", ("LATENT",), _nan_latent),
    "DITest_HugeLatent": input_free_node("HugeLatent", "An image-like LATENT times 1e30.", ("LATENT",),
                                         lambda: _latent(T.image_like_latent() * 1e30)),
    "DITest_Latent16": input_free_node("Latent16", "A 16-channel LATENT (as SD3/Flux VAEs make).", ("LATENT",),
                                       lambda: _latent(torch.zeros(1, 16, 16, 16))),
    "DITest_IntLatent": input_free_node("IntLatent", "An int64 LATENT.", ("LATENT",),
                                        lambda: _latent(torch.zeros(1, 4, 16, 16, dtype=torch.int64))),
    "DITest_Mask3": input_free_node("Mask3", "A MASK of batch 3.", ("MASK",), lambda: (torch.ones(3, 128, 128),)),
    "DITest_OverflowingSD15": input_free_node("OverflowingSD15", "TinySD15 whose target predictions turn NaN late.",
                                              ("MODEL", "VAE", "CONDITIONING", "CONDITIONING", "CONDITIONING"),
                                              _overflowing_sd15),
}


def _tiny_checkpoint():
    """What CheckpointLoaderSimple gives (MODEL, CLIP, VAE), at toy size (SD1.5 family, SD1.x's real tokenizer)."""
    return T.comfy_model_from_diffusers(T.tiny_diffusers_unet()), T.tiny_comfy_clip(), T.tiny_comfy_vae()


def _tiny_sdxl_checkpoint():
    return (T.tiny_comfy_sdxl(pooled_dim=T.CONTEXT_DIM // 2), T.tiny_comfy_sdxl_clip(), T.tiny_comfy_vae())


def _tiny_controlnet(seed: int = 0):
    """A ComfyUI CONTROL_NET: a cldm ControlNet of the tiny UNet's layout (3-channel hint), random weights with its
    zero convolutions made small but non-zero so that it acts."""
    import comfy.cldm.cldm
    import comfy.controlnet
    import comfy.model_management
    import comfy.ops

    config = {**{k: v for k, v in T.TINY_LDM_UNET_CONFIG.items() if k != "out_channels"}, "num_head_channels": 8}
    control_model = comfy.cldm.cldm.ControlNet(**config, hint_channels=3, operations=comfy.ops.disable_weight_init,
                                               device="cpu", dtype=torch.float32)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in control_model.named_parameters():
            if p.ndim > 1:
                scale = 0.02 if "zero_conv" in name or "middle_block_out" in name else 1.0
                p.copy_(torch.randn(p.shape, generator=g) * scale / p[0].numel() ** 0.5)
            elif name.endswith("weight"):
                p.fill_(1.0)
            else:
                p.zero_()
    return comfy.controlnet.ControlNet(control_model, load_device=comfy.model_management.get_torch_device(),
                                       manual_cast_dtype=None)


STAND_INS = {
    "DITest_TinyCheckpoint": input_free_node("TinyCheckpoint", "Stands in for CheckpointLoaderSimple (SD1.5 family).",
                                             ("MODEL", "CLIP", "VAE"), _tiny_checkpoint),
    "DITest_TinySDXLCheckpoint": input_free_node("TinySDXLCheckpoint", "Stands in for CheckpointLoaderSimple (SDXL).",
                                                 ("MODEL", "CLIP", "VAE"), _tiny_sdxl_checkpoint),
    "DITest_TinyControlNet": input_free_node("TinyControlNet", "Stands in for ControlNetLoader.", ("CONTROL_NET",),
                                             lambda: (_tiny_controlnet(),)),
}
TEST_NODES.update(STAND_INS)


def write_tiny_lora(path, rank: int = 4, seed: int = 0) -> int:
    """A LoRA file (kohya key names) for the tiny SD1.5 model's attention projections; returns its layer count."""
    import comfy.lora
    from safetensors.torch import save_file

    model = _tiny_checkpoint()[0]
    keys = comfy.lora.model_lora_keys_unet(model.model, {})
    shapes = {k: v.shape for k, v in model.model.state_dict().items()}
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for lora_key, weight_key in keys.items():
        if not (isinstance(weight_key, str) and lora_key.startswith("lora_unet_") and weight_key.endswith("to_q.weight")):
            continue
        out_dim, in_dim = shapes[weight_key]
        tensors[f"{lora_key}.lora_up.weight"] = torch.randn(out_dim, rank, generator=g) * 0.5
        tensors[f"{lora_key}.lora_down.weight"] = torch.randn(rank, in_dim, generator=g) * 0.5
        tensors[f"{lora_key}.alpha"] = torch.tensor(float(rank))
    save_file(tensors, str(path))
    return len(tensors) // 3
