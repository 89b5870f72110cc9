"""Random patch masking of the image the reconstruction UNet sees (paper Sec. 3.5, Supp. A)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def patch_size_for(image_size: int, patches_per_side: int = 16) -> int:
    """Side of a mask patch for a ``patches_per_side`` x ``patches_per_side`` grid.

    The paper "divide[s] the image into 16x16 patches"; AutoLink's code and a public
    re-implementation of the paper both mask cells of a 16x16 grid (8 px at 128 px),
    which is the reading kpfast follows.

    Example:
        >>> patch_size_for(128), patch_size_for(64), patch_size_for(64, 8)
        (8, 4, 8)
    """
    if image_size % patches_per_side:
        raise ValueError(f"image_size {image_size} is not divisible into {patches_per_side} patches per side")
    return image_size // patches_per_side


def patch_mask(images: Tensor, patch_size: int, ratio: float = 0.9, *,
               generator: Optional[torch.Generator] = None) -> tuple[Tensor, Tensor]:
    """Zero out ``round(ratio * N)`` of the ``N`` square patches of each image, chosen at random.

    Args:
        images: ``[B, C, H, W]``, ``H`` and ``W`` divisible by ``patch_size``.
        patch_size: side of a patch in pixels.
        ratio: share of patches masked (the paper: 0.9).
        generator: source of randomness (CPU generator; the draw is made on the CPU so
            that runs are reproducible across devices).

    Returns:
        ``(masked images [B, C, H, W], keep [B, 1, H, W] float: 1 where the pixel is kept)``.

    Example:
        >>> x = torch.ones(2, 3, 16, 16)
        >>> masked, keep = patch_mask(x, 4, 0.75, generator=torch.Generator().manual_seed(0))
        >>> keep.mean().item(), masked.sum().item() == 2 * 3 * 4 * 16
        (0.25, True)
    """
    B, _, H, W = images.shape
    if H % patch_size or W % patch_size:
        raise ValueError(f"image sides {H}x{W} are not divisible by patch_size {patch_size}")
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"mask ratio must be in [0, 1], got {ratio}")
    gh, gw = H // patch_size, W // patch_size
    n = gh * gw
    n_masked = int(round(ratio * n))
    order = torch.rand(B, n, generator=generator).argsort(dim=1)
    keep = torch.ones(B, n)
    keep.scatter_(1, order[:, :n_masked], 0.0)
    keep = keep.view(B, 1, gh, 1, gw, 1).expand(B, 1, gh, patch_size, gw, patch_size).reshape(B, 1, H, W)
    keep = keep.to(device=images.device, dtype=images.dtype)
    return images * keep, keep
