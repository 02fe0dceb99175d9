"""The ``segment`` task (semantic segmentation) on an (adapted) timm backbone: UPerNet with an auxiliary FCN head,
and mIoU, mean accuracy and pixel accuracy.

UPerNet (Xiao et al., "Unified Perceptual Parsing for Scene Understanding", ECCV 2018, Sec. 3 and Fig. 4), as
mmsegmentation's ``UPerHead`` builds it: a pyramid pooling module (scales 1, 2, 3, 6) on the last map, an FPN
(1x1 laterals, top-down sums, 3x3 output convs) over the stages, all levels upsampled to the finest, concatenated
and fused by a 3x3 conv, then a 1x1 classifier; conv-BN-ReLU everywhere. The auxiliary FCN head reads the third
map (stride 16) and its loss weighs 0.4 (CoLoRA supp. Sec. F; mmseg's ADE20K configs). Both classifiers are
mmseg's ``BaseDecodeHead.cls_seg``: ``Dropout2d(0.1)`` then the 1x1 ``conv_seg``, initialised N(0, 0.01), bias 0
(its ``init_cfg``) with ``conv_seg_init="mmseg"``, or as torch initialises a ``Conv2d`` (the training default; see
:class:`ClsSeg` for why). The cross-entropy is averaged as mmseg's ``CrossEntropyLoss`` does by default
(``avg_non_ignore=False``: the ignored pixels count in the denominator, contributing 0), or over the labelled
pixels only with ``avg_non_ignore=True`` (PyTorch's own mean). Written here rather than
taken from segmentation_models_pytorch, whose UPerNet decoder expects that library's own encoders' feature list
(with an input-resolution entry) and would add a dependency for about sixty lines.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from timm.data import resolve_model_data_config
from torch import nn
from tqdm import tqdm

from mslora.backbones import Features
from mslora.data.dense import DenseData, load_dense, segmentation_collate
from mslora.data.transforms import segmentation_transform
from mslora.engine.config import CONV_SEG_INITS
from mslora.registry import register_task
from mslora.tasks.base import DenseTask


def _cbr(cin: int, cout: int, k: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class ClsSeg(nn.Sequential):
    """mmseg ``BaseDecodeHead.cls_seg``: ``Dropout2d(dropout_ratio)`` then the 1x1 ``conv_seg``. (B, C, H, W) ->
    (B, num_classes, H, W).

    ``init="mmseg"`` draws conv_seg's weight from N(0, 0.01) and zeroes its bias (mmseg's
    ``init_cfg=dict(type='Normal', std=0.01, override=dict(name='conv_seg'))``); ``init="pytorch"`` keeps torch's
    ``Conv2d`` init (kaiming-uniform with a = sqrt(5), bias U(+-1/sqrt(C))). mmseg's init is made for its schedules
    (AdamW at 6e-5 to 1.2e-4 for 80k-160k iterations): at our scene recipe (450 AdamW steps at 1e-3, 91% of the
    pixels background) the first steps move every class's weights along the mean of the non-negative (post-ReLU)
    features, faster than its 0.01 noise can keep them apart; the classifier's weight matrix becomes rank one
    (background against the rest) and the run predicts background only. torch's init (std 1/sqrt(3C), 0.072 at
    C = 64) keeps them apart long enough (README 'Dense tasks' has the measurements).

    Raises:
        ValueError: ``init`` is not one of :data:`mslora.engine.config.CONV_SEG_INITS`.
    """

    def __init__(self, channels: int, num_classes: int, dropout_ratio: float = 0.1, init: str = "mmseg") -> None:
        super().__init__(nn.Dropout2d(dropout_ratio), nn.Conv2d(channels, num_classes, 1))
        if init not in CONV_SEG_INITS:
            raise ValueError(f"conv_seg init {init!r}: expected one of {', '.join(CONV_SEG_INITS)}")
        if init == "mmseg":
            nn.init.normal_(self[1].weight, 0.0, 0.01)
            nn.init.zeros_(self[1].bias)


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = 255,
                  avg_non_ignore: bool = False) -> torch.Tensor:
    """mmseg's ``CrossEntropyLoss`` (``mmseg/models/losses/cross_entropy_loss.py``): per-pixel cross-entropy, 0 at
    ``ignore_index``, averaged over all B H W pixels (``avg_non_ignore=False``, mmseg's default) or over the
    labelled ones only (True). logits (B, K, H, W), targets (B, H, W) int64 -> a scalar."""
    loss = F.cross_entropy(logits, targets, ignore_index=ignore_index, reduction="none")  # (B, H, W)
    if avg_non_ignore:
        return loss.sum() / (targets != ignore_index).sum().clamp(min=1)
    return loss.mean()


class UPerHead(nn.Module):
    """UPerNet decoder: maps (B, C_i, H_i, W_i), finest first -> logits (B, num_classes, H_0, W_0)."""

    def __init__(self, in_channels: list[int], num_classes: int, channels: int = 512,
                 pool_scales: tuple[int, ...] = (1, 2, 3, 6), init: str = "mmseg") -> None:
        super().__init__()
        self.ppm = nn.ModuleList(nn.Sequential(nn.AdaptiveAvgPool2d(s), _cbr(in_channels[-1], channels, 1))
                                 for s in pool_scales)
        self.bottleneck = _cbr(in_channels[-1] + len(pool_scales) * channels, channels, 3)
        self.laterals = nn.ModuleList(_cbr(c, channels, 1) for c in in_channels[:-1])
        self.fpn_convs = nn.ModuleList(_cbr(channels, channels, 3) for _ in in_channels[:-1])
        self.fuse = _cbr(len(in_channels) * channels, channels, 3)
        self.classifier = ClsSeg(channels, num_classes, init=init)

    def forward(self, maps: list[torch.Tensor]) -> torch.Tensor:
        top = maps[-1]
        size = lambda t: t.shape[-2:]  # noqa: E731
        pooled = [F.interpolate(p(top), size(top), mode="bilinear", align_corners=False) for p in self.ppm]
        levels = [lat(m) for lat, m in zip(self.laterals, maps[:-1])] + [self.bottleneck(torch.cat([top, *pooled], 1))]
        for i in range(len(levels) - 1, 0, -1):  # top-down pathway
            levels[i - 1] = levels[i - 1] + F.interpolate(levels[i], size(levels[i - 1]), mode="bilinear",
                                                          align_corners=False)
        outs = [conv(lv) for conv, lv in zip(self.fpn_convs, levels[:-1])] + [levels[-1]]
        outs = [outs[0]] + [F.interpolate(o, size(outs[0]), mode="bilinear", align_corners=False) for o in outs[1:]]
        return self.classifier(self.fuse(torch.cat(outs, 1)))


class FCNHead(nn.Module):
    """Auxiliary FCN head (mmseg ``FCNHead``, num_convs=1, concat_input=False): a 3x3 conv-BN-ReLU and
    :class:`ClsSeg` (``init`` as there). (B, C, H, W) -> (B, num_classes, H, W)."""

    def __init__(self, in_channels: int, num_classes: int, channels: int = 256, init: str = "mmseg") -> None:
        super().__init__()
        self.conv, self.classifier = _cbr(in_channels, channels, 3), ClsSeg(channels, num_classes, init=init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.conv(x))


class UPerNet(nn.Module):
    """UPerNet over :class:`~mslora.backbones.Features` of a timm model, with an auxiliary FCN head on the third map.

    ``forward(images)`` returns logits (B, num_classes, H, W) at the image size; in train mode with ``targets``
    (B, H, W) class indices (``ignore_index`` ignored) it returns the loss dict ``{"loss_seg", "loss_aux"}``
    (:func:`cross_entropy`, averaged per ``avg_non_ignore``; the auxiliary one weighted by ``aux_weight``).
    ``conv_seg_init``: both classifiers' init (:class:`ClsSeg`).

    Raises:
        ValueError: fewer than two feature maps (a plain ViT gets four from the simple feature pyramid), or an
            unknown ``conv_seg_init``.
    """

    def __init__(self, model: nn.Module, num_classes: int, channels: int = 512, aux_weight: float = 0.4,
                 ignore_index: int = 255, avg_non_ignore: bool = False, conv_seg_init: str = "mmseg") -> None:
        super().__init__()
        self.backbone = Features(model)
        chans = self.backbone.channels
        if len(chans) < 2:
            raise ValueError(f"UPerNet needs two or more feature maps; the backbone gives {len(chans)}")
        self.decode_head = UPerHead(chans, num_classes, channels, init=conv_seg_init)
        self.aux = len(chans) - 2 if len(chans) < 4 else 2  # the third map (stride 16 on 4-stage backbones)
        self.auxiliary_head = FCNHead(chans[self.aux], num_classes, channels // 2, init=conv_seg_init)
        self.aux_weight, self.ignore_index, self.avg_non_ignore = aux_weight, ignore_index, avg_non_ignore

    def forward(self, images: torch.Tensor, targets: torch.Tensor | None = None):
        maps = list(self.backbone(images).values())
        size = images.shape[-2:]
        logits = F.interpolate(self.decode_head(maps), size, mode="bilinear", align_corners=False)
        if targets is None:
            return logits
        aux = F.interpolate(self.auxiliary_head(maps[self.aux]), size, mode="bilinear", align_corners=False)
        ce = lambda x: cross_entropy(x, targets, self.ignore_index, self.avg_non_ignore)  # noqa: E731
        return {"loss_seg": ce(logits), "loss_aux": self.aux_weight * ce(aux)}


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int = 255
                     ) -> torch.Tensor:
    """(num_classes, num_classes) counts, rows the true class, columns the predicted one; pixels whose target is
    ``ignore_index`` (or outside [0, num_classes)) are left out. pred, target: integer tensors of one shape."""
    keep = (target != ignore_index) & (target >= 0) & (target < num_classes)
    idx = target[keep].long() * num_classes + pred[keep].long()
    return torch.bincount(idx, minlength=num_classes ** 2).reshape(num_classes, num_classes)


def segmentation_metrics(cm: torch.Tensor) -> dict[str, float]:
    """mIoU, mean accuracy and pixel accuracy from a confusion matrix (mmseg's definitions: classes absent from
    both the targets and the predictions are left out of the means)."""
    cm = cm.double()
    tp, gt, pr = cm.diag(), cm.sum(1), cm.sum(0)
    union = gt + pr - tp
    present = union > 0
    iou = tp[present] / union[present]
    acc = tp[gt > 0] / gt[gt > 0]
    return {"mIoU": iou.mean().item() if present.any() else float("nan"),
            "mAcc": acc.mean().item() if (gt > 0).any() else float("nan"),
            "aAcc": (tp.sum() / cm.sum()).item() if cm.sum() > 0 else float("nan")}


@register_task("segment")
class Segmentation(DenseTask):
    """Semantic segmentation with UPerNet (+ auxiliary FCN head, weight 0.4) over the adapted ``cfg.backbone``;
    training crops of ``cfg.img_size`` pixels, evaluation at a shorter side of ``cfg.img_size`` with the logits
    resized to each label map's own size. Best epoch by validation mIoU.

    Raises (on construction):
        ValueError / FileNotFoundError: bad method option, backbone or data (nothing written yet).
    """

    best_metric = "mIoU"
    collate_fn = staticmethod(segmentation_collate)

    def load_data(self, data: str) -> DenseData:
        """The segmentation data at ``data`` (:func:`mslora.data.dense.load_dense`)."""
        return load_dense(data, "segment", self.cfg.split_seed)

    def wrap(self, backbone: nn.Module) -> nn.Module:
        """UPerNet around the adapted backbone."""
        return UPerNet(backbone, self.num_classes, channels=self.cfg.head_channels,
                       avg_non_ignore=self.cfg.avg_non_ignore, conv_seg_init=self.cfg.conv_seg_init)

    def set_transforms(self, model: nn.Module) -> None:
        """mmseg's training pipeline (random scale 0.5-2, crop, flip) and a resize for evaluation, with the
        backbone's normalisation."""
        inner = model.backbone.model if hasattr(model, "backbone") else model
        dc = resolve_model_data_config(inner)
        self.preprocessing = {"img_size": self.cfg.img_size, "mean": list(dc["mean"]), "std": list(dc["std"])}
        self.data.with_transforms(segmentation_transform(True, **self.preprocessing),
                                  segmentation_transform(False, **self.preprocessing))

    def input_transform(self, preprocessing: dict[str, Any]) -> Callable[[torch.Tensor], torch.Tensor]:
        """The image half of the evaluation transform: shorter side resized to ``img_size``, normalised; uint8
        (3, H, W) -> float (3, H', W')."""
        joint = segmentation_transform(False, **preprocessing)
        return lambda image: joint(image, None)[0]

    @torch.no_grad()
    def predict(self, model: nn.Module, images: list[torch.Tensor], sizes: list[tuple[int, int]]
                ) -> list[dict[str, Any]]:
        """Per image: ``label_map``, the class index of every pixel (int64 (H, W) at the original size)."""
        x, _, shapes = segmentation_collate([(im, torch.zeros(im.shape[-2:], dtype=torch.long)) for im in images])
        logits = model(x).float()
        out = []
        for i, (h, w) in enumerate(sizes):
            lg = logits[i:i + 1] if shapes is None else logits[i:i + 1, :, :shapes[i][0], :shapes[i][1]]
            lg = F.interpolate(lg, (h, w), mode="bilinear", align_corners=False)
            out.append({"label_map": lg.argmax(1)[0].cpu()})
        return out

    def losses(self, model: nn.Module, batch: Any) -> tuple[dict[str, torch.Tensor], int]:
        """UPerNet's loss dict (``loss_seg``, ``loss_aux``) on a batch (images, labels, _)."""
        x, y, _ = batch
        return model(x, y), len(x)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader: Any, gather: Callable[[Any], Any], desc: str = "eval") -> dict[str, float]:
        """mIoU, mean accuracy and pixel accuracy (fractions) over the split's original label maps."""
        model.eval()
        k = self.num_classes
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
