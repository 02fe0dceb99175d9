"""Dense tasks on the offline Fashion-MNIST scene set: fixed backbone, MSLoRA, full fine-tuning and LoRA, for
``detect`` (Mask R-CNN: box AP and mask AP) and ``segment`` (UPerNet: mIoU), with the tasks' default recipes
(``mslora.engine.config.TASK_DEFAULTS``) on a frozen ImageNet EfficientNet-Lite0.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/dense.py run TASK [METHOD ...] [--seed N]
    .venv/bin/python benchmarks/dense.py report

Each run is exactly ``mslora train --task TASK --method METHOD --seed N`` (MSLoRA at the main job's rank 32);
its metrics.json is appended to benchmarks/results/dense_scenes.json. Run it alone on the machine: the seconds
are part of the result (the issue asks for under 15 minutes on 2 CPU cores).
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

RESULTS = Path(os.environ.get("DENSE_RESULTS", Path(__file__).parent / "results" / "dense_scenes.json"))
METHODS = ("fixed", "mslora", "full", "lora")
KEYS = {"detect": ("test_bbox_AP", "test_bbox_AP50", "test_segm_AP", "val_bbox_AP"),
        "segment": ("test_mIoU", "test_mAcc", "test_aAcc", "val_mIoU")}


def run(task: str, methods: list[str], seed: int) -> None:
    from mslora.engine import main_job, train

    rows = json.loads(RESULTS.read_text()) if RESULTS.exists() else []
    for method in methods:
        with tempfile.TemporaryDirectory() as out:
            metrics, _ = train(main_job(task=task, method=method, seed=seed, output=out))
        rows.append(metrics)
        RESULTS.write_text(json.dumps(rows, indent=1) + "\n")
        print(json.dumps({k: metrics.get(k) for k in ("task", "method", "seed", *KEYS[task], "seconds")}))


def report() -> None:
    rows = json.loads(RESULTS.read_text())
    for task, keys in KEYS.items():
        print(f"\n{task}\n| method | seed | trainable params | " + " | ".join(keys) + " | seconds |")
        print("| --- " * (len(keys) + 4) + "|")
        for r in (r for r in rows if r["task"] == task):
            vals = " | ".join("-" if r.get(k) is None else f"{100 * r[k]:.1f}" for k in keys)
            print(f"| {r['method']} | {r['seed']} | {r['trainable_params']:,} | {vals} | {r['seconds']:.0f} |")


if __name__ == "__main__":
    args = sys.argv[1:]
    if args[:1] == ["report"]:
        report()
    elif args[:1] == ["run"] and len(args) >= 2:
        seed = int(args[args.index("--seed") + 1]) if "--seed" in args else 0
        names = [a for a in args[2:] if not a.startswith("--") and a != str(seed)]
        run(args[1], names or list(METHODS), seed)
    else:
        sys.exit(__doc__)
