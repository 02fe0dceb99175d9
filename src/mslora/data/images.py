"""Reading image and label-map files, each error naming the file (the one place every data format reads pixels)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image


def load_rgb(path: str | Path) -> Image.Image:
    """The image at ``path`` as an RGB PIL image (the loader of every classification format).

    Raises:
        ValueError: the file is not a readable image (named).
    """
    try:
        with open(path, "rb") as f:
            return Image.open(f).convert("RGB")
    except Exception as e:
        raise ValueError(f"cannot read image '{path}': {type(e).__name__}: {e}") from None


def read_rgb(path: str | Path) -> torch.Tensor:
    """The image at ``path`` as a uint8 tensor (3, H, W) (the dense formats' reader).

    Raises:
        ValueError: the file is not a readable image (named).
    """
    return torch.from_numpy(np.asarray(load_rgb(path)).copy()).permute(2, 0, 1)


def read_label_map(path: str | Path) -> np.ndarray:
    """The label map at ``path`` as an (H, W) integer array; palette ('P') PNGs give their indices.

    Raises:
        ValueError: the file is not a readable image (named).
    """
    try:
        with Image.open(path) as im:
            return np.asarray(im)
    except Exception as e:
        raise ValueError(f"cannot read label map '{path}': {type(e).__name__}: {e}") from None
