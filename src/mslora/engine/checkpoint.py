"""Checkpoints that survive a crash: one dict with everything resume needs, written atomically, read safely.

Written with ``torch.save`` to a temporary file in the same directory, flushed to disk, then renamed over the
previous checkpoint (``os.replace`` is atomic on POSIX), so a crash while writing leaves the last good one.
Read with ``torch.load(weights_only=True)``: a checkpoint holds only tensors and plain Python values, and a
file that needs code execution to load is refused.
"""
from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mslora.core.state import user_mode

FORMAT = "mslora.checkpoint/1"


def atomic_write(path: Path, write) -> None:
    """Call ``write(tmp_path)`` then rename the temporary file over ``path`` (after an fsync), with the mode any
    file the user writes gets (0666 less the umask: writers such as safetensors make 0600 temporary files).

    Raises:
        OSError: the write failed (a full disk: torch.save raises RuntimeError): the temporary file is removed and
            ``path`` keeps what it held.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        user_mode(tmp)
    except (OSError, RuntimeError) as e:
        tmp.unlink(missing_ok=True)
        reason = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise OSError(f"cannot write '{path}': {reason}") from None  # torch.save's "file write failed": disk full
    os.replace(tmp, path)


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write ``state`` (tensors and plain values only) atomically to ``path``."""
    atomic_write(path, lambda tmp: torch.save({"format": FORMAT, **state}, tmp))


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`.

    Raises:
        FileNotFoundError: no such file.
        ValueError: truncated or altered file, a file that needs code execution to load (refused, not run), or
            not an mslora checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint '{path}' does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle / zip errors of a damaged file, or the weights_only refusal
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        why = ("it needs code execution to load (refused)" if "weights_only" in str(e) or "Unsupported global" in str(e)
               else f"it is truncated or damaged ({type(e).__name__}: {first})")
        raise ValueError(f"cannot read checkpoint '{path}': {why}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"'{path}' is not an mslora checkpoint (expected format {FORMAT})")
    return state


def rng_state() -> dict[str, Any]:
    """Every random generator's state of this process: Python, NumPy, torch CPU and CUDA, as plain Python values
    (lists of ints), so that it pickles across processes (``gather_object``) and loads with ``weights_only``."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (kind, keys.tolist(), pos, has_gauss, cached),
        "torch": torch.get_rng_state().tolist(),
        "cuda": [s.tolist() for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])
