"""Multi-scale feature maps of an (adapted) timm backbone for dense heads (detection, segmentation).

The maps come from timm's own feature API, ``forward_intermediates`` (the same blocks, so the adapters attached
by :func:`mslora.adapt` act exactly as in classification and one adapter file serves every task), with channels
and strides from ``feature_info``. Hierarchical backbones (ResNet, ConvNeXt, Swin, EfficientNet, RegNet, ...) give
their stages at strides 4-32; a plain ViT (every block at one stride) gives its last map, turned into a pyramid at
strides 4, 8, 16 and 32 by ViTDet's simple feature pyramid (Li et al., "Exploring Plain Vision Transformer
Backbones for Object Detection", ECCV 2022, Sec. 3 and Fig. 2c).
"""
from __future__ import annotations

from collections import OrderedDict

import torch
from timm.layers import LayerNorm2d
from torch import nn

from mslora.core.layout import IMAGE_SIZE


class SimpleFeaturePyramid(nn.Module):
    """ViTDet's simple feature pyramid: from one stride-s map (B, C, H, W), maps at strides s/4, s/2, s, 2s by
    deconvolutions (2x2, stride 2; LayerNorm + GELU between two of them) and a 2x2 max-pool, each followed by a
    1x1 and a 3x3 convolution to ``out_channels`` with LayerNorms (ViTDet Sec. 3, Fig. 2c; its code's
    ``SimpleFeaturePyramid``). Output: four maps (B, out_channels, 4H, 4W) ... (B, out_channels, H/2, W/2)."""

    def __init__(self, in_channels: int, out_channels: int = 256) -> None:
        super().__init__()
        c = in_channels
        self.scales = nn.ModuleList([
            nn.Sequential(nn.ConvTranspose2d(c, c // 2, 2, 2), LayerNorm2d(c // 2), nn.GELU(),
                          nn.ConvTranspose2d(c // 2, c // 4, 2, 2)),
            nn.ConvTranspose2d(c, c // 2, 2, 2),
            nn.Identity(),
            nn.MaxPool2d(2),
        ])
        widths = (c // 4, c // 2, c, c)
        self.outputs = nn.ModuleList(
            nn.Sequential(nn.Conv2d(w, out_channels, 1, bias=False), LayerNorm2d(out_channels),
                          nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False), LayerNorm2d(out_channels))
            for w in widths)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [out(scale(x)) for scale, out in zip(self.scales, self.outputs)]


class Features(nn.Module):
    """Feature maps of a timm model for dense heads, as an ``OrderedDict`` name -> (B, C_i, H_i, W_i) (NCHW).

    Args:
        model: a timm model (adapted or not), kept whole so that its adapters and record stay in place.
        out_indices: ``feature_info`` positions to return; default: every entry at stride 4 or more, or, for a
            single-stride model (plain ViT), the last one through a :class:`SimpleFeaturePyramid`.
        pyramid_channels: output width of the simple feature pyramid.

    Attributes:
        channels: channel count of each returned map; ``strides``: their strides in input pixels.

    Raises:
        ValueError: the model has no ``forward_intermediates`` or ``feature_info`` (not a timm model with the
            feature API), or an out index outside ``feature_info``.
    """

    def __init__(self, model: nn.Module, out_indices: list[int] | None = None, pyramid_channels: int = 256) -> None:
        super().__init__()
        info = getattr(model, "feature_info", None)
        if not hasattr(model, "forward_intermediates") or not info:
            raise ValueError(f"{type(model).__name__} has no forward_intermediates / feature_info: not a timm model "
                             "with timm's feature API, so its feature maps cannot be taken")
        reductions = [f["reduction"] for f in info]
        single = len(set(reductions)) == 1 and len(reductions) > 1
        if out_indices is None:
            out_indices = [len(info) - 1] if single else [i for i, r in enumerate(reductions) if r >= 4]
        bad = [i for i in out_indices if not -len(info) <= i < len(info)]
        if bad:
            raise ValueError(f"out_indices {bad} are outside the model's {len(info)} feature_info entries")
        self.model, self.out_indices = model, [i % len(info) for i in out_indices]
        self.pyramid = SimpleFeaturePyramid(info[self.out_indices[-1]]["num_chs"], pyramid_channels) \
            if single and len(self.out_indices) == 1 else None
        if self.pyramid is not None:
            s = reductions[-1]
            self.channels, self.strides = [pyramid_channels] * 4, [s // 4, s // 2, s, s * 2]
        else:
            self.channels = [info[i]["num_chs"] for i in self.out_indices]
            self.strides = [reductions[i] for i in self.out_indices]

    def forward(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        IMAGE_SIZE.set(tuple(x.shape[-2:]))  # token grids of non-square images (forward hooks are not called)
        maps = self.model.forward_intermediates(x, indices=self.out_indices, intermediates_only=True)
        if self.pyramid is not None:
            maps = self.pyramid(maps[-1])
        return OrderedDict((str(i), m) for i, m in enumerate(maps))
