"""The engine on CPU: two gloo processes train what one process trains, bf16 autocast, resume after SIGKILL,
NaN stop, and the run directory's logs."""
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import colour_folder
from mslora.cli import main

TINY = ["--backbone", "test_resnet", "--no-pretrained", "--img-size", "32", "--rank", "8", "--warmup-epochs", "1",
        "--device", "cpu", "--workers", "0"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


@pytest.fixture
def folder(tmp_path):
    """3 classes x 40 images with a class-dependent colour, so the task can be learnt."""
    return colour_folder(tmp_path / "data", ("red", "green", "blue"), 40)


def only_run(out):
    (run,) = [p for p in out.iterdir() if p.is_dir()]
    return run


def adapter_tensors(run):
    return load_file(str(run / "adapter.safetensors"))


def cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "mslora", *args], capture_output=True, text=True, env=ENV,
                          timeout=timeout)


def test_two_gloo_processes_train_what_one_process_trains(folder, tmp_path):
    args = [*TINY, "--data", str(folder), "--split", "full", "--epochs", "2", "--batch-size", "8"]
    one = cli("train", *args, "--output", str(tmp_path / "one"))
    assert one.returncode == 0, one.stderr[-2000:]
    with socket.socket() as sock:  # a free port for the rendezvous
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                          "127.0.0.1", "--master_port", port, "-m", "mslora", "train", *args, "--output",
                          str(tmp_path / "two")],
                         capture_output=True, text=True, env=ENV, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = adapter_tensors(only_run(tmp_path / "one")), adapter_tensors(only_run(tmp_path / "two"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-4, msg=k)
    m1 = json.loads((only_run(tmp_path / "one") / "metrics.json").read_text())
    m2 = json.loads((only_run(tmp_path / "two") / "metrics.json").read_text())
    assert m2["processes"] == 2 and m1["processes"] == 1
    assert m1["test_images"] == m2["test_images"] == 18  # 15% of 120 images, each counted once over the processes
    assert m1["test_top1"] == pytest.approx(m2["test_top1"], abs=1 / 18 + 1e-6)


def test_bf16_autocast_trains_and_reports(folder, tmp_path):
    out = tmp_path / "runs"
    assert main(["train", *TINY, "--data", str(folder), "--split", "full", "--epochs", "3", "--batch-size", "8",
                 "--precision", "bf16", "--lr", "0.01", "--output", str(out)]) == 0
    run = only_run(out)
    m = json.loads((run / "metrics.json").read_text())
    hist = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert m["precision"] == "bf16" and not m["collapsed"]
    assert hist[-1]["train_loss"] < hist[0]["train_loss"] and m["test_top1"] > 0.5
    assert all(t.dtype == torch.float32 for t in adapter_tensors(run).values())  # autocast: fp32 weights


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_after_sigkill_ends_with_the_same_adapter_and_metrics(folder, tmp_path, workers):
    args = [*TINY[:-1], str(workers), "--data", str(folder), "--split", "full", "--epochs", "3", "--batch-size", "4",
            "--deterministic", "--ckpt-every", "1", "--drop-path-rate", "0.1"]
    ref_out, out = tmp_path / "ref", tmp_path / "killed"
    # every part in a subprocess with the same environment (thread count), as a user would run it
    ref_run = cli("train", *args, "--output", str(ref_out))
    assert ref_run.returncode == 0, ref_run.stderr[-2000:]
    proc = subprocess.Popen([sys.executable, "-m", "mslora", "train", *args, "--output", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    killed_at = None
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            ckpts = list(out.glob("*/checkpoints/last.pt"))
            if ckpts:
                try:
                    ck = torch.load(ckpts[0], weights_only=True)
                except Exception:
                    ck = None  # being replaced right now
                if ck is not None and ck["epoch"] == 1 and ck["batch"] >= 3:  # in the middle of the second epoch
                    proc.send_signal(signal.SIGKILL)
                    killed_at = (ck["epoch"], ck["batch"])
                    break
            time.sleep(0.01)
    finally:
        proc.kill()
        proc.wait()
    assert killed_at is not None, "the run ended before it could be killed mid-epoch"
    run = only_run(out)
    assert not (run / "metrics.json").exists()
    resumed = cli("train", "--resume", str(run))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    ref = only_run(ref_out)
    a, b = adapter_tensors(ref), adapter_tensors(run)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    timing = {"seconds", "seconds_train", "images_per_s", "peak_mem_mb"}
    m_ref, m_res = (json.loads((r / "metrics.json").read_text()) for r in (ref, run))
    assert {k: v for k, v in m_ref.items() if k not in timing} == {k: v for k, v in m_res.items() if k not in timing}
    h_ref, h_res = ([{k: v for k, v in json.loads(ln).items() if k not in timing}
                     for ln in (r / "metrics.jsonl").read_text().splitlines()] for r in (ref, run))
    assert h_ref == h_res  # every epoch's losses and metrics, the interrupted epoch included
    assert "resumed from" in (run / "train.log").read_text()


def test_nan_loss_stops_with_the_step_and_keeps_the_last_checkpoint(folder, tmp_path, capsys):
    out = tmp_path / "runs"
    code = main(["train", *TINY, "--data", str(folder), "--epochs", "2", "--batch-size", "8", "--lr", "1e30",
                 "--clip-grad", "0", "--warmup-epochs", "0", "--ckpt-every", "1", "--output", str(out)])
    err = capsys.readouterr().err
    assert code == 1
    line = [ln for ln in err.splitlines() if ln.startswith("mslora: error:")][0]
    assert "training loss is nan at step" in line or "training loss is inf at step" in line
    step = int(line.split(" at step ")[1].split()[0])
    run = only_run(out)
    assert not (run / "metrics.json").exists()
    # step 1 runs the initial weights (finite loss); the first update at lr 1e30 breaks step 2 at the latest
    assert step >= 2
    ck = torch.load(run / "checkpoints" / "last.pt", weights_only=True)  # every step before the bad one was kept
    assert ck["step"] == step - 1
    assert all(torch.isfinite(t).all() for t in ck["trainable"].values())


def test_resume_refuses_a_finished_run_and_other_options(folder, tmp_path, capsys):
    out = tmp_path / "runs"
    assert main(["train", *TINY, "--data", str(folder), "--epochs", "1", "--batch-size", "8", "--output", str(out)]) == 0
    run = only_run(out)
    capsys.readouterr()
    assert main(["train", "--resume", str(run)]) == 2
    assert "has finished" in capsys.readouterr().err
    assert main(["train", "--resume", str(run), "--epochs", "3"]) == 2
    assert "give no other option" in capsys.readouterr().err


def test_resume_refuses_changed_data_and_a_run_in_use(folder, tmp_path, capsys):
    from filelock import FileLock

    out = tmp_path / "runs"
    assert main(["train", *TINY, "--data", str(folder), "--epochs", "1", "--batch-size", "8", "--output", str(out)]) == 0
    run = only_run(out)
    (run / "metrics.json").unlink()  # resumable again: its last checkpoint is the end of epoch 1
    gone = folder / "red" / "0.png"
    kept = gone.read_bytes()
    gone.unlink()  # one image less: the seeded split would be drawn anew
    capsys.readouterr()
    assert main(["train", "--resume", str(run)]) == 2
    err = capsys.readouterr().err
    assert f"the data of run '{run}' changed since it started (train has 83 images, had 84" in err
    assert err.count("\n") == 1 and not (run / "metrics.json").exists()
    gone.write_bytes(kept)
    with FileLock(str(run / ".lock"), timeout=0):  # another process trains in the run
        assert main(["train", "--resume", str(run)]) == 2
        assert f"run '{run}' is in use by another mslora process" in capsys.readouterr().err
    assert main(["train", "--resume", str(run)]) == 0  # the same data, lock free: it resumes (and finishes)
    assert (run / "metrics.json").exists() and json.loads((run / "data.json").read_text())["train"]["images"] == 84


def test_a_nan_validation_is_divergence_not_a_result(folder, tmp_path, capsys):
    out = tmp_path / "runs"
    # one optimiser step an epoch: its training loss is finite, the weights after it are not
    code = main(["train", *TINY, "--data", str(folder), "--epochs", "2", "--batch-size", "128", "--split", "full",
                 "--set", "weight_decay=1e30", "--lr", "1", "--output", str(out)])
    err = capsys.readouterr().err
    assert code == 1 and "validation loss is nan after epoch 1" in err, err[-500:]
    assert not (only_run(out) / "metrics.json").exists()


def test_device_and_precision_errors_are_one_line(folder, tmp_path, capsys):
    if not torch.cuda.is_available():
        assert main(["train", *TINY[:-4], "--data", str(folder), "--device", "cuda", "--output", str(tmp_path)]) == 2
        assert "no CUDA device" in capsys.readouterr().err
        assert main(["train", *TINY, "--data", str(folder), "--precision", "fp16", "--output", str(tmp_path)]) == 2
        assert "needs a CUDA device" in capsys.readouterr().err
    assert main(["train", *TINY, "--data", str(folder), "--batch-size", "0", "--output", str(tmp_path)]) == 2
    assert "batch_size=0 must be a positive integer" in capsys.readouterr().err
    assert not any(tmp_path.glob("*/config.yaml"))  # nothing written


def test_collapse_is_detected_from_the_history(folder):
    from mslora.engine import TrainConfig
    from mslora.tasks import get_task

    task = get_task("classify")(TrainConfig(data=str(folder), backbone="test_resnet"))  # 3 classes: ln 3 = 1.0986
    stuck = [{"train_loss": 1.5, "val_top1": 0.33}, {"train_loss": 1.0986, "val_top1": 0.35}]
    assert "stayed at chance level" in task.collapsed(stuck)
    assert task.collapsed([{"train_loss": 1.5, "val_top1": 0.33}, {"train_loss": 0.4, "val_top1": 0.9}]) is None
    assert task.collapsed([{"train_loss": 1.0986, "val_top1": 0.9}] * 2) is None  # validation learnt: not collapsed
    assert "nan" in task.collapsed([{"train_loss": float("nan"), "val_top1": 0.3}])
    assert task.collapsed(stuck[:1]) is None  # one epoch is too early to say
    # the thresholds: training loss >= 0.9 ln(c) and last validation top-1 <= 2 / c, each side of both
    edge = 0.9 * math.log(3)
    assert task.collapsed([{"train_loss": 2.0, "val_top1": 0.3}, {"train_loss": edge, "val_top1": 2 / 3}])
    assert task.collapsed([{"train_loss": 2.0, "val_top1": 0.3}, {"train_loss": edge - 1e-6, "val_top1": 0.3}]) is None
    assert task.collapsed([{"train_loss": 2.0, "val_top1": 0.3}, {"train_loss": edge, "val_top1": 2 / 3 + 1e-6}]) is None
    # learnt in epoch 1, then fell to chance and stayed there (Mona on digits, seed 1, before this rule): collapsed
    fell = [{"train_loss": 1.2, "val_top1": 0.8}, {"train_loss": 1.0986, "val_top1": 0.34}]
    assert "the last validation top-1 is 0.340" in task.collapsed(fell)


def test_the_engine_trains_a_task_it_does_not_know(folder, tmp_path):
    """A task registered from outside, with two loss terms and its own best-epoch metric, trains through the same
    loop (the engine reads only what the task interface gives)."""
    from mslora.engine import TrainConfig, train
    from mslora.tasks import register_task
    from mslora.tasks.classify import Classification

    @register_task("toy-regularised")
    class Toy(Classification):
        best_metric = "neg_loss"

        def losses(self, model, batch):
            x, y = batch
            logits = model(x)
            ce = torch.nn.functional.cross_entropy(logits, y)
            return {"ce": ce, "logit_l2": 1e-3 * logits.pow(2).mean()}, len(y)

        def evaluate(self, model, loader, gather, desc="eval"):
            m = super().evaluate(model, loader, gather, desc)
            return {**m, "neg_loss": -m["loss"]}

        def collapsed(self, history):
            return None

    m, run = train(TrainConfig(task="toy-regularised", backbone="test_resnet", pretrained=False, data=str(folder),
                               epochs=2, batch_size=8, img_size=32, device="cpu", workers=0, output=str(tmp_path),
                               method_options={"rank": 8}))
    hist = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert m["task"] == "toy-regularised" and m["val_neg_loss"] == max(h["val_neg_loss"] for h in hist)
    assert m["best_epoch"] == 1 + max(range(2), key=lambda i: hist[i]["val_neg_loss"])


def _history(run):
    return [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]


def test_a_collapsed_run_says_so_in_metrics_and_on_stderr(tmp_path, capsys, caplog):
    # three classes of one and the same grey image: nothing to learn, the loss stays at ln 3 and every image gets
    # one class (a third of the validation images right)
    root = tmp_path / "blank"
    for name in ("a", "b", "c"):
        (root / name).mkdir(parents=True)
        for i in range(20):
            Image.fromarray(np.full((24, 24, 3), 128, np.uint8)).save(root / name / f"{i}.png")
    out = tmp_path / "runs"
    assert main(["train", *TINY, "--data", str(root), "--epochs", "2", "--batch-size", "4", "--lr", "1e-12",
                 "--output", str(out)]) == 0
    m = json.loads((only_run(out) / "metrics.json").read_text())
    assert m["optimiser_steps"] >= 20 and not m["too_short_to_judge"]
    assert m["collapsed"] is True and "stayed at chance level ln(3)" in m["collapse_reason"]
    err = capsys.readouterr().err
    assert "the run collapsed" in err and "collapsed: true" in err
    # the same at one optimiser step an epoch: too short to tell from a run that has not learnt yet
    short = tmp_path / "short"
    assert main(["train", *TINY, "--data", str(root), "--epochs", "2", "--batch-size", "64", "--lr", "1e-12",
                 "--warmup-epochs", "2", "--output", str(short)]) == 0
    m = json.loads((only_run(short) / "metrics.json").read_text())
    assert m["optimiser_steps"] == 2 and m["too_short_to_judge"] and not m["collapsed"]
    log = (only_run(short) / "train.log").read_text()
    assert "2 optimiser steps are too few to tell" in log and "the run collapsed" not in log
    assert "epochs=2 is not above warmup_epochs=2: the learning rate never reaches its peak" in caplog.text


def test_grad_accum_equals_one_batch_that_many_times_larger(folder, tmp_path):
    """84 training images: 7 steps of 12, or 7 steps of 2 x 6 accumulated; the same adapter and schedule."""
    args = [*TINY, "--data", str(folder), "--split", "full", "--epochs", "2", "--lr", "0.01"]
    assert main(["train", *args, "--batch-size", "12", "--output", str(tmp_path / "one")]) == 0
    assert main(["train", *args, "--batch-size", "6", "--grad-accum", "2", "--output", str(tmp_path / "acc")]) == 0
    one, acc = only_run(tmp_path / "one"), only_run(tmp_path / "acc")
    assert [h["step"] for h in _history(one)] == [h["step"] for h in _history(acc)] == [7, 14]
    assert [h["lr"] for h in _history(one)] == [h["lr"] for h in _history(acc)]
    a, b = adapter_tensors(one), adapter_tensors(acc)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)
    assert any(not torch.equal(v, torch.zeros_like(v)) for v in a.values())


def test_schedule_weight_decay_and_head_as_documented(folder, tmp_path):
    """Linear warmup from lr/100 then cosine, per optimiser step (timm CosineLRScheduler with warmup_prefix: the cosine
    spans epochs x steps after the warmup); AdamW weight decay on weights only, none on biases and norms; a zero head."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from mslora.engine import TrainConfig
    from mslora.tasks import get_task

    out = tmp_path / "runs"
    lr, epochs, warmup = 0.01, 3, 1
    assert main(["train", *TINY[:TINY.index("--warmup-epochs")], *TINY[TINY.index("--warmup-epochs") + 2:],
                 "--data", str(folder), "--split", "full", "--epochs", str(epochs), "--warmup-epochs", str(warmup),
                 "--batch-size", "12", "--lr", str(lr), "--output", str(out)]) == 0
    run = only_run(out)
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    logged = {e.step: e.value for e in events.Scalars("train/lr")}
    steps = 7  # 84 images / 12
    assert sorted(logged) == list(range(1, epochs * steps + 1))
    for t, value in logged.items():
        if t < warmup * steps:
            expected = lr / 100 + t * (lr - lr / 100) / (warmup * steps)
        else:
            expected = 0.5 * lr * (1 + math.cos(math.pi * (t - warmup * steps) / (epochs * steps)))
        assert value == pytest.approx(expected, rel=1e-5), t

    ck = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    groups = ck["optimizer"]["param_groups"]
    decay = {g["weight_decay"]: g["params"] for g in groups}
    assert set(decay) == {0.0, 0.05}
    shapes = {i: st["exp_avg"].shape for i, st in ck["optimizer"]["state"].items()}
    assert decay[0.0] and all(len(shapes[i]) == 1 for i in decay[0.0])  # biases and norm weights
    assert decay[0.05] and all(len(shapes[i]) > 1 for i in decay[0.05])  # convolution and linear weights
    trainable = adapter_tensors(run)
    assert len(decay[0.0]) == sum(v.ndim == 1 for v in trainable.values())

    cfg = TrainConfig(data=str(folder), backbone="test_resnet", pretrained=False, method_options={"rank": 8})
    head = get_task("classify")(cfg).build_model().get_classifier()
    assert not head.weight.any() and not head.bias.any()
    cfg = TrainConfig(data=str(folder), backbone="test_resnet", pretrained=False, head_init="timm",
                      method_options={"rank": 8})
    assert get_task("classify")(cfg).build_model().get_classifier().weight.any()


def test_train800val200_keeps_the_last_epoch(tmp_path):
    from test_formats import _vtab

    root = _vtab(tmp_path / "caltech101", n_train=12, n_val=6, n_test=6)
    out = tmp_path / "runs"
    assert main(["train", *TINY, "--data", str(root), "--split", "train800val200", "--epochs", "3",
                 "--batch-size", "6", "--output", str(out)]) == 0
    run = only_run(out)
    m, hist = json.loads((run / "metrics.json").read_text()), _history(run)
    assert m["split"] == "train800val200" and m["train_images"] == 18
    assert m["best_epoch"] == 3 and m["val_top1"] == hist[-1]["val_top1"]
