"""The toy data set: one flat-coloured shape on a flat background, with its caption and object mask.

Captions come from one grammar, ``"a {style} {colour} {shape} on a {background} background"``, e.g. "a solid red
circle on a white background". Every word of it is one CLIP token, so a colour swap or a style change replaces one
token with one token (Prompt-to-Prompt's replace mode). Position and size are random; a sample is a pure function
of its seed (``numpy.random.default_rng(seed)``), so the training set, the held-out set and every benchmark image
can be rebuilt anywhere.

Shapes are drawn from signed distance functions at 4x supersampling (anti-aliased edges); the object mask is the
filled silhouette (for a hollow shape too: the region the object occupies).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

IMAGE_SIZE = 64
SUPERSAMPLE = 4
SHAPES = ("circle", "square", "triangle")
STYLES = ("solid", "hollow")
COLOURS = {  # object colours, RGB 0..255
    "red": (215, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 215),
    "yellow": (235, 210, 40),
    "purple": (140, 55, 190),
    "orange": (245, 140, 25),
}
BACKGROUNDS = {
    "white": (240, 240, 240),
    "black": (20, 20, 20),
    "gray": (125, 125, 125),
    "pink": (245, 170, 190),
}
SIZE_RANGE = (12.0, 24.0)  # half the side of the object's bounding box, pixels
MARGIN = 2.0
SQUARE_SCALE = 0.85  # the square's half side, as a fraction of the bounding half-size
OUTLINE = (0.25, 3.0)  # a hollow shape's outline: this fraction of the half-size, at least this many pixels
TRAIN_SEED = 0
HELD_OUT_SEED = 10_000_000  # held-out samples: seeds from here on (training draws far fewer than this)


@dataclass(frozen=True)
class Sample:
    shape: str
    style: str
    colour: str
    background: str
    cx: float
    cy: float
    size: float

    @property
    def caption(self) -> str:
        return caption(self.shape, self.style, self.colour, self.background)

    def with_(self, **changes) -> "Sample":
        fields = asdict(self)
        fields.update(changes)
        return Sample(**fields)


def caption(shape: str, style: str, colour: str, background: str) -> str:
    return f"a {style} {colour} {shape} on a {background} background"


def draw(seed: int) -> Sample:
    """The sample of ``seed``: every attribute uniform, the object inside the image with a margin."""
    rng = np.random.default_rng(seed)
    shape = SHAPES[rng.integers(len(SHAPES))]
    style = STYLES[rng.integers(len(STYLES))]
    colour = list(COLOURS)[rng.integers(len(COLOURS))]
    background = list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
    size = float(rng.uniform(*SIZE_RANGE))
    low, high = size + MARGIN, IMAGE_SIZE - size - MARGIN
    cx, cy = float(rng.uniform(low, high)), float(rng.uniform(low, high))
    return Sample(shape, style, colour, background, cx, cy, size)


def signed_distance(shape: str, x: torch.Tensor, y: torch.Tensor, cx, cy, size) -> torch.Tensor:
    """Negative inside the shape, in pixels (exact inside; outside, a bound that is enough for drawing)."""
    dx, dy = x - cx, y - cy
    if shape == "circle":
        return torch.sqrt(dx * dx + dy * dy) - size
    if shape == "square":
        return torch.maximum(dx.abs(), dy.abs()) - SQUARE_SCALE * size
    if shape == "triangle":  # apex up: (0, -s), (-s, s), (s, s) in image coordinates (y down)
        base = dy - size
        norm = float(np.hypot(2.0, 1.0))
        left = (-2.0 * dx - dy - size) / norm
        right = (2.0 * dx - dy - size) / norm
        return torch.maximum(base, torch.maximum(left, right))
    raise ValueError(f"Unknown shape {shape!r}; expected one of {SHAPES}")


_GRIDS: dict = {}


def _grid(size: int, supersample: int):
    key = (size, supersample)
    if key not in _GRIDS:
        coords = (torch.arange(size * supersample, dtype=torch.float32) + 0.5) / supersample
        _GRIDS[key] = torch.meshgrid(coords, coords, indexing="ij")[::-1]  # x, y
    return _GRIDS[key]


def _pool(inside: torch.Tensor, size: int, supersample: int) -> torch.Tensor:
    return inside.float().reshape(-1, size, supersample, size, supersample).mean(dim=(2, 4))


def paint_and_mask(samples, size: int = IMAGE_SIZE, supersample: int = SUPERSAMPLE, chunk: int = 128):
    """``(paint [B, H, W], mask [B, H, W] bool)``: the fraction of each pixel the object's paint covers, and the
    filled silhouette (pixels at least half inside the shape)."""
    x, y = _grid(size, supersample)
    paints, masks = [], []
    for first in range(0, len(samples), chunk):
        part = samples[first:first + chunk]
        column = lambda values: torch.tensor(values, dtype=torch.float32).view(-1, 1, 1)  # noqa: E731
        cx, cy, half = column([s.cx for s in part]), column([s.cy for s in part]), column([s.size for s in part])
        sdf = torch.empty(len(part), *x.shape)
        for shape in SHAPES:
            rows = [i for i, s in enumerate(part) if s.shape == shape]
            if rows:
                sdf[rows] = signed_distance(shape, x, y, cx[rows], cy[rows], half[rows])
        inside = sdf < 0
        thickness = torch.clamp(OUTLINE[0] * half, min=OUTLINE[1])
        hollow = column([s.style == "hollow" for s in part]).bool()
        drawn = inside & ~(hollow & (sdf <= -thickness))
        paints.append(_pool(drawn, size, supersample))
        masks.append(_pool(inside, size, supersample) > 0.5)
    return torch.cat(paints), torch.cat(masks)


def _palette(names, table) -> torch.Tensor:
    return torch.tensor([table[n] for n in names], dtype=torch.float32).view(-1, 3, 1, 1) / 255.0


def batch(seeds, size: int = IMAGE_SIZE) -> dict:
    """``images [B, 3, H, W]`` in [0, 1], ``masks [B, H, W]``, ``captions``, ``samples`` for the given seeds."""
    samples = [draw(int(seed)) for seed in seeds]
    return render(samples, size) | {"samples": samples}


def render(samples, size: int = IMAGE_SIZE) -> dict:
    """The anti-aliased pictures of ``samples`` with their masks and captions."""
    paint, mask = paint_and_mask(samples, size)
    fg = _palette([s.colour for s in samples], COLOURS)
    bg = _palette([s.background for s in samples], BACKGROUNDS)
    images = bg + (fg - bg) * paint.unsqueeze(1)
    return {"images": images, "masks": mask, "captions": [s.caption for s in samples]}


def held_out_seeds(count: int, offset: int = 0) -> list[int]:
    return list(range(HELD_OUT_SEED + offset, HELD_OUT_SEED + offset + count))
