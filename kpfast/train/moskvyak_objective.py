"""The objective of ``--method moskvyak`` (Moskvyak et al., ICLR 2021): which terms, on which images.

Per step the batch is ``U`` unlabelled images followed by ``L`` labelled ones (as for
every kpfast method). With the ground-truth heatmaps ``H`` of the labelled keypoints
(unit-peak Gaussians, ``heatmap_sigma`` heatmap pixels) and one random perspective
warp ``g`` per image (:func:`kpfast.data.perspective.sample_perspective`, drawn from
the run's ``transforms`` stream), the detector runs once on the images and their
warped copies, and:

- ``heatmap`` (``w_heatmap``): half the heatmap MSE on the ``L`` labelled images;
- ``te`` (``w_te``, transformation equivariance): ``|f(g(x)) - g(f(x))|^2`` on all
  ``U + L`` images;
- ``sc`` (``w_sc``, semantic consistency): cross-entropy of the keypoint classifier on
  the representations of all ``U + L`` images;
- ``ti`` (``w_ti``, transformation invariance): ``|z(x) - z(g(x))|^2`` on all ``U + L`` images.

In the unsupervised terms the labelled keypoints' heatmaps are the ground truth (the
paper's alternative to ramping the unsupervised terms up): wherever a keypoint is
labelled, TE compares ``f(g(x))`` with ``g(H)`` (a supervised signal on the warped copy),
SC classifies the representation pooled with ``H``, and TI compares it with the one
pooled from the warped copy's features with ``g(H)``. With no unsupervised term the run
trains on the labelled images alone.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

from torch import Tensor

from ..config import TrainConfig
from ..data.perspective import sample_perspective
from ..losses import equivariance_mse, gaussian_heatmaps, heatmap_loss, invariance_mse, semantic_consistency_loss
from ..models.moskvyak import HeatmapLabels, MoskvyakOutputs
from .data import Batch
from .objective import TermRecord
from .streams import RandomStreams

UNSUPERVISED = ("sc", "te", "ti")


@dataclass
class MoskvyakTerms(TermRecord):
    """The unweighted scalar loss terms of one step; a term the run does not train is None."""

    heatmap: Tensor
    sc: Optional[Tensor] = None
    te: Optional[Tensor] = None
    ti: Optional[Tensor] = None



TERMS = tuple(f.name for f in dataclasses.fields(MoskvyakTerms))
"""The names of the loss terms, in log order."""


class MoskvyakObjective:
    """Computes the loss terms of one step (see the module docstring).

    Call with ``(model, batch, step, streams)``: a :class:`~kpfast.models.moskvyak.MoskvyakModel`
    (or its DDP wrapper), a :class:`~kpfast.train.data.Batch`, the 0-based step and the run's
    :class:`RandomStreams`. Returns ``(terms, outputs)``: :class:`MoskvyakTerms` and
    :class:`~kpfast.models.moskvyak.MoskvyakOutputs` (its ``warp`` set).
    """

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.weights = {"heatmap": cfg.w_heatmap, "sc": cfg.w_sc, "te": cfg.w_te, "ti": cfg.w_ti}
        self.active = {"heatmap": True, **{t: cfg.uses(t) for t in UNSUPERVISED}}
        self.sigma = cfg.heatmap_sigma

    @property
    def uses_unlabeled(self) -> bool:
        """Whether any term sees the unlabelled images."""
        return any(self.active[t] for t in UNSUPERVISED)

    @property
    def warps(self) -> bool:
        """Whether the step warps its images (equivariance or invariance is trained)."""
        return self.active["te"] or self.active["ti"]

    def total(self, terms: MoskvyakTerms) -> Tensor:
        """``sum_t weight_t * term_t``."""
        return sum(self.weights[k] * v for k, v in terms.as_dict().items())

    def __call__(self, model, batch: Batch, step: int, streams: RandomStreams) -> tuple[MoskvyakTerms, MoskvyakOutputs]:
        images = batch.images
        B, L = images.shape[0], batch.labeled_keypoints.shape[0]
        side = getattr(model, "module", model).detector.heatmap_size(images.shape[-1])
        truth = gaussian_heatmaps(batch.labeled_keypoints, (side, side), self.sigma, batch.labeled_mask)
        warp = transformed = None
        if self.warps:
            warp = sample_perspective(B, size=tuple(images.shape[-2:]), generator=streams["transforms"],
                                      device=images.device)
            transformed = warp.warp(images)
        labels = HeatmapLabels(truth, batch.labeled_mask, warp[B - L:].warp(truth) if warp else None)
        out = model(images, transformed=transformed, labels=labels)
        out.warp = warp
        terms = MoskvyakTerms(heatmap=heatmap_loss(out.heatmaps[B - L:], truth, batch.labeled_mask))
        if self.active["sc"]:
            terms.sc = semantic_consistency_loss(out.logits)
        if self.active["te"]:
            terms.te = equivariance_mse(out.heatmaps_transformed, out.reference, warp.warp)
        if self.active["ti"]:
            terms.ti = invariance_mse(out.representations, out.representations_transformed)
        return terms, out

