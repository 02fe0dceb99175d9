"""mslora.adapt on small random-init timm backbones of every layout and family rule."""
import pytest
import timm
import torch

import mslora
from mslora.core.placement import find_sites
from conftest import MODELS, make_model, sample_input


@pytest.mark.parametrize("name", MODELS)
def test_identity_at_initialisation(name):
    model = make_model(name).eval()
    x = sample_input(model)
    with torch.no_grad():
        before = model(x)
        mslora.adapt(model, "mslora", rank=16, groups=4)
        after = model(x)
    assert torch.equal(before, after)


@pytest.mark.parametrize("name", MODELS)
def test_only_adapter_and_head_change_and_bn_stats_stay(name):
    model = mslora.adapt(make_model(name), "mslora", rank=16, groups=4, global_pool=True, gate=True,
                         channel_shuffle=True)
    rec = model.mslora_adaptation
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    model.train()
    x, y = sample_input(model, batch=4), torch.tensor([0, 1, 2, 3])
    for _ in range(3):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    after = model.state_dict()
    head = tuple(rec.head)
    for k, v in before.items():
        in_head = any(k.startswith(h + ".") for h in head)
        if k not in rec.added and not in_head:  # backbone weights and BatchNorm statistics
            assert torch.equal(v, after[k]), f"backbone tensor {k} changed"
        elif v.is_floating_point():  # every adapter and head tensor trains
            assert not torch.equal(v, after[k]), f"trainable tensor {k} did not change"
    assert rec.added and all(k.startswith("adapters.") for k in rec.added)


def test_bn_normalises_with_running_stats_in_train_mode():
    model = mslora.adapt(make_model("resnet"), "mslora", rank=16)
    x = sample_input(model)
    model.train()
    with torch.no_grad():
        a = model(x)
    model.eval()
    with torch.no_grad():
        b = model(x)
    torch.testing.assert_close(a, b)  # test_resnet has no dropout/droppath: train == eval when BN is frozen


def test_full_fine_tuning_trains_everything_and_updates_bn():
    model = mslora.adapt(make_model("resnet"), "full")
    bn = model.bn1
    mean = bn.running_mean.clone()
    assert all(p.requires_grad for p in model.parameters())
    model.train()
    model(sample_input(model))
    assert not torch.equal(mean, bn.running_mean)
    c = mslora.count_parameters(model)
    assert c["trainable_params"] == c["total_params"] and c["adapter_params"] == 0


def test_linear_probe_trains_only_the_head():
    model = mslora.adapt(make_model("vit"), "linear")
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == ["head.weight", "head.bias"]
    c = mslora.count_parameters(model)
    assert c["trainable_params"] == c["head_params"] == 4 * 64 + 4


@pytest.mark.parametrize("name", MODELS)
def test_counts_partition_the_model(name):
    model = make_model(name)
    plain = mslora.count_parameters(model)
    mslora.adapt(model, "mslora", rank=16)
    c = mslora.count_parameters(model)
    assert c["backbone_params"] == plain["backbone_params"] and c["head_params"] == plain["head_params"]
    assert c["total_params"] == c["backbone_params"] + c["head_params"] + c["adapter_params"]
    assert c["trainable_params"] == c["adapter_params"] + c["head_params"]  # the head is counted once
    assert c["total_params"] == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name,kind,n_sites", [("resnet", "nchw", 4), ("vit", "tokens", 6), ("convnext", "nchw", 9),
                                               ("efficientnet", "nchw", 5), ("swin", "nhwc", 2)])
def test_placement_rules(name, kind, n_sites):
    model = make_model(name)
    sites = find_sites(model)
    assert len(sites) == n_sites and {s.layout.kind for s in sites} == {kind}
    if name == "resnet":  # inside the blocks at the bottleneck width (Fig. 2 right)
        assert [s.name for s in sites] == ["layer1.0.act1", "layer2.0.act1", "layer3.0.act2", "layer4.0.act1"]
        assert sites[2].channels == model.layer3[0].conv2.out_channels
    if name == "vit":
        assert sites[0].layout.num_prefix_tokens == 3  # class token + 2 register tokens pass through


def test_pre_norm_families_get_input_layernorm():
    vit = mslora.adapt(make_model("vit"), "mslora", rank=16)
    res = mslora.adapt(make_model("resnet"), "mslora", rank=16)
    assert type(vit.adapters["blocks_0"].norm).__name__ == "LayerNorm2d"
    assert isinstance(res.adapters["layer1_0_act1"].norm, torch.nn.Identity)


def test_target_modules_override():
    model = mslora.adapt(make_model("resnet"), "mslora", rank=16, target_modules=r"layer[34]\.0")
    assert list(model.adapters) == ["layer3_0", "layer4_0"]
    with pytest.raises(ValueError, match="matches no module"):
        mslora.adapt(make_model("resnet"), "mslora", target_modules="nothing\\.here")


def test_model_without_blocks_needs_target_modules():
    class Plain(torch.nn.Module):  # no family, no group_matcher, no feature_info
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 8, 3)

        def forward(self, x):
            return self.conv(x)

    with pytest.raises(ValueError, match="pass target_modules"):
        mslora.adapt(Plain(), "mslora")


def test_groups_not_dividing_channels_names_the_layer():
    with pytest.raises(ValueError, match=r"groups=3 must divide in_channels=\d+ of layer"):
        mslora.adapt(make_model("resnet"), "mslora", rank=24, groups=3)


def test_registry_errors():
    with pytest.raises(ValueError, match="did you mean mslora"):
        mslora.adapt(make_model("resnet"), "msl0ra")
    with pytest.raises(ValueError, match="unknown option.*rnak"):
        mslora.adapt(make_model("resnet"), "mslora", rnak=4)
    model = mslora.adapt(make_model("resnet"), "linear")
    with pytest.raises(ValueError, match="already adapted"):
        mslora.adapt(model, "mslora")
    assert {"mslora", "linear", "full"} <= set(mslora.list_methods())


def test_counts_survive_deepcopy():
    import copy

    model = mslora.adapt(make_model("resnet"), "mslora", rank=16)
    assert mslora.count_parameters(copy.deepcopy(model)) == mslora.count_parameters(model)


def test_merge():
    with pytest.raises(ValueError, match="cannot be merged: its update depends nonlinearly"):
        mslora.merge(mslora.adapt(make_model("resnet"), "mslora", rank=16))
    model = mslora.adapt(make_model("resnet"), "linear")
    assert mslora.merge(model) is model


@pytest.mark.parametrize("name", MODELS)
def test_adapter_file_round_trip_is_exact(name, tmp_path):
    model = mslora.adapt(make_model(name, seed=0), "mslora", rank=16, gate=True)
    with torch.no_grad():  # stand-in for training: every trainable tensor moves
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    model.eval()
    x = sample_input(model)
    with torch.no_grad():
        ref = model(x)
    path = mslora.save_adapter(model, tmp_path / "a.safetensors")
    fresh = make_model(name, seed=0)  # the same backbone weights, untouched head
    mslora.load_adapter(fresh, path).eval()
    with torch.no_grad():
        assert torch.equal(fresh(x), ref)
    assert fresh.mslora_adaptation.config == model.mslora_adaptation.config


def test_adapter_file_holds_adapter_and_head_only(tmp_path):
    from safetensors import safe_open

    model = mslora.adapt(make_model("resnet"), "mslora", rank=16)
    path = mslora.save_adapter(model, tmp_path / "a.safetensors", {"note": "x"})
    with safe_open(str(path), "pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    assert keys == {n for n, p in model.named_parameters() if p.requires_grad}
    assert meta["method"] == "mslora" and '"rank": 16' in meta["config"] and meta["note"] == '"x"'


def test_load_adapter_rejects_other_head_size(tmp_path):
    model = mslora.adapt(make_model("resnet"), "mslora", rank=16)
    path = mslora.save_adapter(model, tmp_path / "a.safetensors")
    other = timm.create_model("test_resnet", num_classes=7)  # the same backbone weights, another head
    other.load_state_dict({k: v for k, v in make_model("resnet").state_dict().items() if not k.startswith("fc.")},
                          strict=False)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    for _ in range(2):  # a failed load changes nothing: the retry fails the same way, not "already adapted"
        with pytest.raises(ValueError, match=r"'fc\.(weight|bias)' has shape \(4"):
            mslora.load_adapter(other, path)
        assert mslora.adaptation(other) is None and not hasattr(other, "adapters")
        assert other.state_dict().keys() == before.keys()
        assert all(torch.equal(v, before[k]) for k, v in other.state_dict().items())
        assert not other._forward_hooks and all(not m._forward_hooks for m in other.modules())
    fresh = timm.create_model("test_resnet", num_classes=4)
    fresh.load_state_dict(make_model("resnet").state_dict())
    for method in ("full", "rlrr", "lora"):  # every kind of method: undone after a failed load
        bad = mslora.save_adapter(mslora.adapt(make_model("resnet"), method), tmp_path / f"{method}.safetensors")
        with pytest.raises(ValueError):
            mslora.load_adapter(other, bad)
        assert mslora.adaptation(other) is None
        assert all(torch.equal(v, before[k]) for k, v in other.state_dict().items())
    assert mslora.adaptation(mslora.load_adapter(fresh, path)).method == "mslora"  # the right model still loads


def test_class_token_pooling_leaves_last_block_adapter_without_gradient():
    # Prefix tokens pass through MSLoRA unchanged, so after the last block of a class-token ViT the
    # adapted patch tokens never reach the logits: documented in the README, pinned here.
    torch.manual_seed(0)
    model = mslora.adapt(timm.create_model("test_vit", num_classes=4, global_pool="token"), "mslora", rank=16,
                         zero_init=False)
    torch.nn.functional.cross_entropy(model(sample_input(model)), torch.tensor([0, 1])).backward()
    last, before = model.adapters["blocks_5"].up.weight.grad, model.adapters["blocks_4"].up.weight.grad
    assert last is None or not last.any()
    assert before.abs().sum() > 0
