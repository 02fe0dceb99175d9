"""Adapter parameter counts of full-size backbones against MSLoRA Eq. 3 and the paper's figures.

Models are built on the meta device: no memory, no weights, no network.
"""
import math
import sys
from pathlib import Path

import pytest
import timm
import torch

import mslora

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from paper_counts import ROWS, count, formula  # noqa: E402  (benchmarks/ holds the papers' rows)

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


def small(name):
    from conftest import make_model

    return make_model(name)


def added(model, method, **opts):
    return mslora.count_parameters(mslora.adapt(model, method, **opts))["adapter_params"]


def test_vpt_counts_follow_rlrr_supp_table4():
    m, d, layers = 10, 64, 6  # test_vit: embed_dim 64, depth 6
    assert added(small("vit"), "vpt", num_tokens=m, deep=True) == m * d * layers  # VPT-Deep: m * D * L
    assert added(small("vit"), "vpt", num_tokens=m, deep=False) == m * d  # VPT-Shallow: m * D


def test_rlrr_and_ssf_counts_follow_rlrr_supp_table4():
    # Per Linear layer of shape (out, in) RLRR adds out + in + out (s_left, s_right, f) = 3 * D* for square
    # layers, and the fused qkv one s_right per q, k, v (the official code's separate layers); SSF adds 2 * out;
    # per LayerNorm both add 2 * C (scale, shift). RLRR's official layout also scales and shifts the final norm
    # and the patch embedding's output (2 * D each).
    model = small("vit")
    lin = {n: m for n, m in model.named_modules() if n.startswith("blocks.") and isinstance(m, torch.nn.Linear)}
    lns = [m for n, m in model.named_modules() if n.startswith("blocks.") and isinstance(m, torch.nn.LayerNorm)]
    d = 64
    assert added(small("vit"), "rlrr") == sum(2 * m.out_features + m.in_features * (3 if n.endswith("qkv") else 1)
                                              for n, m in lin.items()) + sum(2 * m.normalized_shape[0] for m in lns) + 4 * d
    lin = lin.values()
    assert added(small("vit"), "ssf") == sum(2 * m.out_features for m in lin) + sum(2 * m.normalized_shape[0] for m in lns)
    # square layers: RLRR is exactly 3 * D* per layer
    assert added(small("vit"), "rlrr", target_modules=r"blocks\.\d+\.attn\.proj", norms=False) == 6 * 3 * d


def test_colora_counts_follow_colora_supp_table1():
    from mslora.methods.colora import colora_pairs

    model = small("convnext")
    gamma, ratio = 2, 0.25
    total = 0
    for _, first, second, dw in colora_pairs(model):
        d, d1 = model.get_submodule(first).in_features, model.get_submodule(first).out_features
        d2 = model.get_submodule(second).out_features
        r = min(d, d1, d2) // gamma
        rl = r - round(ratio * r)
        total += r * (d + d2) + 2 * rl * d1  # supp. Table 1: r (d + d'') + 2 rl d'
        total += d * (d // (2 * gamma)) + 9 * d  # depth-wise branch: 1x1 down to C / (2 gamma), grouped 3x3 up
    assert added(model, "colora", gamma=gamma, shared_ratio=ratio) == total


def test_lora_counts():
    model = small("vit")
    lin = [m for n, m in model.named_modules() if n.startswith("blocks.") and isinstance(m, torch.nn.Linear)]
    assert added(small("vit"), "lora", rank=4) == sum(4 * (m.in_features + m.out_features) for m in lin)


def test_adapter_counts_follow_rlrr_supp_table4():
    d, r, layers = 64, 8, 6  # 2 * D * D' * L plus the biases (D' + D per layer)
    assert added(small("vit"), "adapter", rank=r) == 2 * d * r * layers + (r + d) * layers


def test_paper_table_rows():

    vpt = next(r for r in ROWS if r.method == "vpt" and r.options["deep"] and r.backbone.startswith("vit_base"))
    assert count(vpt)[0] == formula(vpt) == 10 * 768 * 12
    proj = next(r for r in ROWS if r.source == "MSLoRA Table 1" and r.backbone == "resnet50" and r.part == "proj"
                and r.options["groups"] == 4)
    # Eq. 3's projection term 3 * C * D / G over the 16 bottlenecks, plus the three projections' biases
    assert count(proj)[0] == 3 * sum(RESNET50) * 128 // 4 + 16 * 2 * 128 + sum(RESNET50)


# Rows whose count, rounded as the paper prints it, differs from the paper's, and why (each must still differ: a
# row that comes to match is taken off this list).
MISMATCHES = {
    ("RLRR supp. Table 12", "resnet18", (("rank", 1),)): "0.0748M rounds to 0.07; the printed 0.08 is not reached by "
    "any count of the official (O k) x (I k) layout (with or without the 100-class head's bias)",
    ("CoLoRA supp. Table 8", "convnext_base", (("bias_norm", True), ("gamma", 4), ("shared_ratio", 0.4))):
        "19.45M: the depth-wise branch is our reading (the supplement does not describe it), within 0.2M",
    ("CoLoRA supp. Table 8", "convnext_base", (("bias_norm", True), ("gamma", 2), ("shared_ratio", 0.9))):
        "17.63M: the depth-wise branch is our reading, within 0.2M",
    ("CoLoRA supp. Table 8", "convnext_base", (("bias_norm", True), ("gamma", 2), ("shared_ratio", 0.8))):
        "21.75M: the depth-wise branch is our reading, within 0.2M",
}


def test_rlrr_table12_and_colora_table8_counts():
    """RLRR supp. Table 12 (CNNs, the official (O k) x (I k) layout, CIFAR-100 heads included), RLRR Table 2
    (ViT-B/16) and CoLoRA supp. Table 8 (ConvNeXt-B, depth-wise branch, biases and norms trained): our count rounded
    to the paper's printed decimals equals the paper's, except the rows of MISMATCHES, which name their reason."""

    rows = [r for r in ROWS if r.source in ("RLRR supp. Table 12", "CoLoRA supp. Table 8", "RLRR Table 2")]
    assert len(rows) == 13
    seen = set()
    for row in rows:
        ours = count(row)[0] / 1e6
        decimals = len(repr(row.paper_m).split(".")[1])
        key = (row.source, row.backbone, tuple(sorted(row.options.items())))
        if key in MISMATCHES:
            seen.add(key)
            assert round(ours, decimals) != row.paper_m, (key, "now matches: take it off MISMATCHES")
            assert abs(ours - row.paper_m) <= 0.2, (row, ours)
        else:
            assert round(ours, decimals) == row.paper_m, (row, ours)
    assert seen == set(MISMATCHES)
