"""On-disk cache of generated datasets: keyed, atomic, memory-mapped.

The cache root is, in order: the ``cache_dir`` argument, the ``KPFAST_CACHE``
environment variable, ``~/.cache/kpfast``. An entry is a folder of ``.npy`` arrays
plus ``key.json`` (every parameter that produced it, and the SHA-256 of each
``.npy`` file as written). It is written into a temporary folder next to its final
place and renamed into place only when complete, so an interrupted generation
never leaves a half-written entry behind; two processes generating the same entry
at once both succeed (the second rename loses and its copy is dropped).

Every read hashes the files again and compares: an entry whose bytes changed in
any way (a flipped bit, zeroed flags, an edited image) warns and is regenerated,
never used. Entries of an older :data:`CACHE_FORMAT` have other names and are left
alone (they may belong to runs of older code).
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

__all__ = ["cache_root", "cache_key", "cached_arrays", "CACHE_FORMAT"]

# part of every entry's key: bump when the layout of an entry changes (2: per-file SHA-256 in key.json)
CACHE_FORMAT = 2


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


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _load(folder: Path, names) -> dict:
    return {n: np.load(folder / f"{n}.npy", mmap_mode="r") for n in names}


def _load_verified(folder: Path, info: dict) -> dict:
    """The entry's arrays, after checking every file against the SHA-256 in ``key.json``."""
    digests = info["sha256"]
    for name in info["arrays"]:
        got = _file_sha256(folder / f"{name}.npy")
        if got != digests[name]:
            raise ValueError(f"{name}.npy has SHA-256 {got[:12]}..., key.json recorded {digests[name][:12]}...")
    return _load(folder, info["arrays"])


def _discard(folder: Path) -> None:
    """Move a damaged entry aside (a rename: readers that hold it mapped keep their view) and delete it."""
    trash = folder.with_name(f".damaged-{folder.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        os.rename(folder, trash)
    except OSError:
        return  # another process moved it first
    shutil.rmtree(trash, ignore_errors=True)


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
        ``(arrays, folder, was_cached)``; arrays are read-only memory maps, verified
        against the SHA-256 of each file recorded when the entry was written.
    """
    root = cache_root(cache_dir)
    key = cache_key({"params": params, "cache_format": CACHE_FORMAT})
    folder = root / f"{prefix}-{key[:16]}"
    index = folder / "key.json"
    if index.exists():
        try:
            info = json.loads(index.read_text())
            return _load_verified(folder, info), folder, True
        except Exception as e:  # a damaged entry (edited by hand, disk full, bit rot): rebuild it
            warnings.warn(f"kpfast cache entry {folder} is damaged ({type(e).__name__}: {e}); regenerating it")
            _discard(folder)
    arrays = {k: np.ascontiguousarray(v) for k, v in build().items()}
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp-{prefix}-{key[:16]}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        digests = {}
        for name, arr in arrays.items():
            with open(tmp / f"{name}.npy", "wb") as fh:
                np.save(fh, arr)
                fh.flush()
                os.fsync(fh.fileno())
            digests[name] = _file_sha256(tmp / f"{name}.npy")
        (tmp / "key.json").write_text(json.dumps({"params": params, "key": key, "cache_format": CACHE_FORMAT,
                                                  "arrays": sorted(arrays), "sha256": digests}, indent=1,
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
