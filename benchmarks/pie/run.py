"""Run cases over the benchmark's images and save the edits where ``evaluate`` reads them.

Layout of OUT_DIR, per case::

    CASE/run.json                      the model and settings (a resumed run must use the same)
    CASE/annotation_images/PATH.png    each edit at the data's resolution (PATH: the entry's image_path)
    CASE/records/SHARD.jsonl           per image: seconds, UNet evaluations, peak memory, notes or the error

An image whose edit exists is skipped, so a run can be stopped and resumed, and N processes with ``--shard K/N``
share one benchmark (each writes its own records file).
"""
from __future__ import annotations

import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from . import data as pie
from .cases import Case, make_editor, target_conditioning

EDITS = "annotation_images"
RECORDS = "records"


class RunError(ValueError):
    """A run that cannot go on (e.g. an output folder made with other settings)."""


SUFFIXES = {"jpg": ".jpg", "png": ".png"}


def edit_path(out_dir, case_name: str, image_path: str, save_format: str = "jpg") -> Path:
    """Where a case's edit of ``image_path`` is saved (the entry's relative path, the format's suffix)."""
    return Path(out_dir) / case_name / EDITS / Path(image_path).with_suffix(SUFFIXES[save_format])


def find_edit(out_dir, case_name: str, image_path: str) -> Optional[Path]:
    """The saved edit in whichever format, or None."""
    for save_format in SUFFIXES:
        path = edit_path(out_dir, case_name, image_path, save_format)
        if path.is_file():
            return path
    return None


def load_image(path: Path) -> torch.Tensor:
    from PIL import Image

    with Image.open(path) as picture:
        array = np.asarray(picture.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float() / 255.0


def resize(image: torch.Tensor, size) -> torch.Tensor:
    """``[B, 3, H, W]`` to ``size`` (bicubic, anti-aliased when shrinking), clamped to [0, 1]."""
    size = (int(size[0]), int(size[1]))
    if tuple(image.shape[-2:]) == size:
        return image
    out = torch.nn.functional.interpolate(image.float(), size=size, mode="bicubic", align_corners=False,
                                          antialias=True)
    return out.clamp(0.0, 1.0)


def save_image(image: torch.Tensor, path: Path) -> None:
    """PNG, or JPEG at PIL's default quality (75) for a .jpg path, as the benchmark's runs saved their edits."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    array = (image.permute(1, 2, 0).clamp(0, 1).cpu().numpy() * 255).round().astype(np.uint8)
    temporary = path.with_name(path.name + ".part")
    Image.fromarray(array).save(temporary, format="JPEG" if path.suffix == ".jpg" else "PNG")
    os.replace(temporary, path)  # a killed run leaves no half-written edit that a resume would take as done


class UNetCounter:
    """Samples the UNet evaluates (a batch of 2 is 2 evaluations), through a forward pre-hook (also
    benchmarks/toy_edits.py's counter)."""

    def __init__(self, unet):
        self.count = 0
        self.handle = unet.register_forward_pre_hook(self._hook)

    def _hook(self, module, args):
        if args:  # the diffusers backend passes the latents first
            self.count += int(args[0].shape[0])

    def close(self):
        self.handle.remove()


def _peak_memory_mb(device: torch.device) -> Optional[float]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    try:
        import resource
        scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2 ** 20
    except (ImportError, OSError):
        return None


def edit_entry(pack, model, case: Case, entry: pie.Entry, counter: UNetCounter) -> tuple[torch.Tensor, dict]:
    """One benchmark edit: the image at the model's resolution, inverted with the case's method (on the source
    prompt, or the empty prompt for MasaCtrl as its benchmark run does), edited toward the target prompt (for
    Pix2Pix-Zero the source prompt plus the edit direction, see ``cases.target_conditioning``) against the case's
    negative prompt, decoded and brought back to the data's resolution."""
    di, editors = pack
    s = case.settings
    source_image = load_image(entry.image_file)
    data_size = tuple(source_image.shape[-2:])
    x = resize(source_image[None], (model.resolution, model.resolution))
    notes: list[str] = []
    counter.count = 0
    start = time.perf_counter()
    z0 = model.encode(x)
    source_text = "" if case.empty_source else entry.source_prompt
    source, null = model.embed([source_text]), model.embed([""])
    target = target_conditioning(case, editors, model, entry, source)
    negative_text = case.negative_prompt(entry)
    negative = null if not negative_text else model.embed([negative_text])
    inversion = di.invert(model.unet, model.scheduler, z0, source, null, steps=s.steps, method=case.method)
    editor = make_editor(case, editors, model, entry, notes)
    result = di.edit(model.unet, model.scheduler, inversion, target, negative, cfg=s.cfg, offsets=case.offsets,
                     editor=editor)
    edited = model.decode(result.edited)
    seconds = time.perf_counter() - start
    out = resize(edited.float().cpu(), data_size)[0]
    record = {"key": entry.key, "image_path": entry.image_path, "type": entry.type_id,
              "seconds": round(seconds, 3), "unet_evals": counter.count, "notes": notes}
    return out, record


# Keys that run.json files written before them lack. Such a file still matches: its runs did what the keys now say
# (no case ran Pix2Pix-Zero, and every case's offsets were its inversion's), and it is rewritten with them.
ADDED_KEYS = ("offsets", "p2p_zero_guidance")


def _write_settings(case_dir: Path, settings: dict) -> None:
    temporary = case_dir / f"run.json.{os.getpid()}.part"
    temporary.write_text(json.dumps(settings, indent=1))
    os.replace(temporary, case_dir / "run.json")  # N shards with the same settings write the same file


def _check_settings(case_dir: Path, settings: dict) -> None:
    """Record a case's settings, or check them against those recorded (shards may start together: the file is
    written whole, by rename, and a reader that finds none tries to write it)."""
    path = case_dir / "run.json"
    case_dir.mkdir(parents=True, exist_ok=True)
    if not path.is_file():
        _write_settings(case_dir, settings)
    before = json.loads(path.read_text())
    older = {k: v for k, v in settings.items() if k not in ADDED_KEYS or k in before}
    if before != settings and before == older:
        _write_settings(case_dir, settings)
        before = settings
    if before != settings:
        changed = sorted(k for k in set(before) | set(settings) if before.get(k) != settings.get(k))
        raise RunError(f"{case_dir} holds edits made with other settings ({', '.join(changed)}); use another "
                       "--out, or delete the folder to start over")


class DiffusersRunner:
    """Edits through the pack's diffusers backend with a loaded model (benchmarks/pie/models.py)."""

    def __init__(self, pack, model):
        self.pack, self.model = pack, model
        self.name = model.name
        self.device = getattr(model, "device", torch.device("cpu"))
        self.settings = {"backend": "diffusers", "resolution": model.resolution,
                         "dtype": str(getattr(model, "dtype", torch.float32)).replace("torch.", "")}
        self.counter = UNetCounter(model.unet)

    def edit(self, case: Case, entry: pie.Entry) -> tuple[torch.Tensor, dict]:
        return edit_entry(self.pack, self.model, case, entry, self.counter)

    def close(self) -> None:
        self.counter.close()


def run(runner, cases: Sequence[Case], entries: Sequence[pie.Entry], out_dir, shard=None,
        progress: Optional[Callable] = None, log=print) -> dict:
    """Edit every entry with every case through ``runner`` (``name``, ``device``, ``edit(case, entry)``), skipping
    edits already saved. Returns counts per case."""
    out_dir = Path(out_dir)
    shard_name = "all" if shard is None else f"{shard[0]}of{shard[1]}"
    device = torch.device(getattr(runner, "device", "cpu"))
    counts = {case.name: {"done": 0, "skipped": 0, "failed": 0} for case in cases}
    for case in cases:
        _check_settings(out_dir / case.name, {"case": case.name, "model": runner.name, "offsets": case.offsets,
                                              **getattr(runner, "settings", {}), **case.settings.as_dict()})
        counts[case.name]["skipped"] = sum(1 for e in entries if find_edit(out_dir, case.name, e.image_path))
    todo = [(case, entry) for case in cases for entry in entries if not find_edit(out_dir, case.name, entry.image_path)]
    bar = progress(total=len(todo)) if progress is not None else None
    try:
        for case, entry in todo:
            records = out_dir / case.name / RECORDS / f"{shard_name}.jsonl"
            records.parent.mkdir(parents=True, exist_ok=True)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            try:
                image, record = runner.edit(case, entry)
            except (KeyboardInterrupt, SystemExit):
                raise
            except Exception as err:  # one bad image must not end a day-long run; its error is recorded
                record = {"key": entry.key, "image_path": entry.image_path, "type": entry.type_id,
                          "error": f"{type(err).__name__}: {err}", "trace": traceback.format_exc(limit=4)}
                counts[case.name]["failed"] += 1
                log(f"{case.name} {entry.key}: {record['error']}")
            else:
                record["peak_memory_mb"] = _peak_memory_mb(device)
                save_image(image, edit_path(out_dir, case.name, entry.image_path, case.settings.save_format))
                counts[case.name]["done"] += 1
            record.setdefault("offsets", case.offsets)  # what ran (P2P-Zero with Direct Inversion: both branches)
            with records.open("a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
            if bar is not None:
                bar.set_postfix_str(case.name, refresh=False)
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return counts


def read_records(case_dir: Path) -> dict:
    """One record per image key of a case, over every shard's file: a success wins over a failure (an image that
    failed once and was edited on a later run), else the last one read."""
    out: dict = {}
    folder = Path(case_dir) / RECORDS
    for path in sorted(folder.glob("*.jsonl")) if folder.is_dir() else ():
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:  # a line cut by a killed process
                    continue
                if "error" in record and record["key"] in out and "error" not in out[record["key"]]:
                    continue
                out[record["key"]] = record
    return out
