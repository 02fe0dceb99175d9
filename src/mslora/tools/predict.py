"""``mslora predict``: a trained run's predictions for image files, written as files.

- classify: ``predictions.csv`` (``path``, ``label``, then the top-k labels and probabilities) and the same as JSON
  lines (``predictions.jsonl``); a table on stdout for a handful of images.
- detect: ``results.json`` in COCO's results format (``image_id``, ``category_id`` = label 1..K, ``bbox`` [x, y, w, h]
  in pixels, ``score``, RLE ``segmentation`` for masks), ``image_ids.json`` (path -> image_id), ``categories.json``,
  and one PNG per image with its boxes, labels and masks drawn (torchvision's ``draw_bounding_boxes`` /
  ``draw_segmentation_masks``).
- segment: one label-map PNG per image (palette: index = class) and an overlay PNG.

Inputs are files, folders (searched recursively for images) and glob patterns; a file that cannot be read is
listed on stderr with the reason and skipped, and the rest go on.
"""
from __future__ import annotations

import csv
import glob
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks
from tqdm import tqdm

from mslora.inference import as_image, load_run, predict

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


def collect(inputs: list[str]) -> list[Path]:
    """Image files named by ``inputs``: files as given, folders searched recursively (image suffixes), glob patterns
    expanded; in order, each once.

    Raises:
        FileNotFoundError: an input that is neither a file, a folder nor a pattern matching something.
    """
    found: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_file():
            found.append(path)
        elif path.is_dir():
            found += sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        else:
            matches = sorted(Path(m) for m in glob.glob(item, recursive=True) if Path(m).is_file())
            if not matches:
                raise FileNotFoundError(f"input '{item}' is no file, folder or pattern that matches a file")
            found += matches
    return list(dict.fromkeys(found))


def readable(paths: list[Path]) -> tuple[list[Path], list[str]]:
    """(paths that open as images, one line per path that does not, naming it and why)."""
    ok, bad = [], []
    for p in paths:
        try:
            as_image(p)
            ok.append(p)
        except ValueError as e:
            bad.append(str(e))
    return ok, bad


def write_classification(paths: list[Path], preds: list[dict[str, Any]], classes: list[str], out: Path,
                         top_k: int) -> list[str]:
    """``predictions.csv`` and ``predictions.jsonl``; returns table lines for stdout."""
    k = min(top_k, len(classes))
    lines, table = [], []
    with open(out / "predictions.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label", *[f"top{i + 1}_{c}" for i in range(k) for c in ("label", "probability")]])
        for path, p in zip(paths, preds):
            probs = torch.tensor(p["probabilities"])
            top = [(classes[int(i)], round(float(probs[i]), 6)) for i in probs.topk(k).indices]
            writer.writerow([str(path), p["label"], *[v for pair in top for v in pair]])
            lines.append(json.dumps({"path": str(path), "label": p["label"],
                                     "top_k": [{"label": c, "probability": v} for c, v in top]}))
            table.append(f"{str(path):<60} {p['label']:<24} {top[0][1]:.4f}")
    (out / "predictions.jsonl").write_text("".join(ln + "\n" for ln in lines))
    return table


def write_detection(paths: list[Path], preds: list[dict[str, Any]], classes: list[str], out: Path,
                    score_threshold: float) -> None:
    """COCO results JSON, the image-id and category files, and one drawn PNG per image."""
    results, ids = [], {}
    for k, (path, p) in enumerate(zip(paths, preds), 1):
        ids[str(path)] = k
        keep = p["scores"] >= score_threshold
        boxes, scores = p["boxes"][keep], p["scores"][keep]
        labels = [lb for lb, kept in zip(p["labels"], keep.tolist()) if kept]
        masks = p["masks"][keep] if "masks" in p else None
        for i, (box, score, label) in enumerate(zip(boxes.tolist(), scores.tolist(), labels)):
            x1, y1, x2, y2 = box
            det = {"image_id": k, "category_id": classes.index(label) + 1,
                   "bbox": [round(v, 2) for v in (x1, y1, x2 - x1, y2 - y1)], "score": score}
            if masks is not None:
                rle = mask_utils.encode(np.asfortranarray(masks[i].numpy().astype(np.uint8)))
                det["segmentation"] = {"size": rle["size"], "counts": rle["counts"].decode()}
            results.append(det)
        image = as_image(path)
        if masks is not None and len(masks):
            image = draw_segmentation_masks(image, masks, alpha=0.4)
        image = draw_bounding_boxes(image, boxes, [f"{lb} {s:.2f}" for lb, s in zip(labels, scores.tolist())], width=2)
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(out / f"{k:05d}_{path.stem}.png")
    (out / "results.json").write_text(json.dumps(results))
    (out / "image_ids.json").write_text(json.dumps(ids, indent=1))
    (out / "categories.json").write_text(json.dumps([{"id": i + 1, "name": c} for i, c in enumerate(classes)]))


def palette() -> list[int]:
    """A flat RGB palette of 256 distinct colours, PASCAL VOC's (index bits spread over R, G and B)."""
    colours = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        colours += [r, g, b]
    return colours


def write_segmentation(paths: list[Path], preds: list[dict[str, Any]], classes: list[str], out: Path) -> None:
    """A label-map PNG (palette) and an overlay PNG per image."""
    colours = palette()
    for k, (path, p) in enumerate(zip(paths, preds), 1):
        labels = Image.fromarray(p["label_map"].numpy().astype(np.uint8), mode="P")
        labels.putpalette(colours)
        labels.save(out / f"{k:05d}_{path.stem}_labels.png")
        image = Image.fromarray(as_image(path).permute(1, 2, 0).numpy())
        Image.blend(image, labels.convert("RGB"), 0.5).save(out / f"{k:05d}_{path.stem}_overlay.png")


def predict_files(adapter: str, inputs: list[str], output: str, batch_size: int = 16, top_k: int = 5,
                  score_threshold: float = 0.5, device: str | None = None) -> tuple[Path, list[str], list[str]]:
    """Predict every readable image of ``inputs`` with the run ``adapter`` and write the task's files into
    ``output`` (created); returns (output folder, lines for stdout, one line per skipped file).

    Raises:
        FileNotFoundError / ValueError: no adapter or input, no readable image, or an invalid option.
    """
    if batch_size < 1 or top_k < 1:
        raise ValueError(f"batch_size={batch_size} and top_k={top_k} must be positive integers")
    paths, skipped = readable(collect(inputs))
    if not paths:
        raise ValueError(f"no readable image among the inputs ({len(skipped)} unreadable)")
    run = load_run(adapter, device=device)
    preds = []
    for start in tqdm(range(0, len(paths), batch_size), desc="predict", unit="batch", disable=None, file=sys.stderr):
        preds += predict(run, paths[start:start + batch_size], batch_size)
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    task = run.model.mslora_inference[0].cfg.task
    table: list[str] = []
    if task == "classify":
        table = write_classification(paths, preds, run.classes, out, top_k)
    elif task == "detect":
        write_detection(paths, preds, run.classes, out, score_threshold)
    else:
        write_segmentation(paths, preds, run.classes, out)
    return out, table if len(table) <= 10 else [], skipped
