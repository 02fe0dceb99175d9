"""Dense tasks: ``detect`` (object detection and instance segmentation) and ``segment`` (semantic segmentation).

The backbone is the timm model adapted exactly as in classification (its classifier removed); the detector
(:func:`mslora.detection.build_detector`) or UPerNet (:class:`mslora.segmentation.UPerNet`) is built around it and
trains whole: the neck (FPN, ViTDet's simple pyramid) and the heads are trainable, the backbone keeps its BatchNorm
statistics frozen under every method (``full`` included, as detectors do), and the adapter file holds the adapter,
the neck and the heads (``count_parameters`` reports neck + heads as ``head_params``). ``mslora eval`` rebuilds the
whole model from that file.

Metrics: detection reports COCO's evaluator's box AP (``bbox_AP``, ``bbox_AP50``, ``bbox_AP75``, ``bbox_APs/m/l``)
and, with masks, mask AP (``segm_AP``, ...), as fractions; segmentation reports ``mIoU``, ``mAcc``, ``aAcc``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np
import timm
import torch
import torch.nn.functional as F
from timm.data import resolve_model_data_config
from torch import nn
from torchvision.ops import box_convert
from tqdm import tqdm

import mslora
from mslora.backbones import check_backbone_name, create_backbone
from mslora.core.inject import _keep_eval
from mslora.core.state import Adaptation, adaptation, load_adapter_state, read_adapter
from mslora.data.coco import coco_evaluate
from mslora.data.dense import (detection_collate, detection_transform, load_dense, segmentation_collate,
                               segmentation_transform)
from mslora.detection import DETECTORS, build_detector
from mslora.registry import get_method
from mslora.segmentation import UPerNet, confusion_matrix, segmentation_metrics
from mslora.tasks import Task, register_task


def dense_backbone(cfg) -> nn.Module:
    """The timm backbone of a dense task, without its classifier, taking images of any size: models with a fixed
    input size are built for ``cfg.img_size`` and with timm's ``dynamic_img_size=True`` (ViT family) or
    ``strict_img_size=False`` (Swin), whichever the model accepts.

    Raises:
        ValueError: unknown backbone or weights that do not fit (see :func:`mslora.backbones.create_backbone`).
    """
    check_backbone_name(cfg.backbone)
    pcfg = timm.models.get_pretrained_cfg(cfg.backbone)
    base = dict(drop_path_rate=cfg.drop_path_rate)
    tries = [{}]
    if pcfg is not None and pcfg.fixed_input_size:
        base["img_size"] = cfg.img_size
        tries = [{"dynamic_img_size": True}, {"strict_img_size": False}, {}]
    for extra in tries:
        try:
            model = create_backbone(cfg.backbone, 1000, cfg.pretrained, cfg.weights, **base, **extra)
            break
        except TypeError as e:  # the model does not take this keyword: try the next way
            if extra is tries[-1] or "unexpected keyword" not in str(e):
                raise
    model.reset_classifier(0)
    return model


def lift_adaptation(outer: nn.Module, inner: nn.Module) -> nn.Module:
    """Record ``inner``'s adaptation on ``outer`` (a detector or segmenter holding it), with names as seen from
    ``outer`` and everything outside ``inner`` counted as the head (neck and heads), so that
    :func:`mslora.count_parameters`, :func:`mslora.save_adapter` and the engine treat the whole model; returns
    ``outer``. Merging and unadapting stay with ``inner``.

    Raises:
        ValueError: ``inner`` is not adapted or not inside ``outer``.
    """
    rec = adaptation(inner)
    prefix = next((n for n, m in outer.named_modules() if m is inner), None)
    if rec is None or not prefix:
        raise ValueError("lift_adaptation needs an adapted model inside the outer one")
    head = tuple(n for n, m in outer.named_modules() if n and not (n == prefix or n.startswith(prefix + ".")
                                                                  or prefix.startswith(n + "."))
                 and list(m.parameters(recurse=False)))
    outer.mslora_adaptation = Adaptation(rec.method, rec.config, frozenset(f"{prefix}.{n}" for n in rec.added), head)
    return outer


class _Dense(Task):
    kind = ""

    def __init__(self, cfg, data: str | None = None) -> None:
        get_method(cfg.method).make_config(**cfg.method_options)  # fail on bad options before loading anything
        check_backbone_name(cfg.backbone)
        self.cfg = cfg
        self.data = load_dense(data or cfg.data, self.kind, cfg.split_seed)
        self.datasets = {"train": self.data.train, "val": self.data.val, "test": self.data.test}

    def _head(self, model: nn.Module) -> nn.Module:
        raise NotImplementedError

    def build_model(self, adapter: str | Path | None = None) -> nn.Module:
        """The adapted backbone inside the task's model; with ``adapter``, rebuilt and loaded from that file
        (adapter, neck and heads)."""
        model = dense_backbone(self.cfg)
        if adapter is None:
            method, options = self.cfg.method, self.cfg.method_options
        else:
            tensors, meta = read_adapter(adapter)
            method, options = meta["method"], meta["config"]
        mslora.adapt(model, method, **options)
        if not get_method(method).freeze_backbone:  # full fine-tuning: BatchNorm statistics stay frozen here too
            for m in model.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.register_forward_pre_hook(_keep_eval)
        outer = lift_adaptation(self._head(model), model)
        if adapter is not None:
            load_adapter_state(outer, tensors)
        return outer

    def metadata(self) -> dict[str, Any]:
        """Number of classes, class names, dataset name and layout."""
        return {"num_classes": self.data.num_classes, "classes": self.data.classes, "dataset": self.data.name,
                "layout": self.data.layout}


@register_task("detect")
class Detection(_Dense):
    """Object detection and instance segmentation with ``cfg.detector`` (:data:`mslora.detection.DETECTORS`) over
    the adapted ``cfg.backbone``; images resized by the detector to a shorter side of ``cfg.img_size`` (longer side
    at most 1333/800 of it, torchvision's ratio). Best epoch by validation box AP.

    Raises (on construction):
        ValueError / FileNotFoundError: bad method option, backbone, detector or data (nothing written yet).
    """

    kind = "detect"
    best_metric = "bbox_AP"
    collate_fn = staticmethod(detection_collate)

    def __init__(self, cfg, data: str | None = None) -> None:
        if cfg.detector not in DETECTORS:
            raise ValueError(f"detector='{cfg.detector}' is not one of {', '.join(DETECTORS)}")
        super().__init__(cfg, data)
        if cfg.detector in ("maskrcnn", "cascade_maskrcnn") and self.data.layout == "voc":
            raise ValueError(f"detector='{cfg.detector}' needs instance masks; the VOC detection layout has boxes "
                             "only: use fasterrcnn, retinanet or fcos")

    def _head(self, model: nn.Module) -> nn.Module:
        c = self.cfg.head_channels
        rcnn = {"box_batch_size_per_image": self.cfg.rois_per_image} if self.cfg.detector.endswith("rcnn") else {}
        return build_detector(model, self.cfg.detector, self.data.num_classes, min_size=self.cfg.img_size,
                              max_size=round(self.cfg.img_size * 1333 / 800), anchor_scale=self.cfg.anchor_scale,
                              channels=c, representation=4 * c, **rcnn)

    def set_transforms(self, model: nn.Module) -> None:
        """A horizontal flip in training; the detector resizes and normalises."""
        self.data.with_transforms(detection_transform(True), detection_transform(False))

    def losses(self, model: nn.Module, batch: Any) -> tuple[dict[str, torch.Tensor], int]:
        """The detector's loss dict on a batch (list of images, list of targets)."""
        images, targets = batch
        return model(images, targets), len(images)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader: Any, gather: Callable[[Any], Any], desc: str = "eval") -> dict[str, float]:
        """COCO's evaluator on the split: box AP (and mask AP when the detector predicts masks), as fractions."""
        from pycocotools import mask as mask_utils

        model.eval()
        split = next(s for s, d in self.datasets.items() if d is loader.dataset)
        gt, category_of, ids = self.data.coco[split]
        boxes, segms, n = [], [], 0
        for images, targets in tqdm(loader, desc=desc, leave=False, unit="batch", disable=None):
            per_image = []
            for out, t in zip(model(images), targets):
                b = box_convert(out["boxes"].float().cpu(), "xyxy", "xywh")  # COCO's [x, y, w, h], a new tensor
                cats = [category_of[int(c)] for c in out["labels"]]
                dets = [{"image_id": t["image_id"], "category_id": c, "bbox": [round(float(v), 2) for v in box],
                         "score": float(s)} for c, box, s in zip(cats, b, out["scores"])]
                masks = []
                if "masks" in out:
                    binary = (out["masks"][:, 0] > 0.5).cpu().numpy().astype(np.uint8)
                    for d, m in zip(dets, binary):
                        rle = mask_utils.encode(np.asfortranarray(m))
                        masks.append({**d, "segmentation": {"size": rle["size"], "counts": rle["counts"].decode()}})
                per_image.append((dets, masks))
            for dets, masks in gather(per_image):
                boxes += dets
                segms += masks
                n += 1
        metrics = {f"bbox_{k}": v for k, v in coco_evaluate(gt, boxes, "bbox", ids).items()}
        if self.cfg.detector in ("maskrcnn", "cascade_maskrcnn"):
            metrics.update({f"segm_{k}": v for k, v in coco_evaluate(gt, segms, "segm", ids).items()})
        return {**metrics, "images": n}


@register_task("segment")
class Segmentation(_Dense):
    """Semantic segmentation with UPerNet (+ auxiliary FCN head, weight 0.4) over the adapted ``cfg.backbone``;
    training crops of ``cfg.img_size`` pixels, evaluation at a shorter side of ``cfg.img_size`` with the logits
    resized to each label map's own size. Best epoch by validation mIoU.

    Raises (on construction):
        ValueError / FileNotFoundError: bad method option, backbone or data (nothing written yet).
    """

    kind = "segment"
    best_metric = "mIoU"
    collate_fn = staticmethod(segmentation_collate)

    def _head(self, model: nn.Module) -> nn.Module:
        return UPerNet(model, self.data.num_classes, channels=self.cfg.head_channels)

    def set_transforms(self, model: nn.Module) -> None:
        """mmseg's training pipeline (random scale 0.5-2, crop, flip) and a resize for evaluation, with the
        backbone's normalisation."""
        inner = model.backbone.model if hasattr(model, "backbone") else model
        dc = resolve_model_data_config(inner)
        self.data.with_transforms(segmentation_transform(True, self.cfg.img_size, dc["mean"], dc["std"]),
                                  segmentation_transform(False, self.cfg.img_size, dc["mean"], dc["std"]))

    def losses(self, model: nn.Module, batch: Any) -> tuple[dict[str, torch.Tensor], int]:
        """UPerNet's loss dict (``loss_seg``, ``loss_aux``) on a batch (images, labels, _)."""
        x, y, _ = batch
        return model(x, y), len(x)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader: Any, gather: Callable[[Any], Any], desc: str = "eval") -> dict[str, float]:
        """mIoU, mean accuracy and pixel accuracy (fractions) over the split's original label maps."""
        model.eval()
        k = self.data.num_classes
        total, n = torch.zeros(k, k, dtype=torch.long), 0
        for x, y, sizes in tqdm(loader, desc=desc, leave=False, unit="batch", disable=None):
            logits = model(x).float()
            cms = []
            for i in range(len(x)):
                lg = logits[i:i + 1] if sizes is None else logits[i:i + 1, :, :sizes[i][0], :sizes[i][1]]
                label = y[i]
                if lg.shape[-2:] != label.shape[-2:]:
                    lg = F.interpolate(lg, label.shape[-2:], mode="bilinear", align_corners=False)
                cms.append(confusion_matrix(lg.argmax(1)[0].cpu(), label.cpu(), k))
            cms = gather(torch.stack(cms).to(logits.device))
            total += cms.sum(0).cpu()
            n += len(cms)
        return {**segmentation_metrics(total), "images": n}


__all__ = ["Detection", "Segmentation", "dense_backbone", "lift_adaptation"]
