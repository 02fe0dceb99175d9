"""Why runs collapsed in the issue-3 benchmark: the two recipes' differences switched on one at a time.

Two runs that collapsed there (frozen ImageNet EfficientNet-Lite0, Fashion-MNIST 1k split, 10 epochs, 64 px,
batch 32): LoRA rank 8 at lr 3e-3 seed 1, and Conv-Adapter gamma 32 at lr 1e-2 seed 0. Each runs with
- ``old``: timm's head initialisation, no gradient clipping (the issue-3 recipe);
- ``clip_only``: timm's head, the global gradient norm clipped at 1.0;
- ``zero_only``: a zero-initialised head, no clipping;
- ``new``: zero head and clipping (the library's defaults now).
Writes benchmarks/results/collapse_ablation.json (test top-1, collapsed flag, training loss per epoch).

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/collapse_ablation.py [VARIANT ...]
"""
from __future__ import annotations

import json
import logging
import sys
import tempfile
from pathlib import Path

from mslora.engine import TrainConfig, train

OUT = Path(__file__).parent / "results" / "collapse_ablation.json"
BUDGET = dict(epochs=10, img_size=64, batch_size=32, warmup_epochs=1, device="cpu")
CASES = [("lora", {"rank": 8}, 3e-3, 1), ("conv_adapter", {"gamma": 32}, 1e-2, 0)]
VARIANTS = {"old": dict(head_init="timm", clip_grad=0.0), "clip_only": dict(head_init="timm", clip_grad=1.0),
            "zero_only": dict(head_init="zero", clip_grad=0.0), "new": dict(head_init="zero", clip_grad=1.0)}


def main(variants: list[str]) -> None:
    rows = json.loads(OUT.read_text()) if OUT.exists() else []
    for variant in variants:
        for method, opts, lr, seed in CASES:
            with tempfile.TemporaryDirectory() as tmp:
                cfg = TrainConfig(method=method, lr=lr, seed=seed, output=tmp, method_options=opts, **BUDGET,
                                  **VARIANTS[variant])
                m, run = train(cfg)
                hist = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
            rows.append({"variant": variant, "method": method, "lr": lr, "seed": seed, "test_top1": round(m["test_top1"], 4),
                         "val_top1": m["val_top1"], "collapsed": m["collapsed"],
                         "train_loss": [round(h["train_loss"], 3) for h in hist], "s": m["seconds"]})
            OUT.write_text(json.dumps(rows, indent=1) + "\n")
            print(json.dumps(rows[-1]), flush=True)


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    main(sys.argv[1:] or list(VARIANTS))
