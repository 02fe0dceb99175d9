"""Training and inference throughput on CPU of the main job's backbone per method (images per second).

Frozen ImageNet EfficientNet-Lite0, random input at 64 px, batch 32 (training: forward + backward; the
optimiser step is excluded) and batch 128 (inference, no_grad). 1 warm-up iteration, then the mean of 5.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/throughput.py
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

import mslora
from mslora.backbones import create_backbone

CASES = [("linear", {}), ("full", {}), ("mslora", {"rank": 32}), ("mslora", {"rank": 32, "kernel_sizes": (3,)}),
         ("mslora", {"rank": 128})]


def images_per_second(model: torch.nn.Module, batch: int, train: bool, iters: int = 5, size: int = 64) -> float:
    x, y = torch.randn(batch, 3, size, size), torch.randint(0, 10, (batch,))
    model.train(train)
    for i in range(iters + 1):
        if i == 1:
            t = time.perf_counter()
        if train:
            torch.nn.functional.cross_entropy(model(x), y).backward()
        else:
            with torch.no_grad():
                model(x)
    return batch * iters / (time.perf_counter() - t)


def main() -> None:
    torch.manual_seed(0)
    rows = []
    for method, opts in CASES:
        model = mslora.adapt(create_backbone("tf_efficientnet_lite0", 10), method, **opts)
        rows.append({"method": method, "options": opts, "threads": torch.get_num_threads(),
                     "train_img_s": round(images_per_second(model, 32, True)),
                     "eval_img_s": round(images_per_second(model, 128, False))})
        print(json.dumps(rows[-1]), flush=True)
    (Path(__file__).parent / "results" / "throughput_cpu.json").write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
