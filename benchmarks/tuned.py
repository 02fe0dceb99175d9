"""The README's tuned comparisons: ``mslora tune`` with one protocol per task, its report copied into the repository.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/tuned.py fashion-mnist [--processes 2]
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/tuned.py digits [--processes 2]
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/tuned.py detect|segment [--processes 2]

Classification (issue 19): frozen ImageNet EfficientNet-Lite0 (offline weights), 64 px, batch 32, 10 epochs with one
warmup epoch (the library's recipe: zero-initialised head, gradient-norm clipping at 1.0, AdamW, cosine), on
Fashion-MNIST ``random1k`` (800 train / 200 val drawn with split seed 0, the 10,000 test images) and scikit-learn's
digits written as an ImageFolder (:func:`classification.make_digits`; ``random1k`` of mslora's 70/15/15 pools:
800 / 200, 270 test images). Methods at their library defaults, MSLoRA also at the paper's rank 128; every method
over lr 1e-3, 3e-3, 1e-2, 3e-2 x weight decay 0, 0.05 chosen on validation (seed 0), then seeds 0, 1, 2.
Dense (the offline scene set, each task's default recipe: Mask R-CNN or UPerNet + FCN over a frozen Lite0, see
``mslora.engine.config.TASK_DEFAULTS``): fixed, full, lora and mslora over lr 3e-4, 1e-3 (weight decay at its
default 0.05), then seeds 0, 1: the smallest grid the issue allows, as a detection run takes 20-25 minutes with
two at once on 2 CPU cores (one thread each), some 3 hours per task, which leaves no room for more.
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
DENSE = dict(methods=["fixed", "full", "lora", "mslora"], grid={"lr": [3e-4, 1e-3]}, seeds=[0, 1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dataset", choices=("fashion-mnist", "digits", "detect", "segment"))
    ap.add_argument("--processes", type=int, default=1, help="trials run at once (each on cores / processes)")
    ap.add_argument("--methods", help="comma-separated subset of the methods (default: all)")
    ap.add_argument("--report", action="store_true", help="train nothing: the report of the trials finished so far")
    args = ap.parse_args()
    out = Path(__file__).parent / "results" / "tune" / args.dataset
    if args.dataset in ("detect", "segment"):  # the task's default data: the scene set
        setup = dict(DENSE, train_argv=["--task", args.dataset, "--device", "cpu"])
    else:
        data = str(make_digits()) if args.dataset == "digits" else "fashion-mnist"
        setup = dict(methods=METHODS, grid=GRID, seeds=SEEDS, train_argv=[*RECIPE, "--data", data])
    if args.methods:
        setup["methods"] = args.methods.split(",")
    print(tune(workers=args.processes, method_grid={}, output=out, report_only=args.report, **setup))


if __name__ == "__main__":
    main()
