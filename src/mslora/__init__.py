"""mslora: adapt frozen timm vision backbones with MSLoRA and its peer parameter-efficient methods.

    import timm, mslora
    model = timm.create_model("resnet50", num_classes=10)
    mslora.adapt(model, "mslora", rank=128, groups=4)   # in place, returns the model
    mslora.count_parameters(model)
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from mslora.core.inject import freeze_backbone, head_module, under
from mslora.core.state import (
    Adaptation,
    adaptation,
    count_parameters,
    load_adapter_state,
    read_adapter,
    save_adapter,
)
from mslora.registry import get_method, list_methods

__all__ = ["adapt", "merge", "count_parameters", "save_adapter", "load_adapter", "list_methods"]
__version__ = "0.1.0"


def adapt(model: nn.Module, method: str, **options: Any) -> nn.Module:
    """Adapt ``model`` in place with a registered method and return it.

    The backbone is frozen (``requires_grad=False``; BatchNorm running statistics stay fixed even in
    train mode; DropPath stays active, MSLoRA Sec. 4.1) and the classifier head (timm ``get_classifier()``)
    stays trainable, unless the method trains the backbone (``full``). Then the method inserts its modules.

    Args:
        model: a timm model (any ``timm.create_model`` result).
        method: a name from :func:`list_methods`.
        **options: the method's config fields, e.g. ``rank=128, groups=4`` for ``mslora``.

    Raises:
        ValueError: unknown method (with close matches), unknown or invalid option, a model that is already
            adapted, or options that do not fit the backbone (e.g. ``groups`` not dividing a channel count).
    """
    if adaptation(model) is not None:
        raise ValueError(f"model is already adapted with '{adaptation(model).method}'; adapt a fresh model")
    spec = get_method(method)
    cfg = spec.make_config(**options)
    head = tuple(head_module(model))
    if spec.freeze_backbone:
        freeze_backbone(model, list(head))
    before = {id(t): t for t in (*model.parameters(), *model.buffers())}  # held, so no id is reused
    spec.apply(model, cfg)
    tensors = (*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False))
    added = frozenset(n for n, t in tensors if id(t) not in before)
    if spec.freeze_backbone:  # some injectors (PEFT) freeze everything but their own parameters
        for name, p in model.named_parameters():
            if under(name, head):
                p.requires_grad_(True)
    model.mslora_adaptation = Adaptation(method, cfg, added, head)
    return model


def merge(model: nn.Module) -> nn.Module:
    """Fold the adapter into the backbone weights, in place, and return the model.

    Raises:
        ValueError: the model is not adapted, or its method cannot merge (the message says why).
    """
    rec = adaptation(model)
    if rec is None:
        raise ValueError("model is not adapted: nothing to merge")
    spec = get_method(rec.method)
    if spec.merge is None:
        raise ValueError(f"method '{rec.method}' cannot be merged: {spec.merge_impossible}")
    spec.merge(model, rec.config)
    return model


def load_adapter(model: nn.Module, path: str | Path) -> nn.Module:
    """Adapt a fresh backbone as recorded in the adapter file at ``path`` and load its tensors.

    ``model`` must be the backbone the adapter was trained on (same architecture, same pretrained weights,
    same number of classes). Returns the model.

    Raises:
        FileNotFoundError: no such file. ValueError: not an adapter file, or it does not fit the model.
    """
    tensors, meta = read_adapter(path)
    adapt(model, meta["method"], **meta["config"])
    load_adapter_state(model, tensors)
    return model
