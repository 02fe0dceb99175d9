"""What an adaptation adds to a model: its record, parameter counts, and the adapter file (safetensors)."""
from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from mslora.core.hooks import ADAPTERS, adapter_key, head_module, is_inside
from mslora.registry import get_method

VERSION = importlib.metadata.version("mslora")  # pyproject.toml's, the one place it is written
# Metadata keys the adapter file itself writes (save_adapter's ``metadata`` cannot set them).
RESERVED = frozenset({"format", "method", "config", "sha256", "backbone", "backbone_sha256", "mslora_version"})
_PARAMETRIZED = re.compile(r"\.parametrizations\.(\w+)\.original$")
FORMAT = "mslora.adapter/3"  # 2: a sha256 of the tensors; 3: feature-space adapters under ``adapters.<site>``
OLD_FORMATS = ("mslora.adapter/1", "mslora.adapter/2")  # still read; names translated by legacy_names()
# Methods whose versions 1-2 attached a module named after the method to its site (``<site>.<method>.<tensor>``).
_LEGACY_METHODS = frozenset(("mslora", "adapter", "lorand", "adaptformer", "conv_adapter", "colora", "vpt"))


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
        added_modules: names of the modules the method attached (roots of new subtrees), which
            :func:`mslora.unadapt` deletes; PEFT layers and parametrizations are undone by their own APIs.
        handles: ``RemovableHandle`` of every hook the adaptation registered (BatchNorm freezing, adapters).
        requires_grad: each backbone parameter's ``requires_grad`` before adaptation.
        originals: copies of the backbone tensors the method trains in place (bias-tune, norm-tune), so that
            :func:`mslora.unadapt` can give the backbone back as it was.
        attributes: plain attributes the method set on the model (PEFT's ``peft_config``), removed with it.
    """

    method: str
    config: Any
    added: frozenset[str]
    head: tuple[str, ...]
    added_modules: tuple[str, ...] = ()
    handles: tuple = ()
    requires_grad: dict[str, bool] = dataclasses.field(default_factory=dict)
    originals: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    attributes: tuple[str, ...] = ()


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
    rec = adaptation(model)
    head = rec.head if rec else tuple(head_module(model))
    counts = dict.fromkeys(("adapter_params", "head_params", "backbone_params", "trainable_params", "total_params"), 0)
    for name, p in model.named_parameters():
        n = p.numel()
        if is_inside(name, head):
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


def write_safetensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None
                      ) -> None:
    """safetensors' ``save_file``, the file then given the mode any file the user writes gets (0666 less the
    umask; safetensors writes through a 0600 temporary file whose mode the rename keeps)."""
    save_file(tensors, str(path), metadata=metadata)
    user_mode(path)


def user_mode(path: str | Path) -> None:
    """Give ``path`` mode 0666 less the process's umask (read by setting and restoring it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


def save_adapter(model: nn.Module, path: str | Path, metadata: dict[str, Any] | None = None,
                 backbone_sha256: str | None = None) -> Path:
    """Write the adapter file: :func:`adapter_state_dict` as safetensors, with the method and its config as
    JSON in the file's metadata, the backbone's timm architecture, the fingerprint of its frozen weights
    (:func:`backbone_digest`) and the mslora version (plus ``metadata``, each value JSON-encoded; the engine adds the
    training config, the weight source, the class names and the preprocessing).

    ``backbone_sha256``: the fingerprint when the caller already has it (the engine computes it once per run: the
    frozen weights do not change while training); None computes it here.

    Returns the path written.

    Raises:
        ValueError: the model was not adapted, ``metadata`` names a reserved key (:data:`RESERVED`) or holds a value
            JSON cannot write.
        FileNotFoundError: the folder of ``path`` does not exist.
    """
    rec = adaptation(model)
    if rec is None:
        raise ValueError("model is not adapted: call mslora.adapt(model, METHOD) first (after mslora.merge the model "
                         "is a plain backbone: save it with mslora.save_backbone)")
    reserved = sorted(set(metadata or {}) & RESERVED)
    if reserved:
        raise ValueError(f"metadata key(s) {', '.join(reserved)} are reserved for the adapter file itself")
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in adapter_state_dict(model).items()}
    if not tensors:
        raise ValueError("the adapted model has no trainable tensors to save")
    meta = {"format": FORMAT, "method": rec.method, "config": json.dumps(dataclasses.asdict(rec.config)),
            "sha256": tensor_digest(tensors), "backbone": json.dumps(architecture(model)),
            "backbone_sha256": json.dumps(backbone_sha256 or backbone_digest(model)), "mslora_version": json.dumps(VERSION)}
    for k, v in (metadata or {}).items():
        try:
            meta[k] = json.dumps(v)
        except (TypeError, ValueError) as e:
            raise ValueError(f"metadata '{k}' is not JSON ({e}); give str, numbers, lists and dicts of them") from None
    path = Path(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"folder '{path.parent}' does not exist (save_adapter writes '{path.name}' into it)")
    write_safetensors(tensors, path, meta)
    return path


def backbone_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The frozen backbone's tensors as they were before adaptation, by their plain (unadapted) names: every
    parameter and buffer outside the head and outside what the method added, with PEFT's ``.base_layer`` and
    parametrize's ``.parametrizations.<tensor>.original`` taken out of the names, and the tensors a method trained in
    place (bias-tune, norm-tune) or rewrote (PiSSA) at their values from before :func:`mslora.adapt`. An unadapted
    model gives everything outside its head and its named adapter sets (``adapters``)."""
    rec = adaptation(model)
    head = rec.head if rec else tuple(head_module(model))
    added = rec.added if rec else frozenset()
    for other in getattr(getattr(model, "mslora_router", None), "sets", {}).values():  # named sets' PEFT tensors
        added = added | other.record.added
    originals = rec.originals if rec else {}
    out = {}
    for name, t in model.state_dict().items():
        if name in added or is_inside(name, head) or (rec is None and name.startswith(ADAPTERS + ".")):
            continue  # (an unadapted model's ``adapters`` are named sets: mslora.core.named)
        plain = _PARAMETRIZED.sub(r".\1", name.replace(".base_layer.", "."))
        out[plain] = originals.get(plain, t)
    return out


def backbone_digest(model: nn.Module) -> str | None:
    """SHA-256 of :func:`backbone_state` (names, dtypes, shapes, bytes): the fingerprint of the frozen weights an
    adapter was trained on. None for a method that trains the backbone itself (``full``: no frozen weights) or a
    model on the meta device."""
    rec = adaptation(model)
    if rec is not None and not get_method(rec.method).freeze_backbone:
        return None
    if any(t.device.type == "meta" for t in model.parameters()):
        return None
    return tensor_digest(backbone_state(model))


def architecture(model: nn.Module) -> str | None:
    """The timm architecture name of ``model`` (its ``pretrained_cfg``); for a model timm did not make (a detector
    or segmenter around a timm backbone) that of the first timm model inside it; None when there is none."""
    cfg = next((m.pretrained_cfg for m in model.modules() if getattr(m, "pretrained_cfg", None)), None)
    return (cfg or {}).get("architecture")


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
    fmt = raw.get("format")
    if fmt not in (FORMAT, *OLD_FORMATS):
        other = " (written by another version of mslora)" if str(fmt).startswith("mslora.adapter/") else ""
        raise ValueError(f"'{path}' is not an mslora adapter file of this version: format={fmt!r}{other}, "
                         f"expected {FORMAT}")
    if "method" not in raw or "config" not in raw:
        raise ValueError(f"adapter file '{path}' lacks its {'method' if 'method' not in raw else 'config'} metadata")
    try:
        meta = {k: (v if k in ("format", "method", "sha256") else json.loads(v)) for k, v in raw.items()}
    except json.JSONDecodeError as e:
        raise ValueError(f"adapter file '{path}' has damaged metadata: {e}") from None
    if not isinstance(meta["config"], dict):
        raise ValueError(f"adapter file '{path}' has a config that is not a mapping")
    if fmt != OLD_FORMATS[0] and meta.get("sha256") != tensor_digest(tensors):
        raise ValueError(f"adapter file '{path}' was altered: its tensors do not match the checksum written with them")
    if fmt in OLD_FORMATS:
        tensors = legacy_names(tensors, meta["method"])
    return tensors, meta


def legacy_names(tensors: dict[str, torch.Tensor], method: str) -> dict[str, torch.Tensor]:
    """Tensor names of a version 1-2 file in today's layout: ``<site>.<attr>.<rest>`` (the adapter was a child of
    its site) becomes ``adapters.<site with _ for .>.<rest>``; VPT's ``vpt.<rest>`` becomes ``adapters.vpt.<rest>``.
    Methods whose layout changed since (RLRR's, CoLoRA's, AdaptFormer's) then fail to load with the names or
    shapes that differ."""
    if method not in _LEGACY_METHODS:
        return tensors
    attr = method
    out = {}
    for k, v in tensors.items():
        site, sep, rest = k.partition(f".{attr}.") if not k.startswith(f"{attr}.") else ("vpt", ".", k[len(attr) + 1:])
        out[f"{ADAPTERS}.{adapter_key(site)}.{rest}" if sep else k] = v
    return out


def tensor_digest(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over the names, dtypes, shapes and bytes of ``tensors`` (in name order)."""
    h = hashlib.sha256()
    for k in sorted(tensors):
        t = tensors[k].detach().cpu().contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


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
