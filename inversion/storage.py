"""Save and load an :class:`Inversion` as a ``.safetensors`` file: tensors plus JSON metadata, never a pickle.

Conditioning is stored structurally: tensors go into the file, lists/dicts/numbers/strings into the JSON
metadata (``{"$tensor": key}`` marks where a tensor goes back). Values that are neither (ControlNet objects,
hooks) cannot be stored; they are dropped and named in a warning.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .types import Inversion

__all__ = ["FORMAT", "FORMAT_VERSION", "InversionFileError", "load_inversion", "save_inversion"]

log = logging.getLogger("DirectInversion")

FORMAT = "comfyui-directinversion/inversion"
FORMAT_VERSION = 1


class InversionFileError(ValueError):
    """A file that is not a usable saved inversion (truncated, foreign, from another version or inconsistent)."""


def _encode(value: Any, tensors: dict, prefix: str, dropped: list) -> Any:
    if isinstance(value, torch.Tensor):
        key = f"{prefix}.{len(tensors)}"
        tensors[key] = value.detach().to("cpu").contiguous()
        return {"$tensor": key}
    if isinstance(value, (list, tuple)):
        return [_encode(v, tensors, prefix, dropped) for v in value]
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if isinstance(v, (torch.Tensor, list, tuple, dict, str, int, float, bool)) or v is None:
                out[str(k)] = _encode(v, tensors, prefix, dropped)
            else:
                dropped.append(f"{prefix}:{k} ({type(v).__name__})")
        return out
    return value


def _decode(value: Any, tensors: dict) -> Any:
    if isinstance(value, dict):
        if set(value) == {"$tensor"}:
            return tensors[value["$tensor"]]
        return {k: _decode(v, tensors) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode(v, tensors) for v in value]
    return value


def save_inversion(inversion: Inversion, path: str) -> None:
    """Write ``inversion`` to ``path`` (a ``.safetensors`` file)."""
    tensors = {"z_star": inversion.z_star.detach().to("cpu").contiguous(),
               "sigmas": inversion.sigmas.detach().to("cpu", torch.float64).contiguous()}
    for name, tensor in inversion.extras.items():
        tensors[f"extras.{name}"] = tensor.detach().to("cpu").contiguous()
    dropped = []
    meta = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "method": inversion.method,
        "options": inversion.options,
        "timesteps": inversion.timesteps,
        "cfg": inversion.cfg,
        "model_family": inversion.model_family,
        "fingerprint": inversion.fingerprint,
        "latent_shape": list(inversion.latent_shape),
        "conditioning": _encode(inversion.conditioning, tensors, "conditioning", dropped),
        "negative": _encode(inversion.negative, tensors, "negative", dropped),
    }
    if dropped:
        log.warning("[DirectInversion] not saved (cannot be stored in a file): %s", ", ".join(dropped))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_file(tensors, path, metadata={"inversion": json.dumps(meta)})


def load_inversion(path: str) -> Inversion:
    """Read an inversion written by :func:`save_inversion`; raises :class:`InversionFileError` for anything else."""
    name = os.path.basename(path)
    try:
        tensors = load_file(path)
        with safe_open(path, framework="pt") as handle:
            metadata = handle.metadata() or {}
    except (SafetensorError, OSError, ValueError) as error:
        raise InversionFileError(f"Cannot read {name}: it is truncated or not a safetensors file ({error}).") from error
    try:
        meta = json.loads(metadata["inversion"])
    except (KeyError, json.JSONDecodeError) as error:
        raise InversionFileError(f"{name} is a safetensors file but not a saved inversion.") from error
    if meta.get("format") != FORMAT:
        raise InversionFileError(f"{name} is not a saved inversion (format {meta.get('format')!r}).")
    if meta.get("version") != FORMAT_VERSION:
        raise InversionFileError(f"{name} was saved by format version {meta.get('version')}; this version reads "
                                 f"{FORMAT_VERSION}. Invert the image again.")
    z_star, sigmas = tensors.get("z_star"), tensors.get("sigmas")
    if z_star is None or sigmas is None:
        raise InversionFileError(f"{name} lacks its trajectory tensors.")
    if list(z_star.shape[1:]) != meta["latent_shape"] or z_star.shape[0] != sigmas.shape[0]:
        raise InversionFileError(
            f"{name} is inconsistent: its trajectory has shape {tuple(z_star.shape)} for a latent of shape "
            f"{tuple(meta['latent_shape'])} and {sigmas.shape[0]} noise levels.")
    extras = {k[len("extras."):]: v for k, v in tensors.items() if k.startswith("extras.")}
    return Inversion(method=meta["method"], z_star=z_star, sigmas=sigmas, timesteps=list(meta["timesteps"]),
                     cfg=meta["cfg"], conditioning=_decode(meta["conditioning"], tensors),
                     negative=_decode(meta["negative"], tensors), model_family=meta["model_family"],
                     options=meta["options"], extras=extras, fingerprint=meta["fingerprint"])
