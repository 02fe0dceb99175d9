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


class ClassificationWriter:
    """``predictions.csv`` (``path``, ``label``, the top-k labels and probabilities) and ``predictions.jsonl``,
    written by :meth:`finish`, which returns a table line per image for stdout."""

    def __init__(self, out: Path, classes: list[str], top_k: int = 5, **_: Any) -> None:
        self.out, self.classes, self.k = out, classes, min(top_k, len(classes))
        self.rows: list[list[Any]] = []
        self.lines: list[str] = []
        self.table: list[str] = []

    def add(self, paths: list[Path], images: list[torch.Tensor], preds: list[dict[str, Any]]) -> None:
        """Record one batch's predictions."""
        for path, p in zip(paths, preds):
            probs = torch.tensor(p["probabilities"])
            top = [(self.classes[int(i)], round(float(probs[i]), 6)) for i in probs.topk(self.k).indices]
            self.rows.append([str(path), p["label"], *[v for pair in top for v in pair]])
            self.lines.append(json.dumps({"path": str(path), "label": p["label"],
                                          "top_k": [{"label": c, "probability": v} for c, v in top]}))
            self.table.append(f"{str(path):<60} {p['label']:<24} {top[0][1]:.4f}")

    def finish(self) -> list[str]:
        """Write the CSV and JSON lines files; returns the table lines."""
        with open(self.out / "predictions.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["path", "label", *[f"top{i + 1}_{c}" for i in range(self.k)
                                                 for c in ("label", "probability")]])
            writer.writerows(self.rows)
        (self.out / "predictions.jsonl").write_text("".join(ln + "\n" for ln in self.lines))
        return self.table


class DetectionWriter:
    """One PNG per image with its boxes, labels and masks drawn (written as the batches come); COCO results JSON,
    the image ids and the categories, written by :meth:`finish`. Boxes scored below ``score_threshold`` are left
    out."""

    def __init__(self, out: Path, classes: list[str], score_threshold: float = 0.5, **_: Any) -> None:
        self.out, self.classes, self.threshold = out, classes, score_threshold
        self.results: list[dict[str, Any]] = []
        self.ids: dict[str, int] = {}

    def add(self, paths: list[Path], images: list[torch.Tensor], preds: list[dict[str, Any]]) -> None:
        """Record one batch's detections and draw its images."""
        for path, image, p in zip(paths, images, preds):
            k = self.ids[str(path)] = len(self.ids) + 1
            image, keep = draw_detections(image, p, self.threshold)
            boxes, scores = p["boxes"][keep], p["scores"][keep]
            labels = [lb for lb, kept in zip(p["labels"], keep.tolist()) if kept]
            masks = p["masks"][keep] if "masks" in p else None
            for i, (box, score, label) in enumerate(zip(boxes.tolist(), scores.tolist(), labels)):
                x1, y1, x2, y2 = box
                det = {"image_id": k, "category_id": self.classes.index(label) + 1,
                       "bbox": [round(v, 2) for v in (x1, y1, x2 - x1, y2 - y1)], "score": score}
                if masks is not None:
                    rle = mask_utils.encode(np.asfortranarray(masks[i].numpy().astype(np.uint8)))
                    det["segmentation"] = {"size": rle["size"], "counts": rle["counts"].decode()}
                self.results.append(det)
            Image.fromarray(image.permute(1, 2, 0).numpy()).save(self.out / f"{k:05d}_{path.stem}.png")

    def finish(self) -> list[str]:
        """Write the results, image-id and category files; no table."""
        (self.out / "results.json").write_text(json.dumps(self.results))
        (self.out / "image_ids.json").write_text(json.dumps(self.ids, indent=1))
        (self.out / "categories.json").write_text(json.dumps([{"id": i + 1, "name": c}
                                                              for i, c in enumerate(self.classes)]))
        return []


def draw_detections(image: torch.Tensor, pred: dict[str, Any], score_threshold: float
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """``image`` uint8 (3, H, W) with the detections scored at least ``score_threshold`` drawn (masks, then boxes
    with label and score: torchvision's ``draw_segmentation_masks`` / ``draw_bounding_boxes``); returns (drawn
    image, the (N,) bool mask of the detections kept)."""
    keep = pred["scores"] >= score_threshold
    labels = [lb for lb, kept in zip(pred["labels"], keep.tolist()) if kept]
    if "masks" in pred and int(keep.sum()):
        image = draw_segmentation_masks(image, pred["masks"][keep], alpha=0.4)
    scores = pred["scores"][keep].tolist()
    return draw_bounding_boxes(image, pred["boxes"][keep], [f"{lb} {s:.2f}" for lb, s in zip(labels, scores)],
                               width=2), keep


def overlay(image: torch.Tensor, label_map: torch.Tensor) -> tuple[Image.Image, Image.Image]:
    """(the label map as a palette PNG image, index = class; the image uint8 (3, H, W) blended half and half with
    the label map's colours)."""
    labels = Image.fromarray(label_map.numpy().astype(np.uint8), mode="P")
    labels.putpalette(palette())
    return labels, Image.blend(Image.fromarray(image.permute(1, 2, 0).numpy()), labels.convert("RGB"), 0.5)


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


class SegmentationWriter:
    """One label-map PNG (palette index = class) and one overlay PNG per image, written as the batches come."""

    def __init__(self, out: Path, classes: list[str], **_: Any) -> None:
        self.out, self.count = out, 0

    def add(self, paths: list[Path], images: list[torch.Tensor], preds: list[dict[str, Any]]) -> None:
        """Write one batch's label maps and overlays."""
        for path, image, p in zip(paths, images, preds):
            self.count += 1
            labels, blended = overlay(image, p["label_map"])
            labels.save(self.out / f"{self.count:05d}_{path.stem}_labels.png")
            blended.save(self.out / f"{self.count:05d}_{path.stem}_overlay.png")

    def finish(self) -> list[str]:
        """Nothing left to write; no table."""
        return []


WRITERS = {"classify": ClassificationWriter, "detect": DetectionWriter, "segment": SegmentationWriter}


def predict_files(adapter: str, inputs: list[str], output: str, batch_size: int = 16, top_k: int = 5,
                  score_threshold: float = 0.5, device: str | None = None) -> tuple[Path, list[str], list[str]]:
    """Predict every readable image of ``inputs`` with the run ``adapter``, a batch at a time (each image read
    once), and write the task's files into ``output`` (created); returns (output folder, table lines for stdout when
    there are at most 10 images, one line per skipped file).

    Raises:
        FileNotFoundError / ValueError: no adapter or input, no readable image, or an invalid option.
    """
    if batch_size < 1 or top_k < 1:
        raise ValueError(f"batch_size={batch_size} and top_k={top_k} must be positive integers")
    paths = collect(inputs)
    run = load_run(adapter, device=device)
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    writer = WRITERS[run.model.mslora_inference[0].cfg.task](out, run.classes, top_k=top_k,
                                                              score_threshold=score_threshold)
    skipped, done = [], 0
    for start in tqdm(range(0, len(paths), batch_size), desc="predict", unit="batch", disable=None, file=sys.stderr):
        good, images = [], []
        for path in paths[start:start + batch_size]:
            try:
                images.append(as_image(path))
                good.append(path)
            except ValueError as e:
                skipped.append(str(e))
        if images:
            writer.add(good, images, predict(run, images, batch_size))
            done += len(images)
    if not done:
        raise ValueError(f"no readable image among the {len(paths)} inputs")
    table = writer.finish()
    return out, table if len(table) <= 10 else [], skipped
