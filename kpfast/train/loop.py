"""The training loop: :class:`Trainer` and :func:`run`.

A run: check and lock the run folder ``out`` (:mod:`kpfast.train.run_folder`),
say what the run will do, open the data (generated and cached for procedural
categories), pick the few-shot examples, build the networks, train with Adam for
``iterations`` steps (checkpointing atomically every ``checkpoint_every`` steps,
behind the NaN guard of :mod:`kpfast.train.guard`), evaluate the last model on the
test split (no model selection), and write ``metrics.json``, ``model.pt``,
``log.csv``, TensorBoard events and PNGs into ``out`` (``run.json`` records the run).
"""

from __future__ import annotations

import json
import math
import os
import platform
import random
import time
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch

from .. import backend
from ..evaluate import COLLAPSE_SPREAD, evaluate, shape_baselines
from ..losses import build_perceptual_loss
from ..models import FewShotKeypointModel
from . import guard
from .announce import StepClock, describe_run
from ..checkpoint import (CHECKPOINT_NAME, FORMAT_VERSION, MODEL_NAME, CheckpointError, load_checkpoint,
                          save_checkpoint_file)
from ..config import TrainConfig, run_differences
from .diagnostics import depth_correlation, term_gradients
from .data import BatchStream, TrainingData, fetch, open_training_data
from .distributed import World, setup
from .guard import NonFiniteLossError
from .objective import Objective
from .run_folder import RunFolder, RunFolderError, prepare_run_folder
from .run_log import RunLog
from .streams import RandomStreams, global_rng_state, set_global_rng_state, stream_seed


def build_model(cfg: TrainConfig, meta) -> FewShotKeypointModel:
    """The networks a config trains (detector always; edge map + UNet with reconstruction)."""
    model = FewShotKeypointModel(
        meta.num_keypoints, meta.edges, cfg.image_size,
        graph="all-pairs" if cfg.method == "autolink-few" else "skeleton", reconstruction=cfg.uses("recon"),
        detector_widths=cfg.detector_widths, detector_up_widths=cfg.detector_up_widths, unet_widths=cfg.unet_widths,
        norm=cfg.norm, depth_scale=cfg.depth_scale)
    return model.to(memory_format=torch.channels_last) if cfg.channels_last else model


def parameter_groups(model: FewShotKeypointModel, cfg: TrainConfig) -> list[dict]:
    """Adam parameter groups: the edge map's ``theta``/``gamma`` at ``edge_lr_scale`` times the
    learning rate (AutoLink's code trains its edge weights 512x faster), everything else at 1x.
    Each group's ``lr_scale`` multiplies :meth:`TrainConfig.lr_at`."""
    edge = [p for p in model.edge_map.parameters()] if model.edge_map is not None else []
    ids = {id(p) for p in edge}
    rest = [p for p in model.parameters() if id(p) not in ids]
    groups = [{"params": rest, "lr": cfg.lr, "lr_scale": 1.0}]
    if edge:
        groups.append({"params": edge, "lr": cfg.lr * cfg.edge_lr_scale, "lr_scale": cfg.edge_lr_scale})
    return groups


def _git_commit() -> Optional[str]:
    import subprocess

    try:
        r = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True,
                           text=True, timeout=5)
        return r.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


class Trainer:
    """One training run of a :class:`TrainConfig` (see the module docstring).

    ``Trainer(cfg).run()`` returns the metrics dict that is also written to
    ``out/metrics.json``. Under ``torchrun`` every process runs it; rank 0 logs,
    checkpoints and evaluates, and holds the lock on ``out`` from construction until
    :meth:`run` returns.
    """

    def __init__(self, cfg: TrainConfig):
        self.t_start = time.perf_counter()
        cfg.validate()  # a TrainConfig is mutable: check what is about to train
        self.cfg = cfg
        self.world: World = setup(cfg.device)
        self.out = Path(cfg.out) if cfg.out else None
        self.folder = self._open_folder()
        try:
            self.resume_checkpoint = self._read_resume_checkpoint()
            if self.world.is_main:
                print(describe_run(cfg, self.world.device, self.world.size,
                                   self.resume_checkpoint["step"] if self.resume_checkpoint else None), flush=True)
            self._build()
            self.folder.start(cfg)
        except BaseException:
            self.folder.close()
            raise

    def _build(self) -> None:
        """Data, networks, optimizer and random streams (restored from the resume checkpoint, if any)."""
        cfg = self.cfg
        self._seed_everything()
        self.data: TrainingData = open_training_data(cfg, self.world)
        self.t_data = time.perf_counter() - self.t_start
        self.meta = self.data.meta
        self.device = self.world.device

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(stream_seed(cfg.seed, "init"))  # identical initial weights on every rank
            self.model = build_model(cfg, self.meta).to(self.device)
        self.perceptual = build_perceptual_loss(cfg.perceptual) if cfg.uses("recon") else None
        if self.perceptual is not None:
            self.perceptual.to(self.device)
        self.objective = Objective(cfg, self.meta, self.perceptual)
        self.optimizer = torch.optim.Adam(parameter_groups(self.model, cfg), lr=cfg.lr, betas=cfg.betas)

        # one generator per kind of draw (transforms, masks, partners), per rank: see streams.py
        self.streams = RandomStreams(cfg.seed, self.world.rank)
        self.unlabeled_batch = 0 if cfg.method == "supervised" else cfg.batch_unlabeled
        self.unlabeled = BatchStream(range(len(self.data.train)), max(self.unlabeled_batch, 1),
                                     seed=stream_seed(cfg.seed, "unlabeled"), rank=self.world.rank,
                                     world_size=self.world.size)
        self.labeled = BatchStream(self.data.labeled, cfg.labeled_batch, seed=stream_seed(cfg.seed, "labeled"))
        self.backend = "reference" if cfg.ops == "reference" else "auto"
        self.step = 0
        self.resumed_from: Optional[int] = None
        if cfg.resume:
            self._restore()

        self.ddp_model = self.model
        if self.world.distributed:
            from torch.nn.parallel import DistributedDataParallel

            self.ddp_model = DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)

    # -- state -----------------------------------------------------------------
    def _seed_everything(self) -> None:
        s = self.cfg.seed + self.world.rank
        torch.manual_seed(s)
        np.random.seed(s)
        random.seed(s)

    def checkpoint_path(self) -> Optional[Path]:
        return self.out / CHECKPOINT_NAME if self.out else None

    def _open_folder(self) -> RunFolder:
        """Check and lock the run folder on rank 0 (see :mod:`kpfast.train.run_folder`); every rank
        raises the same :class:`RunFolderError` if it is refused."""
        folder, problem = RunFolder(None), None
        if self.world.is_main:
            try:
                folder = prepare_run_folder(self.cfg)
            except RunFolderError as e:
                problem = str(e)
        problem = self.world.broadcast(problem)
        if problem is not None:
            folder.close()
            raise RunFolderError(problem)
        return folder

    def _read_resume_checkpoint(self) -> Optional[dict]:
        """The verified checkpoint ``resume`` continues from (None: start at step 0), read before any data."""
        if not self.cfg.resume:
            return None
        path = self.checkpoint_path()
        if not path.is_file():
            if self.world.is_main:
                print(f"kpfast train: --resume: no checkpoint at {path}, starting from step 0", flush=True)
            return None
        ckpt = load_checkpoint(path, map_location=self.world.device)
        changed = run_differences(ckpt["config"], self.cfg.to_dict())
        if changed:
            raise CheckpointError(f"cannot resume {path}: the config differs in {'; '.join(changed)}")
        return ckpt

    def state(self) -> dict:
        """Everything needed to continue bit for bit (collective under DDP: call on every rank)."""
        rng = {"streams": self.streams.state_dict(), "global": global_rng_state(),
               "unlabeled": self.unlabeled.state_dict()}
        return {
            "format": "kpfast", "version": FORMAT_VERSION, "kind": "training",
            "step": self.step, "config": self.cfg.to_dict(), "meta": self.meta.to_dict(),
            "labeled": self.data.labeled, "selection": self.data.selection,
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "labeled_stream": self.labeled.state_dict(), "rng": self.world.gather(rng), "world_size": self.world.size,
        }

    def save_checkpoint(self) -> None:
        """Write ``checkpoint.pt`` atomically (rank 0; every rank contributes its random state),
        unless a parameter or optimizer state is not finite (:class:`NonFiniteLossError`)."""
        self.check_finite_state(f"after step {self.step}, so checkpoint.pt was not written")
        state = self.state()
        if self.world.is_main and self.out is not None:
            save_checkpoint_file(state, self.checkpoint_path())
        self.world.barrier()

    def _restore(self) -> None:
        ckpt, path = self.resume_checkpoint, self.checkpoint_path()
        self.resume_checkpoint = None
        if ckpt is None:
            return
        if ckpt["labeled"] != self.data.labeled:
            raise CheckpointError(f"cannot resume {path}: the few-shot selection differs from the checkpoint's")
        try:
            self.model.load_state_dict(ckpt["model"])
            self.optimizer.load_state_dict(ckpt["optimizer"])
        except (RuntimeError, ValueError, KeyError) as e:
            raise CheckpointError(f"cannot resume {path}: its weights do not fit the model ({e})") from None
        self.labeled.load_state_dict(ckpt["labeled_stream"])
        self.step = int(ckpt["step"])
        self.resumed_from = self.step
        if ckpt["world_size"] == self.world.size:
            rng = ckpt["rng"][self.world.rank]
            self.streams.load_state_dict(rng["streams"])
            set_global_rng_state(rng["global"])
            self.unlabeled.load_state_dict(rng["unlabeled"])
        elif self.world.is_main:
            print(f"kpfast train: resuming a {ckpt['world_size']}-process run with {self.world.size} processes: "
                  "random streams and data order are re-drawn (not bit for bit)", flush=True)

    # -- one step --------------------------------------------------------------
    def next_batch(self) -> dict:
        """``images`` (``U`` unlabelled, then ``L`` labelled), the labelled images' keypoints and
        mask, and ``truth``: every image's annotation, read only by the diagnostics."""
        lab = fetch(self.data.train, self.labeled.next(), self.device)
        parts = [lab]
        if self.unlabeled_batch:
            parts.insert(0, fetch(self.data.train, self.unlabeled.next(), self.device))
        cat = lambda key: torch.cat([p[key] for p in parts])  # noqa: E731
        truth = {"keypoints": cat("keypoints"), "labeled": cat("labeled"), "depth": cat("depth"),
                 "unlabeled": torch.arange(len(cat("labeled")), device=self.device) < (len(parts) - 1) * len(
                     parts[0]["labeled"])}
        return {"images": cat("image"), "labeled_keypoints": lab["keypoints"], "labeled_mask": lab["labeled"],
                "truth": truth}

    def compute_losses(self, batch: dict, step: int) -> tuple[dict, dict]:
        """The unweighted loss terms of ``step`` and the model outputs (see :class:`Objective`)."""
        return self.objective(self.ddp_model, batch, step, self.streams)

    def check_finite(self, terms: dict, step: int) -> None:
        """Raise :class:`NonFiniteLossError` (on every rank) if any term is NaN or infinite."""
        bad = {k: float(v.detach()) for k, v in terms.items() if not math.isfinite(float(v.detach()))}
        if self.world.all_true(not bad):
            return
        names = ", ".join(f"'{k}' = {v}" for k, v in bad.items()) or "a term on another process"
        self._stop(f"non-finite loss at step {step + 1}: {names}")

    def _stop(self, reason: str) -> None:
        path = self.checkpoint_path()
        where = f"the last good checkpoint is {path}" if path is not None and path.exists() else \
            "no checkpoint was written yet"
        raise NonFiniteLossError(f"{reason}; training stopped, {where}")

    def check_update(self, batch: dict, step: int, rng_state: dict) -> None:
        """After backward, before the optimizer step: raise :class:`NonFiniteLossError` (on every
        rank) unless every gradient and parameter is finite, naming the first term whose gradient
        is not (the step is replayed from ``batch`` and the random streams' state ``rng_state``)."""
        params = list(self.model.parameters())
        if self.world.all_true(guard.all_finite([p.grad for p in params] + params)):
            return

        def replay():
            streams = RandomStreams(self.cfg.seed, self.world.rank)
            streams.load_state_dict(rng_state)
            return self.objective(self.model, batch, step, streams)[0], self.objective.weights

        self._stop(guard.explain_update(step, self.model, self.cfg, replay))

    def check_finite_state(self, when: str) -> None:
        """Raise :class:`NonFiniteLossError` (on every rank) if a parameter or optimizer state is not finite."""
        problem = guard.explain_state(self.model, self.optimizer, self.cfg)
        if not self.world.all_true(problem is None):
            self._stop(f"{problem or 'a parameter on another process is not finite'} {when}")

    def diagnose(self, terms: dict, out: dict, batch: dict) -> dict:
        """The scalars of :mod:`kpfast.train.diagnostics` for this step (before its backward)."""
        det, truth = out["detections"], batch["truth"]
        unlabeled_known = truth["labeled"] & truth["unlabeled"][:, None]
        scalars = term_gradients(terms, self.objective.weights, det.keypoints, truth["keypoints"], unlabeled_known)
        scalars["certainty"] = float(torch.sigmoid(det.uncertainty.detach()).mean())
        scalars["depth_corr"] = depth_correlation(det.depth, truth["depth"], truth["labeled"])
        if self.model.edge_map is not None:
            scalars["alpha"] = float(self.model.edge_map.alpha.detach().mean())
            scalars["sigma2"] = float(self.model.edge_map.sigma2.detach())
        return scalars

    def diagnoses(self, step: int) -> bool:
        """Whether (0-based) ``step`` logs diagnostics: every ``diagnostics_every`` steps, single process."""
        every = self.cfg.diagnostics_interval
        return bool(every) and (step + 1) % every == 0 and not self.world.distributed

    def train_step(self, step: int) -> dict:
        """One optimizer step; returns the logged scalars."""
        self.model.train()
        batch = self.next_batch()
        rng_state = self.streams.state_dict()  # to replay the step if its gradient is not finite
        terms, out = self.compute_losses(batch, step)
        self.check_finite(terms, step)
        diagnostics = self.diagnose(terms, out, batch) if self.diagnoses(step) else {}
        total = self.objective.total(terms)
        for group in self.optimizer.param_groups:
            group["lr"] = self.cfg.lr_at(step) * group["lr_scale"]
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        self.check_update(batch, step, rng_state)
        self.optimizer.step()
        scalars = {k: float(v.detach()) for k, v in terms.items()}
        scalars["total"] = float(total.detach())
        scalars["strength"] = self.objective.strength(step) if self.objective.active["geo2d"] else 0.0
        scalars["lr"] = self.cfg.lr_at(step)
        scalars.update(diagnostics)
        return scalars

    # -- the run ---------------------------------------------------------------
    def run(self) -> dict:
        cfg = self.cfg
        log = RunLog(self.out, total=cfg.iterations, start_step=self.step, every=cfg.log_every,
                     progress=cfg.progress, enabled=self.world.is_main, bar_keys={*self.objective.weights, "total"})
        log.message(f"kpfast train: test split: {self.data.test_split}")
        t_train = time.perf_counter()
        first_step = self.step
        clock = StepClock(cfg.iterations, self.step)
        try:
            with backend.use_backend(self.backend):
                while self.step < cfg.iterations:
                    scalars = self.train_step(self.step)
                    self.step += 1
                    log.step(self.step, scalars)
                    estimate = clock.after_step(self.step)
                    if estimate:
                        log.message(estimate)
                    if self.step % cfg.checkpoint_every == 0 or self.step == cfg.iterations:
                        self.save_checkpoint()
                    if cfg.image_every and self.step % cfg.image_every == 0 and self.world.is_main and self.out:
                        self.write_pictures(self.out / "images", prefix=f"step{self.step:06d}_")
                train_s = time.perf_counter() - t_train
                metrics = None
                if self.world.is_main:
                    t_eval = time.perf_counter()
                    metrics = self.evaluate()
                    if self.out is not None:
                        self.write_pictures(self.out)
                        self.save_model()
                    metrics["wall_time_s"] = {
                        "total": time.perf_counter() - self.t_start, "data": self.t_data, "training": train_s,
                        "evaluation": time.perf_counter() - t_eval}
                    metrics["steps_this_run"] = self.step - first_step
                    metrics["seconds_per_step"] = train_s / max(self.step - first_step, 1)
                    if self.out is not None:
                        (self.out / "metrics.json").write_text(json.dumps(metrics, indent=1))
                        self.folder.finish(cfg)
                    test = metrics["test"]
                    collapsed = test["spread"] is not None and test["spread"] < COLLAPSE_SPREAD
                    log.message(f"kpfast train: {cfg.method_label} on {cfg.dataset}, {cfg.shots} shots: test NME "
                                f"{_fmt(test['nme'])} %, PCK@0.1 {_fmt(test['pck@0.1'])} %, spread "
                                f"{_fmt(test['spread'])}" + (" (COLLAPSED: the keypoints shrink toward the object's "
                                                             "centre)" if collapsed else "") +
                                f" ({metrics['wall_time_s']['total']:.0f} s)" + (f"; wrote {self.out}" if self.out else ""))
                    log.scalars("test", {"nme": test["nme"], "pck@0.1": test["pck@0.1"], "spread": test["spread"]},
                                self.step)
                metrics = self.world.broadcast(metrics)
                # no rank tears the process group down while another still has a collective in
                # flight (gloo aborted rank 0 at exit: "terminate called without an active exception")
                self.world.barrier()
        finally:
            log.close()
            self.folder.close()
            self.world.close()
        return metrics

    # -- results ---------------------------------------------------------------
    @torch.no_grad()
    def _detect(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.detector(images).keypoints

    def evaluate(self) -> dict:
        """Test metrics of the current model (and the fit on the labelled images), as written to metrics.json."""
        self.model.eval()
        test = evaluate(self._detect, self.data.test, meta=self.meta, batch_size=self.cfg.eval_batch,
                        device=self.device)
        labeled = torch.utils.data.Subset(self.data.train, self.data.labeled)
        fit = evaluate(self._detect, labeled, meta=self.meta, batch_size=self.cfg.eval_batch, device=self.device)
        cfg = self.cfg
        return {
            "dataset": cfg.dataset, "keypoints": self.meta.num_keypoints, "shots": cfg.shots,
            "method": cfg.method, "without": list(cfg.without), "method_label": cfg.method_label, "ops": cfg.ops,
            "perceptual": self.perceptual.description if self.perceptual is not None else "none",
            "few_shot_selection": self.data.selection, "labeled_indices": self.data.labeled,
            "iterations": self.step, "resumed_from": self.resumed_from, "world_size": self.world.size,
            "test": test, "test_split": self.data.test_split,
            "labeled_fit": {"nme": fit["nme"], "pck@0.1": fit["pck@0.1"], "spread": fit["spread"]},
            "reference": shape_baselines(self.data.train, self.data.labeled, self.data.test, meta=self.meta),
            "test_images": len(self.data.test), "train_images": len(self.data.train),
            "environment": {"device": str(self.device), "torch": torch.__version__, "python": platform.python_version(),
                            "cpu_threads": torch.get_num_threads(), "git_commit": _git_commit(),
                            "cpu_count": os.cpu_count()},
            "config": cfg.to_dict(),
        }

    def save_model(self) -> None:
        """``model.pt``: what inference needs (detector weights, meta, config), for :func:`kpfast.load`."""
        det = {k[len("detector."):]: v for k, v in self.model.state_dict().items() if k.startswith("detector.")}
        save_checkpoint_file({"format": "kpfast", "version": FORMAT_VERSION, "kind": "model", "step": self.step,
                              "config": self.cfg.to_dict(), "meta": self.meta.to_dict(), "model": det},
                             self.out / MODEL_NAME)

    @torch.no_grad()
    def write_pictures(self, folder: Path, prefix: str = "", n: int = 16) -> None:
        """``predictions.png`` (test images, certainty colours, ground truth beside) and, with
        reconstruction, ``reconstructions.png`` and ``edge_maps.png``."""
        from .. import viz
        from ..data import collate_samples
        from ..models import patch_mask

        self.model.eval()
        b = collate_samples([self.data.test[i] for i in range(min(n, len(self.data.test)))])
        images = b["image"].to(self.device)
        g = torch.Generator().manual_seed(0)  # pictures never touch the run's random stream
        masked = patch_mask(images, self.objective.patch, self.cfg.mask_ratio, generator=g)[0] \
            if self.model.unet is not None else None
        with backend.use_backend(self.backend):
            out = self.model(images, masked=masked, use_uncertainty=self.cfg.uses("uncertainty"))
        det = out["detections"]
        viz.save(viz.prediction_sheet(images.cpu(), det.keypoints.cpu(), self.meta,
                                      certainty=torch.sigmoid(det.uncertainty).cpu(), ground_truth=b["keypoints"],
                                      cols=4), folder / f"{prefix}predictions.png")
        if masked is not None:
            viz.save(viz.reconstruction_sheet(images.cpu(), masked.cpu(), out["edge_map"].cpu(),
                                              out["reconstruction"].cpu()), folder / f"{prefix}reconstructions.png")
            viz.save(viz.edge_map_sheet(out["edge_map"].cpu()), folder / f"{prefix}edge_maps.png")
        self.model.train()


def _fmt(v: Optional[float]) -> str:
    return "n/a" if v is None else f"{v:.2f}"


def run(config: Union[TrainConfig, dict, str, None] = None, **overrides: Any) -> dict:
    """Train the method end to end, evaluate it and return the metrics.

    Args:
        config: a :class:`TrainConfig`, a dict of its fields, a preset name
            (``"demo"``, ``"paper"``, ``"tiny"``) or None (the paper's defaults).
        **overrides: fields to change, e.g. ``out="runs/x"``, ``method="supervised"``,
            ``without=("geo3d",)``.

    Returns:
        the dict written to ``out/metrics.json``: ``test`` (``nme``, ``pck@0.1``,
        ``per_keypoint``), shots, dataset, method, ops, perceptual backbone,
        wall time, config.

    Example (minutes on CPU; the README's training example runs the ``"tiny"`` preset)::

        import kpfast
        metrics = kpfast.train.run("demo", out="runs/demo")
        metrics["test"]["nme"]
    """
    if isinstance(config, str):
        cfg = TrainConfig.from_preset(config, **overrides)
    elif isinstance(config, dict):
        cfg = TrainConfig.from_dict({**config, **overrides})
    elif isinstance(config, TrainConfig):
        cfg = config.replace(**overrides) if overrides else config
    elif config is None:
        cfg = TrainConfig(**overrides)
    else:
        raise TypeError(f"config must be a TrainConfig, dict, preset name or None, got {type(config).__name__}")
    return Trainer(cfg).run()
