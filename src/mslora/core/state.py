"""What an adaptation adds to a model: its record, parameter counts, and the adapter file (safetensors)."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

FORMAT = "mslora.adapter/1"


@dataclass(frozen=True)
class Adaptation:
    """Record kept on an adapted model as ``model.mslora_adaptation``.

    Attributes:
        method: registered method name.
        config: the method's config dataclass instance.
        added: state-dict names of the parameters and buffers the method added. Recorded by name, found by
            object identity when adapting: methods that wrap or re-parametrise backbone layers (PEFT's
            ``base_layer``, ``parametrizations.weight.original``) rename backbone tensors without adding them.
        head: qualified names of the classifier head modules.
    """

    method: str
    config: Any
    added: frozenset[str]
    head: tuple[str, ...]


def adaptation(model: nn.Module) -> Adaptation | None:
    """The model's :class:`Adaptation`, or None if :func:`mslora.adapt` was not called on it."""
    return getattr(model, "mslora_adaptation", None)


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Parameter counts of a (possibly adapted) model.

    Returns a dict of ints:
        ``backbone_params``: parameters the backbone had before adaptation, outside the head;
        ``head_params``: classifier head parameters (timm ``get_classifier()``), counted once;
        ``adapter_params``: parameters the method added;
        ``trainable_params``: parameters with ``requires_grad`` (adapter, head, and any backbone
        parameters the method trains, e.g. ``full``);
        ``total_params``: backbone + head + adapter.
    An unadapted model counts everything outside its head as backbone.
    """
    from mslora.core.inject import head_module, under

    rec = adaptation(model)
    head = rec.head if rec else tuple(head_module(model))
    counts = dict.fromkeys(("adapter_params", "head_params", "backbone_params", "trainable_params", "total_params"), 0)
    for name, p in model.named_parameters():
        n = p.numel()
        if under(name, head):
            counts["head_params"] += n
        elif rec is not None and name in rec.added:
            counts["adapter_params"] += n
        else:
            counts["backbone_params"] += n
        counts["trainable_params"] += n if p.requires_grad else 0
        counts["total_params"] += n
    return counts


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors an adapter file holds: every trainable parameter, every tensor the method added, and the
    buffers of modules that own a trainable parameter (e.g. BatchNorm statistics under full fine-tuning).

    Raises:
        ValueError: the model was not adapted.
    """
    rec = adaptation(model)
    if rec is None:
        raise ValueError("model is not adapted: call mslora.adapt(model, METHOD) first")
    keep = {n for n, p in model.named_parameters() if p.requires_grad}
    for mname, m in model.named_modules():
        if any(p.requires_grad for p in m.parameters(recurse=False)):
            keep |= {f"{mname}.{b}" if mname else b for b, _ in m.named_buffers(recurse=False)}
    keep |= rec.added
    return {k: v for k, v in model.state_dict().items() if k in keep}


def save_adapter(model: nn.Module, path: str | Path, metadata: dict[str, Any] | None = None) -> Path:
    """Write the adapter file: :func:`adapter_state_dict` as safetensors, with the method and its config as
    JSON in the file's metadata (plus ``metadata``, each value JSON-encoded).

    Returns the path written. Raises ValueError if the model was not adapted.
    """
    rec = adaptation(model)
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in adapter_state_dict(model).items()}
    meta = {"format": FORMAT, "method": rec.method, "config": json.dumps(dataclasses.asdict(rec.config))}
    meta.update({k: json.dumps(v) for k, v in (metadata or {}).items()})
    path = Path(path)
    save_file(tensors, str(path), metadata=meta)
    return path


def read_adapter(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read an adapter file: (tensors, metadata) with ``config`` and extra values JSON-decoded.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not an mslora adapter file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"adapter file '{path}' does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for malformed files
        raise ValueError(f"'{path}' is not a safetensors file: {e}") from None
    if raw.get("format") != FORMAT:
        raise ValueError(f"'{path}' is not an mslora adapter file (format={raw.get('format')!r}, expected {FORMAT})")
    meta = {k: (v if k in ("format", "method") else json.loads(v)) for k, v in raw.items()}
    return tensors, meta


def load_adapter_state(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Load adapter tensors into an adapted model, checking that they are exactly what it expects.

    Raises:
        ValueError: a tensor is missing, unexpected, or of the wrong shape (e.g. another number of classes).
    """
    expected = adapter_state_dict(model)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ValueError(f"adapter file does not fit this model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    for k, v in tensors.items():
        if v.shape != expected[k].shape:
            raise ValueError(f"adapter tensor '{k}' has shape {tuple(v.shape)}, the model expects {tuple(expected[k].shape)}")
    model.load_state_dict(tensors, strict=False)
