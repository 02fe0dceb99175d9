"""Methods that Hugging Face PEFT implements well, used through its public injection API
(``peft.inject_adapter_in_model``) on timm backbones; our adapter file, counts and merge sit on top.

- ``lora`` (Hu et al. 2022): W' = W + (alpha / r) * B A on Linear and Conv2d layers (PEFT LoraConfig).
- ``dora``: LoRA with weight decomposition (PEFT ``use_dora=True``).
- ``pissa``: LoRA initialised from the principal singular vectors of W, with W replaced by its residual
  (PEFT ``init_lora_weights='pissa'``); Linear layers only (PEFT's PiSSA init needs a 2D weight). The CoLoRA
  supp. (Sec. F) uses alpha / r = 2.
- ``hira`` (Huang et al. 2025): W' = W + W ⊙ (B A), a high-rank Hadamard update (PEFT HiraConfig); the CoLoRA
  supp. compares against it on 1x1 layers.
Default targets: every Linear and every ungrouped Conv2d inside the backbone's blocks (``pissa``: Linear only).
All four merge: each PEFT layer computes its delta weight once and is replaced by its base layer.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from mslora.core.inject import modules_in_blocks
from mslora.registry import register


@dataclass
class LoRAConfig:
    """Options shared by the PEFT low-rank methods (PEFT's names: r, lora_alpha, lora_dropout)."""

    rank: int = 8  # r: rank of B A
    alpha: float = 16.0  # lora_alpha: the update is scaled by alpha / rank (CoLoRA supp. F: alpha / r = 2)
    dropout: float = 0.0  # dropout on the adapter input
    target_modules: str | None = None  # regex over module names; default: Linear and ungrouped Conv2d in blocks

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"rank={self.rank} must be a positive integer")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout={self.dropout} must be in [0, 1)")


def _targets(model: nn.Module, cfg: "LoRAConfig | HiRAConfig", linear_only: bool = False) -> list[str]:
    types = (nn.Linear,) if linear_only else (nn.Linear, nn.Conv2d)
    return modules_in_blocks(model, types, cfg.target_modules, keep=lambda m: getattr(m, "groups", 1) == 1)


def _inject(model: nn.Module, peft_config) -> None:
    from peft import inject_adapter_in_model

    inject_adapter_in_model(peft_config, model)


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
    """Merge every PEFT layer into its base layer and put the base layer back in its place."""
    unwrap_peft(model, merge=True)


def _lora(model: nn.Module, cfg: LoRAConfig, linear_only: bool = False, **extra) -> None:
    from peft import LoraConfig

    _inject(model, LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                              target_modules=_targets(model, cfg, linear_only), **extra))


@register("lora", LoRAConfig, merge=merge_peft)
def apply_lora(model: nn.Module, cfg: LoRAConfig) -> None:
    """LoRA on Linear and Conv2d layers (PEFT); B = 0 at initialisation, so the model starts as the backbone."""
    _lora(model, cfg)


@register("dora", LoRAConfig, merge=merge_peft)
def apply_dora(model: nn.Module, cfg: LoRAConfig) -> None:
    """DoRA (PEFT ``use_dora=True``) on Linear and Conv2d layers."""
    _lora(model, cfg, use_dora=True)


@register("pissa", LoRAConfig, merge=merge_peft)
def apply_pissa(model: nn.Module, cfg: LoRAConfig) -> dict:
    """PiSSA on Linear layers (PEFT): B A holds the top-r singular components and W their residual, so the
    model equals the backbone at initialisation up to float rounding. Returns copies of the original weights
    (for :func:`mslora.unadapt`).

    Raises:
        ValueError: no Linear layer in the blocks (PEFT's PiSSA init takes 2D weights; use lora or hira on convs).
    """
    try:
        targets = _targets(model, cfg, linear_only=True)
    except ValueError:
        raise ValueError(f"pissa adapts Linear layers (PEFT's PiSSA init needs 2D weights) and "
                         f"{type(model).__name__} has none in its blocks; use lora or hira for convolutions") from None
    # On the meta device (parameter counting) there are no weights to decompose; the count is the same.
    meta = next(model.parameters()).device.type == "meta"
    # PiSSA replaces W by its residual: keep W so that mslora.unadapt can give the backbone back.
    originals = {} if meta else {f"{n}.weight": model.get_submodule(n).weight.detach().clone() for n in targets}
    _lora(model, cfg, linear_only=True, init_lora_weights=True if meta else "pissa")
    return originals


@dataclass
class HiRAConfig:
    """Options of HiRA (PEFT's HiraConfig has no scaling factor)."""

    rank: int = 8  # r of B A inside the Hadamard product
    dropout: float = 0.0  # hira_dropout on the adapter input
    target_modules: str | None = None  # regex over module names; default: Linear and ungrouped Conv2d in blocks

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"rank={self.rank} must be a positive integer")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout={self.dropout} must be in [0, 1)")


@register("hira", HiRAConfig, merge=merge_peft)
def apply_hira(model: nn.Module, cfg: HiRAConfig) -> None:
    """HiRA on Linear and Conv2d layers (PEFT HiraConfig): W' = W + W ⊙ (B A), B = 0 at initialisation."""
    from peft import HiraConfig

    _inject(model, HiraConfig(r=cfg.rank, hira_dropout=cfg.dropout, target_modules=_targets(model, cfg)))
