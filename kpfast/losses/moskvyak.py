"""The objectives of Moskvyak et al.'s semi-supervised keypoint localization, each a function on tensors.

- :func:`gaussian_heatmaps`: the ground-truth heatmaps (unit-peak Gaussians at sub-pixel
  keypoints, in the heatmaps' own pixels);
- :func:`heatmap_loss`: the supervised loss, HRNet's: half the mean squared error over the
  labelled keypoints' heatmaps;
- :func:`equivariance_mse` (TE): ``|f(g(x)) - g(f(x))|^2``;
- :func:`semantic_consistency_loss` (SC): cross-entropy of the keypoint classifier on the
  keypoint representations, each labelled with its keypoint index;
- :func:`invariance_mse` (TI): ``|z - z'|^2`` between the representations of an image and of
  its warped copy.

The squared distances are means over their elements (the authors' TE code uses
``nn.MSELoss``); the paper's weights (1e3, 0.5, 1e2, 1e2) are on that scale.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor


def gaussian_heatmaps(keypoints: Tensor, size: tuple[int, int], sigma: float, mask: Optional[Tensor] = None) -> Tensor:
    """Unit-peak Gaussians ``exp(-d^2 / (2 sigma^2))`` at ``keypoints [B, K, 2]`` (``(x, y)`` in
    ``[-1, 1]``, pixel centres at the ends) on ``size = (h, w)`` maps; ``d`` and ``sigma`` in the
    maps' pixels. Keypoints outside ``mask [B, K]`` (and non-finite ones) get an all-zero map.

    Returns ``[B, K, h, w]`` in the keypoints' dtype.

    Example:
        >>> hm = gaussian_heatmaps(torch.tensor([[[0.0, -1.0]]]), (3, 5), 1.0)
        >>> hm[0, 0, 0].tolist() == [float(torch.exp(torch.tensor(-d * d / 2))) for d in (2.0, 1.0, 0.0, 1.0, 2.0)]
        True
    """
    if keypoints.dim() != 3 or keypoints.shape[-1] != 2:
        raise ValueError(f"keypoints must be [B, K, 2], got shape {tuple(keypoints.shape)}")
    if not sigma > 0:
        raise ValueError(f"sigma must be positive, got {sigma}")
    h, w = size
    valid = torch.isfinite(keypoints).all(-1)
    if mask is not None:
        valid = valid & mask.bool()
    kp = torch.where(valid[..., None], keypoints, torch.zeros_like(keypoints))
    px = (kp[..., 0] + 1) / 2 * (w - 1)
    py = (kp[..., 1] + 1) / 2 * (h - 1)
    gx = torch.arange(w, dtype=kp.dtype, device=kp.device)
    gy = torch.arange(h, dtype=kp.dtype, device=kp.device)
    ex = torch.exp(-(gx - px[..., None]) ** 2 / (2 * sigma ** 2))  # [B, K, w]
    ey = torch.exp(-(gy - py[..., None]) ** 2 / (2 * sigma ** 2))  # [B, K, h]
    return ey[..., :, None] * ex[..., None, :] * valid[..., None, None].to(kp.dtype)


def heatmap_loss(predicted: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """The supervised loss: ``0.5 * mean (predicted - target)^2`` over the pixels of the keypoints
    where ``mask``; ``predicted, target [L, K, h, w]``, ``mask [L, K]``. With no labelled keypoint an
    exact 0 still connected to ``predicted``.

    Example:
        >>> t = torch.zeros(1, 2, 2, 2)
        >>> heatmap_loss(t + 1.0, t, torch.tensor([[True, False]])).item()
        0.5
    """
    if predicted.shape != target.shape or mask.shape != predicted.shape[:2]:
        raise ValueError(f"predicted {tuple(predicted.shape)}, target {tuple(target.shape)} and mask "
                         f"{tuple(mask.shape)} must be [L, K, h, w], [L, K, h, w] and [L, K]")
    per_map = (predicted - target).pow(2).flatten(2).mean(-1)  # [L, K]
    m = mask.to(per_map.dtype)
    return 0.5 * (per_map * m).sum() / m.sum().clamp_min(1.0)


def equivariance_mse(on_transformed: Tensor, heatmaps: Tensor, warp: Callable[[Tensor], Tensor]) -> Tensor:
    """Transformation equivariance (paper Eq. 2): ``mean (f(g(x)) - g(f(x)))^2``.

    ``on_transformed [B, K, h, w]``: the heatmaps predicted on the warped images ``f(g(x))``;
    ``heatmaps [B, K, h, w]``: those of the images ``f(x)`` (ground truth substituted for the
    labelled keypoints); ``warp``: ``g`` on maps (e.g. :meth:`kpfast.data.perspective.PerspectiveWarp.warp`).
    Zero for a detector that commutes with the warp. Both sides carry gradients, as in the
    authors' code.
    """
    warped = warp(heatmaps)
    if warped.shape != on_transformed.shape:
        raise ValueError(f"the warped heatmaps {tuple(warped.shape)} and the heatmaps of the warped images "
                         f"{tuple(on_transformed.shape)} differ in shape")
    return F.mse_loss(on_transformed, warped)


def semantic_consistency_loss(logits: Tensor) -> Tensor:
    """Semantic consistency (paper Eq. 1): the cross-entropy of the classifier's ``logits [B, K, K]``
    (row ``k``: keypoint ``k``'s representation) against the keypoint indices, averaged over images
    and keypoints. At least ``log K`` when all ``K`` representations of an image are equal.

    Example:
        >>> import math
        >>> math.isclose(semantic_consistency_loss(torch.zeros(1, 4, 4)).item(), math.log(4), rel_tol=1e-6)
        True
    """
    if logits.dim() != 3 or logits.shape[1] != logits.shape[2]:
        raise ValueError(f"logits must be [B, K, K], got shape {tuple(logits.shape)}")
    B, K, _ = logits.shape
    target = torch.arange(K, device=logits.device).expand(B, K)
    return F.cross_entropy(logits.reshape(B * K, K), target.reshape(B * K))


def invariance_mse(representations: Tensor, representations_transformed: Tensor) -> Tensor:
    """Transformation invariance (paper Eq. 4): ``mean (z - z')^2`` over ``[B, K, C]`` representations
    of the images and of their warped copies (both carry gradients). Zero for invariant representations."""
    if representations.shape != representations_transformed.shape:
        raise ValueError(f"representations {tuple(representations.shape)} and "
                         f"{tuple(representations_transformed.shape)} differ in shape")
    return F.mse_loss(representations_transformed, representations)
