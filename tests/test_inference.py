"""Using a trained adapter: load_run from the adapter file alone, predict in the original pixel coordinates, the
backbone fingerprint, and mslora predict writing its files."""
import json
import shutil

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

import mslora
from conftest import colour_folder, make_model
from mslora.cli import main
from mslora.engine import TrainConfig, evaluate_adapter, train
from mslora.registry import get_task


@pytest.fixture(scope="module")
def colours(tmp_path_factory):
    """3 classes x 30 images with a class-dependent colour (learnable in 2 epochs), and a 2-epoch run on them."""
    root = colour_folder(tmp_path_factory.mktemp("colours") / "data", ("red", "green", "blue"), 30,
                         shape=lambda i: (20 + i % 5, 24))
    cfg = TrainConfig(data=str(root), split="full", backbone="test_resnet", pretrained=False, epochs=2, batch_size=8,
                      img_size=32, lr=0.01, device="cpu", workers=0, output=str(root.parent / "runs"),
                      method_options={"rank": 8})
    _, run = train(cfg)
    return root, run, cfg


def test_predictions_on_the_test_split_score_what_eval_reported(colours, tmp_path):
    root, run, cfg = colours
    moved = tmp_path / "elsewhere"
    shutil.copytree(run, moved)
    shutil.move(str(root), str(tmp_path / "data-moved"))  # the training data is not needed to load a run
    try:
        model, transforms, classes = mslora.load_run(moved, device="cpu")
    finally:
        shutil.move(str(tmp_path / "data-moved"), str(root))
    assert classes == ["blue", "green", "red"] and not model.training
    assert transforms(torch.zeros(3, 40, 50, dtype=torch.uint8)).shape == (3, 32, 32)
    test = get_task("classify")(cfg).data.test
    paths = [test.base.samples[i][0] for i in test.indices]
    truth = [test.base.samples[i][1] for i in test.indices]
    preds = mslora.predict(model, paths, batch_size=5)
    assert len(preds) == len(paths) and all(abs(sum(p["probabilities"]) - 1) < 1e-5 for p in preds)
    top1 = np.mean([classes.index(p["label"]) == t for p, t in zip(preds, truth)])
    assert top1 == pytest.approx(evaluate_adapter(run, device="cpu")["test_top1"], abs=1e-6)
    # PIL images, arrays and tensors of the same pictures answer the same
    pil = [Image.open(p) for p in paths[:3]]
    again = mslora.predict(mslora.Run(model, transforms, classes), [pil[0], np.asarray(pil[1]),
                                                                     torch.from_numpy(np.asarray(pil[2])).permute(2, 0, 1)])
    for a, b in zip(again, preds[:3]):
        assert a["label"] == b["label"] and np.allclose(a["probabilities"], b["probabilities"], atol=1e-6)


def test_predict_cli_writes_csv_and_json_lines_and_skips_unreadable_files(colours, tmp_path, capsys):
    root, run, _ = colours
    (tmp_path / "in").mkdir()
    shutil.copy(root / "red" / "0.png", tmp_path / "in" / "a.png")
    shutil.copy(root / "blue" / "0.png", tmp_path / "in" / "b.png")
    (tmp_path / "in" / "broken.png").write_bytes(b"not a png")
    out = tmp_path / "out"
    assert main(["predict", "--adapter", str(run), "--input", str(tmp_path / "in"), str(root / "green" / "1.png"),
                 "--output", str(out), "--top-k", "2", "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    assert "broken.png" in captured.err and "cannot read image" in captured.err
    rows = (out / "predictions.csv").read_text().splitlines()
    assert rows[0] == "path,label,top1_label,top1_probability,top2_label,top2_probability" and len(rows) == 4
    lines = [json.loads(ln) for ln in (out / "predictions.jsonl").read_text().splitlines()]
    assert [ln["path"].rsplit("/", 1)[-1] for ln in lines] == ["a.png", "b.png", "1.png"]
    assert all(len(ln["top_k"]) == 2 and ln["top_k"][0]["label"] == ln["label"] for ln in lines)
    assert "a.png" in captured.out  # a handful of images: a table on stdout too


def test_the_fingerprint_refuses_other_backbone_weights(tmp_path):
    model = mslora.adapt(make_model("resnet", seed=0), "mslora", rank=8)
    path = mslora.save_adapter(model, tmp_path / "a.safetensors", {"weights": "random init, seed 0"})
    assert len(mslora.read_adapter(path)[1]["backbone_sha256"]) == 64
    mslora.load_adapter(make_model("resnet", seed=0), path)  # the same weights load
    with pytest.raises(ValueError, match=r"trained on other backbone weights \(random init, seed 0, sha256 \w{12}\) "
                                         r"than this model's \(sha256 \w{12}\).*strict_backbone=False"):
        mslora.load_adapter(make_model("resnet", seed=1), path)
    with pytest.warns(UserWarning, match="Loading anyway"):
        mslora.load_adapter(make_model("resnet", seed=1), path, strict_backbone=False)
    # methods that change backbone tensors record the weights from before they did
    for method in ("bitfit", "rlrr", "lora", "pissa"):
        adapted = mslora.adapt(make_model("vit"), method)
        with torch.no_grad():
            for p in adapted.parameters():
                if p.requires_grad:
                    p.add_(0.1)
        file = mslora.save_adapter(adapted, tmp_path / f"{method}.safetensors")
        mslora.load_adapter(make_model("vit"), file)
    # full fine-tuning has no frozen weights to fingerprint
    full = mslora.save_adapter(mslora.adapt(make_model("resnet"), "full"), tmp_path / "full.safetensors")
    assert mslora.read_adapter(full)[1]["backbone_sha256"] is None


def test_load_run_names_what_an_older_file_lacks(colours, tmp_path):
    _, run, _ = colours
    with safe_open(str(run / "adapter.safetensors"), framework="pt") as f:
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata())
    del meta["preprocessing"]
    save_file(tensors, str(tmp_path / "old.safetensors"), metadata=meta)
    with pytest.raises(ValueError, match="lacks preprocessing"):
        mslora.load_run(tmp_path / "old.safetensors")
    with pytest.raises(ValueError, match="takes what mslora.load_run or mslora.load_runs returns"):
        mslora.predict(timm.create_model("test_resnet"), [np.zeros((8, 8, 3), np.uint8)])
