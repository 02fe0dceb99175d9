"""Every shipped config parses, and so does every `mslora train --config ...` command its comments document."""
import shlex
from pathlib import Path

import pytest

from mslora.engine.config import config_from_args as _train_config

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


def _commands(path):
    """The argument lists of the `mslora train ...` lines in a config's comments."""
    for line in path.read_text().splitlines():
        if line.startswith("#") and "mslora train" in line:
            cmd = line.split("mslora train", 1)[1].split("  (", 1)[0]
            yield shlex.split(cmd)


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_config_and_its_documented_commands_parse(path, monkeypatch):
    monkeypatch.chdir(path.parent.parent)
    cfg = _train_config(["--config", str(path)])
    assert cfg.lr > 0 and cfg.epochs >= 12 and cfg.weight_decay in (0.05, 0.1)
    commands = list(_commands(path))
    assert commands, "each config documents how to run it"
    for argv in commands:
        named = _train_config(["--config", argv[argv.index("--config") + 1]])
        c = _train_config(argv)  # the flags parse and apply on top of the named file
        assert c.backbone == named.backbone and c.task == named.task
        if any(a.startswith("--") and a not in ("--config", "--data") for a in argv):
            assert c.to_dict() != named.to_dict()  # each documented flag changes the run


def test_table5_and_table2_settings():
    root = Path(__file__).parent.parent / "configs"
    cfg = _train_config(["--config", str(root / "mslora_table5_swin_l.yaml"), "--method", "lora"])
    assert cfg.method == "lora" and cfg.backbone == "swin_large_patch4_window7_224" and cfg.epochs == 100
    cfg = _train_config(["--config", str(root / "mslora_table2_food101_swin_b.yaml"), "--groups", "8"])
    assert cfg.epochs == 50 and cfg.method_options["groups"] == 8 and cfg.warmup_epochs == 20
    assert _train_config(["--config", str(root / "mslora_table5_swin_b.yaml")]).method_options.get("rank", 128) == 128


def test_set_overrides_any_field():
    root = Path(__file__).parent.parent / "configs"
    cfg = _train_config(["--config", str(root / "mslora_table2_food101_swin_b.yaml"), "--lr", "0.1", "--set", "lr=2e-3",
                         "--set", "kernel_sizes=[3, 5]", "--set=enhance=false", "--set", "split-seed=4"])
    assert cfg.lr == 2e-3 and cfg.split_seed == 4
    assert cfg.method_options["kernel_sizes"] == [3, 5] and cfg.method_options["enhance"] is False
    cfg = _train_config(["--config", str(root / "rlrr_table12_cifar100_resnet50.yaml"), "--set", "method=full"])
    assert cfg.method == "full" and cfg.method_options == {}
    with pytest.raises(ValueError, match="--set lr is not KEY=VALUE"):
        _train_config(["--set", "lr"])
    with pytest.raises(ValueError, match="unknown option\\(s\\) nope"):
        _train_config(["--set", "nope=1"])
