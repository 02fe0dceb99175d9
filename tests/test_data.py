"""Data sources, splits and transforms."""
import gzip
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from mslora.data import build_transforms, load_classification, load_rgb


def write_idx(root, n_train=1100, n_test=50):
    """Fashion-MNIST-format idx files (gzipped, as Debian ships them) with random content."""
    rng = np.random.default_rng(0)
    root.mkdir()
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 255, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        with gzip.open(root / f"{prefix}-images-idx3-ubyte.gz", "wb") as f:
            f.write(struct.pack(">IIII", 2051, n, 28, 28) + images.tobytes())
        with gzip.open(root / f"{prefix}-labels-idx1-ubyte.gz", "wb") as f:
            f.write(struct.pack(">II", 2049, n) + labels.tobytes())
    return images, labels


def test_fashion_mnist_idx_and_1k_split(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("FASHION_MNIST_DIR", str(tmp_path / "fm"))
    test_images, test_labels = write_idx(tmp_path / "fm")
    d = load_classification("fashion-mnist", "1k", split_seed=3)
    assert (len(d.train), len(d.val), len(d.test), d.num_classes) == (800, 200, 50, 10)
    assert not set(d.train.indices) & set(d.val.indices)
    img, label = d.test[7]
    assert np.array_equal(np.asarray(img), test_images[7]) and label == test_labels[7]
    again = load_classification(str(tmp_path / "fm"), "1k", split_seed=3)  # a path works the same
    assert again.train.indices == d.train.indices
    other = load_classification("fashion-mnist", "1k", split_seed=4)
    assert other.train.indices != d.train.indices
    full = load_classification("fashion-mnist", "full")
    assert (len(full.train), len(full.val)) == (990, 110)


def test_single_folder_is_split_70_15_15(image_folder):
    d = load_classification(str(image_folder), "1k")
    assert (len(d.train), len(d.val), len(d.test)) == (16, 4, 4) and d.classes == ["ant", "bee", "cat"]
    assert not set(d.train.indices) & set(d.test.indices) and not set(d.val.indices) & set(d.test.indices)


def test_train_val_test_folders(tmp_path, image_folder):
    import shutil

    root = tmp_path / "tvt"
    for s in ("train", "val", "test"):
        shutil.copytree(image_folder, root / s)
    d = load_classification(str(root), "full")
    assert (len(d.train), len(d.val), len(d.test)) == (24, 24, 24)
    assert d.val.base is not d.train.base


def test_bad_sources(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_classification(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no images"):
        load_classification(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="split='2k'"):
        load_classification(str(tmp_path / "empty"), "2k")


def test_unreadable_images_are_all_named_when_the_data_loads(image_folder):
    (image_folder / "ant" / "broken.png").write_bytes(b"not a png")
    (image_folder / "ant" / "empty.png").write_bytes(b"")
    with pytest.raises(ValueError, match=r"^2 of \d+ images of 'imgs' cannot be read: cannot read image ") as e:
        load_classification(str(image_folder), "full")
    assert "broken.png': UnidentifiedImageError" in str(e.value) and "empty.png': Unid" in str(e.value)
    with pytest.raises(ValueError, match="cannot read image '.*x.png'"):  # read later all the same
        load_rgb(image_folder / "x.png")


@pytest.mark.parametrize("train", [True, False])
def test_transforms_make_normalised_rgb(train):
    tf = build_transforms(32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), train=train)
    x = tf(Image.fromarray(np.full((28, 28), 255, np.uint8), mode="L"))  # grey input
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    assert torch.allclose(x, torch.ones_like(x), atol=1e-2)  # white -> (1 - 0.5) / 0.5
    # per-channel mean and std, each channel its own: a swap of channels or of mean and std changes the values
    mean, std = (0.1, 0.4, 0.7), (0.2, 0.5, 0.25)
    rgb = np.zeros((28, 28, 3), np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 51, 153, 255  # 0.2, 0.6, 1.0
    x = build_transforms(32, mean, std, train=train)(Image.fromarray(rgb))
    expected = [(v - m) / s for v, m, s in zip((0.2, 0.6, 1.0), mean, std)]  # 0.5, 0.4, 1.2
    assert torch.allclose(x.mean((1, 2)), torch.tensor(expected), atol=1e-3)
