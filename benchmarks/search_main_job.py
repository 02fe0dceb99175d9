"""Learning-rate search for the main job (frozen ImageNet EfficientNet-Lite0, Fashion-MNIST 1k split).

Each method runs with the main job's budget (epochs, image size, batch size) at several peak learning rates;
the choice is the highest validation top-1 (200 images), never test. Test top-1 is recorded for the record
only. Writes benchmarks/results/main_job_search.json.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/search_main_job.py
"""
from __future__ import annotations

import json
import logging
import sys
import tempfile
from pathlib import Path

from mslora.engine import TrainConfig, train

GRID = {
    "mslora": [1e-3, 3e-3, 1e-2, 3e-2],
    "linear": [1e-3, 3e-3, 1e-2, 3e-2, 1e-1],
    "full": [1e-4, 3e-4, 1e-3, 3e-3, 1e-2],
}
OPTIONS = {"mslora": {"rank": 32}}


def main() -> None:
    logging.basicConfig(level=logging.WARNING)
    out = Path(__file__).parent / "results" / "main_job_search.json"
    rows = json.loads(out.read_text()) if out.exists() else []
    done = {(r["method"], r["lr"]) for r in rows}
    with tempfile.TemporaryDirectory() as tmp:
        for method in sys.argv[1:] or GRID:
            for lr in GRID[method]:
                if (method, lr) in done:
                    continue
                cfg = TrainConfig(method=method, lr=lr, output=tmp, method_options=OPTIONS.get(method, {}))
                m, _ = train(cfg)
                rows.append({k: m[k] for k in ("method", "lr", "epochs", "img_size", "trainable_params", "val_top1",
                                                "test_top1", "best_epoch", "seconds")} | {"options": cfg.method_options})
                out.write_text(json.dumps(rows, indent=1) + "\n")
                print(json.dumps(rows[-1]), flush=True)
    for method in GRID:
        cands = [r for r in rows if r["method"] == method]
        if cands:
            best = max(cands, key=lambda r: r["val_top1"])
            print(f"{method}: best lr {best['lr']} (val_top1 {best['val_top1']:.3f})")


if __name__ == "__main__":
    main()
