"""Detection and semantic-segmentation data: the COCO, Pascal VOC and ADE20K layouts, recognised from their files.

Layouts (``--data PATH``; ``fashion-mnist`` is the Fashion-MNIST scene set, :mod:`mslora.data.scenes`):
- COCO 2017: ``annotations/instances_{train,val[,test]}2017.json``, ``{split}2017/`` images. Detection: boxes and
  instance masks (:class:`mslora.data.coco.CocoDetection`). Segmentation: ``semantic/{split}2017/<stem>.png`` when
  present, else the instance masks painted by category (class 0 background).
- Pascal VOC (``ROOT`` or ``ROOT/VOCdevkit/VOC2012`` / ``VOC2007``): ``JPEGImages/``; detection from
  ``Annotations/*.xml`` and ``ImageSets/Main/{train,val[,test]}.txt`` (``difficult`` objects are left out of
  training and ignored by the evaluator, as VOC's own protocol does); segmentation from
  ``ImageSets/Segmentation/{train,val[,test]}.txt`` and ``SegmentationClass/*.png`` (palette indices, 255 ignored).
- ADE20K (``ROOT`` or ``ROOT/ADEChallengeData2016``): ``images/{training,validation}/*.jpg`` and
  ``annotations/{training,validation}/*.png``; label 0 ("other") is ignored and the rest shift down by one, as
  ADE20K's benchmark (and mmseg's ``reduce_zero_label``) do; class names from ``objectInfo150.txt``/``.csv``.

Class names: from the data where the format carries them (COCO categories; VOC's 20 + background, or the object
names in the XML files when they are not VOC's; ADE20K's ``objectInfo150``), else from a ``classes.txt`` beside the
data (one name per line, in label order), else the label values found in the masks.

Splits: a layout with a test split uses it for the final test and its val split for choosing the best epoch; one
without (COCO, ADE20K, VOC 2012) tests on val and holds 10% of train out (seeded by ``split_seed``) for validation,
so the epoch is never chosen on the test images.
"""
from __future__ import annotations

import contextlib
import io
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch.utils.data import Dataset

from mslora.data.coco import CocoDetection
from mslora.data.images import check_images, read_label_map, read_rgb
from mslora.data.scenes import default_scenes
from mslora.data.transforms import IGNORE, Subset

VOC_CLASSES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable",
               "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor")


def _coco_from(images: list[dict], anns: list[dict], classes: list[str]):
    """A pycocotools COCO ground truth made in memory (for COCO's evaluator on any detection layout)."""
    from pycocotools.coco import COCO

    coco = COCO()
    coco.dataset = {"images": images, "annotations": anns,
                    "categories": [{"id": i + 1, "name": c} for i, c in enumerate(classes)]}
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


class VOCDetection(Dataset):
    """Pascal VOC detection split: ``(image uint8 (3, H, W), target)``, target as :class:`CocoDetection`'s (no
    masks); ``coco`` is the split's ground truth for COCO's evaluator, ``difficult`` objects as crowd (ignored).

    Raises:
        FileNotFoundError: the split's image list is missing.
        ValueError: an XML file that cannot be read, or an object name outside ``classes``.
    """

    def __init__(self, root: Path, split: str, classes: list[str]) -> None:
        ids = _ids(root / "ImageSets" / "Main" / f"{split}.txt")
        self.root, self.classes, self.items = root, classes, []
        images, anns = [], []
        for k, stem in enumerate(ids, 1):
            objs, (w, h) = _voc_objects(root / "Annotations" / f"{stem}.xml")
            images.append({"id": k, "file_name": f"{stem}.jpg", "width": w, "height": h})
            train_objs = []
            for name, box, difficult in objs:
                if name not in classes:
                    raise ValueError(f"'{root / 'Annotations' / stem}.xml' names class '{name}', not one of "
                                     f"the {len(classes)} classes ({', '.join(classes[:5])}, ...)")
                x1, y1, x2, y2 = box
                anns.append({"id": len(anns) + 1, "image_id": k, "category_id": classes.index(name) + 1,
                             "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1),
                             "iscrowd": int(difficult)})
                if not difficult:
                    train_objs.append((classes.index(name) + 1, box))
            self.items.append((stem, k, train_objs))
        self.coco = _coco_from(images, anns, classes)
        self.label_of = self.category_of = {i + 1: i + 1 for i in range(len(classes))}
        self.ids = [k for _, k, _ in self.items]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        stem, k, objs = self.items[i]
        boxes = torch.tensor([b for _, b in objs], dtype=torch.float32).reshape(-1, 4)
        return read_rgb(self.root / "JPEGImages" / f"{stem}.jpg"), {
            "boxes": boxes, "labels": torch.tensor([c for c, _ in objs], dtype=torch.int64), "image_id": k}


def _ids(path: Path) -> list[str]:
    if not path.is_file():
        raise FileNotFoundError(f"image list '{path}' does not exist")
    return [line.split()[0] for line in path.read_text().splitlines() if line.strip()]


def _voc_objects(path: Path) -> tuple[list[tuple[str, list[float], bool]], tuple[int, int]]:
    """(name, [x1, y1, x2, y2] 0-based pixels, difficult) of every object in a VOC XML file, and (width, height)."""
    try:
        tree = ET.parse(path).getroot()
        size = tree.find("size")
        wh = (int(size.findtext("width")), int(size.findtext("height")))
        objs = []
        for o in tree.iter("object"):
            b = o.find("bndbox")
            x1, y1, x2, y2 = (float(b.findtext(t)) for t in ("xmin", "ymin", "xmax", "ymax"))
            objs.append((o.findtext("name").strip(), [x1 - 1, y1 - 1, x2, y2], o.findtext("difficult", "0").strip() == "1"))
    except (ET.ParseError, AttributeError, TypeError, ValueError, OSError) as e:
        raise ValueError(f"cannot read VOC annotation '{path}': {type(e).__name__}: {e}") from None
    return objs, wh


class SemanticFolder(Dataset):
    """Images and label maps listed as (image path, label path | None, paint) triples: ``(image uint8 (3, H, W),
    labels int64 (H, W))``, labels in 0..K-1 and :data:`IGNORE`. ``shift``: subtract 1 and map 0 to IGNORE
    (ADE20K); ``paint``: a function of the item giving the label map instead of a file (COCO without PNGs)."""

    def __init__(self, items: list[tuple[Path, Path | None]], shift: bool = False,
                 paint: Callable[[int], np.ndarray] | None = None) -> None:
        self.items, self.shift, self.paint = items, shift, paint
        check_sizes(items)

    def check_labels(self, num_classes: int) -> None:
        """Every label map's values are classes 0..K-1 (after the ADE20K shift) or :data:`IGNORE`, read in full
        before a run starts (a progress bar on stderr for long lists).

        Raises:
            ValueError: the first label map holding another value (file, value, class count).
        """
        from tqdm.auto import tqdm

        files = [lbl for _, lbl in self.items if lbl is not None]
        for lbl in tqdm(files, desc="checking label maps", unit="map", disable=len(files) < 500, leave=False):
            values = np.unique(read_label_map(lbl))
            labels = values[values != 0] - 1 if self.shift else values
            bad = labels[(labels != IGNORE) & ((labels < 0) | (labels >= num_classes))]
            if len(bad):
                raise ValueError(f"label map '{lbl}' holds value {int(bad[0]) + int(self.shift)}, not a class of "
                                 f"the {num_classes} (0..{num_classes - 1}{', shifted by one' if self.shift else ''})"
                                 f" nor {IGNORE} (ignored)")

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        image, label = self.items[i]
        y = torch.from_numpy(self.paint(i) if label is None else read_label_map(label).astype(np.int64)).long()
        if self.shift:
            y = torch.where(y == 0, IGNORE, y - 1)
        return read_rgb(image), y


def check_sizes(items: list[tuple[Path, Path | None]]) -> None:
    """Every label map is its image's size (the image after its EXIF orientation), every file exists and opens,
    checked from the headers before a run starts.

    Raises:
        ValueError: files that cannot be read (:func:`mslora.data.images.check_images`), or the first label map
            of another size than its image (both named).
    """
    pairs = [(img, lbl) for img, lbl in items if lbl is not None]
    images = check_images([img for img, _ in pairs], "images")
    maps = check_images([lbl for _, lbl in pairs], "label maps")
    for (img, lbl), a, b in zip(pairs, images, maps):
        if a != b:
            raise ValueError(f"label map '{lbl}' is {b[0]}x{b[1]} but its image '{img}' is {a[0]}x{a[1]} (width x "
                             "height, EXIF orientation applied): the labels would be stretched onto it")


def _coco_semantic(root: Path, split: str) -> tuple[SemanticFolder, list[str]]:
    """COCO for segmentation: ``semantic/{split}2017/<stem>.png`` label maps, else the instance masks painted.

    Raises:
        ValueError: no label maps and an annotation without a segmentation (named), or a label map whose size is
            not its image's.
    """
    det = CocoDetection(root, split)
    sem = root / "semantic" / f"{split}2017"
    infos = [det.coco.loadImgs(i)[0] for i in det.ids]
    items = [(det.images / info["file_name"], sem / f"{Path(info['file_name']).stem}.png") for info in infos]
    if not all(lbl.is_file() for _, lbl in items):
        if det.no_masks:
            raise ValueError(f"COCO '{root}' has no semantic/{split}2017 label maps and {det.no_masks}: segmentation "
                             "paints the instance masks, so every annotation needs one")
        items = [(img, None) for img, _ in items]

    def paint(i: int) -> np.ndarray:
        info = infos[i]
        out = np.zeros((info["height"], info["width"]), np.int64)
        for a in det.coco.loadAnns(det.coco.getAnnIds(imgIds=info["id"])):
            out[det.coco.annToMask(a) > 0] = IGNORE if a.get("iscrowd", 0) else det.label_of[a["category_id"]]
        return out

    return SemanticFolder(items, paint=paint), ["background", *det.classes]


@dataclass
class DenseData:
    """Train / val / test datasets of one source for a dense task (transforms set by :meth:`with_transforms`).

    Attributes:
        layout: 'coco', 'voc' or 'ade20k'; classes: names in label order (detection: the K object classes, labels
            1..K; segmentation: every class including background where the layout has one, labels 0..K-1).
        coco: detection only, split -> (pycocotools ground truth, category id of each label, the split's image
            ids) for COCO's evaluator.
    """

    name: str
    layout: str
    classes: list[str]
    train: Subset
    val: Subset
    test: Subset
    coco: dict[str, Any]
    no_masks: str | None = None  # detection: why the data has no instance masks (None: it has them)

    @property
    def num_classes(self) -> int:
        """Number of classes."""
        return len(self.classes)

    def with_transforms(self, train_tf: Callable, eval_tf: Callable) -> "DenseData":
        """Transforms of (image, target) pairs: ``train_tf`` on train, ``eval_tf`` on val and test."""
        self.train.transform, self.val.transform, self.test.transform = train_tf, eval_tf, eval_tf
        return self


def _holdout(n: int, seed: int) -> tuple[list[int], list[int]]:
    """Seeded (train, val) indices of n items, 10% (at least one) held out for validation."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    k = max(1, n // 10)
    return sorted(order[k:]), sorted(order[:k])


def _splits(make: Callable[[str], Dataset], has: Callable[[str], bool], seed: int, val: str = "val",
            train: str = "train", test: str = "test") -> dict[str, tuple[Dataset, list[int]]]:
    """split -> (base dataset, indices): train/val/test when the layout has a test split, else test = val and
    validation held out of train."""
    tr = make(train)
    if has(test):
        va, te = make(val), make(test)
        return {"train": (tr, range(len(tr))), "val": (va, range(len(va))), "test": (te, range(len(te)))}
    te = make(val)
    keep, held = _holdout(len(tr), seed)
    return {"train": (tr, keep), "val": (tr, held), "test": (te, range(len(te)))}


def _class_file(root: Path) -> list[str] | None:
    for path in (root / "classes.txt", root.parent / "classes.txt"):
        if path.is_file():
            return [line.strip() for line in path.read_text().splitlines() if line.strip()]
    return None


def _values_found(ds: SemanticFolder, limit: int = 2000) -> list[str]:
    found: set[int] = set()
    for i in range(min(len(ds), limit)):
        found |= set(np.unique(ds[i][1].numpy()).tolist())
    found.discard(IGNORE)
    return [str(v) for v in range(max(found) + 1)] if found else ["0"]


def _find(root: Path, subs: tuple[str, ...], marker: str) -> Path | None:
    for cand in (root, *(root / s for s in subs)):
        if (cand / marker).exists():
            return cand
    return None


def recognise(path: Path, task: str) -> tuple[str, Path]:
    """(layout, root) of the data at ``path`` for ``task`` ('detect' or 'segment').

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: no layout recognised; the message lists the files looked for.
    """
    if not path.exists():
        raise FileNotFoundError(f"data path '{path}' does not exist")
    if (path / "annotations" / "instances_train2017.json").is_file():
        return "coco", path
    voc = _find(path, ("VOCdevkit/VOC2012", "VOCdevkit/VOC2007", "VOC2012", "VOC2007"), "JPEGImages")
    marker = "ImageSets/Main/train.txt" if task == "detect" else "ImageSets/Segmentation/train.txt"
    if voc is not None and (voc / marker).is_file():
        return "voc", voc
    ade = _find(path, ("ADEChallengeData2016",), "images/training")
    if task == "segment" and ade is not None and (ade / "annotations" / "training").is_dir():
        return "ade20k", ade
    wanted = ("annotations/instances_train2017.json (COCO), JPEGImages/ with ImageSets/Main/train.txt and "
              "Annotations/*.xml (VOC detection)") if task == "detect" else (
        "annotations/instances_train2017.json (COCO), JPEGImages/ with ImageSets/Segmentation/train.txt and "
        "SegmentationClass/*.png (VOC), images/training/ with annotations/training/ (ADE20K)")
    raise ValueError(f"data path '{path}' is in no layout the '{task}' task reads: looked for {wanted}")


def load_dense(data: str, task: str, split_seed: int = 0) -> DenseData:
    """Load a detection ('detect') or segmentation ('segment') source; see the module doc.

    Raises:
        FileNotFoundError / ValueError: missing files or an unrecognised layout (naming what was looked for).
    """
    if task not in ("detect", "segment"):
        raise ValueError(f"task='{task}' is not one of detect, segment")
    if data == "fashion-mnist":
        layout, root, name = "coco", default_scenes(), "fashion-mnist-scenes"
    else:
        layout, root = recognise(Path(data), task)
        name = root.name
    coco: dict[str, Any] = {}
    if layout == "coco":
        has = lambda s: (root / "annotations" / f"instances_{s}2017.json").is_file()  # noqa: E731
        if task == "detect":
            parts = _splits(lambda s: CocoDetection(root, s), has, split_seed)
            classes = parts["train"][0].classes
        else:
            made: dict[str, list[str]] = {}

            def make(s: str) -> SemanticFolder:
                ds, made[s] = _coco_semantic(root, s)
                return ds

            parts = _splits(make, has, split_seed)
            classes = made["train"]
    elif layout == "voc":
        if task == "detect":
            xml_names = sorted({n for x in (root / "Annotations").glob("*.xml") for n, _, _ in _voc_objects(x)[0]})
            classes = _class_file(root) or (list(VOC_CLASSES) if set(xml_names) <= set(VOC_CLASSES) else xml_names)
            parts = _splits(lambda s: VOCDetection(root, s, classes),
                            lambda s: (root / "ImageSets" / "Main" / f"{s}.txt").is_file(), split_seed)
        else:
            lists = root / "ImageSets" / "Segmentation"
            make = lambda s: SemanticFolder([(root / "JPEGImages" / f"{i}.jpg", root / "SegmentationClass" / f"{i}.png")  # noqa: E731
                                             for i in _ids(lists / f"{s}.txt")])
            parts = _splits(make, lambda s: (lists / f"{s}.txt").is_file(), split_seed)
            classes = _class_file(root) or ["background", *VOC_CLASSES]
    else:
        def make(s: str) -> SemanticFolder:
            imgs = sorted((root / "images" / s).glob("*.jpg"))
            if not imgs:
                raise ValueError(f"'{root / 'images' / s}' holds no .jpg images")
            return SemanticFolder([(p, root / "annotations" / s / f"{p.stem}.png") for p in imgs], shift=True)

        parts = _splits(make, lambda s: False, split_seed, val="validation", train="training")
        classes = _ade_classes(root) or _class_file(root) or _values_found(parts["train"][0])
    no_masks = None
    if task == "detect":
        coco = {s: (base.coco, base.category_of, [base.ids[i] for i in idx]) for s, (base, idx) in parts.items()}
        no_masks = next((b.no_masks for b, _ in parts.values() if getattr(b, "no_masks", None)), None) or (
            "the VOC detection layout has boxes only" if layout == "voc" else None)
    else:
        for base in {id(b): b for b, _ in parts.values()}.values():
            base.check_labels(len(classes))
    sets = {s: Subset(base, list(idx)) for s, (base, idx) in parts.items()}
    return DenseData(name, layout, classes, sets["train"], sets["val"], sets["test"], coco, no_masks)


def _ade_classes(root: Path) -> list[str] | None:
    """ADE20K's 150 class names from ``objectInfo150.txt`` (tab-separated, name last) or ``objectInfo150.csv``."""
    for name, sep in (("objectInfo150.txt", "\t"), ("objectInfo150.csv", ",")):
        path = root / name
        if path.is_file():
            rows = [line.split(sep) for line in path.read_text().splitlines()[1:] if line.strip()]
            return [r[-1].strip().split(";")[0] for r in rows]
    return None


def detection_collate(batch):
    """Lists of images and targets (torchvision's detectors take images of different sizes)."""
    images, targets = zip(*batch)
    return list(images), list(targets)


def segmentation_collate(batch):
    """(images padded with 0 to the batch's largest, (B, 3, H, W); list of label maps; list of image sizes)."""
    images, labels = zip(*batch)
    h, w = max(i.shape[-2] for i in images), max(i.shape[-1] for i in images)
    out = images[0].new_zeros(len(images), 3, h, w)
    for k, im in enumerate(images):
        out[k, :, :im.shape[-2], :im.shape[-1]] = im
    if all(lbl.shape == images[0].shape[-2:] for lbl in labels) and all(i.shape == images[0].shape for i in images):
        return out, torch.stack(labels), None
    return out, list(labels), [tuple(i.shape[-2:]) for i in images]

