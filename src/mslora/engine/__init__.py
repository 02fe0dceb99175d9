"""One classification trainer for every method: it trains whatever has ``requires_grad`` and saves what
:func:`mslora.core.state.adapter_state_dict` says, never a method by name.

Recipe (MSLoRA Sec. 4.1): AdamW (weight decay 0.05, betas 0.9/0.999; no decay on biases and norms, timm's
``create_optimizer_v2``), cosine decay with linear warmup per step (timm ``CosineLRScheduler``), the best
epoch chosen on validation top-1, test accuracy of that epoch reported at the end.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import random
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
import yaml
from timm.data import resolve_model_data_config
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler
from torch import nn
from torch.utils.data import DataLoader
from torchmetrics.classification import MulticlassAccuracy
from tqdm import tqdm

import mslora
from mslora.backbones import check_backbone_name, create_backbone, weights_source
from mslora.core.state import adapter_state_dict, read_adapter
from mslora.data import ClassificationData, build_transforms, load_classification
from mslora.registry import get_method

log = logging.getLogger("mslora")

# The trainer's defaults for a method's options, under what the user gives. The main job's backbone,
# EfficientNet-Lite0, has 3.37M parameters: MSLoRA at the paper's rank 128 would add 18.5% of them, rank 32
# adds 3.2%, inside the paper's "under about 5%" (mslora.adapt itself keeps the paper's 128).
TRAINER_METHOD_DEFAULTS: dict[str, dict[str, Any]] = {"mslora": {"rank": 32}}


@dataclass
class TrainConfig:
    """Everything a training run needs. Defaults are the main job (see README: 'Main job')."""

    backbone: str = "tf_efficientnet_lite0"  # timm model name
    method: str = "mslora"  # registered method (mslora.list_methods())
    data: str = "fashion-mnist"  # 'fashion-mnist', a Fashion-MNIST idx directory, or an ImageFolder directory
    split: str = "1k"  # '1k' (800 train + 200 val drawn with split_seed, full test) or 'full'
    split_seed: int = 0  # seed of the train/val draw, fixed across training seeds like VTAB-1k's split
    epochs: int = 20  # training epochs
    batch_size: int = 32  # images per step
    lr: float = 1e-2  # peak learning rate of the trainable parameters (main job: chosen on validation)
    weight_decay: float = 0.05  # AdamW weight decay (not on biases and norms)
    warmup_epochs: int = 2  # linear warmup from lr/100, then cosine decay to 0 (per step)
    img_size: int = 64  # training crop and evaluation size in pixels
    output: str = "runs"  # parent directory of run directories
    seed: int = 0  # seed of initialisation, augmentation and batch order
    pretrained: bool = True  # load pretrained weights (offline package, else timm hub)
    weights: str | None = None  # local checkpoint path instead of pretrained weights
    drop_path_rate: float = 0.0  # stochastic depth of the backbone, active during training (Sec. 4.1)
    workers: int = 0  # DataLoader worker processes (0: load in the main process)
    method_options: dict[str, Any] = field(default_factory=dict)  # the method's own options, e.g. rank

    def __post_init__(self) -> None:
        self.method_options = {**TRAINER_METHOD_DEFAULTS.get(self.method, {}), **self.method_options}


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, num_classes: int, desc: str = "eval") -> dict[str, float]:
    """Top-1, top-5 (fractions in [0, 1], torchmetrics micro accuracy) and mean cross-entropy over ``loader``.

    Top-5 is top-k with k = min(5, num_classes).
    """
    model.eval()
    top1 = MulticlassAccuracy(num_classes, top_k=1, average="micro")
    top5 = MulticlassAccuracy(num_classes, top_k=min(5, num_classes), average="micro")
    loss_sum, n = 0.0, 0
    for x, y in tqdm(loader, desc=desc, leave=False, unit="batch", disable=None):
        logits = model(x)
        loss_sum += nn.functional.cross_entropy(logits, y, reduction="sum").item()
        n += len(y)
        top1.update(logits, y)
        top5.update(logits, y)
    return {"top1": top1.compute().item(), "top5": top5.compute().item(), "loss": loss_sum / max(n, 1)}


def _loaders(cfg: TrainConfig, model: nn.Module, data: ClassificationData) -> dict[str, DataLoader]:
    dc = resolve_model_data_config(model)
    kw = dict(mean=dc["mean"], std=dc["std"], crop_pct=dc.get("crop_pct", 0.875), interpolation=dc.get("interpolation", "bicubic"))
    data.with_transforms(build_transforms(cfg.img_size, train=True, **kw), build_transforms(cfg.img_size, train=False, **kw))
    gen = torch.Generator().manual_seed(cfg.seed)
    common = dict(batch_size=cfg.batch_size, num_workers=cfg.workers, persistent_workers=cfg.workers > 0)
    return {
        "train": DataLoader(data.train, shuffle=True, drop_last=len(data.train) > cfg.batch_size, generator=gen, **common),
        "val": DataLoader(data.val, shuffle=False, **common),
        "test": DataLoader(data.test, shuffle=False, **common),
    }


def build_backbone(cfg: TrainConfig, num_classes: int) -> nn.Module:
    """The backbone with its weights. Models with a fixed patch grid (ViT, Swin) are built for ``cfg.img_size``
    (timm resamples position embeddings of pretrained weights); CNNs take any size as they are."""
    pretrained_cfg = timm.models.get_pretrained_cfg(cfg.backbone)  # None for an unknown name: create_backbone says so
    fixed = pretrained_cfg is not None and pretrained_cfg.fixed_input_size
    size = {"img_size": cfg.img_size} if fixed and pretrained_cfg.input_size[-1] != cfg.img_size else {}
    return create_backbone(cfg.backbone, num_classes, cfg.pretrained, cfg.weights, drop_path_rate=cfg.drop_path_rate,
                           **size)


def build_model(cfg: TrainConfig, num_classes: int) -> nn.Module:
    """:func:`build_backbone` adapted by ``cfg.method`` with ``cfg.method_options``."""
    return mslora.adapt(build_backbone(cfg, num_classes), cfg.method, **cfg.method_options)


def _run_dir(cfg: TrainConfig) -> Path:
    # A new directory per run: an earlier run's files are never overwritten.
    stem = Path(cfg.output) / f"{cfg.method}-{cfg.backbone}-{datetime.now():%Y%m%d-%H%M%S}"
    for i in range(1000):
        path = stem.with_name(stem.name + (f"-{i}" if i else ""))
        try:
            path.mkdir(parents=True, exist_ok=False)
            return path
        except FileExistsError:
            continue
    raise ValueError(f"cannot create a new run directory under '{cfg.output}'")


def _add_file_log(path: Path) -> logging.Handler:
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    log.addHandler(handler)
    return handler


def train(cfg: TrainConfig) -> tuple[dict[str, Any], Path]:
    """Train ``cfg.method`` on ``cfg.backbone`` and ``cfg.data``; returns (metrics, run directory).

    The run directory holds ``config.yaml`` (resolved config), ``train.log``, ``metrics.json`` and
    ``adapter.safetensors`` (the best validation epoch's adapter and head, with the config as metadata).
    Everything is validated before the run directory is created.

    Raises:
        ValueError / FileNotFoundError: bad method, option, backbone, data or weights (nothing is written).
    """
    get_method(cfg.method).make_config(**cfg.method_options)  # fail on bad options before loading anything
    check_backbone_name(cfg.backbone)
    if cfg.epochs < 1 or cfg.batch_size < 1 or cfg.img_size < 8 or cfg.lr <= 0:
        raise ValueError(f"epochs={cfg.epochs}, batch_size={cfg.batch_size}, img_size={cfg.img_size} and lr={cfg.lr} "
                         "must be positive (img_size at least 8)")
    data = load_classification(cfg.data, cfg.split, cfg.split_seed)
    seed_everything(cfg.seed)
    model = build_model(cfg, data.num_classes)
    loaders = _loaders(cfg, model, data)

    run = _run_dir(cfg)
    (run / "config.yaml").write_text(yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))
    handler = _add_file_log(run / "train.log")
    level = log.level
    log.setLevel(logging.INFO)  # the run's log holds every line whatever the caller's logging level
    try:
        return _fit(cfg, model, data, loaders, run), run
    except Exception as e:
        log.error("run failed: %s: %s", type(e).__name__, str(e).strip().splitlines()[-1] if str(e).strip() else "")
        raise
    finally:
        log.setLevel(level)
        log.removeHandler(handler)
        handler.close()


def _fit(cfg: TrainConfig, model: nn.Module, data: ClassificationData, loaders: dict[str, DataLoader], run: Path) -> dict[str, Any]:
    counts = mslora.count_parameters(model)
    log.info("run %s: %s on %s, %s; %d train / %d val / %d test images, %d classes", run, cfg.method, cfg.backbone,
             data.name, len(data.train), len(data.val), len(data.test), data.num_classes)
    log.info("parameters: %s", json.dumps(counts))
    opt = create_optimizer_v2(model, "adamw", lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.999))
    steps_per_epoch = len(loaders["train"])
    sched = CosineLRScheduler(opt, t_initial=cfg.epochs * steps_per_epoch, lr_min=0.0,
                              warmup_t=cfg.warmup_epochs * steps_per_epoch, warmup_lr_init=cfg.lr / 100,
                              warmup_prefix=True, t_in_epochs=False)
    t0 = time.perf_counter()
    best = {"epoch": -1, "top1": -1.0, "state": None}
    step = 0
    for epoch in range(cfg.epochs):
        model.train()
        loss_sum, seen, t_epoch = 0.0, 0, time.perf_counter()
        bar = tqdm(loaders["train"], desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="batch", leave=False, disable=None)
        for x, y in bar:
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            sched.step_update(step)
            loss_sum += loss.item() * len(y)
            seen += len(y)
            bar.set_postfix(loss=f"{loss.item():.3f}", img_s=f"{seen / (time.perf_counter() - t_epoch):.0f}")
        val = evaluate(model, loaders["val"], data.num_classes, "val")
        log.info("epoch %d/%d  train_loss %.4f  val_loss %.4f  val_top1 %.4f  lr %.2e  %.0f img/s", epoch + 1, cfg.epochs,
                 loss_sum / max(seen, 1), val["loss"], val["top1"], opt.param_groups[0]["lr"],
                 seen / (time.perf_counter() - t_epoch))
        if val["top1"] > best["top1"]:
            best = {"epoch": epoch + 1, "top1": val["top1"],
                    "state": {k: v.detach().clone() for k, v in adapter_state_dict(model).items()}}
    seconds_train = time.perf_counter() - t0
    model.load_state_dict(best["state"], strict=False)  # the best validation epoch
    test = evaluate(model, loaders["test"], data.num_classes, "test")
    seconds = time.perf_counter() - t0
    metrics = {
        "method": cfg.method, "backbone": cfg.backbone, "dataset": data.name, "split": cfg.split,
        **counts,
        "val_top1": best["top1"], "test_top1": test["top1"], "test_top5": test["top5"], "test_loss": test["loss"],
        "best_epoch": best["epoch"], "epochs": cfg.epochs, "lr": cfg.lr, "img_size": cfg.img_size, "seed": cfg.seed,
        "train_images": len(data.train), "val_images": len(data.val), "test_images": len(data.test),
        "seconds_train": round(seconds_train, 1), "seconds": round(seconds, 1),
        "weights": weights_source(cfg.backbone, cfg.pretrained, cfg.weights),
    }
    mslora.save_adapter(model, run / "adapter.safetensors",
                        {"train_config": dataclasses.asdict(cfg), "num_classes": data.num_classes, "classes": data.classes})
    (run / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    log.info("best epoch %d: val_top1 %.4f  test_top1 %.4f  test_top5 %.4f  (%.0f s)", best["epoch"], best["top1"],
             test["top1"], test["top5"], seconds)
    return metrics


def evaluate_adapter(adapter: str | Path, data: str | None = None, batch_size: int | None = None,
                     workers: int = 0) -> dict[str, Any]:
    """Rebuild the backbone an adapter was trained on, load the adapter and evaluate it on the test split.

    Args:
        adapter: a run directory or its ``adapter.safetensors``.
        data: data source; default the one the run was trained on (same split and split_seed).

    Returns a dict with test_top1, test_top5, test_loss, test_images, method, backbone.

    Raises:
        FileNotFoundError / ValueError: no adapter file, not an adapter file, or data that does not fit.
    """
    path = Path(adapter)
    path = path / "adapter.safetensors" if path.is_dir() else path
    _, meta = read_adapter(path)
    cfg = TrainConfig(**meta["train_config"])
    cfg.data = data or cfg.data
    cfg.batch_size = batch_size or cfg.batch_size
    cfg.workers = workers
    ds = load_classification(cfg.data, cfg.split, cfg.split_seed)
    if ds.num_classes != meta["num_classes"]:
        raise ValueError(f"data '{cfg.data}' has {ds.num_classes} classes, the adapter was trained on {meta['num_classes']}")
    seed_everything(cfg.seed)  # a random-init backbone (--no-pretrained) is rebuilt exactly as in training
    model = mslora.load_adapter(build_backbone(cfg, ds.num_classes), path)
    test = evaluate(model, _loaders(cfg, model, ds)["test"], ds.num_classes, "test")
    return {"method": cfg.method, "backbone": cfg.backbone, "dataset": ds.name, "test_top1": test["top1"],
            "test_top5": test["top5"], "test_loss": test["loss"], "test_images": len(ds.test)}
