"""Detectors on an (adapted) timm backbone from torchvision's detection parts: Faster R-CNN, Mask R-CNN, RetinaNet
and FCOS, each with a feature pyramid network over :class:`mslora.features.Features`.

- Faster / Mask R-CNN (Ren et al., NeurIPS 2015; He et al., ICCV 2017): FPN levels at the backbone's strides plus
  a max-pooled level (torchvision's ``LastLevelMaxPool``), as torchvision's ``*_resnet50_fpn`` builds them.
- RetinaNet (Lin et al., ICCV 2017; the MSLoRA paper's VOC detector, Sec. 4.5) and FCOS (Tian et al., ICCV 2019):
  FPN levels from stride 8 on plus P6 and P7 (``LastLevelP6P7``), as torchvision builds them.
Anchor sizes follow the levels: ``anchor_scale`` x stride (torchvision's defaults are 8 x stride: 32 ... 512 px),
three octave scales per level for RetinaNet. Images are normalised with the backbone's own mean and std
(timm ``pretrained_cfg``) and resized by torchvision's ``GeneralizedRCNNTransform`` between ``min_size`` and
``max_size``. The backbone's BatchNorm layers stay frozen (``mslora.adapt``); the FPN and the heads train.
"""
from __future__ import annotations

from torch import nn
from torchvision.models.detection import FCOS, FasterRCNN, MaskRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.ops import FeaturePyramidNetwork, MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool, LastLevelP6P7

from mslora.features import Features

DETECTORS = ("fasterrcnn", "maskrcnn", "retinanet", "fcos")


class FPNBackbone(nn.Module):
    """:class:`~mslora.features.Features` of a timm model (maps at stride ``min_stride`` or more) and a torchvision
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

    def forward(self, x):
        maps = self.body(x)
        return self.fpn({k: maps[k] for k in self.keep})


def build_detector(model: nn.Module, detector: str, num_classes: int, min_size: int = 800, max_size: int = 1333,
                   anchor_scale: int = 8, **kwargs) -> nn.Module:
    """A torchvision detector over the (adapted) timm ``model``.

    Args:
        model: a timm model, adapted or not (the classifier is not used).
        detector: one of :data:`DETECTORS`.
        num_classes: object classes, background not counted (torchvision's R-CNNs get ``num_classes + 1``).
        min_size, max_size: torchvision's resize bounds for the shorter and longer image side, in pixels.
        anchor_scale: anchor size in units of the level's stride.
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
    if detector in ("fasterrcnn", "maskrcnn"):
        backbone = FPNBackbone(model, extra="pool")
        levels = backbone.keep
        anchors = AnchorGenerator(tuple((anchor_scale * s,) for s in backbone.strides),
                                  ((0.5, 1.0, 2.0),) * len(backbone.strides))
        box_pool = MultiScaleRoIAlign(levels, output_size=7, sampling_ratio=2)
        if detector == "fasterrcnn":
            return FasterRCNN(backbone, num_classes + 1, rpn_anchor_generator=anchors, box_roi_pool=box_pool,
                              **norm, **kwargs)
        mask_pool = MultiScaleRoIAlign(levels, output_size=14, sampling_ratio=2)
        return MaskRCNN(backbone, num_classes + 1, rpn_anchor_generator=anchors, box_roi_pool=box_pool,
                        mask_roi_pool=mask_pool, **norm, **kwargs)
    backbone = FPNBackbone(model, extra="p6p7", min_stride=8)
    if detector == "retinanet":
        sizes = tuple(tuple(round(anchor_scale / 2 * s * 2 ** (k / 3)) for k in range(3)) for s in backbone.strides)
        anchors = AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * len(sizes))
        return RetinaNet(backbone, num_classes, anchor_generator=anchors, **norm, **kwargs)
    anchors = AnchorGenerator(tuple((s,) for s in backbone.strides), ((1.0,),) * len(backbone.strides))
    return FCOS(backbone, num_classes, anchor_generator=anchors, **norm, **kwargs)
