"""Using a trained adapter: :func:`load_run` gives the trained model of any task with its input transforms and class
names, from the run's adapter file alone (no training data), and :func:`predict` answers for images.

    import mslora
    model, transforms, classes = mslora.load_run("runs/mslora-tf_efficientnet_lite0-20261201-125142")
    mslora.predict(model, ["shirt.jpg", "boot.png"])   # [{"label": "Shirt", "probabilities": [...]}, ...]

The facts this needs (task and its options, class names, input size and normalisation) are the adapter file's
metadata (:meth:`mslora.tasks.base.Task.metadata`); files written before the preprocessing was recorded there are
refused with what is missing.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import numpy as np
import torch
from accelerate.utils import set_seed
from PIL import Image
from torch import nn

from mslora.core.adapt import load_adapter
from mslora.core.named import mixed_batch, router
from mslora.data.images import read_rgb, to_rgb
from mslora.engine.rebuild import rebuild, run_config
from mslora.registry import get_task


class Run(NamedTuple):
    """A trained run ready for inference (:func:`load_run`).

    Attributes:
        model: the task's model (classifier, detector or segmenter) in eval mode, on the requested device.
        transforms: one image, uint8 (3, H, W) or PIL, -> the model's input tensor (the run's evaluation transform).
        classes: class names in label order.
    """

    model: nn.Module
    transforms: Callable[[Any], torch.Tensor]
    classes: list[str]


def load_run(run: str | Path, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> Run:
    """The trained model of a run (its directory or ``adapter.safetensors``), its eval transforms and its classes.

    The backbone is built as in training (its pretrained weights, or the run's seed for a random init) and checked
    against the fingerprint the file records; the adapter and the head (or neck and heads) are loaded from the file.

    Args:
        run: a run directory or an adapter file written by ``mslora train``.
        device: where the model runs; default CUDA when PyTorch sees it, else CPU.
        dtype: the model's parameter dtype (e.g. ``torch.bfloat16``); default as trained (float32).

    Raises:
        FileNotFoundError: no adapter file.
        ValueError: not a training run's adapter file, one that lacks what inference needs (named), or a backbone
            whose weights differ from the ones it was trained on.
    """
    task, model, meta = rebuild(run, workers=0)
    transforms = _inference(task, meta, run)
    model = _place(model, task.cfg, device, dtype)
    model.mslora_inference = (task, transforms)  # what predict() needs to take the model alone
    return Run(model, transforms, list(meta["classes"]))


def load_runs(runs: Mapping[str, str | Path], device: str | torch.device | None = None,
              dtype: torch.dtype | None = None) -> nn.Module:
    """One backbone with the adapters of several classification runs as named sets (``mslora.load_adapter(...,
    name=...)``), each with its own head, classes and transforms; the first is active. :func:`predict` with
    ``adapter_names`` then sends each image through its own adapter in one batch.

    Args:
        runs: name -> run directory or adapter file, in load order.
        device, dtype: as :func:`load_run`.

    Raises:
        FileNotFoundError: no adapter file.
        ValueError: no runs, a detection or segmentation run (named sets share a classifier backbone: load those
            with :func:`load_run`), a file that lacks what inference needs, runs trained on different backbones or
            weights, or a method that cannot share the backbone (named, with the reason).
    """
    if not runs:
        raise ValueError("load_runs needs at least one NAME -> run")
    model, infos = None, {}
    for name, run in runs.items():
        path, meta, cfg = run_config(run)
        if cfg.task != "classify":
            raise ValueError(f"run '{run}' is a {cfg.task} run; adapters share one backbone for classification runs "
                             "only: load it on its own with mslora.load_run")
        task = get_task(cfg.task)(cfg, classes=meta["classes"])
        infos[name] = (task, _inference(task, meta, run))
        if model is None:
            set_seed(cfg.seed)  # a random-init backbone is re-drawn as in training
            model, first = task.backbone(), cfg
        load_adapter(model, path, name=name)
    model = _place(model, first, device, dtype)
    model.mslora_inference = infos
    return model


def _place(model: nn.Module, cfg: Any, device: str | torch.device | None, dtype: torch.dtype | None) -> nn.Module:
    """``model`` in eval mode on ``device`` (default CUDA when PyTorch sees it, else CPU) and ``dtype``, in the
    memory format its run trained in (``cfg.channels_last``: oneDNN's depth-wise convolutions are several times
    faster channels-last on CPU)."""
    model = model.to(device=torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu")), dtype=dtype)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model.eval()


def _inference(task: Any, meta: dict[str, Any], run: str | Path) -> Callable[[Any], torch.Tensor]:
    """The run's eval transforms (its task's, from the recorded preprocessing), kept on ``task``.

    Raises:
        ValueError: the adapter file lacks the class names or the preprocessing (older files).
    """
    missing = [k for k in ("classes", "preprocessing") if k not in meta]
    if missing:
        raise ValueError(f"adapter file of '{run}' lacks {' and '.join(missing)} (written before adapter files "
                         f"recorded them); evaluate it with mslora eval, or retrain to use it here")
    task.preprocessing = meta["preprocessing"]
    return task.input_transform(task.preprocessing)


def as_image(image: Any) -> torch.Tensor:
    """An image as uint8 RGB (3, H, W): a path, a PIL image, an (H, W) / (H, W, 3) / (H, W, 4) array, or a tensor
    (3, H, W) (uint8, or float in [0, 1]).

    Raises:
        ValueError: an unreadable file (named) or an array / tensor of another shape or type.
    """
    if isinstance(image, (str, Path)):
        return read_rgb(image)
    if isinstance(image, Image.Image):
        return torch.from_numpy(np.asarray(to_rgb(image)).copy()).permute(2, 0, 1)  # upright, 16-bit scaled
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim not in (2, 3):
            raise ValueError(f"an image array must be uint8 (H, W) or (H, W, 3|4), got {image.dtype} {image.shape}")
        return as_image(Image.fromarray(image))
    if torch.is_tensor(image) and image.ndim == 3 and image.shape[0] in (1, 3):
        image = image.expand(3, -1, -1)
        return image if image.dtype == torch.uint8 else (image.clamp(0, 1) * 255).round().to(torch.uint8)
    raise ValueError(f"cannot read {type(image).__name__} as an image: expected a path, a PIL image, a uint8 array "
                     "or a (3, H, W) tensor")


def predict(model: Run | nn.Module | str | Path, images: Sequence[Any], batch_size: int = 16,
            adapter_names: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """One prediction per image, in the original image's pixel coordinates: classification ``label`` and
    ``probabilities`` (class order); detection ``boxes`` (N, 4) xyxy, ``labels``, ``scores``, ``masks`` (N, H, W);
    segmentation ``label_map`` (H, W) class indices.

    Args:
        model: what :func:`load_run` or :func:`load_runs` returned (or its model), or a run directory / adapter
            file to load.
        images: paths, PIL images, uint8 arrays or tensors (see :func:`as_image`).
        batch_size: images per forward pass.
        adapter_names: with :func:`load_runs`' model, the named adapter for each image (default: the active one);
            images of different adapters share each forward pass (``mslora.mixed_batch``), those whose runs
            preprocess alike in one batch.

    Raises:
        ValueError: a model that did not come from :func:`load_run` / :func:`load_runs`, an unreadable image, a
            batch size below 1, or ``adapter_names`` for a model without named adapters, of another length than
            ``images`` or naming an adapter it does not have.
    """
    if isinstance(model, (str, Path)):
        model = load_run(model)
    model = model.model if isinstance(model, Run) else model
    info = getattr(model, "mslora_inference", None)
    if info is None:
        raise ValueError("predict takes what mslora.load_run or mslora.load_runs returns (the model knows its task "
                         "and transforms)")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be a positive integer")
    if not isinstance(info, dict):
        if adapter_names is not None:
            raise ValueError("adapter_names needs a model with named adapters (mslora.load_runs)")
        info, adapter_names = {None: info}, [None] * len(images)
    elif adapter_names is None:
        adapter_names = [router(model).active] * len(images)
    elif len(adapter_names) != len(images):
        raise ValueError(f"{len(adapter_names)} adapter_names for {len(images)} images: give one per image")
    unknown = sorted({str(n) for n in adapter_names if n not in info})
    if unknown:
        raise ValueError(f"no adapter named {', '.join(unknown)}; the model has {', '.join(map(str, info))}")
    results = [None] * len(images)
    for start in range(0, len(images), batch_size):
        for rows, names, batch, sizes in _groups(images, adapter_names, start, batch_size, info, model):
            for i, result in zip(rows, _predict_batch(model, info, names, batch, sizes)):
                results[i] = result
    return results


def _groups(images: Sequence[Any], names: Sequence[Any], start: int, size: int, info: dict, model: nn.Module):
    """The images ``start:start + size`` read and transformed, grouped by transform (one batch each): yields
    (indices into ``images``, adapter names, transformed images, original (H, W) sizes)."""
    p = next(model.parameters())
    groups: dict[int, list[int]] = {}
    for i in range(start, min(start + size, len(images))):
        groups.setdefault(repr(sorted(info[names[i]][0].preprocessing.items())), []).append(i)  # alike: one batch
    for rows in groups.values():
        raw = [as_image(images[i]) for i in rows]
        batch = [info[names[i]][1](im).to(device=p.device, dtype=p.dtype) for i, im in zip(rows, raw)]
        yield rows, [names[i] for i in rows], batch, [tuple(im.shape[-2:]) for im in raw]


def _predict_batch(model: nn.Module, info: dict, names: list, batch: list[torch.Tensor],
                   sizes: list[tuple[int, int]]) -> list[dict[str, Any]]:
    """Predictions for one batch: the task's own without named adapters, else one mixed forward whose logits each
    sample's task reads in its own classes (:class:`mslora.core.named.RoutedHead`)."""
    if names[0] is None:
        return info[None][0].predict(model, batch, sizes)
    with torch.no_grad(), mixed_batch(model, names):
        logits = model(torch.stack(batch))
    out = [None] * len(names)
    for name in dict.fromkeys(names):
        rows = [i for i, n in enumerate(names) if n == name]
        task = info[name][0]
        for i, answer in zip(rows, task.answer(logits[rows, :task.num_classes])):
            out[i] = answer
    return out
