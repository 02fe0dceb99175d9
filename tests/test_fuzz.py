"""Property-based tests (hypothesis): broken data sets in every listed layout through ``mslora train`` end in one line
and exit code 2, or train; odd channel counts, grids and options build an identity-at-init MSLoRA or raise
ValueError, nothing else. Derandomised: CI draws the same examples every run (a failure reproduces); run with
``--hypothesis-seed=N`` and without derandomize to explore further."""
import contextlib
import io
import json
import math
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from mslora.cli import main
from mslora.core.layout import Layout
from mslora.methods.mslora import MSLoRA

LAYOUTS = ("imagefolder", "csv", "vtab1k", "fgvc")
N = 9  # images, three classes
LABELS = st.one_of(st.integers(-3, 12), st.sampled_from(["", " ", "1e9", "cat", "[1]", "2.5", "\u00e9"]))
CORRUPTIONS = st.one_of(
    st.tuples(st.just("truncate"), st.integers(0, N - 1), st.floats(0, 1)),  # an image cut at a fraction
    st.tuples(st.just("delete"), st.integers(0, N - 1)),  # a listed image removed
    st.tuples(st.just("label"), st.integers(0, N - 1), LABELS),  # a row's label replaced
    st.tuples(st.just("junk"), st.text(max_size=30)),  # a line of anything appended to the lists
    st.tuples(st.just("empty"),),  # the lists emptied
    st.tuples(st.just("loop"),),  # a symlink back to the root
)


def write(root: Path, layout: str) -> list[Path]:
    """A good data set of ``N`` 12x12 PNGs in ``layout``; returns the image paths in row order."""
    rng = np.random.default_rng(0)
    paths = []
    for i in range(N):
        sub = f"c{i % 3}" if layout == "imagefolder" else "images"
        path = root / sub / f"{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    rows = [(f"images/{i}.png", i % 3) for i in range(N)]
    if layout == "csv":
        (root / "train.csv").write_text("path,label\n" + "".join(f"{p},{y}\n" for p, y in rows))
    elif layout == "vtab1k":
        for name in ("train800", "val200", "train800val200", "test"):
            (root / f"{name}.txt").write_text("".join(f"{p} {y}\n" for p, y in rows))
    elif layout == "fgvc":
        for name in ("train", "val", "test"):
            (root / f"{name}.json").write_text(json.dumps({f"{i}.png": i % 3 for i in range(N)}))
    return paths


def corrupt(root: Path, layout: str, paths: list[Path], change: tuple) -> None:
    """Apply one drawn corruption to the data set at ``root``."""
    kind = change[0]
    lists = sorted(root.glob("*.txt")) + sorted(root.glob("*.csv")) + sorted(root.glob("*.json"))
    if kind == "truncate" and paths[change[1]].exists():
        data = paths[change[1]].read_bytes()
        paths[change[1]].write_bytes(data[:int(len(data) * change[2])])
    elif kind == "delete":
        paths[change[1]].unlink(missing_ok=True)
    elif kind == "label" and lists:
        i, label = change[1], change[2]
        for f in lists:
            if f.suffix == ".json":
                try:
                    d = json.loads(f.read_text())
                except ValueError:  # an earlier corruption broke the file: nothing to relabel
                    continue
                key = f"{i}.png"
                if isinstance(d, dict) and key in d:
                    d[key] = label if not isinstance(label, str) or not label.startswith("[") else [1]
                f.write_text(json.dumps(d))
            else:
                lines = f.read_text().splitlines()
                k = i + (1 if f.suffix == ".csv" else 0)
                if k < len(lines):
                    sep = "," if f.suffix == ".csv" else " "
                    lines[k] = f"{lines[k].rsplit(sep, 1)[0]}{sep}{label}"
                f.write_text("\n".join(lines) + "\n")
    elif kind == "junk":
        for f in lists:
            f.write_text(f.read_text() + change[1] + "\n")
    elif kind == "empty":
        for f in lists:
            f.write_text("{}" if f.suffix == ".json" else "")
    elif kind == "loop" and not (root / ("c0" if layout == "imagefolder" else "images") / "loop").exists():
        (root / ("c0" if layout == "imagefolder" else "images") / "loop").symlink_to(root)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
@given(layout=st.sampled_from(LAYOUTS), changes=st.lists(CORRUPTIONS, min_size=1, max_size=3))
@example(layout="imagefolder", changes=[("delete", 0), ("truncate", 0, 0.0)])  # found once in CI (a test bug)
def test_broken_data_ends_in_one_line_or_trains(layout, changes):
    with tempfile.TemporaryDirectory() as tmp:
        root, out = Path(tmp) / "data", Path(tmp) / "runs"
        paths = write(root, layout)
        for change in changes:
            corrupt(root, layout, paths, change)
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = main(["train", "--data", str(root), "--backbone", "test_resnet", "--no-pretrained", "--img-size",
                         "16", "--epochs", "1", "--batch-size", "4", "--rank", "4", "--workers", "0", "--device",
                         "cpu", "--output", str(out)])
        lines = [ln for ln in err.getvalue().splitlines() if ln.startswith("mslora: error:")]
        assert "Traceback" not in err.getvalue()
        runs = [p for p in out.iterdir() if p.is_dir()] if out.exists() else []
        if code == 0:
            assert len(runs) == 1 and (runs[0] / "metrics.json").is_file()
            return
        assert code == 2 and len(lines) == 1, err.getvalue()[-2000:]
        if runs:  # refused only when an image's pixel data was decoded (its header was whole): the run says why
            log = (runs[0] / "train.log").read_text()
            assert "run failed" in log and "cannot read image" in log, (changes, log[-500:])
            assert any(c[0] == "truncate" for c in changes), changes


@settings(max_examples=60, deadline=None, derandomize=True)
@given(channels=st.sampled_from([1, 3, 10, 27, 386]), rank=st.integers(1, 40), groups=st.integers(1, 8),
       kernels=st.lists(st.integers(1, 9), min_size=0, max_size=3), h=st.integers(1, 9), w=st.integers(1, 9),
       prefix=st.integers(0, 2), layout=st.sampled_from(["nchw", "nhwc", "tokens"]),
       flags=st.fixed_dictionaries({k: st.booleans() for k in ("enhance", "global_pool", "gate", "channel_shuffle",
                                                                 "input_norm")}))
def test_mslora_on_odd_shapes_is_identity_at_init_or_a_valueerror(channels, rank, groups, kernels, h, w, prefix,
                                                                   layout, flags):
    from mslora.methods.mslora import MSLoRAConfig

    lay = Layout(layout, num_prefix_tokens=prefix, grid_size=(h, w)) if layout == "tokens" else Layout(layout)
    try:
        MSLoRAConfig(rank=rank, groups=groups, kernel_sizes=tuple(kernels))
        module = MSLoRA(channels, rank=rank, groups=groups, kernel_sizes=tuple(kernels), layout=lay, **flags).eval()
    except ValueError:
        return
    shape = {"nchw": (2, channels, h, w), "nhwc": (2, h, w, channels), "tokens": (2, prefix + h * w, channels)}[layout]
    x = torch.randn(shape)
    with torch.no_grad():
        y = module(x)
    assert y.shape == x.shape and torch.equal(y, x)  # zero-initialised up-projection: the identity
    assert all(math.isfinite(float(v)) for v in y.flatten()[:5])


@pytest.mark.parametrize("method", ["mslora", "adapter", "lora", "mona", "ssf", "vpt", "rlrr"])
@settings(max_examples=6, deadline=None, derandomize=True)
@given(size=st.sampled_from([17, 31, 40]))
def test_methods_adapt_at_odd_image_sizes_or_say_why(method, size):
    import timm

    import mslora

    model = timm.create_model("test_resnet", num_classes=3).eval()
    try:
        mslora.adapt(model, method)
    except ValueError:
        return
    x = torch.randn(1, 3, size, size + 3)
    with torch.no_grad():
        assert model(x).shape == (1, 3)
