"""``--method moskvyak``: Moskvyak et al.'s semi-supervised keypoint localization (ICLR 2021) on kpfast's loop.

:class:`MoskvyakTrainer` is a :class:`~kpfast.train.loop.Trainer` whose networks are a
:class:`~kpfast.models.moskvyak.MoskvyakModel` (kpfast's detector trunk with a heatmap
head and a feature map, and the keypoint classifier), whose objective is
:class:`~kpfast.train.moskvyak_objective.MoskvyakObjective`, and whose hooks measure
heatmaps instead of soft-argmax keypoints:

- :class:`HeatmapDiagnostics`: ``grad_<term>`` and ``align_<term>`` on the heatmaps (RMS
  gradient of each weighted term on every predicted heatmap, and its cosine with *true
  heatmap - predicted heatmap* on the unlabelled images and their warped copies),
  ``sc_accuracy`` (the classifier's accuracy on the unlabelled images' representations)
  and ``peak`` (their heatmaps' mean highest value);
- :class:`HeatmapEvaluation`: the usual metrics with the config's readout, plus
  ``readouts`` in ``metrics.json``: NME, PCK@0.1 and spread of the same model with each
  readout of :data:`kpfast.config.HEATMAP_READOUTS`;
- pictures: ``predictions.png`` (colours: the heatmap's peak) and ``heatmaps.png`` (each
  test image beside its predicted and its ground-truth heatmaps).

Everything else (data, few-shot selection, checkpoints and bit-exact resume, the NaN
guard, logs, ``torchrun``) is the base trainer's.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ..ops import backend
from ..config import HEATMAP_READOUTS, TrainConfig
from ..evaluate import evaluate
from ..losses import gaussian_heatmaps
from ..models.moskvyak import MoskvyakModel, heatmap_keypoints, represents
from .data import Batch, training_batch
from .diagnostics import Diagnostics, term_gradients
from .hooks import Hook
from .loop import Trainer
from .moskvyak_objective import MoskvyakObjective
from .results import Evaluation

if TYPE_CHECKING:
    from ..models.moskvyak import MoskvyakOutputs
    from .moskvyak_objective import MoskvyakTerms


def build_moskvyak_model(cfg: TrainConfig, num_keypoints: int) -> MoskvyakModel:
    """The networks a ``--method moskvyak`` config trains: the feature map only with ``sc`` or ``ti``,
    the classifier only with ``sc``, the warped images' representations only with ``ti``."""
    model = MoskvyakModel(num_keypoints, widths=cfg.detector_widths, up_widths=cfg.detector_up_widths, norm=cfg.norm,
                          feature_channels=cfg.sc_channels, classify=cfg.uses("sc"), represent=represents(cfg),
                          represent_transformed=cfg.uses("ti"), readout=cfg.heatmap_readout)
    return model.to(memory_format=torch.channels_last) if cfg.channels_last else model


class MoskvyakTrainer(Trainer):
    """One ``--method moskvyak`` run (see the module docstring)."""

    def build_networks(self) -> None:
        self.model = build_moskvyak_model(self.cfg, self.meta.num_keypoints).to(self.device)
        self.perceptual = None

    def build_objective(self) -> None:
        self.objective = MoskvyakObjective(self.cfg)

    def build_optimizer(self) -> torch.optim.Optimizer:
        """Adam over every parameter (detector, feature map, classifier) at the schedule's rate."""
        return torch.optim.Adam([{"params": list(self.model.parameters()), "lr": self.cfg.lr, "lr_scale": 1.0}],
                                lr=self.cfg.lr, betas=self.cfg.betas)

    def detect(self, images: Tensor) -> Tensor:
        return self.model.detector(images).keypoints

    def inference_state(self) -> dict[str, Tensor]:
        return {k[len("detector."):]: v for k, v in self.model.state_dict().items() if k.startswith("detector.")}

    def next_batch(self) -> Batch:
        """As the base trainer's, without unlabelled images when no term sees them."""
        if self.objective.uses_unlabeled:
            return super().next_batch()
        return training_batch(self.data.train, [], self.labeled.next(), self.device)

    def log_row(self, step: int, terms: MoskvyakTerms, total: Tensor) -> dict[str, float]:
        """Each loss term, the total and the learning rate."""
        scalars = {k: float(v.detach()) for k, v in terms.as_dict().items()}
        scalars["total"] = float(total.detach())
        scalars["lr"] = self.cfg.lr_at(step)
        return scalars

    def default_hooks(self) -> list[Hook]:
        """The base trainer's hooks, with the heatmap diagnostics and evaluation in place of the keypoint ones."""
        def swap(hook: Hook) -> Hook:
            if isinstance(hook, Diagnostics):
                return HeatmapDiagnostics(self, hook.every)
            if isinstance(hook, Evaluation):
                return HeatmapEvaluation(self)
            return hook

        return [swap(h) for h in super().default_hooks()]

    @torch.no_grad()
    def draw_pictures(self, folder: Path, prefix: str = "", n: int = 16) -> None:
        """``predictions.png`` (the first ``n`` test images; colour: the heatmap's peak, green = 1;
        ground truth beside) and ``heatmaps.png`` (image | predicted | ground-truth heatmaps)."""
        from .. import viz
        from ..data import collate_samples

        self.model.eval()
        b = collate_samples([self.data.test[i] for i in range(min(n, len(self.data.test)))])
        images = b["image"].to(self.device)
        with backend.use_backend(self.backend):
            det = self.model.detector(images)
        viz.save(viz.prediction_sheet(images.cpu(), det.keypoints.cpu(), self.meta,
                                      certainty=torch.sigmoid(det.uncertainty).cpu(), ground_truth=b["keypoints"],
                                      cols=4), folder / f"{prefix}predictions.png")
        truth = gaussian_heatmaps(b["keypoints"], tuple(det.heatmaps.shape[-2:]), self.cfg.heatmap_sigma,
                                  b["labeled"])
        viz.save(viz.heatmap_sheet(images.cpu(), det.heatmaps.cpu(), truth), folder / f"{prefix}heatmaps.png")
        self.model.train()


class HeatmapDiagnostics(Diagnostics):
    """:class:`~kpfast.train.diagnostics.Diagnostics` measured on the heatmaps (see the module docstring)."""

    def measure(self, terms: MoskvyakTerms, outputs: MoskvyakOutputs, batch: Batch) -> dict[str, float]:
        truth, maps = batch.truth, outputs.maps
        true = gaussian_heatmaps(truth.keypoints, tuple(maps.shape[-2:]), self.trainer.cfg.heatmap_sigma,
                                 truth.labeled)
        known = truth.labeled & truth.unlabeled[:, None]
        if outputs.heatmaps_transformed is not None:
            true, known = torch.cat([true, outputs.warp.warp(true)]), torch.cat([known, known])
        scalars = term_gradients(terms.as_dict(), self.trainer.objective.weights, maps, true, known)
        unlabeled = truth.unlabeled
        if bool(unlabeled.any()):
            scalars["peak"] = float(outputs.heatmaps.detach()[unlabeled].flatten(2).amax(-1).mean())
            if outputs.logits is not None:
                logits = outputs.logits.detach()[unlabeled]
                ids = torch.arange(logits.shape[1], device=logits.device)
                scalars["sc_accuracy"] = float((logits.argmax(-1) == ids).float().mean())
        return scalars


class HeatmapEvaluation(Evaluation):
    """:class:`~kpfast.train.results.Evaluation` plus the test metrics under every heatmap readout."""

    def metrics(self) -> dict:
        metrics = super().metrics()
        tr = self.trainer
        metrics["readouts"] = {}
        for readout in HEATMAP_READOUTS:
            @torch.no_grad()
            def predict(images: Tensor, readout: str = readout) -> Tensor:
                return heatmap_keypoints(tr.model.detector.maps(images, features=False)[0], readout)[0]

            with backend.use_backend(tr.backend):
                result = evaluate(predict, tr.data.test, meta=tr.meta, batch_size=tr.cfg.eval_batch, device=tr.device)
            metrics["readouts"][readout] = {k: result[k] for k in ("nme", "pck@0.1", "spread")}
        return metrics
