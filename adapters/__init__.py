"""Backend adapters: ComfyUI (comfyui_backend) and diffusers (diffusers_backend). Import the one you need."""
