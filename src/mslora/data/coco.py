"""COCO-layout detection data and COCO's own evaluator (pycocotools), for detection and instance segmentation.

Layout (COCO 2017): ``ROOT/annotations/instances_{split}2017.json`` and ``ROOT/{split}2017/<file_name>``. Boxes are
COCO's [x, y, w, h] turned into [x1, y1, x2, y2]; instance masks come from polygons or RLE (``COCO.annToMask``);
crowd regions (``iscrowd=1``) are left out of the training targets (COCOeval ignores matches to them). Category
ids are mapped to contiguous labels 1..K in id order (0 is torchvision's background).
"""
from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")  # the first six of COCOeval.stats


class CocoDetection(torch.utils.data.Dataset):
    """Images and targets of one COCO split: ``(image (3, H, W) uint8, target)`` with ``target`` holding
    ``boxes`` (N, 4) xyxy float pixels, ``labels`` (N,) int64 in 1..K, ``masks`` (N, H, W) uint8, ``image_id``.

    Raises:
        FileNotFoundError: the annotation file or the image folder is missing (the message names the path).
    """

    def __init__(self, root: str | Path, split: str = "train") -> None:
        from pycocotools.coco import COCO

        root = Path(root)
        ann, self.images = root / "annotations" / f"instances_{split}2017.json", root / f"{split}2017"
        for path in (ann, self.images):
            if not path.exists():
                raise FileNotFoundError(f"COCO layout: '{path}' does not exist")
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
            self.coco = COCO(str(ann))
        self.ids = sorted(self.coco.getImgIds())
        cats = sorted(self.coco.getCatIds())
        self.label_of = {c: i + 1 for i, c in enumerate(cats)}
        self.category_of = {i + 1: c for i, c in enumerate(cats)}
        self.classes = [self.coco.loadCats(c)[0]["name"] for c in cats]

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, dict[str, Any]]:
        img_id = self.ids[i]
        info = self.coco.loadImgs(img_id)[0]
        with Image.open(self.images / info["file_name"]) as im:
            image = np.asarray(im.convert("RGB")).copy()
        anns = [a for a in self.coco.loadAnns(self.coco.getAnnIds(imgIds=img_id))
                if not a.get("iscrowd", 0) and a["bbox"][2] > 0 and a["bbox"][3] > 0]
        boxes = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)],
                             dtype=torch.float32).reshape(-1, 4)
        masks = np.stack([self.coco.annToMask(a) for a in anns]) if anns else \
            np.zeros((0, info["height"], info["width"]), np.uint8)
        target = {"boxes": boxes, "labels": torch.tensor([self.label_of[a["category_id"]] for a in anns],
                                                         dtype=torch.int64),
                  "masks": torch.from_numpy(masks), "image_id": img_id}
        return torch.from_numpy(image).permute(2, 0, 1), target


def coco_evaluate(coco_gt, detections: list[dict[str, Any]], iou_type: str = "bbox",
                  img_ids: list[int] | None = None) -> dict[str, float]:
    """COCO's evaluator (pycocotools ``COCOeval``) on ``detections`` in COCO's result format (``image_id``,
    ``category_id``, ``score``, and ``bbox`` [x, y, w, h] or ``segmentation`` RLE). Returns AP (IoU 0.50:0.95),
    AP50, AP75, APs, APm, APl as fractions, over ``img_ids`` (default every image of ``coco_gt``); None for a size
    range without objects in the split; every metric is 0.0 when there is no detection (COCOeval would fail)."""
    from pycocotools.cocoeval import COCOeval

    if not detections:
        return dict.fromkeys(METRICS, 0.0)
    with contextlib.redirect_stdout(io.StringIO()):
        dt = coco_gt.loadRes(detections)
        ev = COCOeval(coco_gt, dt, iou_type)
        if img_ids is not None:
            ev.params.imgIds = sorted(img_ids)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    # COCOeval's -1 (the split has no objects of that size) becomes None: "not measured", not an AP of 0
    return {k: float(v) if v >= 0 else None for k, v in zip(METRICS, ev.stats[:6])}
