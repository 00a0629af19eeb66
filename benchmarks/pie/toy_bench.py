"""A small PIE-Bench in the benchmark's own format, drawn from the toy model's held-out data (benchmarks/toy/).

Three editing types whose outcome the toy model can show: change color (6: the object's colour word), change object
(1: its shape word) and change background (8: the background's colour word). Images are rendered at the benchmark's
512 x 512 (the toy geometry scaled by 8, anti-aliased), masks are the region the edit may change (the object for 6
and 1, grown by 16 px for 1 since the new shape need not fit the old one; everything but the object for 8), RLE
encoded as the benchmark does; the prompts carry the benchmark's brackets and ``blended_word`` names the word whose
cross-attention makes P2P's local blend.
"""
from __future__ import annotations

import numpy as np
import torch

from . import data as pie

SIZE = 512
TYPES = ("6", "1", "8")
SEED_OFFSET = 200_000  # past the held-out seeds used by benchmarks/toy_edits.py


def _toy():
    from benchmarks.toy import data
    return data


def _other(options, current, rng) -> str:
    choices = [o for o in options if o != current]
    return choices[int(rng.integers(len(choices)))]


def _bracket(caption: str, word: str) -> str:
    return " ".join(f"[{w}]" if w == word else w for w in caption.split())


def edit_of(sample, type_id: str, seed: int) -> dict:
    """The mapping-file fields (but the mask) of editing ``sample`` with edit type ``type_id``."""
    toy = _toy()
    rng = np.random.default_rng(seed)
    if type_id == "6":
        new = sample.with_(colour=_other(toy.COLOURS, sample.colour, rng))
        old_word, new_word, blend = sample.colour, new.colour, (sample.shape, new.shape)
        instruction = f"Make the {sample.shape} {new.colour}"
    elif type_id == "1":
        new = sample.with_(shape=_other(toy.SHAPES, sample.shape, rng))
        old_word, new_word, blend = sample.shape, new.shape, (sample.shape, new.shape)
        instruction = f"Change the {sample.shape} into a {new.shape}"
    elif type_id == "8":
        new = sample.with_(background=_other(toy.BACKGROUNDS, sample.background, rng))
        old_word, new_word, blend = sample.background, new.background, ("background", "background")
        instruction = f"Make the background {new.background}"
    else:
        raise ValueError(f"the toy benchmark has editing types {TYPES}, not {type_id!r}")
    return {"original_prompt": _bracket(sample.caption, old_word), "editing_prompt": _bracket(new.caption, new_word),
            "editing_instruction": instruction, "editing_type_id": type_id, "blended_word": " ".join(blend)}


def _scaled(sample, factor: float):
    return sample.with_(cx=sample.cx * factor, cy=sample.cy * factor, size=sample.size * factor)


def build(out_dir, per_type: int = 10, types=TYPES, first_seed: int | None = None):
    """Write ``per_type`` images of each editing type to ``out_dir`` (benchmark layout); returns the folder."""
    from PIL import Image

    toy = _toy()
    seed = toy.HELD_OUT_SEED + SEED_OFFSET if first_seed is None else first_seed
    factor = SIZE / toy.IMAGE_SIZE
    items, images = {}, {}
    for type_id in types:
        folder = f"{type_id}_{pie.EDITING_TYPES[type_id].replace(' ', '_')}_toy"
        for index in range(per_type):
            sample = toy.draw(seed)
            rendered = toy.render([_scaled(sample, factor)], size=SIZE)
            picture = rendered["images"][0]
            mask = rendered["masks"][0].float()
            if type_id == "1":
                mask = torch.nn.functional.max_pool2d(mask[None, None], 33, stride=1, padding=16)[0, 0]
            elif type_id == "8":
                mask = 1.0 - mask
            key = f"{type_id}{seed:011d}"
            relative = f"{folder}/{key}.png"
            array = (picture.permute(1, 2, 0).clamp(0, 1).numpy() * 255).round().astype("uint8")
            images[relative] = Image.fromarray(array)
            items[key] = {"image_path": relative, **edit_of(sample, type_id, seed),
                          "mask": pie.mask_encode(mask.numpy())}
            seed += 1
    return pie.write(out_dir, items, images)
