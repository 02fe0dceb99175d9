"""The training configuration: one dataclass whose fields are the ``mslora train`` options (each with its help as
data), the main job, and reading a config from the command line and YAML.

Precedence at the command line: these defaults < ``--config FILE.yaml`` < flags < ``--set KEY=VALUE``. The main
job (README: 'Main job') is :func:`main_job`: these defaults plus the main job's MSLoRA rank, named in exactly
one place (:data:`MAIN_JOB_METHOD_OPTIONS`), so that no method's options leak into another method's run
(``TrainConfig(method="lora")`` is LoRA with PEFT's own defaults).
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from mslora.methods.options import option
from mslora.registry import fits, get_method

DEVICES = ("auto", "cpu", "cuda", "mps")
PRECISIONS = ("fp32", "bf16", "fp16")
HEAD_INITS = ("zero", "timm")
CONV_SEG_INITS = ("pytorch", "mmseg")

# The main job's options for its method (README 'Main job'): EfficientNet-Lite0 has 3.37M parameters; MSLoRA at
# the paper's rank 128 would add 18.5% of them, rank 32 adds 3.2%, inside the paper's "under about 5%".
MAIN_JOB_METHOD = "mslora"
MAIN_JOB_METHOD_OPTIONS: dict[str, Any] = {"rank": 32}

# Options whose default depends on the task (a field left at None takes these). classify: the main job's recipe.
# detect / segment: the offline Fashion-MNIST scene runs of README 'Dense tasks' (256 px canvases, narrow necks and
# heads so that a run fits 15 minutes on 2 CPU cores); the papers' own settings ship as configs/*.yaml.
TASK_DEFAULTS: dict[str, dict[str, Any]] = {
    "classify": {"epochs": 20, "batch_size": 32, "lr": 5e-3, "warmup_epochs": 2, "img_size": 64},
    "detect": {"epochs": 5, "batch_size": 4, "lr": 1e-3, "warmup_epochs": 1, "img_size": 256, "head_channels": 64,
               "rois_per_image": 128, "anchor_scale": 4},
    "segment": {"epochs": 6, "batch_size": 8, "lr": 1e-3, "warmup_epochs": 1, "img_size": 256, "head_channels": 64},
}


@dataclass
class TrainConfig:
    """Everything a training run needs. The training settings default to the main job's recipe; the method's
    own options default to the method's (see :func:`main_job` for the main job as a whole). Fields left at None
    take their task's default (:data:`TASK_DEFAULTS`).

    Raises (on construction):
        ValueError: an option out of range, naming the option, the value and what was expected.
    """

    task: str = option("classify", "what the model is trained for: classify, detect or segment")
    backbone: str = option("tf_efficientnet_lite0", "timm model name")
    method: str = option(MAIN_JOB_METHOD, "registered method (mslora.list_methods())")
    data: str = option("fashion-mnist", "'fashion-mnist', a Fashion-MNIST idx directory, or a data folder or file in "
                       "a format mslora reads (ImageFolder, VTAB-1k, FGVC, CSV, COCO, VOC, ADE20K, ...)")
    data_format: str | None = option(None, "force the data format (mslora.data.formats.FORMATS)")
    split: str | None = option(None, "random1k (800 + 200 drawn), full, train800 / train800val200 (VTAB-1k's "
                               "lists)")
    split_seed: int = option(0, "seed of the train/val draw, fixed across training seeds like VTAB-1k's split")
    epochs: int | None = option(None, "training epochs")
    batch_size: int | None = option(None, "images per optimiser step over all processes, each of N processes "
                                    "gets 1/N")
    lr: float | None = option(None, "peak learning rate of the trainable parameters (main job: chosen on "
                              "validation)")
    weight_decay: float = option(0.05, "AdamW weight decay (not on biases and norms)")
    warmup_epochs: int | None = option(None, "linear warmup from lr/100, then cosine decay, per optimiser step "
                                       "(timm CosineLRScheduler with warmup_prefix: the cosine spans epochs x "
                                       "steps after the warmup, so the last step's lr is not 0)")
    clip_grad: float = option(1.0, "clip the global gradient norm to this value (0: no clipping)")
    head_init: str = option("zero", "new classifier head: 'zero' (weights and bias 0) or 'timm' (timm's own init)")
    img_size: int | None = option(None, "classify: crop and evaluation size; detect: shorter image side; segment: "
                                  "crop size; in pixels")
    detector: str = option("maskrcnn", "detect task: fasterrcnn, maskrcnn, cascade_maskrcnn, retinanet or fcos")
    anchor_scale: int | None = option(None, "detect task: anchor size in units of the FPN level's stride "
                                      "(torchvision: 8, i.e. 32 px at stride 4)")
    rois_per_image: int | None = option(None, "detect task, R-CNNs: RoIs sampled per image to train the box head "
                                        "(torchvision: 512)")
    avg_non_ignore: bool = option(False, "segment task: average the cross-entropy over the labelled pixels only "
                                  "(mmseg's CrossEntropyLoss(avg_non_ignore=True)); False, mmseg's default: over "
                                  "all pixels, the ignored ones counted in the denominator")
    conv_seg_init: str = option("pytorch", "segment task: init of the 1x1 classifiers (conv_seg): 'mmseg' draws "
                                "N(0, 0.01), bias 0 (mmseg's init_cfg, for its 80k-160k-iteration schedules); "
                                "'pytorch' keeps torch's Conv2d init, the default as mmseg's stays at background "
                                "only in short runs at a high lr (README 'Dense tasks')")
    head_channels: int | None = option(None, "detect / segment: width of the neck and heads, FPN or UPerNet "
                                       "channels")
    output: str = option("runs", "parent directory of run directories")
    test: bool = option(True, "evaluate the best epoch on the test split at the end (mslora tune's search trials "
                        "run without it: the choice of a setting never sees the test set)")
    seed: int = option(0, "seed of initialisation, augmentation and batch order")
    pretrained: bool = option(True, "load pretrained weights (offline package, else timm hub)")
    weights: str | None = option(None, "local checkpoint path instead of pretrained weights")
    drop_path_rate: float = option(0.0, "stochastic depth of the backbone, active during training (Sec. 4.1)")
    device: str = option("auto", "auto (CUDA when present), cpu, cuda or mps")
    precision: str = option("fp32", "fp32, bf16 (autocast) or fp16 (autocast with a gradient scaler; CUDA only)")
    channels_last: bool = option(True, "channels-last (NHWC) memory format for the model and its 4-D inputs "
                                 "(faster on CPU: README 'Speed and memory')")
    grad_accum: int = option(1, "batches accumulated per optimiser step (the step's batch is batch_size x "
                             "grad_accum)")
    workers: int | None = option(None, "DataLoader worker processes")
    ckpt_every: int = option(0, "also checkpoint every N optimiser steps (0: at the end of every epoch only)")
    deterministic: bool = option(False, "PyTorch deterministic algorithms (resume then gives the same tensors)")
    method_options: dict[str, Any] = option(help="the method's own options, e.g. rank", default_factory=dict)

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):  # YAML and --set give any type: lr 'fast', epochs true, options 5
            value = getattr(self, f.name)
            if not fits(value, hints[f.name]):
                kind = str(hints[f.name]).replace("typing.", "").replace("<class '", "").replace("'>", "")
                raise ValueError(f"{f.name}={value!r} must be of type {kind}")
        for name, value in TASK_DEFAULTS.get(self.task, TASK_DEFAULTS["classify"]).items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        positive = {"epochs": self.epochs, "batch_size": self.batch_size, "grad_accum": self.grad_accum}
        dense = ("head_channels", "rois_per_image", "anchor_scale")
        positive.update({k: getattr(self, k) for k in dense if getattr(self, k) is not None})
        for name, value in positive.items():
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive integer")
        checks = [
            (self.lr > 0 and math.isfinite(self.lr), "lr", self.lr, "a positive number"),
            (self.weight_decay >= 0, "weight_decay", self.weight_decay, "a number >= 0"),
            (self.warmup_epochs >= 0, "warmup_epochs", self.warmup_epochs, "an integer >= 0"),
            (self.clip_grad >= 0, "clip_grad", self.clip_grad, "a number >= 0 (0: no clipping)"),
            (self.img_size >= 8, "img_size", self.img_size, "at least 8 pixels"),
            (0 <= self.drop_path_rate < 1, "drop_path_rate", self.drop_path_rate, "in [0, 1)"),
            (self.device in DEVICES, "device", self.device, f"one of {', '.join(DEVICES)}"),
            (self.precision in PRECISIONS, "precision", self.precision, f"one of {', '.join(PRECISIONS)}"),
            (self.head_init in HEAD_INITS, "head_init", self.head_init, f"one of {', '.join(HEAD_INITS)}"),
            (self.conv_seg_init in CONV_SEG_INITS, "conv_seg_init", self.conv_seg_init,
             f"one of {', '.join(CONV_SEG_INITS)}"),
            (self.workers is None or self.workers >= 0, "workers", self.workers, "an integer >= 0"),
            (self.ckpt_every >= 0, "ckpt_every", self.ckpt_every, "an integer >= 0"),
        ]
        for ok, name, value, expected in checks:
            if not ok:
                raise ValueError(f"{name}={value!r} must be {expected}")

    def to_dict(self) -> dict[str, Any]:
        """The config as plain YAML/JSON-able values."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any], origin: str = "config") -> "TrainConfig":
        """Build from a dict (a run's ``config.yaml``, an adapter file's metadata).

        Raises:
            ValueError: a field that TrainConfig does not have, naming it and ``origin`` (e.g. a file written by
                another version of mslora), or an invalid value.
        """
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"{origin} has unknown training option(s) {', '.join(unknown)}; written by another "
                             f"version of mslora? expected some of: {', '.join(sorted(names))}")
        return cls(**values)


def main_job(**overrides: Any) -> TrainConfig:
    """The main job (README 'Main job'): MSLoRA at rank 32 on a frozen ImageNet EfficientNet-Lite0,
    Fashion-MNIST random1k split, 64 px, with the default recipe; ``overrides`` replace any field.

    The main job's method options apply only while the method is the main job's: ``main_job(method="lora")``
    is LoRA with its own defaults.

    Raises:
        ValueError: an invalid override (see :class:`TrainConfig`).
    """
    method = overrides.get("method", MAIN_JOB_METHOD)
    options = dict(MAIN_JOB_METHOD_OPTIONS) if method == MAIN_JOB_METHOD else {}
    options.update(overrides.pop("method_options", {}) or {})
    return TrainConfig(**overrides, method_options=options)


def default_workers(device_type: str, processes: int = 1) -> int:
    """DataLoader workers per process: 0 on CPU with 4 cores or fewer per process (loader processes would take
    the cores the model computes on), else up to 4; on an accelerator up to 8, the cores shared by the processes."""
    cores = (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1) // max(1, processes)
    if device_type == "cpu":
        return 0 if cores <= 4 else min(4, cores // 4)
    return max(0, min(8, cores - 1))


# ---- the command line and YAML ---------------------------------------------------------------------------------

def add_fields(parser: argparse._ActionsContainer, cls: type, skip: frozenset[str] = frozenset(),
               defaults: dict[str, str] | None = None) -> None:
    """One ``--name`` option per field of the config dataclass ``cls``, its help from the field's metadata
    (:func:`mslora.methods.options.option`) and the default a run uses (``defaults`` overrides what is shown, e.g.
    the main job's rank or the task defaults). Values default to ``argparse.SUPPRESS``, so only given flags appear.
    Fields of other types than bool, int, float, str and tuples of them have no flag (``--set`` reaches them)."""
    hints = typing.get_type_hints(cls)
    defaults = defaults or {}
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        tp = hints[f.name]
        if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
            tp = next(a for a in typing.get_args(tp) if a is not type(None))  # Optional[X] -> X
        shown = defaults.get(f.name, f.default if f.default is not dataclasses.MISSING else None)
        kw: dict[str, Any] = dict(default=argparse.SUPPRESS, help=f"{f.metadata.get('help', '')} (default: {shown})")
        if tp is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(tp) is tuple:
            kw.update(nargs="+", type=typing.get_args(tp)[0], metavar=f.name.upper())
        elif tp in (int, float, str):
            kw.update(type=tp, metavar=f.name.upper())
        else:
            continue
        parser.add_argument("--" + f.name.replace("_", "-"), **kw)


def task_defaults_shown() -> dict[str, str]:
    """What ``--help`` shows as the default of each task-dependent field: ``classify 20, detect 5, segment 6``."""
    shown: dict[str, list[str]] = {}
    for task, values in TASK_DEFAULTS.items():
        for name, value in values.items():
            shown.setdefault(name, []).append(f"{task} {value}")
    return {name: ", ".join(parts) for name, parts in shown.items()}


def load_yaml(path: str | None) -> dict[str, Any]:
    """The mapping in a YAML config file, keys with ``-`` as ``_``; ``{}`` for no path.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not valid YAML, or not a mapping.
    """
    if not path:
        return {}
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"config file '{p}' does not exist")
    try:
        values = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"config file '{p}' is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(values, dict):
        raise ValueError(f"config file '{p}' must hold a mapping of option: value, got {type(values).__name__}")
    return {k.replace("-", "_"): v for k, v in values.items()}


def pop_sets(argv: list[str]) -> tuple[list[str], dict[str, Any]]:
    """Take ``--set KEY=VALUE`` pairs out of ``argv`` (values read as YAML: ``rank=64``, ``kernel_sizes=[3,5]``,
    ``enhance=false``); returns the other arguments and the pairs, keys with ``-`` as ``_``.

    Raises:
        ValueError: a pair without ``=``, or a missing pair after ``--set``.
    """
    rest, sets = [], {}
    it = iter(argv)
    for a in it:
        if a != "--set" and not a.startswith("--set="):
            rest.append(a)
            continue
        item = a.partition("=")[2] if a.startswith("--set=") else next(it, None)
        if item is None or "=" not in item:
            raise ValueError(f"--set {item or ''} is not KEY=VALUE (e.g. --set lr=0.001)")
        key, _, value = item.partition("=")
        parsed = yaml.safe_load(value) if value.strip() else None
        if isinstance(parsed, str):
            try:
                parsed = float(parsed)  # YAML 1.1 reads 2e-3 (no dot) as a string
            except ValueError:
                pass
        sets[key.strip().replace("-", "_")] = parsed
    return rest, sets


_TRAIN_ONLY = frozenset({"method_options"})  # reached through the method's own flags and --set


def train_parser(method: str, main_job_options: bool) -> argparse.ArgumentParser:
    """The ``mslora train`` parser for ``method``: the training options, then the method's own, each with its help
    and the default a run uses (task defaults; the main job's options when ``main_job_options``).

    Raises:
        ValueError: unknown method (close matches named).
    """
    spec = get_method(method)
    parser = argparse.ArgumentParser(prog="mslora train", description="Train a method on a backbone and dataset; "
                                     "with no arguments, the main job (see README).")
    parser.add_argument("--config", help="YAML file of option: value (flags override it)")
    parser.add_argument("--set", metavar="KEY=VALUE", action="append", help="set any training or method option, "
                        "the value read as YAML (e.g. --set lr=1e-3 --set kernel_sizes=[3,5]); overrides the flags")
    parser.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its last checkpoint, with its "
                        "own config.yaml (no other option may be given)")
    shown_train = {**task_defaults_shown(), "data_format": "recognised from the files", "split": "the data's own",
                   "workers": "0 on a CPU with 4 cores or fewer per process, else up to 4; up to 8 per GPU process"}
    add_fields(parser.add_argument_group("training"), TrainConfig, _TRAIN_ONLY, shown_train)
    shown = {k: f"{v} (the main job's)" for k, v in MAIN_JOB_METHOD_OPTIONS.items()} if main_job_options else {}
    add_fields(parser.add_argument_group(f"options of method '{method}'"), spec.config_cls, defaults=shown)
    return parser


def config_from_args(argv: list[str]) -> TrainConfig | str:
    """Parse ``mslora train`` arguments into a TrainConfig (defaults < YAML < flags < ``--set KEY=VALUE``), or the
    run directory given by ``--resume``.

    Without ``--config``, a run of the main job's method is the main job (its method options, e.g. MSLoRA's
    rank 32, under the flags); another method starts from its own defaults. A ``--method`` naming another method
    than the config file's drops the file's method options, so one paper config serves the comparison rows too.

    Raises:
        ValueError: an unknown option (naming it), an invalid value, or ``--resume`` with other options.
        FileNotFoundError: no such config file.
    """
    argv, sets = pop_sets(argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    pre.add_argument("--method")
    known, _ = pre.parse_known_args(argv)
    known.method = sets.pop("method", known.method)
    from_yaml = load_yaml(known.config)
    method = known.method or from_yaml.get("method") or TrainConfig.method
    main_job_options = not known.config and method == MAIN_JOB_METHOD
    flags = vars(train_parser(method, main_job_options).parse_args(argv))
    flags.pop("config", None)
    flags.pop("set", None)
    resume = flags.pop("resume", None)
    if resume:
        if flags or known.config or sets:
            raise ValueError("--resume RUN_DIR continues a run with its own config.yaml; give no other option")
        return resume
    train_names = {f.name for f in dataclasses.fields(TrainConfig)} - _TRAIN_ONLY
    method_names = {f.name for f in dataclasses.fields(get_method(method).config_cls)}
    if known.method and from_yaml.get("method") not in (None, known.method):
        from_yaml = {k: v for k, v in from_yaml.items() if k in train_names}  # the file's method options are its own
    values = {**from_yaml, **flags, **sets, **({"method": method} if known.method else {})}
    unknown = sorted(set(values) - train_names - method_names - {"method_options"})
    if unknown:
        import difflib

        near = {k: difflib.get_close_matches(k, train_names | method_names, n=1) for k in unknown}
        hint = "".join(f" (did you mean {m[0]}?)" for m in near.values() if m)
        where = f"in {known.config}" if all(k in from_yaml for k in unknown) else "given"
        raise ValueError(f"unknown option(s) {', '.join(unknown)} {where}{hint}; expected training options or "
                         f"options of method '{method}': {', '.join(sorted(method_names)) or '(none)'}")
    if not isinstance(values.get("method_options", {}), dict):
        raise ValueError(f"method_options={values['method_options']!r} must be a mapping of option: value")
    options = {**values.get("method_options", {}), **{k: v for k, v in values.items() if k in method_names}}
    if main_job_options:
        options = {**MAIN_JOB_METHOD_OPTIONS, **options}
    return TrainConfig(**{k: v for k, v in values.items() if k in train_names}, method_options=options)
