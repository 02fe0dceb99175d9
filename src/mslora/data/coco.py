"""COCO-layout detection data and COCO's own evaluator (pycocotools), for detection and instance segmentation.

Layout (COCO 2017): ``ROOT/annotations/instances_{split}2017.json`` and ``ROOT/{split}2017/<file_name>``. Boxes are
COCO's [x, y, w, h] turned into [x1, y1, x2, y2]; instance masks come from polygons or RLE (``COCO.annToMask``);
crowd regions (``iscrowd=1``) are left out of the training targets (COCOeval ignores matches to them). Category
ids are mapped to contiguous labels 1..K in id order (0 is torchvision's background).
"""
from __future__ import annotations

import contextlib
import io
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mslora.data.images import read_rgb

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
            try:
                self.coco = COCO(str(ann))
            except Exception as e:  # not JSON, or not COCO's structure (pycocotools indexes it as it reads)
                raise ValueError(f"cannot read COCO annotations '{ann}': {type(e).__name__}: {e}") from None
        self.ids = sorted(self.coco.getImgIds())
        self.skip, self.no_masks = check_coco(self.coco, ann, self.images)
        cats = sorted(self.coco.getCatIds())
        self.label_of = {c: i + 1 for i, c in enumerate(cats)}
        self.category_of = {i + 1: c for i, c in enumerate(cats)}
        self.classes = [self.coco.loadCats(c)[0]["name"] for c in cats]

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, dict[str, Any]]:
        img_id = self.ids[i]
        info = self.coco.loadImgs(img_id)[0]
        image = read_rgb(self.images / info["file_name"])  # upright (EXIF), as the annotations were made
        anns = [a for a in self.coco.loadAnns(self.coco.getAnnIds(imgIds=img_id))
                if not a.get("iscrowd", 0) and a["id"] not in self.skip]
        boxes = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)],
                             dtype=torch.float32).reshape(-1, 4)
        target = {"boxes": boxes, "labels": torch.tensor([self.label_of[a["category_id"]] for a in anns],
                                                         dtype=torch.int64), "image_id": img_id}
        if self.no_masks is None:
            masks = np.stack([self.coco.annToMask(a) for a in anns]) if anns else \
                np.zeros((0, info["height"], info["width"]), np.uint8)
            target["masks"] = torch.from_numpy(masks)
        return image, target


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def check_coco(coco, ann_file: Path, images: Path) -> tuple[set[int], str | None]:
    """Check a COCO ground truth against its own rules and its image files, before any is used.

    Every image entry has an id, a ``file_name`` that exists and opens, and the ``width`` / ``height`` of the image
    as decoded (after its EXIF orientation); every annotation has an ``image_id`` of an image, a ``category_id`` of
    a category, a ``bbox`` of four finite numbers, and a ``segmentation`` that is polygons of at least three points
    or an RLE of the image's size. Returns (ids of annotations skipped with a warning, as COCO's convention allows:
    boxes of no area, boxes wholly outside their image; why the split has no instance masks, or None: an
    annotation without a segmentation).

    Raises:
        ValueError: the first annotation or image that breaks a rule: file, annotation id and value.
    """
    import warnings

    from mslora.data.images import check_images

    infos = [coco.imgs[i] for i in sorted(coco.imgs)]
    for info in infos:
        if not isinstance(info.get("file_name"), str) or not all(_number(info.get(k)) for k in ("width", "height")):
            raise ValueError(f"{ann_file}: image id {info.get('id')} needs file_name, width and height; got {info}")
    sizes = check_images([images / info["file_name"] for info in infos], f"images of '{ann_file.name}'")
    for info, (w, h) in zip(infos, sizes):
        if (w, h) != (info["width"], info["height"]):
            raise ValueError(f"image '{images / info['file_name']}' is {w}x{h} as decoded (EXIF orientation applied) "
                             f"but {ann_file} says {info['width']}x{info['height']} (image id {info['id']}): its "
                             "boxes and masks would not sit on it")
    cats, skip, empty, outside, no_masks = set(coco.cats), set(), 0, 0, None
    for a in coco.dataset.get("annotations", []):
        where = f"{ann_file}: annotation id {a.get('id')}"
        info = coco.imgs.get(a.get("image_id"))
        if info is None:
            raise ValueError(f"{where}: image_id {a.get('image_id')!r} is not an image of the file")
        if a.get("category_id") not in cats:
            raise ValueError(f"{where}: category_id {a.get('category_id')!r} is not one of the categories "
                             f"({', '.join(map(str, sorted(cats)[:10]))}{', ...' if len(cats) > 10 else ''})")
        box = a.get("bbox")
        if not (isinstance(box, list) and len(box) == 4 and all(map(_number, box))):
            raise ValueError(f"{where}: bbox {box!r} is not [x, y, width, height] of four numbers")
        seg = a.get("segmentation")
        if isinstance(seg, list) and seg:
            for poly in seg:
                if not (isinstance(poly, list) and len(poly) >= 6 and len(poly) % 2 == 0 and all(map(_number, poly))):
                    raise ValueError(f"{where}: polygon {str(poly)[:60]} is not x, y pairs of at least 3 points")
        elif isinstance(seg, dict):
            if list(seg.get("size", [])) != [info["height"], info["width"]] or "counts" not in seg:
                raise ValueError(f"{where}: RLE segmentation of size {seg.get('size')} on an image of "
                                 f"{info['height']}x{info['width']} (height, width), or without counts")
        elif not a.get("iscrowd", 0) and no_masks is None:
            no_masks = f"{where} has no segmentation"
        x, y, w, h = box
        if w <= 0 or h <= 0:
            skip.add(a["id"])
            empty += 1
        elif x >= info["width"] or y >= info["height"] or x + w <= 0 or y + h <= 0:
            skip.add(a["id"])
            outside += 1
    if empty or outside:
        warnings.warn(f"{ann_file}: {empty} boxes of no area and {outside} boxes wholly outside their image left out "
                      "of the training targets", stacklevel=3)
    return skip, no_masks


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
