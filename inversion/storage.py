"""Save and load an :class:`Inversion` as a ``.safetensors`` file: tensors plus JSON metadata, never a pickle.

Conditioning is stored structurally: tensors go into the file, lists/dicts/numbers/strings into the JSON
metadata (``{"$tensor": key}`` marks where a tensor goes back). Values that are neither (ControlNet objects,
hooks) cannot be stored; they are dropped and named in a warning.

Schema of format version 1 (what :func:`load_inversion` checks before it builds an :class:`Inversion`):

Metadata key ``"inversion"``: a JSON object with exactly these fields

    format        ``FORMAT``                       version       ``FORMAT_VERSION``
    method        one of ``METHODS``               options       an object accepted by ``method_options(method)``,
                                                                 each value of its option's type (a bool option
                                                                 takes any integer)
    timesteps     non-empty, strictly ascending    cfg           a finite number
                  non-negative integers
    model_family  a string                         fingerprint   a string
    latent_shape  non-empty list of positive ints
    space         optional: ``"vp"`` or ``"flow"`` (the model family's parametrisation); absent means ``"vp"``
                  (written for flow models only, so VP files stay readable by versions before flow models)
    conditioning  an embedding ``{"$tensor": "conditioning.<n>"}`` or a list of ``[embedding, object]`` pairs
                  (diffusers / ComfyUI CONDITIONING); every ``{"$tensor": key}`` inside names a tensor of the
                  file whose name starts with ``conditioning.``
    negative      the same with ``negative.``, or null

Tensors ("levels" is ``z_star.shape[0] - 1``, the trajectory's steps; "floating": float16, bfloat16, float32 or
float64):

    z_star                      floating ``[levels + 1, *latent_shape]``, finite
    sigmas                      float64 ``[levels + 1]``, finite, non-negative, non-decreasing (clean end first)
    extras.y_star               edict only: floating, ``z_star``'s shape, finite
    extras.null_embeddings      null_text only: floating ``[levels, batch, tokens, width]``, finite
    extras.null_text_losses     null_text only: floating ``[levels, inner_steps]``; NaN pads the steps that
                                stopped early
    extras.null_text_thresholds null_text only: floating ``[levels]``, finite
    conditioning.<n>, negative.<n>  those the conditioning refers to: its embeddings floating
                                ``[batch, tokens, width]`` and finite, other values any tensor

and no others. ``len(timesteps)`` is ``levels`` (EDICT: ``edict_levels(len(timesteps), strength) == levels``, as
EDICT inverts only that part of the schedule). The method must apply to the space (EDICT, DDIM: VP; Euler,
RF-Solver: flow).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .methods import METHODS, method_named, method_options, methods_for
from .spaces import SPACES
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
        # a copy: conditioning may hold one tensor twice (Conditioning Combine) or views of one another, which
        # safetensors refuses to write as separate tensors
        tensors[key] = value.detach().to("cpu", memory_format=torch.contiguous_format, copy=True)
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
    if inversion.space != "vp":  # VP files keep the fields earlier versions read
        meta["space"] = inversion.space
    if dropped:
        log.warning("[DirectInversion] not saved (cannot be stored in a file): %s", ", ".join(dropped))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_file(tensors, path, metadata={"inversion": json.dumps(meta)})


def load_inversion(path: str) -> Inversion:
    """Read an inversion written by :func:`save_inversion`; raises :class:`InversionFileError` for anything else
    (the message names the file and what is wrong with it; see the module docstring for the schema)."""
    name = os.path.basename(path)
    try:
        tensors = load_file(path)
        with safe_open(path, framework="pt") as handle:
            metadata = handle.metadata() or {}
    except (SafetensorError, OSError, ValueError) as error:
        raise InversionFileError(f"Cannot read {name}: it is truncated or not a safetensors file ({error}).") from error
    try:
        return _inversion(_parse(metadata), tensors)
    except _Problem as problem:
        raise InversionFileError(f"Cannot read {name}: {problem}.") from None


class _Problem(Exception):
    """What is wrong with a file, to be prefixed with its name."""


# ---- metadata fields ----

def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _finite_number(value: Any) -> bool:
    try:
        return _number(value) and math.isfinite(value)
    except OverflowError:  # an integer beyond float's range
        return False


def _integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _timesteps(value: Any) -> bool:
    return (isinstance(value, list) and len(value) > 0 and all(_integer(t) for t in value) and value[0] >= 0
            and all(a < b for a, b in zip(value, value[1:])))


def _latent_shape(value: Any) -> bool:
    return isinstance(value, list) and len(value) > 0 and all(_integer(n) and n > 0 for n in value)


def _reference(value: Any) -> bool:
    return isinstance(value, dict) and set(value) == {"$tensor"}


def _pair(value: Any) -> bool:
    return isinstance(value, list) and len(value) == 2 and _reference(value[0]) and isinstance(value[1], dict) \
        and not _reference(value[1])


def _conditioning(value: Any) -> bool:
    """An embedding reference (diffusers) or a list of [embedding reference, object] pairs (ComfyUI CONDITIONING)."""
    return _reference(value) or (isinstance(value, list) and all(_pair(p) for p in value))


_CONDITIONING = "an embedding tensor or a list of [tensor, object] pairs"

# field -> (test, what the value must be)
_FIELDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "method": (lambda v: isinstance(v, str) and v in METHODS, f"one of {', '.join(METHODS)}"),  # see _parse
    "options": (lambda v: isinstance(v, dict), "an object"),
    "timesteps": (_timesteps, "a non-empty ascending list of non-negative integers"),
    "cfg": (_finite_number, "a finite number"),
    "model_family": (lambda v: isinstance(v, str), "a string"),
    "fingerprint": (lambda v: isinstance(v, str), "a string"),
    "latent_shape": (_latent_shape, "a non-empty list of positive integers"),
    "conditioning": (_conditioning, _CONDITIONING),
    "negative": (lambda v: v is None or _conditioning(v), f"null, {_CONDITIONING}"),
}

# optional field -> (test, what the value must be, the value of files without it)
_OPTIONAL_FIELDS: dict[str, tuple[Callable[[Any], bool], str, Any]] = {
    "space": (lambda v: isinstance(v, str) and v in SPACES, f"one of {', '.join(SPACES)}", "vp"),
}

# type of an option's default -> (test, what the value must be); a bool option takes any integer, as Python would
_OPTION_TYPES: dict[type, tuple[Callable[[Any], bool], str]] = {
    bool: (lambda v: isinstance(v, int), "true or false"),
    int: (_integer, "an integer"),
    float: (_finite_number, "a finite number"),
    str: (lambda v: isinstance(v, str), "a string"),
}


def _show(value: Any) -> str:
    """A short description of a JSON value for a message."""
    if isinstance(value, (list, dict)):
        return "a list" if isinstance(value, list) else "an object"
    text = repr(value) if isinstance(value, str) else json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _parse(metadata: dict) -> dict:
    """The metadata object, its format and version checked."""
    try:
        meta = json.loads(metadata["inversion"])
    except (KeyError, ValueError, RecursionError):
        raise _Problem("it is a safetensors file but not a saved inversion") from None
    if not isinstance(meta, dict):
        raise _Problem(f"it is a safetensors file but not a saved inversion (its metadata is {_show(meta)})")
    if meta.get("format") != FORMAT:
        raise _Problem(f"it is not a saved inversion (format {_show(meta.get('format'))})")
    if meta.get("version") != FORMAT_VERSION:
        raise _Problem(f"it was saved by format version {_show(meta.get('version'))}; this version reads "
                       f"{FORMAT_VERSION}. Invert the image again")
    unknown = sorted(meta.keys() - _FIELDS.keys() - _OPTIONAL_FIELDS.keys() - {"format", "version"})
    if unknown:
        raise _Problem(f"unknown field {unknown[0]!r}")
    for key, (test, expected, default) in _OPTIONAL_FIELDS.items():
        if key not in meta:
            meta[key] = default
        elif not test(meta[key]):
            raise _Problem(f"the field {key!r} must be {expected}, got {_show(meta[key])}")
    for key, (test, expected) in _FIELDS.items():
        if key not in meta:
            raise _Problem(f"the field {key!r} is missing")
        if key == "method":  # the methods of the file's model family
            names = methods_for(SPACES[meta["space"]])
            test, expected = (lambda v: isinstance(v, str) and v in names), f"one of {', '.join(names)}"
        if not test(meta[key]):
            raise _Problem(f"the field {key!r} must be {expected}, got {_show(meta[key])}")
    return meta


def _options(method: str, options: dict):
    """The method's options object; each value of its option's type and accepted by the options class."""
    defaults = {f.name: f.default for f in dataclasses.fields(method_options(method))}
    for key, value in options.items():
        rule = _OPTION_TYPES.get(type(defaults[key])) if key in defaults else None  # unknown names: method_options
        if rule is not None and not rule[0](value):
            raise _Problem(f"the option {key!r} must be {rule[1]}, got {_show(value)}")
    try:
        return method_options(method, options)
    except ValueError as error:
        raise _Problem(f"its options are invalid: {str(error).rstrip('.')}") from None


# ---- tensors ----

@dataclass(frozen=True)
class _Trajectory:
    """What the expected shapes of a file's tensors depend on."""

    levels: int
    latent_shape: tuple[int, ...]
    options: Any


@dataclass(frozen=True)
class _Tensor:
    """A stored tensor: floating point (``dtype`` if given), of ``shape`` (``None``: any size), finite unless its
    NaN are legitimate."""

    shape: Callable[[_Trajectory], tuple[Optional[int], ...]]
    finite: bool = True
    dtype: Optional[torch.dtype] = None


_FLOATING = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

_Z_STAR = _Tensor(lambda t: (None, *t.latent_shape))
_SIGMAS = _Tensor(lambda t: (t.levels + 1,), dtype=torch.float64)
_EMBEDDING = _Tensor(lambda t: (None, None, None))

# method -> its extras (``extras.<name>`` in the file), all required
_EXTRAS: dict[str, dict[str, _Tensor]] = {
    "ddim": {},
    "euler": {},
    "rf_solver": {},
    "negative_prompt": {},
    "edict": {"y_star": _Tensor(lambda t: (t.levels + 1, *t.latent_shape))},
    "null_text": {
        "null_embeddings": _Tensor(lambda t: (t.levels, None, None, None)),
        "null_text_losses": _Tensor(lambda t: (t.levels, t.options.inner_steps), finite=False),  # NaN-padded
        "null_text_thresholds": _Tensor(lambda t: (t.levels,)),
    },
}


def _shape_text(shape: tuple) -> str:
    return "(" + ", ".join("*" if n is None else str(n) for n in shape) + ("," if len(shape) == 1 else "") + ")"


def _check_tensor(tensors: dict, key: str, spec: _Tensor, trajectory: _Trajectory, label: str = "") -> torch.Tensor:
    tensor = tensors.get(key)
    if tensor is None:
        raise _Problem(f"the tensor {key!r} is missing")
    dtypes = _FLOATING if spec.dtype is None else (spec.dtype,)
    if tensor.dtype not in dtypes:
        names = [str(d).removeprefix("torch.") for d in dtypes]
        raise _Problem(f"the tensor {key!r} has dtype {str(tensor.dtype).removeprefix('torch.')}; expected "
                       f"{names[0] if len(names) == 1 else 'one of ' + ', '.join(names)}")
    expected = spec.shape(trajectory)
    if tensor.ndim != len(expected) or any(n is not None and n != m for n, m in zip(expected, tensor.shape)):
        raise _Problem(f"it is inconsistent: its {label or f'tensor {key!r}'} has shape {tuple(tensor.shape)}; "
                       f"expected {_shape_text(expected)}")
    if spec.finite and not torch.isfinite(tensor).all():
        bad = (~torch.isfinite(tensor)).sum().item()
        raise _Problem(f"the tensor {key!r} contains {bad} NaN or infinite values")
    return tensor


def _decode(value: Any, tensors: dict, section: str, used: set) -> Any:
    """``value`` with every ``{"$tensor": key}`` replaced by its tensor (which must be one of ``section``'s)."""
    if _reference(value):
        key = value["$tensor"]
        if not isinstance(key, str) or key not in tensors:
            raise _Problem(f"{section} refers to tensor {_show(key)}, which is not in the file")
        if not key.startswith(f"{section}."):
            raise _Problem(f"{section} refers to tensor {key!r}, which is not one of its own")
        used.add(key)
        return tensors[key]
    if isinstance(value, dict):
        return {k: _decode(v, tensors, section, used) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode(v, tensors, section, used) for v in value]
    return value


def _stored_conditioning(meta: dict, section: str, tensors: dict, trajectory: _Trajectory, used: set) -> Any:
    value = meta[section]
    if value is None:
        return None
    try:
        decoded = _decode(value, tensors, section, used)
    except RecursionError:
        raise _Problem(f"{section} is nested too deeply") from None
    embeddings = [value] if _reference(value) else [pair[0] for pair in value]
    for reference in embeddings:
        _check_tensor(tensors, reference["$tensor"], _EMBEDDING, trajectory)
    return decoded


def _inversion(meta: dict, tensors: dict) -> Inversion:
    """The inversion a checked metadata object and its file's tensors describe; raises :class:`_Problem`."""
    method = meta["method"]
    options = _options(method, meta["options"])
    latent_shape = tuple(meta["latent_shape"])
    z_star = _check_tensor(tensors, "z_star", _Z_STAR, _Trajectory(0, latent_shape, options), label="trajectory")
    trajectory = _Trajectory(z_star.shape[0] - 1, latent_shape, options)
    sigmas = _check_tensor(tensors, "sigmas", _SIGMAS, trajectory)
    if (sigmas < 0).any() or (sigmas[1:] < sigmas[:-1]).any():
        raise _Problem("the tensor 'sigmas' must hold non-negative, non-decreasing noise levels")
    steps = len(meta["timesteps"])
    try:
        levels = method_named(method).levels(steps, options)
    except ValueError as error:
        raise _Problem(f"its options are invalid: {str(error).rstrip('.')}") from None
    if levels != trajectory.levels:
        raise _Problem(f"it is inconsistent: its trajectory has {trajectory.levels} steps, but {steps} timesteps "
                       f"give {levels} {method} steps")
    extras = {name: _check_tensor(tensors, f"extras.{name}", spec, trajectory)
              for name, spec in _EXTRAS[method].items()}
    used = {"z_star", "sigmas"} | {f"extras.{name}" for name in extras}
    conditioning = _stored_conditioning(meta, "conditioning", tensors, trajectory, used)
    negative = _stored_conditioning(meta, "negative", tensors, trajectory, used)
    unknown = sorted(tensors.keys() - used)
    if unknown:
        raise _Problem(f"the tensor {unknown[0]!r} is not part of a {method} inversion")
    return Inversion(method=method, z_star=z_star, sigmas=sigmas, timesteps=list(meta["timesteps"]), cfg=meta["cfg"],
                     conditioning=conditioning, negative=negative, model_family=meta["model_family"],
                     options=meta["options"], extras=extras, fingerprint=meta["fingerprint"], space=meta["space"])
