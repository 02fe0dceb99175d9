"""PEFT's adapter format both ways (mslora.core.peft_format), checked against PEFT's own PeftModel."""
import copy

import pytest
import timm
import torch
from peft import LoraConfig, PeftModel, get_peft_model

import mslora
from mslora.core.peft_format import export_peft, import_peft


def _perturbed(model):
    with torch.no_grad():  # LoRA's B starts at zero: give every trained tensor a value to carry
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("backbone,method", [("test_vit", "lora"), ("test_vit", "dora"), ("test_vit", "hira"),
                                            ("test_resnet", "lora")])
def test_export_loads_in_peft_with_the_same_outputs(backbone, method, tmp_path):
    torch.manual_seed(0)
    base = timm.create_model(backbone, num_classes=3).eval()
    ours = _perturbed(mslora.adapt(copy.deepcopy(base), method)).eval()
    x = torch.randn(2, 3, 32, 32)
    export_peft(ours, tmp_path / "peft")
    theirs = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "peft")).eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(x), ours(x))
        assert not torch.allclose(base(x), ours(x))  # the adapter and head changed the outputs
    with pytest.raises(ValueError, match="exists and is not empty"):
        export_peft(ours, tmp_path / "peft")


def test_import_from_peft_gives_the_same_outputs(tmp_path):
    torch.manual_seed(0)
    base = timm.create_model("test_vit", num_classes=3).eval()
    theirs = _perturbed(get_peft_model(copy.deepcopy(base), LoraConfig(
        r=4, lora_alpha=8, target_modules=["qkv", "fc2"], modules_to_save=["head"]))).eval()
    theirs.save_pretrained(str(tmp_path / "peft"))
    ours = import_peft(copy.deepcopy(base), tmp_path / "peft").eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x))
    rec = mslora.adaptation(ours)
    assert rec.method == "lora" and rec.config.rank == 4 and rec.config.alpha == 8
    other = timm.create_model("test_vit", num_classes=5)
    for _ in range(2):  # a failed import changes nothing: the retry fails the same way
        with pytest.raises(ValueError, match="do not fit this model's head"):
            import_peft(other, tmp_path / "peft")
        assert mslora.adaptation(other) is None and "lora" not in str(other)
    (tmp_path / "peft" / "adapter_model.safetensors").write_bytes(b"truncated")
    with pytest.raises(ValueError, match="is not a readable safetensors file"):
        import_peft(other, tmp_path / "peft")
    assert mslora.adaptation(other) is None
    with pytest.raises(ValueError, match="no Linear/Conv2d module of ResNet matches target_modules"):
        import_peft(timm.create_model("test_resnet", num_classes=3), tmp_path / "peft")


def test_interchange_refusals(tmp_path):
    with pytest.raises(ValueError, match="adapted with 'mslora'; PEFT's format holds lora, dora, hira"):
        export_peft(mslora.adapt(timm.create_model("test_resnet"), "mslora", rank=8), tmp_path / "x")
    with pytest.raises(FileNotFoundError, match="not a PEFT adapter folder"):
        import_peft(timm.create_model("test_resnet"), tmp_path)


@pytest.mark.parametrize("method,config", [
    ("dora", lambda: LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=["qkv", "fc1"], modules_to_save=["head"])),
    ("hira", lambda: __import__("peft").HiraConfig(r=4, target_modules=["qkv", "fc1"], modules_to_save=["head"])),
])
def test_import_of_dora_and_hira_gives_peft_outputs(method, config, tmp_path):
    torch.manual_seed(0)
    base = timm.create_model("test_vit", num_classes=3).eval()
    theirs = _perturbed(get_peft_model(copy.deepcopy(base), config())).eval()
    theirs.save_pretrained(str(tmp_path / "peft"))
    ours = import_peft(copy.deepcopy(base), tmp_path / "peft").eval()
    assert mslora.adaptation(ours).method == method and mslora.adaptation(ours).config.rank == 4
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x))
        assert not torch.allclose(ours(x), base(x))


def test_pissa_is_refused_both_ways(tmp_path):
    with pytest.raises(ValueError, match="adapted with 'pissa'.*PiSSA rewrites the backbone's weights"):
        export_peft(mslora.adapt(timm.create_model("test_vit"), "pissa"), tmp_path / "x")
    torch.manual_seed(0)
    peft_model = get_peft_model(timm.create_model("test_vit", num_classes=3), LoraConfig(
        r=4, target_modules=["qkv"], init_lora_weights="pissa"))
    peft_model.save_pretrained(str(tmp_path / "pissa"))
    fresh = timm.create_model("test_vit", num_classes=3)
    with pytest.raises(ValueError, match="PiSSA adapter needs the backbone weights it rewrote"):
        import_peft(fresh, tmp_path / "pissa")
    assert mslora.adaptation(fresh) is None  # refused before anything was changed
