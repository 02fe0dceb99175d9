"""Classification data formats of the PEFT literature, recognised from the files they hold.

- ``vtab1k``: VTAB-1k as NOAH / VPT / RLRR distribute it: one folder per task with ``train800.txt``,
  ``val200.txt``, ``train800val200.txt`` and ``test.txt``, each line ``relative/path label`` (images beside them).
- ``fgvc``: VPT's FGVC splits (CUB-200-2011, NABirds, Oxford Flowers, Stanford Dogs, Stanford Cars):
  ``train.json``, ``val.json``, ``test.json`` mapping an image path to its label, images under ``images/``,
  ``Images/`` or the folder itself (VPT's ``JSONDataset``); labels are made contiguous in sorted order, as VPT does.
- ``csv``: a CSV file, or a folder with ``train.csv`` (and ``val.csv``, ``test.csv``), of ``path,label`` rows
  (a header row is allowed; paths relative to the file; labels are class names or integers).
- ``pets``, ``flowers102``, ``food101``: the layouts torchvision's ``OxfordIIITPet``, ``Flowers102`` and
  ``Food101`` read (``oxford-iiit-pet/``, ``flowers-102/``, ``food-101/`` under the given folder), read by them.

Each loader returns pools: ``{"train": ..., "val": ... or None, "test": ...}`` of (image, label) datasets and the
class names; :func:`mslora.data.classify.load_classification` splits them.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Callable

from torch.utils.data import Dataset

FORMATS = ("fashion-mnist", "vtab1k", "fgvc", "csv", "pets", "flowers102", "food101", "imagefolder")
VTAB_FILES = ("train800.txt", "val200.txt", "train800val200.txt", "test.txt")
FGVC_FILES = ("train.json", "val.json", "test.json")
TORCHVISION_DIRS = {"pets": "oxford-iiit-pet", "flowers102": "flowers-102", "food101": "food-101"}


class ListDataset(Dataset):
    """(image path, label) pairs read lazily as RGB PIL images (``loader`` names the file it cannot read)."""

    def __init__(self, items: list[tuple[Path, int]], loader: Callable) -> None:
        self.items, self.loader = items, loader

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        path, label = self.items[i]
        return self.loader(str(path)), label


def recognise(path: Path) -> str | None:
    """The format of ``path`` judged from the files it holds (see module doc), or None."""
    if path.is_file():
        return "csv" if path.suffix.lower() == ".csv" else None
    if all((path / f).is_file() for f in ("train800.txt", "test.txt")):
        return "vtab1k"
    if all((path / f).is_file() for f in FGVC_FILES):
        return "fgvc"
    if (path / "train.csv").is_file():
        return "csv"
    for fmt, sub in TORCHVISION_DIRS.items():
        if (path / sub).is_dir():
            return fmt
    return None


LOOKED_FOR = ("Fashion-MNIST idx files (train-images-idx3-ubyte[.gz], ...); VTAB-1k lists (train800.txt, val200.txt, "
              "train800val200.txt, test.txt); VPT's FGVC splits (train.json, val.json, test.json); train.csv or a "
              ".csv file of path,label rows; torchvision's oxford-iiit-pet/, flowers-102/ or food-101/; "
              "class sub-folders of images (ImageFolder)")


def _check_file(path: Path, what: str) -> None:
    if not path.is_file():
        raise FileNotFoundError(f"{what} '{path}' does not exist")


def vtab1k(root: Path, split: str, loader: Callable) -> tuple[dict, list[str]]:
    """VTAB-1k pools. ``split='train800'``: train800 / val200 / test (the VPT and NOAH protocol: pick on val200);
    ``split='train800val200'``: train800val200 / val200 / test (the RLRR protocol: train on all 1,000 and report
    test; val200 is then inside the training set, so the engine keeps the last epoch).

    Raises:
        ValueError: another split, a malformed line (file and line number named), or labels that are not integers.
        FileNotFoundError: a list file the split needs is missing.
    """
    if split not in ("train800", "train800val200"):
        raise ValueError(f"split='{split}' is not one of train800, train800val200 for VTAB-1k data ('{root}')")
    files = {"train": f"{split}.txt", "val": "val200.txt",
             "test": "test.txt"}
    pools, where = {}, {}
    for s, name in files.items():
        _check_file(root / name, "VTAB-1k list")
        items = []
        for n, line in enumerate((root / name).read_text().splitlines(), 1):
            if not line.strip():
                continue
            parts = line.rsplit(maxsplit=1)
            if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
                raise ValueError(f"{root / name} line {n}: '{line}' is not 'relative/path label' with an integer label")
            items.append((root / parts[0], int(parts[1])))
            where.setdefault(int(parts[1]), f"{root / name} line {n}")
        pools[s] = items
    names = _classes_txt(root)
    k = check_labels(where, names, root / "classes.txt")
    classes = names or [str(i) for i in range(k)]
    return {s: ListDataset(items, loader) for s, items in pools.items()}, classes


def fgvc(root: Path, loader: Callable) -> tuple[dict, list[str]]:
    """VPT's FGVC json splits: train / val / test pools; labels mapped to 0..K-1 in sorted order (VPT's
    ``_class_id_cont_id``).

    Raises:
        ValueError: a json file that is not an object of path -> label.
    """
    annos = {}
    for s in ("train", "val", "test"):
        data = json.loads((root / f"{s}.json").read_text())
        if not isinstance(data, dict):
            raise ValueError(f"{root / f'{s}.json'} must map image paths to labels")
        annos[s] = data
        for key, v in data.items():
            if isinstance(v, bool) or not isinstance(v, (int, str)) or (isinstance(v, str) and not v.strip()):
                raise ValueError(f"{root / f'{s}.json'}: '{key}' has label {v!r}; expected an integer or a class name")
    if not annos["train"]:
        raise ValueError(f"{root / 'train.json'} lists no images")
    first = next(iter(annos["train"]), "")
    image_dir = next((d for d in (root / "images", root / "Images", root) if (d / first).is_file()), root)
    if len({type(v) for a in annos.values() for v in a.values()}) > 1:
        raise ValueError(f"FGVC labels of '{root}' mix integers and names; use one kind")
    ids = sorted({v for a in annos.values() for v in a.values()})
    cont = {v: i for i, v in enumerate(ids)}
    names = _classes_txt(root)
    if names is not None and len(names) != len(ids):
        raise ValueError(f"'{root / 'classes.txt'}' names {len(names)} classes but the json files use {len(ids)} "
                         "labels; give one name per label, in label order")
    pools = {s: ListDataset([(image_dir / k, cont[v]) for k, v in a.items()], loader) for s, a in annos.items()}
    return pools, names or [str(v) for v in ids]


def csv_pools(path: Path, loader: Callable) -> tuple[dict, list[str]]:
    """``path,label`` rows from a CSV file (one pool: train) or from ``train.csv`` / ``val.csv`` / ``test.csv``.

    Raises:
        ValueError: a row without two columns (file and line named), or no rows.
    """
    files = {"train": path} if path.is_file() else {s: path / f"{s}.csv" for s in ("train", "val", "test")
                                                    if (path / f"{s}.csv").is_file()}
    rows, where = {}, {}
    for s, f in files.items():
        with open(f, newline="") as fh:
            lines = [r for r in csv.reader(fh) if r and any(c.strip() for c in r)]
        if lines and lines[0][:2] in (["path", "label"], ["image", "label"], ["filename", "label"]):
            lines = lines[1:]
        for n, r in enumerate(lines, 1):
            if len(r) < 2:
                raise ValueError(f"{f} row {n}: {r} is not 'path,label'")
            if not r[0].strip() or not r[1].strip():
                raise ValueError(f"{f} row {n}: {r} has an empty {'path' if not r[0].strip() else 'label'}")
        if not lines:
            raise ValueError(f"{f} holds no 'path,label' rows")
        rows[s] = [(f.parent / r[0].strip(), r[1].strip()) for r in lines]
        for n, (_, lab) in enumerate(rows[s], 1):
            where.setdefault(lab, f"{f} row {n}")
    labels = {lab for rs in rows.values() for _, lab in rs}
    numeric = all(lab.lstrip("-").isdigit() for lab in labels)
    if numeric:
        k = check_labels({int(lab): w for lab, w in where.items()}, None, path / "classes.txt")
    classes = [str(i) for i in range(k)] if numeric else sorted(labels)
    index = {c: i for i, c in enumerate(classes)}
    pools = {s: ListDataset([(p, int(lab) if numeric else index[lab]) for p, lab in rs], loader)
             for s, rs in rows.items()}
    return pools, classes


def check_labels(where: dict[int, str], names: list[str] | None, names_file: Path | None = None) -> int:
    """The number of classes of integer labels ``where`` (label -> where it first appears, e.g. "train.csv row 7").

    With class ``names``: every label in 0..len(names)-1. Without: labels 0..K-1 with an image for each, so that a
    mistyped label (1000000) is caught instead of building a head of a million classes.

    Raises:
        ValueError: no labels at all, a negative label, a label past the names, or (without names) labels with gaps:
            the label and where it appears.
    """
    if not where:
        raise ValueError(f"the lists of '{names_file.parent if names_file else 'the data'}' hold no labelled images")
    for lab, at in sorted(where.items()):
        if lab < 0:
            raise ValueError(f"{at}: label {lab} is negative; labels are class indices 0..K-1")
    top = max(where)
    if names is not None:
        if top >= len(names):
            raise ValueError(f"{where[top]}: label {top} is past the {len(names)} classes of '{names_file}'")
        return len(names)
    unused = [k for k in range(top) if k not in where]
    if unused:
        raise ValueError(f"{where[top]}: label {top}, but {len(unused)} of the labels 0..{top} have no image "
                         f"(first: {unused[0]}); integer labels must be 0..K-1 (a mistyped label?)")
    return top + 1


def torchvision_pools(fmt: str, root: Path) -> tuple[dict, list[str]]:
    """Pets, Flowers102 and Food101 through torchvision's own dataset classes (``download=False``): Pets
    trainval / test, Flowers102 train / val / test, Food101 train / test.

    Raises:
        ValueError: torchvision does not find the files it expects (its message kept).
    """
    from torchvision import datasets

    cls, splits = {"pets": (datasets.OxfordIIITPet, ("trainval", None, "test")),
                   "flowers102": (datasets.Flowers102, ("train", "val", "test")),
                   "food101": (datasets.Food101, ("train", None, "test"))}[fmt]
    try:
        made = [cls(str(root), split=s) if s else None for s in splits]
    except RuntimeError as e:
        raise ValueError(f"'{root}' does not hold torchvision's {fmt} files: {e}") from None
    classes = list(getattr(made[0], "classes", []) or [str(i) for i in range(102)])
    return dict(zip(("train", "val", "test"), made)), classes


def _classes_txt(root: Path) -> list[str] | None:
    f = root / "classes.txt"
    return [c.strip() for c in f.read_text().splitlines() if c.strip()] if f.is_file() else None
