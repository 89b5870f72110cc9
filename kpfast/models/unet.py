"""The reconstruction UNet (paper Sec. 3.5): edge map + masked image -> image."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .blocks import conv_norm_relu


class ReconstructionUNet(nn.Module):
    """A UNet that reconstructs an image from its edge map and a patch-masked copy.

    Input ``[B, 1 + 3, S, S]``: the edge map ``[B, 1, S, S]`` concatenated with the
    masked image ``[B, 3, S, S]`` (see :func:`kpfast.models.patch_mask`). Output
    ``[B, 3, S, S]`` in ``[0, 1]`` (sigmoid). ``S`` must be divisible by
    ``2 ** (len(widths) - 1)``.

    Args:
        widths: channels per level, full resolution first; each further level halves
            the resolution.
        in_channels: 4 (edge map + RGB).
        norm: ``"batch"``, ``"group"`` or ``"none"``.

    Example:
        >>> net = ReconstructionUNet(widths=(8, 16, 32))
        >>> net(torch.rand(2, 4, 16, 16)).shape
        torch.Size([2, 3, 16, 16])
    """

    def __init__(self, widths: Sequence[int] = (32, 64, 128, 256), *, in_channels: int = 4, norm: str = "batch"):
        super().__init__()
        if len(widths) < 2:
            raise ValueError(f"a UNet needs at least two levels, got widths={tuple(widths)}")
        self.levels = len(widths)
        self.enc = nn.ModuleList()
        c = in_channels
        for i, w in enumerate(widths):
            self.enc.append(nn.Sequential(conv_norm_relu(c, w, norm, stride=1 if i == 0 else 2),
                                          conv_norm_relu(w, w, norm)))
            c = w
        self.dec = nn.ModuleList()
        for w_skip in reversed(widths[:-1]):
            self.dec.append(nn.Sequential(conv_norm_relu(c + w_skip, w_skip, norm), conv_norm_relu(w_skip, w_skip, norm)))
            c = w_skip
        self.out = nn.Conv2d(c, 3, 1)

    def forward(self, x: Tensor) -> Tensor:
        factor = 2 ** (self.levels - 1)
        if x.shape[-1] % factor or x.shape[-2] % factor:
            raise ValueError(f"ReconstructionUNet with {self.levels} levels needs sides divisible by {factor}, "
                             f"got {tuple(x.shape[-2:])}")
        skips = []
        for enc in self.enc:
            x = enc(x)
            skips.append(x)
        skips.pop()
        for dec in self.dec:
            skip = skips.pop()
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = dec(torch.cat([x, skip], 1))
        return torch.sigmoid(self.out(x))
