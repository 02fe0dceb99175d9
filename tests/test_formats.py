"""Classification formats (mslora.data.formats) on small folders written in exactly each layout."""
import json

import numpy as np
import pytest
from PIL import Image

from mslora.data import load_classification
from mslora.data.formats import recognise


def _image(path, value=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(path)


def _vtab(root, n_train=8, n_val=2, n_test=5, classes=3):
    lists = {}
    for name, n in (("train800", n_train), ("val200", n_val), ("test", n_test)):
        lines = []
        for i in range(n):
            rel = f"images/{name}_{i}.jpg"
            _image(root / rel, 10 * i)
            lines.append(f"{rel} {i % classes}")
        lists[name] = lines
    lists["train800val200"] = lists["train800"] + lists["val200"]
    for name, lines in lists.items():
        (root / f"{name}.txt").write_text("\n".join(lines) + "\n")
    return root


def test_vtab1k_both_protocols(tmp_path):
    root = _vtab(tmp_path / "caltech101")
    assert recognise(root) == "vtab1k"
    d = load_classification(str(root))  # VTAB-1k's own split by default: train800, pick on val200
    assert (len(d.train), len(d.val), len(d.test)) == (8, 2, 5) and not d.val_in_train and d.split == "train800"
    assert d.classes == ["0", "1", "2"] and d.name == "caltech101"
    img, label = d.train[4]
    assert img.size == (8, 8) and label == 4 % 3
    d = load_classification(str(root), "train800val200")  # RLRR: train on all 1,000, keep the last epoch
    assert (len(d.train), len(d.val)) == (10, 2) and d.val_in_train
    (root / "classes.txt").write_text("cat\ndog\nfish\n")
    assert load_classification(str(root), "train800").classes == ["cat", "dog", "fish"]
    for other in ("full", "random1k", "1k"):  # a random draw is never taken for VTAB-1k's published lists
        with pytest.raises(ValueError, match="does not apply to VTAB-1k data"):
            load_classification(str(root), other)
    (root / "val200.txt").write_text("images/val200_0.jpg one\n")
    with pytest.raises(ValueError, match="val200.txt line 1: 'images/val200_0.jpg one' is not"):
        load_classification(str(root))


def test_fgvc_json_splits_labels_made_contiguous(tmp_path):
    root = tmp_path / "CUB_200_2011"
    annos = {"train": {"images/001.a/1.jpg": 1, "images/005.b/2.jpg": 5, "images/001.a/3.jpg": 1},
             "val": {"images/005.b/4.jpg": 5}, "test": {"images/001.a/5.jpg": 1, "images/009.c/6.jpg": 9}}
    for split, a in annos.items():
        for rel in a:
            _image(root / rel)
        (root / f"{split}.json").write_text(json.dumps({k.removeprefix("images/"): v for k, v in a.items()}))
    assert recognise(root) == "fgvc"
    d = load_classification(str(root), "full")
    assert (len(d.train), len(d.val), len(d.test)) == (3, 1, 2)
    assert d.classes == ["1", "5", "9"] and [d.test[i][1] for i in range(2)] == [0, 2]


def test_csv_file_and_csv_splits(tmp_path):
    rows = ["path,label"] + [f"img/{i}.png,{'dog' if i % 2 else 'cat'}" for i in range(20)]
    for i in range(20):
        _image(tmp_path / "img" / f"{i}.png", i)
    (tmp_path / "all.csv").write_text("\n".join(rows) + "\n")
    d = load_classification(str(tmp_path / "all.csv"), "full")
    assert d.classes == ["cat", "dog"] and (len(d.train), len(d.val), len(d.test)) == (14, 3, 3)
    folder = tmp_path / "splits"
    folder.mkdir()
    (folder / "train.csv").write_text("".join(f"../img/{i}.png,{i % 3}\n" for i in range(12)))
    (folder / "test.csv").write_text("".join(f"../img/{i}.png,{i % 3}\n" for i in range(12, 20)))
    assert recognise(folder) == "csv"
    d = load_classification(str(folder), "full", data_format="csv")
    assert d.classes == ["0", "1", "2"] and (len(d.train) + len(d.val), len(d.test)) == (12, 8)
    assert d.test[0][1] == 12 % 3
    (folder / "train.csv").write_text("just-a-path\n")
    with pytest.raises(ValueError, match="train.csv row 1: \\['just-a-path'\\] is not 'path,label'"):
        load_classification(str(folder))


def test_pets_and_food101_through_torchvision(tmp_path):
    pets = tmp_path / "oxford-iiit-pet"
    for split, ids in (("trainval", ["Abyssinian_1", "great_pyrenees_2"]), ("test", ["Abyssinian_3"])):
        for i in ids:
            _image(pets / "images" / f"{i}.jpg")
        (pets / "annotations").mkdir(parents=True, exist_ok=True)
        (pets / "annotations" / f"{split}.txt").write_text(
            "".join(f"{i} {1 if i.startswith('Aby') else 2} 1 1\n" for i in ids))
    assert recognise(tmp_path) == "pets"
    d = load_classification(str(tmp_path), "full")
    assert d.classes == ["Abyssinian", "Great Pyrenees"] and len(d.test) == 1
    food = tmp_path / "f" / "food-101"
    meta = {"train": {"pizza": ["pizza/1", "pizza/2"], "sushi": ["sushi/3"]}, "test": {"pizza": ["pizza/4"], "sushi": []}}
    (food / "meta").mkdir(parents=True)
    for split, m in meta.items():
        (food / "meta" / f"{split}.json").write_text(json.dumps(m))
        for items in m.values():
            for rel in items:
                _image(food / "images" / f"{rel}.jpg")
    d = load_classification(str(tmp_path / "f"))
    assert d.classes == ["pizza", "sushi"] and len(d.test) == 1 and d.test[0][1] == 0


def test_unrecognised_data_names_what_was_looked_for(tmp_path):
    (tmp_path / "notes.txt").write_text("no images here")
    with pytest.raises(ValueError, match="looked for Fashion-MNIST idx files .*VTAB-1k lists .*train800.txt"):
        load_classification(str(tmp_path))
    with pytest.raises(ValueError, match="is in no format mslora reads"):
        load_classification(str(tmp_path / "notes.txt"))
    with pytest.raises(ValueError, match="data_format='tfrecord' is not one of"):
        load_classification(str(tmp_path), data_format="tfrecord")
    with pytest.raises(ValueError, match="split='train800' names VTAB-1k's published lists"):
        load_classification(str(tmp_path), "train800")


def test_flowers102_through_torchvision(tmp_path, monkeypatch):
    from scipy.io import savemat
    from torchvision.datasets import Flowers102

    root = tmp_path / "flowers-102"
    for i in range(1, 7):
        _image(root / "jpg" / f"image_{i:05d}.jpg", i)
    savemat(root / "imagelabels.mat", {"labels": np.array([[1, 2, 1, 2, 1, 2]])})
    savemat(root / "setid.mat", {"trnid": np.array([[1, 2]]), "valid": np.array([[3, 4]]), "tstid": np.array([[5, 6]])})
    monkeypatch.setattr(Flowers102, "_check_integrity", lambda self: True)  # the real files' md5 sums
    assert recognise(tmp_path) == "flowers102"
    d = load_classification(str(tmp_path), "full")
    assert (len(d.train), len(d.val), len(d.test)) == (2, 2, 2) and [d.test[i][1] for i in range(2)] == [0, 1]
