"""The PIE-Bench metrics (Ju et al., "PnP Inversion", ICLR 2024) with the semantics of the benchmark's evaluation code
(``evaluation/matrics_calculator.py`` and ``evaluation/evaluate.py`` of the PnPInversion repository).

Images are float tensors ``[3, H, W]`` in [0, 1] (``to_unit`` converts PIL images, 8-bit arrays and ``[H, W, 3]``
tensors); masks are float tensors ``[H, W]`` of 0 and 1, 1 marking the region to score.

The benchmark's masked scores do not crop to the region: both images are multiplied by the mask and the metric is
computed over the whole image, so the masked-out pixels count as a perfect match (PSNR, SSIM and LPIPS of a small
region are high for that reason). An empty region scores ``nan``, as the benchmark writes "nan" then. Its columns:

- structure distance: DINO ViT-B/8, the self-similarity of the last layer's attention keys, whole image;
- PSNR, LPIPS (SqueezeNet), MSE, SSIM of the unedited part: both images times ``1 - mask``;
- CLIP similarity (ViT-L/14) of the edited image with the target prompt, whole and edited part (image times mask).

Everything here runs locally: models are read from local folders or the Hugging Face cache, the LPIPS backbone from
torchvision's weights file; nothing is downloaded.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping, NamedTuple, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure
from torchmetrics.functional.regression import mean_squared_error

NAN = float("nan")
DINO_MODEL = "facebook/dino-vitb8"  # the Hugging Face copy of torch.hub's facebookresearch/dino "dino_vitb8"
CLIP_MODEL = "openai/clip-vit-large-patch14"
SQUEEZENET_FILE = "squeezenet1_1-b8a52dc0.pth"  # torchvision's SqueezeNet 1.1 ImageNet weights
SQUEEZENET_URL = "https://download.pytorch.org/models/" + SQUEEZENET_FILE
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DINO_SIZE, DINO_MAX_SIZE = 224, 480  # the reference's Resize(224, max_size=480)
DINO_LAYER_NORM_EPS = 1e-6  # DINO's ViT: LayerNorm(eps=1e-6)


class Metric(NamedTuple):
    label: str
    description: str
    scale: float  # the factor the paper's Table 1 prints the value with
    higher_is_better: bool


# The benchmark's columns (evaluate.py's metric names), in the paper's Table 1 order.
METRICS = {
    "structure_distance": Metric("Structure distance", "DINO ViT-B/8 last-layer key self-similarity, MSE between "
                                 "the two images (whole image)", 1e3, False),
    "psnr_unedit_part": Metric("PSNR", "PSNR of source and edit, both times 1 - mask (dB)", 1.0, True),
    "lpips_unedit_part": Metric("LPIPS", "LPIPS (SqueezeNet) of source and edit, both times 1 - mask", 1e3, False),
    "mse_unedit_part": Metric("MSE", "mean squared error of source and edit, both times 1 - mask", 1e4, False),
    "ssim_unedit_part": Metric("SSIM", "SSIM of source and edit, both times 1 - mask", 1e2, True),
    "clip_similarity_target_image": Metric("CLIP whole", "CLIP ViT-L/14 score of the edit and the target prompt",
                                           1.0, True),
    "clip_similarity_target_image_edit_part": Metric("CLIP edited", "CLIP ViT-L/14 score of the edit times mask and "
                                                     "the target prompt", 1.0, True),
}

ImageLike = Union[torch.Tensor, np.ndarray, "PIL.Image.Image"]  # noqa: F821


# --------------------------------------------------------------------------------------------------- conversions

def _pil_image_class():
    try:
        from PIL import Image
    except ImportError:
        return None
    return Image.Image


def to_unit(image: ImageLike) -> torch.Tensor:
    """An image as float32 ``[3, H, W]`` in [0, 1]: a PIL image (converted to RGB), an 8-bit ``H x W x 3`` array
    (divided by 255, as the reference does), or a tensor ``[3, H, W]`` / ``[H, W, 3]`` (a leading batch of one is
    dropped), float in [0, 1] or uint8."""
    pil = _pil_image_class()
    if pil is not None and isinstance(image, pil):
        image = np.asarray(image.convert("RGB"))
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[-1] != 3:
            raise ValueError(f"Expected an H x W x 3 image array, got shape {image.shape}.")
        image = torch.from_numpy(np.array(image)).permute(2, 0, 1)  # a copy: PIL's arrays are read-only
    if not isinstance(image, torch.Tensor):
        raise TypeError(f"Expected a PIL image, a numpy array or a tensor, got {type(image).__name__}.")
    t = image.detach()
    if t.ndim == 4 and t.shape[0] == 1:
        t = t[0]
    if t.ndim != 3 or 3 not in (t.shape[0], t.shape[-1]):
        raise ValueError(f"Expected an image tensor [3, H, W] or [H, W, 3], got shape {list(image.shape)}.")
    if t.shape[0] != 3:
        t = t.permute(2, 0, 1)
    if t.dtype == torch.uint8:
        return (t.float() / 255).contiguous()
    if not t.is_floating_point():
        raise TypeError(f"Expected a float or uint8 image, got {t.dtype}.")
    return t.float().contiguous()


def _to_mask(mask, height: int, width: int, device) -> torch.Tensor:
    """A mask as float32 ``[H, W]`` in [0, 1] (a PIL mask image is read as 8-bit grey, 255 = 1)."""
    pil = _pil_image_class()
    if pil is not None and isinstance(mask, pil):
        mask = np.asarray(mask.convert("L"), dtype=np.float32) / 255
    if isinstance(mask, np.ndarray):
        mask = torch.from_numpy(np.array(mask, dtype=np.float32))
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"Expected the mask as a tensor, a numpy array or a PIL image, got {type(mask).__name__}.")
    m = mask.detach().float()
    while m.ndim > 2 and m.shape[0] == 1:
        m = m[0]
    if m.ndim == 3 and m.shape[-1] == 1:
        m = m[..., 0]
    if m.ndim != 2 or tuple(m.shape) != (height, width):
        raise ValueError(f"The mask has shape {list(mask.shape)}; the images are {height} x {width} (H x W): the mask "
                         f"must be [H, W] at the images' size.")
    if m.numel() and (float(m.min()) < 0 or float(m.max()) > 1):
        raise ValueError(f"Mask values must lie in [0, 1] (1 = the region to score), got "
                         f"[{float(m.min())}, {float(m.max())}].")
    return m.to(device)


def _pair(pred, gt, mask):
    """(pred, gt, mask or None) as float32 tensors on pred's device; the images must have the same shape."""
    p, g = to_unit(pred), to_unit(gt)
    if p.shape != g.shape:
        raise ValueError(f"The two images differ in shape: {list(p.shape)} and {list(g.shape)} ([3, H, W]); the "
                         f"metrics compare them pixel by pixel.")
    g = g.to(p.device)
    m = None if mask is None else _to_mask(mask, p.shape[-2], p.shape[-1], p.device)
    return p, g, m


def _empty(mask: Optional[torch.Tensor]) -> bool:
    return mask is not None and float(mask.sum()) == 0


def _masked(p: torch.Tensor, g: torch.Tensor, mask: Optional[torch.Tensor]):
    """Both images times the mask (the benchmark's recipe), or as they are without one."""
    if mask is None:
        return p, g
    return p * mask, g * mask


# -------------------------------------------------------------------------------------------- PSNR, MSE, SSIM

def psnr(pred: ImageLike, gt: ImageLike, mask=None) -> float:
    """PSNR in dB with data range 1 (torchmetrics PeakSignalNoiseRatio(data_range=1.0)); with a mask, of both
    images times the mask over the whole image. ``inf`` for equal images, ``nan`` for an empty mask."""
    p, g, m = _pair(pred, gt, mask)
    if _empty(m):
        return NAN
    p, g = _masked(p, g, m)
    return float(peak_signal_noise_ratio(p[None], g[None], data_range=1.0))


def mse(pred: ImageLike, gt: ImageLike, mask=None) -> float:
    """Mean squared error over all pixels and channels (torchmetrics MeanSquaredError); with a mask, of both images
    times the mask over the whole image. ``nan`` for an empty mask."""
    p, g, m = _pair(pred, gt, mask)
    if _empty(m):
        return NAN
    p, g = _masked(p, g, m)
    return float(mean_squared_error(p.contiguous(), g.contiguous()))


def ssim(pred: ImageLike, gt: ImageLike, mask=None) -> float:
    """SSIM with data range 1 and torchmetrics' defaults (Gaussian window 11, sigma 1.5; StructuralSimilarityIndex-
    Measure(data_range=1.0)); with a mask, of both images times the mask. ``nan`` for an empty mask."""
    p, g, m = _pair(pred, gt, mask)
    if _empty(m):
        return NAN
    p, g = _masked(p, g, m)
    return float(structural_similarity_index_measure(p[None], g[None], data_range=1.0))


# -------------------------------------------------------------------------------------------------------- LPIPS

def _load_squeezenet(backbone: torch.nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """torchvision's SqueezeNet 1.1 state dict (``features.<i>.*``; the classifier is not used) into torchmetrics'
    LPIPS backbone, which holds the same modules split into slices (``slices.<k>.<i>.*``)."""
    where = {name: k for k, part in enumerate(backbone.slices) for name, _ in part.named_children()}
    renamed = {}
    for key, value in state.items():
        head, _, rest = key.partition(".")
        if head != "features":
            continue
        index, _, leaf = rest.partition(".")
        if index not in where:
            raise KeyError(f"unexpected SqueezeNet layer {key!r}")
        renamed[f"slices.{where[index]}.{index}.{leaf}"] = value
    backbone.load_state_dict(renamed, strict=True)


class Lpips:
    """LPIPS with the SqueezeNet backbone (torchmetrics LearnedPerceptualImagePatchSimilarity(net_type='squeeze')).

    ``backbone_state`` is torchvision's SqueezeNet 1.1 ImageNet state dict (see ``load_lpips``); ``None`` leaves the
    backbone at random initialisation, for tests only. The LPIPS linear layers come with torchmetrics. The network is
    built with an untrained backbone and the weights are loaded here, so torchvision never downloads anything."""

    def __init__(self, backbone_state: Optional[Mapping[str, torch.Tensor]], device=None):
        # torchmetrics' LPIPS module, as the metric class builds it (net_type='squeeze'), except pnet_rand=True:
        # the backbone starts without weights instead of torchvision fetching them.
        from torchmetrics.functional.image.lpips import _NoTrainLpips

        net = _NoTrainLpips(net="squeeze", pretrained=True, pnet_rand=True)
        if backbone_state is not None:
            _load_squeezenet(net.net, backbone_state)
        self.net = net.eval()
        self.random_backbone = backbone_state is None
        if device is not None:
            self.net.to(device)

    def to(self, device) -> "Lpips":
        self.net.to(device)
        return self

    @torch.no_grad()
    def __call__(self, pred: ImageLike, gt: ImageLike, mask=None) -> float:
        """LPIPS of the two images (with a mask: both times the mask), inputs scaled as ``x * 2 - 1`` after masking,
        as the reference; ``nan`` for an empty mask."""
        p, g, m = _pair(pred, gt, mask)
        if _empty(m):
            return NAN
        p, g = _masked(p, g, m)
        device = next(self.net.parameters()).device
        score = self.net((p[None] * 2 - 1).to(device), (g[None] * 2 - 1).to(device))
        return float(score.mean())


def load_lpips(backbone: Optional[Union[str, Path]] = None, device=None) -> tuple[Optional[Lpips], str]:
    """(Lpips, where its backbone came from), or (None, why not). ``backbone`` is the SqueezeNet 1.1 weights file
    ``squeezenet1_1-b8a52dc0.pth`` (or a folder holding it); by default torch hub's ``checkpoints`` folder, where
    torchvision keeps it. The file is only read, never downloaded."""
    if backbone is None:
        path = Path(torch.hub.get_dir()) / "checkpoints" / SQUEEZENET_FILE
    else:
        path = Path(backbone).expanduser()
        if path.is_dir():
            path = path / SQUEEZENET_FILE
    if not path.is_file():
        return None, (f"LPIPS skipped: the SqueezeNet 1.1 ImageNet weights are not at {path}; put torchvision's "
                      f"{SQUEEZENET_FILE} there ({SQUEEZENET_URL}) -- it is never downloaded here")
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 -- any unreadable file is reported, not raised
        return None, f"LPIPS skipped: could not read {path}: {e}"
    try:
        model = Lpips(state, device=device)
    except ImportError as e:
        return None, f"LPIPS skipped: it needs torchvision ({e})"
    except (KeyError, RuntimeError, AttributeError) as e:
        return None, f"LPIPS skipped: {path} is not torchvision's SqueezeNet 1.1 state dict: {e}"
    return model, f"LPIPS: SqueezeNet 1.1 backbone from {path}"


# ------------------------------------------------------------------------------------------ structure distance

def _local_source(name_or_path: Union[str, Path], what: str) -> str:
    """A local model folder, or a hub id whose files are already in the Hugging Face cache; nothing is downloaded
    (the models are then loaded with ``local_files_only=True``)."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return str(path)
    if path.exists():
        raise ValueError(f"{what}: {path} is a file; give the model's folder (with config.json) or a hub id.")
    cached = None
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(str(name_or_path), "config.json")
    except Exception:  # noqa: BLE001 -- not a valid repo id, or no huggingface_hub: not cached
        pass
    if not isinstance(cached, str):
        raise FileNotFoundError(
            f"{what} model {str(name_or_path)!r} is neither a local folder nor in the Hugging Face cache, and it is "
            f"not downloaded here: give the model's folder, or fetch it once (e.g. `huggingface-cli download "
            f"{name_or_path}`).")
    return str(name_or_path)


def _key_projection(model: torch.nn.Module) -> torch.nn.Module:
    """The key projection of a transformers ViTModel's last layer (``layers[-1].attention.k_proj`` in transformers 5,
    ``encoder.layer[-1].attention.attention.key`` before)."""
    layers = getattr(model, "layers", None)
    if layers is None:
        layers = getattr(getattr(model, "encoder", None), "layer", None)
    if not layers:
        raise TypeError(f"{type(model).__name__} has no transformer layers (not a transformers ViTModel?)")
    layer = layers[-1]
    attention = layer.attention
    for owner, name in ((attention, "k_proj"), (getattr(attention, "attention", None), "key")):
        module = getattr(owner, name, None) if owner is not None else None
        if isinstance(module, torch.nn.Module):
            return module
    raise TypeError(f"{type(layer).__name__} has no attention key projection (not a transformers ViT layer?)")


def _dino_position_encoding(model):
    """DINO's ``interpolate_pos_encoding`` (facebookresearch/dino vision_transformer.py) for a transformers ViT: the
    position grid is resized by bicubic interpolation with scale factors ``(patches + 0.1) / sqrt(N)``, which gives
    slightly different values than transformers' own interpolation to an exact size. The two agree when no
    interpolation is needed (a square input at the model's size: PIE-Bench's 512 x 512 images at 224 x 224)."""
    embeddings = model.embeddings
    patch = model.config.patch_size
    patch = patch[0] if isinstance(patch, (tuple, list)) else patch

    def interpolate(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
        position = embeddings.position_embeddings
        patches, count = tokens.shape[1] - 1, position.shape[1] - 1
        if patches == count and height == width:
            return position
        side = math.sqrt(count)
        rows, cols = height // patch + 0.1, width // patch + 0.1  # DINO's +0.1 against floating-point error
        grid = position[:, 1:].reshape(1, int(side), int(side), -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, scale_factor=(rows / side, cols / side), mode="bicubic")
        grid = grid.permute(0, 2, 3, 1).reshape(1, -1, position.shape[-1])
        return torch.cat((position[:, :1], grid), dim=1)

    return interpolate


class StructureDistance:
    """The benchmark's structure distance (``calculate_structure_distance`` -> ``LossG.calculate_global_ssim_loss``,
    from Splice): for each image, the keys of the last ViT layer's self-attention (the key projection's output, all
    heads side by side, CLS token included), their cosine self-similarity matrix (norm products clamped at 1e-8);
    the distance is the mean squared difference of the two matrices.

    ``model`` is a transformers ``ViTModel`` with DINO ViT-B/8's layout (``facebook/dino-vitb8``; the reference loads
    the same weights through torch.hub). ``model.to(device)`` moves the computation."""

    def __init__(self, model):
        self.model = model.eval()
        self.key = _key_projection(model)

    @classmethod
    def from_pretrained(cls, path_or_id: Union[str, Path] = DINO_MODEL) -> "StructureDistance":
        """From a local folder or the Hugging Face cache (``local_files_only``), in float32, without the pooler, and
        with DINO's LayerNorm epsilon (1e-6; ViTConfig's default is 1e-12)."""
        from transformers import ViTModel

        source = _local_source(path_or_id, "DINO")
        model = ViTModel.from_pretrained(source, local_files_only=True, add_pooling_layer=False,
                                         layer_norm_eps=DINO_LAYER_NORM_EPS)
        return cls(model.float())

    def _preprocess(self, image_255: torch.Tensor) -> torch.Tensor:
        """The reference's ``global_transform``: Resize(224, max_size=480), then Normalize(ImageNet mean, std).

        The reference applies it to float tensors of the 0-255 image: it never divides by 255, so the ImageNet
        normalisation sees values up to 255 (about -2 to 1130 after it). That is reproduced here on purpose; the
        published numbers were computed so.

        antialias=False: the benchmark's environment pins torchvision 0.13.1, whose tensor Resize does not antialias
        (antialias=None meant False for tensors until torchvision 0.17 made True the default); bilinear."""
        import torchvision.transforms.functional as TF

        x = TF.resize(image_255, DINO_SIZE, max_size=DINO_MAX_SIZE, antialias=False)
        return TF.normalize(x, IMAGENET_MEAN, IMAGENET_STD)

    def self_similarity(self, image_255: torch.Tensor) -> torch.Tensor:
        """The ``[T, T]`` cosine self-similarity of the last layer's keys of one ``[3, H, W]`` image in [0, 255]."""
        parameter = next(self.model.parameters())
        x = self._preprocess(image_255)[None].to(device=parameter.device, dtype=parameter.dtype)
        keys = []
        hook = self.key.register_forward_hook(lambda module, inputs, output: keys.append(output))
        embeddings = self.model.embeddings
        embeddings.interpolate_pos_encoding = _dino_position_encoding(self.model)
        try:
            self.model(pixel_values=x, interpolate_pos_encoding=True)
        finally:
            hook.remove()
            del embeddings.interpolate_pos_encoding  # back to the class's method
        k = keys[-1][0].float()  # [tokens, heads * head_dim]: the heads side by side, as the reference concatenates
        norm = k.norm(dim=1, keepdim=True)
        return (k @ k.T) / torch.clamp(norm @ norm.T, min=1e-8)

    @torch.no_grad()
    def __call__(self, pred: ImageLike, gt: ImageLike, mask=None) -> float:
        """The structure distance of the two images (with a mask: both times the mask first); ``nan`` for an empty
        mask."""
        p, g, m = _pair(pred, gt, mask)
        if _empty(m):
            return NAN
        p, g = _masked(p * 255, g * 255, m)  # the reference's images are 0-255 floats (see _preprocess)
        return float(F.mse_loss(self.self_similarity(p), self.self_similarity(g)))


# ------------------------------------------------------------------------------------------------------- CLIP

def _clip_image_processor(source: str):
    """CLIP's image processor on the PIL backend: the processing the reference's transformers did (PIL bicubic
    resize of the shortest edge, centre crop, rescale, normalise). transformers 5 defaults to a torchvision
    backend whose resize differs slightly; transformers 4's CLIPImageProcessor is the PIL one."""
    try:
        from transformers import CLIPImageProcessorPil as processor_class
    except ImportError:
        from transformers import CLIPImageProcessor as processor_class
    return processor_class.from_pretrained(source, local_files_only=True)


def _features(output) -> torch.Tensor:
    """get_image_features / get_text_features: a tensor before transformers 5, a model output (the projected
    embedding as ``pooler_output``) since."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


class ClipSimilarity:
    """The CLIP score of an image and a text, ``max(100 * cos(image embedding, text embedding), 0)``: torchmetrics'
    CLIPScore definition, with the processing its CLIPScore applies (8-bit image through the CLIP processor, text
    padded, captions cut at the model's context length).

    The score is computed here rather than through torchmetrics' CLIPScore: that class loads a model by hub name
    (a folder only through a loader callable) and, with transformers 5, fails on the model outputs that
    get_image_features returns since (torchmetrics 1.9 normalises them as tensors).
    The model comes from a local folder or the Hugging Face cache only (``local_files_only``)."""

    def __init__(self, model_name_or_path: Union[str, Path] = CLIP_MODEL, device=None):
        from transformers import AutoTokenizer, CLIPModel

        source = _local_source(model_name_or_path, "CLIP")
        self.model = CLIPModel.from_pretrained(source, local_files_only=True).float().eval()
        self.image_processor = _clip_image_processor(source)
        self.tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
        if device is not None:
            self.model.to(device)

    def to(self, device) -> "ClipSimilarity":
        self.model.to(device)
        return self

    @torch.no_grad()
    def __call__(self, image: ImageLike, text: str, mask=None) -> float:
        """The score of the image (as 8-bit, ``round(x * 255)``; with a mask ``np.uint8(image * mask)`` as the
        reference) and the text; ``nan`` for an empty mask."""
        unit = to_unit(image)
        m = None if mask is None else _to_mask(mask, unit.shape[-2], unit.shape[-1], unit.device)
        if _empty(m):
            return NAN
        pixels = (unit * 255).round().clamp(0, 255).to(torch.uint8)
        if m is not None:  # np.uint8 of the float64 product truncates (a 0/1 mask keeps the pixels exact)
            pixels = (pixels.double() * m.double()).floor().to(torch.uint8)
        device = next(self.model.parameters()).device
        pixel_values = self.image_processor(images=[pixels.cpu()], return_tensors="pt")["pixel_values"]
        image_features = _features(self.model.get_image_features(pixel_values=pixel_values.to(device)))
        tokens = self.tokenizer([text], padding=True, return_tensors="pt")
        limit = getattr(getattr(self.model.config, "text_config", None), "max_position_embeddings", None)
        input_ids, attention_mask = tokens["input_ids"], tokens["attention_mask"]
        if limit is not None and input_ids.shape[-1] > limit:  # as torchmetrics: cut to the context length
            input_ids, attention_mask = input_ids[..., :limit], attention_mask[..., :limit]
        text_features = _features(self.model.get_text_features(input_ids=input_ids.to(device),
                                                               attention_mask=attention_mask.to(device)))
        image_features = image_features / image_features.norm(p=2, dim=-1, keepdim=True)
        text_features = text_features / text_features.norm(p=2, dim=-1, keepdim=True)
        score = 100 * (image_features * text_features).sum(dim=-1)
        return float(torch.clamp(score, min=0).mean())


# ----------------------------------------------------------------------------------------------- region scores

def region_scores(source: ImageLike, edited: ImageLike, mask=None, lpips: Optional[Lpips] = None) -> dict:
    """PSNR, SSIM and MSE (and LPIPS when given) of ``edited`` against ``source``, outside the mask (both images
    times ``1 - mask``: the benchmark's "unedit_part") and inside it (times ``mask``). Without a mask, "outside" is
    the whole image and "inside" is ``nan``. Keys ``psnr_outside, ssim_outside, mse_outside, psnr_inside,
    ssim_inside, mse_inside`` (+ ``lpips_outside, lpips_inside``)."""
    out, src, m = _pair(edited, source, mask)
    regions = {"outside": None if m is None else 1 - m, "inside": m}
    scorers = {"psnr": psnr, "ssim": ssim, "mse": mse}
    scores = {}
    for region, region_mask in regions.items():
        for name, scorer in scorers.items():
            scores[f"{name}_{region}"] = NAN if m is None and region == "inside" else scorer(out, src, region_mask)
    if lpips is not None:
        for region, region_mask in regions.items():
            scores[f"lpips_{region}"] = NAN if m is None and region == "inside" else lpips(out, src, region_mask)
    return scores
