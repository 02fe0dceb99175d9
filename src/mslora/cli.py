"""Command line: ``mslora train | eval | predict | export | params | merge | bench | report | visualize | sweep |
tune | serve``.

Options come from the config dataclasses (:class:`mslora.engine.config.TrainConfig` and the chosen method's
config), their help from each field's metadata (:func:`mslora.methods.options.option`). Precedence: defaults <
``--config FILE.yaml`` < flags < ``--set KEY=VALUE``; a ``--method`` flag naming another method than the file's
drops the file's method options. A user's mistake exits with status 2 and one line on stderr (set MSLORA_DEBUG=1
for the traceback).
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import logging
import os
import re
import sys
from pathlib import Path

from accelerate import PartialState

from mslora.backbones import meta_model
from mslora.core.adapt import adapt, merge, save_backbone
from mslora.core.state import count_parameters
from mslora.engine.config import MAIN_JOB_METHOD_OPTIONS, add_fields, config_from_args
from mslora.engine.loop import TrainingDiverged, evaluate_adapter, resume, train
from mslora.engine.rebuild import rebuild, run_config
from mslora.registry import get_method, list_methods


def count(least: int):
    """An argparse ``type``: an integer of at least ``least`` (argparse prints the one-line error, naming the flag
    and the value: a batch size of 0 would time or evaluate empty batches)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"'{text}' is not an integer") from None
        if value < least:
            raise argparse.ArgumentTypeError(f"{value} is below {least}")
        return value
    parse.__name__ = f"integer >= {least}"
    return parse


def cmd_train(argv: list[str]) -> int:
    """``mslora train``: train (or ``--resume`` a run), print the key metrics as JSON and the run directory;
    returns 0 (a collapsed run says so on stderr and in its metrics.json)."""
    cfg = config_from_args(argv)
    metrics, run = resume(cfg) if isinstance(cfg, str) else train(cfg)
    if PartialState().is_main_process:
        keys = ("task", "method", "backbone", "trainable_params")
        shown = {k: metrics[k] for k in keys if k in metrics}
        shown.update({k: v for k, v in metrics.items() if k.startswith(("val_", "test_")) and isinstance(v, float)
                      and (k.count("_") == 1 or k.endswith(("_AP", "_AP50")))})
        shown.update({k: metrics[k] for k in ("collapsed", "seconds") if k in metrics})
        print(json.dumps(shown))
        print(f"run directory: {run}")
        if metrics.get("collapsed"):
            print(f"mslora: warning: the run collapsed ({metrics['collapse_reason']}); metrics.json says "
                  "collapsed: true, do not report it as a result", file=sys.stderr)
    return 0


def cmd_eval(argv: list[str]) -> int:
    """``mslora eval``: evaluate an adapter on its test split and print the metrics as JSON; returns 0."""
    p = argparse.ArgumentParser(prog="mslora eval", description="Evaluate a trained adapter on the test split.")
    p.add_argument("--adapter", required=True, help="run directory or adapter .safetensors file")
    p.add_argument("--data", help="data source (default: the one the adapter was trained on)")
    p.add_argument("--batch-size", type=count(1), help="images per batch (default: the training batch size)")
    p.add_argument("--workers", type=count(0), help="DataLoader worker processes (default: by device)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or mps")
    a = p.parse_args(argv)
    print(json.dumps(evaluate_adapter(a.adapter, a.data, a.batch_size, a.workers, a.device), indent=2))
    return 0


def cmd_predict(argv: list[str]) -> int:
    """``mslora predict``: a trained run's predictions for image files, written as files (:mod:`mslora.tools.predict`);
    returns 0 (unreadable files are listed on stderr and skipped)."""
    from mslora.tools.predict import predict_files

    p = argparse.ArgumentParser(prog="mslora predict", description="Predict images with a trained run: classify "
                                "writes predictions.csv / .jsonl, detect COCO results JSON and drawn PNGs, segment "
                                "label-map and overlay PNGs.")
    p.add_argument("--adapter", required=True, help="run directory or adapter .safetensors file of a training run")
    p.add_argument("--input", required=True, nargs="+", help="image files, folders (recursive) or glob patterns")
    p.add_argument("--output", default="predictions", help="folder for the files (default: predictions)")
    p.add_argument("--batch-size", type=count(1), default=16, help="images per forward pass (default: 16)")
    p.add_argument("--top-k", type=count(1), default=5, help="classify: labels and probabilities kept per image "
                   "(default: 5)")
    p.add_argument("--score-threshold", type=float, default=0.5, help="detect: boxes scored below this are not "
                   "written (default: 0.5)")
    p.add_argument("--device", help="cpu, cuda, ... (default: CUDA when present, else CPU)")
    a = p.parse_args(argv)
    out, table, skipped = predict_files(a.adapter, a.input, a.output, a.batch_size, a.top_k, a.score_threshold,
                                        a.device)
    for line in skipped:
        print(f"mslora: skipped: {line}", file=sys.stderr)
    for line in table:
        print(line)
    print(f"predictions: {out}")
    return 0


def cmd_merge(argv: list[str]) -> int:
    """``mslora merge``: fold a trained adapter into its backbone and write a plain timm model, as one
    ``.safetensors`` checkpoint or as a folder in timm's Hugging Face layout with the class names and the
    preprocessing (``timm.create_model("local-dir:DIR", pretrained=True)`` loads it); returns 0."""
    p = argparse.ArgumentParser(prog="mslora merge", description="Merge a trained adapter into its backbone's "
                                "weights and write a plain timm model that loads without mslora: a folder in timm's "
                                "Hugging Face layout (config.json with labels and preprocessing + model.safetensors), "
                                "or one FILE.safetensors checkpoint.")
    p.add_argument("--adapter", required=True, help="run directory or adapter .safetensors file of a training run")
    p.add_argument("--output", required=True, help="a new folder, or a FILE.safetensors (nothing is overwritten)")
    a = p.parse_args(argv)
    out = Path(a.output)
    if out.exists() and (out.is_file() or any(out.iterdir())):
        raise ValueError(f"output '{out}' exists; choose a new file or folder (nothing is overwritten)")
    if out.suffix not in ("", ".safetensors"):
        raise ValueError(f"output '{out}' must end in .safetensors (one checkpoint file) or have no suffix (a folder)")
    if out.suffix and not out.parent.is_dir():
        raise FileNotFoundError(f"folder '{out.parent}' of output '{out}' does not exist")
    _, meta, cfg = run_config(a.adapter)
    if cfg.task != "classify":
        raise ValueError(f"'{a.adapter}' adapts a {cfg.task} model (backbone + neck + heads); mslora merge writes a "
                         "timm classifier: merge the backbone in Python with mslora.merge")
    spec = get_method(cfg.method)
    if spec.merge is None:
        raise ValueError(f"method '{cfg.method}' cannot be merged: {spec.merge_impossible}; mslora export "
                         "--format onnx|pt2 exports it with its modules, and mslora predict runs it as it is")
    _, model, _ = rebuild(a.adapter, workers=0)
    pre = meta.get("preprocessing") or {}
    data_config = {"input_size": (3, cfg.img_size, cfg.img_size),
                   **{k: pre[k] for k in ("mean", "std", "crop_pct", "interpolation") if k in pre}}
    fixed = getattr(getattr(model, "patch_embed", None), "img_size", None) is not None
    save_backbone(merge(model), out, label_names=meta.get("classes"), data_config=data_config,
                  model_args={"img_size": cfg.img_size} if fixed else None)
    print(f"merged {cfg.method} into {cfg.backbone}: {out}")
    return 0


def cmd_export(argv: list[str]) -> int:
    """``mslora export``: a trained run as ONNX or a torch.export program with its labels and preprocessing
    (:mod:`mslora.tools.export`); returns 0."""
    from mslora.tools.export import FORMATS, export_run

    p = argparse.ArgumentParser(prog="mslora export", description="Export a trained classification or segmentation "
                                "run (merged when its method merges) as one ONNX file or one torch.export program, "
                                "with its class names and preprocessing inside.")
    p.add_argument("--adapter", required=True, help="run directory or adapter .safetensors file of a training run")
    p.add_argument("--format", required=True, choices=FORMATS, help="onnx (needs pip install -e '.[export]') or pt2")
    p.add_argument("--output", required=True, help="the file to write (must not exist)")
    p.add_argument("--dynamic-batch", action="store_true", help="any batch size (default: the traced batch of 2)")
    p.add_argument("--opset", type=count(7), help="ONNX opset (default: the exporter's)")
    a = p.parse_args(argv)
    print(f"exported: {export_run(a.adapter, a.format, a.output, a.dynamic_batch, a.opset)}")
    return 0


def cmd_params(argv: list[str]) -> int:
    """``mslora params``: parameter counts of an adapted backbone (meta device); returns 0."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--method", default="mslora")
    method = pre.parse_known_args(argv)[0].method
    spec = get_method(method)
    p = argparse.ArgumentParser(prog="mslora params", description="Count parameters of an adapted backbone "
                                "without training (the model is built on the meta device: no memory, no weights). "
                                "The papers' tables next to our counts: python benchmarks/paper_counts.py.")
    p.add_argument("--backbone", help="timm model name (required)")
    p.add_argument("--method", default="mslora", help=f"one of {', '.join(list_methods())} (default: mslora)")
    p.add_argument("--num-classes", type=count(0), default=1000, help="classifier outputs (default: 1000)")
    p.add_argument("--json", action="store_true", help="print the counts as JSON")
    add_fields(p.add_argument_group(f"options of method '{method}'"), spec.config_cls)
    a = vars(p.parse_args(argv))
    if not a["backbone"]:
        raise ValueError("--backbone NAME is required")
    options = {k: v for k, v in a.items() if k in {f.name for f in dataclasses.fields(spec.config_cls)}}
    counts = count_parameters(adapt(meta_model(a["backbone"], a["num_classes"]), method, **options))
    if a["json"]:
        print(json.dumps(counts))
    else:
        base = counts["backbone_params"] + counts["head_params"]
        for k, v in counts.items():
            print(f"{k:>17}: {v:>12,}  ({100 * v / base:.2f}% of the unadapted model)")
    return 0


def cmd_bench(argv: list[str]) -> int:
    """``mslora bench``: training and inference cost of methods on one backbone (:mod:`mslora.tools.bench`);
    returns 0."""
    from mslora.tools.bench import bench  # the tools import their own dependencies (profiler, matplotlib): on use

    p = argparse.ArgumentParser(prog="mslora bench", description="Measure training step time, peak training memory, "
                                "inference latency (merged too), parameters and GFLOPs of methods on one backbone "
                                "(random init), methods interleaved in one process; reference rows: the frozen "
                                "backbone (inference; forward + backward to the input), full fine-tuning, PEFT's LoRA.")
    p.add_argument("--backbone", required=True, help="timm model name")
    p.add_argument("--methods", default="mslora", help="comma-separated method names (default: mslora)")
    p.add_argument("--img-size", type=count(8), default=224, help="image side in pixels (default: 224)")
    p.add_argument("--batch-size", type=count(1), default=32, help="images per step (default: 32)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (default: auto)")
    p.add_argument("--precision", default="fp32", help="fp32, bf16 or fp16 autocast (default: fp32)")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                   help="channels-last memory format for model and input, as `mslora train` (default: on)")
    p.add_argument("--steps", type=count(1), default=12, help="timed rounds; the median is reported (default: 12)")
    p.add_argument("--warmup", type=count(0), default=3, help="untimed rounds first (default: 3)")
    p.add_argument("--rank", type=count(1), help=f"rank of mslora (default: the main job's {MAIN_JOB_METHOD_OPTIONS['rank']}) "
                   "and of lora / peft_lora (default: lora's own)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    a = p.parse_args(argv)
    methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    rank = {"mslora": {**MAIN_JOB_METHOD_OPTIONS, **({"rank": a.rank} if a.rank else {})},
            **({"lora": {"rank": a.rank}} if a.rank else {})}
    rows = bench(a.backbone, methods, a.img_size, a.batch_size, a.device, a.precision, a.channels_last, a.steps,
                 a.warmup, rank, memory=not a.no_memory)
    if a.json:
        print(json.dumps(rows, indent=1))
        return 0
    full = next(r for r in rows if r["method"] == "full")
    print("| method | train ms/step | vs full | infer ms | merged infer ms | peak train MB | trainable | GFLOPs |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['method']} | {r['train_step_ms']:.1f} | {r['train_step_ms'] / full['train_step_ms']:.2f} | "
              f"{r['infer_ms']:.1f} | {r['merged_infer_ms'] if r['merged_infer_ms'] is not None else '-'} | "
              f"{r.get('peak_train_mem_mb', '-')} | {r['trainable_params']:,} | {r['gflops']:.2f} |")
    return 0


def cmd_report(argv: list[str]) -> int:
    """``mslora report``: runs as a markdown table and PNG plots (:mod:`mslora.tools.report`); returns 0."""
    from mslora.tools.report import report

    p = argparse.ArgumentParser(prog="mslora report", description="Turn finished runs into report.md (a row per "
                                "run, mean ± std per method over runs that did not collapse) and PNG plots: "
                                "learning curves and the test metric against trainable parameters.")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories of mslora train")
    p.add_argument("--output", required=True, help="directory to write report.md and the plots into")
    a = p.parse_args(argv)
    print(report(a.runs, a.output))
    return 0


def cmd_visualize(argv: list[str]) -> int:
    """``mslora visualize``: MSLoRA's reweighting drawn per stage (:mod:`mslora.tools.visualize`); returns 0."""
    from mslora.tools.visualize import visualize

    p = argparse.ArgumentParser(prog="mslora visualize", description="Draw, per stage, the frozen backbone's "
                                "activation, the adapted model's and MSLoRA's reweighting map H(F) over each image "
                                "(the paper's Fig. 1 and 3): one PNG per image.")
    p.add_argument("--adapter", required=True, help="run directory or adapter file of an MSLoRA classification run")
    p.add_argument("--image", required=True, nargs="+", help="image file(s)")
    p.add_argument("--output", required=True, help="directory for the PNGs")
    p.add_argument("--img-size", type=count(8), help="input size (default: the run's; larger gives finer maps)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    a = p.parse_args(argv)
    for path in visualize(a.adapter, a.image, a.output, a.img_size, a.device):
        print(path)
    return 0


VTAB_DATA = {"--data": "each task folder under --vtab-root is one run's data"}  # set per run by sweep and tune


def pass_through(rest: list[str], owned: dict[str, str]) -> list[str]:
    """``rest`` (the arguments a sweep or tune hands to every run's ``mslora train``) unchanged, unless it holds an
    option the sweep or tune sets per run itself: that one would be overridden silently.

    Raises:
        ValueError: ``rest`` holds a flag of ``owned`` (flag -> what to use instead), as ``--flag v`` or ``--flag=v``.
    """
    for arg in rest:
        flag = arg.split("=", 1)[0]
        if flag in owned:
            raise ValueError(f"{flag} is set per run here; {owned[flag]}")
    return rest


def cmd_sweep(argv: list[str]) -> int:
    """``mslora sweep``: a training config over the VTAB-1k tasks, one results table (:mod:`mslora.tools.sweep`);
    returns 0."""
    from mslora.tools.sweep import VTAB_TASKS, sweep

    p = argparse.ArgumentParser(prog="mslora sweep", description="Train one config on each VTAB-1k task folder "
                                "under --vtab-root and write one table (per task, group means, mean over tasks). "
                                "Other arguments are mslora train's (e.g. --config FILE --set lr=1e-3).",
                                allow_abbrev=False)  # else train's --task would be taken for --tasks
    p.add_argument("--vtab-root", required=True, help=f"folder holding the task folders ({', '.join(VTAB_TASKS[:3])}, ...)")
    p.add_argument("--tasks", help="comma-separated task names (default: every task folder found)")
    p.add_argument("--output", required=True, help="folder for vtab1k.md, vtab1k.json and the runs")
    a, rest = p.parse_known_args(argv)
    rest = pass_through(rest, VTAB_DATA)
    print(sweep(rest, a.vtab_root, a.output, a.tasks.split(",") if a.tasks else None))
    return 0


def cmd_tune(argv: list[str]) -> int:
    """``mslora tune``: every method tuned on validation over a grid, re-run with several seeds, one report with
    intervals (:mod:`mslora.tools.tune`); returns 0."""
    from mslora.tools.tune import parse_grid, tune

    p = argparse.ArgumentParser(prog="mslora tune", description="Per method: train every grid point and score it on "
                                "validation, re-run the best point with every seed, report the test metric with 95%% "
                                "intervals (report.md, report.json, a plot). Trials run on Optuna with a shared "
                                "storage; a killed tune resumes. Other arguments are mslora train's (e.g. --config "
                                "FILE, --epochs 10).", allow_abbrev=False)  # else train's --task would be --tasks
    p.add_argument("--methods", required=True, help="comma-separated methods, each optionally with fixed options as "
                   "its own row, e.g. lora,mslora,mslora@rank=128")
    p.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                   help="a training option's values, e.g. lr=1e-3,3e-3 (repeat for more keys)")
    p.add_argument("--method-grid", action="append", default=[], metavar="METHOD.OPTION=V1,V2",
                   help="a method option's values, e.g. mslora.rank=32,128")
    p.add_argument("--seeds", default="0,1,2", help="seeds of the final runs (the first also seeds the search; "
                   "default 0,1,2)")
    p.add_argument("--output", required=True, help="folder for the trials, optuna.db and the report")
    p.add_argument("--vtab-root", help="tune on each VTAB-1k task folder under this root")
    p.add_argument("--tasks", help="with --vtab-root: comma-separated task names (default: every folder found)")
    p.add_argument("--vtab-protocol", action="store_true", help="choose on train800 (val200), train the final runs "
                   "on train800val200")
    p.add_argument("--processes", type=count(1), default=1, help="local worker processes sharing the storage "
                   "(default 1)")
    p.add_argument("--storage", help="Optuna storage URL shared by workers on several machines (PostgreSQL, MySQL; "
                   "default: sqlite OUTPUT/optuna.db)")
    p.add_argument("--report", action="store_true", help="train nothing: write the report of the trials finished so "
                   "far (a tune running or stopped)")
    a, rest = p.parse_known_args(argv)
    owned = {"--method": "use --methods", "--seed": "use --seeds", **(VTAB_DATA if a.vtab_root else {})}
    if a.tasks and not a.vtab_root:
        raise ValueError(f"--tasks {a.tasks} needs --vtab-root (the training task is --task)")
    rest = pass_through(rest, owned)
    try:
        seeds = [int(s) for s in a.seeds.split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"--seeds {a.seeds} is not a comma-separated list of integers") from None
    print(tune(workers=a.processes, train_argv=rest, methods=[m for m in a.methods.split(",") if m.strip()],
               grid=parse_grid(a.grid), method_grid=parse_grid(a.method_grid, prefix_method=True), seeds=seeds,
               output=a.output, vtab_root=a.vtab_root, tasks=a.tasks.split(",") if a.tasks else None,
               vtab_protocol=a.vtab_protocol, storage=a.storage, report_only=a.report))
    return 0


def cmd_serve(argv: list[str]) -> int:
    """``mslora serve``: trained adapters behind HTTP on LitServe (:mod:`mslora.tools.serve`); returns 0 when
    interrupted."""
    if importlib.util.find_spec("litserve") is None:
        raise ValueError('mslora serve needs LitServe: pip install -e ".[serve]"')
    from mslora.tools.serve import serve  # imports LitServe

    p = argparse.ArgumentParser(prog="mslora serve", description="Serve trained adapters over HTTP (LitServe): POST "
                                "/predict, GET /adapters, GET /health, a page at /. Classification adapters on the "
                                "same backbone weights share one backbone and mixed batches.")
    p.add_argument("--adapter", required=True, nargs="+", metavar="NAME=RUN",
                   help="adapters to serve, each a name and a run directory or adapter file")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1; 0.0.0.0 for all)")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    p.add_argument("--workers", type=count(1), default=1, help="inference processes per device (default: 1)")
    p.add_argument("--max-batch-size", type=count(1), default=16, help="requests answered by one forward pass, at most "
                   "(default: 16)")
    p.add_argument("--batch-timeout", type=float, default=0.01, help="seconds to wait for a batch to fill "
                   "(default: 0.01)")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (default: auto: CUDA when present)")
    p.add_argument("--top-k", type=count(1), default=5, help="classify: labels and probabilities returned (default: 5)")
    p.add_argument("--score-threshold", type=float, default=0.5, help="detect: boxes scored below this are left "
                   "out (default: 0.5)")
    a = p.parse_args(argv)
    runs = {}
    for item in a.adapter:
        name, sep, run = item.partition("=")
        if not sep or not name or not run:
            raise ValueError(f"--adapter '{item}' must be NAME=RUN (a name, '=', a run directory or adapter file)")
        if name in runs:
            raise ValueError(f"--adapter name '{name}' is given twice")
        runs[name] = run
    serve(runs, a.host, a.port, a.workers, a.max_batch_size, a.batch_timeout, a.device, a.top_k, a.score_threshold)
    return 0


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "predict": cmd_predict, "export": cmd_export, "params": cmd_params,
            "merge": cmd_merge, "bench": cmd_bench, "report": cmd_report, "visualize": cmd_visualize, "sweep": cmd_sweep, "tune": cmd_tune,
            "serve": cmd_serve}
USAGE = """usage: mslora COMMAND [options]   ('mslora COMMAND --help' for each)

  train    train a method on a backbone and dataset; 'mslora train' alone runs the main job (README)
  eval     evaluate a trained adapter on its test split
  predict  a trained run's predictions for image files (CSV / JSON / PNG)
  export   a trained run as ONNX or a torch.export program, with its labels and preprocessing
  params   parameter counts of an adapted backbone
  merge    fold a trained adapter into its backbone and write a plain timm model (folder or checkpoint)
  bench    training and inference cost of methods on one backbone (time, memory, GFLOPs)
  report   finished runs as a markdown table and PNG plots
  visualize  MSLoRA's reweighting maps per stage over images (the paper's Fig. 1 and 3)
  sweep    one config over the 19 VTAB-1k tasks, one table in the papers' layout
  tune     every method tuned on validation, re-run with several seeds, a report with 95% intervals
  serve    trained adapters over HTTP (LitServe), many on one backbone, with a page to try them"""


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``mslora`` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)  # a bare `mslora` prints help; the main job is `mslora train`
        return 0
    if argv[0] not in COMMANDS:
        print(f"mslora: error: unknown command '{argv[0]}'; expected one of {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        return COMMANDS[argv[0]](argv[1:])
    except TrainingDiverged as e:
        if os.environ.get("MSLORA_DEBUG"):
            raise
        print(f"mslora: error: {e}", file=sys.stderr)
        return 1
    except (ValueError, OSError) as e:
        if os.environ.get("MSLORA_DEBUG"):
            raise
        # Errors from DataLoader workers arrive wrapped, with the worker's traceback in the message:
        # the last line holds the original error.
        lines = [ln for ln in str(e).strip().splitlines() if ln.strip()] or [type(e).__name__]
        msg = re.sub(r"^(ValueError|OSError|FileNotFoundError): ", "", lines[-1])
        print(f"mslora: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mslora: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
