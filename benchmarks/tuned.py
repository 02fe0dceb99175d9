"""The README's tuned comparisons: ``mslora tune`` with one protocol per task, its report copied into the repository.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/tuned.py fashion-mnist [--processes 2]
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/tuned.py digits [--processes 2]

Classification (issue 19): frozen ImageNet EfficientNet-Lite0 (offline weights), 64 px, batch 32, 10 epochs with one
warmup epoch (the library's recipe: zero-initialised head, gradient-norm clipping at 1.0, AdamW, cosine), on
Fashion-MNIST ``random1k`` (800 train / 200 val drawn with split seed 0, the 10,000 test images) and scikit-learn's
digits written as an ImageFolder (:func:`classification.make_digits`; ``random1k`` of mslora's 70/15/15 pools:
800 / 200, 269 test images). Methods at their library defaults, MSLoRA also at the paper's rank 128; every method
over lr 1e-3, 3e-3, 1e-2, 3e-2 x weight decay 0, 0.05 chosen on validation (seed 0), then seeds 0, 1, 2.
The trials live in ``benchmarks/results/tune/DATASET/`` (git-ignored but for the report); the command run again
resumes where it stopped. Writes ``report.md``, ``report.json`` and ``metric_vs_params.png`` there.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from classification import make_digits  # noqa: E402

from mslora.tools.tune import tune  # noqa: E402

METHODS = ["linear", "full", "bitfit", "lora", "dora", "adapter", "ssf", "rlrr", "colora", "mona", "mslora",
           "mslora@rank=128"]
GRID = {"lr": [1e-3, 3e-3, 1e-2, 3e-2], "weight_decay": [0, 0.05]}
SEEDS = [0, 1, 2]
RECIPE = ["--img-size", "64", "--batch-size", "32", "--epochs", "10", "--warmup-epochs", "1", "--device", "cpu",
          "--split", "random1k"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dataset", choices=("fashion-mnist", "digits"))
    ap.add_argument("--processes", type=int, default=1, help="trials run at once (each on cores / processes)")
    ap.add_argument("--methods", help="comma-separated subset of the methods (default: all)")
    args = ap.parse_args()
    data = str(make_digits()) if args.dataset == "digits" else "fashion-mnist"
    out = Path(__file__).parent / "results" / "tune" / args.dataset
    methods = args.methods.split(",") if args.methods else METHODS
    print(tune(workers=args.processes, train_argv=[*RECIPE, "--data", data], methods=methods, grid=GRID,
               method_grid={}, seeds=SEEDS, output=out))


if __name__ == "__main__":
    main()
