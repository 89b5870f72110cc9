"""The networks of unsupervised landmark adaptation (Sanchez & Tzimiropoulos, NeurIPS 2019).

- :class:`LandmarkDetector`: the keypoint detector's body (:class:`KeypointDetector`'s
  residual and upsampling blocks, so a trained detector's weights load into it) with a
  new head of ``K_d`` heatmaps, read by :func:`kpfast.soft_argmax` (``beta = 10`` in the
  paper) into discovered landmarks;
- :func:`gaussian_heatmaps`: the tight bottleneck: each landmark redrawn as
  ``exp(-|p - l|^2 / sigma^2)`` on the generator's grid (``sigma = sqrt(0.5)`` pixels in
  the paper);
- :class:`LandmarkGenerator`: the image generator: the deformed image, downsampled by
  strided convolutions, concatenated with the heatmaps, residual blocks, upsampling back
  to the image;
- :class:`AdaptationModel`: both behind one ``forward`` (what DDP wraps);
- :class:`AdaptedDetector` and :func:`adapted_detector_from_config`: what inference
  rebuilds from a ``model.pt``: the detector (projections folded into its weights) and
  the linear regressor from the discovered landmarks to the dataset's keypoints.

The per-layer projections are :mod:`kpfast.models.projection`, the regressors
:mod:`kpfast.models.linear_regression`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor, nn

from ..ops import soft_argmax
from .blocks import ResidualBlock, conv_norm_relu
from .detector import Detections, KeypointDetector
from .linear_regression import PointRegressor


class LandmarkDetector(KeypointDetector):
    """:class:`KeypointDetector`'s body with a head of ``num_landmarks`` heatmaps only.

    The body's parameters have the names (and shapes) of a :class:`KeypointDetector` built with
    the same ``widths``, ``up_widths`` and ``norm``, so a trained detector's state dict (its head
    left out) loads into it; the head is new.

    Args:
        num_landmarks: ``K_d``, the landmarks to discover.
        widths, up_widths, norm: as :class:`KeypointDetector`.
        beta: soft-argmax inverse temperature.

    ``forward(images [B, 3, S, S])`` -> ``(landmarks [B, K_d, 2], heatmaps [B, K_d, h, w])``.

    Example:
        >>> det = LandmarkDetector(4, widths=(8, 16), up_widths=(8,))
        >>> landmarks, heat = det(torch.rand(2, 3, 32, 32))
        >>> landmarks.shape, heat.shape
        (torch.Size([2, 4, 2]), torch.Size([2, 4, 16, 16]))
    """

    def __init__(self, num_landmarks: int, *, widths: Sequence[int] = (64, 128, 256, 512),
                 up_widths: Sequence[int] = (256, 256), norm: str = "batch", beta: float = 10.0):
        super().__init__(num_landmarks, widths=widths, up_widths=up_widths, norm=norm, beta=beta)
        self.head = nn.Conv2d(self.head.in_channels, num_landmarks, 1)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be [B, 3, H, W], got {tuple(images.shape)}")
        heat = self.head(self.up(self.down(self.stem(images - 0.5)))).contiguous()
        landmarks, _ = soft_argmax(heat, None, beta=self.beta)
        return landmarks, heat


def gaussian_heatmaps(points: Tensor, size: tuple[int, int], sigma: float) -> Tensor:
    """``exp(-|p - l_k|^2 / sigma^2)`` over the pixel centres ``p`` of an ``(h, w)`` grid.

    Args:
        points: ``[B, K, 2]`` ``(x, y)`` in ``[-1, 1]`` (align_corners: column ``j`` at
            ``-1 + 2 j / (w - 1)``).
        size: ``(h, w)``.
        sigma: in pixels of that grid.

    Returns:
        ``[B, K, h, w]``, 1 at a landmark's own position; differentiable in ``points``.

    Example:
        >>> m = gaussian_heatmaps(torch.tensor([[[0.0, -1.0]]]), (3, 5), 1.0)
        >>> [round(v, 4) for v in m[0, 0, 0].tolist()]   # exp(-4), exp(-1), 1, ... along the top row
        [0.0183, 0.3679, 1.0, 0.3679, 0.0183]
    """
    h, w = size
    px = (points[..., 0] + 1) * (0.5 * (w - 1))
    py = (points[..., 1] + 1) * (0.5 * (h - 1))
    u = torch.arange(w, device=points.device, dtype=points.dtype)
    v = torch.arange(h, device=points.device, dtype=points.dtype)
    gx = torch.exp(-(u - px[..., None]).pow(2) / sigma ** 2)  # [B, K, w]
    gy = torch.exp(-(v - py[..., None]).pow(2) / sigma ** 2)  # [B, K, h]
    return gy[..., :, None] * gx[..., None, :]


class LandmarkGenerator(nn.Module):
    """Deformed image + landmark heatmaps -> image.

    ``widths = (c_0, ..., c_n)``: a 3x3 convolution to ``c_0`` channels at full resolution,
    then ``n`` stride-2 convolutions (the paper: two, to 256 channels); the heatmaps
    ``[B, K_d, S / 2^n, S / 2^n]`` are concatenated there; ``blocks`` residual blocks (the
    paper: 6); ``n`` x2 upsampling blocks back to ``S``; a 3x3 convolution to RGB and a sigmoid.

    Example:
        >>> g = LandmarkGenerator(5, widths=(8, 16, 32), blocks=2)
        >>> g.bottleneck_size(32)
        8
        >>> g(torch.rand(2, 3, 32, 32), torch.rand(2, 5, 8, 8)).shape
        torch.Size([2, 3, 32, 32])
    """

    def __init__(self, num_landmarks: int, widths: Sequence[int] = (64, 128, 256), *, blocks: int = 6,
                 norm: str = "batch"):
        super().__init__()
        if len(widths) < 2 or blocks < 1:
            raise ValueError(f"the generator needs at least two widths and one block, got widths={tuple(widths)}, "
                             f"blocks={blocks}")
        self.levels = len(widths) - 1
        layers = [conv_norm_relu(3, widths[0], norm)]
        for c_in, c_out in zip(widths[:-1], widths[1:]):
            layers.append(conv_norm_relu(c_in, c_out, norm, stride=2))
        self.encoder = nn.Sequential(*layers)
        c = widths[-1]
        self.blocks = nn.Sequential(ResidualBlock(c + num_landmarks, c, norm=norm),
                                    *(ResidualBlock(c, c, norm=norm) for _ in range(blocks - 1)))
        up = []
        for w in reversed(widths[:-1]):
            up.append(nn.Sequential(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
                                    conv_norm_relu(c, w, norm)))
            c = w
        self.decoder = nn.Sequential(*up)
        self.out = nn.Conv2d(c, 3, 3, padding=1)

    def bottleneck_size(self, image_size: int) -> int:
        """Side of the grid the heatmaps are drawn on for ``image_size``-pixel images."""
        return image_size // 2 ** self.levels

    def forward(self, deformed: Tensor, heatmaps: Tensor) -> Tensor:
        """``deformed [B, 3, S, S]`` in ``[0, 1]``, ``heatmaps [B, K_d, S/2^n, S/2^n]`` -> ``[B, 3, S, S]`` in ``[0, 1]``."""
        x = self.encoder(deformed - 0.5)
        if x.shape[-2:] != heatmaps.shape[-2:]:
            raise ValueError(f"heatmaps must be {tuple(x.shape[-2:])} for {tuple(deformed.shape[-2:])} images, "
                             f"got {tuple(heatmaps.shape[-2:])}")
        x = self.blocks(torch.cat([x, heatmaps.to(x.dtype)], 1))
        return torch.sigmoid(self.out(self.decoder(x)))


@dataclass
class AdaptationOutputs:
    """What :class:`AdaptationModel` computes for ``B`` images of side ``S``.

    Attributes:
        landmarks: ``[B, K_d, 2]`` discovered landmarks on the images.
        heatmaps: ``[B, K_d, h, w]`` the detector's heatmap logits.
        gaussians: ``[B, K_d, S/2^n, S/2^n]`` the landmarks redrawn as Gaussians (the bottleneck).
        reconstruction: ``[B, 3, S, S]`` the generator's image from the deformed images and ``gaussians``.
    """

    landmarks: Tensor
    heatmaps: Tensor
    gaussians: Tensor
    reconstruction: Tensor


class AdaptationModel(nn.Module):
    """Detector and generator behind one ``forward(images, deformed)`` -> :class:`AdaptationOutputs`.

    The landmarks are detected on ``images`` and redrawn as Gaussians of ``sigma`` pixels on
    the generator's bottleneck grid; the generator reconstructs ``images`` from ``deformed``
    (the same images under a random similarity) and those Gaussians.
    """

    def __init__(self, detector: LandmarkDetector, generator: LandmarkGenerator, sigma: float):
        super().__init__()
        self.detector, self.generator, self.sigma = detector, generator, float(sigma)

    def forward(self, images: Tensor, deformed: Tensor) -> AdaptationOutputs:
        landmarks, heat = self.detector(images)
        side = self.generator.bottleneck_size(images.shape[-1])
        gaussians = gaussian_heatmaps(landmarks, (side, side), self.sigma)
        return AdaptationOutputs(landmarks=landmarks, heatmaps=heat, gaussians=gaussians,
                                 reconstruction=self.generator(deformed, gaussians))


class AdaptedDetector(nn.Module):
    """The trained detector and the forward regressor: images -> the dataset's keypoints.

    Returns :class:`Detections` with ``keypoints [B, K, 2]`` (the regressed keypoints); the
    method has no uncertainty or depth readout: ``uncertainty`` and ``depth`` are zeros
    ``[B, K]``, ``heatmaps`` the discovered landmarks' logits ``[B, K_d, h, w]`` and
    ``uncertainty_maps`` zeros of their shape.
    """

    def __init__(self, detector: LandmarkDetector, regressor: PointRegressor):
        super().__init__()
        self.detector, self.regressor = detector, regressor

    def forward(self, images: Tensor) -> Detections:
        landmarks, heat = self.detector(images)
        keypoints = self.regressor(landmarks)
        zeros = keypoints.new_zeros(keypoints.shape[:2])
        return Detections(keypoints=keypoints, uncertainty=zeros, depth=zeros, heatmaps=heat,
                          uncertainty_maps=torch.zeros_like(heat))


def landmark_detector_from_config(cfg) -> LandmarkDetector:
    """The :class:`LandmarkDetector` of a :class:`kpfast.config.TrainConfig` (``adapt_landmarks``,
    ``adapt_landmark_beta``)."""
    return LandmarkDetector(cfg.adapt_landmarks, widths=cfg.detector_widths, up_widths=cfg.detector_up_widths,
                            norm=cfg.norm, beta=cfg.adapt_landmark_beta)


def adapted_detector_from_config(cfg, meta) -> AdaptedDetector:
    """What :func:`kpfast.load` rebuilds from the ``model.pt`` of ``--method adaptation``."""
    return AdaptedDetector(landmark_detector_from_config(cfg), PointRegressor(cfg.adapt_landmarks, meta.num_keypoints))
