"""Single-process CPU speed of the main job: this engine against the issue-3 engine (commit 1df9f52), alternated.

Each round runs `mslora train` (the main job: MSLoRA rank 32 on frozen EfficientNet-Lite0, Fashion-MNIST 1k,
64 px, batch 32) for EPOCHS epochs with each engine in turn, in a fresh process on an otherwise idle machine,
and reads from the run directory: training images/s per epoch (train.log; the loop including data loading),
the seconds of training (with the per-epoch validation) and of the 10,000-image test pass.

    git worktree add /tmp/old 1df9f52
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/engine_speed.py /tmp/old/src
"""
from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

EPOCHS, ROUNDS = 4, 2
OUT = Path(__file__).parent / "results" / "engine_speed_cpu.json"


def one(src: str | None, out: str) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if src:
        env["PYTHONPATH"] = src  # before the editable install on sys.path: the old package is imported
    subprocess.run([sys.executable, "-m", "mslora", "train", "--epochs", str(EPOCHS), "--warmup-epochs", "1",
                    "--output", out], env=env, check=True, capture_output=True)
    (run,) = [p for p in Path(out).iterdir() if p.is_dir()]
    m = json.loads((run / "metrics.json").read_text())
    ips = [float(x) for x in re.findall(r"([\d.]+) img/s", (run / "train.log").read_text())]
    return {"images_per_s": ips, "seconds_train": m["seconds_train"], "seconds_test": round(m["seconds"] - m["seconds_train"], 1),
            "test_top1": m["test_top1"]}


def main(old_src: str) -> None:
    rows = []
    for r in range(ROUNDS):
        for name, src in (("issue-3 engine", old_src), ("accelerate engine", None)):
            with tempfile.TemporaryDirectory() as tmp:
                rows.append({"engine": name, "round": r, **one(src, tmp)})
            print(json.dumps(rows[-1]), flush=True)
    summary = {name: {"images_per_s_mean": round(statistics.mean(x for r in rows if r["engine"] == name for x in r["images_per_s"]), 1),
                      "seconds_train_mean": round(statistics.mean(r["seconds_train"] for r in rows if r["engine"] == name), 1),
                      "seconds_test_mean": round(statistics.mean(r["seconds_test"] for r in rows if r["engine"] == name), 1)}
               for name in ("issue-3 engine", "accelerate engine")}
    OUT.write_text(json.dumps({"epochs": EPOCHS, "rounds": rows, "summary": summary}, indent=1) + "\n")
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main(sys.argv[1])
