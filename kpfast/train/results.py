"""What a run leaves in its folder, as hooks: checkpoints and the model, pictures, the metrics.

- :class:`Checkpointer`: ``checkpoint.pt`` every ``checkpoint_every`` steps and after the
  last one (every rank takes part: the random states of all ranks go into it), then
  ``model.pt`` (rank 0);
- :class:`Pictures`: ``predictions.png`` and, with reconstruction, ``reconstructions.png``
  and ``edge_maps.png`` at the end, plus snapshots every ``image_every`` steps (rank 0);
- :class:`Evaluation`: the last model on the test split (no model selection) and on the
  labelled images, the image-blind reference rows, written to ``metrics.json``, the log
  and TensorBoard; ``run.json`` then records the run as finished (rank 0).
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import torch

from ..ops import backend
from ..checkpoint import CHECKPOINT_NAME, FORMAT_VERSION, MODEL_NAME, save_checkpoint_file
from ..evaluate import COLLAPSE_SPREAD, evaluate, shape_baselines
from .hooks import Hook
from .run_folder import METRICS_NAME, SNAPSHOT_FOLDER

if TYPE_CHECKING:
    from .loop import Trainer


class Checkpointer(Hook):
    """``checkpoint.pt`` every ``checkpoint_every`` steps and after the last, ``model.pt`` at the end."""

    def __init__(self, trainer: Trainer):
        self.trainer = trainer

    def after_step(self, step: int, scalars: dict[str, float]) -> None:
        cfg = self.trainer.cfg
        if step % cfg.checkpoint_every == 0 or step == cfg.iterations:
            self.save_checkpoint(step)

    def after_train(self) -> None:
        if self.trainer.world.is_main and self.trainer.out is not None:
            self.save_model()

    def save_checkpoint(self, step: int) -> None:
        """Write ``checkpoint.pt`` atomically (rank 0; every rank contributes its random state),
        unless a parameter or optimizer state is not finite (the NaN guard stops the run)."""
        tr = self.trainer
        tr.guard.check_state(f"after step {step}, so {CHECKPOINT_NAME} was not written")
        state = tr.state()
        if tr.world.is_main and tr.out is not None:
            save_checkpoint_file(state, tr.out / CHECKPOINT_NAME)
        tr.world.barrier()

    def save_model(self) -> None:
        """``model.pt``: what inference needs (detector weights, meta, config), for :func:`kpfast.load`."""
        tr = self.trainer
        save_checkpoint_file({"format": "kpfast", "version": FORMAT_VERSION, "kind": "model", "step": tr.step,
                              "config": tr.cfg.to_dict(), "meta": tr.meta.to_dict(), "model": tr.inference_state()},
                             tr.out / MODEL_NAME)


class Pictures(Hook):
    """The run's PNGs in its folder (rank 0): snapshots every ``image_every`` steps, the final set at the end."""

    def __init__(self, trainer: Trainer, n: int = 16):
        self.trainer, self.n = trainer, n

    def after_step(self, step: int, scalars: dict[str, float]) -> None:
        every = self.trainer.cfg.image_every
        if every and step % every == 0:
            self.write(self.trainer.out / SNAPSHOT_FOLDER, prefix=f"step{step:06d}_")

    def after_train(self) -> None:
        self.write(self.trainer.out)

    def write(self, folder: Path, prefix: str = "") -> None:
        self.trainer.draw_pictures(folder, prefix, self.n)


@torch.no_grad()
def draw_keypoint_model_pictures(tr: Trainer, folder: Path, prefix: str = "", n: int = 16) -> None:
    """``predictions.png`` (the first ``n`` test images, certainty colours, ground truth beside)
    and, with reconstruction, ``reconstructions.png`` and ``edge_maps.png``."""
    from .. import viz
    from ..data import collate_samples
    from ..models import patch_mask

    tr.model.eval()
    b = collate_samples([tr.data.test[i] for i in range(min(n, len(tr.data.test)))])
    images = b["image"].to(tr.device)
    g = torch.Generator().manual_seed(0)  # pictures never touch the run's random stream
    masked = patch_mask(images, tr.objective.patch, tr.cfg.mask_ratio, generator=g)[0] \
        if tr.model.unet is not None else None
    with backend.use_backend(tr.backend):
        out = tr.model(images, masked=masked, use_uncertainty=tr.cfg.uses("uncertainty"))
    det = out.detections
    viz.save(viz.prediction_sheet(images.cpu(), det.keypoints.cpu(), tr.meta,
                                  certainty=torch.sigmoid(det.uncertainty).cpu(), ground_truth=b["keypoints"],
                                  cols=4), folder / f"{prefix}predictions.png")
    if out.masked is not None:
        viz.save(viz.reconstruction_sheet(images.cpu(), out.masked.cpu(), out.edge_map.cpu(),
                                          out.reconstruction.cpu()), folder / f"{prefix}reconstructions.png")
        viz.save(viz.edge_map_sheet(out.edge_map.cpu()), folder / f"{prefix}edge_maps.png")
    tr.model.train()


class Evaluation(Hook):
    """Says the test split before training; after it, the metrics of the last model (rank 0): into
    ``trainer.metrics``, ``metrics.json``, the log and TensorBoard, and ``run.json`` says finished."""

    def __init__(self, trainer: Trainer):
        self.trainer = trainer

    def before_train(self) -> None:
        self.trainer.log.message(f"kpfast train: test split: {self.trainer.data.test_split}")

    def after_train(self) -> None:
        tr = self.trainer
        metrics = self.metrics()
        metrics["wall_time_s"] = {"total": time.perf_counter() - tr.t_start, "data": tr.t_data,
                                  "training": tr.t_trained - tr.t_train,
                                  "evaluation": time.perf_counter() - tr.t_trained}
        metrics["steps_this_run"] = tr.step - tr.first_step
        metrics["seconds_per_step"] = (tr.t_trained - tr.t_train) / max(tr.step - tr.first_step, 1)
        if tr.out is not None:
            (tr.out / METRICS_NAME).write_text(json.dumps(metrics, indent=1))
            tr.folder.finish(tr.cfg)
        test = metrics["test"]
        collapsed = test["spread"] is not None and test["spread"] < COLLAPSE_SPREAD
        tr.log.message(f"kpfast train: {tr.cfg.method_label} on {tr.cfg.dataset}, {tr.cfg.shots} shots: test NME "
                       f"{_fmt(test['nme'])} %, PCK@0.1 {_fmt(test['pck@0.1'])} %, spread {_fmt(test['spread'])}"
                       + (" (COLLAPSED: the keypoints shrink toward the object's centre)" if collapsed else "")
                       + f" ({metrics['wall_time_s']['total']:.0f} s)" + (f"; wrote {tr.out}" if tr.out else ""))
        tr.log.scalars("test", {"nme": test["nme"], "pck@0.1": test["pck@0.1"], "spread": test["spread"]}, tr.step)
        tr.metrics = metrics

    @torch.no_grad()
    def _detect(self, images: torch.Tensor) -> torch.Tensor:
        return self.trainer.detect(images)

    def metrics(self) -> dict:
        """Test metrics of the current model (and the fit on the labelled images), as written to metrics.json."""
        tr, cfg = self.trainer, self.trainer.cfg
        tr.model.eval()
        test = evaluate(self._detect, tr.data.test, meta=tr.meta, batch_size=cfg.eval_batch, device=tr.device)
        labeled = torch.utils.data.Subset(tr.data.train, tr.data.labeled)
        fit = evaluate(self._detect, labeled, meta=tr.meta, batch_size=cfg.eval_batch, device=tr.device)
        return {
            "dataset": cfg.dataset, "keypoints": tr.meta.num_keypoints, "shots": cfg.shots,
            "method": cfg.method, "without": list(cfg.without), "method_label": cfg.method_label, "ops": cfg.ops,
            "perceptual": tr.perceptual.description if tr.perceptual is not None else "none",
            "few_shot_selection": tr.data.selection, "labeled_indices": tr.data.labeled,
            "iterations": tr.step, "resumed_from": tr.resumed_from, "world_size": tr.world.size,
            "test": test, "test_split": tr.data.test_split,
            "labeled_fit": {"nme": fit["nme"], "pck@0.1": fit["pck@0.1"], "spread": fit["spread"]},
            "reference": shape_baselines(tr.data.train, tr.data.labeled, tr.data.test, meta=tr.meta),
            "test_images": len(tr.data.test), "train_images": len(tr.data.train),
            "environment": {"device": str(tr.device), "torch": torch.__version__, "python": platform.python_version(),
                            "cpu_threads": torch.get_num_threads(), "git_commit": _git_commit(),
                            "cpu_count": os.cpu_count()},
            "config": cfg.to_dict(),
        }


def _fmt(v: Optional[float]) -> str:
    return "n/a" if v is None else f"{v:.2f}"


def _git_commit() -> Optional[str]:
    import subprocess

    try:
        r = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True,
                           text=True, timeout=5)
        return r.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None
