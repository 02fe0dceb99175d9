"""``mslora bench``: what each method costs to train and to run, measured in one process with the methods
interleaved after warm-up, so that ratios between rows are read from one run on one machine.

Per row: training step time (forward, cross-entropy, backward, AdamW step; median over ``steps`` interleaved
rounds), peak training memory, inference latency (eval mode, no gradient) and throughput, inference latency after
:func:`mslora.merge` for mergeable methods, trainable and total parameters, and forward GFLOPs at batch 1
(``torch.utils.flop_counter``; one multiply-add counts 2). Reference rows:
- ``backbone``: the bare frozen backbone (BatchNorm statistics frozen, as under every adapter): its inference, and
  as its training step the forward + backward to the input (no weight gradients, no optimiser): the floor that any
  adapter inside the backbone pays;
- ``full``: full fine-tuning;
- ``peft_lora``: Hugging Face PEFT's own LoRA (``inject_adapter_in_model``, rank 8 as ours) on the layers our
  ``lora`` adapts, with PEFT's own freezing, the head trainable and BatchNorm statistics frozen as in ours, to
  check that ours is no slower.

Memory (:func:`peak_train_memory`): what two training steps of a freshly built row allocate on top of the model:
activations kept for backward, gradients, optimiser state. On CUDA the allocator's peak
(``torch.cuda.max_memory_allocated``, kind ``cuda_max_allocated``); on CPU torch's profiler's allocation events
(kind ``cpu_allocator_profiler``). Both count tensors, not allocator caches.
"""
from __future__ import annotations

import contextlib
import copy
import os
import statistics
import sys
import time
from typing import Any

import torch
from torch import nn

from mslora.backbones import build_backbone
from mslora.core.adapt import adapt, merge
from mslora.core.hooks import freeze_batchnorm
from mslora.core.state import count_parameters
from mslora.methods.peft_methods import LoRAConfig, default_targets
from mslora.registry import get_method

REFERENCES = ("backbone", "peft_lora")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build(backbone: str, method: str, img_size: int, options: dict[str, Any] | None = None) -> nn.Module:
    """A random-init timm model adapted with ``method`` (or a reference row's model), for timing only.

    Raises:
        ValueError: unknown backbone or method (close matches named).
    """
    model = build_backbone(backbone, 1000, pretrained=False, img_size=img_size)
    if method == "backbone":  # frozen as every adapter sees it (BatchNorm statistics too), nothing to train
        return adapt(model, "fixed").requires_grad_(False)
    if method == "peft_lora":
        from peft import LoraConfig, inject_adapter_in_model  # PEFT takes seconds to import: only for this row

        ours = LoRAConfig(**(options or {}))
        model = inject_adapter_in_model(LoraConfig(r=ours.rank, lora_alpha=ours.alpha,
                                                   target_modules=default_targets(model, ours)), model)
        model.get_classifier().requires_grad_(True)  # as ours: head trained, BatchNorm statistics frozen
        freeze_batchnorm(model)
        return model
    return adapt(model, method, **(options or {}))


class BenchRow:
    """One row's model, optimiser and inputs, and its measured times."""

    def __init__(self, backbone, method, options, img_size, batch_size, device, channels_last):
        self.method, self.device = method, device
        self.model = build(backbone, method, img_size, options).to(device)
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        self.model = self.model.to(memory_format=fmt)
        self.x = torch.randn(batch_size, 3, img_size, img_size, device=device).contiguous(memory_format=fmt)
        self.y = torch.randint(0, 1000, (batch_size,), device=device)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(params, lr=1e-4) if params and method != "backbone" else None
        self.train_ms: list[float] = []
        self.infer_ms: list[float] = []
        self.merged_ms: list[float] = []

    def train_step(self, autocast) -> float:
        self.model.train()
        x = self.x.requires_grad_(True) if self.opt is None else self.x
        _sync(self.device)
        t0 = time.perf_counter()
        with autocast():
            out = self.model(x)
        if self.opt is None:  # the floor: backward to the input only
            out.float().mean().backward()
            x.grad = None
        else:
            nn.functional.cross_entropy(out.float(), self.y).backward()
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
        _sync(self.device)
        return (time.perf_counter() - t0) * 1e3

    @torch.no_grad()
    def infer(self, model, autocast) -> float:
        model.eval()
        _sync(self.device)
        t0 = time.perf_counter()
        with autocast():
            model(self.x.detach())
        _sync(self.device)
        return (time.perf_counter() - t0) * 1e3


def _autocast(device_type: str, precision: str):
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    if dtype is None:
        return lambda: torch.autocast(device_type, enabled=False)
    return lambda: torch.autocast(device_type, dtype=dtype)


def gflops(model: nn.Module, img_size: int, device: torch.device) -> float:
    """Forward GFLOPs of ``model`` on one image (torch.utils.flop_counter; a multiply-add is 2 FLOPs)."""
    from torch.utils.flop_counter import FlopCounterMode

    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.randn(1, 3, img_size, img_size, device=device))
    return counter.get_total_flops() / 1e9


def bench(backbone: str, methods: list[str], img_size: int = 224, batch_size: int = 32, device: str = "cpu",
          precision: str = "fp32", channels_last: bool = False, steps: int = 12, warmup: int = 3,
          options: dict[str, dict[str, Any]] | None = None, memory: bool = True) -> list[dict[str, Any]]:
    """Measure ``methods`` (plus the reference rows) on ``backbone``; returns one dict per row (see module doc).

    Args:
        methods: registered method names; ``backbone``, ``full`` and ``peft_lora`` rows are added when missing.
        options: per-method options, e.g. ``{"mslora": {"rank": 32}}``.
        steps, warmup: timed and untimed interleaved rounds.
        memory: measure peak training memory (on CPU one extra process per row).

    Raises:
        ValueError: unknown backbone, method, device or precision.
    """
    if precision not in ("fp32", "bf16", "fp16"):
        raise ValueError(f"precision={precision!r} must be one of fp32, bf16, fp16")
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       "cpu" if device == "auto" else device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' but PyTorch sees no CUDA device")
    names = list(dict.fromkeys(["backbone", "full", *methods, "peft_lora"]))
    for m in names:
        if m not in REFERENCES:
            get_method(m)
    options = options or {}
    autocast = _autocast(dev.type, precision)
    rows = [BenchRow(backbone, m, options.get(m if m != "peft_lora" else "lora"), img_size, batch_size, dev, channels_last)
            for m in names]
    for r in range(warmup + steps):
        for row in rows:
            ms = row.train_step(autocast)
            if r >= warmup:
                row.train_ms.append(ms)
    merged = {}
    for row in rows:
        spec = None if row.method in REFERENCES else get_method(row.method)
        if spec is not None and not spec.merge_impossible and row.method != "full":
            merged[row.method] = merge(copy.deepcopy(row.model))
    for r in range(warmup + steps):
        for row in rows:
            ms = row.infer(row.model, autocast)
            if r >= warmup:
                row.infer_ms.append(ms)
            if row.method in merged:
                ms = row.infer(merged[row.method], autocast)
                if r >= warmup:
                    row.merged_ms.append(ms)
    out = []
    fmt = "channels_last" if channels_last else "contiguous"
    for row in rows:
        counts = count_parameters(row.model) if row.method not in REFERENCES else None
        trainable = sum(p.numel() for p in row.model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in row.model.parameters())
        infer = statistics.median(row.infer_ms)
        out.append({
            "method": row.method, "options": options.get(row.method if row.method != "peft_lora" else "lora") or {},
            "backbone": backbone, "device": str(dev), "dtype": precision,
            "memory_format": fmt, "batch_size": batch_size, "img_size": img_size,
            "train_step_ms": round(statistics.median(row.train_ms), 2),
            "infer_ms": round(infer, 2), "infer_images_per_s": round(batch_size / infer * 1e3, 1),
            "merged_infer_ms": round(statistics.median(row.merged_ms), 2) if row.merged_ms else None,
            "trainable_params": counts["trainable_params"] if counts else trainable,
            "total_params": counts["total_params"] if counts else total,
            "gflops": round(gflops(row.model, img_size, dev), 3),
        })
    del rows, merged
    if memory:
        for r in out:
            fresh = BenchRow(backbone, r["method"], options.get(r["method"] if r["method"] != "peft_lora" else "lora"),
                         img_size, batch_size, dev, channels_last)
            mb, kind = peak_train_memory(fresh, autocast)
            r.update(peak_train_mem_mb=round(mb, 1), peak_mem_kind=kind)
            del fresh
    return out


def peak_train_memory(row: "BenchRow", autocast, steps: int = 2) -> tuple[float, str]:
    """Peak memory in MB that ``steps`` training steps of a freshly built row allocate on top of its model
    (activations kept for backward, gradients, optimiser state: the first step creates AdamW's), and its kind.

    CUDA: ``torch.cuda.max_memory_allocated`` minus what was allocated before (``cuda_max_allocated``). CPU:
    torch's profiler with ``profile_memory=True``, the running sum of its allocation and free events in time
    order (``cpu_allocator_profiler``): tensors only, not the allocator's cached or the process's other memory.
    """
    dev = row.device
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        before = torch.cuda.memory_allocated(dev)
        for _ in range(steps):
            row.train_step(autocast)
        return (torch.cuda.max_memory_allocated(dev) - before) / 2**20, "cuda_max_allocated"
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        for _ in range(steps):
            row.train_step(autocast)
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
    total = peak = 0
    for _, nbytes in events:
        total += nbytes
        peak = max(peak, total)
    return peak / 2**20, "cpu_allocator_profiler"


@contextlib.contextmanager
def _quiet_stderr():
    """Silence file descriptor 2 for the block: the profiler's C++ side prints start/stop lines there that no
    setting turns off (``KINETO_LOG_LEVEL`` silences only some)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
