"""Checkpoints: atomic writes, a checksum of their contents, and safe, validated loading.

The file format both sides share: training writes it (:mod:`kpfast.train`), inference
reads it (:func:`kpfast.load`), so it lives outside both.

A training checkpoint (``checkpoint.pt``, ``kind: "training"``) holds the model, the
optimizer(s), the step, the config, the dataset meta, the few-shot indices, the data
samplers' positions and the state of every random stream (the run's own generator
per rank, torch's global CPU and CUDA generators, numpy's and Python's); a model file
(``model.pt``, ``kind: "model"``) holds what inference needs; a 3fabrec run also writes its
stage-1 autoencoder (``autoencoder.pt``, ``kind: "autoencoder"``) for later runs to reuse. All are plain
containers of tensors and JSON-like values, so they load with
``torch.load(weights_only=True)`` (:mod:`kpfast.safe_load`): reading a file can never
run code from it.

Each file carries ``sha256``, a digest of everything else in it (every tensor's dtype,
shape and bytes and every other value, in a fixed order), checked on load: a file
damaged after it was written is refused, naming the file. Files are written to a
temporary file beside the target and moved into place with ``os.replace``, so a
crash mid-write never leaves a truncated file; :func:`remove_stale_temporaries` cleans
up the temporary files a killed writer leaves behind.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterable, Optional

import torch

from .safe_load import LoadError, load_tensor_file

CHECKPOINT_NAME = "checkpoint.pt"
MODEL_NAME = "model.pt"
AUTOENCODER_NAME = "autoencoder.pt"
FORMAT_VERSION = 2
"""2: plain containers only (numpy's random state as a tensor), ``sha256`` of the contents."""
CHECKSUM_KEY = "sha256"
REQUIRED_KEYS = {
    "model": ("format", "version", "kind", "step", "config", "meta", "model"),
    "training": ("format", "version", "kind", "step", "config", "meta", "model", "optimizer", "labeled", "selection",
                 "labeled_stream", "rng", "world_size"),
    "autoencoder": ("format", "version", "kind", "step", "config", "meta", "model"),
}


class CheckpointError(LoadError):
    """A checkpoint is unsafe, damaged, inconsistent or not a kpfast checkpoint (the message names the file)."""


# -- writing ---------------------------------------------------------------------------------------

def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> None:
    """``write(f)`` into a temporary file beside ``path`` (``.NAME.*.tmp``), fsync, then ``os.replace`` it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` through :func:`atomic_write`."""
    atomic_write(path, lambda f: torch.save(obj, f))


def remove_stale_temporaries(folder: str | os.PathLike, names: Iterable[str]) -> list[Path]:
    """Delete the temporary files :func:`atomic_write` left in ``folder`` for the files ``names``
    (a writer killed mid-write leaves ``.NAME.*.tmp``); returns what was removed."""
    folder = Path(folder)
    removed = []
    for name in names:
        for tmp in folder.glob(f".{name}.*.tmp"):
            if tmp.is_file():
                tmp.unlink()
                removed.append(tmp)
    return removed


def content_digest(obj: Any) -> str:
    """sha256 of a tree of dicts, lists, tuples, tensors, str, int, float, bool and None.

    Covers every tensor's dtype, shape and bytes, every other value and the tree's
    structure (keys in insertion order, which ``torch.save``/``torch.load`` keep).

    Example:
        >>> a = {"w": torch.ones(2), "step": 3}
        >>> content_digest(a) == content_digest({"w": torch.ones(2), "step": 3})
        True
        >>> content_digest(a) == content_digest({"w": torch.tensor([1.0, 1.0 + 2**-23]), "step": 3})
        False
    """
    h = hashlib.sha256()

    def feed(tag: str, data: bytes = b"") -> None:
        h.update(f"{tag}:{len(data)}:".encode())
        h.update(data)

    def walk(x: Any) -> None:
        if isinstance(x, torch.Tensor):
            t = x.detach().to("cpu").contiguous()
            feed(f"tensor {t.dtype} {tuple(t.shape)}")
            h.update(t.reshape(-1).view(torch.uint8).numpy())
        elif isinstance(x, dict):
            feed("dict", str(len(x)).encode())
            for k, v in x.items():
                walk(k)
                walk(v)
        elif isinstance(x, (list, tuple)):
            feed(type(x).__name__, str(len(x)).encode())
            for v in x:
                walk(v)
        elif x is None or isinstance(x, (bool, int, float, str)):
            feed(type(x).__name__, repr(x).encode())
        else:
            raise TypeError(f"a kpfast checkpoint holds no {type(x).__name__} values")

    walk(obj)
    return h.hexdigest()


def save_checkpoint_file(state: dict, path: str | os.PathLike) -> None:
    """Write a checkpoint dict (see the module docstring) with its checksum, atomically."""
    atomic_save({**state, CHECKSUM_KEY: content_digest(state)}, path)


# -- reading ---------------------------------------------------------------------------------------

def resolve_checkpoint_path(path: str | os.PathLike) -> Path:
    """A run directory -> its ``model.pt`` (else ``checkpoint.pt``); a file stays itself."""
    path = Path(path)
    if path.is_dir():
        for name in (MODEL_NAME, CHECKPOINT_NAME):
            if (path / name).is_file():
                return path / name
    if not path.is_file():
        raise FileNotFoundError(f"no kpfast checkpoint at {str(path)!r} (a run directory holds {MODEL_NAME} "
                                f"and {CHECKPOINT_NAME})")
    return path


def load_checkpoint(path: str | os.PathLike, map_location: Optional[str | torch.device] = "cpu") -> dict:
    """Read and verify a file the trainer wrote (a run directory, its ``model.pt`` or ``checkpoint.pt``).

    Loads only tensors and plain containers (no code can run), then checks the
    format and version, the checksum, the keys its kind needs, its config, and
    that its step lies in ``[0, config.iterations]``.

    Raises:
        FileNotFoundError: nothing at ``path``.
        CheckpointError: anything else; the message names the file and what is wrong.
    """
    from .config import TrainConfig

    path = resolve_checkpoint_path(path)

    def bad(msg: str) -> CheckpointError:
        return CheckpointError(f"{path}: {msg}")

    try:
        ckpt = load_tensor_file(path, what="kpfast checkpoint", map_location=map_location,
                                hint=f"kpfast reads only the {MODEL_NAME} and {CHECKPOINT_NAME} files it writes")
    except LoadError as e:
        raise CheckpointError(str(e)) from e.__cause__
    if not isinstance(ckpt, dict) or ckpt.get("format") != "kpfast":
        raise bad("not a kpfast checkpoint (kpfast writes model.pt and checkpoint.pt into a run directory)")
    version = ckpt.get("version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise bad(f"written by a newer kpfast (format {version!r}; this kpfast reads format {FORMAT_VERSION})")
    if version < FORMAT_VERSION:
        raise bad(f"written by an older kpfast (format {version}, before checksums and safe loading); "
                  "train it again with this version")
    stored = ckpt.pop(CHECKSUM_KEY, None)
    if not isinstance(stored, str):
        raise bad(f"no '{CHECKSUM_KEY}' checksum: the file was not written by kpfast or was altered")
    try:
        actual = content_digest(ckpt)
    except TypeError as e:
        raise bad(f"unexpected content: {e}") from None
    if actual != stored:
        raise bad("damaged: its contents do not match the checksum stored in it (the file changed after kpfast "
                  "wrote it); use another copy or an earlier run")
    kind = ckpt.get("kind")
    if kind not in REQUIRED_KEYS:
        raise bad(f"unknown kind {kind!r} (expected one of {sorted(REQUIRED_KEYS)})")
    missing = [k for k in REQUIRED_KEYS[kind] if k not in ckpt]
    if missing:
        raise bad(f"a {kind} checkpoint without {missing}")
    try:
        cfg = TrainConfig.from_dict(ckpt["config"])
    except (TypeError, ValueError) as e:
        raise bad(f"invalid config: {e}") from None
    step = ckpt["step"]
    if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step <= cfg.iterations:
        raise bad(f"step {step!r} is outside [0, {cfg.iterations}] (its config's iterations)")
    if kind == "training":
        ws, rng = ckpt["world_size"], ckpt["rng"]
        if isinstance(ws, bool) or not isinstance(ws, int) or ws < 1 or not isinstance(rng, list) or len(rng) != ws:
            raise bad(f"world_size {ws!r} does not match its random states (one per process)")
    return ckpt
