"""`mslora bench`: the rows, their keys and reference rows, merged inference for mergeable methods only."""
import json

import pytest

from mslora.tools.bench import bench
from mslora.cli import main

KEYS = {"method", "options", "backbone", "device", "dtype", "memory_format", "batch_size", "img_size", "train_step_ms",
        "peak_train_mem_mb", "peak_mem_kind", "infer_ms", "infer_images_per_s", "merged_infer_ms", "trainable_params",
        "total_params", "gflops"}


def test_bench_rows_and_references():
    rows = bench("test_resnet", ["mslora", "lora"], img_size=32, batch_size=2, steps=2, warmup=1,
                 options={"mslora": {"rank": 8}})
    by = {r["method"]: r for r in rows}
    assert list(by) == ["backbone", "full", "mslora", "lora", "peft_lora"]
    assert all(KEYS <= set(r) for r in rows)
    assert by["backbone"]["trainable_params"] == 0 and by["full"]["trainable_params"] == by["full"]["total_params"]
    assert by["lora"]["trainable_params"] == by["peft_lora"]["trainable_params"]  # both train the head too
    assert by["lora"]["merged_infer_ms"] is not None and by["mslora"]["merged_infer_ms"] is None
    assert by["mslora"]["gflops"] > by["backbone"]["gflops"] > 0
    assert all(r["train_step_ms"] > 0 and r["infer_ms"] > 0 for r in rows)
    assert all(r["peak_mem_kind"] == "cpu_allocator_profiler" for r in rows)
    # full fine-tuning allocates at least a gradient and AdamW's two moments per parameter on top of activations
    assert by["full"]["peak_train_mem_mb"] >= 3 * 4 * by["full"]["trainable_params"] / 2**20
    assert 0 < by["backbone"]["peak_train_mem_mb"] < by["full"]["peak_train_mem_mb"]


def test_bench_cli_json_and_errors(capsys):
    assert main(["bench", "--backbone", "test_resnet", "--methods", "bitfit", "--img-size", "32", "--batch-size", "2",
                 "--steps", "1", "--warmup", "0", "--no-memory", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["method"] for r in rows] == ["backbone", "full", "bitfit", "peft_lora"]
    assert main(["bench", "--backbone", "test_resnet", "--methods", "nope"]) == 2
    assert "unknown method 'nope'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="precision='fp8'"):
        bench("test_resnet", ["bitfit"], precision="fp8")
