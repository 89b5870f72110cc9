"""Paired image/keypoint transforms for the 2D equivariance loss (batched, any device).

A random transform ``T`` per batch element: horizontal flip, then a similarity
(rotation, scale, translation) about the image centre, then colour jitter. The
geometric part is warped with ``F.affine_grid``/``F.grid_sample(align_corners=True)``,
so ``T`` applied to keypoints matches the warped image exactly (to float rounding),
in the kpfast keypoint convention.

How ``strength`` in [0, 1] scales each range (``TransformRanges`` defaults = paper):

==============  =============================================================
rotation        angle ~ U(-60 deg, 60 deg) * strength
translation     shift ~ U(-0.1, 0.1) * strength of the image size, per axis
scale           s ~ U(1 - 0.1 * strength, 1)
flip            with probability 0.5 * strength (never at 0, half the time at 1)
brightness      factor ~ U(1 - 0.5 s, 1 + 0.5 s), s = strength
contrast        factor ~ U(1 - 0.5 s, 1 + 0.5 s) (blend with the image's mean grey)
saturation      factor ~ U(1 - 0.5 s, 1 + 0.5 s) (blend with the pixel's grey)
hue             shift ~ U(-0.5 s, 0.5 s) of a full turn (0.5 = 180 deg; rotation of
                the chroma plane in YIQ space)
==============  =============================================================

Strength 0 is the identity. Flipping relabels keypoints with ``flip_perm``
(``KeypointMeta.flip_perm``): keypoint ``j`` of the flipped sample is the mirror
image of keypoint ``flip_perm[j]`` of the original.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

__all__ = ["TransformRanges", "PairedTransform", "sample_transform", "random_paired_transform", "color_jitter"]


@dataclass(frozen=True)
class TransformRanges:
    """Ranges at strength 1 (see the module docstring)."""

    rotation_deg: float = 60.0
    translation: float = 0.1
    scale: float = 0.1
    flip_prob: float = 0.5
    brightness: float = 0.5
    contrast: float = 0.5
    saturation: float = 0.5
    hue: float = 0.5


@dataclass
class PairedTransform:
    """A batch of sampled transforms; all tensors have a leading batch dim ``B``.

    ``matrix [B, 2, 2]`` and ``offset [B, 2]`` map input keypoints to output
    keypoints (normalized coordinates, flip included): ``k' = matrix @ k + offset``.
    ``flip [B]`` bool; ``brightness``, ``contrast``, ``saturation`` ``[B]`` factors and
    ``hue [B]`` (fraction of a turn); ``size`` the ``(H, W)`` it was built for.
    """

    matrix: torch.Tensor
    offset: torch.Tensor
    flip: torch.Tensor
    brightness: torch.Tensor
    contrast: torch.Tensor
    saturation: torch.Tensor
    hue: torch.Tensor
    size: tuple

    @property
    def batch_size(self) -> int:
        return self.matrix.shape[0]

    def to(self, device) -> "PairedTransform":
        return replace(self, **{k: getattr(self, k).to(device) for k in
                                ("matrix", "offset", "flip", "brightness", "contrast", "saturation", "hue")})

    def _check_batch(self, t: torch.Tensor, name: str):
        if t.shape[0] != self.batch_size:
            raise ValueError(f"{name} has batch size {t.shape[0]} but the transform was sampled for {self.batch_size}")

    def warp_images(self, images: torch.Tensor, *, mode: str = "bilinear", padding_mode: str = "zeros") -> torch.Tensor:
        """Geometric part only: ``[B, C, H, W]`` -> ``[B, C, H, W]`` (``grid_sample``, ``align_corners=True``)."""
        if images.ndim != 4:
            raise ValueError(f"images must be [B, C, H, W], got shape {tuple(images.shape)}")
        self._check_batch(images, "images")
        if tuple(images.shape[-2:]) != tuple(self.size):
            raise ValueError(f"images are {tuple(images.shape[-2:])} but the transform was sampled for size {self.size}")
        dt = images.dtype if images.is_floating_point() else torch.float32
        m = self.matrix.to(images.device, torch.float64)
        t = self.offset.to(images.device, torch.float64)
        inv = torch.linalg.inv(m)
        theta = torch.cat([inv, -(inv @ t.unsqueeze(-1))], dim=-1).to(dt)  # output -> input
        grid = F.affine_grid(theta, list(images.shape), align_corners=True)
        return F.grid_sample(images.to(dt), grid, mode=mode, padding_mode=padding_mode, align_corners=True)

    def jitter_colors(self, images: torch.Tensor) -> torch.Tensor:
        """Colour part only, on ``[B, 3, H, W]`` in [0, 1]."""
        self._check_batch(images, "images")
        d = images.device
        return color_jitter(images, self.brightness.to(d), self.contrast.to(d), self.saturation.to(d), self.hue.to(d))

    def apply_images(self, images: torch.Tensor) -> torch.Tensor:
        """Warp then colour-jitter a batch of images ``[B, 3, H, W]`` in [0, 1]."""
        return self.jitter_colors(self.warp_images(images))

    def permute(self, values: torch.Tensor, flip_perm: Optional[Sequence[int]]) -> torch.Tensor:
        """Relabel per-keypoint values ``[B, K, ...]`` of flipped samples with ``flip_perm``."""
        self._check_batch(values, "values")
        if flip_perm is None:
            return values
        perm = torch.as_tensor(list(flip_perm), dtype=torch.long, device=values.device)
        if perm.numel() != values.shape[1]:
            raise ValueError(f"flip_perm has {perm.numel()} entries but values have K = {values.shape[1]}")
        flipped = self.flip.to(values.device).view(-1, *([1] * (values.ndim - 1)))
        return torch.where(flipped, values[:, perm], values)

    def apply_keypoints(self, keypoints: torch.Tensor, flip_perm: Optional[Sequence[int]] = None):
        """Transform keypoints ``[B, K, 2]`` (normalized) the way the images are warped.

        Returns ``(keypoints [B, K, 2], inside [B, K] bool)``; ``inside`` marks keypoints
        that land inside the image (``|x|, |y| <= 1``). With flips, pass ``flip_perm``
        so that left/right keypoints keep their meaning (required if any sample flips).
        """
        if keypoints.ndim != 3 or keypoints.shape[-1] != 2:
            raise ValueError(f"keypoints must be [B, K, 2], got shape {tuple(keypoints.shape)}")
        self._check_batch(keypoints, "keypoints")
        if flip_perm is None and bool(self.flip.any()):
            raise ValueError("some samples are flipped: pass flip_perm (meta.flip_perm) to relabel left/right keypoints")
        m = self.matrix.to(keypoints.device, keypoints.dtype)
        t = self.offset.to(keypoints.device, keypoints.dtype)
        out = keypoints @ m.transpose(1, 2) + t.unsqueeze(1)
        out = self.permute(out, flip_perm)
        inside = (out.abs() <= 1.0).all(dim=-1)
        return out, inside


def sample_transform(batch_size: int, strength: float = 1.0, *, size=(128, 128), generator: Optional[torch.Generator] = None,
                     ranges: TransformRanges = TransformRanges(), device=None) -> PairedTransform:
    """Sample ``batch_size`` random transforms at ``strength`` in [0, 1].

    Random numbers are drawn on the CPU from ``generator`` (so results do not depend
    on the device) and moved to ``device``.

    Example:
        >>> import torch
        >>> g = torch.Generator().manual_seed(0)
        >>> T = sample_transform(4, 0.5, size=(64, 64), generator=g)
        >>> kp, inside = T.apply_keypoints(torch.zeros(4, 3, 2), flip_perm=[0, 2, 1])
        >>> T.apply_images(torch.rand(4, 3, 64, 64)).shape, kp.shape, inside.shape
        (torch.Size([4, 3, 64, 64]), torch.Size([4, 3, 2]), torch.Size([4, 3]))
    """
    if not 0.0 <= float(strength) <= 1.0:
        raise ValueError(f"strength must be in [0, 1], got {strength}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    s = float(strength)
    b = batch_size
    u = torch.rand(b, 9, generator=generator, dtype=torch.float64)
    sym = u * 2.0 - 1.0
    angle = sym[:, 0] * math.radians(ranges.rotation_deg) * s
    shift = sym[:, 1:3] * ranges.translation * s * 2.0  # fraction of the size -> normalized units (image spans 2)
    scale = 1.0 - u[:, 3] * ranges.scale * s
    flip = u[:, 4] < ranges.flip_prob * s
    bright = 1.0 + sym[:, 5] * ranges.brightness * s
    contrast = 1.0 + sym[:, 6] * ranges.contrast * s
    sat = 1.0 + sym[:, 7] * ranges.saturation * s
    hue = sym[:, 8] * ranges.hue * s
    # similarity in pixel-proportional coordinates, expressed in normalized ones:
    # M = D^-1 (s R Fx) D with D = diag((W-1)/2, (H-1)/2)
    c, sn = torch.cos(angle), torch.sin(angle)
    fx = torch.where(flip, -1.0, 1.0).to(torch.float64)
    dx, dy = (w - 1) / 2.0, (h - 1) / 2.0
    m = torch.stack([torch.stack([scale * c * fx, -scale * sn * dy / dx], -1),
                     torch.stack([scale * sn * fx * dx / dy, scale * c], -1)], dim=-2)
    return PairedTransform(matrix=m.to(device), offset=shift.to(device), flip=flip.to(device),
                           brightness=bright.float().to(device), contrast=contrast.float().to(device),
                           saturation=sat.float().to(device), hue=hue.float().to(device), size=(h, w))


_GREY = (0.299, 0.587, 0.114)


def color_jitter(images: torch.Tensor, brightness, contrast, saturation, hue) -> torch.Tensor:
    """Batched colour jitter of ``[B, 3, H, W]`` in [0, 1]; each factor ``[B]``.

    Brightness multiplies; contrast blends with the image's mean grey; saturation
    blends with each pixel's grey; hue rotates the chroma (I, Q) plane of YIQ by
    ``2 pi hue``. Clamped to [0, 1] after each step."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be [B, 3, H, W], got shape {tuple(images.shape)}")
    v = lambda t: t.to(images.dtype).view(-1, 1, 1, 1)  # noqa: E731
    wg = torch.tensor(_GREY, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    x = (images * v(brightness)).clamp(0, 1)
    mean = (x * wg).sum(1, keepdim=True).mean(dim=(2, 3), keepdim=True)
    x = (mean + (x - mean) * v(contrast)).clamp(0, 1)
    grey = (x * wg).sum(1, keepdim=True)
    x = (grey + (x - grey) * v(saturation)).clamp(0, 1)
    to_yiq = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]],
                          dtype=images.dtype, device=images.device)
    from_yiq = torch.linalg.inv(to_yiq)
    a = hue.to(images.dtype) * (2 * math.pi)
    ca, sa = torch.cos(a), torch.sin(a)
    one, zero = torch.ones_like(a), torch.zeros_like(a)
    rot = torch.stack([torch.stack([one, zero, zero], -1), torch.stack([zero, ca, -sa], -1),
                       torch.stack([zero, sa, ca], -1)], -2)  # [B, 3, 3]
    mat = from_yiq @ rot @ to_yiq
    x = torch.einsum("bij,bjhw->bihw", mat, x)
    return x.clamp(0, 1)


def random_paired_transform(images: torch.Tensor, keypoints: torch.Tensor, strength: float, *,
                            flip_perm: Optional[Sequence[int]] = None, generator: Optional[torch.Generator] = None,
                            ranges: TransformRanges = TransformRanges()):
    """Sample and apply one transform per batch element.

    Args:
        images: ``[B, 3, H, W]`` in [0, 1]; keypoints: ``[B, K, 2]`` normalized.
        strength: in [0, 1]; flip_perm: ``meta.flip_perm`` (flips are off without it).

    Returns:
        ``(images', keypoints', inside [B, K], transform)``.

    Example:
        >>> import torch
        >>> im, kp, inside, T = random_paired_transform(torch.rand(2, 3, 32, 32), torch.zeros(2, 5, 2), 1.0,
        ...                                             flip_perm=list(range(5)), generator=torch.Generator().manual_seed(1))
        >>> bool(inside.all())
        True
    """
    if flip_perm is None:
        ranges = replace(ranges, flip_prob=0.0)
    T = sample_transform(images.shape[0], strength, size=tuple(images.shape[-2:]), generator=generator, ranges=ranges,
                         device=images.device)
    kp, inside = T.apply_keypoints(keypoints, flip_perm)
    return T.apply_images(images), kp, inside, T
