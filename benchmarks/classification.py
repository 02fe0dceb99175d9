"""Every method that applies to the main job's backbone, three seeds, on two real data sets, with one recipe.

Backbone: frozen ImageNet EfficientNet-Lite0 (offline weights). Recipe: the library's defaults (zero-initialised
head, gradient-norm clipping at 1.0, AdamW wd 0.05, warmup then cosine), 64 px, batch 32, BUDGET epochs.
Data sets (both real, both offline):
- ``fashion-mnist``: the main job's task, 800 train / 200 val drawn with split seed 0, the 10,000 test images;
- ``digits``: scikit-learn's bundled UCI handwritten digits (1,797 8x8 grey images, 10 classes) written as an
  ImageFolder by :func:`make_digits` and split by mslora itself (70/15/15 pools with split seed 0, then 800 train
  / 200 val, 269 test images).
Each method runs at one learning rate (LR below), chosen on Fashion-MNIST validation in the issue-3 search
(benchmarks/results/classification_issue3_recipe.json) and not re-tuned for digits: the second data set tests
that the recipe does not collapse on a data set it was not tuned on. Every run's ``collapsed`` flag is kept;
a collapsed run is reported as collapsed and counted, never averaged in silently.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/classification.py run DATASET [METHOD ...] [--part NAME]
    .venv/bin/python benchmarks/classification.py report                              # markdown + plot
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/classification.py vit                # ViT-S/16 loss check
"""
from __future__ import annotations

import json
import logging
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import mslora
from mslora.engine import TrainConfig, train

RESULTS = Path(__file__).parent / "results" / "classification_{}.json"  # one file per data set (and process part)
PLOT = Path(__file__).parent / "results" / "classification.png"
BUDGET = dict(epochs=10, img_size=64, batch_size=32, warmup_epochs=1, device="cpu")
SEEDS = (0, 1, 2)
STEPS = 12  # ViT check: optimiser steps on one fixed batch per method
METHODS = {  # name -> (options, lr): lr as chosen on Fashion-MNIST validation in the issue-3 search
    "mslora": ({"rank": 32}, 1e-2),
    "linear": ({}, 3e-2),
    "full": ({}, 1e-3),
    "bitfit": ({}, 1e-2),
    "normtune": ({}, 1e-2),
    "ssf": ({}, 1e-2),
    "rlrr": ({}, 1e-2),
    "lora": ({"rank": 8}, 3e-3),
    "dora": ({"rank": 8}, 3e-3),  # not searched in issue 3: LoRA's rate
    "hira": ({"rank": 8}, 1e-2),
    "colora": ({}, 3e-3),
    "pissa": ({"rank": 8}, 3e-3),  # not searched: LoRA's rate (PiSSA on the 1x1 convs since issue 7)
    "mona": ({}, 1e-2),  # not searched: the adapters' rate (added in issue 7)
    "adapter": ({"rank": 8}, 1e-2),
    "conv_adapter": ({"gamma": 32}, 1e-2),
    "lorand": ({}, 1e-2),
}
NOT_APPLICABLE = {
    "adaptformer": "needs a transformer MLP beside which to sit; EfficientNet-Lite0 has none",
    "vpt": "needs a token sequence (ViT-style backbone)",
    "fixed": "trains exactly what linear trains for classification (frozen backbone, the head)",
}
DATASETS = ("fashion-mnist", "digits")


def make_digits(root: Path | None = None) -> Path:
    """Write scikit-learn's digits (1,797 8x8 images, 16 grey levels) as an ImageFolder of PNGs scaled to 0-255;
    returns its directory (default ~/.cache/mslora/digits). Written once."""
    from sklearn.datasets import load_digits

    root = root or Path.home() / ".cache" / "mslora" / "digits"
    if (root / "9").is_dir():
        return root
    d = load_digits()
    for i, (img, label) in enumerate(zip(d.images, d.target)):
        (root / str(label)).mkdir(parents=True, exist_ok=True)
        Image.fromarray((img * 255 / 16).round().astype(np.uint8)).save(root / str(label) / f"{i:04d}.png")
    return root


def _path(dataset: str, part: str = "") -> Path:
    return Path(str(RESULTS).format(dataset + (f".{part}" if part else "")))


def _load(dataset: str) -> list[dict]:
    """Every row of a data set: its file and the files of parts run by other processes."""
    files = [_path(dataset), *sorted(RESULTS.parent.glob(f"classification_{dataset}.*.json"))]
    return [r for f in files if f.exists() for r in json.loads(f.read_text())]


def _run(dataset: str, method: str, seed: int, tmp: str) -> dict:
    opts, lr = METHODS[method]
    data = str(make_digits()) if dataset == "digits" else dataset
    m, run = train(TrainConfig(method=method, lr=lr, seed=seed, data=data, output=tmp, method_options=opts, **BUDGET))
    hist = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    keep = ("method", "lr", "seed", "trainable_params", "adapter_params", "total_params", "val_top1", "test_top1",
            "test_top5", "test_images", "best_epoch", "collapsed", "collapse_reason", "images_per_s", "seconds")
    return {"dataset": dataset, "options": opts, **{k: m[k] for k in keep},
            "train_loss": [round(h["train_loss"], 4) for h in hist]}


def run(dataset: str, methods: list[str], part: str = "") -> None:
    """Run the missing (method, seed) pairs of one data set; the two data sets can run as two processes, and
    one data set as several with disjoint method lists and a ``part`` name each (its own results file)."""
    have = {(r["method"], r["seed"]) for r in _load(dataset)}
    rows = json.loads(_path(dataset, part).read_text()) if _path(dataset, part).exists() else []
    with tempfile.TemporaryDirectory() as tmp:
        for method in methods:
            for seed in SEEDS:
                if (method, seed) in have:
                    continue
                rows.append(_run(dataset, method, seed, tmp))
                _path(dataset, part).write_text(json.dumps(rows, indent=1) + "\n")
                print(json.dumps({k: v for k, v in rows[-1].items() if k != "train_loss"}), flush=True)


def summary(rows: list[dict]) -> list[dict]:
    """Per (dataset, method): test top-1 mean and std over the seeds that did not collapse, and the collapsed count."""
    out = []
    for dataset in DATASETS:
        for method, (opts, lr) in METHODS.items():
            runs = [r for r in rows if r["dataset"] == dataset and r["method"] == method]
            if not runs:
                continue
            ok = [r["test_top1"] for r in runs if not r["collapsed"]]
            out.append({"dataset": dataset, "method": method, "options": opts, "lr": lr, "seeds": len(runs),
                        "collapsed": sum(r["collapsed"] for r in runs), "trainable_params": runs[0]["trainable_params"],
                        "test_top1_mean": statistics.mean(ok) if ok else float("nan"),
                        "test_top1_std": statistics.stdev(ok) if len(ok) > 1 else 0.0,
                        "test_top1_min": min(r["test_top1"] for r in runs),
                        "seconds_min": min(r["seconds"] for r in runs)})
    return out


def report() -> str:
    rows = summary([r for d in DATASETS for r in _load(d)])
    by = {(r["dataset"], r["method"]): r for r in rows}
    lines = ["| method | options | lr | trainable params | Fashion-MNIST test top-1 | worst seed | digits test top-1 | "
             "worst seed | collapsed runs | s/run FMNIST (fastest) |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    order = sorted(METHODS, key=lambda m: -by.get(("fashion-mnist", m), {}).get("test_top1_mean", -1))
    for method in order:
        f, d = by.get(("fashion-mnist", method)), by.get(("digits", method))
        if f is None and d is None:
            continue
        r = f or d
        # (n): the seeds averaged, collapsed ones left out (they are counted in their own column)
        cell = lambda x: f"{100 * x['test_top1_mean']:.1f} ± {100 * x['test_top1_std']:.1f} ({x['seeds'] - x['collapsed']})" if x else "-"  # noqa: E731
        worst = lambda x: f"{100 * x['test_top1_min']:.1f}" if x else "-"  # noqa: E731
        collapsed = sum(x["collapsed"] for x in (f, d) if x)
        total = sum(x["seeds"] for x in (f, d) if x)
        opts = ", ".join(f"{k}={v}" for k, v in r["options"].items())
        lines.append(f"| {method} | {opts} | {r['lr']:g} | {r['trainable_params']:,} | {cell(f)} | {worst(f)} | {cell(d)} | "
                     f"{worst(d)} | {collapsed} of {total} | {f['seconds_min']:.0f} |" if f else "")
    _plot(rows)
    return "\n".join(ln for ln in lines if ln)


def _plot(rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, dataset in zip(axes, DATASETS):
        for r in (r for r in rows if r["dataset"] == dataset):
            ax.errorbar(r["trainable_params"], 100 * r["test_top1_mean"], yerr=100 * r["test_top1_std"], fmt="o",
                        capsize=3)
            ax.annotate(r["method"], (r["trainable_params"], 100 * r["test_top1_mean"]), textcoords="offset points",
                        xytext=(4, 4), fontsize=8)
        ax.set_xscale("log")
        ax.set_xlabel("trainable parameters (log scale)")
        ax.set_ylabel("test top-1 (%), mean ± std over 3 seeds")
        ax.set_title(f"{dataset}, frozen ImageNet EfficientNet-Lite0, {BUDGET['epochs']} epochs, {BUDGET['img_size']} px")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(PLOT, dpi=110)


def vit_check(methods: list[str]) -> None:
    """Transformer path: random-init ViT-S/16 at 48 px (a 3x3 patch grid), one fixed batch of 32 training images
    per method; loss on that batch before and after STEPS AdamW steps (lr 1e-3) on it. It must fall: gradients
    reach the method's parameters and the optimiser uses them (correctness, not accuracy). The head is
    timm-initialised here (a zero head gives the adapters no gradient on the first step)."""
    from torch.utils.data import default_collate

    from mslora.tasks import get_task

    out = Path(__file__).parent / "results" / "vit_small_check.json"
    rows = json.loads(out.read_text()) if out.exists() else {}
    for method in methods:
        if method in rows:
            continue
        cfg = TrainConfig(backbone="vit_small_patch16_224", pretrained=False, method=method, img_size=48, lr=1e-3,
                          epochs=1, head_init="timm", method_options={"rank": 16} if method == "mslora" else {})
        task = get_task("classify")(cfg)
        torch.manual_seed(0)
        try:
            model = task.build_model()
        except ValueError as e:
            rows[method] = {"applies": False, "why": str(e)}
            continue
        task.set_transforms(model)
        x, y = default_collate([task.datasets["train"][(i, i)] for i in range(32)])
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr, weight_decay=0.05)
        model.train()
        losses = []
        for _ in range(STEPS + 1):
            loss = torch.nn.functional.cross_entropy(model(x), y)
            losses.append(loss.item())
            opt.zero_grad()
            loss.backward()
            opt.step()
        rows[method] = {"applies": True, "before": round(losses[0], 4), "after": round(losses[-1], 4),
                        "falls": losses[-1] < losses[0],
                        "trainable_params": mslora.count_parameters(model)["trainable_params"]}
        out.write_text(json.dumps(rows, indent=1) + "\n")
        print(method, rows[method], flush=True)
    out.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    cmd, names = (sys.argv[1] if len(sys.argv) > 1 else "report"), sys.argv[2:]
    if cmd == "run":
        if not names or names[0] not in DATASETS:
            sys.exit(f"usage: classification.py run {{{','.join(DATASETS)}}} [METHOD ...]")
        part = names.pop(names.index("--part") + 1) if "--part" in names else ""
        names = [n for n in names if n != "--part"]
        run(names[0], names[1:] or list(METHODS), part)
    elif cmd == "vit":
        vit_check(names or mslora.list_methods())
    else:
        print(report())
