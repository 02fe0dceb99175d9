"""Option validation, adapter files and checkpoints that are damaged, altered, of another version or unsafe, and
`mslora merge` writing a checkpoint that timm alone loads."""
import json
import pickle

import pytest
import timm
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import mslora
from conftest import make_model, sample_input
from mslora.cli import main
from mslora.engine.checkpoint import load_checkpoint, save_checkpoint


@pytest.mark.parametrize("method,options,match", [
    ("adapter", {"rank": 0}, "rank=0 must be a positive integer"),
    ("adaptformer", {"rank": -1}, "rank=-1 must be a positive integer"),
    ("lorand", {"hidden": 0}, "hidden=0 must be a positive integer"),
    ("lorand", {"kernel": 0}, "kernel=0 must be a positive integer"),
    ("conv_adapter", {"gamma": 0}, "gamma=0 must be a positive integer"),
    ("colora", {"shared_ratio": 1.5}, "shared_ratio=1.5 must be in [0, 1]"),
    ("colora", {"sigma": 0.0}, "sigma=0.0 must be positive"),
    ("lora", {"dropout": 1.0}, "dropout=1.0 must be in [0, 1)"),
    ("mslora", {"rank": "8"}, "option rank='8' of method 'mslora' must be of type int"),
    ("mslora", {"kernel_sizes": (3, 4)}, "kernel_sizes=[3, 4] must be a non-empty list of odd sizes"),
    ("mslora", {"enhance": 1}, "option enhance=1 of method 'mslora' must be of type bool"),
    ("vpt", {"num_tokens": 0}, "num_tokens=0 must be a positive integer"),
])
def test_invalid_options_name_the_option(method, options, match):
    with pytest.raises(ValueError, match=match.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        mslora.adapt(make_model("resnet"), method, **options)


@pytest.fixture
def adapter_file(tmp_path):
    model = mslora.adapt(make_model("resnet"), "mslora", rank=8)
    return mslora.save_adapter(model, tmp_path / "a.safetensors", {"note": "x"})


def rewrite(path, out, tensors=None, **meta):
    with safe_open(str(path), framework="pt") as f:
        t = {k: f.get_tensor(k) for k in f.keys()}
        m = dict(f.metadata())
    m.update(meta)
    save_file(tensors if tensors is not None else t, str(out), metadata={k: v for k, v in m.items() if v is not None})
    return out


def test_reserved_metadata_cannot_be_overwritten(tmp_path):
    model = mslora.adapt(make_model("resnet"), "mslora", rank=8)
    for key in ("format", "method", "config"):
        with pytest.raises(ValueError, match=f"{key} are reserved"):
            mslora.save_adapter(model, tmp_path / "a.safetensors", {key: "lora"})
    assert not (tmp_path / "a.safetensors").exists()


def test_damaged_altered_or_foreign_adapter_files_give_one_clear_error(adapter_file, tmp_path):
    data = adapter_file.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="is not a safetensors file"):
        mslora.load_adapter(make_model("resnet"), tmp_path / "cut.safetensors")
    with safe_open(str(adapter_file), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    k = sorted(tensors)[0]
    tensors[k] = tensors[k] + 1  # altered values, metadata kept
    rewrite(adapter_file, tmp_path / "altered.safetensors", tensors)
    with pytest.raises(ValueError, match="was altered"):
        mslora.load_adapter(make_model("resnet"), tmp_path / "altered.safetensors")
    rewrite(adapter_file, tmp_path / "old.safetensors", format="mslora.adapter/0")
    with pytest.raises(ValueError, match="written by another version of mslora"):
        mslora.load_adapter(make_model("resnet"), tmp_path / "old.safetensors")
    with safe_open(str(adapter_file), framework="pt") as f:
        cfg = json.loads(f.metadata()["config"])
    extra = rewrite(adapter_file, tmp_path / "extra.safetensors", config=json.dumps({**cfg, "ranks": 3}))
    with pytest.raises(ValueError, match="unknown option.s. ranks for method 'mslora'"):
        mslora.load_adapter(make_model("resnet"), extra)
    del cfg["groups"]
    missing = rewrite(adapter_file, tmp_path / "missing.safetensors", config=json.dumps(cfg))
    with pytest.raises(ValueError, match="lacks option.s. groups of method 'mslora'"):
        mslora.load_adapter(make_model("resnet"), missing)
    nometh = rewrite(adapter_file, tmp_path / "nometh.safetensors", method=None)
    with pytest.raises(ValueError, match="lacks its method metadata"):
        mslora.load_adapter(make_model("resnet"), nometh)


def test_checkpoints_are_read_safely(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"trainable": {"w": torch.ones(3)}, "step": 4})
    assert load_checkpoint(path)["step"] == 4
    data = path.read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or damaged"):
        load_checkpoint(tmp_path / "cut.pt")

    class Payload:
        def __reduce__(self):
            return (print, ("code ran",))

    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump({"format": "mslora.checkpoint/1", "x": Payload()}, f)
    with pytest.raises(ValueError, match="needs code execution to load .refused."):
        load_checkpoint(tmp_path / "evil.pt")
    torch.save({"x": 1}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="is not an mslora checkpoint"):
        load_checkpoint(tmp_path / "other.pt")


def test_saving_a_merged_model_as_an_adapter_says_what_to_do(tmp_path):
    model = mslora.merge(mslora.adapt(make_model("resnet"), "lora"))
    with pytest.raises(ValueError, match="save it with mslora.save_backbone"):
        mslora.save_adapter(model, tmp_path / "a.safetensors")


def test_merge_cli_writes_a_plain_timm_checkpoint(image_folder, tmp_path, capsys):
    out = tmp_path / "runs"
    assert main(["train", "--backbone", "test_resnet", "--no-pretrained", "--method", "lora", "--rank", "2",
                 "--epochs", "1", "--batch-size", "4", "--img-size", "32", "--data", str(image_folder), "--lr", "0.05",
                 "--output", str(out), "--device", "cpu"]) == 0
    (run,) = out.iterdir()
    target = tmp_path / "merged.safetensors"
    assert main(["merge", "--adapter", str(run), "--output", str(target)]) == 0
    assert main(["merge", "--adapter", str(run), "--output", str(target)]) == 2  # never overwrites
    assert "exists" in capsys.readouterr().err
    plain = timm.create_model("test_resnet", pretrained=True, num_classes=3,
                              pretrained_cfg_overlay=dict(file=str(target), num_classes=3)).eval()
    torch.manual_seed(0)
    adapted = mslora.load_adapter(timm.create_model("test_resnet", num_classes=3), run / "adapter.safetensors").eval()
    x = sample_input(plain, batch=2)
    with torch.no_grad():
        torch.testing.assert_close(plain(x), adapted(x), rtol=1e-5, atol=1e-5)
    assert main(["merge", "--adapter", str(run), "--output", str(tmp_path / "m.pt")]) == 2
    assert "must end in .safetensors" in capsys.readouterr().err
    # a folder in timm's own Hugging Face layout: timm alone loads the head, the labels and the preprocessing
    assert main(["merge", "--adapter", str(run), "--output", str(tmp_path / "hf")]) == 0
    hf = timm.create_model(f"local-dir:{tmp_path / 'hf'}", pretrained=True).eval()
    assert hf.num_classes == 3 and hf.pretrained_cfg["label_names"] == ["ant", "bee", "cat"]
    assert hf.pretrained_cfg["input_size"] == (3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(hf(x), adapted(x), rtol=1e-5, atol=1e-5)


def test_merge_cli_refuses_a_method_that_cannot_merge(image_folder, tmp_path, capsys):
    out = tmp_path / "runs"
    assert main(["train", "--backbone", "test_resnet", "--no-pretrained", "--rank", "8", "--epochs", "1",
                 "--batch-size", "4", "--img-size", "32", "--data", str(image_folder), "--output", str(out)]) == 0
    (run,) = out.iterdir()
    capsys.readouterr()
    assert main(["merge", "--adapter", str(run), "--output", str(tmp_path / "m.safetensors")]) == 2
    assert "'mslora' cannot be merged" in capsys.readouterr().err
    assert not (tmp_path / "m.safetensors").exists()


def test_weights_files_that_need_code_execution_are_refused(tmp_path):
    from mslora.backbones import create_backbone

    class Payload:
        def __reduce__(self):
            return (print, ("code ran",))

    torch.save({"x": Payload()}, tmp_path / "evil.pth")
    with pytest.raises(ValueError, match="needs code execution to load .refused."):
        create_backbone("test_resnet", 3, weights=str(tmp_path / "evil.pth"))


def test_version_2_files_load_with_their_old_tensor_names(adapter_file, tmp_path):
    # Before issue 7 an adapter was a child of its site: 'layer1.0.act1.mslora.proj.weight'; now it lives in
    # model.adapters: 'adapters.layer1_0_act1.proj.weight'. A version-2 file is read with its names translated.
    from mslora.core.state import tensor_digest as _digest

    with safe_open(str(adapter_file), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    sites = {"layer1_0_act1": "layer1.0.act1", "layer2_0_act1": "layer2.0.act1", "layer3_0_act2": "layer3.0.act2",
             "layer4_0_act1": "layer4.0.act1"}
    old = {}
    for k, v in tensors.items():
        if k.startswith("adapters."):
            key, _, rest = k[len("adapters."):].partition(".")
            k = f"{sites[key]}.mslora.{rest}"
        old[k] = v
    assert any(k.startswith("layer1.0.act1.mslora.") for k in old)
    v2 = rewrite(adapter_file, tmp_path / "v2.safetensors", old, format="mslora.adapter/2", sha256=_digest(old))
    model = mslora.load_adapter(make_model("resnet"), v2)
    for k, v in tensors.items():
        assert torch.equal(model.state_dict()[k], v)
    # version 1: the same old names and no checksum (it had none), nor the backbone and version keys
    v1 = rewrite(adapter_file, tmp_path / "v1.safetensors", old, format="mslora.adapter/1", sha256=None,
                 backbone=None, backbone_sha256=None, mslora_version=None, note=None)
    with safe_open(str(v1), framework="pt") as f:
        assert set(f.metadata()) == {"format", "method", "config"}
    model = mslora.load_adapter(make_model("resnet"), v1)
    for k, v in tensors.items():
        assert torch.equal(model.state_dict()[k], v)
    # a version-2 file without its checksum is refused (only version 1 lacked one)
    nosum = rewrite(adapter_file, tmp_path / "nosum.safetensors", old, format="mslora.adapter/2", sha256=None)
    with pytest.raises(ValueError, match="was altered"):
        mslora.load_adapter(make_model("resnet"), nosum)


def test_adapter_files_carry_backbone_and_version_and_refuse_another_backbone(tmp_path):
    model = mslora.adapt(timm.create_model("test_resnet", num_classes=3), "mslora", rank=8)
    path = mslora.save_adapter(model, tmp_path / "a.safetensors", {"weights": "random init"})
    _, meta = mslora.read_adapter(path)
    assert meta["backbone"] == "test_resnet" and meta["mslora_version"] == mslora.__version__
    with pytest.raises(ValueError, match="trained on test_resnet \\(weights: random init\\), but the model is test_convnext"):
        mslora.load_adapter(timm.create_model("test_convnext", num_classes=3), path)
    # a file written before the runtime-only option grad_checkpointing existed still loads
    tensors, meta = mslora.read_adapter(path)
    old_config = {k: v for k, v in meta["config"].items() if k != "grad_checkpointing"}
    from mslora.core.state import tensor_digest as _digest

    save_file(tensors, str(tmp_path / "old.safetensors"), metadata={
        "format": meta["format"], "method": "mslora", "config": json.dumps(old_config), "sha256": _digest(tensors)})
    loaded = mslora.load_adapter(timm.create_model("test_resnet", num_classes=3), tmp_path / "old.safetensors")
    assert mslora.adaptation(loaded).config.grad_checkpointing is False
