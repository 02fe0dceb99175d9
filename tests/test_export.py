"""mslora export: ONNX Runtime and the torch.export program give the PyTorch outputs (1e-4) at two image sizes and
two batch sizes, for MSLoRA (unmerged), LoRA and RLRR (merged); the files carry the class names and preprocessing."""
import json

import pytest
import torch

import mslora
from conftest import colour_folder
from mslora.cli import main
from mslora.engine import TrainConfig, train


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return colour_folder(tmp_path_factory.mktemp("export") / "data", ("cat", "dog"), 12)


@pytest.mark.parametrize("method,options", [("mslora", {"rank": 8}), ("lora", {"rank": 4}), ("rlrr", {})])
@pytest.mark.parametrize("img_size", [32, 48])
def test_onnx_and_pt2_give_the_pytorch_outputs(folder, tmp_path, method, options, img_size):
    import onnx
    import onnxruntime

    cfg = TrainConfig(data=str(folder), split="full", backbone="test_resnet", pretrained=False, epochs=1,
                      batch_size=4, img_size=img_size, lr=0.05, device="cpu", workers=0, method=method,
                      method_options=options, output=str(tmp_path / "runs"))
    _, run = train(cfg)
    reference = mslora.load_run(run, device="cpu").model
    onnx_file, pt2_file = tmp_path / "m.onnx", tmp_path / "m.pt2"
    assert main(["export", "--adapter", str(run), "--format", "onnx", "--output", str(onnx_file),
                 "--dynamic-batch"]) == 0
    assert main(["export", "--adapter", str(run), "--format", "pt2", "--output", str(pt2_file),
                 "--dynamic-batch"]) == 0
    session = onnxruntime.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    program = torch.export.load(str(pt2_file)).module()
    for batch in (1, 3):
        x = torch.randn(batch, 3, img_size, img_size, generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            expected = reference(x)
            torch.testing.assert_close(program(x), expected, rtol=1e-4, atol=1e-4)
        got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
        torch.testing.assert_close(torch.from_numpy(got), expected, rtol=1e-4, atol=1e-4)
    props = {p.key: p.value for p in onnx.load(str(onnx_file)).metadata_props}
    assert json.loads(props["classes"]) == ["cat", "dog"] and props["method"] == method
    assert json.loads(props["preprocessing"])["img_size"] == img_size
    extra = {"mslora.json": ""}
    torch.export.load(str(pt2_file), extra_files=extra)
    assert json.loads(extra["mslora.json"])["classes"] == ["cat", "dog"]
