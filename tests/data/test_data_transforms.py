"""Paired transforms: the keypoint map must match the image warp."""

import pytest
import torch

from kpfast.data.coords import pixel_grid
from kpfast.data.transforms import TransformRanges, color_jitter, random_paired_transform, sample_transform

from _util import fixed_seed


def _blobs(kp, size, sigma=1.5):
    """Gaussian blob per keypoint, [B, K, H, W], in pixel units of sigma."""
    h, w = size
    g = pixel_grid((h, w), dtype=torch.float64)  # [H, W, 2]
    scale = torch.tensor([(w - 1) / 2, (h - 1) / 2], dtype=torch.float64)
    d = ((g[None, None] - kp[:, :, None, None]) * scale).pow(2).sum(-1)
    return torch.exp(-d / (2 * sigma**2))


def _centroid(maps, size):
    g = pixel_grid(size, dtype=maps.dtype)
    wsum = maps.sum(dim=(-1, -2))
    return torch.stack([(maps * g[..., 0]).sum(dim=(-1, -2)) / wsum, (maps * g[..., 1]).sum(dim=(-1, -2)) / wsum], -1)


@pytest.mark.parametrize("size", [(48, 48), (40, 56)])
def test_keypoints_follow_the_image_warp(size):
    seed = fixed_seed()
    g = torch.Generator().manual_seed(seed)
    b, k = 6, 3
    kp = (torch.rand(b, k, 2, generator=g, dtype=torch.float64) - 0.5) * 0.8
    T = sample_transform(b, 1.0, size=size, generator=g, ranges=TransformRanges(flip_prob=0.5))
    perm = [2, 1, 0]
    maps = _blobs(kp, size)
    warped = T.warp_images(maps)
    out, inside = T.apply_keypoints(kp, perm)
    found = T.permute(_centroid(warped, size), perm)
    assert inside.all()
    px = torch.tensor([(size[1] - 1) / 2, (size[0] - 1) / 2], dtype=torch.float64)
    err = ((found - out) * px).norm(dim=-1)
    assert err.max() < 0.05, f"seed {seed}: max error {err.max():.4f} px"


def test_strength_zero_is_identity():
    g = torch.Generator().manual_seed(fixed_seed())
    im = torch.rand(3, 3, 20, 24, generator=g)
    kp = torch.rand(3, 4, 2, generator=g) * 2 - 1
    out_im, out_kp, inside, T = random_paired_transform(im, kp, 0.0, flip_perm=[1, 0, 2, 3], generator=g)
    assert not T.flip.any()
    assert torch.allclose(out_im, im, atol=1e-5)
    assert torch.allclose(out_kp, kp, atol=1e-6) and inside.all()


def test_flip_twice_is_identity_and_relabels():
    g = torch.Generator().manual_seed(fixed_seed())
    ranges = TransformRanges(rotation_deg=0, translation=0, scale=0, flip_prob=1.0, brightness=0, contrast=0,
                             saturation=0, hue=0)
    T = sample_transform(2, 1.0, size=(16, 16), generator=g, ranges=ranges)
    assert T.flip.all()
    im = torch.rand(2, 3, 16, 16, generator=g)
    kp = torch.rand(2, 3, 2, generator=g) * 2 - 1
    perm = [1, 0, 2]
    once, _ = T.apply_keypoints(kp, perm)
    assert torch.allclose(once[:, 0, 0], -kp[:, 1, 0]) and torch.allclose(once[:, 0, 1], kp[:, 1, 1])
    twice, _ = T.apply_keypoints(once, perm)
    assert torch.allclose(twice, kp, atol=1e-6)
    flipped = T.apply_images(im)
    assert torch.allclose(flipped, im.flip(-1), atol=1e-5)
    assert torch.allclose(T.apply_images(flipped), im, atol=1e-5)


def test_inside_mask_and_errors():
    g = torch.Generator().manual_seed(0)
    T = sample_transform(2, 1.0, size=(8, 8), generator=g, ranges=TransformRanges(flip_prob=0.0))
    kp = torch.tensor([[[0.0, 0.0], [5.0, 0.0]], [[0.0, 0.0], [0.0, -3.0]]])
    _, inside = T.apply_keypoints(kp)
    assert inside[:, 0].all() and not inside[:, 1].any()
    with pytest.raises(ValueError, match="batch size"):
        T.apply_keypoints(torch.zeros(3, 2, 2))
    with pytest.raises(ValueError, match="strength"):
        sample_transform(2, 1.5)
    Tf = sample_transform(4, 1.0, generator=torch.Generator().manual_seed(3), ranges=TransformRanges(flip_prob=1.0))
    with pytest.raises(ValueError, match="flip_perm"):
        Tf.apply_keypoints(torch.zeros(4, 2, 2))


def test_ranges_scale_with_strength():
    g = torch.Generator().manual_seed(5)
    T = sample_transform(4000, 0.5, generator=g)
    ang = torch.atan2(T.matrix[:, 1, 0] * T.matrix[:, 0, 0].sign(), T.matrix[:, 1, 1]).abs().rad2deg()
    assert ang.max() <= 30.0 + 1e-6 and ang.max() > 28.0
    assert 0.2 < T.flip.float().mean() < 0.3  # p = 0.5 * strength
    assert T.brightness.min() >= 0.75 and T.brightness.max() <= 1.25
    assert T.offset.abs().max() <= 0.1 + 1e-9  # 5 % of the size = 0.1 normalized


def test_color_jitter_identity_and_grey():
    g = torch.Generator().manual_seed(fixed_seed())
    im = torch.rand(2, 3, 5, 5, generator=g)
    one, zero = torch.ones(2), torch.zeros(2)
    assert torch.allclose(color_jitter(im, one, one, one, zero), im, atol=1e-5)
    grey = color_jitter(im, one, one, zero, zero)
    assert torch.allclose(grey[:, 0], grey[:, 1], atol=1e-5) and torch.allclose(grey[:, 1], grey[:, 2], atol=1e-5)
    # a hue rotation keeps a grey image grey
    g2 = grey.clone()
    assert torch.allclose(color_jitter(g2, one, one, one, torch.full((2,), 0.3)), g2, atol=1e-4)
