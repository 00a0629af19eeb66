"""Analytic judges of toy images: what colour, shape, style and background a picture shows, and how much of the
background an edit kept. Nothing here is learned; thresholds are fixed from the palette, not from results.

``analyse(image)``:
- background: the median colour of the 2-pixel frame, named by the nearest background colour;
- object region: pixels farther than ``OBJECT_DISTANCE`` (RGB in [0, 1]) from that colour;
- silhouette: the region with its holes filled (what is not reachable from the frame without crossing it);
- colour: the region's mean colour, named by the nearest object colour;
- style: "hollow" when the region covers less than ``HOLLOW_FILL`` of its silhouette;
- shape: the shape whose template, fitted to the silhouette's bounding box, has the highest IoU with it.

Background metrics (``background_scores``) compare two images outside the source's object mask grown by
``BACKGROUND_MARGIN`` pixels: MSE and PSNR on [0, 1] RGB, and SSIM (11x11 Gaussian window, sigma 1.5, the usual
constants) averaged over those pixels.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import data

OBJECT_DISTANCE = 0.25
HOLLOW_FILL = 0.85
BACKGROUND_MARGIN = 2
FRAME = 2


def _names_and_colours(table: dict):
    names = list(table)
    return names, torch.tensor([table[n] for n in names], dtype=torch.float32) / 255.0


def nearest(colour: torch.Tensor, table: dict) -> str:
    names, colours = _names_and_colours(table)
    return names[int((colours - colour.view(1, 3)).norm(dim=1).argmin())]


def fill_holes(region: torch.Tensor) -> torch.Tensor:
    """``region`` plus every pixel not connected to the image frame through pixels outside ``region``."""
    free = ~region
    outside = torch.zeros_like(region)
    outside[0, :], outside[-1, :], outside[:, 0], outside[:, -1] = True, True, True, True
    outside &= free
    while True:
        grown = F.max_pool2d(outside.float()[None, None], 3, stride=1, padding=1)[0, 0].bool() & free
        if torch.equal(grown, outside):
            return ~outside
        outside = grown


def template(shape: str, cx: float, cy: float, size: float, image_size: int = data.IMAGE_SIZE) -> torch.Tensor:
    sample = data.Sample(shape=shape, style="solid", colour="red", background="white", cx=cx, cy=cy, size=size)
    return data.paint_and_mask([sample], image_size)[1][0]


def iou(a: torch.Tensor, b: torch.Tensor) -> float:
    union = (a | b).sum().item()
    return (a & b).sum().item() / union if union else 1.0


@dataclass
class Analysis:
    background: str
    colour: str
    shape: str
    style: str
    shape_iou: float
    region: torch.Tensor  # [H, W] bool
    silhouette: torch.Tensor  # [H, W] bool

    @property
    def empty(self) -> bool:
        return not bool(self.region.any())


def shape_fit(silhouette: torch.Tensor) -> tuple[str, float]:
    """The best-fitting shape and its IoU (templates fitted to the silhouette's bounding box)."""
    rows, cols = silhouette.any(dim=1).nonzero(), silhouette.any(dim=0).nonzero()
    if len(rows) == 0:
        return "none", 0.0
    top, bottom, left, right = rows.min().item(), rows.max().item() + 1, cols.min().item(), cols.max().item() + 1
    cx, cy = (left + right) / 2.0, (top + bottom) / 2.0
    half = ((right - left) + (bottom - top)) / 4.0
    fits = {"circle": template("circle", cx, cy, half), "square": template("square", cx, cy, half / data.SQUARE_SCALE),
            "triangle": template("triangle", cx, cy, half)}
    scores = {shape: iou(mask, silhouette) for shape, mask in fits.items()}
    best = max(scores, key=scores.get)
    return best, scores[best]


def analyse(image: torch.Tensor) -> Analysis:
    """What ``image`` ([3, H, W] in [0, 1]) shows."""
    image = image.float()
    frame = torch.ones(image.shape[1:], dtype=torch.bool)
    frame[FRAME:-FRAME, FRAME:-FRAME] = False
    bg = image[:, frame].median(dim=1).values
    region = (image - bg.view(3, 1, 1)).norm(dim=0) > OBJECT_DISTANCE
    silhouette = fill_holes(region)
    if not region.any():
        return Analysis(nearest(bg, data.BACKGROUNDS), "none", "none", "none", 0.0, region, silhouette)
    colour = nearest(image[:, region].mean(dim=1), data.COLOURS)
    style = "hollow" if region.sum().item() < HOLLOW_FILL * silhouette.sum().item() else "solid"
    shape, shape_iou = shape_fit(silhouette)
    return Analysis(nearest(bg, data.BACKGROUNDS), colour, shape, style, shape_iou, region, silhouette)


def grow(mask: torch.Tensor, pixels: int) -> torch.Tensor:
    if pixels <= 0:
        return mask
    return F.max_pool2d(mask.float()[None, None], 2 * pixels + 1, stride=1, padding=pixels)[0, 0].bool()


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2.0
    g = torch.exp(-x * x / (2 * sigma * sigma))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).float()


def ssim_map(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-pixel SSIM of two [3, H, W] images in [0, 1], averaged over channels (reflect padding)."""
    window = _gaussian_window().expand(3, 1, 11, 11)
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    pad = lambda x: F.pad(x[None], (5, 5, 5, 5), mode="reflect")  # noqa: E731
    blur = lambda x: F.conv2d(pad(x), window, groups=3)[0]  # noqa: E731
    mu_a, mu_b = blur(a), blur(b)
    var_a, var_b = blur(a * a) - mu_a ** 2, blur(b * b) - mu_b ** 2
    cov = blur(a * b) - mu_a * mu_b
    value = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    return value.mean(dim=0)


def background_scores(source: torch.Tensor, edited: torch.Tensor, mask: torch.Tensor) -> dict:
    """MSE, PSNR (dB) and SSIM outside ``mask`` grown by ``BACKGROUND_MARGIN`` pixels."""
    keep = ~grow(mask, BACKGROUND_MARGIN)
    diff = (source.float() - edited.float())[:, keep]
    mse = diff.pow(2).mean().item()
    return {"bg_mse": mse, "bg_psnr": 10.0 * math.log10(1.0 / max(mse, 1e-10)),
            "bg_ssim": ssim_map(source.float(), edited.float())[keep].mean().item()}


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = (a.float() - b.float()).pow(2).mean().item()
    return 10.0 * math.log10(1.0 / max(mse, 1e-10))
