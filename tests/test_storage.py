"""Saved inversions (inversion/storage.py): every method round-trips bit for bit; a tampered or malformed file gives
an InversionFileError that names the file and what is wrong, and never any other exception (no ComfyUI needed)."""
from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import di_testing as T

METHODS = ("ddim", "null_text", "negative_prompt", "edict")
STEPS = 5  # DDIM steps of the inversions saved here; EDICT (strength 0.8) inverts int(5 * 0.8) = 4 of them
BAD = "bad.safetensors"


@pytest.fixture(scope="module")
def storage(pack):
    from comfyui_direct_inversion.inversion import storage

    return storage


def comfy_style(inversion):
    """``inversion`` with ComfyUI CONDITIONING ([embedding, options] pairs) instead of diffusers embeddings: a pooled
    output that is a view of its embedding, and one negative twice (as Conditioning Combine of one prompt makes)."""
    pooled = inversion.conditioning[:, 0]
    return dataclasses.replace(
        inversion,
        conditioning=[[inversion.conditioning, {"pooled_output": pooled, "area": (8, 8, 0, 0), "strength": 1.0}]],
        negative=[[inversion.negative, {}], [inversion.negative, {"mask_strength": 0.5}]])


@pytest.fixture(scope="module")
def inversions(edit_setup):
    """Real inversions of every method, as the diffusers backend writes them, plus two conditioning layouts."""
    made = {method: T.invert_with(edit_setup, method, steps=STEPS) for method in METHODS}
    s = edit_setup
    made["ddim_without_negative"] = s["backend"].invert(s["unet"], s["scheduler"], s["z0"], s["source"], steps=STEPS)
    made["comfy_conditioning"] = comfy_style(made["negative_prompt"])
    return made


@pytest.fixture(scope="module")
def stored(storage, inversions, tmp_path_factory):
    """Per inversion: the tensors and the metadata object of its saved file."""
    folder = tmp_path_factory.mktemp("stored")
    files = {}
    for case, inversion in inversions.items():
        path = str(folder / f"{case}.safetensors")
        storage.save_inversion(inversion, path)
        with safe_open(path, framework="pt") as handle:
            files[case] = (load_file(path), json.loads(handle.metadata()["inversion"]))
    return files


def write(path, tensors: dict, meta) -> str:
    """A safetensors file with ``tensors`` and ``meta`` (JSON-encoded unless already a string) as its inversion."""
    text = meta if isinstance(meta, str) else json.dumps(meta)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata={"inversion": text})
    return str(path)


def bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.contiguous().flatten().view(torch.uint8), b.contiguous().flatten().view(torch.uint8))


def same(a, b) -> bool:
    """Equal structure, equal plain values, bit-identical tensors (a tuple comes back as a list)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and bitwise_equal(a.cpu(), b)
    if isinstance(a, (list, tuple)):
        return isinstance(b, list) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return a == b and type(a) is type(b)


# ---- files the writer produces ----

@pytest.mark.parametrize("case", [*METHODS, "ddim_without_negative", "comfy_conditioning"])
def test_every_saved_inversion_loads_bit_identically_and_edits_the_same(storage, inversions, edit_setup, tmp_path,
                                                                         case):
    inversion = inversions[case]
    path = str(tmp_path / f"{case}.safetensors")
    storage.save_inversion(inversion, path)
    back = storage.load_inversion(path)
    assert bitwise_equal(back.z_star, inversion.z_star) and bitwise_equal(back.sigmas, inversion.sigmas)
    assert back.extras.keys() == inversion.extras.keys()
    assert all(bitwise_equal(back.extras[k], inversion.extras[k]) for k in inversion.extras)
    assert same(inversion.conditioning, back.conditioning) and same(inversion.negative, back.negative)
    for name in ("method", "options", "timesteps", "cfg", "model_family", "fingerprint"):
        assert same(getattr(inversion, name), getattr(back, name)), name
    if case == "null_text":  # its losses are NaN-padded where a step stopped early (the last step always does)
        assert back.extras["null_text_losses"].isnan().any()
    if case != "comfy_conditioning":  # and it edits exactly like the original
        a = T.diffusers_edit(edit_setup, edit_setup["target"], inversion=inversion)
        b = T.diffusers_edit(edit_setup, edit_setup["target"], inversion=back)
        assert torch.equal(a.edited, b.edited) and torch.equal(a.source, b.source)


# ---- tampered files: one problem each, named ----

def field(key: str, value):
    """Set a metadata field (``value`` may be a function of the metadata)."""
    return lambda tensors, meta: (tensors, {**meta, key: value(meta) if callable(value) else value})


def without(key: str):
    return lambda tensors, meta: (tensors, {k: v for k, v in meta.items() if k != key})


def option(key: str, value):
    return lambda tensors, meta: (tensors, {**meta, "options": {**meta["options"], key: value}})


def tensor(key: str, change):
    """Replace (or add, if ``change`` takes no tensor) the tensor ``key``."""
    return lambda tensors, meta: ({**tensors, key: change(tensors[key]) if key in tensors else change()}, meta)


def without_tensor(key: str):
    return lambda tensors, meta: ({k: v for k, v in tensors.items() if k != key}, meta)


def metadata(value):
    """Replace the whole metadata (any JSON value, or a raw string)."""
    return lambda tensors, meta: (tensors, value)


def poisoned(t: torch.Tensor) -> torch.Tensor:
    t = t.clone()
    t.view(-1)[1] = float("nan")
    return t


# ddim's tensors: z_star, sigmas, conditioning.2, negative.3; null_text's: ... extras, conditioning.5, negative.6
BAD_FILES = [
    ("metadata_list", "ddim", metadata([1, 2]),
     "it is a safetensors file but not a saved inversion (its metadata is a list)."),
    ("metadata_not_json", "ddim", metadata("{not json"), "it is a safetensors file but not a saved inversion."),
    ("foreign_format", "ddim", field("format", "other/thing"), "it is not a saved inversion (format 'other/thing')."),
    ("other_version", "ddim", field("version", 2),
     "it was saved by format version 2; this version reads 1. Invert the image again."),
    ("missing_field", "ddim", without("latent_shape"), "the field 'latent_shape' is missing."),
    ("unknown_field", "ddim", field("note", "hi"), "unknown field 'note'."),
    ("unknown_method", "ddim", field("method", "pnp"),
     "the field 'method' must be one of ddim, null_text, negative_prompt, edict, got 'pnp'."),
    ("options_not_object", "ddim", field("options", [1]), "the field 'options' must be an object, got a list."),
    ("timesteps_repeated", "ddim", field("timesteps", [0, 200, 200, 600, 800]),
     "the field 'timesteps' must be a non-empty ascending list of non-negative integers, got a list."),
    ("timesteps_text", "ddim", field("timesteps", "0,200"),
     "the field 'timesteps' must be a non-empty ascending list of non-negative integers, got '0,200'."),
    ("cfg_nan", "ddim", field("cfg", float("nan")), "the field 'cfg' must be a finite number, got NaN."),
    ("cfg_text", "ddim", field("cfg", "7.5"), "the field 'cfg' must be a finite number, got '7.5'."),
    ("model_family_number", "ddim", field("model_family", 15), "the field 'model_family' must be a string, got 15."),
    ("fingerprint_null", "ddim", field("fingerprint", None), "the field 'fingerprint' must be a string, got null."),
    ("latent_shape_zero", "ddim", field("latent_shape", [1, 4, 0, 16]),
     "the field 'latent_shape' must be a non-empty list of positive integers, got a list."),
    ("conditioning_text", "ddim", field("conditioning", "a cat"),
     "the field 'conditioning' must be an embedding tensor or a list of [tensor, object] pairs, got 'a cat'."),
    ("conditioning_null", "ddim", field("conditioning", None),
     "the field 'conditioning' must be an embedding tensor or a list of [tensor, object] pairs, got null."),
    ("conditioning_dangling", "ddim", field("conditioning", {"$tensor": "conditioning.9"}),
     "conditioning refers to tensor 'conditioning.9', which is not in the file."),
    ("conditioning_not_a_name", "ddim", field("conditioning", {"$tensor": 3}),
     "conditioning refers to tensor 3, which is not in the file."),
    ("conditioning_takes_negatives", "ddim", field("conditioning", lambda m: m["negative"]),
     "conditioning refers to tensor 'negative.3', which is not one of its own."),
    ("comfy_option_dangling", "comfy_conditioning",
     field("conditioning", lambda m: [[m["conditioning"][0][0], {"pooled_output": {"$tensor": "conditioning.77"}}]]),
     "conditioning refers to tensor 'conditioning.77', which is not in the file."),
    ("comfy_pair_without_tensor", "comfy_conditioning", field("negative", [["text", {}]]),
     "the field 'negative' must be null, an embedding tensor or a list of [tensor, object] pairs, got a list."),
    ("embedding_flat", "ddim", tensor("conditioning.2", lambda e: e[0]),
     "it is inconsistent: its tensor 'conditioning.2' has shape (8, 32); expected (*, *, *)."),
    ("embedding_nan", "ddim", tensor("negative.3", poisoned),
     "the tensor 'negative.3' contains 1 NaN or infinite values."),
    ("unreferenced_tensor", "ddim", tensor("conditioning.9", lambda: torch.zeros(1, 8, 32)),
     "the tensor 'conditioning.9' is not part of a ddim inversion."),
    ("extras_of_another_method", "ddim", tensor("extras.y_star", lambda: torch.zeros(6, 1, 4, 16, 16)),
     "the tensor 'extras.y_star' is not part of a ddim inversion."),
    ("z_star_missing", "ddim", without_tensor("z_star"), "the tensor 'z_star' is missing."),
    ("z_star_int64", "ddim", tensor("z_star", lambda z: z.round().to(torch.int64)),
     "the tensor 'z_star' has dtype int64; expected one of float16, bfloat16, float32, float64."),
    ("z_star_nan", "ddim", tensor("z_star", poisoned), "the tensor 'z_star' contains 1 NaN or infinite values."),
    ("z_star_other_latent", "ddim", field("latent_shape", [1, 4, 8, 8]),
     "it is inconsistent: its trajectory has shape (6, 1, 4, 16, 16); expected (*, 1, 4, 8, 8)."),
    ("sigmas_missing", "ddim", without_tensor("sigmas"), "the tensor 'sigmas' is missing."),
    ("sigmas_float32", "ddim", tensor("sigmas", lambda s: s.float()),
     "the tensor 'sigmas' has dtype float32; expected float64."),
    ("sigmas_short", "ddim", tensor("sigmas", lambda s: s[:-1]),
     "it is inconsistent: its tensor 'sigmas' has shape (5,); expected (6,)."),
    ("sigmas_descending", "ddim", tensor("sigmas", lambda s: s.flip(0)),
     "the tensor 'sigmas' must hold non-negative, non-decreasing noise levels."),
    ("sigmas_negative", "ddim", tensor("sigmas", lambda s: s - s[-1]),
     "the tensor 'sigmas' must hold non-negative, non-decreasing noise levels."),
    ("sigmas_infinite", "ddim", tensor("sigmas", lambda s: torch.cat([s[:-1], s.new_tensor([math.inf])])),
     "the tensor 'sigmas' contains 1 NaN or infinite values."),
    ("timesteps_short", "ddim", field("timesteps", lambda m: m["timesteps"][:-1]),
     "it is inconsistent: its trajectory has 5 steps, but 4 timesteps give 4 ddim steps."),
    ("edict_timesteps_long", "edict", field("timesteps", lambda m: m["timesteps"] + [1000, 1200]),
     "it is inconsistent: its trajectory has 4 steps, but 7 timesteps give 5 edict steps."),
    ("edict_y_star_missing", "edict", without_tensor("extras.y_star"), "the tensor 'extras.y_star' is missing."),
    ("edict_y_star_short", "edict", tensor("extras.y_star", lambda y: y[:-1]),
     "it is inconsistent: its tensor 'extras.y_star' has shape (4, 1, 4, 16, 16); expected (5, 1, 4, 16, 16)."),
    ("edict_option_unknown", "edict", option("lr", 0.1),
     "its options are invalid: edict has no option(s) lr; its options are: guidance, leapfrog, mix, strength."),
    ("edict_option_out_of_range", "edict", option("mix", 0.2),
     "its options are invalid: EDICT mix must be in (0.5, 1], got 0.2."),
    ("edict_option_mistyped", "edict", option("guidance", "high"),
     "the option 'guidance' must be a finite number, got 'high'."),
    ("edict_strength_leaves_nothing", "edict", option("strength", 0.1),
     "its options are invalid: EDICT strength 0.1 leaves no step of 5 to invert; raise steps or strength."),
    ("null_text_inner_steps_fraction", "null_text", option("inner_steps", 2.5),
     "the option 'inner_steps' must be an integer, got 2.5."),
    ("null_text_embeddings_missing", "null_text", without_tensor("extras.null_embeddings"),
     "the tensor 'extras.null_embeddings' is missing."),
    ("null_text_embeddings_short", "null_text", tensor("extras.null_embeddings", lambda e: e[1:]),
     "it is inconsistent: its tensor 'extras.null_embeddings' has shape (4, 1, 8, 32); expected (5, *, *, *)."),
    ("null_text_embeddings_nan", "null_text", tensor("extras.null_embeddings", poisoned),
     "the tensor 'extras.null_embeddings' contains 1 NaN or infinite values."),
    ("null_text_losses_missing", "null_text", without_tensor("extras.null_text_losses"),
     "the tensor 'extras.null_text_losses' is missing."),
    ("null_text_losses_of_other_inner_steps", "null_text", option("inner_steps", 3),
     "it is inconsistent: its tensor 'extras.null_text_losses' has shape (5, 2); expected (5, 3)."),
    ("null_text_thresholds_nan", "null_text", tensor("extras.null_text_thresholds", poisoned),
     "the tensor 'extras.null_text_thresholds' contains 1 NaN or infinite values."),
    ("null_text_thresholds_int", "null_text", tensor("extras.null_text_thresholds", lambda t: t.to(torch.int32)),
     "the tensor 'extras.null_text_thresholds' has dtype int32; expected one of float16, bfloat16, float32, float64."),
]


@pytest.mark.parametrize("case, tamper, message", [pytest.param(*c[1:], id=c[0]) for c in BAD_FILES])
def test_a_tampered_file_is_refused_with_what_is_wrong(storage, stored, tmp_path, case, tamper, message):
    tensors, meta = tamper(*stored[case])
    path = write(tmp_path / BAD, tensors, meta)
    with pytest.raises(storage.InversionFileError) as raised:
        storage.load_inversion(path)
    assert str(raised.value) == f"Cannot read {BAD}: {message}"


def test_not_an_inversion_or_not_a_safetensors_file(storage, stored, tmp_path):
    tensors, _ = stored["ddim"]
    save_file(tensors, str(tmp_path / BAD), metadata={"format": "pt"})  # a safetensors file of something else
    not_saved = f"^Cannot read {BAD}: it is a safetensors file but not a saved inversion\\.$"
    with pytest.raises(storage.InversionFileError, match=not_saved):
        storage.load_inversion(str(tmp_path / BAD))
    good = tmp_path / "good.safetensors"
    write(good, *stored["ddim"])
    for name, data in (("truncated", good.read_bytes()[:-100]), ("random", bytes(range(256)) * 4)):
        (tmp_path / name).write_bytes(data)
        with pytest.raises(storage.InversionFileError,
                           match=f"^Cannot read {name}: it is truncated or not a safetensors file"):
            storage.load_inversion(str(tmp_path / name))


# ---- any file: an Inversion or an InversionFileError, nothing else ----

FIELDS = ("format", "version", "method", "options", "timesteps", "cfg", "model_family", "fingerprint", "latent_shape",
          "conditioning", "negative")
TENSOR_NAMES = ("z_star", "sigmas", "extras.y_star", "extras.null_embeddings", "extras.null_text_losses",
                "extras.null_text_thresholds", "conditioning.2", "conditioning.4", "conditioning.5", "negative.3",
                "negative.6", "other")
DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int64, torch.int32, torch.uint8,
          torch.bool)

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8)
REFERENCE = st.builds(lambda key: {"$tensor": key}, st.sampled_from(TENSOR_NAMES) | JSON)
PAIRS = st.lists(st.tuples(REFERENCE, st.dictionaries(st.text(max_size=4), JSON | REFERENCE, max_size=2)).map(list),
                 max_size=2)
PLAUSIBLE = {  # values near the valid ones, so that mutations also reach the later checks
    "format": st.just("comfyui-directinversion/inversion"),
    "version": st.sampled_from([1, 1.0, True, 0, 2]),
    "method": st.sampled_from(METHODS),
    "options": st.dictionaries(st.sampled_from(["guidance", "inner_steps", "strength", "mix", "leapfrog", "lr",
                                                "proximal", "interpolation", "quantile", "early_stop"]),
                               st.integers(-2, 12) | st.floats(-1, 12) | st.booleans() | st.sampled_from(["l0", "x"]),
                               max_size=3),
    "timesteps": st.lists(st.integers(-1, 1000), max_size=8),
    "cfg": st.floats(0, 30) | st.floats() | st.integers(),
    "model_family": st.text(max_size=8),
    "fingerprint": st.text(max_size=8),
    "latent_shape": st.lists(st.integers(-1, 16), max_size=5),
    "conditioning": REFERENCE | PAIRS,
    "negative": st.none() | REFERENCE | PAIRS,
}


@st.composite
def random_tensor(draw, like: torch.Tensor = None) -> torch.Tensor:
    shapes = [st.lists(st.integers(0, 3), max_size=4).map(tuple)]
    dtypes = [st.sampled_from(DTYPES)]
    if like is not None and like.ndim > 0:  # often of the shape and dtype it replaces, so that more files pass
        near = st.integers(0, like.ndim - 1).flatmap(
            lambda d: st.integers(-1, 1).map(lambda k: tuple(n + k * (i == d) for i, n in enumerate(like.shape))))
        shapes = [st.just(tuple(like.shape)), near.filter(lambda s: min(s, default=0) >= 0)] + shapes
        dtypes.insert(0, st.just(like.dtype))
    shape = draw(st.one_of(shapes))
    fill = draw(st.sampled_from([0.0, 1.0, -1.0, 0.5, "ramp", math.nan, math.inf]))
    if fill == "ramp":
        values = torch.arange(math.prod(shape), dtype=torch.float64).reshape(shape)
    else:
        values = torch.full(shape, fill, dtype=torch.float64)
    dtype = draw(st.one_of(dtypes))
    return values.to(dtype) if dtype.is_floating_point else (values.nan_to_num(0.0, 0.0, 0.0) % 2).to(dtype)


def check_accepted(storage, inversion, folder) -> None:
    """What every accepted file gives: a usable inversion that saves and loads again."""
    assert inversion.method in METHODS
    assert inversion.z_star.is_floating_point() and torch.isfinite(inversion.z_star).all()
    assert inversion.sigmas.dtype == torch.float64 and inversion.sigmas.shape == inversion.z_star.shape[:1]
    assert bool((inversion.sigmas[1:] >= inversion.sigmas[:-1]).all())
    assert inversion.steps >= 1 and len(inversion.timesteps) >= inversion.steps
    if inversion.method != "edict":
        assert len(inversion.timesteps) == inversion.steps
    expected = {"edict": {"y_star"}, "null_text": {"null_embeddings", "null_text_losses", "null_text_thresholds"}}
    assert set(inversion.extras) == expected.get(inversion.method, set())
    again = str(folder / "again.safetensors")
    storage.save_inversion(inversion, again)
    assert bitwise_equal(storage.load_inversion(again).z_star, inversion.z_star)


@settings(max_examples=200, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_any_file_loads_or_raises_inversion_file_error(storage, stored, tmp_path_factory, data):
    case = data.draw(st.sampled_from(sorted(stored)), label="case")
    tensors, meta = stored[case]
    tensors, meta = dict(tensors), json.loads(json.dumps(meta))
    for key in data.draw(st.lists(st.sampled_from(FIELDS + ("extra",)), max_size=3), label="fields"):
        if data.draw(st.booleans()):
            meta.pop(key, None)
        else:
            meta[key] = data.draw(PLAUSIBLE.get(key, JSON) | JSON | REFERENCE, label=key)
    for key in data.draw(st.lists(st.sampled_from(TENSOR_NAMES), max_size=3), label="tensors"):
        if key in tensors and data.draw(st.booleans()):
            del tensors[key]
        else:
            tensors[key] = data.draw(random_tensor(tensors.get(key)), label=key)
    if data.draw(st.sampled_from(["keep"] * 9 + ["replace"])) == "replace":
        meta = data.draw(JSON | st.text(max_size=20), label="whole metadata")
    folder = tmp_path_factory.mktemp("any")
    path = write(folder / "any.safetensors", tensors, meta)
    try:
        inversion = storage.load_inversion(path)
    except storage.InversionFileError as error:
        assert str(error).startswith("Cannot read any.safetensors: ")
        event("refused")
    else:
        check_accepted(storage, inversion, folder)
        event("accepted")
