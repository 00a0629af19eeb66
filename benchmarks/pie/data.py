"""PIE-Bench's data as published: ``mapping_file.json`` beside ``annotation_images/``.

Each entry of the mapping file (keyed by a 12-digit id) has ``image_path`` (relative to ``annotation_images``),
``original_prompt`` and ``editing_prompt`` (the words that differ in ``[brackets]``), ``editing_instruction``,
``editing_type_id`` ("0"-"9"), ``blended_word`` ("source target", or empty) and ``mask``: run-length pairs
(start, length) over the flattened 512 x 512 image, 1 = the region to edit. The benchmark's evaluation decodes the
mask and then sets the border rows and columns to 1 ("to avoid annotation errors in boundary"); so does
:func:`mask_decode`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np

MAPPING_FILE = "mapping_file.json"
IMAGES = "annotation_images"
MASK_SHAPE = (512, 512)
EDITING_TYPES = {
    "0": "random", "1": "change object", "2": "add object", "3": "delete object", "4": "change content",
    "5": "change pose", "6": "change color", "7": "change material", "8": "change background", "9": "change style",
}
REQUIRED = ("image_path", "original_prompt", "editing_prompt", "editing_type_id", "mask")


class DataError(ValueError):
    """The data folder does not hold PIE-Bench's layout (the message says what is wrong and where)."""


def strip_brackets(text: str) -> str:
    """The prompt without the benchmark's edit markers, as its scripts use it."""
    return text.replace("[", "").replace("]", "")


def mask_decode(encoded: Sequence[int], shape: Sequence[int] = MASK_SHAPE) -> np.ndarray:
    """``[H, W]`` float mask from run-length pairs, border rows and columns set to 1 (the evaluation's decoding)."""
    if len(encoded) % 2:
        raise DataError(f"a run-length mask needs (start, length) pairs, got {len(encoded)} numbers")
    height, width = int(shape[0]), int(shape[1])
    length = height * width
    flat = np.zeros(length, dtype=np.float64)
    for start, run in zip(encoded[0::2], encoded[1::2]):
        start, run = int(start), int(run)
        stop = start + min(run, length - start)  # the evaluation clips a run at the end of the image
        if stop > start:
            flat[start:stop] = 1.0
    mask = flat.reshape(height, width)
    mask[0, :] = mask[-1, :] = 1.0
    mask[:, 0] = mask[:, -1] = 1.0
    return mask


def mask_encode(mask: np.ndarray) -> list[int]:
    """Run-length pairs (start, length) of the ones of a flattened ``[H, W]`` mask (the inverse of the decoding
    but for the border, which decoding always sets)."""
    flat = (np.asarray(mask).reshape(-1) > 0.5).astype(np.int8)
    edges = np.diff(np.concatenate([[0], flat, [0]]))
    starts = np.flatnonzero(edges == 1)
    stops = np.flatnonzero(edges == -1)
    out: list[int] = []
    for start, stop in zip(starts, stops):
        out += [int(start), int(stop - start)]
    return out


@dataclass(frozen=True)
class Entry:
    """One benchmark image with its edit."""

    key: str
    image_path: str
    source_prompt: str  # brackets stripped
    target_prompt: str  # brackets stripped
    instruction: str
    type_id: str
    blended_words: tuple = ()  # (source word, target word) or ()
    rle: tuple = field(default=(), repr=False)
    root: Path = field(default=Path("."), repr=False, compare=False)

    @property
    def image_file(self) -> Path:
        return self.root / IMAGES / self.image_path

    def mask(self, shape: Sequence[int] = MASK_SHAPE) -> np.ndarray:
        """The mask at ``shape``: decoded over the benchmark's 512 x 512 (its run-lengths index that grid), then
        resized by nearest neighbour for data of another size."""
        mask = mask_decode(self.rle, MASK_SHAPE)
        if tuple(shape) != MASK_SHAPE:
            rows = (np.arange(shape[0]) * MASK_SHAPE[0] // shape[0]).clip(0, MASK_SHAPE[0] - 1)
            cols = (np.arange(shape[1]) * MASK_SHAPE[1] // shape[1]).clip(0, MASK_SHAPE[1] - 1)
            mask = mask[rows][:, cols]
        return mask


def _entry(root: Path, key: str, item: dict) -> Entry:
    missing = [name for name in REQUIRED if name not in item]
    if missing:
        raise DataError(f"{MAPPING_FILE}: entry {key} lacks {', '.join(missing)}")
    type_id = str(item["editing_type_id"])
    if type_id not in EDITING_TYPES:
        raise DataError(f"{MAPPING_FILE}: entry {key} has editing_type_id {type_id!r}; the benchmark's are 0-9")
    blended = str(item.get("blended_word") or "").split()
    if len(blended) == 1:  # one word for both prompts (the benchmark's scripts would fail on it)
        blended = blended * 2
    blended = blended[:2]  # the benchmark's scripts take the first two words
    return Entry(key=str(key), image_path=str(item["image_path"]),
                 source_prompt=strip_brackets(str(item["original_prompt"])),
                 target_prompt=strip_brackets(str(item["editing_prompt"])),
                 instruction=str(item.get("editing_instruction", "")), type_id=type_id,
                 blended_words=tuple(blended), rle=tuple(int(v) for v in item["mask"]), root=root)


def parse_shard(text: Optional[str]) -> Optional[tuple[int, int]]:
    """``K/N`` -> (K, N) with 0 <= K < N (``None`` passes through)."""
    if text is None:
        return None
    try:
        k, n = (int(part) for part in str(text).split("/"))
    except ValueError:
        raise DataError(f"--shard takes K/N (this process's index K from 0 to N-1, of N), got {text!r}") from None
    if n < 1 or not 0 <= k < n:
        raise DataError(f"--shard {text}: K must be in 0..N-1 and N >= 1")
    return k, n


def load(data_dir, types: Optional[Iterable[str]] = None, limit: Optional[int] = None,
         shard: Optional[tuple[int, int]] = None, check_images: bool = True) -> list[Entry]:
    """The entries of ``data_dir``, in the mapping file's order, filtered by editing type, then capped at ``limit``,
    then split: shard (K, N) keeps every N-th entry from the K-th, so N processes cover the images once."""
    root = Path(data_dir)
    mapping = root / MAPPING_FILE
    if not mapping.is_file():
        raise DataError(f"{root} holds no {MAPPING_FILE}: the data folder is the benchmark's `data` folder, with "
                        f"{MAPPING_FILE} and {IMAGES}/ (see README, PIE-Bench)")
    try:
        items = json.loads(mapping.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise DataError(f"{mapping} is not valid JSON: {err}") from None
    if not isinstance(items, dict):
        raise DataError(f"{mapping} must map image ids to entries")
    wanted = None if types is None else {str(t) for t in types}
    if wanted is not None and not wanted <= set(EDITING_TYPES):
        raise DataError(f"unknown editing types {sorted(wanted - set(EDITING_TYPES))}; the benchmark's are 0-9")
    entries = [_entry(root, key, item) for key, item in items.items()]
    if wanted is not None:
        entries = [e for e in entries if e.type_id in wanted]
    if limit is not None:
        entries = entries[:max(0, int(limit))]
    if shard is not None:
        k, n = shard
        entries = entries[k::n]
    if check_images:
        absent = [e.image_path for e in entries if not e.image_file.is_file()]
        if absent:
            raise DataError(f"{len(absent)} image(s) named in {MAPPING_FILE} are not under {root / IMAGES}, e.g. "
                            f"{absent[0]}")
    return entries


def write(data_dir, items: dict, images: dict) -> Path:
    """Write a data set in the benchmark's layout: ``items`` maps ids to mapping-file entries, ``images`` maps each
    entry's ``image_path`` to a PIL image. Returns the folder."""
    root = Path(data_dir)
    for relative, picture in images.items():
        path = root / IMAGES / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        picture.save(path)
    root.mkdir(parents=True, exist_ok=True)
    (root / MAPPING_FILE).write_text(json.dumps(items, indent=1), encoding="utf-8")
    return root
