"""The keypoint detector: a ResNet with upsampling that predicts 3K maps per image.

Per keypoint ``k`` the network predicts a heatmap ``H_k``, an uncertainty map
``V_k`` and a depth map ``D_k`` (paper Sec. 3.1 and 3.4). :func:`kpfast.soft_argmax`
turns them into the keypoint ``k`` (softmax expectation of the pixel centres,
``(x, y)`` in ``[-1, 1]``, ``align_corners=True``), the uncertainty logit ``v``
and the raw depth readout; the depth used by the 3D loss is
``tanh(readout / depth_scale)`` (a re-implementation's choice that the authors
confirmed: depth divided by a large number).

Architecture (AutoLink's code and a public re-implementation of the paper): ``len(widths)`` stride-2 residual blocks (128 px -> 8x8 with the default four), ``len(up_widths)``
x2 bilinear upsampling blocks (8x8 -> 32x32 with the default two) and a 1x1
convolution to 3K channels. The heatmaps are ``S * 2**(len(up_widths) - len(widths))``
pixels wide.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor, nn

from ..ops import soft_argmax
from .blocks import ResidualBlock, conv_norm_relu


@dataclass
class Detections:
    """What the detector returns for a batch of ``B`` images and ``K`` keypoints.

    Attributes:
        keypoints: ``[B, K, 2]`` ``(x, y)`` in ``[-1, 1]`` (align_corners convention).
        uncertainty: ``[B, K]`` logits read out of the uncertainty maps (higher = more
            certain: the edge map draws an edge with intensity ``sigmoid(v)``).
        depth: ``[B, K]`` ``tanh(readout / depth_scale)``, in ``(-1, 1)``.
        heatmaps: ``[B, K, h, w]`` heatmap logits.
        uncertainty_maps: ``[B, K, h, w]``.
    """

    keypoints: Tensor
    uncertainty: Tensor
    depth: Tensor
    heatmaps: Tensor
    uncertainty_maps: Tensor

    @property
    def points3d(self) -> Tensor:
        """``[B, K, 3]``: ``(x, y, depth)``, the 3D keypoints of Eq. 5."""
        return torch.cat([self.keypoints, self.depth.unsqueeze(-1)], -1)


def resnet_with_upsampling(widths: Sequence[int], up_widths: Sequence[int], stem_width: int = 0,
                           norm: str = "batch") -> tuple[nn.Module, nn.Sequential, nn.Sequential, int]:
    """The detector's trunk: ``(stem, down, up, channels)``, see :class:`KeypointDetector` (every
    heatmap network of kpfast is built on it, so methods compare at the same capacity).

    ``stem``: an optional full-resolution 3x3 convolution (``nn.Identity`` when ``stem_width`` is 0);
    ``down``: one stride-2 :class:`ResidualBlock` per entry of ``widths``; ``up``: one x2 bilinear
    upsampling + 3x3 convolution per entry of ``up_widths``; ``channels``: those of ``up``'s output.
    """
    stem = conv_norm_relu(3, stem_width, norm) if stem_width else nn.Identity()
    down, c = [], stem_width or 3
    for w in widths:
        down.append(ResidualBlock(c, w, stride=2, norm=norm))
        c = w
    up = []
    for w in up_widths:
        up.append(nn.Sequential(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
                                conv_norm_relu(c, w, norm)))
        c = w
    return stem, nn.Sequential(*down), nn.Sequential(*up), c


class KeypointDetector(nn.Module):
    """ResNet with upsampling predicting heatmap, uncertainty and depth for K keypoints.

    Args:
        num_keypoints: ``K``.
        widths: channels of the stride-2 residual blocks (each halves the resolution).
        up_widths: channels of the x2 upsampling blocks.
        stem_width: channels of an optional full-resolution 3x3 stem before the residual
            blocks (0, the default: none, as in AutoLink's code and the re-implementation).
        norm: ``"batch"``, ``"group"`` or ``"none"``.
        depth_scale: the depth readout is squashed as ``tanh(readout / depth_scale)``.
        beta: soft-argmax inverse temperature.

    Example:
        >>> det = KeypointDetector(5, widths=(8, 16), up_widths=(8,))
        >>> out = det(torch.rand(2, 3, 32, 32))
        >>> out.keypoints.shape, out.uncertainty.shape, out.depth.shape, out.heatmaps.shape
        (torch.Size([2, 5, 2]), torch.Size([2, 5]), torch.Size([2, 5]), torch.Size([2, 5, 16, 16]))
    """

    def __init__(self, num_keypoints: int, *, widths: Sequence[int] = (64, 128, 256, 512),
                 up_widths: Sequence[int] = (256, 256), stem_width: int = 0, norm: str = "batch",
                 depth_scale: float = 20.0, beta: float = 1.0):
        super().__init__()
        if num_keypoints < 1:
            raise ValueError(f"num_keypoints must be >= 1, got {num_keypoints}")
        if not widths:
            raise ValueError("widths must name at least one residual block")
        self.num_keypoints = num_keypoints
        self.depth_scale = float(depth_scale)
        self.beta = float(beta)
        self.stem, self.down, self.up, c = resnet_with_upsampling(widths, up_widths, stem_width, norm)
        self.head = nn.Conv2d(c, 3 * num_keypoints, 1)
        self.downsampling = 2 ** (len(widths) - len(up_widths))

    def heatmap_size(self, image_size: int) -> int:
        """Side of the heatmaps for ``image_size``-pixel inputs."""
        return int(image_size * 2 ** len(self.up) // 2 ** len(self.down))

    def forward(self, images: Tensor) -> Detections:
        """``images [B, 3, S, S]`` in ``[0, 1]`` -> :class:`Detections`."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be [B, 3, H, W], got {tuple(images.shape)}")
        # one copy to contiguous planes: soft_argmax then reads the three channel groups in place (with
        # channels_last it copied each of them, and their gradients, plane by plane)
        maps = self.head(self.up(self.down(self.stem(images - 0.5)))).contiguous()
        B, _, h, w = maps.shape
        maps = maps.view(B, 3, self.num_keypoints, h, w)
        heat, unc, dep = maps.unbind(1)
        keypoints, values = soft_argmax(heat, [unc, dep], beta=self.beta)
        return Detections(keypoints=keypoints, uncertainty=values[..., 0],
                          depth=torch.tanh(values[..., 1] / self.depth_scale), heatmaps=heat, uncertainty_maps=unc)


def detector_from_config(cfg, meta) -> KeypointDetector:
    """The :class:`KeypointDetector` a :class:`kpfast.config.TrainConfig` trains for ``meta`` (what
    :func:`kpfast.load` rebuilds from the ``model.pt`` of the paper's method and its baselines)."""
    return KeypointDetector(meta.num_keypoints, widths=cfg.detector_widths, up_widths=cfg.detector_up_widths,
                            norm=cfg.norm, depth_scale=cfg.depth_scale)
