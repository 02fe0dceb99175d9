"""Option fields and checks shared by every config dataclass (the methods' and the engine's).

Each field carries its help as data, Hugging Face PEFT's way (``field(default=..., metadata={"help": ...})``,
peft ``tuners/lora/config.py``): :func:`option` builds such a field, and the command line reads the help from it
(:func:`mslora.engine.config.add_fields`). ``runtime=True`` marks an option that changes how a model computes but
not what (an adapter file written before it existed loads with its default).

The checks raise ``ValueError`` naming the option, the value and what was expected, e.g.
``rank=0 must be a positive integer``.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Iterable


def option(default: Any = dataclasses.MISSING, help: str = "", *, runtime: bool = False,
           default_factory: Callable[[], Any] | None = None) -> Any:
    """A dataclass field with ``default`` (or ``default_factory``) and its ``help`` text in its metadata."""
    metadata = {"help": help, **({"runtime": True} if runtime else {})}
    if default_factory is not None:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def help_of(cls: type) -> dict[str, str]:
    """Field name -> help text of a config dataclass (empty for fields without help)."""
    return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(cls)}


def require(ok: bool, name: str, value: Any, expected: str) -> None:
    """Raise ``ValueError("{name}={value!r} must be {expected}")`` unless ``ok``."""
    if not ok:
        raise ValueError(f"{name}={value!r} must be {expected}")


def positive_int(name: str, value: int) -> None:
    """Raises ValueError unless ``value`` is an integer >= 1 (ranks, widths, counts)."""
    require(isinstance(value, int) and not isinstance(value, bool) and value >= 1, name, value, "a positive integer")


def probability(name: str, value: float) -> None:
    """Raises ValueError unless ``value`` is in [0, 1) (dropout rates)."""
    require(0.0 <= value < 1.0, name, value, "in [0, 1)")


def finite(name: str, value: float) -> None:
    """Raises ValueError unless ``value`` is a finite number (scales)."""
    require(math.isfinite(value), name, value, "a finite number")


def odd_sizes(name: str, sizes: Iterable[int]) -> tuple[int, ...]:
    """``sizes`` as a tuple of ints; raises ValueError unless it is a non-empty list of odd sizes (kernels)."""
    sizes = tuple(int(k) for k in sizes)
    if not sizes or any(k < 1 or k % 2 == 0 for k in sizes):
        raise ValueError(f"{name}={list(sizes)} must be a non-empty list of odd sizes")
    return sizes


def one_of(name: str, value: str, choices: Iterable[str]) -> None:
    """Raises ValueError unless ``value`` is one of ``choices``."""
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"{name}='{value}' is not one of {', '.join(choices)}")
