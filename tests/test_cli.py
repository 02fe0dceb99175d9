"""The command line: train/eval smoke test, params, config files, and every user error of issue section 6."""
import json
import os
import subprocess
import sys

import pytest
import torch

from mslora.cli import main

TINY = ["--backbone", "test_resnet", "--no-pretrained", "--epochs", "2", "--batch-size", "4", "--img-size", "32",
        "--rank", "8", "--warmup-epochs", "1"]


def run_dirs(out):
    return sorted(p for p in out.iterdir() if p.is_dir())


def test_train_then_eval_reproduces_test_accuracy(image_folder, tmp_path, capsys):
    out = tmp_path / "runs"
    assert main(["train", *TINY, "--data", str(image_folder), "--output", str(out)]) == 0
    (run,) = run_dirs(out)
    assert {p.name for p in run.iterdir()} == {"config.yaml", "data.json", "train.log", "metrics.json", "metrics.jsonl",
                                                "adapter.safetensors", "checkpoints", "tensorboard", ".lock"}
    umask = os.umask(0o022)
    os.umask(umask)
    for written in (run / "adapter.safetensors", run / "checkpoints" / "best.safetensors", run / "checkpoints" / "last.pt"):
        assert written.stat().st_mode & 0o777 == 0o666 & ~umask, written  # the user's mode, not safetensors' 0600
    assert {p.name for p in (run / "checkpoints").iterdir()} == {"last.pt", "best.safetensors"}
    assert any(p.name.startswith("events.out.tfevents") for p in (run / "tensorboard").iterdir())
    lines = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert [ln["epoch"] for ln in lines] == [1, 2]
    for ln in lines:
        for k in ("train_loss", "val_top1", "val_loss", "lr", "images_per_s", "peak_mem_mb"):
            assert isinstance(ln[k], float)
    m = json.loads((run / "metrics.json").read_text())
    for k in ("method", "backbone", "dataset", "trainable_params", "total_params", "val_top1", "test_top1",
              "epochs", "seconds"):
        assert k in m
    assert "test_top5" not in m  # 3 classes: top-5 would always be 1
    assert m["split"] == "random1k" and m["split_pools"].startswith("one pool split 70 / 15 / 15")
    assert m["method"] == "mslora" and m["epochs"] == 2 and m["test_images"] == 4
    assert all(0.0 <= m[k] <= 1.0 for k in ("val_top1", "test_top1"))
    assert m["trainable_params"] == m["adapter_params"] + m["head_params"] > 0
    log = (run / "train.log").read_text()
    assert "epoch 2/2" in log and "best epoch" in log
    capsys.readouterr()
    assert main(["eval", "--adapter", str(run)]) == 0
    ev = json.loads(capsys.readouterr().out)
    assert ev["test_top1"] == m["test_top1"] and "test_top5" not in ev
    assert ev["test_loss"] == pytest.approx(m["test_loss"], rel=1e-6)  # the same model, not just the same hits


def test_config_file_and_flag_precedence(image_folder, tmp_path, capsys):
    import yaml

    runs = tmp_path / "runs"
    cfg = tmp_path / "exp.yaml"
    cfg.write_text(f"backbone: test_resnet\npretrained: false\ndata: {image_folder}\nepochs: 3\nbatch_size: 4\n"
                   f"img_size: 32\nrank: 8\ngroups: 2\noutput: {runs}\n")
    # --method linear has no rank or groups: options of another method are an error, before any run starts
    one_line_error(capsys, ["train", "--config", str(cfg), "--method", "linear"], "unknown option(s) groups, rank")
    assert not runs.exists()
    assert main(["train", "--config", str(cfg), "--epochs", "1"]) == 0
    (run,) = run_dirs(runs)

    resolved = yaml.safe_load((run / "config.yaml").read_text())
    assert resolved["epochs"] == 1 and resolved["batch_size"] == 4  # flag beats file, file beats default
    assert resolved["method_options"] == {"rank": 8, "groups": 2}


def test_params_json(capsys):
    assert main(["params", "--backbone", "resnet50", "--method", "mslora", "--groups", "4", "--json"]) == 0
    c = json.loads(capsys.readouterr().out)
    assert c["adapter_params"] == 814784 and c["head_params"] == 2049000
    assert c["total_params"] == c["adapter_params"] + c["head_params"] + c["backbone_params"]


def one_line_error(capsys, argv, match):
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    errors = [ln for ln in err if ln.startswith("mslora: error:")]
    assert code == 2 and len(errors) == 1 and match in errors[0], err
    assert not any("Traceback" in ln for ln in err)


def test_errors_are_one_line(image_folder, tmp_path, capsys):
    out = tmp_path / "runs"
    out.mkdir()
    keep = out / "earlier.txt"
    keep.write_text("earlier result")
    data = ["--data", str(image_folder), "--output", str(out)]
    one_line_error(capsys, ["train", *TINY, *data, "--method", "msl0ra"], "unknown method 'msl0ra'; did you mean mslora")
    one_line_error(capsys, ["train", *TINY, *data, "--backbone", "resnet5O"], "did you mean resnet50")
    one_line_error(capsys, ["train", *TINY, "--data", str(tmp_path / "nope")], "does not exist")
    (tmp_path / "empty").mkdir()
    one_line_error(capsys, ["train", *TINY, "--data", str(tmp_path / "empty")], "holds no images")
    one_line_error(capsys, ["train", *TINY, *data, "--groups", "3", "--rank", "24"], "groups=3 must divide in_channels=")
    torch.save(torch.nn.Linear(2, 2).state_dict(), tmp_path / "w.pth")
    one_line_error(capsys, ["train", *TINY, *data, "--weights", str(tmp_path / "w.pth")], "does not fit backbone")
    one_line_error(capsys, ["train", *TINY, *data, "--config", str(tmp_path / "none.yaml")], "does not exist")
    (tmp_path / "bad.yaml").write_text("rnak: 4\n")
    one_line_error(capsys, ["train", *TINY, *data, "--config", str(tmp_path / "bad.yaml")], "unknown option(s) rnak")
    one_line_error(capsys, ["eval", "--adapter", str(tmp_path / "nope")], "does not exist")
    assert run_dirs(out) == [] and keep.read_text() == "earlier result"  # nothing written, nothing lost


@pytest.mark.parametrize("workers", ["0", "1"])
def test_unreadable_image_names_the_file(image_folder, tmp_path, capsys, workers):
    broken = image_folder / "bee" / "broken.png"
    broken.write_bytes(b"\x89PNG garbage")  # no image header: refused when the data loads, before a run exists
    out = tmp_path / "runs"
    args = ["train", *TINY, "--data", str(image_folder), "--output", str(out), "--split", "full", "--workers", workers]
    one_line_error(capsys, args, "broken.png")
    assert not out.exists()
    whole = (image_folder / "bee" / "0.png").read_bytes()
    broken.write_bytes(whole[:len(whole) // 2])  # a whole header, half the pixels: found when it is decoded
    one_line_error(capsys, args, "broken.png")
    (run,) = run_dirs(out)  # the run that started keeps its config and a log that says why it stopped
    assert "broken.png" in (run / "train.log").read_text() and (run / "config.yaml").exists()


def test_console_script_exit_code_and_no_traceback():
    r = subprocess.run([sys.executable, "-m", "mslora", "train", "--method", "msl0ra"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2
    (line,) = r.stderr.strip().splitlines()  # one line, no traceback
    assert line.startswith("mslora: error: unknown method 'msl0ra'; did you mean mslora")


def test_train_vit_at_another_image_size(image_folder, tmp_path, capsys):
    # A fixed-grid model (ViT) is built for --img-size; eval rebuilds it the same way.
    out = tmp_path / "runs"
    assert main(["train", "--backbone", "test_vit", "--no-pretrained", "--method", "lora", "--rank", "2",
                 "--epochs", "1", "--batch-size", "8", "--img-size", "32", "--data", str(image_folder),
                 "--output", str(out)]) == 0
    (run,) = run_dirs(out)
    m = json.loads((run / "metrics.json").read_text())
    capsys.readouterr()
    assert main(["eval", "--adapter", str(run)]) == 0
    ev = json.loads(capsys.readouterr().out)
    assert ev["test_top1"] == m["test_top1"] and ev["test_loss"] == pytest.approx(m["test_loss"], rel=1e-6)


def test_params_requires_backbone(capsys):
    one_line_error(capsys, ["params", "--method", "mslora"], "--backbone NAME is required")


def test_main_job_options_do_not_leak_into_other_methods(capsys):
    from mslora.engine.config import config_from_args as _train_config
    from mslora.engine import TrainConfig, main_job

    assert main_job().method == "mslora" and main_job().method_options == {"rank": 32}  # the main job's rank
    assert main_job(method="lora").method_options == {}  # LoRA at its own (PEFT) defaults, not rank 32
    assert main_job(method_options={"groups": 2}).method_options == {"rank": 32, "groups": 2}
    assert TrainConfig(method="lora").method_options == {} and TrainConfig().method_options == {}
    assert _train_config([]).method_options == {"rank": 32}  # `mslora train` is the main job
    assert _train_config(["--method", "lora"]).method_options == {}
    assert _train_config(["--method", "lora", "--rank", "4"]).method_options == {"rank": 4}
    assert _train_config(["--rank", "8"]).method_options == {"rank": 8}


def test_bare_mslora_prints_help(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: mslora COMMAND") and "merge" in out
