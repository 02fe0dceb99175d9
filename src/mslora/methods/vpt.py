"""VPT: visual prompt tuning (Jia et al., ECCV 2022; as RLRR, CVPR 2024, writes it: Eq. 11, supp. Table 4:
m * D parameters shallow, m * D * L deep).

``num_tokens`` learnable prompt tokens are inserted after the prefix tokens (class, register) of a ViT-style
token sequence before the first block; with ``deep`` every later block gets its own prompts in their place.
The prompts are removed after the last block, so pooling and the head see the usual tokens. Prompts change
the attention of every patch, so VPT does not start as the backbone, and it cannot merge.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from mslora.core.families import prompt_support
from mslora.core.hooks import add_adapter, keep_handle
from mslora.core.placement import blocks
from mslora.methods.options import option, positive_int, probability
from mslora.registry import register


@dataclass
class VPTConfig:
    """Options of VPT."""

    num_tokens: int = option(10, "m: prompt tokens per layer")
    deep: bool = option(True, "VPT-Deep (new prompts at every block); False: VPT-Shallow (first block only)")
    dropout: float = option(0.0, "dropout on the prompts")

    def __post_init__(self) -> None:
        positive_int("num_tokens", self.num_tokens)
        probability("dropout", self.dropout)


class Prompts(nn.Module):
    """Prompt tokens (L, m, C), xavier-uniform as in VPT (bound sqrt(6 / (3 * patch^2 + C)))."""

    def __init__(self, layers: int, num_tokens: int, dim: int, patch: int, prefix: int, dropout: float) -> None:
        super().__init__()
        bound = math.sqrt(6.0 / (3 * patch * patch + dim))
        self.tokens = nn.Parameter(torch.empty(layers, num_tokens, dim).uniform_(-bound, bound))
        self.prefix, self.drop = prefix, nn.Dropout(dropout)

    def insert(self, x: torch.Tensor, i: int, replace: bool) -> torch.Tensor:
        """x (B, P + [m] + N, C) -> (B, P + m + N, C) with layer i's prompts after the P prefix tokens."""
        p, m = self.prefix, self.tokens.shape[1]
        prompts = self.drop(self.tokens[i]).expand(x.shape[0], -1, -1).to(x.dtype)
        rest = x[:, p + m:] if replace else x[:, p:]
        return torch.cat([x[:, :p], prompts, rest], dim=1)

    def remove(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, P + m + N, C) -> (B, P + N, C): the prompts taken out."""
        return torch.cat([x[:, :self.prefix], x[:, self.prefix + self.tokens.shape[1]:]], dim=1)


@register("vpt", VPTConfig, merge_impossible="prompt tokens are extra inputs, not a change of the weights")
def apply_vpt(model: nn.Module, cfg: VPTConfig) -> None:
    """Insert prompts with forward pre-hooks on the blocks and strip them after the last block.

    Raises:
        ValueError: the backbone is not a ViT-style token model with absolute position embeddings (VPT needs one
            global token sequence whose blocks take any number of tokens; EVA's rotary and BEiT's relative
            position embeddings are built for the patch tokens alone).
    """
    support = prompt_support(model)
    if support is not True:
        raise ValueError(f"vpt does not apply to {type(model).__name__}: {support}")
    names = blocks(model)
    patch = model.patch_embed.patch_size[0]
    p = next(model.parameters())
    prompts = Prompts(len(names) if cfg.deep else 1, cfg.num_tokens, model.embed_dim, patch,
                      int(model.num_prefix_tokens), cfg.dropout).to(p.device, p.dtype)
    add_adapter(model, "vpt", prompts)
    for i, name in enumerate(names):
        if i == 0 or cfg.deep:
            keep_handle(model.get_submodule(name).register_forward_pre_hook(
                lambda _m, args, i=i: (prompts.insert(args[0], i if cfg.deep else 0, replace=i > 0), *args[1:])))
    keep_handle(model.get_submodule(names[-1]).register_forward_hook(lambda _m, _a, out: prompts.remove(out)))
