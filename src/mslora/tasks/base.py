"""What a task supplies to the engine. The engine knows no task by name; it asks a :class:`Task` for the model,
the data, the loss dict and the evaluation, and keeps the epoch with the best ``task.best_metric``. A task
registers itself with :func:`mslora.registry.register_task`; ``mslora train --task NAME`` finds it by name.

:class:`DenseTask` is what detection and segmentation share: the timm backbone adapted exactly as in
classification (its classifier removed) inside a model the task builds around it (a detector, UPerNet), which
trains whole (neck and heads), with the backbone's BatchNorm statistics frozen under every method.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from mslora.backbones import build_backbone, check_backbone_name
from mslora.core.adapt import adapt, check_backbone, keep_batchnorm_frozen, lift_adaptation
from mslora.core.state import load_adapter_state, read_adapter
from mslora.registry import get_method


class Task:
    """What a task supplies to the engine (subclass it and register it with
    :func:`mslora.registry.register_task`).

    Construction (``Task(cfg)``) validates the config and loads the data, before anything is written; with
    ``classes`` (names, in label order: what a trained run's adapter file records) no data is loaded, and the task
    can build and rebuild models but has no ``datasets``.

    Attributes:
        best_metric: key of :meth:`evaluate`'s result that picks the best epoch (higher is better).
        classes: class names in label order.
        datasets: ``{"train": ..., "val": ..., "test": ...}`` map-style datasets, indexed by ``(index, seed)``
            (see :class:`mslora.engine.sampler.EpochSampler`); empty without data.
        collate_fn: DataLoader collate function, or None for PyTorch's default.
        keep_last: keep the last epoch instead of the best on validation (the validation images were trained on,
            as in VTAB-1k's train800val200 protocol).

    Raises (on construction):
        ValueError / FileNotFoundError: bad method options, backbone name or data (nothing written yet).
    """

    best_metric: str = ""
    collate_fn: Callable | None = None
    keep_last: bool = False
    preprocessing: dict[str, Any] | None = None  # set by set_transforms; recorded in the adapter file

    def __init__(self, cfg, data: str | None = None, classes: list[str] | None = None) -> None:
        get_method(cfg.method).make_config(**cfg.method_options)  # fail on bad options before loading anything
        check_backbone_name(cfg.backbone)
        self.cfg, self.data, self.datasets = cfg, None, {}
        if classes is None:
            self.data = self.load_data(data or cfg.data)
            self.datasets = {"train": self.data.train, "val": self.data.val, "test": self.data.test}
            classes = self.data.classes
        self.classes = list(classes)

    @property
    def num_classes(self) -> int:
        """Number of classes."""
        return len(self.classes)

    def load_data(self, data: str) -> Any:
        """The task's data (``train``, ``val``, ``test`` datasets and ``classes``) from a source path or name."""
        raise NotImplementedError

    def build_model(self, adapter: str | Path | None = None) -> nn.Module:
        """The model to train: the adapted backbone inside whatever the task puts around it; with ``adapter`` (an
        adapter file written by a run of this task), the trained model rebuilt from it."""
        raise NotImplementedError

    def set_transforms(self, model: nn.Module) -> None:
        """Give the datasets the transforms the model expects (e.g. its normalisation) and record them in
        :attr:`preprocessing` (input size, mean, std, ...: what :meth:`input_transform` rebuilds them from)."""

    def input_transform(self, preprocessing: dict[str, Any]) -> Callable[[torch.Tensor], torch.Tensor]:
        """The evaluation transform of one image, uint8 (3, H, W) -> the model's input, from the
        :attr:`preprocessing` an adapter file records."""
        raise NotImplementedError

    def predict(self, model: nn.Module, images: list[torch.Tensor], sizes: list[tuple[int, int]]
                ) -> list[dict[str, Any]]:
        """Predictions for images already through :meth:`input_transform` (``sizes``: each original (H, W)), one
        dict per image in the original image's pixel coordinates (the keys are the task's)."""
        raise NotImplementedError

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
        """Task facts the adapter file keeps so that a run's model can be rebuilt from it (class names ...)."""
        return {"num_classes": self.num_classes, "classes": self.classes,
                **({"dataset": self.data.name} if self.data is not None else {}),
                **({"preprocessing": self.preprocessing} if self.preprocessing is not None else {})}


class DenseTask(Task):
    """Detection and segmentation: the adapted backbone (classifier removed, any input size) inside the model
    :meth:`wrap` builds; the adapter file holds the adapter, the neck and the heads, and ``count_parameters``
    reports neck + heads as ``head_params`` (:func:`mslora.core.adapt.lift_adaptation`)."""

    def wrap(self, backbone: nn.Module) -> nn.Module:
        """The task's model (detector, segmenter) around the adapted backbone."""
        raise NotImplementedError

    def build_model(self, adapter: str | Path | None = None) -> nn.Module:
        """The adapted backbone inside the task's model; with ``adapter``, rebuilt and loaded from that file
        (adapter, neck and heads). The backbone's BatchNorm statistics stay frozen under every method, ``full``
        included, as detectors keep them."""
        cfg = self.cfg
        model = build_backbone(cfg.backbone, 0, cfg.pretrained, cfg.weights, img_size=cfg.img_size,
                               drop_path_rate=cfg.drop_path_rate, dynamic=True)
        if adapter is None:
            method, options = cfg.method, cfg.method_options
        else:
            tensors, meta = read_adapter(adapter)
            method, options = meta["method"], meta["config"]
        adapt(model, method, **options)
        keep_batchnorm_frozen(model)
        outer = lift_adaptation(self.wrap(model), model)
        if adapter is not None:
            check_backbone(outer, meta, adapter)
            load_adapter_state(outer, tensors)
        return outer

    def metadata(self) -> dict[str, Any]:
        """Number of classes, class names, dataset name and layout."""
        return {**super().metadata(), **({"layout": self.data.layout} if self.data is not None else {})}
