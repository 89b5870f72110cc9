"""One training step's objective: which terms, on which images, with which weights and schedules.

Per step the batch is ``U`` unlabelled images followed by ``L`` labelled ones (the
paper concatenates the labelled examples to every batch). On all ``U + L``
images:

- ``few_shot`` (Eq. 2): on the ``L`` labelled images, annotated keypoints only;
- ``geo2d`` (Eq. 3): one random transform per image (rotation, translation,
  scale, flip with the meta's left/right permutation, colour jitter) at strength
  ``min(1, step / ramp_length)``; keypoints leaving the image are ignored; the
  detector sees originals and transformed images in one call;
- ``geo3d`` (Eq. 5): per user part (weight 1) and the whole object
  (``whole_object_weight``), random partners for the first
  ``random_partner_iterations`` steps, then the minimizing partner, transform
  detached (:func:`kpfast.part_alignment`);
- ``recon`` (Eq. 9): 90 % of the 16x16 patch grid masked, edge map (with the
  uncertainty readout unless ``--without uncertainty``) + masked image -> UNet;
  L1 + perceptual;
- ``smooth``: the face jaw/nose penalty (faces only: metas with a ``contour``/``jaw`` part).

Random draws come from the run's independent streams (:mod:`kpfast.train.streams`):
transforms, masks and partners each from their own generator, so switching one
term off leaves the others' draws unchanged, and a resumed run draws exactly what
the uninterrupted one would.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from ..config import TrainConfig
from ..data import KeypointMeta
from ..data.transforms import sample_transform
from ..losses import (SMOOTH_PARTS, PerceptualLoss, equivariance_loss, few_shot_loss, part_geometry_loss,
                      reconstruction_loss, smoothness_loss, smoothness_triples)
from ..models import ModelOutputs, patch_mask, patch_size_for
from .data import Batch
from .streams import RandomStreams


class TermRecord:
    """A dataclass of a step's loss terms (None: not trained): :meth:`as_dict` for every method's record."""

    def as_dict(self) -> dict[str, Tensor]:
        """``{name: term}`` of the trained terms, in field order."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if getattr(self, f.name) is not None}


@dataclass
class LossTerms(TermRecord):
    """The unweighted scalar loss terms of one step; a term the run does not train is None."""

    few_shot: Tensor
    recon: Optional[Tensor] = None
    geo2d: Optional[Tensor] = None
    geo3d: Optional[Tensor] = None
    smooth: Optional[Tensor] = None


TERMS = tuple(f.name for f in dataclasses.fields(LossTerms))
"""``("few_shot", "recon", "geo2d", "geo3d", "smooth")``: every term's name, in the order terms are
computed, summed, logged and blamed by the NaN guard."""


class Objective:
    """Computes the weighted loss terms of one step (see the module docstring).

    Call with ``(model, batch, step, streams)``: a :class:`~kpfast.models.FewShotKeypointModel`
    (or its DDP wrapper), a :class:`~kpfast.train.data.Batch`, the 0-based step and the run's
    :class:`RandomStreams`. Returns ``(terms, outputs)``: the :class:`LossTerms` and the
    :class:`~kpfast.models.ModelOutputs`.
    """

    def __init__(self, cfg: TrainConfig, meta: KeypointMeta, perceptual: Optional[PerceptualLoss] = None):
        self.cfg = cfg
        self.meta = meta
        self.weights = {"few_shot": cfg.w_few_shot, "recon": cfg.w_recon, "geo2d": cfg.w_geo2d,
                        "geo3d": cfg.w_geo3d, "smooth": cfg.w_smooth}
        self.active = {"few_shot": True, **{t: cfg.uses(t) for t in ("recon", "geo2d", "geo3d")}}
        # faces only: a face meta names its jaw line "contour" (or "jaw")
        is_face = any(k in meta.parts for k in ("contour", "jaw"))
        self.triples = smoothness_triples(meta.edges, [v for k, v in meta.parts.items() if k in SMOOTH_PARTS])
        self.active["smooth"] = cfg.uses("smooth") and is_face and len(self.triples) > 0
        self.parts = meta.part_mask(include_whole=True)
        self.part_weights = torch.tensor([1.0] * len(meta.parts) + [cfg.whole_object_weight if meta.parts else 1.0])
        self.patch = patch_size_for(cfg.image_size, cfg.mask_grid)
        self.perceptual = perceptual

    def strength(self, step: int) -> float:
        """The 2D transform strength at ``step``: linear from 0 to 1 over ``ramp_length`` steps."""
        return min(1.0, step / max(self.cfg.ramp_length, 1))

    def total(self, terms: LossTerms) -> Tensor:
        """``sum_t weight_t * term_t``."""
        return sum(self.weights[k] * v for k, v in terms.as_dict().items())

    def __call__(self, model, batch: Batch, step: int, streams: RandomStreams) -> tuple[LossTerms, ModelOutputs]:
        cfg = self.cfg
        images = batch.images
        B, L = images.shape[0], batch.labeled_keypoints.shape[0]
        transform = transformed = masked = None
        if self.active["geo2d"]:
            transform = sample_transform(B, self.strength(step), size=tuple(images.shape[-2:]), generator=streams["transforms"],
                                         device=images.device)
            transformed = transform.apply_images(images)
        if self.active["recon"]:
            masked, _ = patch_mask(images, self.patch, cfg.mask_ratio, generator=streams["masks"])
        out = model(images, transformed=transformed, masked=masked, use_uncertainty=cfg.uses("uncertainty"))
        det = out.detections
        terms = LossTerms(few_shot=few_shot_loss(det.keypoints[B - L:], batch.labeled_keypoints, batch.labeled_mask))
        if self.active["recon"]:
            terms.recon, _ = reconstruction_loss(out.reconstruction, images, self.perceptual)
        if self.active["geo2d"]:
            target, inside = transform.apply_keypoints(det.keypoints, self.meta.flip_perm)
            terms.geo2d = equivariance_loss(out.detections_transformed.keypoints, target, inside)
        if self.active["geo3d"]:
            terms.geo3d = part_geometry_loss(det.points3d, self.parts, self.part_weights,
                                             random_partners=step < cfg.random_partner_iterations,
                                             generator=streams["partners"])
        if self.active["smooth"]:
            terms.smooth = smoothness_loss(det.keypoints, self.triples)
        return terms, out
