"""Masked L1 between keypoint sets: the few-shot loss (Eq. 2) and the 2D equivariance loss (Eq. 3)."""

from __future__ import annotations

from typing import Optional

from torch import Tensor


def masked_keypoint_l1(prediction: Tensor, target: Tensor, mask: Optional[Tensor] = None) -> Tensor:
    """Mean absolute coordinate difference over the keypoints where ``mask`` is True.

    ``prediction, target [B, K, 2]``, ``mask [B, K]`` bool (None: all). The mean runs over
    the ``2 * mask.sum()`` coordinates (``F.l1_loss`` on the valid keypoints); with no
    valid keypoint the loss is an exact 0 that is still connected to ``prediction``.

    Example:
        >>> import torch
        >>> p, t = torch.zeros(1, 2, 2), torch.tensor([[[1.0, 1.0], [4.0, 4.0]]])
        >>> masked_keypoint_l1(p, t, torch.tensor([[True, False]])).item()
        1.0
    """
    if prediction.shape != target.shape:
        raise ValueError(f"prediction {tuple(prediction.shape)} and target {tuple(target.shape)} must have the same shape")
    err = (prediction - target).abs().sum(-1)  # [B, K]
    if mask is None:
        return err.mean() / 2
    m = mask.to(err.dtype)
    if m.shape != err.shape:
        raise ValueError(f"mask must be [B, K] = {tuple(err.shape)}, got {tuple(mask.shape)}")
    return (err * m).sum() / (2 * m.sum()).clamp_min(1.0)


def few_shot_loss(prediction: Tensor, target: Tensor, labeled: Tensor) -> Tensor:
    """Eq. 2: L1 between detected and annotated keypoints, over annotated keypoints only.

    ``prediction, target [B, K, 2]`` (the labelled part of the batch), ``labeled [B, K]`` bool.
    """
    return masked_keypoint_l1(prediction, target, labeled)


def equivariance_loss(on_transformed: Tensor, transformed_detections: Tensor, inside: Tensor) -> Tensor:
    """Eq. 3: L1 between ``k(T(I))`` and ``T(k(I))``, ignoring keypoints that ``T`` moves out of the image.

    ``on_transformed [B, K, 2]`` = detections on the transformed images;
    ``transformed_detections [B, K, 2]`` = the detections on the originals carried by
    ``T`` (flip permutation applied); ``inside [B, K]`` bool. Zero for an exactly
    equivariant detector.
    """
    return masked_keypoint_l1(on_transformed, transformed_detections, inside)
