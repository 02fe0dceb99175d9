"""The adapt / merge / unadapt life cycle: :func:`adapt` records everything a method changes on a model
(:class:`mslora.core.state.Adaptation`), so that :func:`merge` can leave a plain backbone and :func:`unadapt` the
original one; :func:`load_adapter` adapts a model from an adapter file.

    import timm, mslora
    model = timm.create_model("resnet50", num_classes=10)
    mslora.adapt(model, "mslora", rank=128, groups=4)   # in place, returns the model
"""
from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from mslora.core import named
from mslora.core.hooks import collect_handles, freeze_backbone, freeze_batchnorm, head_module, is_inside, keep_handle
from mslora.core.layout import record_image_size
from mslora.core.state import (Adaptation, adaptation, architecture, backbone_digest, load_adapter_state,
                               read_adapter, user_mode, write_safetensors)
from mslora.registry import get_method


def adapt(model: nn.Module, method: str, **options: Any) -> nn.Module:
    """Adapt ``model`` in place with a registered method and return it.

    The backbone is frozen (``requires_grad=False``; BatchNorm running statistics stay fixed even in
    train mode; DropPath stays active, MSLoRA Sec. 4.1) and the classifier head (timm ``get_classifier()``)
    stays trainable, unless the method trains the backbone (``full``). Then the method inserts its modules.
    Every hook it registers keeps its handle, so :func:`merge` and :func:`unadapt` leave a plain backbone.

    Args:
        model: a timm model (any ``timm.create_model`` result).
        method: a name from :func:`mslora.list_methods`.
        **options: the method's config fields, e.g. ``rank=128, groups=4`` for ``mslora``.

    Raises:
        TypeError: ``model`` is not a torch module (e.g. a model name).
        ValueError: unknown method (with close matches), unknown or invalid option, a model that is already
            adapted, or options that do not fit the backbone (e.g. ``groups`` not dividing a channel count).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"adapt takes a model (a torch.nn.Module such as timm.create_model('resnet18')), not "
                        f"{type(model).__name__} {model!r:.60}")
    if adaptation(model) is not None:
        raise ValueError(f"model is already adapted with '{adaptation(model).method}'; adapt a fresh model")
    spec = get_method(method)
    cfg = spec.make_config(**options)
    head = tuple(head_module(model))
    requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
    modules_before = {id(m) for m in model.modules()}
    attributes_before = set(vars(model))
    before = {id(t): t for t in (*model.parameters(), *model.buffers())}  # held, so no id is reused
    with collect_handles() as handles:
        if spec.freeze_backbone:
            freeze_backbone(model, list(head))
        replaced = spec.apply(model, cfg) or {}  # originals of backbone tensors the method rewrote (PiSSA)
        keep_handle(model.register_forward_pre_hook(record_image_size))  # token grids of non-square images
    tensors = (*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False))
    added = frozenset(n for n, t in tensors if id(t) not in before)
    if spec.freeze_backbone:  # some injectors (PEFT) freeze everything but their own parameters
        for name, p in model.named_parameters():
            if is_inside(name, head):
                p.requires_grad_(True)
    # Backbone tensors trained in place (bias-tune, norm-tune): keep a copy so unadapt can give them back.
    originals = {n: p.detach().clone() for n, p in model.named_parameters()
                 if spec.freeze_backbone and p.requires_grad and n not in added and not is_inside(n, head)}
    originals.update(replaced)
    new_roots = tuple(n for n, m in model.named_modules() if id(m) not in modules_before
                      and id(model.get_submodule(n.rpartition(".")[0])) in modules_before
                      and not _undone_by_own_api(model, n))
    attributes = tuple(sorted(set(vars(model)) - attributes_before))  # e.g. PEFT's model.peft_config
    model.mslora_adaptation = Adaptation(method, cfg, added, head, new_roots, tuple(handles), requires_grad, originals,
                                         attributes)
    return model


def _undone_by_own_api(model: nn.Module, name: str) -> bool:
    """PEFT layers (replaced by their base layer) and parametrize containers (removed by parametrize)."""
    from peft.tuners.tuners_utils import BaseTunerLayer  # PEFT takes seconds to import: only when a model is adapted

    return isinstance(model.get_submodule(name), BaseTunerLayer) or name.rpartition(".")[2] == "parametrizations"


def _strip(model: nn.Module, rec: Adaptation) -> None:
    """Remove what is left of an adaptation after its method's own merge or undo: hooks, attached modules, the
    record; restore every parameter's ``requires_grad`` as it was before :func:`adapt`."""
    for handle in rec.handles:
        handle.remove()
    for name in sorted(rec.added_modules, key=len, reverse=True):
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        if hasattr(owner, child):
            delattr(owner, child)
    for name, p in model.named_parameters():
        p.requires_grad_(rec.requires_grad.get(name, True))
    for attr in rec.attributes:
        if attr in vars(model):
            delattr(model, attr)
    del model.mslora_adaptation


def merge(model: nn.Module) -> nn.Module:
    """Fold the adapter into the backbone weights, in place, and return the model as a plain backbone: the same
    outputs, exactly the backbone's parameters and names, no hooks, no record, no wrapper classes (it saves as a
    timm checkpoint, :func:`save_backbone`).

    Raises:
        ValueError: the model is not adapted, or its method cannot merge (the message says why; nothing changes).
    """
    rec = adaptation(model)
    if rec is None:
        raise ValueError("model is not adapted: nothing to merge")
    spec = get_method(rec.method)
    if spec.merge is None:
        raise ValueError(f"method '{rec.method}' cannot be merged: {spec.merge_impossible}")
    spec.merge(model, rec.config)
    _strip(model, rec)
    return model


def unadapt(model: nn.Module) -> nn.Module:
    """Remove the method entirely, in place, and return the original backbone: PEFT layers give back their base
    layers unmerged, parametrizations their original tensors, attached modules and hooks are removed, tensors the
    method trained in place (bias-tune, norm-tune) get their values from before :func:`adapt`, and every
    ``requires_grad`` is as it was. The classifier head keeps what it learnt (it belongs to the task).

    Raises:
        ValueError: the model is not adapted, or it was fully fine-tuned (``full`` changed the backbone itself
            and keeps no copy of it).
    """
    rec = adaptation(model)
    if rec is None:
        raise ValueError("model is not adapted: nothing to remove")
    spec = get_method(rec.method)
    if not spec.freeze_backbone:
        raise ValueError(f"method '{rec.method}' trains the backbone itself; there is no original to return")
    if spec.undo is not None:
        spec.undo(model, rec.config)
    for m in list(model.modules()):
        if parametrize.is_parametrized(m):
            for tensor_name in list(m.parametrizations):
                parametrize.remove_parametrizations(m, tensor_name, leave_parametrized=False)
        if vars(m).pop("mslora_added_bias", False):  # a bias the method gave a bias-free layer (RLRR's shift)
            del m.bias
            m.bias = None
    with torch.no_grad():
        params = dict(model.named_parameters())
        for name, value in rec.originals.items():
            params[name].copy_(value)
    _strip(model, rec)
    return model


def keep_batchnorm_frozen(model: nn.Module) -> nn.Module:
    """Freeze the BatchNorm statistics of an adapted model also under a method that trains the backbone (``full``:
    detectors keep them frozen); the hooks' handles join the model's record, so :func:`merge` removes them too.
    Under every other method :func:`adapt` has frozen them already. Returns the model.

    Raises:
        ValueError: the model is not adapted.
    """
    rec = adaptation(model)
    if rec is None:
        raise ValueError("model is not adapted: call mslora.adapt(model, METHOD) first")
    if not get_method(rec.method).freeze_backbone:
        model.mslora_adaptation = dataclasses.replace(rec, handles=rec.handles + tuple(freeze_batchnorm(model)))
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
    outer.mslora_adaptation = Adaptation(rec.method, rec.config, frozenset(f"{prefix}.{n}" for n in rec.added), head,
                                         originals={f"{prefix}.{n}": v for n, v in rec.originals.items()})
    return outer


def save_backbone(model: nn.Module, path: str | Path, label_names: list[str] | None = None,
                  data_config: dict[str, Any] | None = None, model_args: dict[str, Any] | None = None) -> Path:
    """Write a plain (unadapted or merged) timm model; returns the path.

    - ``path`` ending in ``.safetensors``: its state dict as a timm checkpoint, which
      ``timm.create_model(NAME, pretrained=True, pretrained_cfg_overlay=dict(file=PATH, num_classes=N),
      num_classes=N)`` loads without mslora (``num_classes`` in the overlay too, or timm re-initialises the
      classifier as if the file held ImageNet's).
    - any other ``path``: a folder in timm's own Hugging Face layout (``timm.models.save_for_hf``:
      ``config.json`` with the architecture, ``num_classes``, ``label_names``, input size, mean / std, and
      ``model.safetensors``), which ``timm.create_model("local-dir:PATH", pretrained=True)`` loads with its head
      and labels, no overlay needed. ``data_config``: timm's preprocessing keys (``input_size``, ``mean``, ``std``,
      ``crop_pct``, ``interpolation``); ``model_args``: ``create_model`` keywords the model needs (e.g. ``img_size``).

    Raises:
        ValueError: the model is still adapted (merge or unadapt it first).
    """
    if adaptation(model) is not None:
        raise ValueError(f"model is adapted with '{adaptation(model).method}'; mslora.merge or mslora.unadapt it first")
    path = Path(path)
    if path.suffix == ".safetensors":
        write_safetensors({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, path)
        return path
    from timm.models import save_for_hf  # imports huggingface_hub: only for this layout

    save_for_hf(model, str(path), model_config={"label_names": list(label_names)} if label_names else None,
                model_args=model_args, data_config=data_config, safe_serialization=True)
    for written in path.glob("*.safetensors"):  # safetensors writes 0600 files: the user's mode, as for any file
        user_mode(written)
    return path


def check_backbone(model: nn.Module, meta: dict[str, Any], path: str | Path, strict_backbone: bool = True) -> None:
    """Compare the fingerprint of ``model``'s frozen weights (:func:`mslora.core.state.backbone_digest`) with the one
    the adapter file at ``path`` records; files without one (older ones, full fine-tuning) are not checked.

    Raises:
        ValueError: the weights differ and ``strict_backbone`` (with False: a warning, and the load goes on).
    """
    trained = meta.get("backbone_sha256")
    here = backbone_digest(model) if trained else None
    if here is None or here == trained:
        return
    msg = (f"adapter file '{path}' was trained on other backbone weights ({meta.get('weights', 'source not recorded')}"
           f", sha256 {trained[:12]}) than this model's (sha256 {here[:12]}): another checkpoint, or a random init?")
    if strict_backbone:
        raise ValueError(msg + " Pass strict_backbone=False to load anyway.")
    warnings.warn(msg + " Loading anyway (strict_backbone=False).", stacklevel=3)


def load_adapter(model: nn.Module, path: str | Path, strict_backbone: bool = True, name: str | None = None
                 ) -> nn.Module:
    """Adapt a fresh backbone as recorded in the adapter file at ``path`` and load its tensors.

    ``model`` must be the backbone the adapter was trained on: the same architecture, the same frozen weights (the
    file records their fingerprint; ``strict_backbone=False`` loads onto other weights with a warning) and the
    same number of classes. Returns the model.

    With ``name``, the adapter joins the model's named sets (:mod:`mslora.core.named`): load several, each with its
    own classifier head (any number of classes), then pick one with ``mslora.set_adapter(model, name)`` (the first
    loaded is active) or mix them per sample with ``mslora.predict(..., adapter_names=[...])`` /
    ``mslora.mixed_batch``; the frozen backbone is shared. Methods that change the backbone itself cannot share it.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not an adapter file (or one of another version, damaged or altered), trained on another timm
            architecture (both named) or on other weights (see :func:`check_backbone`), a method or options this
            version does not have or lacks, or tensors that do not fit the model; with ``name``: a name taken, a
            model with an unnamed adapter or without one classifier, or a method that cannot share the backbone
            with the sets already there (nothing of the new set stays then).
    """
    tensors, meta = read_adapter(path)
    trained_on, here = meta.get("backbone"), architecture(model)
    if trained_on and here and trained_on != here:
        raise ValueError(f"adapter file '{path}' was trained on {trained_on} (weights: "
                         f"{meta.get('weights', 'not recorded')}), but the model is {here}")
    spec = get_method(meta["method"])
    # Options that change how the model computes, not what: a file written before they existed takes the default.
    names = {f.name for f in dataclasses.fields(spec.config_cls) if not f.metadata.get("runtime")}
    missing = sorted(names - set(meta["config"]))
    if missing:
        raise ValueError(f"adapter file '{path}' lacks option(s) {', '.join(missing)} of method '{spec.name}' "
                         "(written by another version of mslora?)")
    if name is None and adaptation(model) is not None:
        raise ValueError("model is already adapted; load an adapter onto a fresh backbone, or give each adapter a "
                         "name (name=...) to hold several")
    if name is not None:
        named.begin(model, tensors, name)
        tensors = named.peft_names(tensors, name)
    try:
        if adaptation(model) is None:
            check_backbone(model, meta, path, strict_backbone)
        adapt(model, meta["method"], **meta["config"])
        load_adapter_state(model, tensors)
        if name is not None:
            named.finish(model, path, meta, name)
    except Exception:
        if name is not None:  # the model as it was: its other sets intact
            _undo_named(model, name)
        else:
            undo_failed(model)
        raise
    return model


def undo_failed(model: nn.Module) -> None:
    """Take a just-made adaptation whose loading failed off the model (:func:`unadapt`; ``full``, which changes
    nothing until it trains, by its record alone), so that a failed load changes nothing and a retry works."""
    rec = adaptation(model)
    if rec is None:
        return
    if get_method(rec.method).freeze_backbone:
        unadapt(model)
    else:
        _strip(model, rec)


def _undo_named(model: nn.Module, name: str) -> None:
    """Remove the set ``name`` whose loading failed (:func:`unadapt`, but with other sets' PEFT layers kept: only its
    own adapters leave them) and put the model's named sets back (:func:`mslora.core.named.abort`)."""
    rec = adaptation(model)
    if rec is not None and get_method(rec.method).undo is not None and named.router(model).sets:
        named.drop_peft(model, name)
        params = dict(model.named_parameters())
        with torch.no_grad():
            for plain, value in rec.originals.items():  # PiSSA's rewritten weights, under a wrapper or not
                head, _, tail = plain.rpartition(".")
                params.get(plain, params.get(f"{head}.base_layer.{tail}")).copy_(value)
        _strip(model, rec)
    elif rec is not None:
        unadapt(model)
    named.abort(model)
