"""Baselines that every PEFT comparison needs; none adds modules, so merging is a no-op.

- ``linear``: frozen backbone (BatchNorm statistics too), trainable classifier head only.
- ``fixed``: the same for classification: frozen backbone, no adapter; only the task head (or, for dense
  tasks, the detector / decoder) trains. The 'fixed' row of MSLoRA Table 3.
- ``full``: every parameter trains and BatchNorm statistics update (the 'fine-tune' rows of MSLoRA Tables 2-5).
- ``bitfit``: bias-tune (Zaken et al. 2022; MSLoRA Table 3 'bias-tune' [58]): every bias of the backbone trains.
- ``normtune``: norm-tune (MSLoRA Table 3 'norm-tune' [16]): the affine weight and bias of every norm layer
  (BatchNorm, LayerNorm, GroupNorm) train; BatchNorm statistics stay frozen. Ours, not PEFT's LN tuning, since
  that one targets LayerNorm and wraps copies of the layers, where this is a requires_grad switch on all norms.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from mslora.core.families import NORM_TYPES
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


@dataclass
class FixedConfig:
    """The fixed backbone has no options."""


@register("fixed", FixedConfig, merge=_nothing_to_merge)
def apply_fixed(model: nn.Module, cfg: FixedConfig) -> None:
    """Fixed backbone: :func:`mslora.adapt` already froze all but the head."""


@dataclass
class BitFitConfig:
    """BitFit has no options."""


@register("bitfit", BitFitConfig, merge=_nothing_to_merge)
def apply_bitfit(model: nn.Module, cfg: BitFitConfig) -> None:
    """Bias-tune: every parameter named ``bias`` trains."""
    for name, p in model.named_parameters():
        if name.rsplit(".", 1)[-1] == "bias":
            p.requires_grad_(True)


@dataclass
class NormTuneConfig:
    """Norm-tune has no options."""


@register("normtune", NormTuneConfig, merge=_nothing_to_merge)
def apply_normtune(model: nn.Module, cfg: NormTuneConfig) -> None:
    """Norm-tune: the affine parameters of every BatchNorm, LayerNorm and GroupNorm train."""
    for m in model.modules():
        if isinstance(m, NORM_TYPES):
            for p in m.parameters(recurse=False):
                p.requires_grad_(True)


@register("full", FullConfig, merge=_nothing_to_merge, freeze_backbone=False)
def apply_full(model: nn.Module, cfg: FullConfig) -> None:
    """Full fine-tuning: nothing is frozen."""
