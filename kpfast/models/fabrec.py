"""The networks of 3FabRec (Browatzki & Wallraven, CVPR 2020): an adversarial autoencoder whose
frozen generator, interleaved with small transfer layers, predicts keypoint heatmaps.

- :class:`ResNetEncoder`: stride-2 residual blocks -> flattened map -> linear -> code ``z``;
- :class:`InvResNetGenerator`: linear -> ``s0 x s0`` map -> inverted residual blocks (the first
  convolution of each block a 4x4 transposed convolution, x2) -> 3x3 convolution -> RGB;
- :class:`TransferLayer`: the 3x3 interleaved transfer layer (ITL), identity at initialization;
- :class:`FabRecDetector`: encoder + generator + ITLs + heatmap head; ``forward`` returns
  :class:`~kpfast.models.Detections` (keypoints by :func:`kpfast.soft_argmax` on the heatmaps),
  which is what :func:`kpfast.load` rebuilds from a 3fabrec ``model.pt``;
- :class:`LatentDiscriminator` (the encoding feature loss) and :class:`ImageDiscriminator` (the
  adversarial feature loss), trained in stage 1 only;
- :class:`FabRecModel`: everything a 3fabrec run trains, in one module (one state dict).

Heatmaps are predicted at half the image side, as in the paper: the generator's last block
(the finest, mostly local appearance) is skipped and a 3x3 convolution to ``K`` channels takes the
place of the RGB layer on the block before it. ITLs follow every used block but the last.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops import soft_argmax
from .blocks import ResidualBlock, norm_layer, pointwise
from .detector import Detections


def _check_side(image_size: int, blocks: int, what: str) -> int:
    side = image_size // 2 ** blocks
    if blocks < 1 or side < 1 or image_size % 2 ** blocks:
        raise ValueError(f"{what}: {blocks} stride-2 blocks need an image side divisible by 2**{blocks}, "
                         f"got {image_size}")
    return side


class ResNetEncoder(nn.Module):
    """Image -> code: ``len(widths)`` stride-2 :class:`ResidualBlock` s, then one linear layer on the
    flattened ``S / 2**len(widths)`` square map (the code keeps where things are).

    Shapes: ``[B, 3, S, S]`` in ``[0, 1]`` -> ``[B, z_dim]``.

    Example:
        >>> enc = ResNetEncoder(32, widths=(8, 16), z_dim=5)
        >>> enc(torch.rand(2, 3, 32, 32)).shape
        torch.Size([2, 5])
    """

    def __init__(self, image_size: int, *, widths: Sequence[int], z_dim: int, norm: str = "batch"):
        super().__init__()
        side = _check_side(image_size, len(widths), "ResNetEncoder")
        blocks, c = [], 3
        for w in widths:
            blocks.append(ResidualBlock(c, w, stride=2, norm=norm))
            c = w
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(c * side * side, z_dim)

    def forward(self, images: Tensor) -> Tensor:
        return self.fc(self.blocks(images - 0.5).flatten(1))


class InvResidualBlock(nn.Module):
    """An inverted ResNet basic block that doubles the resolution: a 4x4 stride-2 transposed
    convolution and a 3x3 convolution, plus an upsampled (projected) shortcut.

    Shapes: ``[B, c_in, H, W] -> [B, c_out, 2H, 2W]``.
    """

    def __init__(self, c_in: int, c_out: int, *, norm: str = "batch"):
        super().__init__()
        bias = norm == "none"
        self.body = nn.Sequential(
            nn.ConvTranspose2d(c_in, c_out, 4, 2, 1, bias=bias), norm_layer(norm, c_out), nn.ReLU(inplace=True),
            nn.Conv2d(c_out, c_out, 3, 1, 1, bias=bias), norm_layer(norm, c_out))
        self.shortcut = nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), *(
            () if c_in == c_out else (pointwise(c_in, c_out, 1, bias=bias), norm_layer(norm, c_out))))
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.relu(self.body(x) + self.shortcut(x))


class InvResNetGenerator(nn.Module):
    """Code -> image: a linear layer to a ``widths[0] x s0 x s0`` map (``s0 = S / 2**len(widths)``),
    ``len(widths)`` :class:`InvResidualBlock` s (block ``i`` outputs ``widths[i]`` channels), and a 3x3
    convolution to RGB with a sigmoid.

    Shapes: ``[B, z_dim]`` -> ``[B, 3, S, S]`` in ``(0, 1)``.

    Example:
        >>> gen = InvResNetGenerator(32, widths=(16, 8, 8), z_dim=5)
        >>> gen(torch.randn(2, 5)).shape
        torch.Size([2, 3, 32, 32])
    """

    def __init__(self, image_size: int, *, widths: Sequence[int], z_dim: int, norm: str = "batch"):
        super().__init__()
        self.side = _check_side(image_size, len(widths), "InvResNetGenerator")
        self.fc = nn.Linear(z_dim, widths[0] * self.side ** 2)
        self.stem = nn.Sequential(norm_layer(norm, widths[0]), nn.ReLU(inplace=True))
        blocks, c = [], widths[0]
        for w in widths:
            blocks.append(InvResidualBlock(c, w, norm=norm))
            c = w
        self.blocks = nn.ModuleList(blocks)
        self.to_rgb = nn.Conv2d(c, 3, 3, 1, 1)

    def start(self, z: Tensor) -> Tensor:
        """``[B, z_dim]`` -> ``[B, widths[0], s0, s0]``: the map the first block takes."""
        return self.stem(self.fc(z).view(z.shape[0], -1, self.side, self.side))

    def forward(self, z: Tensor) -> Tensor:
        h = self.start(z)
        for block in self.blocks:
            h = block(h)
        return torch.sigmoid(self.to_rgb(h))


class TransferLayer(nn.Module):
    """An interleaved transfer layer: ``relu(conv3x3(x))`` with as many output channels as input
    channels, initialized to the identity (a Dirac kernel, zero bias), so on the generator's
    non-negative activations it starts as a no-op and the few-shot stage starts from the
    generator's own features.

    Example:
        >>> itl, x = TransferLayer(4), torch.rand(1, 4, 5, 5)
        >>> torch.allclose(itl(x), x)
        True
    """

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, 1, 1)
        with torch.no_grad():
            nn.init.dirac_(self.conv.weight)
            self.conv.bias.zero_()

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.conv(x))


class FabRecDetector(nn.Module):
    """3FabRec's keypoint network: encoder, generator, ITLs and heatmap head (see the module docstring).

    Args:
        num_keypoints: ``K``.
        image_size: side ``S`` of the square inputs.
        z_dim: length of the code.
        encoder_widths: channels of the encoder's stride-2 residual blocks.
        generator_widths: channels of the generator's x2 blocks (at least 2: the last is skipped
            for heatmaps, which are ``S / 2`` wide); ``len(generator_widths) - 2`` ITLs.
        norm: ``"batch"``, ``"group"`` or ``"none"``.
        beta: soft-argmax inverse temperature on the heatmaps (predicted in about ``[0, 1]``).

    Example:
        >>> det = FabRecDetector(5, 32, z_dim=6, encoder_widths=(8, 16), generator_widths=(16, 8, 8))
        >>> out = det(torch.rand(2, 3, 32, 32))
        >>> out.keypoints.shape, out.heatmaps.shape, len(det.itls)
        (torch.Size([2, 5, 2]), torch.Size([2, 5, 16, 16]), 1)
    """

    def __init__(self, num_keypoints: int, image_size: int, *, z_dim: int = 99,
                 encoder_widths: Sequence[int] = (64, 128, 256, 512),
                 generator_widths: Sequence[int] = (512, 256, 128, 64, 32), norm: str = "batch",
                 beta: float = 20.0):
        super().__init__()
        if num_keypoints < 1:
            raise ValueError(f"num_keypoints must be >= 1, got {num_keypoints}")
        if len(generator_widths) < 2:
            raise ValueError(f"generator_widths needs at least 2 blocks (heatmaps skip the last one), got "
                             f"{tuple(generator_widths)}")
        self.num_keypoints, self.beta = num_keypoints, float(beta)
        self.encoder = ResNetEncoder(image_size, widths=encoder_widths, z_dim=z_dim, norm=norm)
        self.generator = InvResNetGenerator(image_size, widths=generator_widths, z_dim=z_dim, norm=norm)
        self.itls = nn.ModuleList(TransferLayer(w) for w in generator_widths[:-2])
        self.head = nn.Conv2d(generator_widths[-2], num_keypoints, 3, 1, 1)

    @property
    def autoencoder(self) -> tuple[nn.Module, nn.Module]:
        """``(encoder, generator)``: stage 1's networks."""
        return self.encoder, self.generator

    def heatmaps(self, z: Tensor) -> Tensor:
        """``[B, z_dim]`` -> heatmaps ``[B, K, S/2, S/2]``: the generator's blocks but the last, each but
        the last of those followed by its ITL, then the head."""
        h = self.generator.start(z)
        blocks = self.generator.blocks
        for i in range(len(blocks) - 1):
            h = blocks[i](h)
            if i < len(self.itls):
                h = self.itls[i](h)
        return self.head(h)

    def read_keypoints(self, heatmaps: Tensor) -> Detections:
        """Heatmaps ``[B, K, h, w]`` -> :class:`Detections`: keypoints by :func:`kpfast.soft_argmax` of
        ``beta`` times each heatmap over its own peak (clamped to ``[-1, 1]``), so the read-out
        follows where a map peaks, not how high, as the paper's maximum does (a weak map does not
        drift to the centre); the same weights read the heatmap's own value (the peak height: the
        confidence, as a logit in ``uncertainty``); depth 0 (3FabRec has none)."""
        maps = heatmaps.contiguous()
        peak = maps.amax(dim=(-2, -1), keepdim=True).clamp_min(1e-6)
        keypoints, values = soft_argmax((maps / peak).clamp_min(-1.0).contiguous(), [maps], beta=self.beta)
        height = values[..., 0].clamp(1e-4, 1 - 1e-4)
        return Detections(keypoints=keypoints, uncertainty=torch.logit(height), depth=torch.zeros_like(height),
                          heatmaps=heatmaps, uncertainty_maps=heatmaps)

    def forward(self, images: Tensor) -> Detections:
        """``images [B, 3, S, S]`` in ``[0, 1]`` -> :class:`Detections`."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be [B, 3, H, W], got {tuple(images.shape)}")
        return self.read_keypoints(self.heatmaps(self.encoder(images)))


class LatentDiscriminator(nn.Module):
    """Code -> logit (prior sample vs encoding): a 3-layer perceptron with leaky ReLUs.

    Shapes: ``[B, z_dim] -> [B]``.
    """

    def __init__(self, z_dim: int, hidden: int = 256):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(z_dim, hidden), nn.LeakyReLU(0.2, inplace=True),
                                 nn.Linear(hidden, hidden), nn.LeakyReLU(0.2, inplace=True), nn.Linear(hidden, 1))

    def forward(self, z: Tensor) -> Tensor:
        return self.net(z).squeeze(-1)


class ImageDiscriminator(nn.Module):
    """Image -> logit (real image vs reconstruction): 4x4 stride-2 convolutions with leaky ReLUs,
    then one linear layer on the flattened map.

    Shapes: ``[B, 3, S, S]`` in ``[0, 1]`` -> ``[B]``.

    Example:
        >>> ImageDiscriminator(32, widths=(8, 16))(torch.rand(2, 3, 32, 32)).shape
        torch.Size([2])
    """

    def __init__(self, image_size: int, *, widths: Sequence[int]):
        super().__init__()
        side = _check_side(image_size, len(widths), "ImageDiscriminator")
        layers, c = [], 3
        for w in widths:
            layers += [nn.Conv2d(c, w, 4, 2, 1), nn.LeakyReLU(0.2, inplace=True)]
            c = w
        self.convs = nn.Sequential(*layers)
        self.fc = nn.Linear(c * side * side, 1)

    def forward(self, images: Tensor) -> Tensor:
        return self.fc(self.convs(images * 2 - 1).flatten(1)).squeeze(-1)


class FabRecModel(nn.Module):
    """Everything a 3fabrec run trains: ``detector`` (:class:`FabRecDetector`, what ``model.pt``
    keeps), ``latent_discriminator`` and ``image_discriminator`` (``None`` without the adversarial
    loss). The training stages call the parts; there is no ``forward``."""

    def __init__(self, detector: FabRecDetector, latent_discriminator: LatentDiscriminator,
                 image_discriminator: ImageDiscriminator | None):
        super().__init__()
        self.detector = detector
        self.latent_discriminator = latent_discriminator
        self.image_discriminator = image_discriminator

    @property
    def discriminators(self) -> list[nn.Module]:
        return [d for d in (self.latent_discriminator, self.image_discriminator) if d is not None]


def fabrec_detector_from_config(cfg, meta) -> FabRecDetector:
    """The :class:`FabRecDetector` a ``--method 3fabrec`` :class:`kpfast.config.TrainConfig` trains
    for ``meta`` (what :func:`kpfast.load` rebuilds from its ``model.pt``)."""
    return FabRecDetector(meta.num_keypoints, cfg.image_size, z_dim=cfg.fabrec_z_dim,
                          encoder_widths=cfg.fabrec_encoder_widths, generator_widths=cfg.fabrec_generator_widths,
                          norm=cfg.norm, beta=cfg.fabrec_beta)


def fabrec_model_from_config(cfg, meta) -> FabRecModel:
    """The :class:`FabRecModel` of a 3fabrec config: its detector and the discriminators."""
    image = ImageDiscriminator(cfg.image_size, widths=cfg.fabrec_discriminator_widths) if cfg.uses("adv") else None
    return FabRecModel(fabrec_detector_from_config(cfg, meta), LatentDiscriminator(cfg.fabrec_z_dim), image)
