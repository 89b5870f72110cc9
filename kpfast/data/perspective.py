"""Random perspective warps of images and of maps of any resolution (batched, any device).

A warp is a homography ``H`` per batch element acting on normalized coordinates
(``(x, y)`` in ``[-1, 1]``, pixel centres at the ends, ``align_corners=True``), so the
same warp moves an image and a heatmap of another resolution alike: a point at
``p`` in the input lands at ``H(p)`` in the output, whatever the map's size.

:func:`sample_perspective` draws one warp per element: a similarity about the
centre (rotation, scale, translation) whose four image corners are then each
moved at random (the perspective part), all in pixel-proportional units so that
a rotation stays a rotation on non-square images:

==============  ==============================================================
rotation        angle ~ U(-30 deg, 30 deg)
scale           s ~ U(0.9, 1.1)
translation     shift ~ U(-0.1, 0.1) of the image side, per axis
perspective     each corner moves by U(-0.1, 0.1) of the image side, per axis
==============  ==============================================================

Mild ranges: Moskvyak et al. draw perspective warps that avoid extreme warping.
Only geometry: no flips, no colour changes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["PerspectiveRanges", "PerspectiveWarp", "sample_perspective", "homography_from_corners"]

CORNERS = ((-1.0, -1.0), (1.0, -1.0), (1.0, 1.0), (-1.0, 1.0))


@dataclass(frozen=True)
class PerspectiveRanges:
    """Ranges of :func:`sample_perspective` (see the module docstring)."""

    rotation_deg: float = 30.0
    scale: float = 0.1
    translation: float = 0.1
    perspective: float = 0.1


@dataclass
class PerspectiveWarp:
    """A batch of homographies ``matrix [B, 3, 3]`` (float64) mapping input to output normalized coordinates.

    Example:
        >>> w = PerspectiveWarp(torch.eye(3, dtype=torch.float64).expand(2, 3, 3))
        >>> maps = torch.rand(2, 5, 16, 16)
        >>> torch.allclose(w.warp(maps), maps, atol=1e-6)
        True
    """

    matrix: Tensor

    @property
    def batch_size(self) -> int:
        return self.matrix.shape[0]

    def __getitem__(self, index) -> "PerspectiveWarp":
        """The warps of some batch elements (``warp[2:]``: all but the first two)."""
        matrix = self.matrix[index]
        return PerspectiveWarp(matrix if matrix.dim() == 3 else matrix[None])

    def _check_batch(self, t: Tensor, name: str) -> None:
        if t.shape[0] != self.batch_size:
            raise ValueError(f"{name} has batch size {t.shape[0]} but the warp was sampled for {self.batch_size}")

    def warp(self, maps: Tensor, *, mode: str = "bilinear") -> Tensor:
        """``maps [B, C, H, W]`` (images or heatmaps, any size) -> the warped maps, same shape.

        Each output pixel reads the input at ``H^-1`` of its centre (``grid_sample``,
        ``align_corners=True``); what comes from outside the input is 0.
        """
        if maps.dim() != 4:
            raise ValueError(f"maps must be [B, C, H, W], got shape {tuple(maps.shape)}")
        self._check_batch(maps, "maps")
        B, _, h, w = maps.shape
        inverse = torch.linalg.inv(self.matrix.to(maps.device, torch.float64))
        ys, xs = (torch.linspace(-1, 1, n, dtype=torch.float64, device=maps.device) for n in (h, w))  # a side of 1: -1
        gy, gx = torch.meshgrid(ys, xs, indexing="ij")
        points = torch.stack([gx, gy, torch.ones_like(gx)], -1).view(1, h * w, 3)
        source = points @ inverse.transpose(1, 2)  # [B, h*w, 3]
        grid = (source[..., :2] / source[..., 2:]).view(B, h, w, 2).to(maps.dtype)
        return F.grid_sample(maps, grid, mode=mode, padding_mode="zeros", align_corners=True)

    def apply_keypoints(self, keypoints: Tensor) -> tuple[Tensor, Tensor]:
        """``keypoints [B, K, 2]`` (normalized) -> ``(moved [B, K, 2], inside [B, K] bool)``."""
        if keypoints.dim() != 3 or keypoints.shape[-1] != 2:
            raise ValueError(f"keypoints must be [B, K, 2], got shape {tuple(keypoints.shape)}")
        self._check_batch(keypoints, "keypoints")
        m = self.matrix.to(keypoints.device, torch.float64)
        p = torch.cat([keypoints.double(), torch.ones_like(keypoints[..., :1], dtype=torch.float64)], -1)
        q = p @ m.transpose(1, 2)
        out = (q[..., :2] / q[..., 2:]).to(keypoints.dtype)
        return out, (out.abs() <= 1.0).all(-1)


def homography_from_corners(source: Tensor, target: Tensor) -> Tensor:
    """The homographies ``[B, 3, 3]`` carrying 4 points ``source [B, 4, 2]`` onto ``target [B, 4, 2]``
    (float64; the direct linear transform with ``H[2, 2] = 1``)."""
    src, dst = source.double(), target.double()
    x, y, u, v = src[..., 0], src[..., 1], dst[..., 0], dst[..., 1]
    one, zero = torch.ones_like(x), torch.zeros_like(x)
    rows_u = torch.stack([x, y, one, zero, zero, zero, -x * u, -y * u], -1)
    rows_v = torch.stack([zero, zero, zero, x, y, one, -x * v, -y * v], -1)
    a = torch.cat([rows_u, rows_v], 1)  # [B, 8, 8]
    b = torch.cat([u, v], 1)  # [B, 8]
    h = torch.linalg.solve(a, b)
    return torch.cat([h, torch.ones_like(h[:, :1])], 1).view(-1, 3, 3)


def sample_perspective(batch_size: int, *, size=(128, 128), generator: Optional[torch.Generator] = None,
                       ranges: PerspectiveRanges = PerspectiveRanges(), device=None) -> PerspectiveWarp:
    """Draw ``batch_size`` random warps for images of ``size`` ``(H, W)`` (see the module docstring).

    The random numbers are drawn on the CPU from ``generator`` (results do not depend on the
    device); the homographies are moved to ``device``.

    Example:
        >>> warp = sample_perspective(4, size=(64, 64), generator=torch.Generator().manual_seed(0))
        >>> warp.warp(torch.rand(4, 3, 64, 64)).shape, warp.warp(torch.rand(4, 7, 16, 16)).shape
        (torch.Size([4, 3, 64, 64]), torch.Size([4, 7, 16, 16]))
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    u = torch.rand(batch_size, 12, generator=generator, dtype=torch.float64) * 2 - 1  # U(-1, 1)
    angle = u[:, 0] * math.radians(ranges.rotation_deg)
    scale = 1.0 + u[:, 1] * ranges.scale
    # pixel-proportional units: normalized coordinates times the half-sides
    half = torch.tensor([(w - 1) / 2.0, (h - 1) / 2.0], dtype=torch.float64).clamp_min(0.5)
    side = 2 * half
    shift = u[:, 2:4] * ranges.translation * side
    jitter = u[:, 4:12].view(-1, 4, 2) * ranges.perspective * side
    c, s = torch.cos(angle), torch.sin(angle)
    rotation = torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2) * scale.view(-1, 1, 1)
    corners = torch.tensor(CORNERS, dtype=torch.float64) * half  # [4, 2]
    moved = corners @ rotation.transpose(1, 2) + shift[:, None] + jitter
    matrix = homography_from_corners(torch.tensor(CORNERS, dtype=torch.float64).expand(batch_size, 4, 2),
                                     moved / half)
    return PerspectiveWarp(matrix.to(device))
