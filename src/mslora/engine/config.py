"""The training configuration: one dataclass whose fields are the ``mslora train`` options, and the main job.

Precedence at the command line: these defaults < ``--config FILE.yaml`` < flags. The main job (README: 'Main
job') is :func:`main_job`: these defaults plus the main job's MSLoRA rank, named in exactly one place, so
that no method's options leak into another method's run (``TrainConfig(method="lora")`` is LoRA with PEFT's
own defaults).
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Any

DEVICES = ("auto", "cpu", "cuda", "mps")
PRECISIONS = ("fp32", "bf16", "fp16")
HEAD_INITS = ("zero", "timm")

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
    own options default to the method's (see :func:`main_job` for the main job as a whole).

    Raises (on construction):
        ValueError: an option out of range, naming the option, the value and what was expected.
    """

    task: str = "classify"  # what the model is trained for (mslora.tasks.list_tasks())
    backbone: str = "tf_efficientnet_lite0"  # timm model name
    method: str = MAIN_JOB_METHOD  # registered method (mslora.list_methods())
    data: str = "fashion-mnist"  # 'fashion-mnist', a Fashion-MNIST idx directory, or an ImageFolder directory
    data_format: str | None = None  # force the data format (mslora.data.formats.FORMATS); default: from the files
    split: str | None = None  # random1k (800 + 200 drawn), full, train800 / train800val200 (VTAB-1k's lists); default: the data's own
    split_seed: int = 0  # seed of the train/val draw, fixed across training seeds like VTAB-1k's split
    epochs: int | None = None  # training epochs
    batch_size: int | None = None  # images per optimiser step over all processes, each of N processes gets 1/N
    lr: float | None = None  # peak learning rate of the trainable parameters (main job: chosen on validation)
    weight_decay: float = 0.05  # AdamW weight decay (not on biases and norms)
    warmup_epochs: int | None = None  # linear warmup from lr/100, then cosine decay to 0, per step
    clip_grad: float = 1.0  # clip the global gradient norm to this value (0: no clipping)
    head_init: str = "zero"  # new classifier head: 'zero' (weights and bias 0) or 'timm' (timm's own init)
    img_size: int | None = None  # classify: crop and evaluation size; detect: shorter image side; segment: crop size; in pixels
    detector: str = "maskrcnn"  # detect task: fasterrcnn, maskrcnn, cascade_maskrcnn, retinanet or fcos
    anchor_scale: int | None = None  # detect task: anchor size in units of the FPN level's stride (torchvision: 8, i.e. 32 px at stride 4)
    rois_per_image: int | None = None  # detect task, R-CNNs: RoIs sampled per image to train the box head (torchvision: 512)
    head_channels: int | None = None  # detect / segment: width of the neck and heads, FPN or UPerNet channels
    output: str = "runs"  # parent directory of run directories
    seed: int = 0  # seed of initialisation, augmentation and batch order
    pretrained: bool = True  # load pretrained weights (offline package, else timm hub)
    weights: str | None = None  # local checkpoint path instead of pretrained weights
    drop_path_rate: float = 0.0  # stochastic depth of the backbone, active during training (Sec. 4.1)
    device: str = "auto"  # auto (CUDA when present), cpu, cuda or mps
    precision: str = "fp32"  # fp32, bf16 (autocast) or fp16 (autocast with a gradient scaler; CUDA only)
    channels_last: bool = True  # channels-last (NHWC) memory format for the model and its 4-D inputs (faster on CPU: README "Speed and memory")
    grad_accum: int = 1  # batches accumulated per optimiser step (the step's batch is batch_size * grad_accum)
    workers: int | None = None  # DataLoader worker processes (default: 0 on CPU, up to 8 per GPU process)
    ckpt_every: int = 0  # also checkpoint every N optimiser steps (0: at the end of every epoch only)
    deterministic: bool = False  # PyTorch deterministic algorithms (resume then gives the same tensors)
    method_options: dict[str, Any] = field(default_factory=dict)  # the method's own options, e.g. rank

    def __post_init__(self) -> None:
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
