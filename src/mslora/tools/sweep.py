"""``mslora sweep``: one training config over the 19 VTAB-1k tasks, and one results table in the papers' layout
(VPT / NOAH / RLRR: per task, the Natural / Specialized / Structured group means, and the mean over tasks).

Task folders are NOAH's names under the given root (``ROOT/cifar``, ``ROOT/caltech101``, ...), each in VTAB-1k's
layout (:func:`mslora.data.formats.vtab1k`). A collapsed run is shown as collapsed and left out of every mean.
"""
from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from mslora.engine.config import config_from_args
from mslora.engine.loop import train

VTAB_GROUPS = {
    "Natural": ("cifar", "caltech101", "dtd", "oxford_flowers102", "oxford_iiit_pet", "svhn", "sun397"),
    "Specialized": ("patch_camelyon", "eurosat", "resisc45", "diabetic_retinopathy"),
    "Structured": ("clevr_count", "clevr_dist", "dmlab", "kitti", "dsprites_loc", "dsprites_ori", "smallnorb_azi",
                   "smallnorb_ele"),
}
VTAB_TASKS = tuple(t for ts in VTAB_GROUPS.values() for t in ts)


def table(results: dict[str, dict[str, Any]]) -> str:
    """Markdown table: one column per task present (VTAB order), group means, mean over tasks; test top-1 in %."""
    tasks = [t for t in VTAB_TASKS if t in results]

    def cell(t):
        r = results[t]
        return "collapsed" if r.get("collapsed") else f"{100 * r['test_top1']:.1f}"

    ok = {t: 100 * results[t]["test_top1"] for t in tasks if not results[t].get("collapsed")}
    groups = {g: [ok[t] for t in ts if t in ok] for g, ts in VTAB_GROUPS.items()}
    means = [f"{statistics.mean(v):.1f}" if v else "-" for v in groups.values()]
    overall = f"{statistics.mean(ok.values()):.1f}" if ok else "-"
    head = tasks + [f"{g} mean" for g in VTAB_GROUPS] + ["mean over tasks"]
    row = [cell(t) for t in tasks] + means + [overall]
    note = (f"\n{len(tasks)} of {len(VTAB_TASKS)} tasks; collapsed runs are left out of the means"
            + (f" ({', '.join(t for t in tasks if t not in ok)})" if len(ok) < len(tasks) else "") + ".\n")
    return "| " + " | ".join(head) + " |\n" + "| --- " * len(head) + "|\n| " + " | ".join(row) + " |\n" + note


def task_folders(root: Path, tasks: list[str] | None = None) -> list[str]:
    """The VTAB-1k task names to run under ``root``: ``tasks``, or every task folder found there, in VTAB order.

    Raises:
        ValueError: an unknown task name.
        FileNotFoundError: a requested task folder is missing, or none is found.
    """
    unknown = sorted(set(tasks or ()) - set(VTAB_TASKS))
    if unknown:
        raise ValueError(f"unknown VTAB-1k task(s) {', '.join(unknown)}; expected some of {', '.join(VTAB_TASKS)}")
    names = list(tasks) if tasks else [t for t in VTAB_TASKS if (root / t).is_dir()]
    missing = [t for t in names if not (root / t).is_dir()]
    if missing or not names:
        raise FileNotFoundError(f"no VTAB-1k task folder {', '.join(missing or VTAB_TASKS)} under '{root}'")
    return names


def sweep(train_argv: list[str], root: str | Path, output: str | Path, tasks: list[str] | None = None) -> Path:
    """Train ``mslora train TRAIN_ARGV --data ROOT/TASK`` for each task and write ``vtab1k.md`` and
    ``vtab1k.json`` into ``output`` (runs under ``output/runs``); returns the markdown's path.

    Raises:
        FileNotFoundError: a requested task folder is missing under ``root`` (all are checked before training).
        ValueError: an unknown task name, or training options that do not parse.
    """
    root, out = Path(root), Path(output)
    names = task_folders(root, tasks)
    configs = {t: config_from_args([*train_argv, "--data", str(root / t), "--output", str(out / "runs")]) for t in names}
    results: dict[str, dict[str, Any]] = {}
    for t, cfg in configs.items():
        metrics, run = train(cfg)
        results[t] = {**metrics, "run": str(run)}
        (out / "vtab1k.json").write_text(json.dumps(results, indent=1) + "\n")  # kept as the sweep goes
    (out / "vtab1k.md").write_text(table(results))
    return out / "vtab1k.md"
