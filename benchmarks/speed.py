"""`mslora bench` over the issue-9 backbones: JSON rows and a markdown table of ratios against full fine-tuning.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/speed.py run [--device cpu] [--precision fp32] [--channels-last]
        [--img-size 224] [--batch-size 32] [--steps 12] [BACKBONE ...]
    .venv/bin/python benchmarks/speed.py report

Rows go to benchmarks/results/speed_<device>.json (appended per backbone, with the settings in each row). Run it
alone on the machine: every figure is a time.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

BACKBONES = ("tf_efficientnet_lite0", "resnet50", "convnext_tiny", "swin_tiny_patch4_window7_224",
             "vit_base_patch16_224")
METHODS = ("mslora", "lora", "rlrr", "adapter", "ssf", "bitfit")
RESULTS = Path(__file__).parent / "results"


def _flag(args: list[str], name: str, default):
    if name not in args:
        return default
    i = args.index(name)
    value = args.pop(i + 1) if not isinstance(default, bool) else True
    args.pop(i)
    return type(default)(value)


def run(args: list[str]) -> None:
    from mslora.bench import bench

    device = _flag(args, "--device", "cpu")
    precision = _flag(args, "--precision", "fp32")
    channels_last = _flag(args, "--channels-last", False)
    img_size, batch_size, steps = (_flag(args, "--img-size", 224), _flag(args, "--batch-size", 32),
                                   _flag(args, "--steps", 12))
    path = RESULTS / f"speed_{device}.json"
    rows = json.loads(path.read_text()) if path.exists() else []
    for backbone in args or BACKBONES:
        new = bench(backbone, list(METHODS), img_size, batch_size, device, precision, channels_last, steps,
                    options={"mslora": {"rank": 32}})
        rows += new
        path.write_text(json.dumps(rows, indent=1) + "\n")
        print(json.dumps(new))


def report() -> None:
    for path in sorted(RESULTS.glob("speed_*.json")):
        rows = json.loads(path.read_text())
        print(f"\n{path.name}\n")
        print("| backbone | format | method | train ms | vs full | vs floor | infer ms | vs bare | merged vs bare "
              "| peak train MB | vs full |")
        print("| --- " * 11 + "|")
        groups: dict = {}
        for r in rows:
            groups.setdefault((r["backbone"], r["memory_format"], r["dtype"], r["batch_size"], r["img_size"]), []).append(r)
        for (backbone, fmt, *_), g in groups.items():
            ref = {r["method"]: r for r in g}
            full, floor = ref["full"], ref["backbone"]
            for r in g:
                merged = f"{r['merged_infer_ms'] / floor['infer_ms']:.2f}" if r["merged_infer_ms"] else "-"
                mem = r.get("peak_train_mem_mb")
                print(f"| {backbone} | {fmt} | {r['method']} | {r['train_step_ms']:.0f} | "
                      f"{r['train_step_ms'] / full['train_step_ms']:.2f} | {r['train_step_ms'] / floor['train_step_ms']:.2f} | "
                      f"{r['infer_ms']:.0f} | {r['infer_ms'] / floor['infer_ms']:.2f} | {merged} | {mem} | "
                      f"{mem / full['peak_train_mem_mb']:.2f} |" if mem else "- |")


if __name__ == "__main__":
    a = sys.argv[1:]
    if a[:1] == ["report"]:
        report()
    elif a[:1] == ["run"]:
        run(a[1:])
    else:
        sys.exit(__doc__)
