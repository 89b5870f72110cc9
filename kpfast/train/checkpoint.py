"""Checkpoints: atomic writes, and every random stream a run needs to resume bit for bit.

A training checkpoint holds the model, the optimizer, the step, the config, the
dataset meta, the few-shot indices, the data samplers' positions and the state of
every random stream (the run's own generator per rank, torch's global CPU and
CUDA generators, numpy's and Python's). It is written to a temporary file in the
same directory and moved into place with ``os.replace``, so a crash mid-write
never leaves a truncated checkpoint behind.
"""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

CHECKPOINT_NAME = "checkpoint.pt"
MODEL_NAME = "model.pt"
FORMAT_VERSION = 1


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file beside ``path``, then ``os.replace`` it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def global_rng_state() -> dict:
    """torch (CPU and CUDA), numpy and Python global random states."""
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_global_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_checkpoint(path: str | os.PathLike, map_location: Optional[str | torch.device] = "cpu") -> dict:
    """Read a checkpoint written by the trainer (training or model file), with a clear error."""
    path = Path(path)
    if path.is_dir():
        for name in (MODEL_NAME, CHECKPOINT_NAME):
            if (path / name).is_file():
                path = path / name
                break
    if not path.is_file():
        raise FileNotFoundError(f"no kpfast checkpoint at {str(path)!r} (a run directory holds {MODEL_NAME} "
                                f"and {CHECKPOINT_NAME})")
    ckpt = torch.load(path, map_location=map_location, weights_only=False)
    if not isinstance(ckpt, dict) or ckpt.get("format") != "kpfast" or "model" not in ckpt:
        raise ValueError(f"{path} is not a kpfast checkpoint")
    if ckpt.get("version", 0) > FORMAT_VERSION:
        raise ValueError(f"{path} was written by a newer kpfast (format {ckpt['version']} > {FORMAT_VERSION})")
    return ckpt
