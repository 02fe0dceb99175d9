"""Freeze a timm backbone (its BatchNorm statistics too) and attach feature-space adapters by hooks, every hook's
handle kept (where adapters go: :mod:`mslora.core.placement`).

Feature-space adapters live outside the modules they act on, in one ``nn.ModuleDict`` at the model's root
(``model.adapters``, keyed by the site's name with dots as underscores), and run by a forward hook on the site
(or a forward pre-hook when the site is a module's input). So backbone parameter names do not change, backbone
checkpoints still load, and an adapter runs exactly once per forward of its site even when the site is a
container (``nn.Sequential``, DenseNet's dense blocks) that runs its children in order.
"""
from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar

import torch
from torch import nn

ADAPTERS = "adapters"  # the root ModuleDict holding feature-space adapters

def head_module(model: nn.Module) -> list[str]:
    """Qualified names of the classifier head modules (timm ``get_classifier()``); empty if none."""
    get = getattr(model, "get_classifier", None)
    if get is None:
        return []
    heads = get()
    heads = heads if isinstance(heads, (tuple, list)) else (heads,)
    ids = {id(h) for h in heads if isinstance(h, nn.Module)}
    return [n for n, m in model.named_modules() if id(m) in ids and n]


def is_inside(name: str, prefixes: tuple[str, ...]) -> bool:
    """Whether the qualified name ``name`` lies inside one of the modules named in ``prefixes``."""
    return any(name.startswith(p + ".") for p in prefixes)


_HANDLES: ContextVar[list | None] = ContextVar("mslora_hook_handles", default=None)


def keep_handle(handle):
    """Hand a hook's ``RemovableHandle`` to the adaptation being built (:func:`collect_handles`), so that
    ``mslora.merge`` and ``mslora.unadapt`` can remove the hook; returns the handle."""
    pending = _HANDLES.get()
    if pending is not None:
        pending.append(handle)
    return handle


@contextmanager
def collect_handles():
    """Within the block, :func:`keep_handle` appends to the yielded list (``mslora.adapt`` uses this)."""
    token = _HANDLES.set([])
    try:
        yield _HANDLES.get()
    finally:
        _HANDLES.reset(token)


def keep_eval(module: nn.Module, _args) -> None:
    """Forward pre-hook of a frozen BatchNorm layer: normalise with the pretrained running statistics even in train
    mode (MSLoRA Sec. 4.1), so ``model.train()`` never updates them."""
    module.training = False


def freeze_batchnorm(model: nn.Module, skip: tuple[str, ...] = ()) -> list:
    """Freeze the running statistics of every BatchNorm layer of ``model`` outside the modules named in ``skip``
    (:func:`keep_eval` as a forward pre-hook); other train-mode behaviour (DropPath, dropout) stays. Returns the
    hooks' handles, each also handed to :func:`keep_handle`."""
    return [keep_handle(m.register_forward_pre_hook(keep_eval)) for name, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and not (name in skip or is_inside(name, skip))]


def freeze_backbone(model: nn.Module, trainable_prefixes: list[str]) -> None:
    """Freeze every parameter except those under ``trainable_prefixes`` and the BatchNorm statistics outside them
    (:func:`freeze_batchnorm`), as MSLoRA Sec. 4.1 prescribes."""
    prefixes = tuple(trainable_prefixes)
    for name, p in model.named_parameters():
        p.requires_grad_(is_inside(name, prefixes))
    freeze_batchnorm(model, prefixes)


class AdapterHook:
    """Forward hook running an adapter at its site: ``adapter(output)`` (sequential), ``output + adapter(input)``
    (parallel), or, as a forward pre-hook, ``adapter(input)`` in place of the module's first input. With ``item``
    (a module returning a tuple or list, sequential mode only), ``adapter`` replaces that element of the output;
    the others pass through.

    A callable object, not a closure, so that ``copy.deepcopy`` of an adapted model hooks the copy's adapter.
    """

    def __init__(self, adapter: nn.Module, mode: str, item: int | None = None) -> None:
        self.adapter, self.mode, self.item = adapter, mode, item

    def __call__(self, module: nn.Module, args, output=None):
        if self.mode == "input":
            return (self.adapter(args[0]), *args[1:])
        if self.mode == "parallel":
            return output + self.adapter(args[0])
        if self.item is not None:
            return put_item(output, self.item, self.adapter(output[self.item]))
        return self.adapter(output)


def put_item(value: tuple | list, item: int, tensor: torch.Tensor) -> tuple | list:
    """A copy of the tuple or list ``value`` with element ``item`` replaced by ``tensor`` (same type)."""
    out = list(value)
    out[item] = tensor
    return type(value)(out) if isinstance(value, list) else tuple(out)


def adapter_key(site: str) -> str:
    """Key of a site's adapter in ``model.adapters``: the module name with dots as underscores."""
    return site.replace(".", "_")


def add_adapter(model: nn.Module, site: str, adapter: nn.Module) -> nn.Module:
    """Put ``adapter`` in ``model.adapters`` under :func:`adapter_key` (``site``), on the device and dtype of the
    model's parameters and in the model's train/eval mode; returns it.

    Raises:
        ValueError: another adapter already has that key.
    """
    holder = getattr(model, ADAPTERS, None)
    if holder is None:
        holder = nn.ModuleDict().train(model.training)
        model.add_module(ADAPTERS, holder)
    key = adapter_key(site)
    if key in holder:
        raise ValueError(f"two adapter sites share the key '{key}' (module '{site}')")
    p = next(model.parameters())
    holder[key] = adapter.to(device=p.device, dtype=p.dtype).train(model.training)
    return adapter


def attach(model: nn.Module, site: str, adapter: nn.Module, mode: str = "output", key: str | None = None,
           item: int | None = None) -> nn.Module:
    """:func:`add_adapter` ``adapter`` (under ``key``, default ``site``) and run it by a hook on module ``site``: on its
    output (``mode='output'``; on element ``item`` of it where the module returns a tuple or list), beside it,
    adding ``adapter(input)`` to its output (``'parallel'``), or on its input (``'input'``). Returns the adapter.

    Raises:
        ValueError: two sites share a key, ``mode`` is unknown, or ``item`` with a mode other than ``'output'``.
    """
    if mode not in ("output", "parallel", "input"):
        raise ValueError(f"mode='{mode}' is not one of output, parallel, input")
    if item is not None and mode != "output":
        raise ValueError(f"item={item} (an element of a tuple output) needs mode='output', not '{mode}'")
    module = model.get_submodule(site)
    add_adapter(model, key or site, adapter)
    hook = AdapterHook(adapter, mode, item)
    keep_handle(module.register_forward_pre_hook(hook) if mode == "input" else module.register_forward_hook(hook))
    return adapter


class KeepInput:
    """Forward pre-hook keeping a module's first input as ``adapter.kept`` for :class:`AddBranch` later in the
    same forward."""

    def __init__(self, adapter: nn.Module) -> None:
        self.adapter = adapter

    def __call__(self, module: nn.Module, args) -> None:
        self.adapter.kept = args[0]


class AddBranch:
    """Forward hook returning ``output + adapter.branch(kept, output)`` and releasing the kept tensor."""

    def __init__(self, adapter: nn.Module) -> None:
        self.adapter = adapter

    def __call__(self, module: nn.Module, args, output: torch.Tensor) -> torch.Tensor:
        kept, self.adapter.kept = self.adapter.kept, None
        return output + self.adapter.branch(kept, output)


def attach_branch(model: nn.Module, key: str, adapter: nn.Module, keep_at: str, add_at: str) -> nn.Module:
    """:func:`add_adapter` ``adapter`` under ``key`` and add ``adapter.branch(x, out)`` to the output ``out`` of module
    ``add_at``, where ``x`` is the input of module ``keep_at`` earlier in the same forward (AdaptFormer's parallel
    branch, Mona's module between a block's two residual sub-blocks). Returns the adapter.

    Raises:
        ValueError: another adapter already has that key.
    """
    add_adapter(model, key, adapter)
    adapter.kept = None
    keep_handle(model.get_submodule(keep_at).register_forward_pre_hook(KeepInput(adapter)))
    keep_handle(model.get_submodule(add_at).register_forward_hook(AddBranch(adapter)))
    return adapter
