"""Pixel <-> normalized keypoint coordinates (the ``align_corners=True`` convention).

Every keypoint in kpfast is ``(x, y)`` in ``[-1, 1]`` with pixel *centres* at the
ends: column ``j`` of a ``W``-wide image sits at ``x = -1 + 2 j / (W - 1)`` and row
``i`` of an ``H``-high image at ``y = -1 + 2 i / (H - 1)``. This is what
``F.grid_sample(..., align_corners=True)`` and soft-argmax over a pixel grid use.

Pixel coordinates here are continuous and 0-based at pixel centres: ``(0, 0)`` is
the centre of the top-left pixel, ``(W - 1, H - 1)`` the centre of the bottom-right
one. Readers of formats that count from 1 (iBUG ``.pts``) or from the pixel corner
(COCO) shift their coordinates to this convention first.
"""

from __future__ import annotations

from typing import Sequence, Union

import numpy as np
import torch

__all__ = ["pixels_to_normalized", "normalized_to_pixels", "pixel_grid"]

Size = Union[int, Sequence[int]]
ArrayLike = Union[torch.Tensor, np.ndarray]


def _hw(size: Size) -> tuple[int, int]:
    """``size`` as ``(H, W)``; an int means a square image."""
    if isinstance(size, (int, np.integer)):
        h = w = int(size)
    else:
        try:
            h, w = (int(s) for s in size)
        except (TypeError, ValueError):
            raise TypeError(f"size must be an int or an (H, W) pair, got {size!r}") from None
    if h < 2 or w < 2:
        raise ValueError(f"size must be at least 2 pixels on each side (the convention divides by W - 1), got (H, W) = ({h}, {w})")
    return h, w


def _scale(xy: ArrayLike, size: Size):
    if not isinstance(xy, (torch.Tensor, np.ndarray)):
        raise TypeError(f"xy must be a torch.Tensor or numpy array, got {type(xy).__name__}")
    if xy.shape[-1] != 2:
        raise ValueError(f"xy must have a last dimension of 2 (x, y), got shape {tuple(xy.shape)}")
    h, w = _hw(size)
    if isinstance(xy, torch.Tensor):
        s = torch.tensor([w - 1, h - 1], dtype=xy.dtype if xy.is_floating_point() else torch.float32, device=xy.device)
    elif isinstance(xy, np.ndarray):
        s = np.array([w - 1, h - 1], dtype=xy.dtype if np.issubdtype(xy.dtype, np.floating) else np.float64)
    else:
        raise TypeError(f"xy must be a torch.Tensor or numpy array, got {type(xy).__name__}")
    return s


def pixels_to_normalized(xy: ArrayLike, size: Size) -> ArrayLike:
    """Map pixel coordinates to normalized ``[-1, 1]`` coordinates.

    Args:
        xy: ``[..., 2]`` tensor or array of ``(x, y)`` pixel coordinates, 0-based at
            pixel centres.
        size: image size, an int (square) or ``(H, W)``.

    Returns:
        ``[..., 2]`` of the same type: ``x_n = -1 + 2 x / (W - 1)``, ``y_n = -1 + 2 y / (H - 1)``.
        Integer inputs come back as float32 (tensor) / float64 (array).

    Example:
        >>> import torch
        >>> pixels_to_normalized(torch.tensor([[0.0, 0.0], [127.0, 63.5]]), 128)
        tensor([[-1., -1.],
                [ 1.,  0.]])
    """
    s = _scale(xy, size)
    return xy * (2.0 / s) - 1.0


def normalized_to_pixels(xy: ArrayLike, size: Size) -> ArrayLike:
    """Inverse of :func:`pixels_to_normalized`: ``x = (x_n + 1) (W - 1) / 2``.

    Args:
        xy: ``[..., 2]`` normalized ``(x, y)``.
        size: image size, an int (square) or ``(H, W)``.

    Example:
        >>> import torch
        >>> normalized_to_pixels(torch.tensor([[-1.0, 1.0]]), (64, 128))
        tensor([[ 0., 63.]])
    """
    s = _scale(xy, size)
    return (xy + 1.0) * (s / 2.0)


def pixel_grid(size: Size, *, dtype=torch.float32, device=None) -> torch.Tensor:
    """Normalized coordinates of every pixel centre, ``[H, W, 2]`` as ``(x, y)``.

    Example:
        >>> pixel_grid(3)[0, :, 0]
        tensor([-1.,  0.,  1.])
    """
    h, w = _hw(size)
    ys = torch.linspace(-1.0, 1.0, h, dtype=dtype, device=device)
    xs = torch.linspace(-1.0, 1.0, w, dtype=dtype, device=device)
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([gx, gy], dim=-1)
