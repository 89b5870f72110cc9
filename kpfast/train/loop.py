"""The training loop: :class:`Trainer` and :func:`run`.

A run: check and lock the run folder ``out`` (:mod:`kpfast.train.run_folder`),
say what the run will do, open the data (generated and cached for procedural
categories), pick the few-shot examples, build the networks, then train with Adam
for ``iterations`` steps. Each step is data -> losses -> backward -> update
(:meth:`Trainer.train_step`); everything else is a hook (:mod:`kpfast.train.hooks`):
the NaN guard, the diagnostics, the log, the time estimate, checkpoints, pictures and
the evaluation of the last model on the test split, which write ``checkpoint.pt``,
``model.pt``, ``log.csv``, TensorBoard events, PNGs and ``metrics.json`` into ``out``
(``run.json`` records the run).
"""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch
from torch import Tensor

from ..ops import backend
from ..checkpoint import CHECKPOINT_NAME, FORMAT_VERSION, CheckpointError, load_checkpoint
from ..config import TrainConfig, run_differences
from ..methods import method, resolve
from ..losses import build_perceptual_loss
from ..models import FewShotKeypointModel, ModelOutputs
from .announce import TimeEstimate, describe_run
from .data import Batch, BatchStream, TrainingData, open_training_data, training_batch
from .diagnostics import Diagnostics
from .distributed import World, setup
from .guard import NaNGuard, NonFiniteLossError
from .hooks import Hook, Hooks
from .objective import LossTerms, Objective
from .results import Checkpointer, Evaluation, Pictures
from .run_folder import RunFolder, RunFolderError, prepare_run_folder
from .run_log import RunLog
from .streams import STEP_STREAMS, RandomStreams, global_rng_state, set_global_rng_state, stream_seed

__all__ = ["Trainer", "run", "trainer_class", "build_model", "parameter_groups", "NonFiniteLossError"]


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


class Trainer:
    """One training run of a :class:`TrainConfig` (see the module docstring).

    ``Trainer(cfg).run()`` returns the metrics dict that is also written to
    ``out/metrics.json``. Under ``torchrun`` every process runs it; rank 0 logs,
    checkpoints and evaluates, and holds the lock on ``out`` from construction until
    :meth:`run` returns.
    """

    stream_names: tuple = STEP_STREAMS
    """The random streams a step draws from (:mod:`kpfast.train.streams`); a method may add its own."""

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
        """Data, networks, optimizer, random streams (restored from the resume checkpoint, if any) and hooks."""
        cfg = self.cfg
        self._seed_everything()
        self.data: TrainingData = open_training_data(cfg, self.world)
        self.t_data = time.perf_counter() - self.t_start
        self.meta = self.data.meta
        self.device = self.world.device

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(stream_seed(cfg.seed, "init"))  # identical initial weights on every rank
            self.build_networks()
        self.build_objective()
        self.optimizer = self.build_optimizer()

        # one generator per kind of draw (transforms, masks, partners), per rank: see streams.py
        self.streams = RandomStreams(cfg.seed, self.world.rank, self.stream_names)
        self.step_random_state: Optional[dict] = None
        self.unlabeled_batch = cfg.batch_unlabeled if method(cfg.method).unlabeled else 0
        self.unlabeled = BatchStream(range(len(self.data.train)), max(self.unlabeled_batch, 1),
                                     seed=stream_seed(cfg.seed, "unlabeled"), rank=self.world.rank,
                                     world_size=self.world.size)
        self.labeled = BatchStream(self.data.labeled, cfg.labeled_batch, seed=stream_seed(cfg.seed, "labeled"))
        self.backend = "reference" if cfg.ops == "reference" else "auto"
        self.step = self.initial_step()
        self.resumed_from: Optional[int] = None
        if cfg.resume:
            self._restore()

        self.ddp_model = self.wrap_distributed() if self.world.distributed else self.model
        self.metrics: Optional[dict] = None  # rank 0's, set by the Evaluation hook
        self.guard = NaNGuard(self)
        self.log = RunLog(self.out, total=cfg.iterations, start_step=self.step, every=cfg.log_every,
                          progress=cfg.progress, enabled=self.world.is_main, bar_keys={*self.objective.weights, "total"})
        self.hooks = Hooks(self.default_hooks())

    # -- what a method defines (a method's trainer subclass overrides these) -----
    def build_networks(self) -> None:
        """``self.model`` (on the device; its initial weights drawn from the run's ``init`` stream) and
        the frozen ``self.perceptual`` network of the reconstruction loss (or None)."""
        self.model = build_model(self.cfg, self.meta).to(self.device)
        self.perceptual = build_perceptual_loss(self.cfg.perceptual) if self.cfg.uses("recon") else None
        if self.perceptual is not None:
            self.perceptual.to(self.device)

    def build_objective(self) -> None:
        """``self.objective``: called as ``(model, batch, step, streams)`` -> ``(terms, outputs)``, with
        ``total(terms)`` and the term ``weights`` (see :class:`Objective`)."""
        self.objective = Objective(self.cfg, self.meta, self.perceptual)

    def build_optimizer(self) -> torch.optim.Optimizer:
        """Adam over :func:`parameter_groups` (each group's ``lr_scale`` multiplies the schedule)."""
        return torch.optim.Adam(parameter_groups(self.model, self.cfg), lr=self.cfg.lr, betas=self.cfg.betas)

    def initial_step(self) -> int:
        """The step a run that is not resumed starts at: 0 (a method that reads earlier steps' work from
        a file may start later)."""
        return 0

    def wrap_distributed(self) -> torch.nn.Module:
        """What the objective runs under ``torchrun``: ``self.model`` in DistributedDataParallel, which
        averages the gradients over the processes in the backward pass."""
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)

    def detect(self, images: Tensor) -> Tensor:
        """Keypoints ``[B, K, 2]`` of ``images`` by the trained model in eval mode (for the evaluation)."""
        return self.model.detector(images).keypoints

    def inference_state(self) -> dict[str, Tensor]:
        """The weights ``model.pt`` keeps: those of the network :func:`kpfast.load` rebuilds for this
        method (:data:`kpfast.methods.METHODS`), here the detector's."""
        return {k[len("detector."):]: v for k, v in self.model.state_dict().items() if k.startswith("detector.")}

    def draw_pictures(self, folder: Path, prefix: str = "", n: int = 16) -> None:
        """The run's PNGs (see :class:`~kpfast.train.results.Pictures`)."""
        from .results import draw_keypoint_model_pictures

        draw_keypoint_model_pictures(self, folder, prefix, n)

    def default_hooks(self) -> list[Hook]:
        """The hooks of a run, in the order they are called (:mod:`kpfast.train.hooks`). Every rank
        guards and checkpoints (both are collective); rank 0 alone estimates the time, draws and
        evaluates; diagnostics are measured in single-process runs only."""
        main, every = self.world.is_main, self.cfg.diagnostics_interval
        diagnostics = [Diagnostics(self, every)] if every and not self.world.distributed else []
        pictures = [Pictures(self)] if main and self.out is not None else []
        return [self.guard, *diagnostics, self.log, *([TimeEstimate(self)] if main else []), Checkpointer(self),
                *pictures, *([Evaluation(self)] if main else [])]

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
    def train_step(self, step: int) -> dict[str, float]:
        """One optimizer step of (0-based) ``step``: data -> losses -> backward -> update.

        The hooks look in twice: at the loss terms before the backward pass (the NaN guard,
        the diagnostics) and at the gradients before the update (the NaN guard). Returns the
        step's log row (the ``after_step`` hooks may add to it).
        """
        batch = self.next_batch()
        terms, outputs = self.compute_losses(batch, step)
        self.hooks.after_loss(step, batch, terms, outputs)
        total = self.backward(terms)
        self.hooks.after_backward(step, batch)
        self.update(step)
        return self.log_row(step, terms, total)

    def next_batch(self) -> Batch:
        """The next unlabelled images (none for ``supervised``) and labelled images, from their streams."""
        unlabeled = self.unlabeled.next() if self.unlabeled_batch else []
        return training_batch(self.data.train, unlabeled, self.labeled.next(), self.device)

    def compute_losses(self, batch: Batch, step: int) -> tuple[LossTerms, ModelOutputs]:
        """The unweighted loss terms of ``step`` and the model's outputs (:class:`Objective`), the
        networks in training mode. The random streams' state the objective starts drawing from is
        kept in ``step_random_state``: the NaN guard replays the step from it."""
        self.model.train()
        self.step_random_state = self.streams.state_dict()
        return self.objective(self.ddp_model, batch, step, self.streams)

    def backward(self, terms: LossTerms) -> Tensor:
        """The backward pass of the weighted total (gradients reset first); returns the total."""
        total = self.objective.total(terms)
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        return total

    def update(self, step: int) -> None:
        """The optimizer step, each parameter group at its ``lr_scale`` times :meth:`TrainConfig.lr_at` ``(step)``."""
        for group in self.optimizer.param_groups:
            group["lr"] = self.cfg.lr_at(step) * group["lr_scale"]
        self.optimizer.step()

    def log_row(self, step: int, terms: LossTerms, total: Tensor) -> dict[str, float]:
        """The scalars of a step: each loss term, the total, the 2D transform strength, the learning rate."""
        scalars = {k: float(v.detach()) for k, v in terms.as_dict().items()}
        scalars["total"] = float(total.detach())
        scalars["strength"] = self.objective.strength(step) if self.objective.active["geo2d"] else 0.0
        scalars["lr"] = self.cfg.lr_at(step)
        return scalars

    # -- the run ---------------------------------------------------------------
    def run(self) -> dict:
        """Train from ``step`` to ``iterations`` with the hooks; returns rank 0's metrics on every rank."""
        try:
            with backend.use_backend(self.backend):
                self.hooks.before_train()
                self.first_step, self.t_train = self.step, time.perf_counter()
                while self.step < self.cfg.iterations:
                    scalars = self.train_step(self.step)
                    self.step += 1
                    self.hooks.after_step(self.step, scalars)
                self.t_trained = time.perf_counter()
                self.hooks.after_train()
            metrics = self.world.broadcast(self.metrics)
            # no rank tears the process group down while another still has a collective in
            # flight (gloo aborted rank 0 at exit: "terminate called without an active exception")
            self.world.barrier()
            return metrics
        finally:
            self.hooks.close()
            self.folder.close()
            self.world.close()


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
    return trainer_class(cfg)(cfg).run()


def trainer_class(cfg: TrainConfig) -> type[Trainer]:
    """The :class:`Trainer` (sub)class of ``cfg.method`` (:data:`kpfast.methods.METHODS`)."""
    return resolve(method(cfg.method).trainer)
