"""Automatic placement on every timm family (issue 7): the family table, the generic rule, sites measured by a
probe at two input sizes, adapters outside the modules they act on (run once per forward)."""
import sys
from pathlib import Path

import pytest
import timm
import torch

import mslora
from mslora.core.placement import blocks, find_sites

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from placement_sweep import check, run  # noqa: E402

# One small variant per timm family (model module), random init: MSLoRA adapts each automatically and passes
# every check (identity at start, gradients reach every adapter, BatchNorm statistics fixed, one run per forward).
ADAPTS = [
    "test_efficientnet", "test_mambaout", "test_resnet", "test_vit", "test_byobnet", "dla46x_c", "edgenext_xx_small",
    "fasternet_t0", "test_coatnet", "test_nfnet", "resnest14d", "starnet_s050", "ese_vovnet19b_slim_dw",
    "test_convnext", "cs3darknet_focus_s", "efficientvit_b0", "efficientvit_m0", "hgnetv2_b0", "inception_next_atto",
    "lcnetv2_small", "mobilenetv3_small_050", "regnetx_002", "resnetv2_18", "legacy_seresnet18", "shvit_s1",
    "skresnet18", "swiftformer_xs", "test_vit_relpos", "vit_tiny_patch16_dinov3_qkvb", "fastvit_t8", "levit_128s",
    "poolformerv2_s12", "mobilevit_xxs", "vit_tiny_r_s16_p8_224", "xception41p", "cspnext_tiny",
    "deit_tiny_patch16_224", "efficientformerv2_s0", "hardcorenas_b", "hrnet_w18_small", "iformer_t", "pvt_v2_b0",
    "repghostnet_050", "tiny_vit_5m_224", "visformer_tiny", "legacy_xception", "xcit_nano_12_p8_224", "ghostnet_050",
    "repvit_m1", "res2next50", "cpubone_nano", "focalnet_tiny_srf", "rdnet_tiny", "densenet121", "gcvit_xxtiny",
    "crossvit_tiny_240", "test_maxvit",
    "eva02_tiny_patch14_224",  # patch 14: probed at two patches more (252 px), not 32 px (256: no grid)
    # blocks returning a tuple or list, adapted on their feature tensor: MViTv2 (x, feat_size), TNT (pixel_embed,
    # patch_embed), SelecSLS lists; PiT by its inner blocks (the family table); NesT's (B, T, N, C) blocks
    "mvitv2_tiny", "tnt_s_legacy_patch16_224", "selecsls42b", "pit_ti_224", "nest_tiny",
]
# Refusals: a ValueError saying why.
REFUSES = {
    "hiera_tiny_224": "not in raster order",  # Hiera's unrolled token order: no grid for depth-wise convs
    "rexnet_100": "groups=4 must divide in_channels=27 .*groups=1 always does",
}


def test_sweep_covers_at_least_50_families():
    from timm.models import _registry

    assert len({_registry._model_to_module[m] for m in ADAPTS}) >= 50


@pytest.mark.parametrize("name", ADAPTS)
def test_mslora_adapts_automatically(name):
    row = run(name, "mslora")
    assert row["status"] == "ok", row


@pytest.mark.parametrize("name,reason", REFUSES.items())
def test_mslora_refuses_with_a_reason(name, reason):
    row = run(name, "mslora")
    assert row["status"] == "refused", row
    assert __import__("re").search(reason, row["reason"]), row["reason"]


@pytest.mark.parametrize("name,kind", [("test_mambaout", "nhwc"), ("swin_tiny_patch4_window7_224", "nhwc"),
                                       ("test_convnext", "nchw"), ("test_vit", "tokens")])
def test_layout_is_measured(name, kind):
    kw = dict(embed_dim=16, depths=(1, 1), num_heads=(1, 2), img_size=64, window_size=4) if "swin" in name else {}
    sites = find_sites(timm.create_model(name, **kw))
    assert {s.layout.kind for s in sites} == {kind}


def test_mixed_layouts_and_per_site_prefix_tokens():
    # TinyViT: a conv stage (NCHW) then NHWC stages; CaiT's patch blocks carry no class token although the
    # model has one (it joins in the class-attention blocks): the prefix count is measured per site.
    kinds = [s.layout.kind for s in find_sites(timm.create_model("tiny_vit_5m_224"))]
    assert kinds[0] == "nchw" and "nhwc" in kinds
    cait = timm.create_model("cait_xxs24_224", depth=2)
    assert [s.layout.num_prefix_tokens for s in find_sites(cait)] == [0, 0] and cait.num_prefix_tokens == 1
    assert find_sites(timm.create_model("test_vit", reg_tokens=2))[0].layout.num_prefix_tokens == 3


def test_samvit_nhwc_blocks_are_not_read_as_nchw():
    # SAM ViT blocks output (B, H, W, C): at 14x14 the old rule read the height 14 as the channels.
    model = timm.create_model("samvit_base_patch16_224", depth=2, embed_dim=64, num_heads=2, global_attn_indexes=())
    sites = find_sites(model)
    assert {(s.layout.kind, s.channels) for s in sites} == {("nhwc", 64)}
    assert check(model, "mslora", rank=16) == "ok"


def test_hiera_tokens_refused_by_spatial_methods_taken_by_pointwise_ones():
    model = timm.create_model("hiera_tiny_224", stages=(1, 1, 1, 1))
    assert not find_sites(model)[0].layout.spatial
    with pytest.raises(ValueError, match="not in raster order"):
        mslora.adapt(model, "mslora")
    with pytest.raises(ValueError, match="not in raster order"):
        mslora.adapt(timm.create_model("hiera_tiny_224", stages=(1, 1, 1, 1)), "mona")
    assert check(timm.create_model("hiera_tiny_224", stages=(1, 1, 1, 1)), "adapter") == "ok"


def test_container_targets_run_their_adapter_once():
    # target_modules naming nn.Sequential stages: the adapter is stored outside them, so it runs once.
    model = timm.create_model("test_resnet", num_classes=4, zero_init_last=False)
    assert check(model, "mslora", rank=16, target_modules=r"layer\d") == "ok"
    assert list(model.adapters) == ["layer1", "layer2", "layer3", "layer4"]
    assert not any("adapters" in n for n, _ in model.layer1.named_modules())


def test_input_norm_follows_block_structure_for_regex_placements():
    vit = mslora.adapt(timm.create_model("test_vit"), "mslora", rank=16, target_modules=r"blocks\.[01]")
    res = mslora.adapt(timm.create_model("test_resnet"), "mslora", rank=16, target_modules=r"layer1\.0")
    assert type(vit.adapters["blocks_0"].norm).__name__ == "LayerNorm2d"  # the block starts with norm1
    assert isinstance(res.adapters["layer1_0"].norm, torch.nn.Identity)  # it starts with conv1


def test_modules_that_return_tuples_get_a_correct_message():
    with pytest.raises(ValueError, match=r"'stage2\.0' returns a list of 2 without exactly one new "
                       r"\(batch, \.\.\.\) feature tensor, not one feature map; pass target_modules"):
        mslora.adapt(timm.create_model("hrnet_w18_small"), "mslora", target_modules=r"stage2\.0")


@pytest.mark.parametrize("name", ["vit_tiny_patch16_dinov3_qkvb", "test_vit_relpos"])
def test_vpt_refuses_relative_and_rotary_position_embeddings(name):
    with pytest.raises(ValueError, match=r"vpt does not apply to .*(rotary|relative) position"):
        mslora.adapt(timm.create_model(name), "vpt")


@pytest.mark.parametrize("method", ["lora", "rlrr", "ssf", "adapter", "lorand", "mona", "hira"])
def test_layer_methods_use_the_generic_rule(method):
    # MambaOut is in no family table: its blocks come from timm's group_matcher for every method.
    model = timm.create_model("test_mambaout", num_classes=4)
    names = blocks(model)
    assert names and all(n.startswith("stages.") for n in names)
    mslora.adapt(model, method)
    assert mslora.count_parameters(model)["adapter_params"] > 0


def test_res2net_and_sk_resnet_sites_inside_blocks():
    # Blocks that share ResNet's class but lack act2 / act1: the site is the input of conv3 / conv2.
    res2 = find_sites(timm.create_model("res2next50"))
    assert res2[0].name == "layer1.0.conv3" and res2[0].on_input and res2[0].channels == 128
    sk = find_sites(timm.create_model("skresnet18"))
    assert sk[0].name == "layer1.0.conv2" and sk[0].on_input


@pytest.mark.parametrize("method,name,match", [
    ("conv_adapter", "test_vit", "beside spatial convolutions .* no Conv2d module of VisionTransformer is inside its blocks"),
    ("colora", "test_vit", "colora adapts adjacent 1x1 layers .* VisionTransformer has none"),
    ("adaptformer", "test_resnet", "adaptformer needs blocks with an MLP of Linear layers"),
    ("vpt", "test_mambaout", "vpt does not apply to MambaOut"),
])
def test_methods_refuse_where_their_design_does_not_apply(method, name, match):
    with pytest.raises(ValueError, match=match):
        mslora.adapt(timm.create_model(name), method)


def test_nest_blocks_read_as_nests_own_deblockify():
    from timm.models.nest import blockify, deblockify

    from mslora.core.layout import Layout

    model = timm.create_model("nest_tiny", num_classes=4)
    sites = find_sites(model)
    assert {s.layout.kind for s in sites} == {"blocks"} and {s.layout.block_size for s in sites} == {14}
    x = torch.randn(2, 16, 196, 8)  # 4 x 4 blocks of 14 x 14 tokens, 8 channels
    maps, prefix = sites[0].layout.to_2d(x)
    assert prefix is None and maps.shape == (2, 8, 56, 56)
    assert torch.equal(maps, deblockify(x, 14).permute(0, 3, 1, 2))
    assert torch.equal(sites[0].layout.from_2d(maps, None), blockify(deblockify(x, 14), 14))
    with pytest.raises(ValueError, match="12 blocks do not form a square grid"):
        Layout("blocks", block_size=14).to_2d(torch.randn(1, 12, 196, 8))


def test_tuple_outputs_adapt_the_batch_feature_tensor_and_pass_the_rest():
    # TNT blocks return (pixel_embed (B * N, 16, C'), patch_embed (B, N + 1, C)): the batch's tensor is the second
    model = timm.create_model("tnt_s_legacy_patch16_224", depth=2, num_classes=4)
    sites = find_sites(model)
    assert [s.item for s in sites] == [1, 1] and sites[0].layout.num_prefix_tokens == 1
    mslora.adapt(model, "mslora", rank=8)
    with torch.no_grad():
        for p in model.adapters.parameters():
            p.add_(0.1)
    seen = []
    model.blocks[0].register_forward_hook(lambda m, a, out: seen.append(out))  # after the adapter's hook
    x = torch.randn(2, 3, 224, 224)
    model.eval()(x)
    pixel, patch = seen[0]
    assert pixel.shape[0] == 2 * 196 and patch.shape == (2, 197, 384)  # both still there, in order
    mod = model.adapters["blocks_0"]
    mslora.unadapt(model)
    model(x)
    assert torch.equal(pixel, seen[1][0])  # the other element passes through
    assert not torch.allclose(patch, seen[1][1], atol=1e-3)
    assert torch.allclose(patch, mod(seen[1][1]), atol=1e-5)  # the adapted one went through the adapter


def test_mona_takes_one_module_where_a_block_reshapes_its_shortcut():
    # MViTv2 blocks that pool or project their shortcut cannot add Mona's first module between the sub-blocks
    model = timm.create_model("mvitv2_tiny", num_classes=4)
    mslora.adapt(model, "mona")
    for name in blocks(model):
        block = model.get_submodule(name)
        plain = block.shortcut_proj_attn is None and block.shortcut_pool_attn is None
        assert (name.replace(".", "_") + "_mona1" in model.adapters) == plain, name
    assert model(torch.randn(1, 3, 224, 224)).shape == (1, 4)
