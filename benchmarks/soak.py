"""Soak test: many train / eval / load / unload cycles in one process; resident memory and open file handles must
stay flat (a leak grows them cycle after cycle).

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/soak.py [--cycles 200]

Each cycle, in one Python process: ``mslora.engine.train`` of a one-epoch run (a random-init timm ``test_resnet``,
MSLoRA rank 4, 16 px, a 3-class folder of 24 images), ``evaluate_adapter`` of it, ``load_run`` + ``predict`` on
4 images, ``load_adapter`` onto a fresh model and ``unadapt``, the run directory deleted; one resident named set
loaded in the first cycle stays. After each cycle:
resident memory (psutil RSS, after ``gc.collect``) and open file descriptors. Prints the least-squares slopes over
the second half (after warm-up: allocator pools and caches fill in the first cycles), per cycle, and writes
benchmarks/results/soak_cpu.json (every cycle's numbers). Run it alone.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import psutil
from PIL import Image

OUT = Path(__file__).parent / "results" / "soak_cpu.json"


def slope(ys: list[float]) -> float:
    """Least-squares slope of ``ys`` against 0, 1, 2, ... (units of ys per cycle)."""
    x = np.arange(len(ys), dtype=float)
    return float(np.polyfit(x, np.asarray(ys, float), 1)[0]) if len(ys) > 1 else 0.0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cycles", type=int, default=200)
    a = p.parse_args()

    import timm
    import torch

    import mslora
    from mslora.engine import TrainConfig, evaluate_adapter, train

    tmp = Path(tempfile.mkdtemp(prefix="mslora-soak-"))
    rng = np.random.default_rng(0)
    for c in range(3):
        (tmp / "data" / f"c{c}").mkdir(parents=True)
        for i in range(8):
            Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(tmp / "data" / f"c{c}" / f"{i}.png")
    images = sorted((tmp / "data").rglob("*.png"))[:4]
    proc = psutil.Process()
    rows = []
    shared = None
    t0 = time.perf_counter()
    for k in range(a.cycles):
        cfg = TrainConfig(data=str(tmp / "data"), backbone="test_resnet", pretrained=False, img_size=16, epochs=1,
                          batch_size=8, method_options={"rank": 4}, workers=0, device="cpu",
                          output=str(tmp / "runs"))
        _, run = train(cfg)
        evaluate_adapter(run, workers=0, device="cpu")
        loaded = mslora.load_run(run, device="cpu")
        mslora.predict(loaded, images)
        if shared is None:  # one resident set, as a server keeps (its files are read once, at load)
            shared = mslora.load_runs({"resident": str(run)}, device="cpu")
        fresh = timm.create_model("test_resnet", num_classes=3)  # other random weights: loaded anyway, warned
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            mslora.load_adapter(fresh, run / "adapter.safetensors", strict_backbone=False)
        mslora.unadapt(fresh)
        del loaded, fresh
        shutil.rmtree(run)
        gc.collect()
        rows.append({"cycle": k + 1, "rss_mb": round(proc.memory_info().rss / 2**20, 1), "fds": proc.num_fds(),
                     "seconds": round(time.perf_counter() - t0, 1)})
        print(json.dumps(rows[-1]), flush=True)
    half = rows[len(rows) // 2:]
    result = {"cycles": a.cycles, "rss_mb_first": rows[0]["rss_mb"], "rss_mb_last": rows[-1]["rss_mb"],
              "rss_mb_per_cycle_second_half": round(slope([r["rss_mb"] for r in half]), 3),
              "fds_first": rows[0]["fds"], "fds_last": rows[-1]["fds"],
              "fds_per_cycle_second_half": round(slope([r["fds"] for r in half]), 3),
              "seconds": rows[-1]["seconds"], "torch": torch.__version__, "rows": rows}
    OUT.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}))
    shutil.rmtree(tmp, ignore_errors=True)
    del shared
    os._exit(0)


if __name__ == "__main__":
    main()
