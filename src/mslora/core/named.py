"""Several named adapters on one frozen backbone (``mslora.load_adapter(model, path, name=...)``), one active at a
time (:func:`set_adapter`) or each sample of a batch through its own (:func:`mixed_batch`), the backbone shared.

Each named set's modules live in ``model.adapters[name]`` (keyed by site inside, as an unnamed adaptation's
``model.adapters``) and its classifier head in ``model.<head>.heads[name]``, where ``<head>`` is timm's classifier
(``get_classifier()``), now a :class:`RoutedHead`. Every adapter hook is wrapped in a :class:`Routed` hook that
applies it to its own set's samples only: rows of a (B, ...) feature tensor, or the B consecutive groups of rows of
a (k B, ...) one (Swin's windows, batch-major). So a mixed batch runs the frozen backbone once and equals each
sample run alone under its own adapter (up to float rounding), and N adapters cost N adapters' tensors, not N
backbones. Where several sets' adapters at one site are alike, a mixed batch runs them at once (:func:`fused`).
PEFT's multi-adapter LoRA layers are the model for the API (``adapter_names``, ``set_adapter``), and LoRA sets use
them: one PEFT layer holds every set's LoRA, fed each row's set (:class:`PeftRoute`). The routing of our
feature-space adapters is ours because they live in hooks, which PEFT does not know.

Methods that change what every sample shares (the backbone's weights: RLRR, SSF, BitFit, PiSSA, full fine-tuning),
PEFT layers PEFT cannot mix (DoRA, HiRA) and hooks that are not per-sample (VPT's prompts change the token count)
cannot share the backbone with other sets: such a set loads alone (:func:`mix_refusal`).
"""
from __future__ import annotations

import re
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from mslora.core.hooks import ADAPTERS, AdapterHook, AddBranch, KeepInput, head_module, keep_eval, put_item
from mslora.core.layout import record_image_size
from mslora.core.state import Adaptation, adaptation

ROUTABLE = (AdapterHook, KeepInput, AddBranch)  # hooks that act on each sample's rows alone
NEUTRAL = (keep_eval, record_image_size)  # hooks every set registers that do not depend on the set
_LOADING: ContextVar[str | None] = ContextVar("mslora_named_loading", default=None)


def loading() -> str | None:
    """The name of the set being loaded, or None: PEFT-based methods inject their layers under it."""
    return _LOADING.get()


@dataclass
class NamedAdapter:
    """One named set on a model (``mslora.named_adapters(model)[name]``).

    Attributes:
        name: the set's name.
        path: the adapter file it came from.
        meta: that file's metadata (method, config, classes, preprocessing, training config ...).
        record: the :class:`mslora.core.state.Adaptation` its loading made.
        num_classes: width of its head's output.
        mix_refusal: why it cannot share the model with other sets (:func:`mix_refusal`), or None.
    """

    name: str
    path: Path
    meta: dict[str, Any]
    record: Adaptation
    num_classes: int
    mix_refusal: str | None


class NotMixable(ValueError):
    """A set that cannot share the model with the sets already on it (:func:`finish`)."""


class Router:
    """Which samples go through which named set: ``active`` (one set for the whole batch), or ``rows`` (set name ->
    sample indices, a (B,) batch) while :func:`mixed_batch` runs."""

    def __init__(self) -> None:
        self.sets: dict[str, NamedAdapter] = {}
        self.active: str | None = None
        self.rows: dict[str, torch.Tensor] | None = None
        self.batch = 0
        self.pending: tuple | None = None  # while a set loads: (classifier, named sets set aside, active name)
        self.groups: dict[tuple, list] = {}  # (hooks dict, hook kind, mode) -> the Routed hooks there, in order
        self.names: list[str] = []  # while mixed_batch runs: each sample's set
        self.peft_layers: set[int] = set()  # PEFT layers given adapter_names per row (PeftRoute)

    def rows_of(self, name: str, n: int) -> torch.Tensor | bool:
        """True: all ``n`` rows go through set ``name``; False: none; else the row indices (:meth:`rows_per_sample`).

        Raises:
            ValueError: ``n`` is not a multiple of the batch size.
        """
        if self.rows is None:
            return name == self.active
        idx = self.rows.get(name)
        if idx is None:
            return False
        if len(idx) == self.batch:
            return True
        k = self.rows_per_sample(n)
        return idx if k == 1 else (idx[:, None] * k + torch.arange(k, device=idx.device)).reshape(-1)

    def rows_per_sample(self, n: int) -> int:
        """k of a feature tensor of leading dim ``n = k B`` (sample i has rows i k ... i k + k - 1).

        Raises:
            ValueError: ``n`` is not a multiple of the batch size (a layout the routing cannot split by sample).
        """
        if n % self.batch:
            raise ValueError(f"a feature tensor of leading size {n} does not split into the batch's {self.batch} "
                             "samples: this site cannot be routed per sample")
        return n // self.batch

    def row_names(self, n: int) -> list[str]:
        """Each of ``n`` rows' set name, for PEFT's ``adapter_names`` (``"__base__"``: no adapter), rows split as
        :meth:`rows_of` splits them."""
        if self.rows is None:
            return [self.active or "__base__"] * n
        return [name for name in self.names for _ in range(self.rows_per_sample(n))]


class PeftRoute:
    """Forward pre-hook (with kwargs) of a PEFT layer holding several sets' adapters: PEFT's own mixed-batch
    mechanism, ``adapter_names`` with each row's set (PEFT's LoRA layers skip names they do not hold)."""

    def __init__(self, router: Router) -> None:
        self.router = router

    def __call__(self, module: nn.Module, args, kwargs):
        return args, {**kwargs, "adapter_names": self.router.row_names(args[0].shape[0])}


class Routed:
    """A set's adapter hook (:data:`ROUTABLE`) applied to that set's rows only (see :class:`Router`): as it is when
    the whole batch is the set's, skipped when none of it is, else on the rows, written back out of place.

    ``group``: the Routed hooks of every set at the same module and of the same kind (one list, shared). In a mixed
    batch without gradients, the group's first hook runs the adapters of all sets present at once when they are alike
    (:func:`fused`), and the others skip that call.
    """

    def __init__(self, router: Router, name: str, hook: Any, pre: bool, group: list) -> None:
        self.router, self.name, self.hook, self.pre, self.group = router, name, hook, pre, group
        self.skip = False
        group.append(self)

    def __call__(self, module: nn.Module, args, output=None):
        if self.skip:  # the group's first hook answered for this set already
            self.skip = False
            return None
        changed = None
        if self.router.rows is not None and self is self.group[0] and not torch.is_grad_enabled():
            changed, done = fused(self.group, module, args, output)
            if done:
                return changed
            if changed is not None:  # other sets' rows answered; this set's own rows below
                args, output = (changed, output) if self.pre else (args, changed)
        item = getattr(self.hook, "item", None)
        if item is not None:  # one element of a tuple output (mslora.core.hooks.AdapterHook): those rows of it
            y = output[item]
            rows = self.router.rows_of(self.name, y.shape[0])
            if rows is True or rows is False:
                return self.hook(module, args, output) if rows is True else changed
            return put_item(output, item, y.index_copy(0, rows, self.hook.adapter(y.index_select(0, rows))))
        x = args[0]
        rows = self.router.rows_of(self.name, x.shape[0])
        if rows is False:
            return changed
        if rows is True:
            return self.hook(module, args) if self.pre else self.hook(module, args, output)
        sub_args = (x.index_select(0, rows), *args[1:])
        if self.pre:
            new = self.hook(module, sub_args)
            return changed if new is None else (x.index_copy(0, rows, new[0]), *args[1:])
        new = self.hook(module, sub_args, output.index_select(0, rows))
        return changed if new is None else output.index_copy(0, rows, new)


def alike(modules: list[nn.Module]) -> bool:
    """Whether the modules compute the same function of their tensors: the same classes, submodule names,
    parameter and buffer shapes, and plain attributes (layouts, scales, flags) throughout."""
    def facts(m: nn.Module) -> list:
        out = []
        for name, sub in m.named_modules():
            plain = {k: v for k, v in vars(sub).items() if not k.startswith("_") and k not in ("training", "kept")}
            if any(torch.is_tensor(v) for v in plain.values()):
                return [object()]  # a tensor attribute: never alike (compared by identity)
            out.append((name, type(sub), plain, [(n, t.shape, t.dtype) for n, t in
                                                 (*sub.named_parameters(recurse=False),
                                                  *sub.named_buffers(recurse=False))]))
        return out

    first = facts(modules[0])
    return all(facts(m) == first for m in modules[1:])


def _state(tensors: list[torch.Tensor], adapters: list[nn.Module]) -> tuple:
    """What tells that stacked copies of ``tensors`` went stale: their in-place versions (loading, optimiser steps)
    and each adapter's device and dtype (``model.to``)."""
    first = [next(a.parameters(), None) for a in adapters]
    return (tuple(t._version for t in tensors), tuple((p.device, p.dtype) if p is not None else None for p in first))


def _classes(group: list[Routed]) -> list[tuple[list[int], Any]]:
    """The group's hooks in classes that can run at once: :class:`AdapterHook` s whose adapters are :func:`alike`,
    each class of two or more with its stacked tensors (``torch.func.stack_module_state``)."""
    from torch.func import stack_module_state

    classes: list[list[int]] = []
    for i, h in enumerate(group):
        if not isinstance(h.hook, AdapterHook) or h.hook.item is not None:  # tuple outputs: each set alone
            continue
        for members in classes:  # (the group's hooks share one mode)
            if alike([group[members[0]].hook.adapter, h.hook.adapter]):
                members.append(i)
                break
        else:
            classes.append([i])
    out = []
    for m in (m for m in classes if len(m) > 1):
        adapters = [group[i].hook.adapter for i in m]
        own = getattr(adapters[0], "stack", None) if hasattr(adapters[0], "forward_stacked") else None
        out.append((m, own(adapters) if own is not None else stack_module_state(adapters)))
    return out


def fused(group: list[Routed], module: nn.Module, args, output) -> tuple[Any, bool]:
    """Run each class of alike adapter hooks in the group (:func:`_classes`) at once over the rows of its sets
    present, with the sets' stacked tensors (kept until they change: :func:`_state`): the adapter's own batched
    form where it has one (``stack`` / ``forward_stacked``, e.g. :class:`mslora.methods.mslora.MSLoRA`: each row
    with its set's tensors, no padding), else one ``torch.func.vmap`` over the sets of ``functional_call`` on their
    rows, padded to the largest set's count. The other hooks of those classes
    skip this call. Returns (the new output, or input for a pre-hook, or None when no class ran; whether the group's
    first hook's set was among those answered)."""
    from torch.func import functional_call, vmap

    r = group[0].router
    adapters = [getattr(h.hook, "adapter", None) for h in group]
    cache = getattr(group[0], "stacked", None)  # (tensors, their state, classes)
    if cache is None or cache[1] != _state(cache[0], adapters):
        tensors = [t for a in adapters if a is not None for t in (*a.parameters(), *a.buffers())]
        group[0].stacked = cache = (tensors, _state(tensors, adapters), _classes(group))
    if not cache[2]:
        return None, False
    mode = group[0].hook.mode  # one AdapterHook mode per group (Router.groups)
    target = args[0] if mode == "input" else output  # what the hooks replace, updated class by class
    ran, done = False, False
    for members, stacked in cache[2]:
        here = [k for k, i in enumerate(members) if group[i].name in r.rows]
        if len(here) < 2:
            continue
        x = args[0] if mode == "parallel" else target
        rows = [r.rows_of(group[members[k]].name, x.shape[0]) for k in here]
        idx = torch.cat(rows)
        template, y = adapters[members[0]], None
        if hasattr(template, "forward_stacked"):  # the module's own batched form: each row with its set's tensors
            which = torch.cat([torch.full((len(rw),), here[k], device=x.device) for k, rw in enumerate(rows)])
            if len(idx) == x.shape[0]:  # every row: in the batch's own order, nothing gathered
                which = torch.empty_like(which).index_copy_(0, idx, which)
                whole = template.forward_stacked(stacked, x, which)
                target = target + whole if mode == "parallel" else whole
            else:
                y = template.forward_stacked(stacked, x.index_select(0, idx), which)
        else:
            params, buffers = stacked
            which = torch.cat([torch.full((len(rw),), k, device=x.device) for k, rw in enumerate(rows)])
            pos = torch.cat([torch.arange(len(rw), device=x.device) for rw in rows])
            padded = x.new_zeros((len(here), max(len(rw) for rw in rows), *x.shape[1:]))
            padded[which, pos] = x.index_select(0, idx)
            if len(here) == len(members):  # every set of the class present: the stacks as they are
                p, b = params, buffers
            else:
                sel = torch.tensor(here, device=x.device)
                p, b = ({k: v.index_select(0, sel) for k, v in d.items()} for d in (params, buffers))
            y = vmap(lambda p, b, xs: functional_call(template, (p, b), (xs,)))(p, b, padded)[which, pos]
        if y is not None:
            target = target.index_copy(0, idx, target.index_select(0, idx) + y if mode == "parallel" else y)
        for k in here:
            group[members[k]].skip = members[k] != 0
        ran, done = True, done or members[here[0]] == 0
    if not ran:
        return None, False
    return ((target, *args[1:]) if mode == "input" else target), done


class RoutedHead(nn.Module):
    """The classifier of a model with named sets: each set's own head (``heads[name]``, e.g. a Linear) on its
    samples. Output (B, C) for one active set; in a mixed batch (B, max C) with each sample's logits in its first
    C_set columns and -inf after them (a softmax gives those classes probability 0)."""

    def __init__(self, router: Router) -> None:
        super().__init__()
        self.router = router
        self.heads = nn.ModuleDict()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, ...) the features the classifier takes -> logits as above."""
        r = self.router
        if r.rows is None:
            return self.heads[r.active](x)
        width = max(r.sets[n].num_classes for n in r.rows)
        out = x.new_full((x.shape[0], width), float("-inf"))
        for name, idx in r.rows.items():
            logits = self.heads[name](x.index_select(0, idx))
            out[idx, :logits.shape[1]] = logits
        return out


def router(model: nn.Module) -> Router | None:
    """The model's :class:`Router`, or None when it holds no named sets."""
    return getattr(model, "mslora_router", None)


def named_adapters(model: nn.Module) -> dict[str, NamedAdapter]:
    """The named sets on ``model`` by name, in load order (empty when none)."""
    r = router(model)
    return dict(r.sets) if r else {}


def set_adapter(model: nn.Module, name: str) -> nn.Module:
    """Make ``name`` the set every sample goes through (``model(x)`` then gives its outputs); returns the model.

    Raises:
        ValueError: the model has no set of that name (the message lists those it has).
    """
    r = router(model)
    if r is None or name not in r.sets:
        raise ValueError(f"model has no adapter named '{name}'; it has: {', '.join(r.sets) if r else '(none)'}")
    r.active = name
    return model


@contextmanager
def mixed_batch(model: nn.Module, adapter_names: Sequence[str]):
    """Within the block, sample i of the next batches goes through set ``adapter_names[i]`` (a batch of
    ``len(adapter_names)`` samples), the frozen backbone running once; ``model(x)`` gives padded logits
    (:class:`RoutedHead`).

    Raises:
        ValueError: a name the model does not have (sets that cannot share a batch were refused when they loaded).
    """
    r = router(model)
    unknown = sorted({n for n in adapter_names if r is None or n not in r.sets})
    if unknown:
        raise ValueError(f"model has no adapter named {', '.join(map(repr, unknown))}; "
                         f"it has: {', '.join(r.sets) if r else '(none)'}")
    names, device = list(adapter_names), next(model.parameters()).device
    rows = {n: torch.tensor([i for i, m in enumerate(names) if m == n], device=device) for n in dict.fromkeys(names)}
    r.rows, r.batch, r.names = rows, len(names), names
    try:
        yield model
    finally:
        r.rows, r.batch, r.names = None, 0, []


def peft_layers(model: nn.Module, name: str) -> list[tuple[str, nn.Module]]:
    """The PEFT layers of ``model`` holding an adapter named ``name``, by qualified name."""
    from peft.tuners.tuners_utils import BaseTunerLayer  # PEFT takes seconds to import: only when a set loads

    return [(n, m) for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)
            and name in getattr(m, m.adapter_layer_names[0], {})]


def peft_names(tensors: dict[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
    """An adapter file's PEFT tensors (``...lora_A.default.weight``) under the set's name (``...lora_A.<name>...``)."""
    rx = re.compile(r"(\.(?:lora|hira)_\w+)\.default(?=\.|$)")
    return {rx.sub(rf"\1.{name}", k): v for k, v in tensors.items()}


def drop_peft(model: nn.Module, name: str) -> None:
    """Take set ``name``'s adapters out of the PEFT layers (PEFT's ``delete_adapter``), and a layer that holds no
    other set's back to its base layer."""
    for qual, layer in peft_layers(model, name):
        if len(getattr(layer, layer.adapter_layer_names[0])) > 1:
            layer.delete_adapter(name)
        else:
            parent, _, child = qual.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, layer.get_base_layer())


def mix_refusal(model: nn.Module, rec: Adaptation, name: str) -> str | None:
    """Why the adaptation ``rec`` just made on ``model`` as set ``name`` cannot share the backbone with other sets,
    or None. PEFT layers can, where PEFT mixes them in a batch (its ``_mixed_batch_forward``, and its own check of
    ``adapter_names``: LoRA on Linear and Conv2d, not DoRA)."""
    own = re.compile(rf"\.(lora|hira)_\w+\.{re.escape(name)}(\.|$)")
    outside = sorted(n for n in rec.added if not n.startswith(ADAPTERS + ".") and not own.search(n))
    for layer_name, layer in peft_layers(model, name) if len(outside) < len(rec.added) else ():
        try:
            if not hasattr(layer, "_mixed_batch_forward"):
                raise TypeError(f"{type(layer).__name__} layers have no mixed-batch forward")
            layer._check_forward_args(torch.empty(1), adapter_names=[name])
        except (TypeError, ValueError) as e:
            return f"PEFT cannot mix '{rec.method}' adapters in a batch ('{layer_name}': {e})"
    if outside or rec.originals:
        changed = (outside or sorted(rec.originals))[0]
        return (f"'{rec.method}' changes what every sample shares, the backbone's own layers or weights "
                f"(e.g. '{changed}')")
    foreign = [h for h in _hooks(rec) if not isinstance(h, ROUTABLE) and h not in NEUTRAL]
    if foreign:
        return (f"'{rec.method}' acts through hooks that do not act on each sample alone "
                f"({getattr(foreign[0], '__qualname__', type(foreign[0]).__name__)}; VPT's prompts change the token "
                "count of the whole batch)")
    return None


def _hooks(rec: Adaptation) -> list[Any]:
    """The hook callables behind the record's handles."""
    out = []
    for handle in rec.handles:
        hooks = handle.hooks_dict_ref()
        if hooks is not None and handle.id in hooks:
            out.append(hooks[handle.id])
    return out


def _route_hooks(rec: Adaptation, r: Router, name: str) -> None:
    """Wrap every adapter hook of ``rec`` in a :class:`Routed` hook for set ``name``, in place, each in the group of
    its module's hooks of the same kind (``r.groups``)."""
    for handle in rec.handles:
        hooks = handle.hooks_dict_ref()
        hook = hooks.get(handle.id) if hooks is not None else None
        if isinstance(hook, ROUTABLE):
            pre = isinstance(hook, KeepInput) or (isinstance(hook, AdapterHook) and hook.mode == "input")
            group = r.groups.setdefault((id(hooks), type(hook).__name__, getattr(hook, "mode", None)), [])
            hooks[handle.id] = Routed(r, name, hook, pre, group)


def _head_slot(model: nn.Module) -> tuple[nn.Module, str]:
    """(parent module, attribute) of the model's one classifier module.

    Raises:
        ValueError: the model has no classifier, or more than one (distilled heads).
    """
    names = head_module(model)
    if len(names) != 1:
        raise ValueError(f"named adapters need a model with one classifier module (timm get_classifier()); "
                         f"{type(model).__name__} has {len(names)}")
    parent, _, attr = names[0].rpartition(".")
    return (model.get_submodule(parent) if parent else model), attr


def begin(model: nn.Module, tensors: dict[str, torch.Tensor], name: str) -> None:
    """Make ``model`` ready to adapt for set ``name``: the named sets' modules set aside and a fresh classifier
    the width of the file's head (timm ``reset_classifier``); :func:`finish` or :func:`abort` must follow.

    Raises:
        ValueError: the model holds an unnamed adaptation, already has a set of that name, holds a set that cannot
            be mixed, or the file holds no classifier head for this model.
    """
    r = router(model)
    if r is None and adaptation(model) is not None:
        raise ValueError("model already holds an unnamed adapter: load every adapter of a model with a name")
    if r is not None and name in r.sets:
        raise ValueError(f"model already has an adapter named '{name}'")
    for other in (r.sets.values() if r else ()):
        if other.mix_refusal:
            raise ValueError(f"adapter '{other.name}' on this model cannot share it: {other.mix_refusal}; load each "
                             "such adapter on a model of its own")
    parent, attr = _head_slot(model)
    prefix = next(n for n, m in model.named_modules() if m is getattr(parent, attr))
    width = tensors.get(f"{prefix}.weight")
    if width is None:
        raise ValueError(f"adapter file holds no '{prefix}.weight' classifier for this model")
    if r is None:
        r = Router()
        model.mslora_router = r
    aside = model._modules.pop(ADAPTERS, None)
    r.pending = (getattr(parent, attr), aside, r.active)  # what abort() puts back
    r.active = None  # no set's hooks run while the new one is placed
    _LOADING.set(name)
    model.reset_classifier(width.shape[0])
    p = next(model.parameters())
    parent, attr = _head_slot(model)
    getattr(parent, attr).to(device=p.device, dtype=p.dtype)


def finish(model: nn.Module, path: str | Path, meta: dict[str, Any], name: str) -> None:
    """After adapting and loading set ``name``: route its hooks, move its modules to ``model.adapters[name]`` and
    its head to the :class:`RoutedHead`, and forget the unnamed record.

    Raises:
        NotMixable: the set cannot be mixed and the model holds other sets (the caller undoes it: :func:`abort`).
    """
    r = router(model)
    original, aside, active = r.pending
    rec = adaptation(model)
    reason = mix_refusal(model, rec, name)
    if reason and r.sets:
        raise NotMixable(f"adapter '{name}' cannot share this model with {', '.join(r.sets)}: {reason}; load it on "
                         "a model of its own")
    _route_hooks(rec, r, name)
    for _, layer in peft_layers(model, name) if reason is None else ():
        if id(layer) not in r.peft_layers:
            r.peft_layers.add(id(layer))
            layer.register_forward_pre_hook(PeftRoute(r), with_kwargs=True)
    _LOADING.set(None)
    parent, attr = _head_slot(model)
    head = getattr(parent, attr)
    routed = original if isinstance(original, RoutedHead) else RoutedHead(r)
    routed.heads[name] = head
    setattr(parent, attr, routed)
    named = aside if aside is not None else nn.ModuleDict()
    named[name] = model._modules.pop(ADAPTERS, None) or nn.ModuleDict()
    model.add_module(ADAPTERS, named)
    del model.mslora_adaptation
    r.pending = None
    r.sets[name] = NamedAdapter(name, Path(path), meta, rec, int(head.weight.shape[0]), reason)
    r.active = active or name


def abort(model: nn.Module) -> None:
    """Undo a set's loading that failed after :func:`begin` (its adaptation already removed, ``mslora.unadapt``):
    the named sets, the classifier and the active set put back."""
    r = router(model)
    original, aside, r.active = r.pending
    _LOADING.set(None)
    parent, attr = _head_slot(model)
    setattr(parent, attr, original)
    if aside is not None:
        model.add_module(ADAPTERS, aside)
    r.pending = None
    if not r.sets:
        del model.mslora_router
