"""Editors: plain PyTorch attention/feature control over the core's denoiser (imports neither ComfyUI nor diffusers)."""
