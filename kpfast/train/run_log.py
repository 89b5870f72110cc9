"""What a run reports while it trains: a tqdm bar, a CSV file and TensorBoard scalars (rank 0 only)."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Optional

from .hooks import Hook

LOG_NAME = "log.csv"


class RunLog(Hook):
    """Per-step scalars to ``log.csv`` (one row every ``every`` steps) and TensorBoard (``tb/``),
    running averages on a tqdm bar; :meth:`message` for the lines a run prints.

    A hook: the files and the bar open at ``before_train`` and close at ``close``; each
    step's log row is written at ``after_step``. On resume (``start_step > 0``) rows past
    ``start_step`` are dropped from the CSV and TensorBoard purges its later events, so the
    logs read like one uninterrupted run.
    """

    def __init__(self, out: Optional[Path], *, total: int, start_step: int = 0, every: int = 10,
                 progress: bool = True, enabled: bool = True, bar_keys: Optional[set] = None):
        self.enabled, self.every = enabled, every
        self.bar_keys = bar_keys
        self.out = out
        self.total, self.start_step, self.progress = total, start_step, progress
        self.columns: Optional[list[str]] = None
        self.running: dict[str, float] = {}
        self.bar = None
        self.tb = None

    def before_train(self) -> None:
        """Open the bar, the CSV file and the TensorBoard writer."""
        total, start_step, progress, out = self.total, self.start_step, self.progress, self.out
        if not self.enabled:
            return
        if progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=start_step, desc="kpfast train", unit="step", dynamic_ncols=True)
        if out is not None:
            self.csv_path = out / LOG_NAME
            if start_step > 0 and self.csv_path.exists():
                with open(self.csv_path, newline="") as f:
                    rows = list(csv.DictReader(f))
                keep = [r for r in rows if int(r["step"]) <= start_step]
                if rows:
                    self.columns = list(rows[0].keys())
                    self._write_rows(keep, mode="w")
            elif self.csv_path.exists():
                self.csv_path.unlink()
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out / "tb"), purge_step=start_step if start_step > 0 else None)
            except ImportError as e:  # a broken tensorboard install should not stop training
                print(f"kpfast train: no TensorBoard events ({e}); log.csv has the same scalars", flush=True)
                self.tb = None

    def _write_rows(self, rows: list[dict], mode: str = "a") -> None:
        new = mode == "w" or not self.csv_path.exists()
        with open(self.csv_path, mode, newline="") as f:
            w = csv.DictWriter(f, fieldnames=self.columns)
            if new:
                w.writeheader()
            w.writerows(rows)

    def after_step(self, step: int, scalars: dict[str, float]) -> None:
        """Record the scalars of (1-based) ``step``."""
        if not self.enabled:
            return
        for k, v in scalars.items():
            prev = self.running.get(k)
            self.running[k] = v if prev is None or not math.isfinite(prev) else 0.9 * prev + 0.1 * v
        if self.bar is not None:
            self.bar.update(1)
            if step % self.every == 0 or step == 1:
                shown = {k: f"{v:.3g}" for k, v in self.running.items()
                         if (k in self.bar_keys if self.bar_keys is not None else k not in ("strength", "lr"))}
                self.bar.set_postfix(shown, refresh=False)
        if step % self.every == 0 and self.out is not None:
            row = {"step": step, **{k: f"{v:.6g}" for k, v in scalars.items()}}
            if self.columns is None:
                self.columns = list(row)
            new = [k for k in row if k not in self.columns]
            if new:  # a scalar logged for the first time (e.g. sparser diagnostics): widen the file
                with open(self.csv_path, newline="") as f:
                    old = list(csv.DictReader(f))
                self.columns += new
                self._write_rows([{k: r.get(k, "") for k in self.columns} for r in old], mode="w")
            self._write_rows([{k: row.get(k, "") for k in self.columns}])
            if self.tb is not None:
                for k, v in scalars.items():
                    self.tb.add_scalar(f"train/{k}", v, step)

    def scalars(self, tag: str, values: dict[str, float], step: int) -> None:
        """Extra scalars (evaluation) to TensorBoard."""
        if self.tb is not None:
            for k, v in values.items():
                if v is not None:
                    self.tb.add_scalar(f"{tag}/{k}", v, step)

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.tb is not None:
            self.tb.close()
            self.tb = None
