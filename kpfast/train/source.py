"""Stage 1 of ``--method adaptation``: the core detector, trained on the source with all its labels or loaded.

``source`` is either

- a kpfast run folder, ``model.pt`` or ``checkpoint.pt`` of a trained keypoint detector
  (``--method full``, ``supervised`` or ``autolink-few``): read with
  :func:`kpfast.checkpoint.load_checkpoint` (tensors and plain values only, checksum
  verified: loading never runs code); its detector must have the architecture of the
  adaptation run (``detector_widths``, ``detector_up_widths``, ``norm``); or
- a dataset (``face``, ``animal``, ``car`` or a real-format path, as ``dataset``): the core
  detector is kpfast's detector trained on it by ``--method supervised`` with every
  labelled training image (``--without kmeans``: the labelled set is all of them), for
  ``source_iterations`` steps, with seed and data seed ``source_seed``, at the run's
  image size, data sizes and detector architecture (the rest from the run's preset).
  It is a kpfast run of its own, cached under ``<cache root>/sources/<dataset>-<key>/``
  (the key: a digest of that config), so every adaptation run with the same source
  reuses it; an interrupted one resumes, and two processes wanting the same source take
  turns (the second waits, then loads what the first trained). Under ``torchrun`` every
  process takes part in training it.

A folder holding a run folder or checkpoint file wins over a dataset of the same name.
"""

from __future__ import annotations

import contextlib
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

from torch import Tensor

from ..checkpoint import (CHECKPOINT_NAME, MODEL_NAME, CheckpointError, content_digest, load_checkpoint,
                          resolve_checkpoint_path)
from ..config import RUN_FIELDS, TrainConfig
from ..data import open_dataset
from ..data.cache import cache_key, cache_root
from ..data.few_shot import labeled_counts
from ..methods import DETECTOR_INFERENCE, method
from .distributed import World
from .run_folder import METRICS_NAME, read_record
from .streams import global_rng_state, set_global_rng_state

SOURCE_FOLDER = "sources"
ARCHITECTURE = ("detector_widths", "detector_up_widths", "norm")
"""The fields a source detector must share with the adaptation run (its body becomes the run's)."""
INHERITED = ("image_size", "train_size", "test_size", "cache_dir", "detector_widths", "detector_up_widths", "norm",
             "depth_scale", "channels_last", "ops", "device", "eval_batch", "log_every", "checkpoint_every", "progress")
"""The fields a source detector trained here takes from the adaptation run (the rest from its preset)."""


@dataclass
class SourceDetector:
    """The core detector: ``state`` (a :class:`~kpfast.models.KeypointDetector` state dict) and ``info``
    (plain values for ``metrics.json`` and checkpoints: what it is, where it came from, its test metrics)."""

    state: dict[str, Tensor]
    info: dict


def is_checkpoint(spec: str) -> bool:
    """Whether ``source`` names a checkpoint (a file, or a folder with ``model.pt``/``checkpoint.pt``)."""
    path = Path(spec).expanduser()
    return path.is_file() or (path.is_dir() and any((path / n).is_file() for n in (MODEL_NAME, CHECKPOINT_NAME)))


def prepare_source(cfg: TrainConfig, world: World) -> SourceDetector:
    """The core detector of ``cfg`` (see the module docstring); collective under ``torchrun``.

    Training it draws random numbers; the global random states (torch, CUDA, numpy, Python)
    are restored afterwards, so the adaptation run draws the same whether its source was
    trained now or loaded from the cache.
    """
    t0 = time.perf_counter()
    with _isolated_random_state():
        if is_checkpoint(cfg.source):
            source = load_source_checkpoint(Path(cfg.source).expanduser(), cfg)
        else:
            source = _trained_source(cfg, world)
    source.info["seconds_this_run"] = time.perf_counter() - t0
    return source


def load_source_checkpoint(path: Path, cfg: TrainConfig) -> SourceDetector:
    """A trained detector's weights from a kpfast run folder, ``model.pt`` or ``checkpoint.pt``.

    Raises:
        kpfast.checkpoint.CheckpointError: the file is unsafe or damaged (see
            :func:`~kpfast.checkpoint.load_checkpoint`), not a keypoint detector, or one of another
            architecture than ``cfg``'s (the message names the file and the fields).
    """
    path = resolve_checkpoint_path(path)
    ckpt = load_checkpoint(path, map_location="cpu")
    src = TrainConfig.from_dict(ckpt["config"])
    where = f"--source {path}"
    if method(src.method).inference != DETECTOR_INFERENCE:
        raise CheckpointError(f"{where}: a run of method {src.method!r}, whose network is not kpfast's keypoint "
                              "detector; give a run of --method full, supervised or autolink-few")
    differ = [f"{f}: {getattr(src, f)!r} (source) vs {getattr(cfg, f)!r}" for f in ARCHITECTURE
              if getattr(src, f) != getattr(cfg, f)]
    if differ:
        raise CheckpointError(f"{where}: its detector has another architecture than this run's ({'; '.join(differ)}); "
                              "set this run's fields to the source's (--set FIELD=...)")
    state = ckpt["model"]
    if ckpt["kind"] == "training":
        state = {k[len("detector."):]: v for k, v in state.items() if k.startswith("detector.")}
    info = {"spec": cfg.source, "kind": "checkpoint", "path": str(path.resolve()), "sha256": content_digest(ckpt),
            "step": ckpt["step"], "config": _science(ckpt["config"]), **_metrics_of(path.parent)}
    return SourceDetector(state=state, info=info)


def source_folder(cfg: TrainConfig) -> Path:
    """Where the source detector of ``cfg`` (a dataset source) is cached."""
    key = cache_key(_science(source_config(cfg, shots=1, out="-").to_dict(), drop=("shots",)))[:16]
    name = re.sub(r"[^A-Za-z0-9]+", "-", Path(cfg.source).name if "/" in cfg.source else cfg.source).strip("-")
    return cache_root(cfg.cache_dir) / SOURCE_FOLDER / f"{name or 'source'}-{key}"


def source_config(cfg: TrainConfig, *, shots: int, out: str) -> TrainConfig:
    """The config that trains ``cfg``'s source detector: ``--method supervised --without kmeans`` on
    ``cfg.source`` with ``shots`` (all) labelled images, ``source_iterations`` steps, seed and data
    seed ``source_seed``, the fields of :data:`INHERITED` from ``cfg``, the rest from its preset."""
    return TrainConfig.from_preset(
        cfg.preset or "paper", **{f: getattr(cfg, f) for f in INHERITED}, dataset=cfg.source, method="supervised",
        without=("kmeans",), shots=shots, iterations=cfg.source_iterations or cfg.iterations, seed=cfg.source_seed,
        data_seed=cfg.source_seed, out=out, resume=True)


def _trained_source(cfg: TrainConfig, world: World) -> SourceDetector:
    folder = source_folder(cfg)
    with _turn(folder, world):
        plan = None
        if world.is_main:
            train = open_dataset(cfg.source, "train", image_size=cfg.image_size, size=cfg.train_size,
                                 seed=cfg.source_seed, cache_dir=cfg.cache_dir, progress=cfg.progress)
            shots = int((labeled_counts(train) > 0).sum())
            if shots == 0:
                raise ValueError(f"--source {cfg.source}: none of its {len(train)} training images has a labelled "
                                 "keypoint; the core detector needs labels")
            src = source_config(cfg, shots=shots, out=str(folder))
            plan = (src.to_dict(), not _finished(folder, src))
        src_dict, needs_training = world.broadcast(plan)
        src = TrainConfig.from_dict(src_dict)
        t0 = time.perf_counter()
        if needs_training:
            from .loop import trainer_class

            if world.is_main:
                print(f"kpfast train: stage 1: training the source detector on {cfg.source} ({src.shots} labelled "
                      f"images, {src.iterations} steps) into {folder}", flush=True)
            trainer_class(src)(src).run()
        elif world.is_main:
            print(f"kpfast train: stage 1: the source detector on {cfg.source} is cached in {folder}", flush=True)
        world.barrier()
        ckpt = load_checkpoint(folder / MODEL_NAME, map_location="cpu")
    info = {"spec": cfg.source, "kind": "trained", "path": str(folder.resolve()), "sha256": content_digest(ckpt),
            "step": ckpt["step"], "config": _science(src_dict), "trained_now": needs_training,
            "training_seconds_this_run": time.perf_counter() - t0 if needs_training else 0.0, **_metrics_of(folder)}
    return SourceDetector(state=ckpt["model"], info=info)


def _finished(folder: Path, src: TrainConfig) -> bool:
    """Whether ``folder`` holds a finished run of ``src`` with its ``model.pt``."""
    try:
        record = read_record(folder) if folder.is_dir() else None
    except ValueError:
        return False
    return (record is not None and record.get("status") == "finished" and (folder / MODEL_NAME).is_file()
            and _science(record["config"]) == _science(src.to_dict()))


def _metrics_of(folder: Path) -> dict:
    """The source run's test metrics and wall time from its ``metrics.json`` (empty when there is none)."""
    try:
        m = json.loads((folder / METRICS_NAME).read_text())
        return {"dataset": m["dataset"], "keypoints": m["keypoints"], "labeled_images": m["shots"],
                "test": {k: m["test"][k] for k in ("nme", "pck@0.1", "spread")},
                "wall_time_s": m["wall_time_s"]["total"]}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def _science(config: dict, drop: tuple = ()) -> dict:
    full = TrainConfig.from_dict(config).to_dict()
    return {k: v for k, v in full.items() if k not in RUN_FIELDS and k not in drop}


@contextlib.contextmanager
def _turn(folder: Path, world: World) -> Iterator[None]:
    """Rank 0 holds an exclusive lock on ``<folder>.lock`` (waiting for it if another process has it)."""
    lock = None
    if world.is_main:
        import fcntl

        folder.parent.mkdir(parents=True, exist_ok=True)
        lock = open(folder.parent / f"{folder.name}.lock", "a+")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            print(f"kpfast train: waiting for another process training the source detector in {folder}", flush=True)
            fcntl.flock(lock, fcntl.LOCK_EX)
    try:
        yield
    finally:
        if lock is not None:
            lock.close()


@contextlib.contextmanager
def _isolated_random_state() -> Iterator[None]:
    state = global_rng_state()
    try:
        yield
    finally:
        set_global_rng_state(state)


def source_summary(info: Optional[dict]) -> str:
    """One line about a source detector's ``info``, for the log."""
    if not info:
        return "no source detector (trained from scratch)"
    test = info.get("test")
    quality = f", its test NME on {info.get('dataset')} {test['nme']:.2f} %" if test and test.get("nme") is not None \
        else ""
    return f"source detector: {info['kind']} {info['path']}{quality}"
