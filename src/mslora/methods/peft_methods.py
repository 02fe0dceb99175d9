"""Methods that Hugging Face PEFT implements well, used through its public injection API
(``peft.inject_adapter_in_model``) on timm backbones; our adapter file, counts and merge sit on top.

- ``lora`` (Hu et al. 2022): W' = W + (alpha / r) * B A on Linear and Conv2d layers (PEFT LoraConfig).
- ``dora``: LoRA with weight decomposition (PEFT ``use_dora=True``).
- ``pissa`` (Meng et al., NeurIPS 2024): LoRA initialised from the principal singular vectors of W, with W
  replaced by its residual (PEFT ``init_lora_weights='pissa'`` on Linear layers; on 1x1 convolutions, which
  PEFT's PiSSA refuses, the same SVD initialisation here: a 1x1 conv is a Linear over channels). The CoLoRA
  supp. (Sec. F) uses it on the 1x1 layers of CNNs with alpha / r = 2.
- ``hira`` (Huang et al., ICLR 2025): W' = W + W ⊙ (B A), a high-rank Hadamard update (PEFT HiraConfig); the
  CoLoRA supp. (Sec. F) compares against it on 1x1 layers only. (Its "expected scaling" s_expect is defined in
  the CoLoRA main paper's Sec. 3.1, which is not among our sources; PEFT's HiRA has no scaling factor.)
Default targets: every Linear and every ungrouped Conv2d inside the backbone's blocks for ``lora``/``dora``; for
``pissa`` and ``hira``, every Linear in the blocks, or, in CNNs (no Linear in the blocks), every 1x1 Conv2d.
All four merge: each PEFT layer computes its delta weight once and is replaced by its base layer.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from mslora.core.named import loading
from mslora.core.placement import modules_in_blocks
from mslora.methods.options import option, positive_int, probability
from mslora.registry import register


@dataclass
class LowRankConfig:
    """Options every PEFT low-rank method has (PEFT's names: r, lora_dropout / hira_dropout).

    Raises (on construction):
        ValueError: a rank that is not a positive integer, or a dropout outside [0, 1).
    """

    rank: int = option(8, "r: rank of B A")
    dropout: float = option(0.0, "dropout on the adapter input")

    def __post_init__(self) -> None:
        positive_int("rank", self.rank)
        probability("dropout", self.dropout)


@dataclass
class LoRAConfig(LowRankConfig):
    """Options of LoRA, DoRA and PiSSA (PEFT's LoraConfig: r, lora_alpha, lora_dropout, target_modules)."""

    alpha: float = option(16.0, "lora_alpha: the update is scaled by alpha / rank (CoLoRA supp. F: alpha / r = 2)")
    target_modules: str | None = option(None, "regex over module names; default: Linear and ungrouped Conv2d in "
                                        "blocks (PiSSA: Linear layers, or in CNNs 1x1 Conv2d layers)")


def default_targets(model: nn.Module, cfg: LoRAConfig | HiRAConfig, pointwise: bool = False) -> list[str]:
    """Linear and ungrouped Conv2d layers in the blocks (or ``target_modules``); ``pointwise``: Linear layers, or
    in a CNN without Linear layers in its blocks, 1x1 Conv2d layers (CoLoRA supp. Sec. F)."""
    names = modules_in_blocks(model, (nn.Linear, nn.Conv2d), cfg.target_modules,
                              keep=lambda m: getattr(m, "groups", 1) == 1)
    if not pointwise:
        return names
    linear = [n for n in names if isinstance(model.get_submodule(n), nn.Linear)]
    conv1x1 = [n for n in names if getattr(model.get_submodule(n), "kernel_size", None) == (1, 1)]
    if not (linear or conv1x1):
        raise ValueError(f"no Linear or 1x1 Conv2d layer of {type(model).__name__} matches "
                         f"target_modules={cfg.target_modules!r}")
    return linear or conv1x1


def _inject(model: nn.Module, peft_config) -> None:
    """PEFT's injection, under the name of the named set being loaded (``mslora.core.named.loading``), else PEFT's
    ``default``."""
    from peft import inject_adapter_in_model

    inject_adapter_in_model(peft_config, model, adapter_name=loading() or "default")


def undo_peft(model: nn.Module, cfg=None) -> None:
    """Put every PEFT layer's base layer back unmerged (for :func:`mslora.unadapt`)."""
    unwrap_peft(model, merge=False)


def unwrap_peft(model: nn.Module, merge: bool) -> None:
    """Put every PEFT layer's base layer back in its place (frozen), merging its update into it first when
    ``merge`` (``merge(safe_merge=True)`` raises ValueError on non-finite weights, before changing that layer)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)]
    for name, layer in layers:
        if merge:
            layer.merge(safe_merge=True)
        parent, _, child = name.rpartition(".")
        base = layer.get_base_layer()
        for p in base.parameters():
            p.requires_grad_(False)
        setattr(model.get_submodule(parent) if parent else model, child, base)


def merge_peft(model: nn.Module, cfg=None) -> None:
    """Merge every PEFT layer into its base layer and put the base layer back in its place.

    Raises:
        ValueError: a merged weight is not finite (PEFT's ``safe_merge``; that layer is left unmerged).
    """
    unwrap_peft(model, merge=True)


def _lora(model: nn.Module, cfg: LoRAConfig, **extra) -> None:
    from peft import LoraConfig

    _inject(model, LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                              target_modules=default_targets(model, cfg), **extra))


@register("lora", LoRAConfig, merge=merge_peft, undo=undo_peft)
def apply_lora(model: nn.Module, cfg: LoRAConfig) -> None:
    """LoRA on Linear and Conv2d layers (PEFT); B = 0 at initialisation, so the model starts as the backbone."""
    _lora(model, cfg)


@register("dora", LoRAConfig, merge=merge_peft, undo=undo_peft)
def apply_dora(model: nn.Module, cfg: LoRAConfig) -> None:
    """DoRA (PEFT ``use_dora=True``) on Linear and Conv2d layers."""
    _lora(model, cfg, use_dora=True)


@register("pissa", LoRAConfig, merge=merge_peft, undo=undo_peft)
def apply_pissa(model: nn.Module, cfg: LoRAConfig) -> dict:
    """PiSSA on Linear layers (PEFT), or on 1x1 convolutions in CNNs (the same SVD initialisation, done here):
    B A holds the top-r singular components and W their residual, so the model equals the backbone at
    initialisation up to float rounding. Returns copies of the original weights (for :func:`mslora.unadapt`).

    Raises:
        ValueError: no Linear or 1x1 Conv2d layer in the blocks.
    """
    from peft import LoraConfig

    targets = default_targets(model, cfg, pointwise=True)
    # On the meta device (parameter counting) there are no weights to decompose; the count is the same.
    meta = next(model.parameters()).device.type == "meta"
    # PiSSA replaces W by its residual: keep W so that mslora.unadapt can give the backbone back.
    originals = {} if meta else {f"{n}.weight": model.get_submodule(n).weight.detach().clone() for n in targets}
    convs = isinstance(model.get_submodule(targets[0]), nn.Conv2d)
    _inject(model, LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=targets,
                              init_lora_weights=True if (meta or convs) else "pissa"))
    if convs and not meta:
        for name in targets:
            _pissa_conv1x1(model.get_submodule(name))
    return originals


@torch.no_grad()
def _pissa_conv1x1(layer) -> None:
    """PEFT's ``LoraLayer.pissa_init`` for a 1x1 convolution viewed as its (out, in) matrix: A = sqrt(S_r) V_r^T,
    B = U_r sqrt(S_r) with S_r divided by the scaling, and W <- W - scaling * B A."""
    name = "default"
    base = layer.get_base_layer()
    w = base.weight.to(torch.float32).flatten(1)  # (out, in)
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    r = layer.r[name]
    sr = s[:r] / layer.scaling[name]
    a = torch.diag(sr.sqrt()) @ vh[:r]  # (r, in)
    b = u[:, :r] @ torch.diag(sr.sqrt())  # (out, r)
    layer.lora_A[name].weight.copy_(a.view_as(layer.lora_A[name].weight))
    layer.lora_B[name].weight.copy_(b.view_as(layer.lora_B[name].weight))
    base.weight.copy_((w - layer.scaling[name] * b @ a).view_as(base.weight).to(base.weight.dtype))


@dataclass
class HiRAConfig(LowRankConfig):
    """Options of HiRA (PEFT's HiraConfig: r, hira_dropout, target_modules; it has no scaling factor)."""

    target_modules: str | None = option(None, "regex over module names; default: Linear layers in the blocks, or in "
                                        "CNNs 1x1 Conv2d layers")


@register("hira", HiRAConfig, merge=merge_peft, undo=undo_peft)
def apply_hira(model: nn.Module, cfg: HiRAConfig) -> None:
    """HiRA (PEFT HiraConfig) on Linear layers, or on 1x1 convolutions in CNNs (CoLoRA supp. Sec. F):
    W' = W + W ⊙ (B A), B = 0 at initialisation."""
    from peft import HiraConfig

    _inject(model, HiraConfig(r=cfg.rank, hira_dropout=cfg.dropout, target_modules=default_targets(model, cfg, pointwise=True)))
