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
from typing import Any, Callable, NamedTuple, Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn

from mslora.data.images import read_rgb
from mslora.engine.rebuild import rebuild


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
    missing = [k for k in ("classes", "preprocessing") if k not in meta]
    if missing:
        raise ValueError(f"adapter file of '{run}' lacks {' and '.join(missing)} (written before adapter files "
                         f"recorded them); evaluate it with mslora eval, or retrain to use it here")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = model.to(device=device, dtype=dtype).eval()
    task.preprocessing = meta["preprocessing"]
    transforms = task.input_transform(task.preprocessing)
    model.mslora_inference = (task, transforms)  # what predict() needs to take the model alone
    return Run(model, transforms, list(meta["classes"]))


def as_image(image: Any) -> torch.Tensor:
    """An image as uint8 RGB (3, H, W): a path, a PIL image, an (H, W) / (H, W, 3) / (H, W, 4) array, or a tensor
    (3, H, W) (uint8, or float in [0, 1]).

    Raises:
        ValueError: an unreadable file (named) or an array / tensor of another shape or type.
    """
    if isinstance(image, (str, Path)):
        return read_rgb(image)
    if isinstance(image, Image.Image):
        return torch.from_numpy(np.asarray(image.convert("RGB")).copy()).permute(2, 0, 1)
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim not in (2, 3):
            raise ValueError(f"an image array must be uint8 (H, W) or (H, W, 3|4), got {image.dtype} {image.shape}")
        return as_image(Image.fromarray(image))
    if torch.is_tensor(image) and image.ndim == 3 and image.shape[0] in (1, 3):
        image = image.expand(3, -1, -1)
        return image if image.dtype == torch.uint8 else (image.clamp(0, 1) * 255).round().to(torch.uint8)
    raise ValueError(f"cannot read {type(image).__name__} as an image: expected a path, a PIL image, a uint8 array "
                     "or a (3, H, W) tensor")


def predict(model: Run | nn.Module | str | Path, images: Sequence[Any], batch_size: int = 16
            ) -> list[dict[str, Any]]:
    """One prediction per image, in the original image's pixel coordinates: classification ``label`` and
    ``probabilities`` (class order); detection ``boxes`` (N, 4) xyxy, ``labels``, ``scores``, ``masks`` (N, H, W);
    segmentation ``label_map`` (H, W) class indices.

    Args:
        model: what :func:`load_run` returned (or its model), or a run directory / adapter file to load.
        images: paths, PIL images, uint8 arrays or tensors (see :func:`as_image`).
        batch_size: images per forward pass.

    Raises:
        ValueError: a model that did not come from :func:`load_run`, an unreadable image, or a batch size below 1.
    """
    if isinstance(model, (str, Path)):
        model = load_run(model)
    model = model.model if isinstance(model, Run) else model
    if getattr(model, "mslora_inference", None) is None:
        raise ValueError("predict takes what mslora.load_run returns (the model knows its task and transforms)")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be a positive integer")
    task, transforms = model.mslora_inference
    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    results = []
    for start in range(0, len(images), batch_size):
        raw = [as_image(im) for im in images[start:start + batch_size]]
        batch = [transforms(im).to(device=device, dtype=dtype) for im in raw]
        results += task.predict(model, batch, [tuple(im.shape[-2:]) for im in raw])
    return results
