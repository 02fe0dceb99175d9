"""Adapter parameter counts of full-size backbones against MSLoRA Eq. 3 and the paper's figures.

Models are built on the meta device: no memory, no weights, no network.
"""
import math

import pytest
import timm
import torch

import mslora

D = 128
EQ3_BLOCK = D * D + 83 * D  # Eq. 3 terms that do not depend on C_in or G


def eq3(widths, g, d=D):
    return sum(3 * c * d // g + d * d + 83 * d for c in widths)


def adapted(name, **opts):
    with torch.device("meta"):
        model = timm.create_model(name)
    return mslora.count_parameters(mslora.adapt(model, "mslora", **opts))


RESNET50 = [64] * 3 + [128] * 4 + [256] * 6 + [512] * 3  # bottleneck widths, 16 blocks
SWIN_B = [128] * 2 + [256] * 2 + [512] * 18 + [1024] * 2  # block widths, 24 blocks


@pytest.mark.parametrize("name,widths,g,paper_m,paper_pct,pre_norm", [
    ("resnet50", RESNET50, 4, 0.7, 2.7, False),  # Table 3: 0.7M (2.7%)
    ("resnet50", RESNET50, 1, 1.8, 7.0, False),  # Table 2a detection, G=1: 1.8M (7.0%)
    ("swin_base_patch4_window7_224", SWIN_B, 4, 1.8, 2.0, True),  # Tables 3, 5: 1.8M (2.0%)
    ("swin_base_patch4_window7_224", SWIN_B, 1, 5.2, 5.9, True),  # Table 3 MSLoRA*: 5.2M (5.9%)
])
def test_counts_follow_eq3_and_the_paper(name, widths, g, paper_m, paper_pct, pre_norm):
    c = adapted(name, groups=g)
    extras = len(widths) * 8 * D + sum(widths) * (3 if pre_norm else 1)  # biases, LayerNorms
    assert c["adapter_params"] == eq3(widths, g) + extras
    # The paper truncates to one decimal (its Table 1 shows 0.36M as 0.3M): Eq. 3 alone lies in [paper, paper + 0.1M).
    assert paper_m * 1e6 <= eq3(widths, g) < (paper_m + 0.1) * 1e6
    # Its percentages are those counts over the whole unadapted model, classifier included, truncated too.
    model = c["backbone_params"] + c["head_params"]
    assert math.floor(1000 * paper_m * 1e6 / model) / 10 == paper_pct
