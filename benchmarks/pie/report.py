"""``evaluate``: the benchmark's metrics for every case in an output folder, ``per_image.csv``, ``summary.md``
(the paper's Table 1 layout, with the paper's values beside ours where the case exists) and ``summary.png``.

Columns (the benchmark's evaluation/evaluate.py; its metric functions are ``evaluation/metrics.py`` of the pack):
structure distance (DINO ViT-B/8 key self-similarity, whole image), PSNR / LPIPS / MSE / SSIM on the unedited part
(both images times 1 - mask), CLIP similarity of the whole edit and of the edited part (the edit times the mask)
with the target prompt. Means skip ``nan`` (an empty region), as the paper's tables do.
"""
from __future__ import annotations

import csv
import json
import math
import statistics
from pathlib import Path
from typing import Optional, Sequence

from . import data as pie
from .run import find_edit, load_image, read_records

SUPERSCRIPT = str.maketrans("0123456789", "⁰¹²³⁴⁵⁶⁷⁸⁹")


def columns(metrics) -> tuple:
    """(name, label, scale, lower is better) of the benchmark's columns, from the pack's ``metrics.METRICS``."""
    out = []
    for name, m in metrics.METRICS.items():
        scale = "" if m.scale == 1 else f" ×10{str(round(math.log10(m.scale))).translate(SUPERSCRIPT)}"
        out.append((name, f"{m.label}{scale} {'↑' if m.higher_is_better else '↓'}", m.scale, not m.higher_is_better))
    return tuple(out)


# Table 1 of Ju et al. (ICLR 2024), Stable Diffusion v1.4, 50 steps, in the order of ``metrics.METRICS``. Transcribed from
# the paper; the Direct Inversion + P2P row also matches the benchmark's listing on Papers with Code.
PAPER = {
    "ddim+p2p": (69.43, 17.87, 208.80, 219.88, 71.14, 25.01, 22.44),
    "null_text+p2p": (13.44, 27.03, 60.67, 35.86, 84.11, 24.75, 21.86),
    "negative_prompt+p2p": (16.17, 26.21, 69.01, 39.73, 83.40, 24.61, 21.87),
    "directinversion+p2p": (11.65, 27.22, 54.55, 32.86, 84.76, 25.02, 22.10),
    "ddim+masactrl": (28.38, 22.17, 106.62, 86.97, 79.67, 23.96, 21.16),
    "directinversion+masactrl": (24.70, 22.64, 87.94, 81.09, 81.33, 24.38, 21.35),
    "ddim+pnp": (28.22, 22.28, 113.46, 83.64, 79.05, 25.41, 22.55),
    "directinversion+pnp": (24.29, 22.46, 106.06, 80.45, 79.68, 25.41, 22.62),
}


def case_dirs(out_dir, names: Optional[Sequence[str]] = None) -> list[Path]:
    """The case folders of a run (those with run.json), in the order asked for (else by name)."""
    out_dir = Path(out_dir)
    found = {p.parent.name: p.parent for p in out_dir.glob("*/run.json")}
    if names:
        missing = [n for n in names if n not in found]
        if missing:
            raise pie.DataError(f"{out_dir} has no case folder {', '.join(missing)} (found: "
                                f"{', '.join(sorted(found)) or 'none'})")
        return [found[n] for n in names]
    return [found[n] for n in sorted(found)]


class Scorer:
    """The metric functions with their models; a metric whose model is missing is skipped with a line saying so."""

    def __init__(self, metrics, dino=None, clip=None, lpips=None, device: str = "cpu", log=print):
        self.m = metrics
        self.skipped: dict[str, str] = {}
        self.structure = self.clip = None
        if dino:
            self.structure = metrics.StructureDistance.from_pretrained(dino)
            self.structure.model.to(device)
        else:
            self.skipped["structure_distance"] = "no DINO model given (--dino PATH: facebook/dino-vitb8)"
        if clip:
            self.clip = metrics.ClipSimilarity(clip, device=device)
        else:
            self.skipped["clip_similarity_target_image"] = self.skipped["clip_similarity_target_image_edit_part"] = \
                "no CLIP model given (--clip PATH: openai/clip-vit-large-patch14)"
        self.lpips, why = metrics.load_lpips(lpips, device=device)
        for name in dict.fromkeys(self.skipped):
            log(f"evaluate: {name} skipped: {self.skipped[name]}")
        if self.lpips is None:
            log(f"evaluate: lpips_unedit_part skipped: {why}")
            # the report names no local folder: the reason in general terms
            self.skipped["lpips_unedit_part"] = ("no local SqueezeNet 1.1 ImageNet weights (--lpips FILE, or "
                                            "squeezenet1_1-b8a52dc0.pth in torch's hub cache)")

    def __call__(self, source, edited, mask, target_prompt: str) -> dict:
        m, nan = self.m, float("nan")
        outside = 1.0 - mask
        return {
            "structure_distance": self.structure(edited, source) if self.structure is not None else nan,
            "psnr_unedit_part": m.psnr(edited, source, outside),
            "lpips_unedit_part": self.lpips(edited, source, outside) if self.lpips is not None else nan,
            "mse_unedit_part": m.mse(edited, source, outside),
            "ssim_unedit_part": m.ssim(edited, source, outside),
            "clip_similarity_target_image": self.clip(edited, target_prompt) if self.clip is not None else nan,
            "clip_similarity_target_image_edit_part":
                self.clip(edited, target_prompt, mask) if self.clip is not None else nan,
        }


def _mean(values) -> float:
    values = [v for v in values if v is not None and not math.isnan(v)]
    return statistics.fmean(values) if values else float("nan")


def _fmt(value: float, digits: int = 2) -> str:
    return "–" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def evaluate(metrics, data_dir, out_dir, cases: Optional[Sequence[str]] = None, dino=None, clip=None, lpips=None,
             types=None, per_type: bool = False, device: str = "cpu", log=print, progress=None) -> dict:
    """Score every saved edit; write per_image.csv, summary.md and summary.png into ``out_dir``."""
    import torch

    out_dir = Path(out_dir)
    entries = pie.load(data_dir, types=types)
    folders = case_dirs(out_dir, cases)
    if not folders:
        raise pie.DataError(f"{out_dir} holds no case folders: run `piebench.py run` first")
    scorer = Scorer(metrics, dino=dino, clip=clip, lpips=lpips, device=device, log=log)
    rows: list[dict] = []
    work = [(folder, e) for folder in folders for e in entries]
    bar = progress(total=len(work)) if progress is not None else None
    sources: dict = {}
    records = {folder.name: read_records(folder) for folder in folders}
    missing = {folder.name: 0 for folder in folders}
    with torch.no_grad():
        for folder, entry in work:
            path = find_edit(out_dir, folder.name, entry.image_path)
            if bar is not None:
                bar.update(1)
            if path is None:
                missing[folder.name] += 1
                continue
            if entry.key not in sources:
                sources = {entry.key: load_image(entry.image_file)}  # one source image in memory at a time
            source = sources[entry.key]
            edited = load_image(path)
            if edited.shape != source.shape:
                raise pie.DataError(f"{path} is {tuple(edited.shape[1:])}, its source {tuple(source.shape[1:])}: "
                                    "edits are saved at the data's resolution")
            mask = torch.from_numpy(entry.mask(source.shape[1:])).float()
            row = {"case": folder.name, "key": entry.key, "type": entry.type_id, "image_path": entry.image_path}
            row.update(scorer(source, edited, mask, entry.target_prompt))
            record = records[folder.name].get(entry.key, {})
            row.update({k: record.get(k) for k in ("seconds", "unet_evals", "peak_memory_mb")})
            row["notes"] = "; ".join(record.get("notes") or [])
            rows.append(row)
    if bar is not None:
        bar.close()
    failed = {name: sorted(k for k, r in records[name].items() if "error" in r and k in {e.key for e in entries}
                           and find_edit(out_dir, name, r["image_path"]) is None) for name in records}
    for name, count in missing.items():
        if count:
            log(f"evaluate: {name}: {count} of {len(entries)} image(s) have no edit "
                f"({len(failed[name])} failed, see CASE/records; the rest not run yet), left out")
    cols = columns(metrics)
    write_csv(rows, cols, out_dir / "per_image.csv")
    summary = summarise(rows, cols, [f.name for f in folders])
    by_type = {t: summarise([r for r in rows if r["type"] == t], cols, [f.name for f in folders])
               for t in sorted({r["type"] for r in rows})} if per_type else {}
    (out_dir / "summary.md").write_text(markdown(summary, cols, by_type, scorer.skipped, len(entries), failed),
                                        encoding="utf-8")
    plot(summary, cols, out_dir / "summary.png")
    (out_dir / "summary.json").write_text(json.dumps({"summary": summary, "by_type": by_type,
                                                      "skipped": scorer.skipped}, indent=1))
    return {"summary": summary, "by_type": by_type, "rows": rows, "skipped": scorer.skipped}


def write_csv(rows: list[dict], cols, path: Path) -> None:
    fields = ["case", "key", "type", "image_path", *(c[0] for c in cols), "seconds", "unet_evals", "peak_memory_mb",
              "notes"]
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row.get(k) for k in fields})


def summarise(rows: list[dict], cols, case_names: Sequence[str]) -> list[dict]:
    out = []
    for name in case_names:
        mine = [r for r in rows if r["case"] == name]
        if not mine:
            continue
        entry = {"case": name, "images": len(mine)}
        for key, _, scale, _ in cols:
            entry[key] = _mean(r[key] for r in mine) * scale
        entry["seconds"] = _mean(r["seconds"] for r in mine)
        entry["unet_evals"] = _mean(r["unet_evals"] for r in mine)
        out.append(entry)
    return out


def _table(summary: list[dict], cols, with_paper: bool) -> list[str]:
    header = ["Case", "Images", *[c[1] for c in cols], "s / image", "UNet evals / image"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in summary:
        cells = [row["case"], str(row["images"]), *[_fmt(row[k]) for k, *_ in cols], _fmt(row["seconds"], 1),
                 _fmt(row["unet_evals"], 0)]
        lines.append("| " + " | ".join(cells) + " |")
        if with_paper and row["case"] in PAPER:
            lines.append("| " + " | ".join([f"*paper: {row['case']}*", "700",
                                              *[f"*{v:.2f}*" for v in PAPER[row["case"]]], "", ""]) + " |")
    return lines


def markdown(summary: list[dict], cols, by_type: dict, skipped: dict, total: int, failed: Optional[dict] = None) -> str:
    lines = ["# PIE-Bench results", "",
             "Means over the images each case edited (of " f"{total} in the data); `–`: not computed. Rows in "
             "italics are the paper's Table 1 (Stable Diffusion v1.4, 700 images) where the case exists.", ""]
    lines += _table(summary, cols, with_paper=True)
    if skipped:
        lines += ["", "Skipped metrics:"]
        lines += [f"- {name}: {why}" for name, why in skipped.items()]
    failures = {name: keys for name, keys in (failed or {}).items() if keys}
    if failures:
        lines += ["", "Images whose edit failed (left out of the means; the errors are in CASE/records):"]
        lines += [f"- {name}: {len(keys)}: {', '.join(keys[:20])}{' ...' if len(keys) > 20 else ''}"
                  for name, keys in failures.items()]
    for type_id, rows in by_type.items():
        lines += ["", f"## Editing type {type_id}: {pie.EDITING_TYPES.get(type_id, '?')}", ""]
        lines += _table(rows, cols, with_paper=False)
    return "\n".join(lines) + "\n"


def _ascii(label: str) -> str:
    """A column label in characters PIL's default font has: "PSNR ↑" -> "PSNR (higher is better)"."""
    plain = label.replace("×10", "x1e").translate(str.maketrans("⁰¹²³⁴⁵⁶⁷⁸⁹", "0123456789"))
    return plain.replace(" ↑", " (higher is better)").replace(" ↓", " (lower is better)")


def plot(summary: list[dict], cols, path: Path, width: int = 260, height: int = 180) -> None:
    """Bars per metric (one panel each, one bar per case), for those who would rather look."""
    from PIL import Image, ImageDraw

    panels = [c for c in cols if any(math.isfinite(r[c[0]]) for r in summary)]
    palette = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
               (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]
    cols = max(1, min(4, len(panels)))
    rows_n = max(1, math.ceil(len(panels) / cols))
    legend_h = 16 * len(summary) + 10
    picture = Image.new("RGB", (cols * width, rows_n * height + legend_h), "white")
    draw = ImageDraw.Draw(picture)
    for index, (key, label, _, lower) in enumerate(panels):
        x0, y0 = (index % cols) * width, (index // cols) * height
        values = [r[key] if math.isfinite(r[key]) else float("nan") for r in summary]
        finite = [v for v in values if not math.isnan(v)]
        top = max(finite) if finite else 1.0
        top = top if top > 0 else 1.0
        draw.text((x0 + 8, y0 + 4), _ascii(label), fill="black")
        base, room = y0 + height - 20, height - 44
        bar_w = max(4, (width - 20) // max(1, len(values)) - 6)
        for i, v in enumerate(values):
            if math.isnan(v):
                continue
            bx = x0 + 10 + i * (bar_w + 6)
            bh = int(room * max(v, 0.0) / top)
            draw.rectangle([bx, base - bh, bx + bar_w, base], fill=palette[i % len(palette)])
            draw.text((bx, base - bh - 12), f"{v:.3g}", fill="black")
        draw.line([x0 + 6, base, x0 + width - 6, base], fill="gray")
    for i, row in enumerate(summary):
        y = rows_n * height + 5 + 16 * i
        draw.rectangle([10, y + 2, 22, y + 12], fill=palette[i % len(palette)])
        draw.text((28, y), f"{row['case']} ({row['images']} images)", fill="black")
    picture.save(path)
