"""Reading image and label-map files, each error naming the file (the one place every data format reads pixels).

Every image is read the same way (:func:`to_rgb`): turned upright by its EXIF orientation (``ImageOps.exif_transpose``,
as a photo viewer shows it), then made 8-bit RGB from its real range: 16-bit grey (``I;16``, medical and scientific
PNG / TIFF) divided by 257 (65535 -> 255, so 50% grey stays 50%), 32-bit integer grey by 257 when it holds 16-bit
values and else stretched from its min to its max, float grey (``F``) times 255 when in [0, 1] and else stretched;
an alpha channel (RGBA, LA, PA, palette transparency) is dropped, not composited, as torchvision's ``pil_loader``
does; CMYK, YCbCr, palette and 1-bit images through Pillow's own conversion.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
from PIL import Image, ImageOps

EXIF_ORIENTATION = 0x0112
_SWAPS = (5, 6, 7, 8)  # EXIF orientations that turn the image a quarter: width and height swap


def to_rgb(im: Image.Image) -> Image.Image:
    """``im`` upright (EXIF orientation) as 8-bit RGB, grey of 16 / 32 bits and floats scaled from their real range
    (module doc). Raises what Pillow raises on undecodable pixel data (:func:`load_rgb` names the file)."""
    im = ImageOps.exif_transpose(im)
    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        a = np.asarray(im, dtype=np.float64)
        lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
        if im.mode.startswith("I;16") or (im.mode == "I" and lo >= 0 and hi <= 65535):
            a = a / 257.0
        elif im.mode == "F" and lo >= 0 and hi <= 1:
            a = a * 255.0
        else:  # values outside the type's usual range: stretched from min to max
            a = (a - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(a)
        im = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8))
    return im.convert("RGB")


def load_rgb(path: str | Path) -> Image.Image:
    """The image at ``path`` as an upright RGB PIL image (:func:`to_rgb`; the loader of every format).

    Raises:
        ValueError: the file is not a readable image (named).
    """
    try:
        with open(path, "rb") as f, Image.open(f) as im:
            return to_rgb(im)
    except Exception as e:
        raise ValueError(f"cannot read image '{path}': {type(e).__name__}: {e}") from None


def read_rgb(path: str | Path) -> torch.Tensor:
    """The image at ``path`` as a uint8 tensor (3, H, W), upright (the dense formats' reader).

    Raises:
        ValueError: the file is not a readable image (named).
    """
    return torch.from_numpy(np.asarray(load_rgb(path)).copy()).permute(2, 0, 1)


def read_label_map(path: str | Path) -> np.ndarray:
    """The label map at ``path`` as an (H, W) integer array; palette ('P') PNGs give their indices.

    Raises:
        ValueError: the file is not a readable image, or not a single-channel map (named).
    """
    try:
        with Image.open(path) as im:
            out, mode = np.asarray(im), im.mode
    except Exception as e:
        raise ValueError(f"cannot read label map '{path}': {type(e).__name__}: {e}") from None
    if out.ndim != 2:
        raise ValueError(f"label map '{path}' is {mode} with {out.shape[-1]} channels; expected one channel of class "
                         "indices (an L, P or I;16 PNG)")
    return out


def image_size(path: str | Path) -> tuple[int, int]:
    """(width, height) of the image at ``path`` as :func:`load_rgb` gives it (after its EXIF orientation), from
    the file's header alone.

    Raises:
        ValueError: the file does not exist or is not an image Pillow can identify (named).
    """
    try:
        with Image.open(path) as im:
            w, h = im.size
            if im.format == "PNG":  # getexif would read every chunk (decode the image): an eXIf chunk before IDAT
                exif = Image.Exif()
                if im.info.get("exif"):
                    exif.load(im.info["exif"])
            else:
                exif = im.getexif()  # JPEG, TIFF, WebP: in the header
            swap = exif.get(EXIF_ORIENTATION) in _SWAPS
    except FileNotFoundError:
        raise ValueError(f"image '{path}' does not exist") from None
    except Exception as e:
        raise ValueError(f"cannot read image '{path}': {type(e).__name__}: {e}") from None
    return (h, w) if swap else (w, h)


def check_images(paths: Iterable[str | Path], what: str) -> list[tuple[int, int]]:
    """(width, height) of every image in ``paths`` (:func:`image_size`), all of them checked before any is used:
    a run must not stop mid-epoch on a file that was missing from the start. A progress bar (tqdm, on stderr)
    shows for long lists.

    Raises:
        ValueError: one or more files missing or unreadable: how many, and the first five with the reason.
    """
    from tqdm.auto import tqdm

    paths = list(paths)
    sizes, bad = [], []
    quiet = len(paths) < 2000 or not os.isatty(2)
    for p in tqdm(paths, desc=f"checking {what}", unit="img", disable=quiet, leave=False):
        try:
            sizes.append(image_size(p))
        except ValueError as e:
            bad.append(str(e))
            sizes.append((0, 0))
    if bad:
        raise ValueError(f"{len(bad)} of {len(paths)} {what} cannot be read: {'; '.join(bad[:5])}"
                         + ("; ..." if len(bad) > 5 else ""))
    return sizes
