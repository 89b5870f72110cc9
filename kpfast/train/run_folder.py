"""The run folder (``out``): which run it holds, and never two runs at once.

``run.json`` records the config of the run a folder holds and whether it finished.
Before anything is written, :func:`open_run_folder` checks what the folder holds:

- nothing of kpfast's (missing or only other files): a new run starts;
- a run and ``overwrite``: the old run's files (and only kpfast's files) are
  deleted first, so the folder never mixes two runs;
- a run and ``resume``: it continues if the configs agree (the differing fields
  are named otherwise); with no checkpoint yet, it restarts from step 0 in a
  cleared folder;
- a run and neither: refused, saying what the folder holds and what to pass.

While a run trains, it holds an exclusive lock on ``out/.kpfast.lock`` (released by
the OS when the process dies, even by ``kill -9``), so a second run into the same
folder is refused instead of interleaving its files; with the lock held, the
temporary files a killed checkpoint write left behind are removed.
"""

from __future__ import annotations

import datetime
import json
import os
from pathlib import Path
from typing import Optional

from ..checkpoint import AUTOENCODER_NAME, CHECKPOINT_NAME, MODEL_NAME, atomic_write, remove_stale_temporaries
from ..config import TrainConfig, run_differences
from .run_log import LOG_NAME

RUN_RECORD = "run.json"
METRICS_NAME = "metrics.json"
PICTURES = ("predictions.png", "reconstructions.png", "edge_maps.png", "heatmaps.png", "landmarks.png")
SNAPSHOT_FOLDER = "images"
"""``images/stepNNNNNN_<picture>``: the PNG snapshots of ``image_every``."""
TENSORBOARD_FOLDER = "tb"
LOCK_NAME = ".kpfast.lock"
RUN_FILES = (RUN_RECORD, METRICS_NAME, MODEL_NAME, CHECKPOINT_NAME, AUTOENCODER_NAME, LOG_NAME) + PICTURES
"""The files a run writes at the top of its folder."""
ATOMIC_FILES = (RUN_RECORD, MODEL_NAME, CHECKPOINT_NAME, AUTOENCODER_NAME)
"""The files written through :func:`~kpfast.checkpoint.atomic_write` (temporaries ``.NAME.*.tmp``)."""


class RunFolderError(ValueError):
    """The run folder holds another run (or is in use); the message says what to pass instead."""


def run_files(out: Path) -> list[Path]:
    """The files of a kpfast run in ``out`` (nothing else the folder may hold)."""
    found = [out / n for n in RUN_FILES if (out / n).is_file()]
    found += sorted(p for p in (out / TENSORBOARD_FOLDER).glob("events.out.tfevents.*") if p.is_file())
    found += sorted(p for name in PICTURES for p in (out / SNAPSHOT_FOLDER).glob(f"step*_{name}") if p.is_file())
    return found


def clear_run(out: Path) -> None:
    """Delete the files of the run in ``out`` (see :func:`run_files`) and their empty subfolders."""
    for p in run_files(out):
        p.unlink()
    remove_stale_temporaries(out, ATOMIC_FILES)
    for sub in (TENSORBOARD_FOLDER, SNAPSHOT_FOLDER):
        if (out / sub).is_dir() and not any((out / sub).iterdir()):
            (out / sub).rmdir()


def read_record(out: Path) -> Optional[dict]:
    """``out/run.json`` (None if absent); :class:`RunFolderError` if it is not one kpfast wrote."""
    path = out / RUN_RECORD
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
        TrainConfig.from_dict(record["config"])
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise RunFolderError(f"{path}: not a kpfast run record ({type(e).__name__}: {e}); pass --overwrite to "
                             "replace the run in this folder") from None
    return record


def write_record(out: Path, cfg: TrainConfig, status: str, **extra) -> None:
    record = {"format": "kpfast run", "version": 1, "status": status, "config": cfg.to_dict(), **extra}
    atomic_write(out / RUN_RECORD, lambda f: f.write(json.dumps(record, indent=1).encode()))


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


class RunLock:
    """An exclusive ``flock`` on ``out/.kpfast.lock`` (no-op where ``fcntl`` does not exist)."""

    def __init__(self, out: Path):
        self.file = None
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX
            return
        f = open(out / LOCK_NAME, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            holder = f.read().strip() or "unknown"
            f.close()
            raise RunFolderError(f"{out}: another kpfast run is training into this folder (process {holder}); "
                                 "wait for it to finish or choose another --out") from None
        f.truncate(0)
        f.write(str(os.getpid()))
        f.flush()
        self.file = f

    def release(self) -> None:
        if self.file is not None:
            self.file.close()  # closing the file releases the flock
            self.file = None


class RunFolder:
    """The folder of one run, checked and locked (see the module docstring). ``out=None``: no folder."""

    def __init__(self, out: Optional[Path], lock: Optional[RunLock] = None):
        self.out, self.lock = out, lock

    def start(self, cfg: TrainConfig) -> None:
        """Record that ``cfg`` is training here (``run.json`` status ``started``)."""
        if self.out is not None:
            write_record(self.out, cfg, "started", started=_now())

    def finish(self, cfg: TrainConfig) -> None:
        """Record that the run finished (``run.json`` status ``finished``)."""
        if self.out is not None:
            record = read_record(self.out) or {}
            write_record(self.out, cfg, "finished", started=record.get("started"), finished=_now())

    def close(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None


def prepare_run_folder(cfg: TrainConfig) -> RunFolder:
    """Check, lock and (for ``overwrite``, or a ``resume`` without checkpoint) clear ``cfg.out``.

    Call on the process that writes (rank 0) before anything is written.

    Raises:
        RunFolderError: ``out`` is a file, is in use by another run, or holds another
            run and neither ``overwrite`` nor a matching ``resume`` says what to do.
    """
    if cfg.out is None:
        return RunFolder(None)
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise RunFolderError(f"--out {out}: exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    lock = RunLock(out)
    try:
        remove_stale_temporaries(out, ATOMIC_FILES)
        _check_or_clear(out, cfg)
    except BaseException:
        lock.release()
        raise
    return RunFolder(out, lock)


def _check_or_clear(out: Path, cfg: TrainConfig) -> None:
    files = run_files(out)
    if not files:
        return
    if cfg.overwrite:
        clear_run(out)
        return
    record = read_record(out)
    if record is None:
        if cfg.resume and (out / CHECKPOINT_NAME).is_file():
            return  # the checkpoint's own config is checked when it is loaded
        raise RunFolderError(f"--out {out}: holds files of a kpfast run ({', '.join(p.name for p in files[:4])}"
                             f"{', ...' if len(files) > 4 else ''}) without its {RUN_RECORD}; pass --overwrite to "
                             "replace them or choose another --out")
    differences = run_differences(record["config"], cfg.to_dict())
    what = f"a {record.get('status', 'started')} run"
    if differences:
        raise RunFolderError(f"--out {out}: holds {what} of a different config ({'; '.join(differences)}); pass "
                             "--overwrite to replace it or choose another --out")
    if not cfg.resume:
        hint = "--resume to continue it, " if record.get("status") != "finished" else ""
        raise RunFolderError(f"--out {out}: holds {what} of this config; pass {hint}--overwrite to train it "
                             "again from step 0, or choose another --out")
    if not (out / CHECKPOINT_NAME).is_file():
        clear_run(out)  # resuming a run that never wrote a checkpoint: it restarts from step 0
