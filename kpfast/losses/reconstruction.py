"""The reconstruction loss (paper Eq. 9): L1 plus an optional perceptual term."""

from __future__ import annotations

from typing import Optional

from torch import Tensor

from .perceptual import PerceptualLoss


def reconstruction_loss(reconstruction: Tensor, target: Tensor,
                        perceptual: Optional[PerceptualLoss] = None) -> tuple[Tensor, dict]:
    """``mean |I - I'| + perceptual(I', I)``.

    ``reconstruction, target [B, 3, H, W]`` in ``[0, 1]``. Returns ``(total, parts)``
    with ``parts = {"l1": ..., "perceptual": ...}`` (detached, for logging; no
    ``"perceptual"`` key without a perceptual loss).

    Example:
        >>> import torch
        >>> x = torch.rand(1, 3, 4, 4)
        >>> reconstruction_loss(x, x)[0].item()
        0.0
    """
    l1 = (reconstruction - target).abs().mean()
    parts = {"l1": l1.detach()}
    total = l1
    if perceptual is not None:
        p = perceptual(reconstruction, target)
        parts["perceptual"] = p.detach()
        total = total + p
    return total, parts
