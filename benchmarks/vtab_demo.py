"""The VTAB-1k loader and `mslora report` on the main job's data: Fashion-MNIST written in VTAB-1k layout
(train800.txt / val200.txt / train800val200.txt / test.txt, PNGs beside them; the 800 / 200 drawn with split seed
0 as the main job draws them, the full 10,000-image test set), then trained from that folder and reported.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/vtab_demo.py [--epochs 10] [--seeds 0 1] [--methods mslora linear]

Writes the folder to ~/.cache/mslora/fashion-mnist-vtab1k, runs to a temporary directory, and the report to
benchmarks/results/vtab_demo/ (report.md and two PNGs).
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

OUT = Path(__file__).parent / "results" / "vtab_demo"
FOLDER = Path.home() / ".cache" / "mslora" / "fashion-mnist-vtab1k"


def write_vtab1k(folder: Path) -> Path:
    """Fashion-MNIST as a VTAB-1k task folder (skipped when it is already complete)."""
    from mslora.data import load_classification

    if (folder / "test.txt").is_file():
        return folder
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    data = load_classification("fashion-mnist", "random1k", 0)
    lists = {}
    for name, subset in (("train800", data.train), ("val200", data.val), ("test", data.test)):
        (tmp / name).mkdir(parents=True)
        lines = []
        for i in range(len(subset)):
            img, label = subset[i]
            img.save(tmp / name / f"{i:05d}.png")
            lines.append(f"{name}/{i:05d}.png {label}")
        lists[name] = lines
    lists["train800val200"] = lists["train800"] + lists["val200"]
    for name, lines in lists.items():
        (tmp / f"{name}.txt").write_text("\n".join(lines) + "\n")
    (tmp / "classes.txt").write_text("\n".join(data.classes) + "\n")
    tmp.rename(folder)
    return folder


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--methods", nargs="+", default=["mslora", "linear"])
    a = p.parse_args()
    from mslora.engine import main_job, train
    from mslora.tools.report import report

    folder = write_vtab1k(FOLDER)
    with tempfile.TemporaryDirectory() as runs:
        dirs = []
        for method in a.methods:
            for seed in a.seeds:
                _, run = train(main_job(data=str(folder), method=method, seed=seed, epochs=a.epochs, output=runs))
                dirs.append(run)
        shutil.rmtree(OUT, ignore_errors=True)
        print(report(dirs, OUT))


if __name__ == "__main__":
    main()
