"""The networks of Moskvyak et al.'s semi-supervised keypoint localization (ICLR 2021).

- :class:`HeatmapDetector`: the keypoint localization network. kpfast's detector trunk
  (:func:`~kpfast.models.detector.resnet_with_upsampling`, the capacity of every other
  method's detector) with a ``K``-channel heatmap head, and the feature map ``F``
  ``[B, C, h, w]`` of the semantic keypoint representations: every residual and
  upsampling block's output resized to the heatmaps' size, concatenated, and a 1x1
  convolution to ``C`` channels (the paper: HRNet-32's branches, 352 -> 64 channels).
- :func:`keypoint_representations`: ``z_k = max over pixels of F * h_k`` (global max
  pooling of the features masked by each heatmap).
- :class:`MoskvyakModel`: the detector and the keypoint classification network (one
  linear layer ``C -> K`` shared by all keypoints) behind one ``forward``, which
  substitutes the ground-truth heatmaps for the labelled keypoints before pooling.
- :func:`heatmap_keypoints`: keypoints from heatmaps for evaluation and inference.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import HEATMAP_READOUTS
from ..ops import soft_argmax
from .detector import Detections, resnet_with_upsampling

SOFT_ARGMAX_BETA = 10.0
"""Inverse temperature of the ``"soft_argmax"`` readout for heatmaps regressed onto unit-peak Gaussians
(``softmax(beta * h)``: too low and the flat background pulls every keypoint to the centre, too high
and it is an integer argmax; 10 reads exact Gaussians of 1 pixel best)."""
CONFIDENCE_EPS = 1e-4


def heatmap_keypoints(heatmaps: Tensor, readout: str = "argmax") -> tuple[Tensor, Tensor]:
    """Keypoints and peak values of ``heatmaps [B, K, h, w]``.

    Readouts (``"argmax"`` is kpfast's default for heatmap regression, see the README):

    - ``"argmax"``: the highest pixel, moved a quarter pixel toward the higher of its two
      neighbours along each axis (HRNet's evaluation; where a neighbour is missing, at
      the border, the pixel centre);
    - ``"soft_argmax"``: :func:`kpfast.soft_argmax` with ``beta`` = :data:`SOFT_ARGMAX_BETA`.

    Returns:
        ``(keypoints [B, K, 2], peak [B, K])``: ``(x, y)`` in ``[-1, 1]`` (pixel centres at
        the ends, as :func:`kpfast.soft_argmax`), and the heatmap's highest value.

    Example:
        >>> h = torch.zeros(1, 1, 5, 5)
        >>> h[0, 0, 2, 3], h[0, 0, 2, 4] = 1.0, 0.5
        >>> kp, peak = heatmap_keypoints(h)
        >>> kp.tolist(), peak.tolist()   # pixel (3.25, 2) of 5: x = -1 + 2 * 3.25 / 4
        ([[[0.625, 0.0]]], [[1.0]])
    """
    if heatmaps.dim() != 4:
        raise ValueError(f"heatmaps must be [B, K, h, w], got shape {tuple(heatmaps.shape)}")
    if readout not in HEATMAP_READOUTS:
        raise ValueError(f"readout must be one of {HEATMAP_READOUTS}, got {readout!r}")
    B, K, h, w = heatmaps.shape
    flat = heatmaps.flatten(2)
    peak, index = flat.max(-1)
    if readout == "soft_argmax":
        return soft_argmax(heatmaps, beta=SOFT_ARGMAX_BETA)[0], peak
    x, y = index % w, index // w

    def at(yy: Tensor, xx: Tensor) -> Tensor:
        return flat.gather(-1, (yy.clamp(0, h - 1) * w + xx.clamp(0, w - 1))[..., None])[..., 0]

    dx = torch.sign(at(y, x + 1) - at(y, x - 1)) * ((x > 0) & (x < w - 1))
    dy = torch.sign(at(y + 1, x) - at(y - 1, x)) * ((y > 0) & (y < h - 1))
    px = torch.stack([x + 0.25 * dx, y + 0.25 * dy], -1).to(heatmaps.dtype if heatmaps.is_floating_point()
                                                             else torch.float32)
    scale = torch.tensor([max(w - 1, 1), max(h - 1, 1)], dtype=px.dtype, device=px.device)
    return px * 2 / scale - 1, peak


def keypoint_representations(features: Tensor, heatmaps: Tensor) -> Tensor:
    """Semantic keypoint representations ``z [B, K, C]``: ``z[b, k, c] = max_p features[b, c, p] * heatmaps[b, k, p]``.

    ``features [B, C, h, w]``, ``heatmaps [B, K, h, w]`` (the same ``h, w``). Differentiable:
    the gradient of ``z[b, k, c]`` reaches the pixel that maximizes it (one of them on ties), in
    ``features`` and in ``heatmaps``. Only the maximizing pixels are kept for the backward pass
    (``[B, K, C]`` indices), never the ``[B, K, C, h*w]`` products, which are formed a few
    keypoints at a time.

    Example:
        >>> f, hm = torch.arange(4.0).view(1, 1, 2, 2), torch.zeros(1, 2, 2, 2)
        >>> hm[0, 0, 0, 1], hm[0, 1, 1, 1] = 1.0, 1.0     # keypoint 0 at pixel 1, keypoint 1 at pixel 3
        >>> keypoint_representations(f, hm).tolist()
        [[[1.0], [3.0]]]
    """
    if features.dim() != 4 or heatmaps.dim() != 4 or features.shape[0] != heatmaps.shape[0] \
            or features.shape[-2:] != heatmaps.shape[-2:]:
        raise ValueError(f"features [B, C, h, w] and heatmaps [B, K, h, w] must share B, h, w; got "
                         f"{tuple(features.shape)} and {tuple(heatmaps.shape)}")
    return _MaxProductPool.apply(features.flatten(2), heatmaps.flatten(2))


class _MaxProductPool(torch.autograd.Function):
    """``z[b, k, c] = max_p f[b, c, p] * h[b, k, p]`` for ``f [B, C, P]``, ``h [B, K, P]``."""

    CHUNK_ELEMENTS = 1 << 22  # products formed at a time (16 MiB of float32)

    @staticmethod
    def forward(ctx, f: Tensor, h: Tensor) -> Tensor:
        B, C, P = f.shape
        K = h.shape[1]
        step = max(1, _MaxProductPool.CHUNK_ELEMENTS // max(1, B * C * P))
        values, indices = [], []
        for k in range(0, K, step):
            v, i = (h[:, k:k + step, None, :] * f[:, None, :, :]).max(-1)
            values.append(v)
            indices.append(i)
        z, index = torch.cat(values, 1), torch.cat(indices, 1)  # [B, K, C]
        ctx.save_for_backward(f, h, index)
        return z

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor]:
        f, h, index = ctx.saved_tensors
        grad_f = grad_h = None
        if ctx.needs_input_grad[0]:
            h_at = h.gather(-1, index)  # [B, K, C]: h[b, k, p*]
            grad_f = torch.zeros_like(f).scatter_add_(-1, index.transpose(1, 2), (grad * h_at).transpose(1, 2))
        if ctx.needs_input_grad[1]:
            f_at = f.gather(-1, index.transpose(1, 2)).transpose(1, 2)  # [B, K, C]: f[b, c, p*]
            grad_h = torch.zeros_like(h).scatter_add_(-1, index, grad * f_at)
        return grad_f, grad_h


def with_labels(heatmaps: Tensor, labeled_heatmaps: Tensor, mask: Tensor) -> Tensor:
    """``heatmaps [B, K, h, w]`` whose last ``L`` images take ``labeled_heatmaps [L, K, h, w]`` where
    ``mask [L, K]`` (the labelled keypoints): what the unsupervised losses see (the paper uses the
    ground-truth heatmaps of the labelled samples there)."""
    L = labeled_heatmaps.shape[0]
    if L == 0:
        return heatmaps
    if labeled_heatmaps.shape[1:] != heatmaps.shape[1:] or mask.shape != labeled_heatmaps.shape[:2] \
            or L > heatmaps.shape[0]:
        raise ValueError(f"labelled heatmaps {tuple(labeled_heatmaps.shape)} and mask {tuple(mask.shape)} do not "
                         f"fit the last images of heatmaps {tuple(heatmaps.shape)}")
    last = torch.where(mask[..., None, None], labeled_heatmaps.to(heatmaps.dtype), heatmaps[-L:])
    return torch.cat([heatmaps[:-L], last]) if L < heatmaps.shape[0] else last


class HeatmapDetector(nn.Module):
    """kpfast's detector trunk with a heatmap head and, optionally, the representation feature map.

    Args:
        num_keypoints: ``K``.
        widths, up_widths, norm: the trunk (:func:`~kpfast.models.detector.resnet_with_upsampling`).
        feature_channels: ``C`` of the feature map ``F`` (0: none, as in ``--without sc --without ti``).
        readout: how :meth:`forward` reads keypoints (:func:`heatmap_keypoints`).

    Example:
        >>> det = HeatmapDetector(5, widths=(8, 16), up_widths=(8,), feature_channels=4)
        >>> heat, feat = det.maps(torch.rand(2, 3, 32, 32))
        >>> heat.shape, feat.shape, det(torch.rand(2, 3, 32, 32)).keypoints.shape
        (torch.Size([2, 5, 16, 16]), torch.Size([2, 4, 16, 16]), torch.Size([2, 5, 2]))
    """

    def __init__(self, num_keypoints: int, *, widths: Sequence[int] = (64, 128, 256, 512),
                 up_widths: Sequence[int] = (256, 256), norm: str = "batch", feature_channels: int = 0,
                 readout: str = "argmax"):
        super().__init__()
        if num_keypoints < 1:
            raise ValueError(f"num_keypoints must be >= 1, got {num_keypoints}")
        if readout not in HEATMAP_READOUTS:
            raise ValueError(f"readout must be one of {HEATMAP_READOUTS}, got {readout!r}")
        self.num_keypoints, self.readout = num_keypoints, readout
        self.stem, self.down, self.up, c = resnet_with_upsampling(widths, up_widths, 0, norm)
        self.head = nn.Conv2d(c, num_keypoints, 1)
        self.features = nn.Conv2d(sum(widths) + sum(up_widths), feature_channels, 1) if feature_channels else None

    def heatmap_size(self, image_size: int) -> int:
        """Side of the heatmaps for ``image_size``-pixel inputs."""
        return int(image_size * 2 ** len(self.up) // 2 ** len(self.down))

    def maps(self, images: Tensor, *, features: bool = True) -> tuple[Tensor, Optional[Tensor]]:
        """``images [B, 3, S, S]`` in ``[0, 1]`` -> ``(heatmaps [B, K, h, w], features [B, C, h, w] or None)``
        (None without a feature map, or when ``features`` is False: inference needs only the heatmaps)."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be [B, 3, H, W], got {tuple(images.shape)}")
        x, blocks = self.stem(images - 0.5), []
        for block in (*self.down, *self.up):
            x = block(x)
            blocks.append(x)
        heatmaps = self.head(x).contiguous()
        if self.features is None or not features:
            return heatmaps, None
        size = heatmaps.shape[-2:]
        resized = [b if b.shape[-2:] == size else F.interpolate(b, size=size, mode="bilinear", align_corners=False)
                   for b in blocks]
        return heatmaps, self.features(torch.cat(resized, 1)).contiguous()

    def forward(self, images: Tensor) -> Detections:
        """Keypoints of ``images`` (:func:`heatmap_keypoints` with ``readout``), as :class:`Detections`:
        ``uncertainty`` is the logit of the heatmap's peak value (clamped to ``[1e-4, 1 - 1e-4]``: the
        confidence is the peak, 1 for a perfect unit Gaussian), ``uncertainty_maps`` the logits of the
        heatmaps, ``depth`` 0 (the method predicts none)."""
        heatmaps, _ = self.maps(images, features=False)
        keypoints, peak = heatmap_keypoints(heatmaps, self.readout)
        logit = lambda t: torch.logit(t.clamp(CONFIDENCE_EPS, 1 - CONFIDENCE_EPS))  # noqa: E731
        return Detections(keypoints=keypoints, uncertainty=logit(peak), depth=torch.zeros_like(peak),
                          heatmaps=heatmaps, uncertainty_maps=logit(heatmaps))


@dataclass
class HeatmapLabels:
    """The labels of the last ``L`` images of a batch, as heatmaps.

    Attributes:
        heatmaps: ``[L, K, h, w]`` ground-truth heatmaps.
        mask: ``[L, K]`` bool: the labelled keypoints.
        heatmaps_transformed: ``[L, K, h, w]`` the same heatmaps warped like the transformed
            images (or None).
    """

    heatmaps: Tensor
    mask: Tensor
    heatmaps_transformed: Optional[Tensor] = None


@dataclass
class MoskvyakOutputs:
    """What :class:`MoskvyakModel` computes for ``B`` images (and their ``B`` transformed copies).

    Attributes:
        maps: ``[B or 2B, K, h, w]`` every heatmap the detector predicted (images, then
            transformed images): the tensor every term's gradient flows through.
        heatmaps: ``[B, K, h, w]`` predicted on the images.
        heatmaps_transformed: ``[B, K, h, w]`` predicted on the transformed images (or None).
        reference: ``heatmaps`` with the labelled keypoints' ground truth substituted.
        reference_transformed: the same for the transformed images (or None).
        representations: ``[B, K, C]`` pooled with ``reference`` (or None).
        representations_transformed: ``[B, K, C]`` pooled with ``reference_transformed`` (or None).
        logits: ``[B, K, K]`` the classifier on ``representations`` (or None).
        warp: the warp of the transformed images (set by the objective; or None).
    """

    maps: Tensor
    heatmaps: Tensor
    reference: Tensor
    heatmaps_transformed: Optional[Tensor] = None
    reference_transformed: Optional[Tensor] = None
    representations: Optional[Tensor] = None
    representations_transformed: Optional[Tensor] = None
    logits: Optional[Tensor] = None
    warp: Optional[Any] = None


class MoskvyakModel(nn.Module):
    """The keypoint localization network and the keypoint classification network.

    Args:
        num_keypoints: ``K``.
        widths, up_widths, norm, readout: see :class:`HeatmapDetector`.
        feature_channels: ``C`` of the keypoint representations.
        classify: build the classifier (semantic consistency).
        represent: pool the representations of the images (semantic consistency or
            transformation invariance); without it there is no feature map.
        represent_transformed: also those of the transformed images (transformation invariance).

    Example:
        >>> m = MoskvyakModel(3, widths=(8, 16), up_widths=(8,), feature_channels=4)
        >>> out = m(torch.rand(2, 3, 32, 32), transformed=torch.rand(2, 3, 32, 32))
        >>> out.heatmaps.shape, out.representations_transformed.shape, out.logits.shape
        (torch.Size([2, 3, 16, 16]), torch.Size([2, 3, 4]), torch.Size([2, 3, 3]))
    """

    def __init__(self, num_keypoints: int, *, widths: Sequence[int] = (64, 128, 256, 512),
                 up_widths: Sequence[int] = (256, 256), norm: str = "batch", feature_channels: int = 64,
                 classify: bool = True, represent: bool = True, represent_transformed: bool = True,
                 readout: str = "argmax"):
        super().__init__()
        if classify and not represent:
            raise ValueError("the classifier needs the representations (classify=True needs represent=True)")
        self.represent, self.represent_transformed = represent, represent and represent_transformed
        self.detector = HeatmapDetector(num_keypoints, widths=widths, up_widths=up_widths, norm=norm,
                                        feature_channels=feature_channels if represent else 0, readout=readout)
        self.classifier = nn.Linear(feature_channels, num_keypoints) if classify else None

    def forward(self, images: Tensor, *, transformed: Optional[Tensor] = None,
                labels: Optional[HeatmapLabels] = None) -> MoskvyakOutputs:
        """Run the networks one training step needs.

        Args:
            images: ``[B, 3, S, S]`` in ``[0, 1]``; the last ``L`` are the labelled ones.
            transformed: ``[B, 3, S, S]`` warped copies (one detector call for both).
            labels: the ground truth of the last ``L`` images (None: nothing substituted).
        """
        B = images.shape[0]
        maps, features = self.detector.maps(images if transformed is None else torch.cat([images, transformed]))
        heatmaps = maps[:B]
        reference = with_labels(heatmaps, labels.heatmaps, labels.mask) if labels is not None else heatmaps
        out = MoskvyakOutputs(maps=maps, heatmaps=heatmaps, reference=reference)
        if transformed is not None:
            out.heatmaps_transformed = maps[B:]
            truth = labels.heatmaps_transformed if labels is not None else None
            out.reference_transformed = with_labels(maps[B:], truth, labels.mask) if truth is not None else maps[B:]
        if self.represent:
            out.representations = keypoint_representations(features[:B], reference)
            if self.represent_transformed and transformed is not None:
                out.representations_transformed = keypoint_representations(features[B:], out.reference_transformed)
            if self.classifier is not None:
                out.logits = self.classifier(out.representations)
        return out


def detector_from_config(cfg, meta) -> HeatmapDetector:
    """The :class:`HeatmapDetector` a ``--method moskvyak`` :class:`~kpfast.config.TrainConfig` trains for
    ``meta`` (what :func:`kpfast.load` rebuilds from its ``model.pt``)."""
    return HeatmapDetector(meta.num_keypoints, widths=cfg.detector_widths, up_widths=cfg.detector_up_widths,
                           norm=cfg.norm, feature_channels=cfg.sc_channels if represents(cfg) else 0,
                           readout=cfg.heatmap_readout)


def represents(cfg) -> bool:
    """Whether a config's Moskvyak model pools keypoint representations (semantic consistency or
    transformation invariance is trained), i.e. has the feature map."""
    return cfg.uses("sc") or cfg.uses("ti")
