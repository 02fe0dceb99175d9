"""Classification data: every format of :mod:`mslora.data.formats`, Fashion-MNIST idx files and ImageFolder
directories, split into train/val/test.

Splits (``split``; None: the format's own, ``train800`` for VTAB-1k folders and ``random1k`` otherwise):
- ``"random1k"`` (``"1k"``, its old name, still read): VTAB-1k's sizes drawn at random: 800 training and 200
  validation images drawn with ``split_seed`` (validation from the dataset's own validation pool if it has one,
  else from the rest of the training pool); the full test set. Not VTAB-1k's published lists.
- ``"full"``: the whole training pool for training (minus a seeded 10 % validation hold-out when the dataset
  has no validation pool); the full test set.
- ``"train800"`` / ``"train800val200"``: VTAB-1k folders only, their published lists (see
  :func:`mslora.data.formats.vtab1k`).

Sources (``data``):
- ``"fashion-mnist"``: the idx files of Debian's ``dataset-fashion-mnist`` in /usr/share/datasets/fashion-mnist
  (override with $FASHION_MNIST_DIR), read by torchvision's FashionMNIST; or any directory holding
  ``train-images-idx3-ubyte[.gz]`` and its three sibling files.
- a directory of class sub-folders (torchvision ImageFolder): with ``train/`` (and ``val/``, ``test/``) sub-folders
  those are the pools; without them the images are split 70/15/15 with ``split_seed`` into train/val/test pools.
"""
from __future__ import annotations

import gzip
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from torchvision import datasets

from mslora.data import formats
from mslora.data.images import check_images, load_rgb
from mslora.data.transforms import Subset, image_only

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
_IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
SPLITS = ("random1k", "full", "train800", "train800val200")
VTAB_SPLITS = ("train800", "train800val200")
ONE_POOL = "one pool split 70 / 15 / 15 (seeded by split_seed) into train / val / test pools"


@dataclass
class ClassificationData:
    """Train/val/test datasets of one source, transforms not yet set (see :func:`with_transforms`)."""

    name: str
    classes: list[str]
    train: Subset
    val: Subset
    test: Subset
    val_in_train: bool = False  # VTAB-1k's train800val200 protocol: validation images are trained on
    split: str = "random1k"  # the split these datasets were made with
    pools: str = "the source's own train / val / test"  # where the split drew from (metrics.json: split_pools)

    @property
    def num_classes(self) -> int:
        """Number of classes."""
        return len(self.classes)

    def with_transforms(self, train_tf: Callable, eval_tf: Callable) -> "ClassificationData":
        """Set the image transform ``train_tf`` on ``train`` and ``eval_tf`` on ``val`` and ``test`` (labels
        given as ints); returns self."""
        self.train.transform = image_only(train_tf)
        self.val.transform = self.test.transform = image_only(eval_tf)
        return self


def fashion_mnist_root(src: Path) -> Path:
    """Make torchvision's FashionMNIST layout (root/FashionMNIST/raw/<uncompressed idx>) from ``src``.

    torchvision reads only uncompressed idx files; Debian ships them gzipped, so they are decompressed once
    into ~/.cache/mslora (or $XDG_CACHE_HOME/mslora). Uncompressed sources are linked, not copied.
    """
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mslora" / "fashion-mnist"
    raw = cache / "FashionMNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for name in _IDX_FILES:
        dst = raw / name
        if dst.exists():
            continue
        plain, packed = src / name, src / f"{name}.gz"
        tmp = dst.with_suffix(".tmp")
        if plain.is_file():
            shutil.copyfile(plain, tmp)
        else:
            with gzip.open(packed, "rb") as fin, open(tmp, "wb") as fout:
                shutil.copyfileobj(fin, fout)
        tmp.replace(dst)  # atomic: a half-written file is never taken for a whole one
    return cache


def is_idx_dir(path: Path) -> bool:
    """Whether ``path`` holds the four Fashion-MNIST idx files (gzipped or not)."""
    return all((path / n).is_file() or (path / f"{n}.gz").is_file() for n in _IDX_FILES)


def _draw(pool: Sequence[int], n: int, gen: torch.Generator) -> tuple[list[int], list[int]]:
    """Seeded draw of n items from pool: (drawn, rest)."""
    order = torch.randperm(len(pool), generator=gen).tolist()
    return [pool[i] for i in order[:n]], [pool[i] for i in order[n:]]


def _split(train_pool: list[int], val_pool: list[int] | None, split: str, seed: int) -> tuple[list[int], list[int]]:
    """Seeded (train, val) indices: val from ``val_pool`` when given, else held out of ``train_pool``."""
    gen = torch.Generator().manual_seed(seed)
    if split == "random1k":
        train, rest = _draw(train_pool, 800, gen)
        return train, _draw(val_pool if val_pool is not None else rest, 200, gen)[0]
    if val_pool is not None:
        return list(train_pool), list(val_pool)
    val, train = _draw(train_pool, max(1, len(train_pool) // 10), gen)
    return train, val


def load_classification(data: str, split: str | None = None, split_seed: int = 0,
                        data_format: str | None = None) -> ClassificationData:
    """Load a classification source (see module doc and :mod:`mslora.data.formats`) and split it.

    ``data_format`` forces a format (:data:`mslora.data.formats.FORMATS`); by default it is recognised from the
    files found. ``split`` None takes the format's own (module doc); the result's ``split`` says which was used.

    Raises:
        ValueError: unknown split or format, a path in no recognised format (naming the files looked for), a
            malformed list, or too few images to split.
        FileNotFoundError: the path (or the Fashion-MNIST files, or a list file a format needs) does not exist.
    """
    split = {"1k": "random1k"}.get(split, split)  # the old name
    if split is not None and split not in SPLITS:
        raise ValueError(f"split='{split}' is not one of {', '.join(SPLITS)}")
    if data_format is not None and data_format not in formats.FORMATS:
        raise ValueError(f"data_format='{data_format}' is not one of {', '.join(formats.FORMATS)}")
    path = Path(os.environ.get("FASHION_MNIST_DIR", FASHION_MNIST_DIR)) if data == "fashion-mnist" else Path(data)
    if not path.exists():
        hint = " (install Debian's dataset-fashion-mnist or set FASHION_MNIST_DIR)" if data == "fashion-mnist" else ""
        raise FileNotFoundError(f"data path '{path}' does not exist{hint}")
    fmt = data_format or ("fashion-mnist" if path.is_dir() and is_idx_dir(path) else formats.recognise(path))
    if fmt is None and path.is_dir():
        fmt = "imagefolder"
    if fmt is None:
        raise ValueError(f"data path '{path}' is in no format mslora reads; looked for {formats.LOOKED_FOR}")
    if fmt == "vtab1k":
        split = split or "train800"
        if split not in VTAB_SPLITS:
            raise ValueError(f"split='{split}' does not apply to VTAB-1k data ('{path}'): use its published lists, "
                             "train800 (pick on val200) or train800val200 (RLRR's protocol)")
    elif split in VTAB_SPLITS:
        raise ValueError(f"split='{split}' names VTAB-1k's published lists, but '{path}' is {fmt} data; use "
                         "random1k or full")
    split = split or "random1k"
    data = _load(path, fmt, split, split_seed)
    data.split = split
    check_files(data)
    return data


def _load(path: Path, fmt: str, split: str, split_seed: int) -> ClassificationData:
    if fmt == "fashion-mnist":
        root = fashion_mnist_root(path)
        train_base = datasets.FashionMNIST(str(root), train=True, download=False)
        test_base = datasets.FashionMNIST(str(root), train=False, download=False)
        train, val = _split(list(range(len(train_base))), None, split, split_seed)
        return ClassificationData("fashion-mnist", list(train_base.classes), Subset(train_base, train),
                                  Subset(train_base, val), Subset(test_base, range(len(test_base))))
    if fmt == "imagefolder":
        return _image_folder(path, split, split_seed)
    if fmt == "vtab1k":
        pools, classes = formats.vtab1k(path, split, load_rgb)
        return ClassificationData(path.name, classes, *(Subset(pools[s], range(len(pools[s])))
                                                         for s in ("train", "val", "test")),
                                  val_in_train=split == "train800val200")
    pools, classes = (formats.fgvc(path, load_rgb) if fmt == "fgvc" else formats.csv_pools(path, load_rgb)
                      if fmt == "csv" else formats.torchvision_pools(fmt, path))
    return _from_pools(path.stem, classes, pools, split, split_seed)


def _from_pools(name: str, classes: list[str], pools: dict, split: str, seed: int) -> ClassificationData:
    """Split train / val / test pools (val or test may be None: held out of train, 15% each when test is)."""
    tr, va, te = pools["train"], pools.get("val"), pools.get("test")
    train_pool = list(range(len(tr)))
    if te is None:  # a single list: seeded 70 / 15 / 15 as for a folder without split sub-folders
        order = torch.randperm(len(tr), generator=torch.Generator().manual_seed(seed)).tolist()
        k = max(1, round(0.15 * len(tr)))
        test_idx, val_pool, train_pool = order[:k], order[k:2 * k], order[2 * k:]
        train, val = _split(train_pool, val_pool, split, seed)
        return ClassificationData(name, classes, Subset(tr, train), Subset(tr, val), Subset(tr, test_idx),
                                  pools=ONE_POOL)
    train, val = _split(train_pool, list(range(len(va))) if va is not None else None, split, seed)
    return ClassificationData(name, classes, Subset(tr, train), Subset(va if va is not None else tr, val),
                              Subset(te, range(len(te))))


class ImageFolder(datasets.ImageFolder):
    """torchvision's ImageFolder, its listing safe from symlinks: each folder is walked once by its real path, and
    a link back to the root or to a class folder is not followed (a symlink loop once listed 18 images 738 times,
    and two loops hung); an image file linked twice into one class is listed once, one linked into two classes is
    an error. Samples in torchvision's order."""

    @staticmethod
    def make_dataset(directory, class_to_idx, extensions=None, is_valid_file=None, allow_empty=False):
        """(path, class index) of every image under ``directory``'s class folders (see the class doc).

        Raises:
            ValueError: one image file reached from two class folders (both named).
            FileNotFoundError: a class folder without images (torchvision's rule).
        """
        from torchvision.datasets.folder import has_file_allowed_extension

        valid = is_valid_file or (lambda p: has_file_allowed_extension(p, extensions))
        walked, owner = [], {}
        tops = {os.path.realpath(directory), *(os.path.realpath(os.path.join(directory, c)) for c in class_to_idx)}
        seen: set[str] = set()
        for cls in sorted(class_to_idx):
            for root, dirs, files in os.walk(os.path.join(directory, cls), followlinks=True):
                real = os.path.realpath(root)
                if real in seen or (real in tops and root != os.path.join(directory, cls)):
                    dirs[:] = []  # reached again (a symlink loop, a link to the root or a class): walked once
                    continue
                seen.add(real)
                walked.append((root, cls, sorted(files)))
        samples, found = [], set()
        for root, cls, files in sorted(walked):  # torchvision's order: folders sorted by path
            for name in files:
                path = os.path.join(root, name)
                if not valid(path):
                    continue
                real = os.path.realpath(path)
                if owner.setdefault(real, (cls, path))[0] != cls:
                    raise ValueError(f"image '{real}' is in two class folders: '{owner[real][1]}' and '{path}'")
                if owner[real][1] == path:
                    samples.append((path, class_to_idx[cls]))
                    found.add(cls)
        empty = sorted(set(class_to_idx) - found)
        if empty and not allow_empty:
            raise FileNotFoundError(f"Found no valid file for the classes {', '.join(empty)}")
        return samples


def _folder(path: Path) -> ImageFolder:
    try:
        return ImageFolder(str(path), loader=load_rgb)
    except (FileNotFoundError, RuntimeError) as e:
        raise ValueError(f"data path '{path}' holds no images ({e}); looked for {formats.LOOKED_FOR}") from None


def check_files(data: ClassificationData) -> None:
    """Every image file the splits list exists and opens (header decode; :func:`mslora.data.images.check_images`),
    before a run starts: listed datasets (``items``) and folders (``samples``); others (idx files, torchvision's own
    datasets) are read by their own classes.

    Raises:
        ValueError: how many files cannot be read, the first five named with the reason.
    """
    paths = {}
    for sub in (data.train, data.val, data.test):
        listed = getattr(sub.base, "items", None) or getattr(sub.base, "samples", None)
        if listed is not None:
            paths.update((str(listed[i][0]), None) for i in sub.indices)
    if paths:
        check_images(paths, f"images of '{data.name}'")


def _image_folder(path: Path, split: str, seed: int) -> ClassificationData:
    subs = {s: path / s for s in ("train", "val", "test") if (path / s).is_dir()}
    if "train" in subs:
        if len(subs) == 1:
            raise ValueError(f"data path '{path}' has train/ but neither val/ nor test/")
        bases = {s: _folder(p) for s, p in subs.items()}
        for s, b in bases.items():
            if b.classes != bases["train"].classes:
                raise ValueError(f"class folders of '{subs[s]}' differ from those of '{subs['train']}'")
        tr, va, te = bases["train"], bases.get("val"), bases.get("test")
        if te is None:  # train/ and val/ only: val/ is the test set, validation is held out of train/
            te, va = va, None
        train, val = _split(list(range(len(tr))), list(range(len(va))) if va is not None else None, split, seed)
        return ClassificationData(path.name, tr.classes, Subset(tr, train), Subset(va if va is not None else tr, val),
                                  Subset(te, range(len(te))))
    base = _folder(path)
    n = len(base)
    if n < 3:
        raise ValueError(f"data path '{path}' holds {n} images; at least 3 are needed for train/val/test")
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=gen).tolist()
    n_val, n_test = max(1, round(0.15 * n)), max(1, round(0.15 * n))
    test, val_pool, train_pool = order[:n_test], order[n_test:n_test + n_val], order[n_test + n_val:]
    train, val = _split(train_pool, val_pool, split, seed)
    return ClassificationData(path.name, base.classes, Subset(base, train), Subset(base, val), Subset(base, test),
                              pools=ONE_POOL)


