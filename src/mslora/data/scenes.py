"""Fashion-MNIST scenes: a multi-object detection / segmentation set made offline from real images.

Garments of Fashion-MNIST (the 10 classes) are pasted on 256x256 canvases at sizes of 12 to 120 px (log-uniform
longest side), so that objects span a 10x range of scales as the MSLoRA paper's multi-scale argument needs
(Sec. 3); the backgrounds are crops of the real photographs scikit-image ships (``skimage/data/*``), or, without
scikit-image, smoothed colour noise. Every garment is tinted with a random colour and keeps its own grey-level
texture; a garment may hide at most 30% of one pasted before it. Everything is drawn from ``numpy``'s generator
seeded with (``seed``, split, image index), so the same files come out on every machine.

Written in the COCO 2017 layout (:mod:`mslora.data.coco` reads it): ``annotations/instances_{split}2017.json`` with
boxes, instance masks (RLE) and areas of the visible parts, ``{split}2017/NNNNNN.jpg`` (JPEG quality 95), and
``semantic/{split}2017/NNNNNN.png`` semantic masks (0 background, 1..10 the garment classes, the top-most garment
wins) for the ``segment`` task; splits ``train``, ``val`` (garments from Fashion-MNIST's training images not
used by ``train``) and ``test`` (garments from its test images).
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter
from pycocotools import mask as mask_utils
from torchvision import datasets

from mslora.data.classify import FASHION_MNIST_DIR, fashion_mnist_root, is_idx_dir
from mslora.data.images import load_rgb

VERSION = 1
CANVAS = 256
SIZES = (12, 120)  # longest garment side in pixels, log-uniform
SPLITS = {"train": 600, "val": 100, "test": 200}
_PHOTOS = ("astronaut.png", "brick.png", "camera.png", "chelsea.png", "coffee.png", "coins.png", "grass.png",
           "gravel.png", "hubble_deep_field.jpg", "ihc.png", "moon.png", "motorcycle_left.png", "page.png",
           "retina.jpg", "rocket.jpg", "text.png", "clock_motion.png", "color.png")


def backgrounds() -> tuple[list[np.ndarray], str]:
    """RGB uint8 photographs (H, W, 3) from scikit-image's bundled sample data, and their source's name; an empty
    list and 'noise' when scikit-image is not installed."""
    try:
        import skimage.data
    except ImportError:
        return [], "noise"
    folder = Path(skimage.data.__file__).parent
    photos = [np.asarray(load_rgb(folder / n)) for n in _PHOTOS if (folder / n).is_file()]
    return photos, "scikit-image sample photographs" if photos else "noise"


def _background(rng: np.random.Generator, photos: list[np.ndarray]) -> np.ndarray:
    if not photos:  # smoothed colour noise at a random scale
        small = rng.integers(0, 256, (int(rng.integers(4, 33)),) * 2 + (3,), dtype=np.uint8)
        img = Image.fromarray(small).resize((CANVAS, CANVAS), Image.BICUBIC).filter(ImageFilter.GaussianBlur(2))
        return np.asarray(img, dtype=np.float32)
    photo = photos[int(rng.integers(len(photos)))]
    h, w = photo.shape[:2]
    side = int(rng.integers(min(h, w) // 3, min(h, w) + 1))
    y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
    crop = Image.fromarray(photo[y:y + side, x:x + side]).resize((CANVAS, CANVAS), Image.BILINEAR)
    return np.asarray(crop, dtype=np.float32)


def make_scene(rng: np.random.Generator, garments: np.ndarray, labels: np.ndarray, photos: list[np.ndarray]
               ) -> tuple[np.ndarray, list[np.ndarray], list[int]]:
    """One scene: (image (256, 256, 3) uint8, visible instance masks (256, 256) bool, labels 0..9)."""
    canvas = _background(rng, photos)
    masks: list[np.ndarray] = []
    cats: list[int] = []
    for _ in range(int(rng.integers(2, 7))):
        k = int(rng.integers(len(garments)))
        side = int(round(np.exp(rng.uniform(np.log(SIZES[0]), np.log(SIZES[1])))))
        g = np.asarray(Image.fromarray(garments[k]).resize((side, side), Image.BILINEAR), dtype=np.float32) / 255.0
        alpha = np.clip(g * 2.0, 0.0, 1.0)
        shape = alpha > 0.25
        if shape.sum() < 16:
            continue
        for _attempt in range(10):
            y, x = int(rng.integers(0, CANVAS - side + 1)), int(rng.integers(0, CANVAS - side + 1))
            full = np.zeros((CANVAS, CANVAS), bool)
            full[y:y + side, x:x + side] = shape
            if all((m & full).sum() <= 0.3 * m.sum() for m in masks):
                break
        else:
            continue
        colour = rng.uniform(40, 255, 3).astype(np.float32)
        patch = canvas[y:y + side, x:x + side]
        a = alpha[..., None]
        patch[:] = patch * (1 - a) + a * colour * (0.35 + 0.65 * g[..., None])
        masks = [m & ~full for m in masks]
        masks.append(full)
        cats.append(int(labels[k]))
    keep = [i for i, m in enumerate(masks) if m.sum() >= 16]
    return np.clip(canvas, 0, 255).astype(np.uint8), [masks[i] for i in keep], [cats[i] for i in keep]


def write_scenes(root: str | Path, train_images: np.ndarray, train_labels: np.ndarray, test_images: np.ndarray,
                 test_labels: np.ndarray, classes: list[str], counts: dict[str, int] | None = None,
                 seed: int = 0) -> Path:
    """Write the scene set to ``root`` (created; must not exist): see the module doc for the layout.

    Args:
        train_images, test_images: (N, 28, 28) uint8 Fashion-MNIST images; *_labels: (N,) in 0..9.
        classes: the 10 class names (COCO category names, ids 1..10).
        counts: images per split (default :data:`SPLITS`).

    Raises:
        FileExistsError: ``root`` exists.
    """
    root = Path(root)
    root.mkdir(parents=True)
    photos, source = backgrounds()
    half = len(train_images) // 2  # train scenes use the first half of the garments, val scenes the second
    pools = {"train": (train_images[:half], train_labels[:half]), "val": (train_images[half:], train_labels[half:]),
             "test": (test_images, test_labels)}
    (root / "annotations").mkdir()
    for s_index, (split, n) in enumerate((counts or SPLITS).items()):
        (root / f"{split}2017").mkdir()
        (root / "semantic" / f"{split}2017").mkdir(parents=True)
        images, anns = [], []
        for i in range(n):
            rng = np.random.default_rng([seed, s_index, i])
            img, masks, cats = make_scene(rng, *pools[split], photos)
            name = f"{i:06d}"
            Image.fromarray(img).save(root / f"{split}2017" / f"{name}.jpg", quality=95)
            semantic = np.zeros((CANVAS, CANVAS), np.uint8)
            for m, c in zip(masks, cats):
                semantic[m] = c + 1
            Image.fromarray(semantic).save(root / "semantic" / f"{split}2017" / f"{name}.png")
            images.append({"id": i + 1, "file_name": f"{name}.jpg", "height": CANVAS, "width": CANVAS})
            for m, c in zip(masks, cats):
                rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
                x, y, w, h = (float(v) for v in mask_utils.toBbox(rle))
                anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": c + 1, "iscrowd": 0,
                             "bbox": [x, y, w, h], "area": float(m.sum()),
                             "segmentation": {"size": rle["size"], "counts": rle["counts"].decode()}})
        coco = {"info": {"description": f"Fashion-MNIST scenes v{VERSION} (mslora), backgrounds: {source}"},
                "images": images, "annotations": anns,
                "categories": [{"id": k + 1, "name": c, "supercategory": "garment"} for k, c in enumerate(classes)]}
        (root / "annotations" / f"instances_{split}2017.json").write_text(json.dumps(coco))
    return root


def default_scenes(fashion_mnist: str | Path | None = None) -> Path:
    """The scene set built from the Fashion-MNIST files (Debian's, or ``fashion_mnist``), made once into
    ``$XDG_CACHE_HOME/mslora/fashion-mnist-scenes-v1`` (~/.cache by default; about 25 MB) and reused.

    Raises:
        FileNotFoundError: the Fashion-MNIST files are missing (the message says where they were looked for).
    """
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mslora"
    root = cache / f"fashion-mnist-scenes-v{VERSION}"
    if (root / "annotations" / "instances_test2017.json").is_file():
        return root
    src = Path(fashion_mnist or os.environ.get("FASHION_MNIST_DIR", FASHION_MNIST_DIR))
    if not is_idx_dir(src):
        raise FileNotFoundError(f"Fashion-MNIST idx files not found in '{src}' (install Debian's "
                                "dataset-fashion-mnist or set FASHION_MNIST_DIR); the scene set is made from them")
    import logging

    logging.getLogger("mslora").info("making the offline scene set (COCO layout, about 25 MB, once) in %s ...", root)
    fm = fashion_mnist_root(src)
    tr, te = (datasets.FashionMNIST(str(fm), train=t, download=False) for t in (True, False))
    tmp = cache / f".fashion-mnist-scenes-v{VERSION}.{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    write_scenes(tmp, tr.data.numpy(), tr.targets.numpy(), te.data.numpy(), te.targets.numpy(), list(tr.classes))
    try:
        tmp.rename(root)  # atomic: another process may have finished first
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return root
