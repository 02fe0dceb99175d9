"""One training loop for every method and task, on Hugging Face Accelerate (device placement, bf16/fp16 autocast,
gradient accumulation, DDP launched by ``torchrun`` or ``accelerate launch``), read top to bottom as nanoGPT's
``train.py``: :func:`train` sets the run up, :func:`fit` runs :func:`train_one_epoch` and the task's evaluation
per epoch, then tests the best epoch.

The loop knows no method and no task by name: it trains whatever has ``requires_grad``, sums the loss dict the
task (:mod:`mslora.tasks`) returns, keeps the epoch with the task's best validation metric, and saves what
:func:`mslora.core.state.adapter_state_dict` says.

Recipe (MSLoRA Sec. 4.1): AdamW (weight decay on weights only, betas 0.9/0.999; timm ``create_optimizer_v2``),
linear warmup then cosine decay per optimiser step (timm ``CosineLRScheduler``), global gradient-norm clipping
(``clip_grad``, default 1.0), the best epoch chosen on validation and only its test metrics reported.

Distributed: ``batch_size`` is the global batch; each of N processes gets 1/N of every batch (Accelerate
``split_batches``), so a run's optimisation does not depend on N. Data order and augmentation come from
(seed, epoch, item) alone (:class:`mslora.engine.sampler.EpochSampler`). Only trainable parameters are in DDP's
buckets (frozen ones are skipped by DDP itself); ``find_unused_parameters`` is switched on only when a probe
backward finds a trainable parameter without a gradient (e.g. MSLoRA after the last block of a ViT that pools its
class token), and the log names those parameters. Metrics are gathered over all processes without duplicates
(``gather_for_metrics``). Only the main process writes files.

Run directory: ``config.yaml``, ``train.log``, ``metrics.jsonl`` (a line per epoch), ``tensorboard/`` (event
files), ``checkpoints/last.pt`` (everything resume needs, atomically replaced every epoch and every
``ckpt_every`` steps), ``checkpoints/best.safetensors`` (best adapter so far), and at the end ``metrics.json``
and ``adapter.safetensors``.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import resource
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Iterator

import torch
import yaml
from accelerate import Accelerator, DataLoaderConfiguration, DistributedDataParallelKwargs
from accelerate.state import AcceleratorState
from accelerate.utils import broadcast_object_list, gather_object, send_to_device, set_seed
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from mslora.backbones import weights_source
from mslora.core.state import (adapter_state_dict, backbone_digest, count_parameters, load_adapter_state, read_adapter,
                               save_adapter)
from mslora.engine.checkpoint import atomic_write, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from mslora.engine.config import TrainConfig, default_workers
from mslora.engine.rebuild import rebuild
from mslora.data.transforms import Subset, fingerprint
from mslora.engine.sampler import EpochSampler
from mslora.registry import get_task

log = logging.getLogger("mslora")
MIN_STEPS_TO_JUDGE = 20  # fewer optimiser steps than this: a run at chance has not learnt yet, not collapsed
PRECISION = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}  # our names -> Accelerate's mixed_precision


class TrainingDiverged(RuntimeError):
    """The training loss became NaN or Inf; the run stopped and its last good checkpoint stays."""


def make_accelerator(cfg: TrainConfig) -> tuple[Accelerator, DistributedDataParallelKwargs]:
    """An Accelerator for ``cfg`` (device, precision, accumulation, global batches split over processes) and the
    DDP options it was given (``find_unused_parameters`` is switched on later if a probe needs it).

    Raises:
        ValueError: a device that is not there, fp16 without CUDA, or a batch that the processes do not divide.
    """
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
    acc = Accelerator(cpu=cfg.device == "cpu", mixed_precision=PRECISION[cfg.precision],
                      gradient_accumulation_steps=cfg.grad_accum, kwargs_handlers=[ddp],
                      dataloader_config=DataLoaderConfiguration(split_batches=True), step_scheduler_with_optimizer=False)
    if cfg.batch_size % acc.num_processes:
        raise ValueError(f"batch_size={cfg.batch_size} must be a multiple of the {acc.num_processes} processes "
                         f"(it is the global batch, split over them)")
    return acc, ddp


def make_loader(task, split: str, cfg: TrainConfig, workers: int, pin: bool) -> tuple[DataLoader, EpochSampler]:
    """The DataLoader of one split (global batches of ``cfg.batch_size``; the last partial training batch dropped)
    and its :class:`EpochSampler`."""
    ds = task.datasets[split]
    sampler = EpochSampler(len(ds), cfg.seed, shuffle=split == "train")
    drop_last = split == "train" and len(ds) > cfg.batch_size
    # Its own generator: a DataLoader draws its workers' base seed at every iteration, and from torch's global
    # generator that draw would shift dropout / DropPath randomness on resume.
    return DataLoader(ds, batch_size=cfg.batch_size, sampler=sampler, drop_last=drop_last, num_workers=workers,
                      pin_memory=pin, persistent_workers=workers > 0, collate_fn=task.collate_fn,
                      generator=torch.Generator().manual_seed(cfg.seed)), sampler


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters, betas 0.9/0.999, weight decay on weights only (timm
    ``create_optimizer_v2`` puts biases and 1-D tensors, norms included, in a group without decay)."""
    return create_optimizer_v2(model, "adamw", lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.999))


def make_scheduler(opt: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int) -> CosineLRScheduler:
    """Linear warmup from lr/100 over ``warmup_epochs``, then cosine decay, stepped per optimiser step (timm
    ``CosineLRScheduler``, ``warmup_prefix=True``: the cosine spans ``epochs`` x steps after the warmup)."""
    return CosineLRScheduler(opt, t_initial=cfg.epochs * steps_per_epoch, lr_min=0.0,
                             warmup_t=cfg.warmup_epochs * steps_per_epoch, warmup_lr_init=cfg.lr / 100,
                             warmup_prefix=True, t_in_epochs=False)


def to_channels_last(batch: Any) -> Any:
    """Every 4-D floating tensor of a (nested) batch in channels-last memory format."""
    if torch.is_tensor(batch):
        return batch.contiguous(memory_format=torch.channels_last) if batch.ndim == 4 and batch.is_floating_point() else batch
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_channels_last(b) for b in batch)
    if isinstance(batch, dict):
        return {k: to_channels_last(v) for k, v in batch.items()}
    return batch


def unused_trainable(task, model: nn.Module, batch: Any, device: torch.device) -> list[str]:
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


def new_run_dir(cfg: TrainConfig) -> Path:
    """A new directory ``OUTPUT/METHOD-BACKBONE-DATE-TIME[-i]`` (an earlier run's files are never overwritten).

    Raises:
        ValueError: no new name could be made.
    """
    stem = Path(cfg.output) / f"{cfg.method}-{cfg.backbone}-{datetime.now():%Y%m%d-%H%M%S}"
    for i in range(1000):
        path = stem.with_name(stem.name + (f"-{i}" if i else ""))
        try:
            path.mkdir(parents=True, exist_ok=False)
            return path
        except FileExistsError:
            continue
    raise ValueError(f"cannot create a new run directory under '{cfg.output}'")


def peak_memory_mb(device: torch.device) -> tuple[float, str]:
    """Peak memory so far: the CUDA allocator's peak on CUDA, else this process's peak resident set (Linux KiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "cpu_max_rss"


@contextlib.contextmanager
def run_log(run: Path, main: bool) -> Iterator[None]:
    """While the run lasts, the main process logs every line to ``run/train.log`` (whatever the caller's logging
    level) and a failure's last line as ``run failed: ...``; the logger is put back after."""
    handler, level = None, log.level
    if main:
        handler = logging.FileHandler(run / "train.log")
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
    try:
        yield
    except Exception as e:
        if main:
            log.error("run failed: %s: %s", type(e).__name__, str(e).strip().splitlines()[-1] if str(e).strip() else "")
        raise
    finally:
        log.setLevel(level)
        if handler is not None:
            log.removeHandler(handler)
            handler.close()


def train(cfg: TrainConfig, run_dir: str | Path | None = None) -> tuple[dict[str, Any], Path]:
    """Train ``cfg.method`` on ``cfg.backbone`` for ``cfg.task``; returns (metrics, run directory).

    ``metrics`` (also written as ``metrics.json``): task, method, backbone, dataset, split, the parameter counts of
    :func:`mslora.core.state.count_parameters`, ``val_<best metric>`` of the best epoch and ``test_<metric>`` for
    each test metric of the task (fractions in [0, 1]: top1 / top5 / loss for classify, bbox_AP ... / segm_AP ...
    for detect, mIoU / mAcc / aAcc for segment), best_epoch, collapsed and collapse_reason, image counts, device,
    processes, precision, channels_last, threads, images_per_s (training images per second, mean over epochs),
    seconds_train and seconds (wall time), weights.

    Args:
        cfg: the run's configuration.
        run_dir: continue the run in this directory from its last checkpoint (see :func:`resume`); None starts a
            new run directory under ``cfg.output``.

    Raises:
        ValueError / FileNotFoundError: bad method, option, backbone, data, weights or device (checked before the
            run directory is created, so nothing is written).
        ValueError: (resuming) the run's data changed since it started, or another process trains in the run.
        TrainingDiverged: the loss became NaN or Inf (the message names the step; the last checkpoint stays).
    """
    task = get_task(cfg.task)(cfg)
    if cfg.epochs <= cfg.warmup_epochs:
        log.warning("WARNING: epochs=%d is not above warmup_epochs=%d: the learning rate never reaches its peak "
                    "lr=%g (it is still warming up when the run ends)", cfg.epochs, cfg.warmup_epochs, cfg.lr)
    acc, ddp = make_accelerator(cfg)
    set_seed(cfg.seed, deterministic=cfg.deterministic)
    model = task.build_model()
    task.set_transforms(model)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    data = {split: fingerprint(ds) for split, ds in task.datasets.items()}
    if run_dir is None:
        shared = [str(new_run_dir(cfg)) if acc.is_main_process else None]
        broadcast_object_list(shared)  # every process writes to (and reads the best adapter from) one directory
        run = Path(shared[0])
    else:
        run = Path(run_dir)
    with run_lock(run, acc.is_main_process):
        if run_dir is not None:
            same_data(run, data)
        if acc.is_main_process:
            (run / "checkpoints").mkdir(exist_ok=True)
            if run_dir is None:
                (run / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
                (run / "data.json").write_text(json.dumps(data, indent=1))
        with run_log(run, acc.is_main_process):
            return fit(cfg, task, acc, ddp, model, run, resuming=run_dir is not None), run


@contextlib.contextmanager
def run_lock(run: Path, main: bool) -> Iterator[None]:
    """Hold an exclusive lock on the run directory (``RUN/.lock``, filelock: an OS lock that a killed process
    releases) while the main process trains in it, so that two ``--resume`` of one run cannot both write it. Every
    process learns whether the main one got it (under DDP the others would otherwise wait for it forever).

    Raises:
        ValueError: another process holds the lock (nothing written), on every process of the run.
    """
    from filelock import FileLock, Timeout

    lock, shared = FileLock(str(run / ".lock"), timeout=0) if main else None, [None]
    if lock is not None:
        try:
            lock.acquire()
        except Timeout:
            shared = [f"run '{run}' is in use by another mslora process (it holds '{run / '.lock'}'); wait for it "
                      "to end"]
    broadcast_object_list(shared)
    if shared[0]:
        raise ValueError(shared[0])
    try:
        yield
    finally:
        if lock is not None:
            lock.release()


def same_data(run: Path, now: dict[str, Any]) -> None:
    """Refuse to resume ``run`` on data other than it started on (``RUN/data.json``, each split's
    :func:`mslora.data.transforms.fingerprint`): the split would be drawn anew, and images trained on could land
    in the test set. A run from before data.json existed resumes with a warning.

    Raises:
        ValueError: a split whose images or labels differ (which, and the counts).
    """
    path = run / "data.json"
    if not path.is_file():
        log.warning("WARNING: run '%s' has no data.json (it predates it): its data cannot be checked", run)
        return
    then = json.loads(path.read_text())
    changed = [f"{s} has {now.get(s, {}).get('images', 0)} images, had {then[s]['images']}"
               if now.get(s, {}).get("images") != then[s]["images"] else f"{s} has other images or labels"
               for s in then if then[s] != now.get(s)]
    if changed:
        raise ValueError(f"the data of run '{run}' changed since it started ({'; '.join(changed)}): resuming would "
                         "train and test on another split; put the data back as it was, or start a new run")


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


class Loop:
    """What one run's epochs share: the prepared model, optimiser, scheduler and loaders, the run's files, and the
    ``state`` a checkpoint holds (epoch, batch and step reached, running loss, history, best epoch so far).

    Built in the order the run's random draws depend on (loaders, DDP probe, optimiser,
    ``accelerator.prepare``), so that a resumed run draws as the uninterrupted one did.
    """

    def __init__(self, cfg: TrainConfig, task, acc: Accelerator, ddp: DistributedDataParallelKwargs,
                 model: nn.Module, run: Path) -> None:
        self.cfg, self.task, self.acc, self.run, self.main = cfg, task, acc, run, acc.is_main_process
        workers = cfg.workers if cfg.workers is not None else default_workers(acc.device.type, acc.num_processes)
        pin = acc.device.type == "cuda"
        (train, self.sampler), (val, _), (test, _) = (make_loader(task, s, cfg, workers, pin)
                                                      for s in ("train", "val", "test"))
        self.counts = count_parameters(model)
        if acc.num_processes > 1:
            self.detect_unused(model, ddp, next(iter(train)))
        opt = make_optimizer(model, cfg)
        self.sched = make_scheduler(opt, cfg, math.ceil(len(train) / cfg.grad_accum))
        self.model, self.opt, self.train_loader, self.val_loader, self.test_loader = acc.prepare(
            model, opt, train, val, test)
        self.unwrapped = acc.unwrap_model(self.model)
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.last, self.best = run / "checkpoints" / "last.pt", run / "checkpoints" / "best.safetensors"
        self.state = {"epoch": 0, "batch": 0, "step": 0, "loss_sum": 0.0, "seen": 0, "seconds": 0.0, "history": [],
                      "best_epoch": -1, "best_value": -math.inf}
        self.meta = {"train_config": cfg.to_dict(), "weights": weights_source(cfg.backbone, cfg.pretrained, cfg.weights),
                     **task.metadata()}
        # once, by the process that writes: the frozen weights do not change while training
        self.fingerprint = backbone_digest(self.unwrapped) if self.main else None
        self.writer = None

    def detect_unused(self, model: nn.Module, ddp: DistributedDataParallelKwargs, probe: Any) -> None:
        """Switch DDP's ``find_unused_parameters`` on when a probe backward leaves a trainable tensor without a
        gradient, and log which."""
        unused = unused_trainable(self.task, model.to(self.acc.device), send_to_device(probe, self.acc.device),
                                  self.acc.device)
        if unused:
            ddp.find_unused_parameters = True
            if self.main:
                log.info("DDP: find_unused_parameters on: %d trainable tensors get no gradient (%s%s)", len(unused),
                         ", ".join(unused[:4]), ", ..." if len(unused) > 4 else "")

    def restore(self) -> None:
        """Load ``checkpoints/last.pt`` (trainable tensors, optimiser, scheduler, scaler, this process's random
        generators, the loop state); without one, the run starts over in its directory."""
        if not self.last.exists():
            if self.main:
                log.info("no checkpoint in %s: starting the run over", self.last.parent)
            return
        ck = load_checkpoint(self.last)
        load_adapter_state(self.unwrapped, ck["trainable"])
        self.opt.optimizer.load_state_dict(ck["optimizer"])
        self.sched.load_state_dict(ck["scheduler"])
        if self.acc.scaler is not None and ck["scaler"] is not None:
            self.acc.scaler.load_state_dict(ck["scaler"])
        rngs = ck["rng"]
        set_rng_state(rngs[self.acc.process_index] if len(rngs) == self.acc.num_processes else rngs[0])
        self.state.update({k: ck[k] for k in self.state})
        if self.main:
            log.info("resumed from %s: epoch %d, batch %d, step %d", self.last, self.state["epoch"] + 1,
                     self.state["batch"], self.state["step"])

    def open_logs(self, resuming: bool) -> None:
        """Main process: the TensorBoard writer, ``metrics.jsonl`` cut back to the epochs the checkpoint knows (a
        crash may have left a later line), and the run's first log lines."""
        if not self.main:
            return
        from torch.utils.tensorboard import SummaryWriter  # imports tensorboard: only where it writes

        cfg, history = self.cfg, self.state["history"]
        self.writer = SummaryWriter(str(self.run / "tensorboard"), purge_step=self.state["step"] if resuming else None)
        atomic_write(self.run / "metrics.jsonl", lambda tmp: tmp.write_text("".join(json.dumps(h) + "\n" for h in history)))
        log.info("run %s: %s on %s, task %s, %s; %s images; device %s, %d process(es), precision %s%s", self.run,
                 cfg.method, cfg.backbone, cfg.task, self.task.metadata().get("dataset", cfg.data),
                 " / ".join(f"{len(d)} {s}" for s, d in self.task.datasets.items()), self.acc.device,
                 self.acc.num_processes, cfg.precision, ", channels_last" if cfg.channels_last else "")
        log.info("parameters: %s", json.dumps(self.counts))

    def checkpoint(self) -> None:
        """Write ``checkpoints/last.pt`` (atomic) with every process's random generators."""
        rngs = gather_object([rng_state()])  # every process's generators, so each resumes its own
        if self.main:
            save_checkpoint(self.last, {
                "trainable": {k: v.detach().cpu() for k, v in adapter_state_dict(self.unwrapped).items()},
                "optimizer": self.opt.optimizer.state_dict(), "scheduler": self.sched.state_dict(),
                "scaler": self.acc.scaler.state_dict() if self.acc.scaler is not None else None, "rng": rngs,
                **self.state})

    def end_epoch(self, epoch: int, val: dict[str, float], images_s: float) -> None:
        """Record the epoch (history, ``metrics.jsonl``, TensorBoard, the log), keep the best adapter so far (or the
        last, for tasks that ``keep_last``) and checkpoint."""
        task, state, cfg = self.task, self.state, self.cfg
        mem, mem_kind = peak_memory_mb(self.acc.device)
        record = {"epoch": epoch + 1, "step": state["step"], "train_loss": state["loss_sum"] / max(state["seen"], 1),
                  **{f"val_{k}": v for k, v in val.items()}, "lr": self.opt.param_groups[0]["lr"],
                  "images_per_s": round(images_s, 1), "peak_mem_mb": round(mem, 1), "peak_mem_kind": mem_kind}
        state["history"].append(record)
        state.update(epoch=epoch + 1, batch=0, loss_sum=0.0, seen=0)
        if val[task.best_metric] > state["best_value"] or task.keep_last:
            state["best_epoch"], state["best_value"] = epoch + 1, val[task.best_metric]
            if self.main:
                atomic_write(self.best, lambda tmp: save_adapter(self.unwrapped, tmp, self.meta, self.fingerprint))
        if self.main:
            with open(self.run / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
            for k, v in record.items():
                if isinstance(v, (int, float)) and k not in ("epoch", "step"):
                    self.writer.add_scalar(f"epoch/{k}", v, epoch + 1)
            self.writer.flush()
            val_loss = f"  val_loss {val['loss']:.4f}" if "loss" in val else ""
            log.info("epoch %d/%d  train_loss %.4f%s  val_%s %.4f  lr %.2e  %.0f img/s  peak mem %.0f MB",
                     epoch + 1, cfg.epochs, record["train_loss"], val_loss, task.best_metric,
                     val[task.best_metric], record["lr"], images_s, mem)

    def finish(self, seconds_train: float, t_start: float) -> dict[str, Any]:
        """Test the best epoch's adapter, write ``metrics.json`` and ``adapter.safetensors``; returns the metrics."""
        cfg, task, acc, state = self.cfg, self.task, self.acc, self.state
        acc.wait_for_everyone()  # the best adapter file is complete before any process reads it
        tensors, _ = read_adapter(self.best)
        load_adapter_state(self.unwrapped, tensors)
        test = task.evaluate(self.model, self.test_loader, acc.gather_for_metrics, "test") if cfg.test else {}
        seconds = time.perf_counter() - t_start
        collapsed = task.collapsed(state["history"])
        short = collapsed is not None and state["step"] < MIN_STEPS_TO_JUDGE and math.isfinite(
            state["history"][-1]["train_loss"])
        if short:  # at chance after a handful of steps: not yet learnt, which is not a collapse
            collapsed = None
        metrics = {
            "task": cfg.task, "method": cfg.method, "backbone": cfg.backbone, "dataset": task.metadata().get("dataset"),
            "split": cfg.split, "split_pools": getattr(task.data, "pools", None), **self.counts,
            f"val_{task.best_metric}": state["best_value"], **{f"test_{k}": v for k, v in test.items()},
            "best_epoch": state["best_epoch"], "epochs": cfg.epochs, "lr": cfg.lr, "img_size": cfg.img_size,
            "batch_size": cfg.batch_size, "seed": cfg.seed, "collapsed": collapsed is not None,
            "collapse_reason": collapsed, "too_short_to_judge": short, "optimiser_steps": state["step"],
            "train_images": len(task.datasets["train"]),
            "val_images": len(task.datasets["val"]), "device": str(acc.device), "processes": acc.num_processes,
            "precision": cfg.precision, "channels_last": cfg.channels_last, "threads": torch.get_num_threads(),
            "images_per_s": round(sum(h["images_per_s"] for h in state["history"]) / len(state["history"]), 1),
            "seconds_train": round(seconds_train, 1), "seconds": round(seconds, 1), "weights": self.meta["weights"],
        }
        if self.main:
            if collapsed:
                log.warning("WARNING: the run collapsed: %s; metrics.json says collapsed: true", collapsed)
            if short:
                log.warning("WARNING: %d optimiser steps are too few to tell a run that has not learnt yet from one "
                            "that collapsed (its training loss is still at chance); train longer before reporting "
                            "it (metrics.json: too_short_to_judge)", state["step"])
            atomic_write(self.run / "adapter.safetensors",
                         lambda tmp: save_adapter(self.unwrapped, tmp, self.meta, self.fingerprint))
            atomic_write(self.run / "metrics.json", lambda tmp: tmp.write_text(json.dumps(metrics, indent=2) + "\n"))
            self.writer.close()
            log.info("best epoch %d: val_%s %.4f  test: %s  (%.0f s)", state["best_epoch"], task.best_metric,
                     state["best_value"], "  ".join(f"{k} {v:.4f}" for k, v in test.items() if isinstance(v, float)),
                     seconds)
        acc.wait_for_everyone()
        return metrics


def train_one_epoch(loop: Loop, epoch: int, t_start: float) -> float:
    """One epoch of optimiser steps (resumed at ``state['batch']``), checkpointing every ``ckpt_every`` steps;
    returns the training images per second.

    Raises:
        TrainingDiverged: a NaN or Inf training loss (the message names the step).
    """
    cfg, acc, state, model = loop.cfg, loop.acc, loop.state, loop.model
    model.train()
    loop.train_loader.set_epoch(epoch)
    loop.sampler.skip = state["batch"] * cfg.batch_size  # resume in the middle of an epoch
    t_epoch, seen_at_start = time.perf_counter(), state["seen"]
    bar = tqdm(loop.train_loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="batch", leave=False,
               disable=None if loop.main else True)
    for batch in bar:
        if cfg.channels_last:
            batch = to_channels_last(batch)
        with acc.accumulate(model):
            losses, n = loop.task.losses(model, batch)
            loss = sum(losses.values())
            acc.backward(loss)
            if acc.sync_gradients and cfg.clip_grad:
                acc.clip_grad_norm_(loop.trainable, cfg.clip_grad)
            loop.opt.step()
            loop.opt.zero_grad(set_to_none=True)
        value = acc.reduce(loss.detach().float(), "mean").item()
        if not math.isfinite(value):
            where = f"step {state['step'] + 1} (epoch {epoch + 1}, batch {state['batch'] + 1})"
            raise TrainingDiverged(f"training loss is {value} at {where}; the last good checkpoint is {loop.last}")
        state["batch"] += 1
        state["seen"] += n * acc.num_processes
        state["loss_sum"] += value * n * acc.num_processes
        if acc.sync_gradients:
            state["step"] += 1
            loop.sched.step_update(state["step"])
            if loop.writer is not None:
                loop.writer.add_scalar("train/loss", value, state["step"])
                loop.writer.add_scalar("train/lr", loop.opt.param_groups[0]["lr"], state["step"])
            if cfg.ckpt_every and state["step"] % cfg.ckpt_every == 0:
                state["seconds"] = time.perf_counter() - t_start
                loop.checkpoint()
        if loop.main:
            bar.set_postfix(loss=f"{value:.3f}",
                            img_s=f"{(state['seen'] - seen_at_start) / (time.perf_counter() - t_epoch):.0f}")
    return (state["seen"] - seen_at_start) / max(time.perf_counter() - t_epoch, 1e-9)


def fit(cfg: TrainConfig, task, acc: Accelerator, ddp: DistributedDataParallelKwargs, model: nn.Module, run: Path,
        resuming: bool) -> dict[str, Any]:
    """Train ``model`` for ``cfg.epochs`` epochs (from the last checkpoint when ``resuming``), evaluating on
    validation after each, then test the best epoch; returns the run's metrics (see :func:`train`)."""
    loop = Loop(cfg, task, acc, ddp, model, run)
    if resuming:
        loop.restore()
    loop.open_logs(resuming)
    t_start = time.perf_counter() - loop.state["seconds"]
    for epoch in range(loop.state["epoch"], cfg.epochs):
        images_s = train_one_epoch(loop, epoch, t_start)
        val = task.evaluate(loop.model, loop.val_loader, acc.gather_for_metrics, "val")
        bad = {k: v for k, v in val.items() if isinstance(v, float) and not math.isfinite(v)}
        if bad:  # a NaN model scores as if it predicted one class: never a result
            raise TrainingDiverged(f"validation {', '.join(f'{k} is {v}' for k, v in bad.items())} after epoch "
                                   f"{epoch + 1}; the last good checkpoint is {loop.last}")
        loop.end_epoch(epoch, val, images_s)
        loop.state["seconds"] = time.perf_counter() - t_start
        loop.checkpoint()
    return loop.finish(time.perf_counter() - t_start, t_start)


def evaluate_adapter(adapter: str | Path, data: str | None = None, batch_size: int | None = None,
                     workers: int | None = None, device: str = "auto") -> dict[str, Any]:
    """Rebuild the model an adapter was trained with (:func:`mslora.engine.rebuild.rebuild`) and evaluate it on
    the test split.

    Args:
        adapter: a run directory or its ``adapter.safetensors``.
        data: data source; default the one the run was trained on (same split and split_seed).
        batch_size: images per batch; default the run's.
        workers: DataLoader worker processes; default by device.
        device: auto, cpu, cuda or mps.

    Returns a dict with method, backbone, dataset, ``evaluated`` (which images: ``test``, the source's test split,
    or every image of ``data`` when it is one pool that the run's seeded split would cut to 15%) and the task's test
    metrics (``test_top1``, ``test_top5``, ``test_loss``, ``test_images`` for classification).

    Raises:
        FileNotFoundError / ValueError: no adapter file, not an adapter file, or data that does not fit.
    """
    overrides = {"device": device, "workers": workers, **({"batch_size": batch_size} if batch_size else {})}
    task, model, _ = rebuild(adapter, data, load_data=True, **overrides)
    cfg = task.cfg
    acc, _ = make_accelerator(cfg)
    task.set_transforms(model)
    test, split = task.datasets.get("test"), "test"
    other = data is not None and os.path.realpath(data) != os.path.realpath(cfg.data)
    if other and test is not None and task.datasets["train"].base is test.base is task.datasets["val"].base:
        # other data held in one pool (a folder of class sub-folders, one CSV): the run's seeded 70/15/15 split
        # would test 15% of it; every image is evaluated instead
        task.datasets["test"] = Subset(test.base, range(len(test.base)), test.transform)
        split = f"every image of '{data}' (one pool, no test split of its own)"
    workers = cfg.workers if cfg.workers is not None else default_workers(acc.device.type)
    loader, _ = make_loader(task, "test", cfg, workers, acc.device.type == "cuda")
    model, loader = acc.prepare(model, loader)
    test = task.evaluate(model, loader, acc.gather_for_metrics, "test")
    return {"method": cfg.method, "backbone": cfg.backbone, "dataset": task.metadata().get("dataset"),
            "evaluated": split, **{f"test_{k}": v for k, v in test.items()}}
