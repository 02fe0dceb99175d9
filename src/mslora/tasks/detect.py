"""The ``detect`` task (object detection and instance segmentation) and its detectors on an (adapted) timm
backbone, from torchvision's detection parts: Faster R-CNN, Mask R-CNN, Cascade Mask R-CNN, RetinaNet and FCOS, each
with a feature pyramid network over :class:`mslora.backbones.Features`.

- Faster / Mask R-CNN (Ren et al., NeurIPS 2015; He et al., ICCV 2017): FPN levels at the backbone's strides plus
  a max-pooled level (torchvision's ``LastLevelMaxPool``), as torchvision's ``*_resnet50_fpn`` builds them.
- Cascade Mask R-CNN (Cai & Vasconcelos, CVPR 2018 and TPAMI 2019; the MSLoRA paper's COCO detector, Sec. 4.5):
  Mask R-CNN whose box branch is three stages (:class:`CascadeRoIHeads`); no installable framework has it here
  (mmdet 3.x needs an mmcv without a build for this torch; detectron2 is not on PyPI).
- RetinaNet (Lin et al., ICCV 2017; the MSLoRA paper's VOC detector, Sec. 4.5) and FCOS (Tian et al., ICCV 2019):
  FPN levels from stride 8 on plus P6 and P7 (``LastLevelP6P7``), as torchvision builds them.
Anchor sizes follow the levels: ``anchor_scale`` x stride (torchvision's defaults are 8 x stride: 32 ... 512 px),
three octave scales per level for RetinaNet. Images are normalised with the backbone's own mean and std
(timm ``pretrained_cfg``) and resized by torchvision's ``GeneralizedRCNNTransform`` between ``min_size`` and
``max_size``. The backbone's BatchNorm layers stay frozen (``mslora.adapt``); the FPN and the heads train.

Metrics: COCO's evaluator's box AP (``bbox_AP``, ``bbox_AP50``, ``bbox_AP75``, ``bbox_APs/m/l``) and, for the
detectors that predict masks (:data:`MASK_DETECTORS`), mask AP (``segm_AP``, ...), as fractions.
"""
from __future__ import annotations

import copy
from collections import OrderedDict
from typing import Any, Callable

import numpy as np
import torch
from pycocotools import mask as mask_utils
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection import FCOS, FasterRCNN, MaskRCNN, RetinaNet
from torchvision.models.detection._utils import BoxCoder, Matcher
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.roi_heads import RoIHeads, maskrcnn_inference, maskrcnn_loss
from torchvision.ops import FeaturePyramidNetwork, MultiScaleRoIAlign, box_convert, clip_boxes_to_image
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool, LastLevelP6P7
from tqdm import tqdm

from mslora.backbones import Features
from mslora.data.coco import coco_evaluate
from mslora.data.dense import DenseData, detection_collate, load_dense
from mslora.data.transforms import detection_transform
from mslora.registry import register_task
from mslora.tasks.base import DenseTask

DETECTORS = ("fasterrcnn", "maskrcnn", "cascade_maskrcnn", "retinanet", "fcos")
MASK_DETECTORS = ("maskrcnn", "cascade_maskrcnn")  # the detectors that predict instance masks


class FPNBackbone(nn.Module):
    """:class:`~mslora.backbones.Features` of a timm model (maps at stride ``min_stride`` or more) and a torchvision
    ``FeaturePyramidNetwork`` with an extra level: ``LastLevelMaxPool`` (``extra='pool'``) or P6/P7 from the last
    FPN map (``extra='p6p7'``). ``out_channels`` is the attribute torchvision's detectors read.

    Shapes: images (B, 3, H, W) -> OrderedDict of (B, out_channels, H / s, W / s) per level.

    Raises:
        ValueError: no feature map at ``min_stride`` or more, or an unknown ``extra``.
    """

    def __init__(self, model: nn.Module, out_channels: int = 256, extra: str = "pool", min_stride: int = 4) -> None:
        super().__init__()
        self.body = Features(model)
        keep = [i for i, s in enumerate(self.body.strides) if s >= min_stride]
        if not keep:
            raise ValueError(f"the backbone has no feature map at stride {min_stride} or more "
                             f"(strides {self.body.strides})")
        if extra not in ("pool", "p6p7"):
            raise ValueError(f"extra='{extra}' is not one of pool, p6p7")
        self.keep = [str(i) for i in keep]
        strides = [self.body.strides[i] for i in keep]
        blocks = LastLevelMaxPool() if extra == "pool" else LastLevelP6P7(out_channels, out_channels)
        self.fpn = FeaturePyramidNetwork([self.body.channels[i] for i in keep], out_channels, extra_blocks=blocks)
        self.out_channels = out_channels
        self.strides = strides + ([strides[-1] * 2] if extra == "pool" else [strides[-1] * 2, strides[-1] * 4])

    def forward(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        """Images (B, 3, H, W) -> the FPN's maps, name -> (B, out_channels, H / s, W / s)."""
        maps = self.body(x)
        return self.fpn({k: maps[k] for k in self.keep})


MMDET_CASCADE_STDS = ((0.1, 0.1, 0.2, 0.2), (0.05, 0.05, 0.1, 0.1), (0.033, 0.033, 0.067, 0.067))  # target_stds


def _fresh(module: nn.Module) -> nn.Module:
    """A copy of a torchvision mask head or predictor with its own draw of torchvision's init (kaiming normal,
    fan_out, ReLU; biases 0), as mmdet initialises each stage's head on its own."""
    out = copy.deepcopy(module)
    for m in out.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return out


class CascadeRoIHeads(RoIHeads):
    """Cascade Mask R-CNN's RoI heads as mmdetection's ``CascadeRoIHead`` runs them
    (``cascade-mask-rcnn_r50_fpn``, the config Mona's code trains), from torchvision's RoIHeads parts.

    Three stages (Cai & Vasconcelos, "Cascade R-CNN", CVPR 2018, Sec. 4 and Fig. 3d; TPAMI 2019 Sec. 5 for
    the masks), each a two-layer MLP box head (``representation`` wide) with a classifier and a class-agnostic box
    regressor, and a mask head (torchvision's Mask R-CNN head, four 3x3 convs, a deconv and a 1x1 predictor, as
    mmdet's ``FCNMaskHead``). Training: stage t samples its RoIs with IoU threshold ``ious[t]`` (0.5 / 0.6 / 0.7)
    from its proposals plus the ground-truth boxes (mmdet's ``add_gt_as_proposals``); its targets are encoded with
    mmdet's ``target_stds`` ``stds[t]`` (0.1/0.2, 0.05/0.1, 0.033/0.067 exactly: box-coder weights 1/std); its
    box losses (cross-entropy; smooth L1 with beta 1 over the sampled RoIs) and its mask loss (on its positive RoIs)
    weigh ``stage_weights[t]`` (1, 0.5, 0.25). The next stage's proposals are this stage's regressed boxes of the
    sampled RoIs that were not ground-truth boxes (mmdet ``refine_bboxes`` drops ``pos_is_gts``), without gradient.
    Test: the class scores are the softmax of the mean of the three stages' logits (mmdet ``predict_bbox``: the
    ``cls_score`` s averaged, then ``predict_by_feat``'s softmax), the boxes those the last stage regresses; each
    stage's mask head predicts on the final detections and the masks are the mean of their sigmoids (mmdet
    ``merge_aug_masks``). Losses are named ``loss_classifier_s{t}``, ``loss_box_reg_s{t}`` and ``loss_mask_s{t}``
    (already weighted).

    Built from a torchvision Mask R-CNN's ``roi_heads`` (its pools, sampler, mask head and test thresholds); the
    other stages' mask heads are fresh draws of the same init.
    """

    def __init__(self, base: RoIHeads, in_channels: int, num_classes: int, representation: int = 1024,
                 ious: tuple[float, ...] = (0.5, 0.6, 0.7),
                 stds: tuple[tuple[float, ...], ...] = MMDET_CASCADE_STDS,
                 stage_weights: tuple[float, ...] = (1.0, 0.5, 0.25)) -> None:
        nn.Module.__init__(self)
        self.__dict__.update({k: v for k, v in vars(base).items() if not k.startswith("_")})  # thresholds, sampler
        self._modules.update(base._modules)
        n = len(ious)
        if not len(stds) == len(stage_weights) == n:
            raise ValueError(f"ious, stds and stage_weights must have one entry per stage; got "
                             f"{len(ious)}, {len(stds)}, {len(stage_weights)}")
        size = base.box_roi_pool.output_size
        size = size[0] * size[1] if isinstance(size, (tuple, list)) else size ** 2
        self.box_heads = nn.ModuleList(TwoMLPHead(in_channels * size, representation) for _ in range(n))
        self.box_predictors = nn.ModuleList(nn.ModuleDict({"cls_score": nn.Linear(representation, num_classes),
                                                           "bbox_pred": nn.Linear(representation, 4)})
                                            for _ in range(n))
        del self.box_head, self.box_predictor
        if base.has_mask():
            self.mask_heads = nn.ModuleList([base.mask_head] + [_fresh(base.mask_head) for _ in range(n - 1)])
            self.mask_predictors = nn.ModuleList([base.mask_predictor] +
                                                 [_fresh(base.mask_predictor) for _ in range(n - 1)])
            del self.mask_head, self.mask_predictor
        self.matchers = [Matcher(t, t, allow_low_quality_matches=False) for t in ious]
        self.coders = [BoxCoder(tuple(1.0 / v for v in std)) for std in stds]
        self.stage_weights = stage_weights

    def has_mask(self) -> bool:
        """Whether the heads predict masks (a mask head per stage)."""
        return getattr(self, "mask_roi_pool", None) is not None and hasattr(self, "mask_heads")

    def subsample(self, labels):
        """torchvision's sampling, its indices kept to tell the ground-truth proposals apart (see :meth:`forward`)."""
        self.sampled = super().subsample(labels)
        return self.sampled

    def _masks(self, t: int, features, rois, image_shapes) -> torch.Tensor:
        """Stage ``t``'s mask logits (sum K_i, classes, 28, 28) for the RoIs (per image (K_i, 4))."""
        return self.mask_predictors[t](self.mask_heads[t](self.mask_roi_pool(features, rois, image_shapes)))

    def forward(self, features, proposals, image_shapes, targets=None):
        """torchvision's ``RoIHeads.forward`` contract: ``features`` the FPN's maps (name -> (B, C, H_l, W_l)),
        ``proposals`` the RPN's boxes per image ((N_i, 4) xyxy pixels of the resized image), ``image_shapes`` the
        resized (H, W) per image, ``targets`` (training) boxes / labels / masks per image. Returns (detections,
        losses): in eval mode one dict per image with ``boxes`` (K, 4), ``labels`` (K,), ``scores`` (K,) and
        ``masks`` (K, 1, 28, 28) probabilities; in train mode the weighted stage losses."""
        losses, stage_logits = {}, []
        for t, (head, pred) in enumerate(zip(self.box_heads, self.box_predictors)):
            self.proposal_matcher, self.box_coder = self.matchers[t], self.coders[t]
            w = self.stage_weights[t]
            if self.training:
                given = [len(p) for p in proposals]  # the ground-truth boxes are appended after these
                proposals, matched, labels, reg_targets = self.select_training_samples(proposals, targets)
                from_gt = [i >= g for i, g in zip(self.sampled, given)]
            x = head(self.box_roi_pool(features, proposals, image_shapes))
            logits, deltas = pred["cls_score"](x), pred["bbox_pred"](x)
            if self.training:
                lab, reg = torch.cat(labels), torch.cat(reg_targets)
                pos = lab > 0
                losses[f"loss_classifier_s{t + 1}"] = w * F.cross_entropy(logits, lab)
                losses[f"loss_box_reg_s{t + 1}"] = w * F.smooth_l1_loss(
                    deltas[pos], reg[pos], beta=1.0, reduction="sum") / max(lab.numel(), 1)
                if self.has_mask():
                    keep = [torch.where(lb > 0)[0] for lb in labels]
                    rois = [p[k] for p, k in zip(proposals, keep)]
                    losses[f"loss_mask_s{t + 1}"] = w * maskrcnn_loss(
                        self._masks(t, features, rois, image_shapes), rois, [g["masks"] for g in targets],
                        [g["labels"] for g in targets], [m[k] for m, k in zip(matched, keep)])
            else:
                stage_logits.append(logits)
            if t < len(self.box_heads) - 1:  # the next stage starts from this one's boxes (no gradient through them)
                boxes = self.box_coder.decode(deltas.detach(), proposals).reshape(-1, 4)
                proposals = [clip_boxes_to_image(b, s) for b, s in zip(boxes.split([len(p) for p in proposals]),
                                                                        image_shapes)]
                if self.training:  # mmdet refine_bboxes: the refined ground-truth RoIs are not carried on
                    proposals = [p[~g] for p, g in zip(proposals, from_gt)]
        if self.training:
            return [], losses
        mean = torch.stack(stage_logits).mean(0)  # postprocess_detections applies the softmax
        boxes, sc, lb = self.postprocess_detections(mean, deltas.repeat(1, mean.shape[-1]), proposals, image_shapes)
        result = [{"boxes": b, "labels": c, "scores": s} for b, c, s in zip(boxes, lb, sc)]
        if self.has_mask():
            rois, labels = [r["boxes"] for r in result], [r["labels"] for r in result]
            stages = [maskrcnn_inference(self._masks(t, features, rois, image_shapes), labels)
                      for t in range(len(self.mask_heads))]  # per stage, per image: sigmoid (K, 1, 28, 28)
            for i, r in enumerate(result):
                r["masks"] = torch.stack([s[i] for s in stages]).mean(0)
        return result, losses


def build_detector(model: nn.Module, detector: str, num_classes: int, min_size: int = 800, max_size: int = 1333,
                   anchor_scale: int = 8, channels: int = 256, representation: int = 1024, **kwargs) -> nn.Module:
    """A torchvision detector over the (adapted) timm ``model``.

    Args:
        model: a timm model, adapted or not (the classifier is not used).
        detector: one of :data:`DETECTORS`.
        num_classes: object classes, background not counted (torchvision's R-CNNs get ``num_classes + 1``).
        min_size, max_size: torchvision's resize bounds for the shorter and longer image side, in pixels.
        anchor_scale: anchor size in units of the level's stride.
        channels: width of the FPN levels, of the dense heads' convolutions (RetinaNet, FCOS) and of the mask
            head (torchvision's default 256).
        representation: width of the R-CNN box heads' two fully connected layers (torchvision's default 1024).
        **kwargs: passed to the torchvision detector (e.g. ``box_detections_per_img``).

    Returns:
        The detector: ``model(images, targets)`` gives a loss dict in train mode, detections in eval mode.

    Raises:
        ValueError: an unknown detector, or a backbone without timm's feature API.
    """
    if detector not in DETECTORS:
        raise ValueError(f"detector='{detector}' is not one of {', '.join(DETECTORS)}")
    cfg = getattr(model, "pretrained_cfg", None) or {}
    norm = dict(image_mean=list(cfg.get("mean", (0.485, 0.456, 0.406))),
                image_std=list(cfg.get("std", (0.229, 0.224, 0.225))), min_size=min_size, max_size=max_size)
    if detector in ("fasterrcnn", "maskrcnn", "cascade_maskrcnn"):
        backbone = FPNBackbone(model, channels, extra="pool")
        levels = backbone.keep
        anchors = AnchorGenerator(tuple((anchor_scale * s,) for s in backbone.strides),
                                  ((0.5, 1.0, 2.0),) * len(backbone.strides))
        box = dict(box_roi_pool=MultiScaleRoIAlign(levels, output_size=7, sampling_ratio=2),
                   box_head=TwoMLPHead(channels * 7 * 7, representation),
                   box_predictor=FastRCNNPredictor(representation, num_classes + 1))
        if detector not in MASK_DETECTORS:
            return FasterRCNN(backbone, None, rpn_anchor_generator=anchors, **box, **norm, **kwargs)
        det = MaskRCNN(backbone, None, rpn_anchor_generator=anchors, **box, **norm,
                       mask_roi_pool=MultiScaleRoIAlign(levels, output_size=14, sampling_ratio=2),
                       mask_head=MaskRCNNHeads(channels, (channels,) * 4, 1),
                       mask_predictor=MaskRCNNPredictor(channels, channels, num_classes + 1), **kwargs)
        if detector == "cascade_maskrcnn":
            det.roi_heads = CascadeRoIHeads(det.roi_heads, channels, num_classes + 1, representation)
        return det
    backbone = FPNBackbone(model, channels, extra="p6p7", min_stride=8)
    if detector == "retinanet":
        sizes = tuple(tuple(round(anchor_scale / 2 * s * 2 ** (k / 3)) for k in range(3)) for s in backbone.strides)
        anchors = AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * len(sizes))
        return RetinaNet(backbone, num_classes, anchor_generator=anchors, **norm, **kwargs)
    anchors = AnchorGenerator(tuple((s,) for s in backbone.strides), ((1.0,),) * len(backbone.strides))
    return FCOS(backbone, num_classes, anchor_generator=anchors, **norm, **kwargs)


@register_task("detect")
class Detection(DenseTask):
    """Object detection and instance segmentation with ``cfg.detector`` (:data:`DETECTORS`) over
    the adapted ``cfg.backbone``; images resized by the detector to a shorter side of ``cfg.img_size`` (longer side
    at most 1333/800 of it, torchvision's ratio). Best epoch by validation box AP.

    Raises (on construction):
        ValueError / FileNotFoundError: bad method option, backbone, detector or data (nothing written yet).
    """

    best_metric = "bbox_AP"
    collate_fn = staticmethod(detection_collate)

    def __init__(self, cfg, data: str | None = None, classes: list[str] | None = None) -> None:
        if cfg.detector not in DETECTORS:
            raise ValueError(f"detector='{cfg.detector}' is not one of {', '.join(DETECTORS)}")
        super().__init__(cfg, data, classes)
        if cfg.detector in MASK_DETECTORS and self.data is not None and self.data.no_masks:
            raise ValueError(f"detector='{cfg.detector}' needs instance masks, but {self.data.no_masks}: use "
                             "fasterrcnn, retinanet or fcos")

    def load_data(self, data: str) -> DenseData:
        """The detection data at ``data`` (:func:`mslora.data.dense.load_dense`)."""
        return load_dense(data, "detect", self.cfg.split_seed)

    def wrap(self, backbone: nn.Module) -> nn.Module:
        """``cfg.detector`` around the adapted backbone (:func:`build_detector`)."""
        c = self.cfg.head_channels
        rcnn = {"box_batch_size_per_image": self.cfg.rois_per_image} if self.cfg.detector.endswith("rcnn") else {}
        return build_detector(backbone, self.cfg.detector, self.num_classes, min_size=self.cfg.img_size,
                              max_size=round(self.cfg.img_size * 1333 / 800), anchor_scale=self.cfg.anchor_scale,
                              channels=c, representation=4 * c, **rcnn)

    def set_transforms(self, model: nn.Module) -> None:
        """A horizontal flip in training; the detector resizes and normalises (its shorter side ``img_size``)."""
        self.preprocessing = {"img_size": self.cfg.img_size}
        self.data.with_transforms(detection_transform(True), detection_transform(False))

    def input_transform(self, preprocessing: dict[str, Any]) -> Callable[[torch.Tensor], torch.Tensor]:
        """uint8 (3, H, W) -> float in [0, 1]; the detector resizes and normalises it itself."""
        joint = detection_transform(False)
        return lambda image: joint(image, {})[0]

    @torch.no_grad()
    def predict(self, model: nn.Module, images: list[torch.Tensor], sizes: list[tuple[int, int]]
                ) -> list[dict[str, Any]]:
        """Per image, in its pixel coordinates: ``boxes`` (N, 4) xyxy float, ``labels`` (class names), ``scores``
        (N,) and, for mask detectors, ``masks`` (N, H, W) bool (probability > 0.5)."""
        out = []
        for det in model(list(images)):
            one = {"boxes": det["boxes"].float().cpu(), "labels": [self.classes[int(c) - 1] for c in det["labels"]],
                   "scores": det["scores"].float().cpu()}
            if "masks" in det:
                one["masks"] = det["masks"][:, 0].cpu() > 0.5
            out.append(one)
        return out

    def losses(self, model: nn.Module, batch: Any) -> tuple[dict[str, torch.Tensor], int]:
        """The detector's loss dict on a batch: a list of images (3, H_i, W_i) float in [0, 1] and a list of
        targets (``boxes`` (N_i, 4) xyxy pixels, ``labels`` (N_i,) in 1..K, ``masks`` (N_i, H_i, W_i) for mask
        detectors); also the number of images."""
        images, targets = batch
        return model(images, targets), len(images)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader: Any, gather: Callable[[Any], Any], desc: str = "eval") -> dict[str, float]:
        """COCO's evaluator on the split: box AP (and mask AP when the detector predicts masks), as fractions."""
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
        if self.cfg.detector in MASK_DETECTORS:
            metrics.update({f"segm_{k}": v for k, v in coco_evaluate(gt, segms, "segm", ids).items()})
        return {**metrics, "images": n}
