"""mslora report: the table (collapsed runs listed, not averaged), the plots, and errors before writing."""
import json

import pytest
from PIL import Image

from mslora.cli import main
from mslora.tools.report import report


def _run(root, name, method, seed, test, collapsed=False, params=1000, backbone="b", rank=None):
    d = root / name
    d.mkdir(parents=True)
    if rank is not None:
        (d / "config.yaml").write_text(f"method: {method}\nmethod_options:\n  rank: {rank}\n")
    (d / "metrics.json").write_text(json.dumps({
        "task": "classify", "dataset": "toy", "method": method, "backbone": backbone, "seed": seed,
        "trainable_params": params, "val_top1": test + 0.01, "test_top1": test, "best_epoch": 2,
        "collapsed": collapsed, "collapse_reason": "chance level" if collapsed else None, "seconds": 1.0}))
    (d / "metrics.jsonl").write_text("".join(json.dumps({"epoch": e, "train_loss": 1 / e, "val_top1": test * e / 2})
                                             + "\n" for e in (1, 2)))
    return d


def test_report_table_and_plots(tmp_path):
    runs = [_run(tmp_path, "a0", "mslora", 0, 0.80), _run(tmp_path, "a1", "mslora", 1, 0.90),
            _run(tmp_path, "a2", "mslora", 2, 0.10, collapsed=True), _run(tmp_path, "b0", "lora", 0, 0.85, params=5000)]
    md = report(runs, tmp_path / "out").read_text()
    assert "| classify | toy | b | mslora | - | top1 | 85.00 ± 7.07 | 2 | a2 (seed 2) |" in md  # 80 and 90, not 10
    assert "| classify | toy | b | lora | - | top1 | 85.00 | 1 | none |" in md
    assert "| a2 | classify | toy | mslora | b | 2 | 1,000 | 11.00 | 10.00 | 2 | chance level | 1.0 |" in md
    for png in ("learning_curves.png", "metric_vs_params.png"):
        assert f"]({png})" in md and Image.open(tmp_path / "out" / png).size[0] > 300


def test_runs_on_other_backbones_or_options_are_other_rows_and_labels(tmp_path):
    from mslora.tools.report import labels, load_run

    runs = [_run(tmp_path, "r0", "lora", 0, 0.80, rank=8), _run(tmp_path, "r1", "lora", 0, 0.60, rank=32),
            _run(tmp_path, "r2", "lora", 0, 0.70, rank=8, backbone="vit"), _run(tmp_path, "r3", "lora", 0, 0.90, rank=8)]
    md = report(runs, tmp_path / "out").read_text()
    assert "| classify | toy | b | lora | rank=8 | top1 | 85.00 ± 7.07 | 2 | none |" in md
    assert "| classify | toy | b | lora | rank=32 | top1 | 60.00 | 1 | none |" in md
    assert "| classify | toy | vit | lora | rank=8 | top1 | 70.00 | 1 | none |" in md
    assert labels([load_run(r) for r in runs]) == ["lora b rank=8 seed 0 (r0)", "lora b rank=32 seed 0",
                                                   "lora vit rank=8 seed 0", "lora b rank=8 seed 0 (r3)"]


def test_report_errors_before_writing(tmp_path, capsys):
    good = _run(tmp_path, "a0", "mslora", 0, 0.8)
    (tmp_path / "unfinished").mkdir()
    assert main(["report", str(good), str(tmp_path / "unfinished"), "--output", str(tmp_path / "out")]) == 2
    assert "holds no metrics.json" in capsys.readouterr().err and not (tmp_path / "out").exists()
    seg = _run(tmp_path, "s0", "mslora", 0, 0.5)
    (seg / "metrics.json").write_text(json.dumps({**json.loads((seg / "metrics.json").read_text()), "task": "segment"}))
    with pytest.raises(ValueError, match="runs of different tasks"):
        report([good, seg], tmp_path / "out")


def test_sweep_over_vtab_task_folders(tmp_path, capsys):
    from test_formats import _vtab

    from mslora.tools.sweep import table

    for task in ("cifar", "eurosat"):
        _vtab(tmp_path / "vtab" / task)
    out = tmp_path / "sweep"
    assert main(["sweep", "--vtab-root", str(tmp_path / "vtab"), "--output", str(out), "--backbone", "test_resnet",
                 "--no-pretrained", "--method", "bitfit", "--epochs", "1", "--batch-size", "4", "--img-size", "32",
                 "--device", "cpu"]) == 0
    md = (out / "vtab1k.md").read_text()
    results = json.loads((out / "vtab1k.json").read_text())
    assert list(results) == ["cifar", "eurosat"] and md.startswith("| cifar | eurosat | Natural mean |")
    row = md.splitlines()[2].split(" | ")
    assert row[2] == f"{100 * results['cifar']['test_top1']:.1f}"  # Natural mean = cifar alone
    assert row[4] == "-" and "2 of 19 tasks" in md  # no Structured task
    results["eurosat"]["collapsed"] = True
    assert "| collapsed |" in table(results) and "left out of the means (eurosat)" in table(results)
    assert main(["sweep", "--vtab-root", str(tmp_path / "vtab"), "--output", str(out), "--tasks", "dmlab"]) == 2
    assert "no VTAB-1k task folder dmlab" in capsys.readouterr().err
    # train's options that the sweep sets per task are refused, and --task is train's, not an abbreviated --tasks
    assert main(["sweep", "--vtab-root", str(tmp_path / "vtab"), "--output", str(out), "--data", "x"]) == 2
    assert "--data is set per run here; each task folder under --vtab-root" in capsys.readouterr().err
    assert main(["sweep", "--vtab-root", str(tmp_path / "vtab"), "--output", str(tmp_path / "s2"), "--task", "segment",
                 "--backbone", "test_resnet", "--no-pretrained"]) == 2
    assert "segment" in capsys.readouterr().err and not (tmp_path / "s2").exists()
