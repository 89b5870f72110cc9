"""What a run says before it trains: its plan, then a time estimate from its first steps."""

from __future__ import annotations

import datetime
import time
from typing import TYPE_CHECKING, Optional

import torch

from ..config import TrainConfig
from .hooks import Hook

if TYPE_CHECKING:
    from .loop import Trainer


def describe_run(cfg: TrainConfig, device: torch.device, world_size: int, resume_step: Optional[int] = None) -> str:
    """One line: preset, method, data, steps, image size, batch, ops, device, folder.

    Example:
        >>> cfg = TrainConfig.from_preset("demo", out="runs/demo")
        >>> describe_run(cfg, torch.device("cpu"), 1)[:95]
        'kpfast train: preset demo, method full on face (10 shots): 1100 steps at 64x64 px, 8 unlabelled'
    """
    unlabeled = 0 if cfg.method == "supervised" else cfg.batch_unlabeled
    processes = f" x {world_size} processes" if world_size > 1 else ""
    where = f"{device}" + (f" ({torch.get_num_threads()} threads)" if device.type == "cpu" else "")
    return (f"kpfast train: preset {cfg.preset or 'none (TrainConfig defaults: the paper settings)'}, method {cfg.method_label} on "
            f"{cfg.dataset} ({cfg.shots} shots): {cfg.iterations} steps at {cfg.image_size}x{cfg.image_size} px, "
            f"{unlabeled} unlabelled{processes} + {cfg.labeled_batch} labelled images per step, {cfg.ops} ops, "
            f"on {where}" + (f", resuming at step {resume_step}" if resume_step else "")
            + (f" -> {cfg.out}" if cfg.out else " (no --out: nothing is written)"))


def format_duration(seconds: float) -> str:
    """``"45 s"``, ``"12 min"``, ``"3.2 h"``.

    Example:
        >>> format_duration(45), format_duration(720), format_duration(38 * 3600)
        ('45 s', '12 min', '38.0 h')
    """
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


class StepClock:
    """Estimates a run's remaining time from its first steps.

    The first ``warmup`` steps after the start (or resume) are left out (kernel
    compilation, caches); the next ``measured`` steps give the seconds per step.
    :meth:`after_step` returns the estimate once, right after the last measured step
    (None otherwise, and when the run ends before then).
    """

    def __init__(self, total: int, start_step: int, *, warmup: int = 1, measured: int = 3):
        self.total, self.start = total, start_step
        self.begin_at, self.end_at = start_step + warmup, start_step + warmup + measured
        self.t_begin: Optional[float] = None

    def after_step(self, step: int) -> Optional[str]:
        """``step``: the number of steps done (1-based)."""
        if step == self.begin_at:
            self.t_begin = time.perf_counter()
        if step != self.end_at or self.t_begin is None or step >= self.total:
            return None
        per_step = (time.perf_counter() - self.t_begin) / (self.end_at - self.begin_at)
        left = per_step * (self.total - step)
        done = datetime.datetime.now() + datetime.timedelta(seconds=left)
        return (f"kpfast train: {per_step:.3g} s per step (steps {self.begin_at + 1}-{self.end_at}): about "
                f"{format_duration(left)} for the remaining {self.total - step} steps, until about "
                f"{done:%a %H:%M}, plus evaluation")


class TimeEstimate(Hook):
    """Says, once, how long the rest of the run will take (:class:`StepClock`), through the run's log."""

    def __init__(self, trainer: Trainer):
        self.trainer = trainer
        self.clock: Optional[StepClock] = None

    def before_train(self) -> None:
        self.clock = StepClock(self.trainer.cfg.iterations, self.trainer.step)

    def after_step(self, step: int, scalars: dict[str, float]) -> None:
        estimate = self.clock.after_step(step)
        if estimate:
            self.trainer.log.message(estimate)
