"""Methods and tasks by name.

A method is registered once, with the decorator :func:`register`, next to its implementation in
``mslora/methods/<name>.py``; a task with :func:`register_task` next to its own (``mslora/tasks/<name>.py``).
Everything else (``mslora.adapt``, the engine, the CLI, adapter files) finds them here by name and never imports a
method or task module directly. This module imports none of them: ``import mslora`` imports the plug-in packages
:mod:`mslora.methods` and :mod:`mslora.tasks`, whose modules register themselves.
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass
from typing import Any, Callable

from torch import nn


@dataclass(frozen=True)
class Method:
    """One registered adaptation method.

    Attributes:
        name: registry key, e.g. ``"mslora"``.
        config_cls: dataclass whose fields are the method's options, with the paper's names and defaults.
        apply: ``apply(model, config) -> dict | None``; modifies the (already frozen) model in place and may return
            copies of backbone tensors it rewrote, by their names in the plain model (for ``mslora.unadapt``).
        merge: ``merge(model, config) -> None`` folding the adapter into the backbone weights, or None when
            the method cannot merge; ``merge_impossible`` then says why.
        freeze_backbone: False only for methods that train backbone weights wholesale (full fine-tuning).
        undo: ``undo(model, config) -> None`` for what only the method can take out again (PEFT's layers), called by
            :func:`mslora.unadapt` before the generic clean-up (hooks, attached modules, parametrizations).
    """

    name: str
    config_cls: type
    apply: Callable[[nn.Module, Any], dict | None]
    merge: Callable[[nn.Module, Any], None] | None = None
    merge_impossible: str = ""
    freeze_backbone: bool = True
    undo: Callable[[nn.Module, Any], None] | None = None

    def make_config(self, **options: Any) -> Any:
        """Build the method's config from keyword options.

        Raises:
            ValueError: an option the method does not have (the message lists the valid ones).
        """
        names = [f.name for f in dataclasses.fields(self.config_cls)]
        unknown = sorted(set(options) - set(names))
        if unknown:
            raise ValueError(
                f"unknown option(s) {', '.join(unknown)} for method '{self.name}'; "
                f"expected some of: {', '.join(names) or '(none)'}"
            )
        hints = typing.get_type_hints(self.config_cls)
        for key, value in options.items():
            if not fits(value, hints[key]):
                raise ValueError(f"option {key}={value!r} of method '{self.name}' must be of type "
                                 f"{getattr(hints[key], '__name__', None) or str(hints[key]).replace('typing.', '')}")
        try:
            return self.config_cls(**options)
        except TypeError as e:  # e.g. a non-comparable value that slipped past the type check
            raise ValueError(f"invalid options for method '{self.name}': {e}") from None


def fits(value: Any, tp: Any) -> bool:
    """Whether an option value has its field's type ``tp`` (int passes for float; bool never passes for int or
    float; a list passes for a tuple of its element type)."""
    if tp is Any:
        return True
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return any(fits(value, a) for a in args)
    if tp is type(None):
        return value is None
    if origin is tuple:
        return isinstance(value, (tuple, list)) and all(fits(v, args[0]) for v in value)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, origin or tp)  # dict[str, Any] -> dict


_METHODS: dict[str, Method] = {}


def register(
    name: str,
    config_cls: type,
    *,
    merge: Callable[[nn.Module, Any], None] | None = None,
    merge_impossible: str = "",
    freeze_backbone: bool = True,
    undo: Callable[[nn.Module, Any], None] | None = None,
) -> Callable[[Callable], Callable]:
    """Decorator registering ``apply(model, config)`` under ``name`` (see :class:`Method` for the rest).

    Raises:
        ValueError: ``name`` is already registered.
    """

    def deco(apply: Callable) -> Callable:
        if name in _METHODS:
            raise ValueError(f"method '{name}' is registered twice")
        _METHODS[name] = Method(name, config_cls, apply, merge, merge_impossible, freeze_backbone, undo)
        return apply

    return deco


def get_method(name: str) -> Method:
    """Look a method up by name.

    Raises:
        ValueError: unknown name; the message lists close matches (difflib) or all methods.
    """
    return lookup(_METHODS, name, "method")


def lookup(table: dict[str, Any], name: str, kind: str) -> Any:
    """``table[name]``, or a ValueError naming the unknown ``kind`` with close matches (difflib) or all names."""
    if name not in table:
        close = difflib.get_close_matches(name, table, n=3, cutoff=0.5)
        hint = f"did you mean {', '.join(close)}?" if close else f"known {kind}s: {', '.join(sorted(table))}"
        raise ValueError(f"unknown {kind} '{name}'; {hint}")
    return table[name]


def list_methods() -> list[str]:
    """Names of all registered methods, sorted."""
    return sorted(_METHODS)


_TASKS: dict[str, type] = {}


def register_task(name: str) -> Callable[[type], type]:
    """Class decorator registering a task class (:class:`mslora.tasks.base.Task`) under ``name``.

    Raises:
        ValueError: ``name`` is already registered.
    """

    def deco(cls: type) -> type:
        if name in _TASKS:
            raise ValueError(f"task '{name}' is registered twice")
        _TASKS[name] = cls
        return cls

    return deco


def get_task(name: str) -> type:
    """The task class registered as ``name``.

    Raises:
        ValueError: unknown task, with close matches or the known ones.
    """
    return lookup(_TASKS, name, "task")


def list_tasks() -> list[str]:
    """Names of the registered tasks, sorted."""
    return sorted(_TASKS)
