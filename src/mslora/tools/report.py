"""``mslora report``: finished runs as a markdown table and PNG plots (matplotlib).

Reads each run directory's ``metrics.json`` (the run's result) and ``metrics.jsonl`` (one record per epoch) and
writes to ``output``: ``report.md`` (one row per run; per dataset, backbone, method and method options (from the run's
``config.yaml``) the mean and sample standard deviation
over its runs that did not collapse, the collapsed ones listed, never averaged in), ``learning_curves.png``
(training loss and the validation metric against epoch, one line per run) and ``metric_vs_params.png`` (the test
metric against trainable parameters on a log scale, one labelled point per run).
"""
from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

import yaml

from mslora.registry import get_task


def metric(task: str) -> str:
    """The metric a task picks its best epoch by (its ``best_metric``), the one reported for its runs."""
    return get_task(task).best_metric


def load_run(run_dir: str | Path) -> dict[str, Any]:
    """A run's result with its per-epoch ``history`` and its ``run`` directory name.

    Raises:
        FileNotFoundError: ``run_dir`` does not exist.
        ValueError: it holds no metrics.json (not a finished mslora run).
    """
    run = Path(run_dir)
    if not run.is_dir():
        raise FileNotFoundError(f"run directory '{run}' does not exist")
    if not (run / "metrics.json").is_file():
        raise ValueError(f"'{run}' holds no metrics.json: not a finished mslora run (train it to the end, or resume it)")
    result = json.loads((run / "metrics.json").read_text())
    lines = (run / "metrics.jsonl").read_text().splitlines() if (run / "metrics.jsonl").is_file() else []
    config = yaml.safe_load((run / "config.yaml").read_text()) if (run / "config.yaml").is_file() else {}
    options = (config or {}).get("method_options") or {}
    return {**result, "history": [json.loads(line) for line in lines if line.strip()], "run": run.name,
            "options": ", ".join(f"{k}={v}" for k, v in sorted(options.items()))}


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.2f}"


def table(runs: list[dict[str, Any]]) -> str:
    """The markdown of ``report.md``: per-run rows, then per (task, dataset, method) summaries."""
    out = ["| run | task | dataset | method | backbone | seed | trainable params | val | test | best epoch | "
           "collapsed | seconds |", "| --- " * 12 + "|"]
    for r in runs:
        m = metric(r["task"])
        out.append(f"| {r['run']} | {r['task']} | {r.get('dataset')} | {r['method']} | {r['backbone']} | {r['seed']} | "
                   f"{r['trainable_params']:,} | {_pct(r.get(f'val_{m}'))} | {_pct(r.get(f'test_{m}'))} | "
                   f"{r.get('best_epoch')} | {r.get('collapse_reason') or 'no'} | {r.get('seconds')} |")
    out += ["", "| task | dataset | backbone | method | options | test metric | mean ± std (%) | runs | "
            "collapsed (not averaged) |", "| --- " * 9 + "|"]
    groups: dict[tuple, list] = {}
    for r in runs:  # runs differing in backbone or method options are different rows, never averaged together
        groups.setdefault((r["task"], r.get("dataset"), r["backbone"], r["method"], r.get("options", "")),
                          []).append(r)
    for (task, dataset, backbone, method, options), rs in groups.items():
        m = metric(task)
        ok = [100 * r[f"test_{m}"] for r in rs if not r.get("collapsed") and r.get(f"test_{m}") is not None]
        spread = f" ± {statistics.stdev(ok):.2f}" if len(ok) > 1 else ""
        summary = f"{statistics.mean(ok):.2f}{spread}" if ok else "-"
        collapsed = ", ".join(f"{r['run']} (seed {r['seed']})" for r in rs if r.get("collapsed")) or "none"
        out.append(f"| {task} | {dataset} | {backbone} | {method} | {options or '-'} | {m} | {summary} | {len(ok)} | "
                   f"{collapsed} |")
    return "\n".join(out) + "\n"


def labels(runs: list[dict[str, Any]]) -> list[str]:
    """A legend label per run, unique: the method, then what tells runs apart (backbone, options, seed; the run
    directory when nothing else does)."""
    def varies(key: str) -> bool:
        return len({r.get(key) for r in runs}) > 1

    out = []
    for r in runs:
        parts = [r["method"]] + [str(r.get(k)) for k in ("backbone", "options") if varies(k) and r.get(k)]
        out.append(" ".join(parts) + f" seed {r['seed']}")
    return [f"{lab} ({r['run']})" if out.count(lab) > 1 else lab for lab, r in zip(out, runs)]


def plots(runs: list[dict[str, Any]], output: Path) -> list[Path]:
    """Write learning_curves.png and metric_vs_params.png into ``output``; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator, NullFormatter

    m = metric(runs[0]["task"])
    names = labels(runs)
    fig, (ax_loss, ax_val) = plt.subplots(1, 2, figsize=(11, 4))
    for r, label in zip(runs, names):
        epochs = [h["epoch"] for h in r["history"]]
        ax_loss.plot(epochs, [h["train_loss"] for h in r["history"]], marker=".", label=label)
        ax_val.plot(epochs, [100 * h[f"val_{m}"] for h in r["history"]], marker=".", label=label)
    ax_loss.set(xlabel="epoch", ylabel="training loss", title="Training loss")
    ax_val.set(xlabel="epoch", ylabel=f"validation {m} (%)", title=f"Validation {m}")
    ax_val.legend(fontsize="small")
    lo, hi = ax_val.get_ylim()  # a percentage: never an axis past 0 or 100 (a constant 100% once spanned 96-104)
    ax_val.set_ylim(max(lo, 0), min(hi, 100) if hi - lo > 2 else min(100.5, max(hi, 2) + 1))
    for ax in (ax_loss, ax_val):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    curves = output / "learning_curves.png"
    fig.savefig(curves, dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for r, label in zip(runs, names):
        if r.get(f"test_{m}") is None:
            continue
        x, y = r["trainable_params"], 100 * r[f"test_{m}"]
        ax.scatter([x], [y], marker="x" if r.get("collapsed") else "o")
        ax.annotate(label + (" (collapsed)" if r.get("collapsed") else ""), (x, y), fontsize="small",
                    textcoords="offset points", xytext=(4, 4))
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(NullFormatter())  # minor tick labels of a short log range overlapped
    ax.set(xlabel="trainable parameters", ylabel=f"test {m} (%)", title=f"Test {m} against trainable parameters")
    fig.tight_layout()
    scatter = output / "metric_vs_params.png"
    fig.savefig(scatter, dpi=120)
    plt.close(fig)
    return [curves, scatter]


def report(run_dirs: list[str | Path], output: str | Path) -> Path:
    """Write report.md and the two plots for ``run_dirs`` into ``output`` (created); returns report.md's path.

    Raises:
        FileNotFoundError / ValueError: a run directory that does not exist or is not a finished run (see
            :func:`load_run`), checked for every run before anything is written; runs of different tasks.
    """
    runs = [load_run(d) for d in run_dirs]
    if not runs:
        raise ValueError("no run directories given")
    tasks = {r["task"] for r in runs}
    if len(tasks) > 1:
        raise ValueError(f"runs of different tasks ({', '.join(sorted(tasks))}) have different metrics; "
                         "report each task apart")
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    images = plots(runs, out)
    text = table(runs) + "".join(f"\n![{p.stem}]({p.name})\n" for p in images)
    (out / "report.md").write_text(text)
    return out / "report.md"
