"""Automatic MSLoRA placement across timm: one architecture per timm model module (the smallest variant that
builds, by parameter count), random init, checked as a new user would use it.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/placement_sweep.py [--method mslora] [--out FILE.json]

Per model: ``mslora.adapt(model, METHOD)`` either refuses with a ValueError (reason recorded) or must pass every
check of :func:`check`: identity at initialisation, gradients reach every adapter, BatchNorm statistics unchanged by
a train-mode forward, each adapter run exactly once per forward. Anything else is a failure (a bug).
Writes ``benchmarks/results/placement_sweep.json`` and prints the summary the README quotes.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore")

import timm  # noqa: E402
import torch  # noqa: E402

import mslora  # noqa: E402
from mslora.core.placement import input_size  # noqa: E402

OPTIONS = {"mslora": dict(rank=32, groups=4)}


def pick_smallest() -> dict[str, str]:
    """timm model module -> its smallest model name that builds (parameters counted on the meta device)."""
    from timm.models import _registry

    by_module: dict[str, list[str]] = {}
    for name in timm.list_models():
        by_module.setdefault(_registry._model_to_module[name], []).append(name)
    out = {}
    for module, names in sorted(by_module.items()):
        best = None
        for name in names:
            try:
                with torch.device("meta"):
                    n = sum(p.numel() for p in timm.create_model(name).parameters())
            except Exception:
                continue
            if best is None or n < best[1]:
                best = (name, n)
        if best:
            out[module] = best[0]
    return out


def _input(model: torch.nn.Module, small: int = 64) -> torch.Tensor:
    """A batch of 2 images at ``small`` px when the model takes it, else at its default size."""
    g = torch.Generator().manual_seed(0)
    c, h, w = input_size(model)
    for size in ((small, small), (h, w)):
        x = torch.randn(2, c, *size, generator=g)
        try:
            with torch.no_grad():
                model.eval()(x)
            return x
        except Exception:
            continue
    raise RuntimeError(f"{type(model).__name__} runs neither at {small} px nor at {h}x{w}")


def check(model: torch.nn.Module, method: str = "mslora", **options) -> str:
    """Adapt ``model`` and check it; returns 'ok' or raises (ValueError: a refusal; AssertionError: a failed check)."""
    x = _input(model)
    with torch.no_grad():
        plain = model.eval()(x)
    mslora.adapt(model, method, **options)
    with torch.no_grad():
        start = model(x)
    assert torch.allclose(start, plain, atol=1e-5, rtol=1e-4), "not identity at initialisation"
    calls = {k: 0 for k in model.adapters}
    handles = [m.register_forward_hook(lambda *_, k=k: calls.__setitem__(k, calls[k] + 1))
               for k, m in model.adapters.items()]
    stats = {n: b.clone() for n, b in model.named_buffers() if "running" in n}
    model.train()
    feats = model.forward_features(x)  # every adapter reaches it (with class-token pooling the logits do not)
    feats = feats if torch.is_tensor(feats) else torch.cat([f.flatten(1) for f in feats], 1)
    for h in handles:
        h.remove()
    feats.float().pow(2).mean().backward()
    del feats
    reached = lambda m: any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters())  # noqa: E731
    if not all(reached(m) for m in model.adapters.values()):
        try:  # every stage's features: PiT's forward_features keeps the class token only, dropping the patch tokens
            inter = model.forward_intermediates(x, intermediates_only=True)  # that the last blocks' adapters change
            sum(f.float().pow(2).mean() for f in inter if torch.is_tensor(f)).backward()
        except Exception:  # no forward_intermediates, or not at this size
            pass
    bad = [k for k, n in calls.items() if n != 1]
    assert not bad, f"adapter run {calls[bad[0]]} times per forward at {bad[0]}"
    for n, b in model.named_buffers():
        if n in stats:
            assert torch.equal(b, stats[n]), f"BatchNorm statistic {n} changed"
    for k, m in model.adapters.items():
        assert reached(m), f"no gradient reaches adapter {k}"
    return "ok"


def run(name: str, method: str, kwargs: dict | None = None) -> dict:
    """Build ``name`` (random init, 4 classes) and :func:`check` it; returns a result row."""
    t = time.perf_counter()
    torch.manual_seed(0)
    try:
        try:  # random-init ResNets zero each block's last BN, cutting the bottleneck site off (pretrained ones do not)
            model = timm.create_model(name, num_classes=4, zero_init_last=False, **(kwargs or {}))
        except TypeError:
            model = timm.create_model(name, num_classes=4, **(kwargs or {}))
    except Exception as e:
        return {"model": name, "status": "does not build", "reason": f"{type(e).__name__}: {str(e)[:200]}"}
    try:
        status, reason = check(model, method, **OPTIONS.get(method, {})), ""
    except ValueError as e:
        status, reason = "refused", str(e)
    except Exception as e:
        status, reason = "failed", f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
    sites = len(getattr(model, "adapters", {}) or {})
    return {"model": name, "class": type(model).__name__, "status": status, "reason": reason, "sites": sites,
            "seconds": round(time.perf_counter() - t, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--method", default="mslora")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "placement_sweep.json"))
    ap.add_argument("--only", nargs="*", help="model names instead of one per timm module")
    args = ap.parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    models = {n: n for n in args.only} if args.only else pick_smallest()
    rows = []
    for module, name in models.items():
        row = {"module": module, **run(name, args.method)}
        rows.append(row)
        print(f"{module:28s} {name:36s} {row['status']:8s} {row.get('sites', 0):3d} {row['reason'][:110]}", flush=True)
    counts = {s: sum(r["status"] == s for r in rows) for s in ("ok", "refused", "failed", "does not build")}
    print(json.dumps(counts))
    if not args.only:
        Path(args.out).write_text(json.dumps({"method": args.method, "options": OPTIONS.get(args.method, {}),
                                              "timm": timm.__version__, "torch": torch.__version__,
                                              "counts": counts, "rows": rows}, indent=1))


if __name__ == "__main__":
    sys.exit(main())
