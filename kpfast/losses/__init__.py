"""The training objectives of the method, each a plain function on tensors.

- :func:`few_shot_loss` (Eq. 2) and :func:`equivariance_loss` (Eq. 3): masked L1
  between keypoint sets (:func:`masked_keypoint_l1`);
- :func:`part_geometry_loss` (Eq. 5) with :func:`choose_partners`, on
  :func:`kpfast.part_alignment`;
- :func:`reconstruction_loss` (Eq. 9): L1 (or squared) pixel error + optional perceptual term
  (:class:`PerceptualLoss`, built from a spec by :func:`build_perceptual_loss`);
- :func:`smoothness_loss` with :func:`smoothness_triples`: the face jaw/nose penalty;
- Moskvyak et al.'s (``--method moskvyak``, :mod:`kpfast.losses.moskvyak`): :func:`heatmap_loss` on
  :func:`gaussian_heatmaps`, :func:`equivariance_mse` (TE), :func:`semantic_consistency_loss` (SC),
  :func:`invariance_mse` (TI).

How they are combined, weighted and scheduled is in :mod:`kpfast.train`.
"""

from .keypoint_l1 import equivariance_loss, few_shot_loss, masked_keypoint_l1
from .moskvyak import equivariance_mse, gaussian_heatmaps, heatmap_loss, invariance_mse, semantic_consistency_loss
from .part_geometry import choose_partners, part_geometry_loss
from .perceptual import PerceptualLoss, build_perceptual_loss, load_feature_module
from .reconstruction import reconstruction_loss
from .smoothness import SMOOTH_PARTS, smoothness_loss, smoothness_triples

__all__ = ["few_shot_loss", "equivariance_loss", "masked_keypoint_l1", "part_geometry_loss", "choose_partners",
           "reconstruction_loss", "PerceptualLoss", "build_perceptual_loss", "load_feature_module", "smoothness_loss",
           "smoothness_triples", "SMOOTH_PARTS", "gaussian_heatmaps", "heatmap_loss", "equivariance_mse",
           "semantic_consistency_loss", "invariance_mse"]
