"""Every registered method through the same checks, on small random-init CNNs and transformers:
builds; identity at initialisation where the method has it; only the method's parameters change after
optimiser steps; merged equals unmerged (eval mode) where mergeable, with the backbone's exact parameter
count, and a clear error where not; the adapter file round trip is exact."""
import copy

import pytest
import torch

import mslora
from conftest import SPECS, make_model, sample_input

ALL = ("resnet", "vit", "convnext", "efficientnet", "swin")
CASES = (
    [(b, "mslora", {"rank": 16}) for b in ALL]
    + [(b, m, {}) for b in ALL for m in ("ssf", "adapter", "lorand", "bitfit", "normtune")]
    + [(b, "rlrr", {}) for b in ALL] + [("vit", "rlrr", {"init": "official"}), ("resnet", "rlrr", {"rank": 4})]
    + [(b, m, {}) for b in ("resnet", "vit", "swin") for m in ("lora", "dora", "hira")]
    + [("vit", "pissa", {}), ("convnext", "pissa", {}), ("resnet", "pissa", {"rank": 4}),
       ("efficientnet", "hira", {"rank": 4})]
    + [("resnet", "colora", {"gamma": 4}), ("convnext", "colora", {"gamma": 2, "shared_ratio": 0.25, "depthwise": False}),
       ("efficientnet", "colora", {"gamma": 2})]
    + [(b, "mona", {}) for b in ("vit", "swin", "resnet", "convnext")] + [("swin", "mona", {"init": "identity"})]
    + [(b, "adaptformer", {}) for b in ("vit", "swin", "convnext")]
    + [(b, "conv_adapter", {}) for b in ("resnet", "convnext", "efficientnet")]
    + [("vit", "vpt", {"deep": True}), ("vit", "vpt", {"deep": False})]
    + [(b, m, {}) for b in ("resnet", "vit") for m in ("linear", "fixed", "full")]
)
NOT_IDENTITY = {("vpt", True), ("vpt", False)}  # prompts change attention from the start (VPT's design)
# and so do Mona with its released init (random projections) and RLRR with init="official"
IDS = [f"{b}-{m}-{'-'.join(f'{k}={v}' for k, v in o.items())}" for b, m, o in CASES]


def test_every_registered_method_has_a_case():
    assert {m for _, m, _ in CASES} == set(mslora.list_methods())


def train_steps(model, steps=3):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    model.train()
    x, y = sample_input(model, batch=4), torch.tensor([0, 1, 2, 3])
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    model.eval()


@pytest.mark.parametrize("backbone,method,opts", CASES, ids=IDS)
def test_method(backbone, method, opts, tmp_path):
    model = make_model(backbone).eval()
    x = sample_input(model)
    with torch.no_grad():
        plain = model(x)
    n_plain = sum(p.numel() for p in model.parameters())
    mslora.adapt(model, method, **opts)
    rec = model.mslora_adaptation
    with torch.no_grad():
        start = model(x)
    if (method, opts.get("deep")) in NOT_IDENTITY or opts.get("init") == "official" or (
            method == "mona" and not opts):
        assert not torch.allclose(start, plain, atol=1e-4)
    else:  # PiSSA's residual split is exact only up to float rounding
        torch.testing.assert_close(start, plain, rtol=0, atol=1e-5 if method == "pissa" else 0)

    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    train_steps(model)
    for k, v in model.state_dict().items():
        if k in trainable:
            assert not torch.equal(v, before[k]), f"trainable {k} did not change"
        elif method != "full":  # frozen weights and BatchNorm statistics stay
            assert torch.equal(v, before[k]), f"frozen {k} changed"
    c = mslora.count_parameters(model)
    assert c["total_params"] == c["backbone_params"] + c["head_params"] + c["adapter_params"]
    assert c["backbone_params"] + c["head_params"] == n_plain and c["adapter_params"] == sum(
        p.numel() for n, p in model.named_parameters() if n in rec.added)

    with torch.no_grad():
        trained = model(x)
    path = mslora.save_adapter(model, tmp_path / "a.safetensors")
    fresh = mslora.load_adapter(make_model(backbone), path).eval()
    with torch.no_grad():
        assert torch.equal(fresh(x), trained)

    if mslora.registry.get_method(method).merge is None:
        with pytest.raises(ValueError, match=f"'{method}' cannot be merged: "):
            mslora.merge(model)
        return
    added_biases = [n for n, m in model.named_modules() if getattr(m, "mslora_added_bias", False)]
    mslora.merge(model)
    with torch.no_grad():
        torch.testing.assert_close(model(x), trained, rtol=1e-5, atol=1e-5)
    if added_biases:  # RLRR's shift on a bias-free Linear (Swin's PatchMerging reduction), the official code's bias
        assert backbone == "swin" and method == "rlrr" and all(n.endswith("downsample.reduction") for n in added_biases)
        assert sum(p.numel() for p in model.parameters()) == n_plain + sum(
            model.get_submodule(n).out_features for n in added_biases)
        return  # not a plain timm checkpoint (timm's Swin has no bias there; a strict load refuses the file)
    assert sum(p.numel() for p in model.parameters()) == n_plain  # exactly the backbone's parameters
    assert mslora.count_parameters(model)["adapter_params"] == 0
    assert_plain_backbone(model, make_model(backbone))
    # a plain timm checkpoint: timm alone loads it and gives the merged outputs
    import timm

    file = mslora.save_backbone(model, tmp_path / "merged.safetensors")
    timm_name, kwargs = SPECS[backbone]
    loaded = timm.create_model(timm_name, pretrained=True, num_classes=4, pretrained_cfg_overlay=dict(file=str(file), num_classes=4),
                               **kwargs).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), trained, rtol=1e-5, atol=1e-5)


def assert_plain_backbone(model, reference):
    """No record, no hooks, no wrapper classes: the same module tree and state-dict names as a fresh model."""
    assert set(vars(model)) == set(vars(reference))  # no record, no PEFT peft_config
    assert [(n, type(m)) for n, m in model.named_modules()] == [(n, type(m)) for n, m in reference.named_modules()]
    assert list(model.state_dict()) == list(reference.state_dict())
    for n, m in model.named_modules():
        assert not (m._forward_hooks or m._forward_pre_hooks), f"hook left on {n}"
    assert all(p.requires_grad for p in model.parameters())  # as timm makes it


@pytest.mark.parametrize("backbone,method,opts", [c for c in CASES if c[1] != "full"],
                         ids=[i for i, c in zip(IDS, CASES) if c[1] != "full"])
def test_unadapt_gives_the_original_backbone_back(backbone, method, opts):
    model = make_model(backbone).eval()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    mslora.adapt(model, method, **opts)
    train_steps(model)
    head = model.mslora_adaptation.head
    assert mslora.unadapt(model) is model
    assert_plain_backbone(model, make_model(backbone))
    for k, v in model.state_dict().items():
        if not any(k.startswith(h + ".") for h in head):  # the head keeps what it learnt (it is the task's)
            assert torch.equal(v, original[k]), k
    mslora.adapt(model, method, **opts)  # and it can be adapted again


def test_unadapt_refuses_full_fine_tuning():
    model = mslora.adapt(make_model("resnet"), "full")
    with pytest.raises(ValueError, match="trains the backbone itself"):
        mslora.unadapt(model)


def test_colora_depthwise_branch_on_convnext():
    # The filtered branch beside ConvNeXt's 7x7 depth-wise conv (CoLoRA supp. Table 8 counts): identity at start,
    # trains, unadapts, and refuses to merge (its 1x1 down-projection mixes channels).
    model = make_model("convnext").eval()
    x = sample_input(model)
    with torch.no_grad():
        plain, features = model(x), model.forward_features(x)
    mslora.adapt(model, "colora", gamma=2)
    branches = [m for m in model.modules() if type(m).__name__ == "DepthwiseBranch"]
    assert len(branches) == len(model.adapters) == 9
    with torch.no_grad():
        assert torch.equal(model(x), plain)
    train_steps(model)
    assert all(b.up.weight.abs().sum() > 0 for b in branches)
    with pytest.raises(ValueError, match="depth-wise branch .* does not merge; adapt with depthwise=False"):
        mslora.merge(model)
    mslora.unadapt(model)
    with torch.no_grad():
        assert torch.equal(model.forward_features(x), features)


def test_adapters_follow_the_model_mode():
    # adapt() on a model in eval mode: the adapters are in eval mode too (CoLoRA's filter runs only in training)
    model = mslora.adapt(make_model("convnext").eval(), "colora", gamma=2)
    assert not any(m.training for m in model.adapters.modules())
    model = mslora.adapt(make_model("vit").train(), "mona")
    assert all(m.training for m in model.adapters.modules())


def test_conv_adapter_follows_tf_same_padding():
    # TF-ported timm models (tf_*) use Conv2dSame for strided convs: padding happens in forward, not via .padding.
    import timm

    torch.manual_seed(0)
    model = timm.create_model("tf_efficientnet_lite0", num_classes=4).eval()
    x = torch.randn(1, 3, 63, 63)  # odd size: asymmetric 'same' padding
    with torch.no_grad():
        plain = model(x)
        mslora.adapt(model, "conv_adapter", gamma=32)
        assert torch.equal(model(x), plain)


def test_adaptformer_reads_the_residual_stream_and_adds_outside_drop_path():
    # AdaptFormer's released code: x + DropPath(MLP(LN(x))) + s * Up(ReLU(Down(x))), x the stream entering the MLP.
    model = make_model("vit").eval()
    block = model.blocks[0]
    x = torch.randn(2, 16 + 3, 64)
    kept = {}
    h = block.norm2.register_forward_pre_hook(lambda _m, a: kept.setdefault("x", a[0]))
    with torch.no_grad():
        plain = block(x)
    h.remove()
    mslora.adapt(model, "adaptformer")
    branch = model.adapters["blocks_0"]
    torch.nn.init.normal_(branch.up.weight)
    with torch.no_grad():
        expected = plain + 0.1 * branch.up(torch.relu(branch.down(kept["x"])))
        torch.testing.assert_close(block(x), expected)


def test_mona_two_modules_per_transformer_block_one_per_cnn_block():
    vit = mslora.adapt(make_model("vit"), "mona")
    assert list(vit.adapters)[:2] == ["blocks_0_mona1", "blocks_0_mona2"] and len(vit.adapters) == 2 * 6
    res = mslora.adapt(make_model("resnet"), "mona")
    assert list(res.adapters) == ["layer1_0", "layer2_0", "layer3_0", "layer4_0"]
    m = vit.adapters["blocks_0_mona2"]  # the released code's init
    assert torch.equal(m.gamma, torch.full_like(m.gamma, 1e-6)) and torch.equal(m.gammax, torch.ones_like(m.gammax))
    for lin in (m.project1, m.project2):  # trunc-normal(std 0.02) weights, zero biases
        assert 0.015 < lin.weight.std() < 0.025 and not lin.bias.any()
    ident = mslora.adapt(make_model("vit"), "mona", init="identity").adapters["blocks_0_mona2"]
    assert not ident.project2.weight.any() and 0.015 < ident.project1.weight.std() < 0.025


def test_rlrr_scales_q_k_v_apart_inside_the_fused_qkv():
    model = mslora.adapt(make_model("vit"), "rlrr", init="official")
    qkv = model.blocks[0].attn.qkv
    rescale = qkv.parametrizations.weight[0]
    assert rescale.s_right.shape == (3, 1, 64) and rescale.s_left.shape == (192, 1)
    w0 = qkv.weight.detach().clone()
    with torch.no_grad():
        rescale.s_right[1] += 1.0  # k's right scale only
    changed = (qkv.weight.detach() != w0).any(dim=1)
    assert not changed[:64].any() and changed[64:128].all() and not changed[128:].any()


def test_rlrr_on_cnns_uses_the_official_kernel_layout_and_leaves_batchnorm():
    model = mslora.adapt(make_model("resnet"), "rlrr")
    conv = model.layer1[0].conv1  # a 3x3 conv: the kernel is an (O k) x (I k) matrix, not O x (I k k)
    o, i, k, _ = conv.parametrizations.weight.original.shape
    rescale = conv.parametrizations.weight[0]
    assert rescale.s_left.shape == (o * k, 1) and rescale.s_right.shape == (1, 1, i * k)
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".bn" in n)
    from torch.nn.utils import parametrize

    stem = model.conv1[0]  # the stem too (supp. Table 12 counts it)
    assert parametrize.is_parametrized(stem, "weight") and isinstance(stem.parametrizations.weight[0],
                                                                      mslora.core.reparam.Rescale)


def test_colora_filter_builds_no_graph_and_passes_gradients_through():
    from mslora.methods.colora import bilateral_filter, filter_without_gradient

    z = torch.randn(1, 4, 8, 8, requires_grad=True)
    out = filter_without_gradient(z)
    torch.testing.assert_close(out, bilateral_filter(z.detach()))
    out.sum().backward()
    assert torch.equal(z.grad, torch.ones_like(z))  # identity for gradients: no graph through cos / sin



@pytest.mark.parametrize("backbone,method,opts", [("efficientnet", "rlrr", {"init": "official"}), ("vit", "ssf", {})])
def test_merging_a_copy_leaves_the_original_working(backbone, method, opts):
    model = mslora.adapt(make_model(backbone), method, **opts).eval()
    x = sample_input(model)
    with torch.no_grad():
        for p in (p for p in model.parameters() if p.requires_grad):
            p.add_(0.01 * torch.randn_like(p))  # an update that merging must carry
        before = model(x)
        merged = mslora.merge(copy.deepcopy(model))  # deepcopy shares torch's parametrized classes with the original
        torch.testing.assert_close(merged(x), before, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(model(x), before)  # the original is still parametrized and still runs
