"""Convolutional building blocks shared by the detector and the reconstruction UNet."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

NORMS = ("batch", "group", "none")


def norm_layer(kind: str, channels: int) -> nn.Module:
    """``"batch"`` (BatchNorm2d), ``"group"`` (GroupNorm, up to 8 groups) or ``"none"``."""
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        groups = next(g for g in (8, 4, 2, 1) if channels % g == 0)
        return nn.GroupNorm(groups, channels)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"norm must be one of {NORMS}, got {kind!r}")


def conv_norm_relu(c_in: int, c_out: int, norm: str, stride: int = 1) -> nn.Sequential:
    """3x3 convolution, normalization, ReLU."""
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1, bias=norm == "none"), norm_layer(norm, c_out),
                         nn.ReLU(inplace=True))


class StridedPointwiseConv(nn.Conv2d):
    """A 1x1 convolution with stride ``s``, computed as ``conv1x1(x[..., ::s, ::s])``.

    The same function and parameters as ``nn.Conv2d(c_in, c_out, 1, s)``. torch 2.13's
    CPU backward of a strided 1x1 convolution on channels_last inputs with fewer than 16
    input channels (3, 8, 12 at 128x128 or more) corrupts the heap; subsampling first
    avoids that kernel. :class:`ResidualBlock` uses it only there: it is slower than the
    strided kernel on wide inputs.
    """

    def __init__(self, c_in: int, c_out: int, stride: int, bias: bool):
        super().__init__(c_in, c_out, 1, bias=bias)
        self.step = stride

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(x[..., ::self.step, ::self.step], self.weight, self.bias)


def pointwise(c_in: int, c_out: int, stride: int, bias: bool) -> nn.Conv2d:
    """A 1x1 convolution with ``stride``; :class:`StridedPointwiseConv` where torch 2.13 needs it."""
    if stride > 1 and c_in < 16:
        return StridedPointwiseConv(c_in, c_out, stride, bias=bias)
    return nn.Conv2d(c_in, c_out, 1, stride, bias=bias)


class ResidualBlock(nn.Module):
    """A ResNet basic block: two 3x3 convolutions and a (projected) shortcut.

    ``stride=2`` halves the resolution. Shapes: ``[B, c_in, H, W] -> [B, c_out, H/stride, W/stride]``.
    """

    def __init__(self, c_in: int, c_out: int, *, stride: int = 1, norm: str = "batch"):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(c_in, c_out, 3, stride, 1, bias=norm == "none"), norm_layer(norm, c_out), nn.ReLU(inplace=True),
            nn.Conv2d(c_out, c_out, 3, 1, 1, bias=norm == "none"), norm_layer(norm, c_out),
        )
        self.shortcut = nn.Identity() if stride == 1 and c_in == c_out else nn.Sequential(
            pointwise(c_in, c_out, stride, bias=norm == "none"), norm_layer(norm, c_out))
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.relu(self.body(x) + self.shortcut(x))
