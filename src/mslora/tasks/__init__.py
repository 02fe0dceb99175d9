"""Tasks: what the engine trains a model for. The engine knows no task by name; it asks a :class:`Task` for the
model, the data, the loss dict and the evaluation, and keeps the epoch with the best ``task.best_metric``.

A task registers itself with :func:`register_task`; ``mslora train --task NAME`` finds it by name.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.data import Dataset


class Task:
    """What a task supplies to the engine (subclass it and register it with :func:`register_task`).

    Construction (``Task(cfg)``) validates the config and loads the data, before anything is written.

    Attributes:
        best_metric: key of :meth:`evaluate`'s result that picks the best epoch (higher is better).
        datasets: ``{"train": ..., "val": ..., "test": ...}`` map-style datasets, indexed by ``(index, seed)``
            (see :class:`mslora.data.EpochSampler`).
        collate_fn: DataLoader collate function, or None for PyTorch's default.
        keep_last: keep the last epoch instead of the best on validation (the validation images were trained on,
            as in VTAB-1k's train800val200 protocol).
    """

    best_metric: str = ""
    collate_fn: Callable | None = None
    keep_last: bool = False
    datasets: dict[str, Dataset]

    def build_model(self, adapter: str | Path | None = None) -> nn.Module:
        """The model to train: the adapted backbone inside whatever the task puts around it; with ``adapter`` (an
        adapter file written by a run of this task), the trained model rebuilt from it."""
        raise NotImplementedError

    def set_transforms(self, model: nn.Module) -> None:
        """Give the datasets the transforms the model expects (e.g. its normalisation)."""

    def losses(self, model: nn.Module, batch: Any) -> tuple[dict[str, torch.Tensor], int]:
        """Loss terms of one batch (the engine sums them) and the number of images in it."""
        raise NotImplementedError

    def evaluate(self, model: nn.Module, loader: Any, gather: Callable[[Any], Any], desc: str) -> dict[str, float]:
        """Metrics over a whole split; ``gather`` collects per-process results over all processes without
        counting an item twice (Accelerate's ``gather_for_metrics``), so every process returns the same numbers."""
        raise NotImplementedError

    def collapsed(self, history: list[dict[str, Any]]) -> str | None:
        """Why the run counts as collapsed (a sentence), or None; ``history`` holds one record per epoch."""
        return None

    def metadata(self) -> dict[str, Any]:
        """Task facts the adapter file keeps so that ``mslora eval`` can rebuild the model (e.g. class names)."""
        return {}


_TASKS: dict[str, type[Task]] = {}


def register_task(name: str) -> Callable[[type[Task]], type[Task]]:
    """Class decorator registering a :class:`Task` under ``name``.

    Raises:
        ValueError: ``name`` is already registered.
    """

    def deco(cls: type[Task]) -> type[Task]:
        if name in _TASKS:
            raise ValueError(f"task '{name}' is registered twice")
        _TASKS[name] = cls
        return cls

    return deco


def get_task(name: str) -> type[Task]:
    """The task class registered as ``name``.

    Raises:
        ValueError: unknown task, naming the known ones.
    """
    import mslora.tasks.classify  # noqa: F401  (registers the built-in tasks)
    import mslora.tasks.dense  # noqa: F401
    from mslora.registry import lookup

    return lookup(_TASKS, name, "task")


def list_tasks() -> list[str]:
    """Names of the registered tasks, sorted."""
    import mslora.tasks.classify  # noqa: F401
    import mslora.tasks.dense  # noqa: F401

    return sorted(_TASKS)
