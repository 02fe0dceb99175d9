"""Reference points that every PEFT comparison needs: the linear probe and full fine-tuning.

- ``linear``: frozen backbone (BatchNorm statistics too), trainable classifier head only.
- ``full``: every parameter trains and BatchNorm statistics update (the 'fine-tune' rows of MSLoRA
  Tables 2-5).
Neither adds modules, so merging is a no-op.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from mslora.registry import register


@dataclass
class LinearConfig:
    """The linear probe has no options."""


@dataclass
class FullConfig:
    """Full fine-tuning has no options."""


def _nothing_to_merge(model: nn.Module, cfg: object) -> None:
    """These methods add no modules: the model already is a plain backbone."""


@register("linear", LinearConfig, merge=_nothing_to_merge)
def apply_linear(model: nn.Module, cfg: LinearConfig) -> None:
    """Linear probe: :func:`mslora.adapt` already froze all but the head."""


@register("full", FullConfig, merge=_nothing_to_merge, freeze_backbone=False)
def apply_full(model: nn.Module, cfg: FullConfig) -> None:
    """Full fine-tuning: nothing is frozen."""
