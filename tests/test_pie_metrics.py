"""The PIE-Bench metrics (evaluation/metrics.py) against their definitions and the benchmark's recipe
(PnPInversion's evaluation/matrics_calculator.py): PSNR/MSE from their formulas, the reference's torchmetrics
objects on its 8-bit images and 3-channel masks, masked scores blind to the masked-out pixels, nan for an empty
region, the structure distance and the CLIP score on tiny random-weight models saved to a folder and loaded back,
LPIPS without a download. CPU only; every socket connection fails while these tests run."""
from __future__ import annotations

import json
import math
import socket

import numpy as np
import pytest
import torch
import torch.nn.functional as F

SIZE = 32  # test images: 3 x 32 x 32 (SSIM's 11 x 11 window fits)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@pytest.fixture(scope="module")
def metrics(pack):
    from comfyui_direct_inversion.evaluation import metrics

    return metrics


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any attempt to open a connection fails the test that makes it."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args[1:] if len(args) > 1 else kwargs}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def image(seed: int, size=(SIZE, SIZE)) -> torch.Tensor:
    """A random 8-bit image as [3, H, W] floats k / 255."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (3, *size), generator=g).float() / 255


def box_mask(size=(SIZE, SIZE)) -> torch.Tensor:
    m = torch.zeros(size)
    m[6:20, 9:27] = 1
    return m


def outside_changed(img: torch.Tensor, mask: torch.Tensor, seed: int) -> torch.Tensor:
    """``img`` with every pixel where the mask is 0 replaced by other random values."""
    return torch.where(mask.bool(), img, image(seed, tuple(img.shape[-2:])))


# ------------------------------------------------------------------------------------------------- conversions

def test_to_unit_accepts_pil_arrays_and_both_tensor_layouts(metrics):
    from PIL import Image

    a = image(1, (24, 40))
    pixels = (a * 255).round().to(torch.uint8)
    hwc = pixels.permute(1, 2, 0).contiguous()
    expected = pixels.double() / 255
    for given in (Image.fromarray(hwc.numpy()), hwc.numpy(), hwc, pixels, a, a.permute(1, 2, 0), a[None]):
        got = metrics.to_unit(given)
        assert got.dtype == torch.float32 and got.shape == (3, 24, 40)
        assert torch.allclose(got.double(), expected, atol=1e-7)
    with pytest.raises(ValueError):
        metrics.to_unit(torch.zeros(4, 8, 8))


def test_shape_mismatch_is_a_value_error(metrics):
    a, b = image(1), image(2, (SIZE, SIZE + 8))
    for score in (metrics.psnr, metrics.mse, metrics.ssim):
        with pytest.raises(ValueError, match="differ in shape"):
            score(a, b)
        with pytest.raises(ValueError, match="mask"):
            score(a, a, torch.ones(SIZE, SIZE + 1))


# ------------------------------------------------------------------------------------------------ PSNR, MSE, SSIM

def test_psnr_and_mse_follow_their_formulas(metrics):
    a, b, m = image(1), image(2), box_mask()
    err = ((a.double() - b.double()) ** 2).mean().item()
    assert metrics.mse(a, b) == pytest.approx(err, rel=1e-5)
    assert metrics.psnr(a, b) == pytest.approx(10 * math.log10(1 / err), rel=1e-5)
    # with a mask, both images times the mask, over the whole image (the benchmark's definition)
    err_masked = ((a.double() * m - b.double() * m) ** 2).mean().item()
    assert err_masked < err  # the masked-out pixels count as equal
    assert metrics.mse(a, b, m) == pytest.approx(err_masked, rel=1e-5)
    assert metrics.psnr(a, b, m) == pytest.approx(10 * math.log10(1 / err_masked), rel=1e-5)
    assert metrics.psnr(a, a) == math.inf and metrics.mse(a, a) == 0


def test_ssim_is_one_for_equal_images_only(metrics):
    a, b = image(1), image(2)
    assert metrics.ssim(a, a) == pytest.approx(1.0, abs=1e-6)
    assert metrics.ssim(a, a, box_mask()) == pytest.approx(1.0, abs=1e-6)
    near = (a + 0.02 * (image(3) - 0.5)).clamp(0, 1)
    assert metrics.ssim(a, b) < metrics.ssim(a, near) < 1


def test_the_reference_recipe_on_8bit_images(metrics):
    """PnPInversion's MetricsCalculator: uint8 images / 255, a 3-channel float mask multiplied into both, fresh
    torchmetrics objects (PeakSignalNoiseRatio / StructuralSimilarityIndexMeasure on [1, 3, H, W], MeanSquaredError
    on [3, H, W])."""
    from PIL import Image
    from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure
    from torchmetrics.regression import MeanSquaredError

    src = (image(1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    tgt = (image(2).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    mask = box_mask().numpy().astype(np.float64)
    unedited = (1 - mask)[:, :, None].repeat(3, axis=2)  # evaluate.py: mask[:, :, None].repeat(3), then 1 - mask
    x = torch.tensor(src.astype(np.float32) / 255 * unedited.astype(np.float32)).permute(2, 0, 1)
    y = torch.tensor(tgt.astype(np.float32) / 255 * unedited.astype(np.float32)).permute(2, 0, 1)
    expected = {
        "psnr": PeakSignalNoiseRatio(data_range=1.0)(x[None], y[None]).item(),
        "ssim": StructuralSimilarityIndexMeasure(data_range=1.0)(x[None], y[None]).item(),
        "mse": MeanSquaredError()(x.contiguous(), y.contiguous()).item(),
    }
    outside = torch.from_numpy(1 - mask).float()
    for name, value in expected.items():
        got = getattr(metrics, name)(Image.fromarray(src), Image.fromarray(tgt), outside)
        assert got == pytest.approx(value, rel=1e-6), name


# ----------------------------------------------------------------------------------------------- models

def byte_symbols() -> list[str]:
    """CLIP's byte-to-unicode table, in its order."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), 256))
    symbols = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in symbols:
            symbols[b] = chr(256 + extra)
            extra += 1
    return list(symbols.values())


@pytest.fixture(scope="module")
def tiny_dino(tmp_path_factory):
    """A random-weight transformers ViTModel with DINO ViT-B/8's layout at toy size, saved to a folder."""
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(0)
    config = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                       patch_size=8, image_size=224, qkv_bias=True, layer_norm_eps=1e-6)
    folder = tmp_path_factory.mktemp("dino")
    model = ViTModel(config, add_pooling_layer=False)
    with torch.no_grad():  # position encodings as large as the patch embeddings of 0-255 inputs, so they matter
        model.embeddings.position_embeddings.normal_(0.0, 100.0)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A random-weight CLIPModel (32 x 32 images) with its processor and a tokenizer of a few merges, saved to a
    folder. The final layer norms carry a shared offset and the two projections are equal, so image and text
    embeddings point roughly the same way: the score stays above its floor of 0 and reacts to the input."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    folder = tmp_path_factory.mktemp("clip")
    merges = ["c a", "ca t</w>", "d o", "do g</w>", "r e", "re d</w>"]
    symbols = byte_symbols()
    tokens = symbols + [s + "</w>" for s in symbols] + [m.replace(" ", "") for m in merges] + \
        ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
    bos, eos = len(tokens) - 2, len(tokens) - 1
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokens), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=77, bos_token_id=bos, eos_token_id=eos,
                         pad_token_id=eos),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=SIZE, patch_size=8),
        projection_dim=16)
    torch.manual_seed(0)
    model = CLIPModel(config)
    with torch.no_grad():
        offset = torch.randn(32)
        for norm in (model.vision_model.post_layernorm, model.text_model.final_layer_norm):
            norm.weight.mul_(0.5)
            norm.bias.copy_(offset)
        model.text_projection.weight.copy_(model.visual_projection.weight)
    model.save_pretrained(folder)
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": SIZE},
                                                                 crop_size={"height": SIZE, "width": SIZE}),
                              tokenizer=tokenizer)
    processor.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def structure(metrics, tiny_dino):
    return metrics.StructureDistance.from_pretrained(tiny_dino)


@pytest.fixture(scope="module")
def clip(metrics, tiny_clip):
    return metrics.ClipSimilarity(tiny_clip)


@pytest.fixture(scope="module")
def random_lpips(metrics):
    torch.manual_seed(0)
    return metrics.Lpips(backbone_state=None)


# ------------------------------------------------------------------------------------ masks: exactly the region

SCORERS = ("psnr", "mse", "ssim", "lpips", "structure", "clip")


def scorer(name, metrics, request):
    if name in ("psnr", "mse", "ssim"):
        return getattr(metrics, name)
    if name == "lpips":
        return request.getfixturevalue("random_lpips")
    if name == "structure":
        return request.getfixturevalue("structure")
    clip = request.getfixturevalue("clip")
    return lambda pred, gt, mask=None: clip(gt, "a red cat", mask)  # CLIP scores one image: the second here


@pytest.mark.parametrize("name", SCORERS)
def test_masked_scores_ignore_the_masked_out_pixels(name, metrics, request):
    score = scorer(name, metrics, request)
    a, b, m = image(1), image(2), box_mask()
    b_elsewhere = outside_changed(b, m, seed=7)
    assert score(a, b) != score(a, b_elsewhere)  # the change is visible without the mask ...
    assert score(a, b, m) == score(a, b_elsewhere, m)  # ... and invisible with it, exactly
    b_inside = b.clone()
    b_inside[:, 10:14, 12:16] = 1 - b_inside[:, 10:14, 12:16]
    assert score(a, b_inside, m) != score(a, b, m)  # a change inside the region counts


@pytest.mark.parametrize("name", SCORERS)
def test_an_empty_mask_scores_nan(name, metrics, request):
    score = scorer(name, metrics, request)
    a, b = image(1), image(2)
    assert math.isnan(score(a, b, torch.zeros(SIZE, SIZE)))
    assert not math.isnan(score(a, b, box_mask()))


# ------------------------------------------------------------------------------------------ structure distance

def shuffled_patches(img: torch.Tensor, seed: int, patch: int = 8) -> torch.Tensor:
    c, h, w = img.shape
    tiles = img.reshape(c, h // patch, patch, w // patch, patch).permute(1, 3, 0, 2, 4).reshape(-1, c, patch, patch)
    order = torch.randperm(tiles.shape[0], generator=torch.Generator().manual_seed(seed))
    tiles = tiles[order].reshape(h // patch, w // patch, c, patch, patch)
    return tiles.permute(2, 0, 3, 1, 4).reshape(c, h, w)


def smooth_image(seed: int, size: int = 64) -> torch.Tensor:
    """An image with structure at several scales (coarse noise upsampled), 8-bit values."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 3, size // 8, size // 8, generator=g)
    x = F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)[0]
    return (x * 255).round() / 255


def test_structure_distance_is_zero_for_equal_images_and_grows_with_shuffled_patches(structure):
    a = smooth_image(1)
    shuffled = shuffled_patches(a, seed=3)
    assert not torch.equal(shuffled, a)
    assert torch.equal(shuffled.reshape(3, -1).sort().values, a.reshape(3, -1).sort().values)
    assert structure(a, a) == 0.0
    near = (a + (image(4, (64, 64)) - 0.5) / 255).clamp(0, 1)  # one grey level of noise
    d_near, d_shuffled = structure(a, near), structure(a, shuffled)
    assert 0 < d_near < d_shuffled / 10
    assert structure(shuffled, a) == pytest.approx(d_shuffled, rel=1e-6)  # an MSE of the two matrices


def last_layer_keys(model, pixel_values: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
    """The last layer's key projection, computed from the model's parts: patch embedding, CLS token, the given
    position encoding, the layers before the last one, then the last one's first layer norm and key projection."""
    emb = model.embeddings
    x = emb.patch_embeddings.projection(pixel_values).flatten(2).transpose(1, 2)
    x = torch.cat((emb.cls_token.expand(x.shape[0], -1, -1), x), dim=1) + position
    layers = model.layers if hasattr(model, "layers") else model.encoder.layer
    for layer in layers[:-1]:
        out = layer(x)
        x = out[0] if isinstance(out, tuple) else out
    last = layers[-1]
    key = last.attention.k_proj if hasattr(last.attention, "k_proj") else last.attention.attention.key
    return key(last.layernorm_before(x))[0]


def dino_position(position: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """DINO's interpolate_pos_encoding: bicubic with scale factors (patches + 0.1) / sqrt(N)."""
    n = position.shape[1] - 1
    side = int(math.sqrt(n))
    grid = position[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, scale_factor=((rows + 0.1) / side, (cols + 0.1) / side), mode="bicubic")
    return torch.cat((position[:, :1], grid.permute(0, 2, 3, 1).reshape(1, rows * cols, -1)), dim=1)


def cosine_self_similarity(k: torch.Tensor) -> torch.Tensor:
    norm = k.norm(dim=1, keepdim=True)
    return (k @ k.T) / (norm @ norm.T).clamp(min=1e-8)


@pytest.mark.parametrize("size, resized", [((512, 512), (224, 224)), ((256, 448), (224, 392)),
                                           ((40, 128), (150, 480))])
def test_structure_distance_is_the_references_computation(structure, size, resized):
    """The reference feeds the 0-255 image (no division by 255) to Resize(224, max_size=480) (bilinear, no
    antialiasing: torchvision 0.13's tensor default) and Normalize(ImageNet); DINO interpolates its position grid for
    other sizes than 224 x 224."""
    model = structure.model
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]

    def similarity(img):
        x = F.interpolate((img * 255)[None], size=resized, mode="bilinear", align_corners=False, antialias=False)
        x = (x - mean) / std
        rows, cols = resized[0] // 8, resized[1] // 8
        position = model.embeddings.position_embeddings
        if (rows, cols) != (28, 28):
            position = dino_position(position, rows, cols)
        with torch.no_grad():
            return cosine_self_similarity(last_layer_keys(model, x, position))

    side = max(size)
    a, b = smooth_image(1, side)[:, :size[0], :size[1]], smooth_image(2, side)[:, :size[0], :size[1]]
    expected = F.mse_loss(similarity(a), similarity(b)).item()
    assert structure(a, b) == pytest.approx(expected, rel=1e-4)
    m = torch.zeros(size)
    m[4:30, 8:40] = 1
    expected = F.mse_loss(similarity(a * m), similarity(b * m)).item()
    assert structure(a, b, m) == pytest.approx(expected, rel=1e-4)
    # on [0, 1] images (as a pipeline that divides by 255 would feed) the distance differs: the scale matters
    unit = F.mse_loss(similarity(a / 255), similarity(b / 255)).item()
    assert abs(unit - structure(a, b)) > 1e-3 * structure(a, b)


def test_models_are_never_fetched(metrics):
    with pytest.raises(FileNotFoundError, match="not downloaded"):
        metrics.StructureDistance.from_pretrained("no-such-org/no-such-dino-model")
    with pytest.raises(FileNotFoundError, match="not downloaded"):
        metrics.ClipSimilarity("no-such-org/no-such-clip-model")


# ------------------------------------------------------------------------------------------------------- CLIP

def test_clip_similarity_is_the_clip_score_definition(metrics, clip, tiny_clip):
    """100 * max(cos(image embedding, text embedding), 0), the image as 8-bit through CLIP's preprocessing (at
    32 x 32 no resize or crop: rescale and normalise only)."""
    from transformers import AutoTokenizer, CLIPModel

    model = CLIPModel.from_pretrained(tiny_clip, local_files_only=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_clip, local_files_only=True)
    a, m = image(1), box_mask()

    def expected(img, text):
        pixels = (img * 255).round() / 255
        x = ((pixels - torch.tensor(CLIP_MEAN)[:, None, None]) / torch.tensor(CLIP_STD)[:, None, None])[None]
        tokens = tokenizer([text], padding=True, return_tensors="pt")
        with torch.no_grad():
            i = model.get_image_features(pixel_values=x)
            t = model.get_text_features(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
        i = i if isinstance(i, torch.Tensor) else i.pooler_output
        t = t if isinstance(t, torch.Tensor) else t.pooler_output
        return max(100 * F.cosine_similarity(i, t).item(), 0.0)

    score = clip(a, "a red cat")
    assert isinstance(score, float) and score > 0
    assert score == pytest.approx(expected(a, "a red cat"), abs=1e-3)
    assert clip(a, "a red cat") == score  # deterministic
    assert clip(a, "a dog") != score
    masked = clip(a, "a red cat", m)
    assert masked != score
    assert masked == pytest.approx(expected(a * m, "a red cat"), abs=1e-3)  # np.uint8(img * mask)
    assert metrics.ClipSimilarity(tiny_clip)(a, "a red cat") == score  # a second load scores the same
    between = torch.rand(3, SIZE, SIZE, generator=torch.Generator().manual_seed(9))  # not on the 8-bit grid
    assert clip(between, "a red cat") == pytest.approx(expected(between, "a red cat"), abs=1e-3)  # rounded


# ------------------------------------------------------------------------------------------------------- LPIPS

def block_downloads(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a download was attempted")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)


def test_load_lpips_without_local_weights_skips_with_a_message(metrics, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path))
    block_downloads(monkeypatch)
    model, message = metrics.load_lpips()
    assert model is None
    assert message.startswith("LPIPS skipped") and "squeezenet1_1-b8a52dc0.pth" in message
    assert str(tmp_path / "checkpoints") in message
    model, message = metrics.load_lpips(tmp_path / "elsewhere.pth")
    assert model is None and "elsewhere.pth" in message
    (tmp_path / "bad.pth").write_bytes(b"not a state dict")
    model, message = metrics.load_lpips(tmp_path / "bad.pth")
    assert model is None and "bad.pth" in message


def test_lpips_with_local_weights_matches_torchmetrics(metrics, tmp_path, monkeypatch):
    """A SqueezeNet 1.1 state dict in torch hub's checkpoints folder (random weights under the real file name):
    load_lpips uses it, and scores as torchmetrics' LearnedPerceptualImagePatchSimilarity(net_type='squeeze') does
    when torchvision finds the same file there, on the reference's inputs (masked, then x * 2 - 1)."""
    import torchvision
    from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

    assert torchvision.models.SqueezeNet1_1_Weights.IMAGENET1K_V1.url.endswith(metrics.SQUEEZENET_FILE)
    torch.manual_seed(5)
    (tmp_path / "checkpoints").mkdir()
    state = torchvision.models.squeezenet1_1(weights=None).state_dict()
    torch.save(state, tmp_path / "checkpoints" / metrics.SQUEEZENET_FILE)
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path))
    model, message = metrics.load_lpips()
    assert model is not None and "SqueezeNet" in message
    assert torch.equal(model.net.net.slices[0][0].weight, state["features.0.weight"])
    assert torch.equal(getattr(model.net.net.slices[6], "12").expand3x3.weight, state["features.12.expand3x3.weight"])
    reference = LearnedPerceptualImagePatchSimilarity(net_type="squeeze")  # finds the file: no download
    block_downloads(monkeypatch)
    a, b, m = image(1), image(2), box_mask()
    for mask in (None, 1 - m, m):
        x, y = (a, b) if mask is None else (a * mask, b * mask)
        expected = reference(x[None] * 2 - 1, y[None] * 2 - 1).item()
        assert model(a, b, mask) == pytest.approx(expected, rel=1e-5)
    random = metrics.Lpips(backbone_state=None)
    assert random(a, b) != pytest.approx(model(a, b), rel=1e-3)  # the loaded backbone is used
    assert model(a, a) == 0


# ---------------------------------------------------------------------------------------------- region scores

def test_region_scores(metrics, random_lpips):
    a, b, m = image(1), image(2), box_mask()
    scores = metrics.region_scores(a, b, m, lpips=random_lpips)
    assert list(scores) == ["psnr_outside", "ssim_outside", "mse_outside", "psnr_inside", "ssim_inside",
                            "mse_inside", "lpips_outside", "lpips_inside"]
    for name in ("psnr", "ssim", "mse"):
        score = getattr(metrics, name)
        assert scores[f"{name}_outside"] == score(b, a, 1 - m)
        assert scores[f"{name}_inside"] == score(b, a, m)
    assert scores["lpips_outside"] == random_lpips(b, a, 1 - m)
    assert scores["lpips_inside"] == random_lpips(b, a, m)
    assert scores["psnr_outside"] != scores["psnr_inside"]

    whole = metrics.region_scores(a, b)
    assert list(whole) == ["psnr_outside", "ssim_outside", "mse_outside", "psnr_inside", "ssim_inside", "mse_inside"]
    assert whole["psnr_outside"] == metrics.psnr(b, a) and whole["mse_outside"] == metrics.mse(b, a)
    assert whole["ssim_outside"] == metrics.ssim(b, a)
    assert all(math.isnan(whole[k]) for k in ("psnr_inside", "ssim_inside", "mse_inside"))

    full = metrics.region_scores(a, b, torch.ones(SIZE, SIZE))  # nothing outside the mask
    assert math.isnan(full["psnr_outside"]) and full["mse_inside"] == metrics.mse(b, a)
