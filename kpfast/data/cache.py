"""On-disk cache of generated datasets: keyed, atomic, memory-mapped.

The cache root is, in order: the ``cache_dir`` argument, the ``KPFAST_CACHE``
environment variable, ``~/.cache/kpfast``. An entry is a folder of ``.npy`` arrays
plus ``key.json`` (every parameter that produced it). It is written into a
temporary folder next to its final place and renamed into place only when
complete, so an interrupted generation never leaves a half-written entry behind;
two processes generating the same entry at once both succeed (the second rename
loses and its copy is dropped).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
import warnings
from pathlib import Path
from typing import Callable, Mapping, Optional

import numpy as np

__all__ = ["cache_root", "cache_key", "cached_arrays"]


def cache_root(cache_dir: Optional[str | os.PathLike] = None) -> Path:
    """The cache folder: ``cache_dir`` > ``$KPFAST_CACHE`` > ``~/.cache/kpfast``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("KPFAST_CACHE")
    if env:
        return Path(env).expanduser()
    return Path("~/.cache/kpfast").expanduser()


def cache_key(params: Mapping) -> str:
    """SHA-256 of the canonical JSON of ``params`` (sorted keys)."""
    blob = json.dumps(params, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def _load(folder: Path, names) -> dict:
    return {n: np.load(folder / f"{n}.npy", mmap_mode="r") for n in names}


def cached_arrays(params: Mapping, build: Callable[[], Mapping[str, np.ndarray]], *, prefix: str,
                  cache_dir: Optional[str | os.PathLike] = None) -> tuple[dict, Path, bool]:
    """Return the arrays for ``params`` from the cache, building and storing them if absent.

    Args:
        params: everything that determines the arrays (JSON-serializable), including
            a generator version; hashed into the entry's name.
        build: called with no arguments on a miss; returns ``name -> array``.
        prefix: human-readable start of the entry's folder name.
        cache_dir: overrides the cache root (see :func:`cache_root`).

    Returns:
        ``(arrays, folder, was_cached)``; arrays are read-only memory maps.
    """
    root = cache_root(cache_dir)
    key = cache_key(params)
    folder = root / f"{prefix}-{key[:16]}"
    index = folder / "key.json"
    if index.exists():
        try:
            info = json.loads(index.read_text())
            return _load(folder, info["arrays"]), folder, True
        except Exception as e:  # a damaged entry (edited by hand, disk full): rebuild it
            warnings.warn(f"kpfast cache entry {folder} is unreadable ({e}); regenerating it")
            shutil.rmtree(folder, ignore_errors=True)
    arrays = {k: np.ascontiguousarray(v) for k, v in build().items()}
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp-{prefix}-{key[:16]}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        for name, arr in arrays.items():
            with open(tmp / f"{name}.npy", "wb") as fh:
                np.save(fh, arr)
                fh.flush()
                os.fsync(fh.fileno())
        (tmp / "key.json").write_text(json.dumps({"params": params, "key": key, "arrays": sorted(arrays)}, indent=1,
                                                 sort_keys=True, default=str))
        try:
            os.rename(tmp, folder)
        except OSError:
            if not index.exists():
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # another process finished first
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return _load(folder, arrays), folder, False
