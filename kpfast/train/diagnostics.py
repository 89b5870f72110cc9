"""What each loss term does to the keypoints, measured in place during training.

Every ``diagnostics_every`` steps the :class:`Diagnostics` hook adds to the step's log row:

- ``grad_<term>``: the RMS over keypoints of the gradient of the *weighted* term with
  respect to the detected keypoints of the step's images (how hard the term pulls);
- ``align_<term>``: the cosine between the term's descent direction ``-grad`` and
  ``truth - prediction`` on the step's *unlabelled* images (does it pull toward the
  truth? 1: straight at it, 0: unrelated, < 0: away). It needs ground truth for
  the unlabelled images, which procedural data has and real training sets usually
  have too; the truth is read for this number only and never reaches a loss;
- ``alpha`` (edge map strength ``softplus(gamma)``, its mean over edges for a learned
  graph), ``sigma2`` (line thickness), ``certainty`` (mean ``sigmoid(v)`` of the
  uncertainty readout), ``depth_corr`` (per image Pearson correlation between the
  predicted and the true depth of the labelled keypoints, averaged; procedural data
  only: real data has no depth).

A term whose ``align`` stays near 0 while its ``grad`` dominates the others pulls the
keypoints somewhere the labels do not: the 3D loss with the wrong normalization did
exactly that (cosine ~0.01 at 3x the 2D term's gradient).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Mapping, Optional

import torch
from torch import Tensor

from .hooks import Hook

if TYPE_CHECKING:
    from ..models import ModelOutputs
    from .data import Batch
    from .loop import Trainer
    from .objective import LossTerms


def term_gradients(terms: Mapping[str, Tensor], weights: Mapping[str, float], keypoints: Tensor,
                   truth: Optional[Tensor] = None, known: Optional[Tensor] = None) -> dict[str, float]:
    """``grad_<term>`` and ``align_<term>`` for every term (see the module docstring).

    Args:
        terms: unweighted scalar loss terms, all computed from ``keypoints``.
        weights: the weight of each term.
        keypoints: ``[B, K, 2]`` detected keypoints (a non-leaf tensor of the step's graph), or any
            per-keypoint prediction ``[B, K, ...]`` (heatmaps ``[B, K, h, w]``: the RMS and the cosine
            then run over all of a keypoint's values).
        truth: ``[B, K, ...]`` the true values of ``keypoints``, or None (no ``align_*``).
        known: ``[B, K]`` bool: which entries of ``truth`` count (e.g. labelled keypoints of
            the unlabelled images only).

    The graph is kept (``retain_graph``): call before the step's ``backward``.

    Example:
        >>> kp = torch.zeros(1, 2, 2, requires_grad=True)
        >>> pred = kp * 1.0
        >>> truth = torch.tensor([[[1.0, 0.5], [-0.5, 1.0]]])
        >>> d = term_gradients({"l1": (pred - truth).abs().mean()}, {"l1": 1.0}, pred, truth)
        >>> round(d["align_l1"], 3), d["grad_l1"] > 0   # L1 pulls along (1, 1), the truth is along (1, 0.5)
        (0.949, True)
    """
    out = {}
    B, K = keypoints.shape[:2]
    for name, value in terms.items():
        w = float(weights[name])
        if not value.requires_grad or w == 0:
            continue
        (g,) = torch.autograd.grad(w * value, keypoints, retain_graph=True, allow_unused=True)
        g = (torch.zeros_like(keypoints) if g is None else g.detach()).flatten(2)
        out[f"grad_{name}"] = float(g.pow(2).sum(-1).mean().sqrt())
        if truth is not None:
            true = truth.flatten(2)
            m = torch.ones(B, K, dtype=torch.bool, device=g.device) if known is None else known.to(g.device)
            m = m[..., None] & torch.isfinite(true).all(-1, keepdim=True)
            toward = torch.where(m, true.to(g) - keypoints.detach().flatten(2), torch.zeros_like(g))
            descent = torch.where(m, -g, torch.zeros_like(g))
            den = float(toward.norm() * descent.norm())
            out[f"align_{name}"] = float((toward * descent).sum()) / den if den > 0 else math.nan
    return out


def depth_correlation(predicted: Tensor, true: Tensor, known: Tensor) -> float:
    """Mean over images of the Pearson correlation between ``predicted`` and ``true`` depth
    ``[B, K]`` over the keypoints where ``known`` and the true depth is finite (NaN if no image
    has at least 3 such keypoints with spread).

    Example:
        >>> d = torch.tensor([[0.1, 0.2, 0.4, 0.3]])
        >>> round(depth_correlation(2 * d + 1, d, torch.ones(1, 4, dtype=torch.bool)), 6)
        1.0
    """
    vals = []
    for p, t, m in zip(predicted.detach().double(), true.double(), known):
        m = m & torch.isfinite(t)
        if m.sum() < 3:
            continue
        p, t = p[m] - p[m].mean(), t[m] - t[m].mean()
        den = float(p.norm() * t.norm())
        if den > 1e-12:
            vals.append(float((p * t).sum()) / den)
    return sum(vals) / len(vals) if vals else math.nan


class Diagnostics(Hook):
    """Every ``every`` steps (counted from 1): the scalars of the module docstring, measured on the
    step's graph before its backward pass and added to its log row."""

    def __init__(self, trainer: Trainer, every: int):
        self.trainer, self.every = trainer, every
        self.measured: dict[str, float] = {}

    def after_loss(self, step: int, batch: Batch, terms: LossTerms, outputs: ModelOutputs) -> None:
        self.measured = self.measure(terms, outputs, batch) if (step + 1) % self.every == 0 else {}

    def after_step(self, step: int, scalars: dict[str, float]) -> None:
        scalars.update(self.measured)

    def measure(self, terms: LossTerms, outputs: ModelOutputs, batch: Batch) -> dict[str, float]:
        det, truth, edge_map = outputs.detections, batch.truth, self.trainer.model.edge_map
        unlabeled_known = truth.labeled & truth.unlabeled[:, None]
        scalars = term_gradients(terms.as_dict(), self.trainer.objective.weights, det.keypoints, truth.keypoints,
                                 unlabeled_known)
        scalars["certainty"] = float(torch.sigmoid(det.uncertainty.detach()).mean())
        scalars["depth_corr"] = depth_correlation(det.depth, truth.depth, truth.labeled)
        if edge_map is not None:
            scalars["alpha"] = float(edge_map.alpha.detach().mean())
            scalars["sigma2"] = float(edge_map.sigma2.detach())
        return scalars
