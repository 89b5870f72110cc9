"""3FabRec's losses (Browatzki & Wallraven, CVPR 2020), each a plain function on tensors.

Stage 1, the autoencoder (Eq. 4): :func:`pixel_l1_loss` (``L_rec``, in 8-bit grey levels as in
the paper, so its weight 1 matches the paper's), :func:`structural_loss` (``L_cs``, Eqs. 1-3:
one minus the contrast-structure part of SSIM), and the two adversarial terms through
:func:`generator_loss` (the encoder against the latent discriminator, ``L_enc``; encoder and
generator against the image discriminator, ``L_adv``) with :func:`discriminator_loss` for the
discriminators. Stage 2 and 3: :func:`heatmap_loss` (``L_H``, Eq. 5) against
:func:`gaussian_heatmaps`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
CS_CONSTANT = 0.03 ** 2
"""SSIM's ``C2 = (0.03 L)^2`` for images in [0, 1] (``L = 1``); ``s`` uses ``C2 / 2``, as in Eq. 1."""


def pixel_l1_loss(reconstruction: Tensor, target: Tensor) -> Tensor:
    """``L_rec``: mean absolute difference in 8-bit grey levels (``255 * mean |x - x'|``) of
    ``[B, 3, H, W]`` images in ``[0, 1]``.

    Example:
        >>> x = torch.zeros(1, 3, 2, 2)
        >>> pixel_l1_loss(x + 1 / 255, x).item()
        1.0
    """
    return 255.0 * (reconstruction - target).abs().mean()


def _gaussian_window(size: int, sigma: float, channels: int, like: Tensor) -> Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-x ** 2 / (2 * sigma ** 2))
    g = (g / g.sum()).to(like)
    return (g[:, None] * g[None, :]).expand(channels, 1, size, size).contiguous()


def contrast_structure(x: Tensor, y: Tensor, *, window: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA,
                       c: float = CS_CONSTANT) -> Tensor:
    """The map ``c(a, b) s(a, b) = (2 sigma_ab + c) / (sigma_a^2 + sigma_b^2 + c)`` over every
    Gaussian-weighted ``window x window`` window that lies inside the images, per channel.

    ``x, y [B, C, H, W]`` (``H, W >= window``) -> ``[B, C, H - window + 1, W - window + 1]``, in
    ``[-1, 1]``; 1 where the windows agree up to brightness (the luminance term of SSIM is left out).
    """
    if x.shape != y.shape or x.dim() != 4:
        raise ValueError(f"x and y must be [B, C, H, W] of one shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    if min(x.shape[-2:]) < window:
        raise ValueError(f"images of {tuple(x.shape[-2:])} pixels are smaller than the {window}x{window} window")
    C = x.shape[1]
    w = _gaussian_window(window, sigma, C, x)
    blur = lambda t: F.conv2d(t, w, groups=C)  # noqa: E731
    mx, my = blur(x), blur(y)
    vx = blur(x * x) - mx * mx
    vy = blur(y * y) - my * my
    cov = blur(x * y) - mx * my
    return (2 * cov + c) / (vx + vy + c)


def structural_loss(reconstruction: Tensor, target: Tensor) -> Tensor:
    """``L_cs``: ``1 - mean`` of :func:`contrast_structure` between the images and their
    reconstructions (``[B, 3, H, W]`` in ``[0, 1]``). 0 iff every window matches up to its mean
    brightness; blind to a brightness offset, unlike :func:`pixel_l1_loss`.

    Example:
        >>> x = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
        >>> abs(structural_loss(x + 0.2, x).item()) < 1e-6
        True
    """
    return 1.0 - contrast_structure(reconstruction, target).mean()


def discriminator_loss(real: Tensor, fake: Tensor) -> Tensor:
    """A discriminator's loss on its logits for real samples (prior codes, images) and fakes
    (encodings, reconstructions): ``mean -log sigmoid(real) + mean -log(1 - sigmoid(fake))``."""
    return F.softplus(-real).mean() + F.softplus(fake).mean()


def generator_loss(fake: Tensor) -> Tensor:
    """The non-saturating adversarial loss of what made the fakes (``L_enc`` for the encoder,
    ``L_adv`` for encoder and generator): ``mean -log sigmoid(fake)``; it falls as the
    discriminator takes the fakes for real."""
    return F.softplus(-fake).mean()


def gaussian_heatmaps(keypoints: Tensor, size: int, sigma: float) -> Tensor:
    """Target heatmaps: ``exp(-|p - k|^2 / (2 sigma^2))`` over the pixel centres ``p`` of a
    ``size x size`` map (``align_corners`` convention, as :func:`kpfast.soft_argmax` reads it).

    Args:
        keypoints: ``[B, K, 2]`` ``(x, y)`` in ``[-1, 1]``.
        size: the side of the heatmaps.
        sigma: standard deviation in heatmap pixels.

    Returns:
        ``[B, K, size, size]``, peak 1 at a keypoint on a pixel centre.

    Example:
        >>> h = gaussian_heatmaps(torch.tensor([[[-1.0, 1.0]]]), 5, 1.0)
        >>> h[0, 0, 4, 0].item(), h.argmax().item()
        (1.0, 20)
    """
    px = (keypoints + 1) * (size - 1) / 2  # [B, K, 2] in pixels
    pixels = torch.arange(size, dtype=keypoints.dtype, device=keypoints.device)
    dx = (pixels.view(1, 1, 1, size) - px[..., 0, None, None]) ** 2
    dy = (pixels.view(1, 1, size, 1) - px[..., 1, None, None]) ** 2
    return torch.exp(-(dx + dy) / (2 * sigma ** 2))


def heatmap_loss(predicted: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """``L_H``: mean squared error between heatmaps ``[B, K, h, w]`` over the maps where ``mask``
    ``[B, K]`` (labelled keypoints inside the image) holds; 0 with no such map.

    Example:
        >>> t = torch.zeros(1, 2, 3, 3)
        >>> heatmap_loss(t + 1, t, torch.tensor([[True, False]])).item()
        1.0
    """
    m = mask.to(predicted.dtype)[..., None, None]
    per_pixel = (predicted - target) ** 2 * m
    return per_pixel.sum() / (m.sum() * math.prod(predicted.shape[-2:])).clamp_min(1.0)
