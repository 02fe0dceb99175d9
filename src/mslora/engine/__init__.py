"""One training engine for every method and task, on Hugging Face Accelerate (device placement, bf16/fp16 autocast,
gradient accumulation, DDP launched by ``torchrun`` or ``accelerate launch``), in one short loop (nanoGPT's style).

The engine knows no method and no task by name: it trains whatever has ``requires_grad``, sums the loss dict the
task (:mod:`mslora.tasks`) returns, keeps the epoch with the task's best validation metric, and saves what
:func:`mslora.core.state.adapter_state_dict` says.

Recipe (MSLoRA Sec. 4.1): AdamW (weight decay on weights only, betas 0.9/0.999; timm ``create_optimizer_v2``),
linear warmup then cosine decay per optimiser step (timm ``CosineLRScheduler``), global gradient-norm clipping
(``clip_grad``, default 1.0), the best epoch chosen on validation and only its test metrics reported.

Distributed: ``batch_size`` is the global batch; each of N processes gets 1/N of every batch (Accelerate
``split_batches``), so a run's optimisation does not depend on N. Data order and augmentation come from
(seed, epoch, item) alone (:class:`mslora.data.EpochSampler`). Only trainable parameters are in DDP's buckets
(frozen ones are skipped by DDP itself); ``find_unused_parameters`` is switched on only when a probe backward
finds a trainable parameter without a gradient (e.g. MSLoRA after the last block of a ViT that pools its class
token), and the log names those parameters. Metrics are gathered over all processes without duplicates
(``gather_for_metrics``). Only the main process writes files.

Run directory: ``config.yaml``, ``train.log``, ``metrics.jsonl`` (a line per epoch), ``tensorboard/`` (event
files), ``checkpoints/last.pt`` (everything resume needs, atomically replaced every epoch and every
``ckpt_every`` steps), ``checkpoints/best.safetensors`` (best adapter so far), and at the end ``metrics.json``
and ``adapter.safetensors``.
"""
from __future__ import annotations

import json
import logging
import math
import resource
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
import yaml
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

import mslora
from mslora.backbones import weights_source
from mslora.core.state import adapter_state_dict, load_adapter_state, read_adapter
from mslora.data import EpochSampler
from mslora.engine.checkpoint import atomic_write, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from mslora.engine.config import TrainConfig, default_workers, main_job
from mslora.tasks import get_task

__all__ = ["TrainConfig", "main_job", "train", "resume", "evaluate_adapter", "TrainingDiverged"]

log = logging.getLogger("mslora")
_PRECISION = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}


class TrainingDiverged(RuntimeError):
    """The training loss became NaN or Inf; the run stopped and its last good checkpoint stays."""


def _accelerator(cfg: TrainConfig):
    """An Accelerator for ``cfg`` (device, precision, accumulation, global batches split over processes).

    Raises:
        ValueError: a device that is not there, or fp16 without CUDA.
    """
    from accelerate import Accelerator, DataLoaderConfiguration, DistributedDataParallelKwargs
    from accelerate.state import AcceleratorState

    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' but PyTorch sees no CUDA device; use --device cpu or auto")
    if cfg.device == "mps" and not torch.backends.mps.is_available():
        raise ValueError("device='mps' but PyTorch sees no MPS device; use --device cpu or auto")
    on_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    if cfg.precision == "fp16" and not on_cuda:
        raise ValueError("precision='fp16' needs a CUDA device (autocast with a gradient scaler); use bf16 on a CPU")
    # Accelerate keeps its state in a process-wide singleton that refuses another precision; a run may follow
    # another in one process (a notebook, the tests). The process group (PartialState) is kept.
    AcceleratorState._reset_state()
    ddp = DistributedDataParallelKwargs(find_unused_parameters=False)
    acc = Accelerator(cpu=cfg.device == "cpu", mixed_precision=_PRECISION[cfg.precision],
                      gradient_accumulation_steps=cfg.grad_accum, kwargs_handlers=[ddp],
                      dataloader_config=DataLoaderConfiguration(split_batches=True), step_scheduler_with_optimizer=False)
    if cfg.batch_size % acc.num_processes:
        raise ValueError(f"batch_size={cfg.batch_size} must be a multiple of the {acc.num_processes} processes "
                         f"(it is the global batch, split over them)")
    return acc, ddp


def _loader(task, split: str, cfg: TrainConfig, workers: int, pin: bool) -> tuple[DataLoader, EpochSampler]:
    ds = task.datasets[split]
    sampler = EpochSampler(len(ds), cfg.seed, shuffle=split == "train")
    drop_last = split == "train" and len(ds) > cfg.batch_size
    # Its own generator: a DataLoader draws its workers' base seed at every iteration, and from torch's global
    # generator that draw would shift dropout / DropPath randomness on resume.
    return DataLoader(ds, batch_size=cfg.batch_size, sampler=sampler, drop_last=drop_last, num_workers=workers,
                      pin_memory=pin, persistent_workers=workers > 0, collate_fn=task.collate_fn,
                      generator=torch.Generator().manual_seed(cfg.seed)), sampler


def _channels_last(batch: Any) -> Any:
    """Every 4-D floating tensor of a (nested) batch in channels-last memory format."""
    if torch.is_tensor(batch):
        return batch.contiguous(memory_format=torch.channels_last) if batch.ndim == 4 and batch.is_floating_point() else batch
    if isinstance(batch, (list, tuple)):
        return type(batch)(_channels_last(b) for b in batch)
    if isinstance(batch, dict):
        return {k: _channels_last(v) for k, v in batch.items()}
    return batch


def _unused_trainable(task, model: nn.Module, batch: Any, device: torch.device) -> list[str]:
    """Trainable parameters that get no gradient from one backward pass. In train mode (detectors compute their
    losses only then), with the RNG forked and every buffer (BatchNorm statistics) put back, so the run itself
    is unchanged."""
    was = model.training
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        model.train()
        losses, _ = task.losses(model, batch)
        sum(losses.values()).backward()
    unused = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        for n, b in model.named_buffers():
            b.copy_(buffers[n])
    model.train(was)
    return unused


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


def _peak_memory_mb(device: torch.device) -> tuple[float, str]:
    """Peak memory so far: the CUDA allocator's peak on CUDA, else this process's peak resident set (Linux KiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "cpu_max_rss"


def train(cfg: TrainConfig, run_dir: str | Path | None = None) -> tuple[dict[str, Any], Path]:
    """Train ``cfg.method`` on ``cfg.backbone`` for ``cfg.task``; returns (metrics, run directory).

    Args:
        cfg: the run's configuration.
        run_dir: continue the run in this directory from its last checkpoint (see :func:`resume`); None starts a
            new run directory under ``cfg.output``.

    Raises:
        ValueError / FileNotFoundError: bad method, option, backbone, data, weights or device (checked before the
            run directory is created, so nothing is written).
        TrainingDiverged: the loss became NaN or Inf (the message names the step; the last checkpoint stays).
    """
    from accelerate.utils import broadcast_object_list, set_seed

    task = get_task(cfg.task)(cfg)
    acc, ddp = _accelerator(cfg)
    set_seed(cfg.seed, deterministic=cfg.deterministic)
    model = task.build_model()
    task.set_transforms(model)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)

    if run_dir is None:
        box = [str(_run_dir(cfg)) if acc.is_main_process else None]
        broadcast_object_list(box)  # every process writes to (and reads the best adapter from) one directory
        run = Path(box[0])
    else:
        run = Path(run_dir)
    main = acc.is_main_process
    handler = None
    level = log.level
    if main:
        (run / "checkpoints").mkdir(exist_ok=True)
        if run_dir is None:
            (run / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        handler = logging.FileHandler(run / "train.log")
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)  # the run's log holds every line whatever the caller's logging level
    try:
        return _fit(cfg, task, acc, ddp, model, run, resuming=run_dir is not None), run
    except Exception as e:
        if main:
            log.error("run failed: %s: %s", type(e).__name__, str(e).strip().splitlines()[-1] if str(e).strip() else "")
        raise
    finally:
        log.setLevel(level)
        if handler is not None:
            log.removeHandler(handler)
            handler.close()


def resume(run_dir: str | Path) -> tuple[dict[str, Any], Path]:
    """Continue the run in ``run_dir`` from ``checkpoints/last.pt`` with its own ``config.yaml``; a run that
    crashed before its first checkpoint starts over in the same directory.

    With ``deterministic=True`` in its config, a run killed at any point and resumed ends with the same adapter
    tensors and metrics as an uninterrupted run (the data order and augmentation are functions of the seed,
    epoch and item; the random generators, optimiser, scheduler and scaler are restored).

    Raises:
        FileNotFoundError: no such run directory or no config.yaml in it.
        ValueError: the run has already finished (metrics.json exists), or a damaged config or checkpoint.
    """
    run = Path(run_dir)
    if not (run / "config.yaml").is_file():
        raise FileNotFoundError(f"'{run}' is not a run directory (no config.yaml)")
    if (run / "metrics.json").exists():
        raise ValueError(f"run '{run}' has finished (metrics.json exists); nothing to resume")
    try:
        values = yaml.safe_load((run / "config.yaml").read_text()) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"'{run / 'config.yaml'}' is not valid YAML: {str(e).splitlines()[0]}") from None
    return train(TrainConfig.from_dict(values, f"'{run / 'config.yaml'}'"), run_dir=run)


def _fit(cfg: TrainConfig, task, acc, ddp, model: nn.Module, run: Path, resuming: bool) -> dict[str, Any]:
    from accelerate.utils import gather_object, send_to_device

    main = acc.is_main_process
    workers = cfg.workers if cfg.workers is not None else default_workers(acc.device.type, acc.num_processes)
    pin = acc.device.type == "cuda"
    (train_loader, sampler), (val_loader, _), (test_loader, _) = (
        _loader(task, s, cfg, workers, pin) for s in ("train", "val", "test"))
    counts = mslora.count_parameters(model)
    if acc.num_processes > 1:
        probe = next(iter(train_loader))
        unused = _unused_trainable(task, model.to(acc.device), send_to_device(probe, acc.device), acc.device)
        if unused:
            ddp.find_unused_parameters = True
            if main:
                log.info("DDP: find_unused_parameters on: %d trainable tensors get no gradient (%s%s)", len(unused),
                         ", ".join(unused[:4]), ", ..." if len(unused) > 4 else "")
    opt = create_optimizer_v2(model, "adamw", lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.999))
    steps_per_epoch = math.ceil(len(train_loader) / cfg.grad_accum)
    sched = CosineLRScheduler(opt, t_initial=cfg.epochs * steps_per_epoch, lr_min=0.0,
                              warmup_t=cfg.warmup_epochs * steps_per_epoch, warmup_lr_init=cfg.lr / 100,
                              warmup_prefix=True, t_in_epochs=False)
    model, opt, train_loader, val_loader, test_loader = acc.prepare(model, opt, train_loader, val_loader, test_loader)
    bare = acc.unwrap_model(model)
    trainable = [p for p in model.parameters() if p.requires_grad]

    ckpt_path, best_path = run / "checkpoints" / "last.pt", run / "checkpoints" / "best.safetensors"
    state = {"epoch": 0, "batch": 0, "step": 0, "loss_sum": 0.0, "seen": 0, "seconds": 0.0, "history": [],
             "best_epoch": -1, "best_value": -math.inf}
    if resuming and ckpt_path.exists():
        ck = load_checkpoint(ckpt_path)
        load_adapter_state(bare, ck["trainable"])
        opt.optimizer.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        if acc.scaler is not None and ck["scaler"] is not None:
            acc.scaler.load_state_dict(ck["scaler"])
        rngs = ck["rng"]
        set_rng_state(rngs[acc.process_index] if len(rngs) == acc.num_processes else rngs[0])
        state.update({k: ck[k] for k in state})
        if main:
            log.info("resumed from %s: epoch %d, batch %d, step %d", ckpt_path, state["epoch"] + 1, state["batch"],
                     state["step"])
    elif resuming and main:
        log.info("no checkpoint in %s: starting the run over", run / "checkpoints")

    writer = None
    if main:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(run / "tensorboard"), purge_step=state["step"] if resuming else None)
        # metrics.jsonl holds exactly the epochs the checkpoint knows (a crash may have left a later line)
        atomic_write(run / "metrics.jsonl", lambda tmp: tmp.write_text("".join(json.dumps(h) + "\n" for h in state["history"])))
        log.info("run %s: %s on %s, task %s, %s; %s images; device %s, %d process(es), precision %s%s", run,
                 cfg.method, cfg.backbone, cfg.task, task.metadata().get("dataset", cfg.data),
                 " / ".join(f"{len(d)} {s}" for s, d in task.datasets.items()), acc.device, acc.num_processes,
                 cfg.precision, ", channels_last" if cfg.channels_last else "")
        log.info("parameters: %s", json.dumps(counts))

    def checkpoint() -> None:
        rngs = gather_object([rng_state()])  # every process's generators, so each resumes its own
        if main:
            save_checkpoint(ckpt_path, {
                "trainable": {k: v.detach().cpu() for k, v in adapter_state_dict(bare).items()},
                "optimizer": opt.optimizer.state_dict(), "scheduler": sched.state_dict(),
                "scaler": acc.scaler.state_dict() if acc.scaler is not None else None, "rng": rngs, **state})

    meta = {"train_config": cfg.to_dict(), "weights": weights_source(cfg.backbone, cfg.pretrained, cfg.weights),
            **task.metadata()}
    t_start = time.perf_counter() - state["seconds"]
    for epoch in range(state["epoch"], cfg.epochs):
        model.train()
        train_loader.set_epoch(epoch)
        sampler.skip = state["batch"] * cfg.batch_size  # resume in the middle of an epoch
        t_epoch, seen_at_start = time.perf_counter(), state["seen"]
        bar = tqdm(train_loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="batch", leave=False,
                   disable=None if main else True)
        for batch in bar:
            if cfg.channels_last:
                batch = _channels_last(batch)
            with acc.accumulate(model):
                losses, n = task.losses(model, batch)
                loss = sum(losses.values())
                acc.backward(loss)
                if acc.sync_gradients and cfg.clip_grad:
                    acc.clip_grad_norm_(trainable, cfg.clip_grad)
                opt.step()
                opt.zero_grad(set_to_none=True)
            value = acc.reduce(loss.detach().float(), "mean").item()
            if not math.isfinite(value):
                where = f"step {state['step'] + 1} (epoch {epoch + 1}, batch {state['batch'] + 1})"
                msg = f"training loss is {value} at {where}; the last good checkpoint is {ckpt_path}"
                raise TrainingDiverged(msg)
            state["batch"] += 1
            state["seen"] += n * acc.num_processes
            state["loss_sum"] += value * n * acc.num_processes
            if acc.sync_gradients:
                state["step"] += 1
                sched.step_update(state["step"])
                if writer is not None:
                    writer.add_scalar("train/loss", value, state["step"])
                    writer.add_scalar("train/lr", opt.param_groups[0]["lr"], state["step"])
                if cfg.ckpt_every and state["step"] % cfg.ckpt_every == 0:
                    state["seconds"] = time.perf_counter() - t_start
                    checkpoint()
            if main:
                bar.set_postfix(loss=f"{value:.3f}",
                                img_s=f"{(state['seen'] - seen_at_start) / (time.perf_counter() - t_epoch):.0f}")
        images_s = (state["seen"] - seen_at_start) / max(time.perf_counter() - t_epoch, 1e-9)
        val = task.evaluate(model, val_loader, acc.gather_for_metrics, "val")
        mem, mem_kind = _peak_memory_mb(acc.device)
        record = {"epoch": epoch + 1, "step": state["step"], "train_loss": state["loss_sum"] / max(state["seen"], 1),
                  **{f"val_{k}": v for k, v in val.items()}, "lr": opt.param_groups[0]["lr"],
                  "images_per_s": round(images_s, 1), "peak_mem_mb": round(mem, 1), "peak_mem_kind": mem_kind}
        state["history"].append(record)
        state.update(epoch=epoch + 1, batch=0, loss_sum=0.0, seen=0)
        if val[task.best_metric] > state["best_value"] or task.keep_last:
            state["best_epoch"], state["best_value"] = epoch + 1, val[task.best_metric]
            if main:
                atomic_write(best_path, lambda tmp: mslora.save_adapter(bare, tmp, meta))
        if main:
            with open(run / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
            for k, v in record.items():
                if isinstance(v, (int, float)) and k not in ("epoch", "step"):
                    writer.add_scalar(f"epoch/{k}", v, epoch + 1)
            writer.flush()
            val_loss = f"  val_loss {val['loss']:.4f}" if "loss" in val else ""
            log.info("epoch %d/%d  train_loss %.4f%s  val_%s %.4f  lr %.2e  %.0f img/s  peak mem %.0f MB",
                     epoch + 1, cfg.epochs, record["train_loss"], val_loss, task.best_metric,
                     val[task.best_metric], record["lr"], images_s, mem)
        state["seconds"] = time.perf_counter() - t_start
        checkpoint()
    seconds_train = time.perf_counter() - t_start

    acc.wait_for_everyone()  # the best adapter file is complete before any process reads it
    tensors, _ = read_adapter(best_path)
    load_adapter_state(bare, tensors)
    test = task.evaluate(model, test_loader, acc.gather_for_metrics, "test")
    seconds = time.perf_counter() - t_start
    collapsed = task.collapsed(state["history"])
    metrics = {
        "task": cfg.task, "method": cfg.method, "backbone": cfg.backbone, "dataset": task.metadata().get("dataset"),
        "split": cfg.split, **counts,
        f"val_{task.best_metric}": state["best_value"], **{f"test_{k}": v for k, v in test.items()},
        "best_epoch": state["best_epoch"], "epochs": cfg.epochs, "lr": cfg.lr, "img_size": cfg.img_size,
        "batch_size": cfg.batch_size, "seed": cfg.seed, "collapsed": collapsed is not None, "collapse_reason": collapsed,
        "train_images": len(task.datasets["train"]), "val_images": len(task.datasets["val"]),
        "device": str(acc.device), "processes": acc.num_processes, "precision": cfg.precision,
        "channels_last": cfg.channels_last, "threads": torch.get_num_threads(),
        "images_per_s": round(sum(h["images_per_s"] for h in state["history"]) / len(state["history"]), 1),
        "seconds_train": round(seconds_train, 1), "seconds": round(seconds, 1),
        "weights": weights_source(cfg.backbone, cfg.pretrained, cfg.weights),
    }
    if main:
        if collapsed:
            log.warning("WARNING: the run collapsed: %s; metrics.json says collapsed: true", collapsed)
        atomic_write(run / "adapter.safetensors", lambda tmp: mslora.save_adapter(bare, tmp, meta))
        atomic_write(run / "metrics.json", lambda tmp: tmp.write_text(json.dumps(metrics, indent=2) + "\n"))
        writer.close()
        log.info("best epoch %d: val_%s %.4f  test: %s  (%.0f s)", state["best_epoch"], task.best_metric,
                 state["best_value"], "  ".join(f"{k} {v:.4f}" for k, v in test.items() if isinstance(v, float)), seconds)
    acc.wait_for_everyone()
    return metrics


def evaluate_adapter(adapter: str | Path, data: str | None = None, batch_size: int | None = None,
                     workers: int | None = None, device: str = "auto") -> dict[str, Any]:
    """Rebuild the model an adapter was trained with, load the adapter and evaluate it on the test split.

    Args:
        adapter: a run directory or its ``adapter.safetensors``.
        data: data source; default the one the run was trained on (same split and split_seed).
        device: auto, cpu, cuda or mps.

    Returns a dict with the task's test metrics (``test_top1``, ``test_top5``, ``test_loss`` for classification),
    test_images, method, backbone, dataset.

    Raises:
        FileNotFoundError / ValueError: no adapter file, not an adapter file, or data that does not fit.
    """
    from accelerate.utils import set_seed

    path = Path(adapter)
    path = path / "adapter.safetensors" if path.is_dir() else path
    _, meta = read_adapter(path)
    if "train_config" not in meta:
        raise ValueError(f"'{path}' holds no training config (saved by mslora.save_adapter, not by a training run); "
                         "load it with mslora.load_adapter instead")
    values = {**meta["train_config"], "device": device, "workers": workers}
    values["batch_size"] = batch_size or values.get("batch_size", 32)
    cfg = TrainConfig.from_dict(values, f"adapter file '{path}'")
    task = get_task(cfg.task)(cfg, data=data)
    got = task.metadata()
    if "num_classes" in meta and got.get("num_classes") != meta["num_classes"]:
        raise ValueError(f"data '{data or cfg.data}' has {got.get('num_classes')} classes, the adapter was trained "
                         f"on {meta['num_classes']}")
    acc, _ = _accelerator(cfg)
    set_seed(cfg.seed)  # a random-init backbone (--no-pretrained) is rebuilt exactly as in training
    model = task.build_model(adapter=path)
    task.set_transforms(model)
    nw = cfg.workers if cfg.workers is not None else default_workers(acc.device.type)
    loader, _ = _loader(task, "test", cfg, nw, acc.device.type == "cuda")
    model, loader = acc.prepare(model, loader)
    test = task.evaluate(model, loader, acc.gather_for_metrics, "test")
    return {"method": cfg.method, "backbone": cfg.backbone, "dataset": got.get("dataset"),
            **{f"test_{k}": v for k, v in test.items()}}
