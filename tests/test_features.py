"""Multi-scale features of adapted timm backbones for dense heads: timm's forward_intermediates with the adapters
in place, ViTDet's simple feature pyramid for plain ViTs, and non-square images."""
import pytest
import timm
import torch

import mslora
from mslora.backbones import Features

SWIN = dict(embed_dim=16, depths=(1, 1), num_heads=(1, 2), img_size=64, window_size=4, strict_img_size=False)


@pytest.mark.parametrize("name,kw,strides", [
    ("test_vit", dict(dynamic_img_size=True), [4, 8, 16, 32]),  # one stride: simple feature pyramid
    ("test_resnet", dict(zero_init_last=False), [4, 8, 16, 32]),
    ("test_convnext", {}, [4, 8, 16, 32]),
    ("swin_tiny_patch4_window7_224", SWIN, [4, 8]),
    ("test_efficientnet", {}, [4, 8, 16, 32]),
])
def test_maps_of_non_square_images_with_adapters_in_place(name, kw, strides):
    model = mslora.adapt(timm.create_model(name, num_classes=0, **kw), "mslora", rank=16, zero_init=False)
    features = Features(model)
    assert features.strides == strides
    x = torch.randn(2, 3, 64, 96)
    maps = features(x)
    assert [tuple(m.shape) for m in maps.values()] == [(2, c, 64 // s, 96 // s) for c, s in zip(features.channels, strides)]
    sum(m.float().pow(2).mean() for m in maps.values()).backward()
    for key, adapter in model.adapters.items():  # every adapter is on the path to the maps (ViT: all blocks)
        assert adapter.up.weight.grad is not None and adapter.up.weight.grad.abs().sum() > 0, key
    assert not any(p.grad is not None for n, p in model.named_parameters() if not n.startswith("adapters."))


def test_vit_adapters_see_the_true_grid_of_a_non_square_image():
    model = mslora.adapt(timm.create_model("test_vit", num_classes=0, dynamic_img_size=True), "mslora", rank=16)
    seen = []
    model.adapters["blocks_0"].trans.paths[0].register_forward_hook(lambda m, a, o: seen.append(tuple(a[0].shape[-2:])))
    Features(model)(torch.randn(1, 3, 160, 96))  # 10 x 6 patches of 16 px, not a square
    model(torch.randn(1, 3, 96, 160))  # and through the classifier's forward: 6 x 10
    assert seen == [(10, 6), (6, 10)]


def test_features_refuse_a_model_without_timms_feature_api():
    with pytest.raises(ValueError, match="no forward_intermediates / feature_info"):
        Features(torch.nn.Conv2d(3, 8, 3))
    with pytest.raises(ValueError, match=r"out_indices \[9\] are outside"):
        Features(timm.create_model("test_resnet"), out_indices=[9])
