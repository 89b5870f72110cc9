"""The reconstruction loss: a pixel term plus an optional perceptual term.

He et al. (Eq. 9) and AutoLink use the L1 pixel error; Sanchez & Tzimiropoulos (and
Jakab et al., whose objective they follow) the squared error.
"""

from __future__ import annotations

from typing import Optional

from torch import Tensor

from .perceptual import PerceptualLoss

PIXEL_ERRORS = ("l1", "l2")


def reconstruction_loss(reconstruction: Tensor, target: Tensor,
                        perceptual: Optional[PerceptualLoss] = None, *, pixel: str = "l1") -> tuple[Tensor, dict]:
    """``mean |I - I'| + perceptual(I', I)`` (``pixel="l2"``: ``mean (I - I')^2 + perceptual(I', I)``).

    ``reconstruction, target [B, 3, H, W]`` in ``[0, 1]``. Returns ``(total, parts)``
    with ``parts = {"l1" or "l2": ..., "perceptual": ...}`` (detached, for logging; no
    ``"perceptual"`` key without a perceptual loss).

    Example:
        >>> import torch
        >>> x = torch.rand(1, 3, 4, 4)
        >>> reconstruction_loss(x, x)[0].item()
        0.0
        >>> reconstruction_loss(torch.zeros(1, 3, 4, 4), torch.full((1, 3, 4, 4), 0.5), pixel="l2")[0].item()
        0.25
    """
    if pixel not in PIXEL_ERRORS:
        raise ValueError(f"pixel must be one of {PIXEL_ERRORS}, got {pixel!r}")
    diff = reconstruction - target
    error = diff.abs().mean() if pixel == "l1" else diff.pow(2).mean()
    parts = {pixel: error.detach()}
    total = error
    if perceptual is not None:
        p = perceptual(reconstruction, target)
        parts["perceptual"] = p.detach()
        total = total + p
    return total, parts
