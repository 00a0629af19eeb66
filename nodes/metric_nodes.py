"""The Edit Metrics node: translation between ComfyUI types (IMAGE, MASK) and ``evaluation.metrics``."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from comfy_api.latest import io, ui as comfy_ui

CATEGORY = "inversion/evaluation"
REGIONS = ("outside", "inside")
SCORES = ("psnr", "ssim", "mse")
# the FLOAT outputs, in order: PSNR, SSIM, MSE outside then inside the mask, then LPIPS outside and inside
OUTPUT_KEYS = tuple(f"{s}_{r}" for r in REGIONS for s in SCORES) + ("lpips_outside", "lpips_inside")

_lpips_model = None  # LPIPS once loaded (its weights are read once per process)


def _metrics():
    """``evaluation.metrics``, imported when the node runs: the pack loads without torchmetrics, this node says what
    is missing."""
    try:
        from ..evaluation import metrics
    except ImportError as e:
        raise RuntimeError(f"Edit Metrics needs torchmetrics in ComfyUI's Python environment "
                           f"(pip install torchmetrics): {e}") from e
    return metrics


def _lpips(metrics):
    """(LPIPS or None, why not): from local weights only, never downloaded."""
    global _lpips_model
    if _lpips_model is None:
        model, message = metrics.load_lpips()
        if model is None:
            return None, message
        _lpips_model = model
    return _lpips_model, ""


def _size(image: torch.Tensor) -> str:
    return f"{image.shape[-2]}x{image.shape[-3]}"  # width x height, as ComfyUI's nodes write sizes


def images_chw(image: torch.Tensor, name: str) -> torch.Tensor:
    """A ComfyUI IMAGE ``[B, H, W, C]`` (or one ``[H, W, C]``) in [0, 1] as float ``[B, 3, H, W]``: an alpha channel
    is dropped, a grey channel repeated."""
    if image.ndim == 3:
        image = image[None]
    if image.ndim != 4 or image.shape[0] == 0 or image.shape[-1] not in (1, 3, 4):
        raise ValueError(f"The {name} input is not an IMAGE: expected [batch, height, width, 3 or 4 channels], got "
                         f"shape {list(image.shape)}.")
    image = image[..., :3].float()
    if image.shape[-1] == 1:
        image = image.expand(-1, -1, -1, 3)
    return image.clamp(0.0, 1.0).permute(0, 3, 1, 2).contiguous()


def masks_hw(mask: torch.Tensor, count: int, height: int, width: int) -> torch.Tensor:
    """A ComfyUI MASK ``[B, H, W]`` or ``[H, W]`` as 0/1 float ``[count, height, width]`` (above 0.5: 1): resized to
    the images' size by nearest neighbour, a batch of one given to every pair."""
    if mask.ndim == 2:
        mask = mask[None]
    if mask.ndim == 4 and mask.shape[1] == 1:
        mask = mask[:, 0]
    if mask.ndim != 3 or mask.shape[0] == 0:
        raise ValueError(f"The mask input is not a MASK: expected [batch, height, width], got shape "
                         f"{list(mask.shape)}.")
    if mask.shape[0] not in (1, count):
        raise ValueError(f"The mask batch has {mask.shape[0]} masks for {count} image pair(s): give one mask for all "
                         f"or one per pair.")
    mask = mask.float()
    if tuple(mask.shape[-2:]) != (height, width):
        mask = F.interpolate(mask[:, None], size=(height, width), mode="nearest-exact")[:, 0]
    mask = (mask > 0.5).float()
    return mask.expand(count, -1, -1)


def pairs(source: torch.Tensor, edited: torch.Tensor, mask: torch.Tensor | None):
    """The (source, edited, mask or None) triples to score, ``[3, H, W]`` images and ``[H, W]`` masks: a source
    batch of one against every edited image, or equal batches."""
    src, out = images_chw(source, "source"), images_chw(edited, "edited")
    if src.shape[-2:] != out.shape[-2:]:
        raise ValueError(f"The source image is {_size(source)} and the edited image {_size(edited)} (width x "
                         f"height): the metrics compare them pixel by pixel, so they must have the same size. Scale "
                         f"one to the other's size (e.g. ImageScale) before this node.")
    if src.shape[0] not in (1, out.shape[0]):
        raise ValueError(f"The source batch has {src.shape[0]} images and the edited batch {out.shape[0]}: give one "
                         f"source image for all edited images, or one per edited image.")
    count = out.shape[0]
    src = src.expand(count, -1, -1, -1)
    masks = None if mask is None else masks_hw(mask, count, *out.shape[-2:])
    return [(src[i], out[i], None if masks is None else masks[i]) for i in range(count)]


def batch_mean(values: list[float]) -> float:
    """The mean of the values that are not nan; nan when all are."""
    kept = [v for v in values if not math.isnan(v)]
    return sum(kept) / len(kept) if kept else float("nan")


def _number(key: str, value: float) -> str:
    name = key.split("_")[0]
    if math.isnan(value):
        return f"{name.upper()} n/a"
    if name == "psnr":
        return "PSNR inf dB (identical)" if math.isinf(value) else f"PSNR {value:.2f} dB"
    if name == "mse":
        return f"MSE {value:.3g}"
    return f"{name.upper()} {value:.4f}"


def _region_text(scores: dict, region: str, empty: bool) -> str:
    if empty:
        return "empty region"
    return ", ".join(_number(key, scores[key]) for key in scores if key.endswith("_" + region))


def preview_text(per_pair: list[dict], means: dict, regions_empty: list[tuple[bool, bool]], masked: bool,
                 lpips_note: str) -> str:
    """The node's text: the scores (the batch mean first when there are several pairs, then each pair)."""
    labels = (("outside the mask", "inside the mask") if masked else ("whole image (no mask)", None))

    def lines(scores: dict, empty: tuple[bool, bool], indent: str = "") -> list[str]:
        out = [f"{indent}{labels[0]}: {_region_text(scores, 'outside', empty[0])}"]
        if labels[1]:
            out.append(f"{indent}{labels[1]}: {_region_text(scores, 'inside', empty[1])}")
        return out

    text = []
    if len(per_pair) == 1:
        text += lines(per_pair[0], regions_empty[0])
    else:
        all_empty = tuple(all(e[k] for e in regions_empty) for k in (0, 1))
        text.append(f"mean of {len(per_pair)} pairs (empty regions left out):")
        text += lines(means, all_empty, "  ")
        for n, (scores, empty) in enumerate(zip(per_pair, regions_empty), 1):
            text.append(f"image {n}:")
            text += lines(scores, empty, "  ")
    if lpips_note:
        text.append(lpips_note)
    return "\n".join(text)


class EditMetrics(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        region = "the part outside the mask (the unedited part; the whole image without a mask)"
        inside = "the mask (the edited region; nan without a mask or for an empty mask)"
        return io.Schema(
            node_id="DirectInversion_EditMetrics",
            display_name="Edit Metrics",
            category=CATEGORY,
            description=(
                "Scores an edit against its source image as PIE-Bench (Ju et al., PnP Inversion) does. The mask is "
                "the edited region; the unedited part is everything outside it. For the outside scores both images "
                "are multiplied by the inverted mask and PSNR, SSIM and MSE are taken over the whole image "
                "(PIE-Bench's unedit_part metrics: how well the edit preserved what should not change); the inside "
                "scores do the same with the mask. The masked-out pixels count as a perfect match, so a small "
                "region scores high. Without a mask the outside scores cover the whole image and the inside ones are "
                "nan. LPIPS (SqueezeNet) is computed only when asked for and its weights are on this machine (never "
                "downloaded). Several edited images (a batch) are each scored against the source; the FLOAT outputs "
                "are the batch means, the text on the node lists every image. An empty region gives nan. Needs "
                "torchmetrics."
            ),
            inputs=[
                io.Image.Input("source", tooltip="The original image (a batch of one is compared with every edited "
                                                 "image)."),
                io.Image.Input("edited", tooltip="The edited image(s), the same size as the source."),
                io.Mask.Input("mask", optional=True,
                              tooltip="The edited region (1 = edited; values above 0.5 count as inside). Resized to "
                                      "the images by nearest neighbour; one mask for all or one per edited image."),
                io.Boolean.Input("lpips", default=False,
                                 tooltip="Also compute LPIPS (SqueezeNet) when torchvision's squeezenet1_1 weights "
                                         "file is in torch hub's checkpoints folder (never downloaded); the text "
                                         "says why when it is not."),
            ],
            outputs=[
                io.Float.Output("psnr_outside", display_name="PSNR outside",
                                tooltip=f"PSNR (dB, higher is closer) of {region}; batch mean."),
                io.Float.Output("ssim_outside", display_name="SSIM outside",
                                tooltip=f"SSIM (1 = identical) of {region}; batch mean."),
                io.Float.Output("mse_outside", display_name="MSE outside",
                                tooltip=f"Mean squared error (pixels in [0, 1], lower is closer) of {region}; "
                                        f"batch mean."),
                io.Float.Output("psnr_inside", display_name="PSNR inside", tooltip=f"PSNR (dB) of {inside}."),
                io.Float.Output("ssim_inside", display_name="SSIM inside", tooltip=f"SSIM of {inside}."),
                io.Float.Output("mse_inside", display_name="MSE inside", tooltip=f"Mean squared error of {inside}."),
                io.Float.Output("lpips_outside", display_name="LPIPS outside",
                                tooltip=f"LPIPS (lower is closer) of {region}; nan unless lpips is on and its weights "
                                        f"are available."),
                io.Float.Output("lpips_inside", display_name="LPIPS inside",
                                tooltip=f"LPIPS of {inside}; nan unless lpips is on and its weights are available."),
            ],
            is_output_node=True,  # its text is a result of its own: the node runs without anything connected after it
        )

    @classmethod
    def execute(cls, source, edited, mask=None, lpips=False) -> io.NodeOutput:
        metrics = _metrics()
        triples = pairs(source, edited, mask)
        model, note = (None, "") if not lpips else _lpips(metrics)
        if lpips and model is None:  # said on the node, not raised: the other scores stand
            note = note if note.lower().startswith("lpips") else f"LPIPS not computed: {note}"
        per_pair, empty = [], []
        for src, out, region in triples:
            scores = metrics.region_scores(src, out, mask=region, lpips=model)
            per_pair.append({key: float(scores[key]) for key in OUTPUT_KEYS if key in scores})
            empty.append((False, True) if region is None else (bool((region < 0.5).sum() == 0),
                                                              bool((region > 0.5).sum() == 0)))
        means = {key: batch_mean([p[key] for p in per_pair]) for key in per_pair[0]}
        text = preview_text(per_pair, means, empty, mask is not None, note)
        values = [means.get(key, float("nan")) for key in OUTPUT_KEYS]
        return io.NodeOutput(*values, ui=comfy_ui.PreviewText(text).as_dict())


NODES = [EditMetrics]
