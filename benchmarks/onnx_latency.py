"""ONNX Runtime (CPU) against eager PyTorch for a trained run: the median latency of one forward pass at batch 1
and batch 32, inputs already preprocessed, after a warm-up round, in alternating blocks of 10 calls (ONNX Runtime's
thread spinning off).

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/onnx_latency.py RUN_DIR [--steps 50] [--threads 2]

Appends a row per batch size to benchmarks/results/onnx_latency_cpu.json (with the run, the method, the threads and
the machine's CPU) and prints them. Run it alone on the machine: another process on the cores changes both numbers.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

OUT = Path(__file__).parent / "results" / "onnx_latency_cpu.json"


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def main() -> None:
    import onnxruntime

    import mslora
    from mslora.tools.export import export_run

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    model, _, _ = mslora.load_run(a.run, device="cpu")
    task = model.mslora_inference[0]
    size = task.cfg.img_size
    with tempfile.TemporaryDirectory() as tmp:
        onnx_file = export_run(a.run, "onnx", Path(tmp) / "m.onnx", dynamic_batch=True)
        opts = onnxruntime.SessionOptions()
        opts.intra_op_num_threads = a.threads
        # ONNX Runtime's threads spin-wait after each run by default, taking the cores from PyTorch calls that
        # follow (measured with calls interleaved one by one: eager batch 1 went from 30 to 89 ms)
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        session = onnxruntime.InferenceSession(str(onnx_file), opts, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    rows = []
    for batch in (1, 32):
        x = torch.randn(batch, 3, size, size)
        times = {"pytorch": [], "onnxruntime": []}
        calls = {"pytorch": lambda: model(x), "onnxruntime": lambda: session.run(None, {name: x.numpy()})}
        with torch.no_grad():
            for r in range(a.steps // 10 + 1):  # alternating blocks of 10 calls; the first round is warm-up
                for engine, call in calls.items():
                    for _ in range(10):
                        t0 = time.perf_counter()
                        call()
                        if r:
                            times[engine].append((time.perf_counter() - t0) * 1e3)
        eager, ort = (statistics.median(times[k]) for k in ("pytorch", "onnxruntime"))
        rows.append({"run": str(a.run), "method": task.cfg.method, "backbone": task.cfg.backbone, "img_size": size,
                     "batch": batch, "pytorch_ms": round(eager, 2), "onnxruntime_ms": round(ort, 2),
                     "speedup": round(eager / ort, 2), "threads": a.threads, "steps": a.steps, "cpu": cpu_name(),
                     "torch": torch.__version__, "onnxruntime": onnxruntime.__version__})
        print(json.dumps(rows[-1]))
    old = json.loads(OUT.read_text()) if OUT.exists() else []
    OUT.write_text(json.dumps(old + rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
