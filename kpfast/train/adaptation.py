"""``--method adaptation``: object landmark discovery through unsupervised adaptation
(Sanchez & Tzimiropoulos, NeurIPS 2019), as a few-shot method.

Three stages:

1. **Core detector** (:mod:`kpfast.train.source`): kpfast's keypoint detector trained with
   full supervision on ``source`` (or read from a checkpoint), cached and shared by runs.
2. **Adaptation** (the training steps of this run): a :class:`LandmarkDetector` with the
   core's body and a new head of ``adapt_landmarks`` heatmaps, read by soft-argmax
   (``adapt_landmark_beta``) and redrawn as Gaussians (``adapt_landmark_sigma``), from which and a randomly deformed copy
   of the image (a similarity: kpfast's 2D transform ranges, no flip, no colour change)
   a :class:`LandmarkGenerator` reconstructs the image; the objective is the paper's
   squared pixel error plus the perceptual loss (``perceptual``), on unlabelled images
   only. What is trained (``adapt``): ``"projection"`` (the paper) a matrix ``W [Co, Co]``
   per convolution of the detector body (:mod:`kpfast.models.projection`, the identity at
   first; the core weights frozen), the normalization layers, the new head and the
   generator; ``"finetune"`` every weight, from the core's; ``"scratch"`` every weight,
   from random initialization, with no source.
3. **Regressors** (after the last step, :class:`RegressorFit`): a linear map from the
   discovered landmarks to the dataset's keypoints fitted on the labelled images (the
   *forward* direction: what the run predicts, so its test NME, PCK and spread are the
   forward errors), and the *backward* map from the annotated keypoints to the landmarks,
   whose error (in % of the NME normalizer) measures how stable the landmarks are
   (:mod:`kpfast.models.linear_regression`).

The labelled images take part only in stage 3; every step trains on ``batch_unlabeled``
unlabelled images. Resume, the NaN guard, DDP, checkpoints and the evaluation are the
:class:`Trainer`'s; the core detector is stored with the run (its weights are the frozen
part of the model), so a resumed run never needs the source again.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

from ..ops import backend
from ..checkpoint import CheckpointError
from ..data import collate_samples
from ..data.transforms import TransformRanges, sample_transform
from ..evaluate import normalizer_distance, spread
from ..losses import build_perceptual_loss, reconstruction_loss
from ..losses.perceptual import PerceptualLoss
from ..models.adaptation import AdaptationModel, AdaptationOutputs, LandmarkGenerator, landmark_detector_from_config
from ..models.linear_regression import PointRegressor
from ..models.projection import folded_state_dict, project_convolutions
from .announce import TimeEstimate
from .data import Batch, fetch
from .hooks import Hook
from .loop import Trainer
from .results import Checkpointer, Evaluation, Pictures
from .source import prepare_source, source_summary
from .streams import RandomStreams

DEFORMATION = TransformRanges(flip_prob=0.0, brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0)
"""The random similarity between an image and the generator's input: kpfast's 2D transform ranges
(rotation, translation, scale) at full strength, without flips or colour changes (the generator takes
the appearance from the deformed image)."""


def deform(images: Tensor, generator: torch.Generator) -> Tensor:
    """``images [B, 3, S, S]`` under one random :data:`DEFORMATION` each (borders replicated)."""
    T = sample_transform(images.shape[0], 1.0, size=tuple(images.shape[-2:]), generator=generator, ranges=DEFORMATION,
                         device=images.device)
    return T.warp_images(images, padding_mode="border")


@dataclass
class AdaptationTerms:
    """The loss of one step: ``recon`` (squared pixel error + perceptual); ``logged``: its parts and the
    landmarks' spread, detached floats for the log."""

    recon: Tensor
    logged: dict = field(default_factory=dict)

    def as_dict(self) -> dict[str, Tensor]:
        return {"recon": self.recon}


class AdaptationObjective:
    """The reconstruction objective of stage 2 (see the module docstring).

    Called as ``(model, batch, step, streams)`` -> ``(AdaptationTerms, AdaptationOutputs)``; the
    deformations are drawn from ``streams["transforms"]``.
    """

    def __init__(self, cfg, perceptual: Optional[PerceptualLoss]):
        self.weights = {"recon": cfg.w_recon}
        self.perceptual = perceptual

    def total(self, terms: AdaptationTerms) -> Tensor:
        return self.weights["recon"] * terms.recon

    def __call__(self, model, batch: Batch, step: int, streams: RandomStreams) -> tuple[AdaptationTerms,
                                                                                          AdaptationOutputs]:
        images = batch.images
        out = model(images, deform(images, streams["transforms"]))
        total, parts = reconstruction_loss(out.reconstruction, images, self.perceptual, pixel="l2")
        everywhere = torch.ones(out.landmarks.shape[:2], dtype=torch.bool, device=images.device)
        logged = {"recon_pixel": float(parts["l2"]),
                  "landmark_spread": float(spread(out.landmarks.detach(), everywhere).mean())}
        if "perceptual" in parts:
            logged["recon_perceptual"] = float(parts["perceptual"])
        return AdaptationTerms(recon=total, logged=logged), out


class RegressorFit(Hook):
    """Stage 3 after the last step (every rank): :meth:`AdaptationTrainer.fit_regressors`."""

    def __init__(self, trainer: AdaptationTrainer):
        self.trainer = trainer

    def after_train(self) -> None:
        self.trainer.fit_regressors()


class AdaptationEvaluation(Evaluation):
    """The evaluation of every method (test NME, PCK and spread through the forward regressor; ``wall_time_s``
    without stage 1, whose seconds are ``adaptation.source.seconds_this_run``), plus
    ``metrics["adaptation"]``: the forward and backward errors, the regressors' fits, the source and
    the trained share of the detector; ``metrics["extra_metrics"]`` the backward test error for the
    experiment runner's tables."""

    def metrics(self) -> dict:
        m = super().metrics()
        tr = self.trainer
        m["adaptation"] = tr.adaptation_metrics(m)
        m["extra_metrics"] = {"backward error (%)": m["adaptation"]["backward_error"]["test"]}
        a = m["adaptation"]
        tr.log.message(f"kpfast train: adaptation ({tr.cfg.adapt}): forward error {_fmt(a['forward_error']['test'])} %, "
                       f"backward error {_fmt(a['backward_error']['test'])} % on the test split; "
                       f"{source_summary(tr.source_info)}")
        return m


class AdaptationTrainer(Trainer):
    """The :class:`Trainer` of ``--method adaptation`` (see the module docstring)."""

    def build_networks(self) -> None:
        cfg = self.cfg
        core = self._core()
        detector = landmark_detector_from_config(cfg)
        generator = LandmarkGenerator(cfg.adapt_landmarks, cfg.adapt_generator_widths, blocks=cfg.adapt_generator_blocks,
                                      norm=cfg.norm)
        if core is not None:
            load_core(detector, core)
        if cfg.adapt == "projection":
            project_convolutions(detector, skip=[detector.head])
        model = AdaptationModel(detector, generator, cfg.adapt_landmark_sigma)
        if cfg.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = model.to(self.device)
        K = self.meta.num_keypoints
        self.regressor = PointRegressor(cfg.adapt_landmarks, K).to(self.device)
        self.backward_regressor = PointRegressor(K, cfg.adapt_landmarks).to(self.device)
        self.perceptual = build_perceptual_loss(cfg.perceptual)
        if self.perceptual is not None:
            self.perceptual.to(self.device)
        if self.world.is_main:
            trained = sum(p.numel() for p in detector.parameters() if p.requires_grad)
            total = sum(p.numel() for p in detector.parameters())
            print(f"kpfast train: adaptation ({cfg.adapt}): {source_summary(self.source_info)}; the detector trains "
                  f"{trained} of its {total} parameters, the generator {sum(p.numel() for p in generator.parameters())}; "
                  f"every step reconstructs {cfg.batch_unlabeled} unlabelled images, the {cfg.shots} labelled images "
                  "fit the linear regressors after the last step", flush=True)

    def _core(self) -> Optional[dict[str, Tensor]]:
        """The core detector's weights (None: from scratch, or a resumed run: they are in its checkpoint);
        sets ``source_info``."""
        self.source_info: Optional[dict] = None
        if self.cfg.adapt == "scratch":
            return None
        if self.resume_checkpoint is not None:
            self.source_info = self.resume_checkpoint.get("adaptation", {}).get("source")
            return None
        source = prepare_source(self.cfg, self.world)
        self.source_info = source.info
        self.t_start += source.info["seconds_this_run"]  # the run's wall time leaves stage 1 out (it is in the info)
        return source.state

    def build_objective(self) -> None:
        self.objective = AdaptationObjective(self.cfg, self.perceptual)

    def build_optimizer(self) -> torch.optim.Optimizer:
        """Adam over the trainable parameters (``adapt`` decides which: see the module docstring)."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        return torch.optim.Adam([{"params": params, "lr": self.cfg.lr, "lr_scale": 1.0}], lr=self.cfg.lr,
                                betas=self.cfg.betas)

    def default_hooks(self) -> list[Hook]:
        """The :class:`Trainer`'s hooks without the keypoint diagnostics (the landmarks are not the keypoints),
        with :class:`RegressorFit` before the model is saved and evaluated."""
        main = self.world.is_main
        pictures = [Pictures(self)] if main and self.out is not None else []
        return [self.guard, self.log, *([TimeEstimate(self)] if main else []), RegressorFit(self), Checkpointer(self),
                *pictures, *([AdaptationEvaluation(self)] if main else [])]

    def state(self) -> dict:
        return {**super().state(), "adaptation": {"source": self.source_info}}

    # -- a step -----------------------------------------------------------------
    def next_batch(self) -> Batch:
        """``batch_unlabeled`` unlabelled images (no labels: stage 2 uses none)."""
        b = fetch(self.data.train, self.unlabeled.next(), self.device)
        return Batch(images=b["image"], labeled_keypoints=b["keypoints"][:0], labeled_mask=b["labeled"][:0])

    def log_row(self, step: int, terms: AdaptationTerms, total: Tensor) -> dict[str, float]:
        return {"recon": float(terms.recon.detach()), "total": float(total.detach()), **terms.logged,
                "lr": self.cfg.lr_at(step)}

    # -- stage 3 and what the run reports -----------------------------------------------
    @torch.no_grad()
    def landmarks(self, images: Tensor) -> Tensor:
        """Discovered landmarks ``[B, K_d, 2]`` of ``images`` (the model as it is: call in eval mode)."""
        return self.model.detector(images)[0]

    def detect(self, images: Tensor) -> Tensor:
        """The dataset's keypoints ``[B, K, 2]``: the forward regressor on the discovered landmarks."""
        return self.regressor(self.landmarks(images))

    def _labeled_batches(self, dataset):
        for start in range(0, len(dataset), self.cfg.eval_batch):
            b = collate_samples([dataset[i] for i in range(start, min(len(dataset), start + self.cfg.eval_batch))])
            yield {k: v.to(self.device) for k, v in b.items()}

    @torch.no_grad()
    def fit_regressors(self) -> None:
        """Stage 3: the forward (landmarks -> keypoints) and backward (keypoints -> landmarks) regressors
        on the labelled images, the model in eval mode. Keypoints a labelled image lacks count only where
        they are known (forward) and are filled with their mean over the labelled images (backward input)."""
        self.model.eval()
        shots = torch.utils.data.Subset(self.data.train, self.data.labeled)
        found, keypoints, known = [], [], []
        with backend.use_backend(self.backend):
            for b in self._labeled_batches(shots):
                found.append(self.landmarks(b["image"]))
                keypoints.append(b["keypoints"])
                known.append(b["labeled"].bool())
        landmarks, keypoints, known = torch.cat(found), torch.cat(keypoints), torch.cat(known)
        m = known[..., None].to(keypoints.dtype)
        self.mean_shape = (keypoints * m).sum(0) / m.sum(0).clamp_min(1)
        self.regressor.fit(landmarks, keypoints, known)
        self.backward_regressor.fit(self._filled(keypoints, known), landmarks)
        self.model.train()

    def _filled(self, keypoints: Tensor, known: Tensor) -> Tensor:
        return torch.where(known[..., None], keypoints, self.mean_shape.to(keypoints))

    @torch.no_grad()
    def backward_error(self, dataset) -> Optional[float]:
        """Mean over ``dataset``'s images of the mean distance between the discovered landmarks and the
        backward regressor's prediction from the annotation, in % of the NME normalizer (images whose
        normalizer is degenerate or that have no labelled keypoint are skipped; None if none is left)."""
        self.model.eval()
        errors = []
        with backend.use_backend(self.backend):
            for b in self._labeled_batches(dataset):
                known = b["labeled"].bool()
                found = self.landmarks(b["image"])
                predicted = self.backward_regressor(self._filled(b["keypoints"], known))
                norm = normalizer_distance(b["keypoints"], b["bbox"], self.meta)
                ok = (norm > 1e-6) & known.any(-1)
                errors.append(((predicted - found).norm(dim=-1).mean(-1) / norm.clamp_min(1e-6))[ok].double().cpu())
        self.model.train()
        errors = torch.cat(errors)
        return float(100.0 * errors.mean()) if len(errors) else None

    def adaptation_metrics(self, metrics: dict) -> dict:
        """``metrics["adaptation"]`` (see :class:`AdaptationEvaluation`)."""
        detector = self.model.detector
        shots = torch.utils.data.Subset(self.data.train, self.data.labeled)
        return {
            "adapt": self.cfg.adapt, "landmarks": self.cfg.adapt_landmarks, "source": self.source_info,
            "forward_error": {"test": metrics["test"]["nme"], "labeled": metrics["labeled_fit"]["nme"]},
            "backward_error": {"test": self.backward_error(self.data.test), "labeled": self.backward_error(shots)},
            "regressors": {"forward": self.regressor.fit_info, "backward": self.backward_regressor.fit_info},
            "parameters": {"detector": sum(p.numel() for p in detector.parameters()),
                           "detector_trained": sum(p.numel() for p in detector.parameters() if p.requires_grad),
                           "generator": sum(p.numel() for p in self.model.generator.parameters())},
        }

    def inference_state(self) -> dict[str, Tensor]:
        """The :class:`~kpfast.models.adaptation.AdaptedDetector`'s weights: the detector with its projections
        folded in, and the forward regressor."""
        state = {f"detector.{k}": v for k, v in folded_state_dict(self.model.detector).items()}
        return {**state, **{f"regressor.{k}": v for k, v in self.regressor.state_dict().items()}}

    @torch.no_grad()
    def draw_pictures(self, folder: Path, prefix: str = "", n: int = 16) -> None:
        """``landmarks.png`` (the discovered landmarks on the first ``n`` test images, one colour each),
        ``reconstructions.png`` (image | deformed input | the Gaussian bottleneck | reconstruction) and,
        once the regressor is fitted, ``predictions.png`` (regressed keypoints, ground truth beside)."""
        import torch.nn.functional as F

        from .. import viz

        self.model.eval()
        b = collate_samples([self.data.test[i] for i in range(min(n, len(self.data.test)))])
        images = b["image"].to(self.device)
        deformed = deform(images, torch.Generator().manual_seed(0))  # pictures never touch the run's streams
        with backend.use_backend(self.backend):
            out = self.model(images, deformed)
        gaussians = F.interpolate(out.gaussians.amax(1, keepdim=True), size=images.shape[-2:], mode="nearest")
        viz.save(viz.landmark_sheet(images.cpu(), out.landmarks.cpu(), cols=4), folder / f"{prefix}landmarks.png")
        viz.save(viz.reconstruction_sheet(images.cpu(), deformed.cpu(), gaussians.cpu(), out.reconstruction.cpu()),
                 folder / f"{prefix}reconstructions.png")
        if self.regressor.fit_info is not None:
            viz.save(viz.prediction_sheet(images.cpu(), self.regressor(out.landmarks).cpu(), self.meta,
                                          ground_truth=b["keypoints"], cols=4), folder / f"{prefix}predictions.png")
        self.model.train()


def load_core(detector, state: dict[str, Tensor]) -> None:
    """The core detector's body (``state`` of a :class:`~kpfast.models.KeypointDetector`, its head left
    out) into ``detector``; :class:`CheckpointError` if the body does not fit."""
    body = {k: v for k, v in state.items() if not k.startswith("head.")}
    try:
        missing, unexpected = detector.load_state_dict(body, strict=False)
    except RuntimeError as e:
        raise CheckpointError(f"the source detector's weights do not fit this run's detector ({e})") from None
    missing = [k for k in missing if not k.startswith("head.")]
    if missing or unexpected:
        raise CheckpointError(f"the source detector's weights do not fit this run's detector (missing {missing}, "
                              f"unexpected {unexpected})")


def _fmt(v: Optional[float]) -> str:
    return "n/a" if v is None else f"{v:.2f}"
