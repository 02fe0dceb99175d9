"""Transforms and the datasets that apply them: every item's augmentation drawn from its own seed.

- :class:`Subset`: items of a base dataset with a transform of the whole item, called by :func:`seeded_call` with
  the seed the engine's sampler gives each item, so an augmentation depends on (seed, epoch, item) alone.
- Classification (MSLoRA Sec. 4.1): :func:`build_transforms`, wrapped by :func:`image_only` for (image, label) items.
- Dense tasks (torchvision v2: boxes, masks and label maps move with the image): :func:`detection_transform`,
  :func:`segmentation_transform` (mmseg's ADE20K pipeline).
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import InterpolationMode, v2

IGNORE = 255  # label of pixels that no loss or metric counts (VOC's border, ADE20K's "other", padding)


class Subset(Dataset):
    """Items ``indices`` of a base dataset, each a tuple (image, target), with a transform of the whole item.

    Items are indexed by position ``i`` or by ``(i, seed)`` (what :class:`mslora.engine.sampler.EpochSampler`
    yields): the transform then draws its randomness (crop, flip) from a generator seeded with ``seed`` alone, so an
    item's augmentation does not depend on which process or DataLoader worker loads it, nor on whether the run was
    resumed. Without a transform an item is returned as the base dataset gives it.
    """

    def __init__(self, base: Dataset, indices: Sequence[int], transform: Callable | None = None) -> None:
        self.base, self.indices, self.transform = base, list(indices), transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, key: int | tuple[int, int]) -> Any:
        i, seed = key if isinstance(key, tuple) else (key, None)
        item = self.base[self.indices[i]]
        return item if self.transform is None else seeded_call(seed, self.transform, *item)


def fingerprint(subset: Subset) -> dict[str, Any]:
    """What identifies a split's items, to tell whether a resumed run still sees the data it started on: their
    count and a SHA-256 over each item's identity in order (its file and label where the base dataset lists them:
    ``samples`` of an ImageFolder, ``items`` of the listed formats, ``ids`` of COCO / VOC; else its index and the
    base's size, e.g. Fashion-MNIST's idx files)."""
    import hashlib

    base, h = subset.base, hashlib.sha256()
    listed = getattr(base, "samples", None) or getattr(base, "items", None)
    ids = getattr(base, "ids", None)
    for i in subset.indices:
        if listed is not None:
            item = listed[i]
            key = repr(item[:2]) if isinstance(item, tuple) else repr(item)
        else:
            key = repr(ids[i]) if ids is not None else f"{i}/{len(base)}"
        h.update(key.encode() + b"\n")
    return {"images": len(subset.indices), "sha256": h.hexdigest()}


def seeded_call(seed: int | None, fn: Callable, *args: Any) -> Any:
    """``fn(*args)`` with torch's global CPU generator seeded with ``seed`` (None: as it is), its state put back
    after: torchvision v2 transforms draw from that generator, so an item's augmentation depends on ``seed`` alone.
    (torch.manual_seed / fork_rng cost ~120 us an item, these ~4 us.)"""
    if seed is None:
        return fn(*args)
    gen = torch.default_generator
    state = gen.get_state()
    gen.manual_seed(seed)
    try:
        return fn(*args)
    finally:
        gen.set_state(state)


def image_only(transform: Callable) -> Callable:
    """A transform of (image, label) items that applies ``transform`` to the image and gives the label as an int."""

    def tf(image: Any, label: Any) -> tuple[Any, int]:
        return transform(image), int(label)

    return tf


def build_transforms(img_size: int, mean: Sequence[float], std: Sequence[float], crop_pct: float = 0.875,
                     interpolation: str = "bicubic", train: bool = True) -> v2.Compose:
    """Torchvision v2 transforms of MSLoRA Sec. 4.1: RandomResizedCrop + horizontal flip (p=0.5) for training,
    Resize(img_size / crop_pct) + CenterCrop for evaluation (Resize(256) + CenterCrop(224) at crop_pct=0.875).

    Input: PIL image or uint8 tensor, grey or RGB. Output: float tensor (3, img_size, img_size), normalised.
    """
    interp = InterpolationMode(interpolation) if interpolation in {m.value for m in InterpolationMode} else InterpolationMode.BICUBIC
    if train:
        geometry = [v2.RandomResizedCrop(img_size, interpolation=interp, antialias=True), v2.RandomHorizontalFlip(0.5)]
    else:
        geometry = [v2.Resize(int(img_size / crop_pct), interpolation=interp, antialias=True), v2.CenterCrop(img_size)]
    return v2.Compose([v2.ToImage(), v2.RGB(), *geometry, v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)])


def detection_transform(train: bool) -> Callable:
    """(image uint8 (3, H, W), target) -> (image float in [0, 1], target): a horizontal flip (p = 0.5) in training
    (boxes and masks flipped with the image); the detector itself resizes and normalises."""
    flip = v2.RandomHorizontalFlip(0.5)

    def tf(image: torch.Tensor, target: dict) -> tuple[torch.Tensor, dict]:
        if train:
            h, w = image.shape[-2:]
            t = dict(target, boxes=tv_tensors.BoundingBoxes(target["boxes"], format="XYXY", canvas_size=(h, w)))
            if "masks" in t:
                t["masks"] = tv_tensors.Mask(t["masks"])
            image, t = flip(tv_tensors.Image(image), t)
            target = {k: v.as_subclass(torch.Tensor) if isinstance(v, torch.Tensor) else v for k, v in t.items()}
            image = image.as_subclass(torch.Tensor)
        return v2.functional.to_dtype(image, torch.float32, scale=True), target  # uint8 or float in, [0, 1] out

    return tf


def segmentation_transform(train: bool, img_size: int, mean, std, scale: tuple[float, float] = (0.5, 2.0)) -> Callable:
    """(image uint8 (3, H, W), labels (H, W)) -> (normalised float image, labels).

    Training (mmseg's ADE20K pipeline, at ``img_size``): shorter side resized to ``img_size`` x U(scale), a random
    ``img_size`` x ``img_size`` crop (padded with 0 / :data:`IGNORE`), a horizontal flip. Evaluation: the image's shorter
    side resized to ``img_size``, the labels kept at full resolution (metrics are computed on the original pixels).
    """
    norm = v2.Normalize(list(mean), list(std))
    if train:
        geo = v2.Compose([v2.RandomResize(int(img_size * scale[0]), int(img_size * scale[1]) + 1),
                          v2.RandomCrop(img_size, pad_if_needed=True, fill={tv_tensors.Mask: IGNORE, "others": 0}),
                          v2.RandomHorizontalFlip(0.5)])

        def tf(image, labels):
            image, labels = geo(tv_tensors.Image(image), tv_tensors.Mask(labels))
            image = v2.functional.to_dtype(image.as_subclass(torch.Tensor), torch.float32, scale=True)
            return norm(image), labels.as_subclass(torch.Tensor).long()
        return tf
    resize = v2.Resize(img_size, antialias=True)

    def tf_eval(image, labels):
        return norm(v2.functional.to_dtype(resize(image), torch.float32, scale=True)), labels

    return tf_eval
