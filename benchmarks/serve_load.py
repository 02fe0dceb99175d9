"""Load test of ``mslora serve``: requests/s, p50 / p99 latency and memory for
  A. one adapter in one server,
  B. four adapters on one backbone in one server, requests interleaved over them (mixed batches),
  C. four servers of one adapter each, the same interleaved requests sent to each adapter's server;
plus the tensors a model holds with 1-4 named adapters against separate models (in this process).

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/serve_load.py [--runs DIR] [--requests 400] [--concurrency 16]

The four adapters are the main job's recipe (MSLoRA rank 32 on the frozen ImageNet EfficientNet-Lite0, Fashion-MNIST,
64 px) trained one epoch each with seeds 0-3 (``--runs``, default ~/.cache/mslora/serve-bench; trained there when
missing: a few minutes); their accuracy does not matter here, only what serving them costs. Requests are Fashion-MNIST
test images (PNG, base64 JSON) from a thread-pool client on the same machine, ``--concurrency`` in flight, after 32
warm-up requests; every server runs one inference worker, batches up to 16 requests within 10 ms. A and B run
``--rounds`` times, alternating, and the median round of each is kept (all rounds are recorded); C runs once. Memory: resident
(RSS) and unique (USS) memory summed over each setup's processes (LitServe's main, API and inference processes)
after the load. Results are appended to benchmarks/results/serve_load_cpu.json and printed. Run it alone: the client
shares the cores with the servers, and any other process changes the numbers.
"""
from __future__ import annotations

import argparse
import base64
import gzip
import io
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import psutil
from PIL import Image

OUT = Path(__file__).parent / "results" / "serve_load_cpu.json"
NAMES = ["a", "b", "c", "d"]


def ensure_runs(root: Path) -> dict[str, str]:
    """name -> run directory of the four main-job adapters (seeds 0-3, one epoch), trained when missing."""
    from mslora.engine import main_job, train

    runs = {}
    for seed, name in enumerate(NAMES):
        out = root / f"seed{seed}"
        found = sorted(out.glob("*/adapter.safetensors"))
        if not found:
            train(main_job(epochs=1, seed=seed, output=str(out)))
            found = sorted(out.glob("*/adapter.safetensors"))
        runs[name] = str(found[-1].parent)
    return runs


def payloads(n: int = 64) -> list[str]:
    """``n`` Fashion-MNIST test images as base64 PNG."""
    root = Path(os.environ.get("FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))
    with gzip.open(root / "t10k-images-idx3-ubyte.gz") as f:
        images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)[:n]
    out = []
    for im in images:
        buf = io.BytesIO()
        Image.fromarray(im).save(buf, format="PNG")
        out.append(base64.b64encode(buf.getvalue()).decode())
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(adapters: dict[str, str]) -> tuple[subprocess.Popen, str]:
    """``mslora serve`` of ``adapters`` on a free port, up and answering /health."""
    port = free_port()
    cmd = [sys.executable, "-m", "mslora.cli", "serve", "--port", str(port), "--device", "cpu", "--max-batch-size",
           "16", "--batch-timeout", "0.01", "--adapter", *[f"{n}={r}" for n, r in adapters.items()]]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if urllib.request.urlopen(url + "/health", timeout=1).read() == b"ok":
                return proc, url
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}: {' '.join(cmd)}")
            time.sleep(0.5)
    raise RuntimeError("server did not come up in 5 minutes")


def memory(procs: list[subprocess.Popen]) -> dict[str, float]:
    """RSS and USS in MB summed over the processes and all their children."""
    rss = uss = 0
    for proc in procs:
        parent = psutil.Process(proc.pid)
        for p in [parent, *parent.children(recursive=True)]:
            info = p.memory_full_info()
            rss, uss = rss + info.rss, uss + info.uss
    return {"rss_mb": round(rss / 2**20), "uss_mb": round(uss / 2**20)}


def load(jobs: list[tuple[str, str, str]], concurrency: int) -> dict[str, float]:
    """Send every (url, adapter, image) job, ``concurrency`` at a time; requests/s and latency percentiles (ms)."""
    def one(job):
        url, name, image = job
        body = json.dumps({"adapter": name, "image": image}).encode()
        t0 = time.perf_counter()
        req = urllib.request.Request(url + "/predict", body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:
            assert r.status == 200 and json.loads(r.read())["adapter"] == name
        return time.perf_counter() - t0

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        lat = sorted(pool.map(one, jobs))
    wall = time.perf_counter() - t0
    return {"requests": len(jobs), "req_per_s": round(len(jobs) / wall, 1),
            "p50_ms": round(1000 * statistics.median(lat), 1), "p99_ms": round(1000 * lat[int(0.99 * (len(lat) - 1))], 1)}


def setup(label: str, servers: list[dict[str, str]], images: list[str], requests: int, concurrency: int) -> dict:
    """Start ``servers`` (each a name -> run dict), warm up, load-test with requests interleaved over all names,
    measure memory, stop them."""
    started = [start(adapters) for adapters in servers]
    try:
        where = {name: url for (_, url), adapters in zip(started, servers) for name in adapters}
        names = list(where)
        jobs = [(where[names[i % len(names)]], names[i % len(names)], images[i % len(images)])
                for i in range(requests)]
        load(jobs[:32], concurrency)  # warm-up
        result = {"setup": label, "adapters": len(names), "processes": len(servers), **load(jobs, concurrency),
                  **memory([p for p, _ in started])}
    finally:
        for proc, _ in started:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=60)
    print(json.dumps(result))
    return result


def median_row(rows: list[dict]) -> dict:
    """The round with the median requests/s (its latencies and memory with it), and how many rounds there were."""
    row = sorted(rows, key=lambda r: r["req_per_s"])[len(rows) // 2]
    return {**row, "rounds": len(rows), "req_per_s_all": [r["req_per_s"] for r in rows]}


def tensors_held(runs: dict[str, str]) -> list[dict]:
    """Parameter and buffer megabytes of one model with 1-4 named adapters against 1-4 separate models."""
    import mslora

    def mb(model):
        return sum(t.numel() * t.element_size() for t in model.state_dict().values()) / 2**20

    rows = []
    for n in range(1, len(runs) + 1):
        some = dict(list(runs.items())[:n])
        shared = mb(mslora.load_runs(some, device="cpu"))
        separate = sum(mb(mslora.load_run(r, device="cpu").model) for r in some.values())
        rows.append({"adapters": n, "shared_model_mb": round(shared, 2), "separate_models_mb": round(separate, 2)})
        print(json.dumps(rows[-1]))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", default=str(Path.home() / ".cache" / "mslora" / "serve-bench"))
    p.add_argument("--requests", type=int, default=400)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds of A and B (the median is kept)")
    a = p.parse_args()
    runs = ensure_runs(Path(a.runs))
    images = payloads()
    rounds = {"A": [], "B": []}
    for _ in range(a.rounds):  # A and B alternate: this machine's speed drifts between runs
        rounds["A"].append(setup("A: 1 adapter, 1 process", [{"a": runs["a"]}], images, a.requests, a.concurrency))
        rounds["B"].append(setup("B: 4 adapters on one backbone, 1 process", [runs], images, a.requests,
                                 a.concurrency))
    rows = [median_row(rounds["A"]), median_row(rounds["B"]),
            setup("C: 4 processes of 1 adapter", [{n: r} for n, r in runs.items()], images, a.requests,
                  a.concurrency)]
    record = {"date": time.strftime("%Y-%m-%d %H:%M"), "cpu": psutil.cpu_count(), "concurrency": a.concurrency,
              "setups": rows, "rounds": rounds, "tensors": tensors_held(runs),
              "b_over_a_req_per_s": round(rows[1]["req_per_s"] / rows[0]["req_per_s"], 2),
              "b_over_a_per_round": [round(b["req_per_s"] / x["req_per_s"], 2)
                                     for x, b in zip(rounds["A"], rounds["B"])],
              "b_over_c_rss": round(rows[1]["rss_mb"] / rows[2]["rss_mb"], 2),
              "b_over_c_uss": round(rows[1]["uss_mb"] / rows[2]["uss_mb"], 2)}
    history = json.loads(OUT.read_text()) if OUT.exists() else []
    OUT.write_text(json.dumps(history + [record], indent=1) + "\n")
    print(json.dumps({k: v for k, v in record.items() if k.startswith("b_over")}))


if __name__ == "__main__":
    main()
