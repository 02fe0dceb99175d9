"""`mslora bench` over the issue-9 backbones: JSON rows and a markdown table of ratios against full fine-tuning.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/speed.py run [--device cpu] [--precision fp32]
        [--no-channels-last] [--img-size 224] [--batch-size 8] [--steps 6] [--warmup 2]
        [--methods mslora,lora,...] [--option mslora.grad_checkpointing=true] [BACKBONE ...]
    .venv/bin/python benchmarks/speed.py report

Rows go to benchmarks/results/speed_<device>.json (appended per backbone, with the settings in each row). Run it
alone on the machine: every figure is a time. The CPU defaults (batch 8, 6 timed steps) keep the five backbones
to about half an hour on 2 cores; on a GPU pass ``--batch-size 64 --precision bf16 --steps 20``.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import yaml

BACKBONES = ("tf_efficientnet_lite0", "resnet50", "convnext_tiny", "swin_tiny_patch4_window7_224",
             "vit_base_patch16_224")
METHODS = ("mslora", "lora", "rlrr", "adapter", "ssf", "bitfit")
RESULTS = Path(__file__).parent / "results"


def run(a: argparse.Namespace) -> None:
    from mslora.tools.bench import bench

    path = RESULTS / f"speed_{a.device}.json"
    rows = json.loads(path.read_text()) if path.exists() else []
    options: dict = {"mslora": {"rank": 32}}
    for item in a.option:  # METHOD.KEY=VALUE, the value read as YAML (true, 4, [3, 5])
        name, _, value = item.partition("=")
        method, _, key = name.partition(".")
        options.setdefault(method, {})[key] = yaml.safe_load(value)
    for backbone in a.backbones or BACKBONES:
        new = bench(backbone, a.methods.split(","), a.img_size, a.batch_size, a.device, a.precision,
                    a.channels_last, a.steps, a.warmup, options=options)
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
        new = [{**r, "run": stamp} for r in new]  # ratios are read within one run
        rows += new
        path.write_text(json.dumps(rows, indent=1) + "\n")
        print(json.dumps(new), flush=True)


def _ratio(a, b) -> str:
    return f"{a / b:.2f}" if a and b else "-"


def report() -> None:
    """Print one markdown table per results file: times and memory against full fine-tuning, the floor (frozen
    backbone, forward + backward to the input) and the bare backbone's inference."""
    for path in sorted(RESULTS.glob("speed_*.json")):
        rows = json.loads(path.read_text())
        print(f"\n{path.name}\n")
        print("| backbone | setting | method | train ms | vs full | vs floor | infer ms | vs bare | merged vs bare "
              "| peak train MB | vs full |")
        print("| --- " * 11 + "|")
        groups: dict = {}
        for r in rows:
            key = (r["backbone"], r["device"], r["memory_format"], r["dtype"], r["batch_size"], r["img_size"],
                   r.get("run"))
            label = r["method"] + "".join(f", {k}={v}" for k, v in r.get("options", {}).items() if k != "rank")
            groups.setdefault(key, {})[label] = r
        for (backbone, _, fmt, dtype, batch, size, _), g in groups.items():
            full, floor = g["full"], g["backbone"]
            for label, r in g.items():
                mem = r.get("peak_train_mem_mb")
                print(f"| {backbone} | {fmt}, {dtype}, {batch}x{size}px | {label} | {r['train_step_ms']:.0f} | "
                      f"{_ratio(r['train_step_ms'], full['train_step_ms'])} | "
                      f"{_ratio(r['train_step_ms'], floor['train_step_ms'])} | {r['infer_ms']:.0f} | "
                      f"{_ratio(r['infer_ms'], floor['infer_ms'])} | {_ratio(r['merged_infer_ms'], floor['infer_ms'])} | "
                      f"{'-' if mem is None else f'{mem:.0f}'} | {_ratio(mem, full.get('peak_train_mem_mb'))} |")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("backbones", nargs="*")
    r.add_argument("--device", default="cpu")
    r.add_argument("--precision", default="fp32")
    r.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True)
    r.add_argument("--img-size", type=int, default=224)
    r.add_argument("--batch-size", type=int, default=8)
    r.add_argument("--steps", type=int, default=6)
    r.add_argument("--warmup", type=int, default=2)
    r.add_argument("--methods", default=",".join(METHODS))
    r.add_argument("--option", action="append", default=[], metavar="METHOD.KEY=VALUE")
    sub.add_parser("report")
    args = p.parse_args()
    run(args) if args.cmd == "run" else report()
