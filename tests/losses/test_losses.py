"""Loss functions with known answers (kpfast.losses)."""

import math

import pytest
import torch
import torch.nn.functional as F

import kpfast

from kpfast.data.transforms import TransformRanges, sample_transform
from kpfast.losses import (PerceptualLoss, choose_partners, equivariance_loss, few_shot_loss, masked_keypoint_l1,
                           part_geometry_loss, reconstruction_loss, smoothness_loss, smoothness_triples)
from kpfast.reference import pixel_centers


def test_few_shot_loss_is_the_mean_abs_error_over_labelled_keypoints_only():
    seed = 41
    gen = torch.Generator().manual_seed(seed)
    pred, gt = torch.randn(3, 7, 2, generator=gen), torch.randn(3, 7, 2, generator=gen)
    labeled = torch.rand(3, 7, generator=gen) > 0.4
    labeled[0, 0] = True
    want = (pred - gt).abs()[labeled].mean()
    torch.testing.assert_close(few_shot_loss(pred, gt, labeled), want, msg=f"seed {seed}")
    # garbage at unlabelled keypoints changes nothing
    gt2 = torch.where(labeled[..., None], gt, torch.full_like(gt, 1e6))
    torch.testing.assert_close(few_shot_loss(pred, gt2, labeled), want, msg=f"seed {seed}")


def test_masked_l1_without_valid_keypoints_is_zero_and_differentiable():
    pred = torch.randn(2, 3, 2, requires_grad=True)
    loss = masked_keypoint_l1(pred, torch.randn(2, 3, 2), torch.zeros(2, 3, dtype=torch.bool))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(pred.grad, torch.zeros_like(pred))


def _blob_images(keypoints, size, sigma=0.06):
    """One channel per keypoint (K = 3): a Gaussian blob at the keypoint."""
    g = pixel_centers(size, torch.float64)
    yy, xx = torch.meshgrid(g, g, indexing="ij")
    d2 = (xx - keypoints[..., 0, None, None]) ** 2 + (yy - keypoints[..., 1, None, None]) ** 2
    return torch.exp(-d2 / (2 * sigma ** 2))  # [B, K, H, W]


def _oracle(images):
    """An exactly equivariant 'detector': the centroid of each channel's mass."""
    w = images / images.sum((-1, -2), keepdim=True)
    g = pixel_centers(images.shape[-1], images.dtype)
    return torch.stack([(w.sum(-2) * g).sum(-1), (w.sum(-1) * g).sum(-1)], -1)


def test_equivariance_loss_is_zero_for_an_exactly_equivariant_detector():
    seed = 42
    gen = torch.Generator().manual_seed(seed)
    B, S = 6, 96
    kp = (torch.rand(B, 3, 2, generator=gen, dtype=torch.float64) - 0.5) * 0.6
    images = _blob_images(kp, S)
    # no flips: each channel is one keypoint (a flip would need a channel permutation)
    T = sample_transform(B, 1.0, size=(S, S), generator=gen, ranges=TransformRanges(flip_prob=0.0))
    warped = T.warp_images(images)
    target, inside = T.apply_keypoints(_oracle(images), flip_perm=[0, 1, 2])
    loss = equivariance_loss(_oracle(warped), target, inside)
    assert inside.all()
    assert loss.item() < 2e-3, f"seed {seed}: {loss.item()}"
    # a detector that ignores the image is not equivariant
    frozen = _oracle(images)
    assert equivariance_loss(frozen, target, inside).item() > 10 * loss.item() + 1e-2, f"seed {seed}"


def test_equivariance_loss_ignores_keypoints_outside_the_image():
    a, b = torch.zeros(1, 2, 2), torch.tensor([[[0.5, 0.5], [9.0, 9.0]]])
    assert equivariance_loss(a, b, torch.tensor([[True, False]])).item() == 0.5


def _random_rotation(gen):
    q = torch.randn(4, generator=gen, dtype=torch.float64)
    q = q / q.norm()
    w, x, y, z = q
    return torch.tensor([[1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
                         [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
                         [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)]], dtype=torch.float64)


def test_part_geometry_loss_is_zero_for_similar_transforms_of_one_shape():
    seed = 43
    gen = torch.Generator().manual_seed(seed)
    B, K = 5, 9
    shape = torch.randn(K, 3, generator=gen, dtype=torch.float64)
    pts = torch.stack([(0.5 + torch.rand(1, generator=gen, dtype=torch.float64)) * shape @ _random_rotation(gen).T
                       + torch.randn(3, generator=gen, dtype=torch.float64) for _ in range(B)])
    parts = torch.zeros(3, K, dtype=torch.bool)
    parts[0, :4], parts[1, 4:], parts[2] = True, True, True
    w = torch.tensor([1.0, 1.0, 0.1], dtype=torch.float64)
    for rand in (True, False):
        loss = part_geometry_loss(pts, parts, w, random_partners=rand, generator=gen)
        assert loss.item() < 1e-8, f"seed {seed}, random={rand}: {loss.item()}"
    # deform one sample: the loss becomes positive and its gradient reaches the points
    bent = pts.clone()
    bent[0, :4] += torch.randn(4, 3, generator=gen, dtype=torch.float64)
    bent.requires_grad_()
    loss = part_geometry_loss(bent, parts, w, random_partners=False)
    loss.backward()
    assert loss.item() > 1e-3 and bent.grad.abs().sum() > 0, f"seed {seed}"


def test_part_geometry_loss_is_a_per_coordinate_mean_whatever_the_number_of_parts():
    """The 3D term is a mean absolute residual per coordinate, weighted-averaged over parts:
    on the scale of the few-shot and 2D losses, so that its weight 0.1 means what it says."""
    gen = torch.Generator().manual_seed(11)
    B, K = 4, 10
    pts = torch.randn(B, K, 3, generator=gen, dtype=torch.float64)
    parts = torch.zeros(2, K, dtype=torch.bool)
    parts[0, :5], parts[1] = True, True
    w = torch.tensor([1.0, 0.1], dtype=torch.float64)
    loss = part_geometry_loss(pts, parts, w, random_partners=False)
    # the literal per-coordinate mean, fit by fit with kpfast.umeyama
    expected = torch.zeros((), dtype=torch.float64)
    for p in range(2):
        idx = parts[p].nonzero().squeeze(1)
        best = []
        for i in range(B):
            res = []
            for c in range(B):
                if c != i:
                    R, s, t = kpfast.umeyama(pts[c, idx], pts[i, idx])
                    res.append((pts[i, idx] - (s * pts[c, idx] @ R.T + t)).abs().mean())
            best.append(torch.stack(res).min())
        expected = expected + w[p] * torch.stack(best).mean()
    torch.testing.assert_close(loss, expected / w.sum())
    # eight copies of the parts, or weights scaled by 7: the same loss
    torch.testing.assert_close(part_geometry_loss(pts, parts.repeat(8, 1), w.repeat(8), random_partners=False), loss)
    torch.testing.assert_close(part_geometry_loss(pts, parts, 7 * w, random_partners=False), loss)
    with pytest.raises(ValueError, match="part_weights"):
        part_geometry_loss(pts, parts, torch.zeros(2), random_partners=False)


def test_partners_are_never_the_sample_itself_and_minimize_when_asked():
    seed = 44
    gen = torch.Generator().manual_seed(seed)
    B, P = 6, 3
    r = torch.rand(B, B, P, generator=gen)
    r[torch.arange(B), torch.arange(B)] = 0.0
    best = choose_partners(r, random=False)
    masked = r.clone()
    masked[torch.arange(B), torch.arange(B)] = float("inf")
    assert torch.equal(best, masked.argmin(1)), f"seed {seed}"
    for _ in range(20):
        c = choose_partners(r, random=True, generator=gen)
        assert (c != torch.arange(B)[:, None]).all() and c.min() >= 0 and c.max() < B, f"seed {seed}"


def test_reconstruction_loss_adds_l1_and_perceptual_terms():
    seed = 45
    gen = torch.Generator().manual_seed(seed)
    x, y = torch.rand(2, 3, 8, 8, generator=gen), torch.rand(2, 3, 8, 8, generator=gen)
    perceptual = PerceptualLoss(torch.nn.AvgPool2d(2), "avgpool")
    total, parts = reconstruction_loss(x, y, perceptual)
    l1 = (x - y).abs().mean()
    unit = lambda f: f / (f.pow(2).sum(1, keepdim=True) + 1e-6).sqrt()  # noqa: E731
    p = (unit(F.avg_pool2d(x, 2)) - unit(F.avg_pool2d(y, 2))).abs().mean()
    torch.testing.assert_close(total, l1 + p, msg=f"seed {seed}")
    assert set(parts) == {"l1", "perceptual"}
    assert set(reconstruction_loss(x, y)[1]) == {"l1"}


def test_reconstruction_loss_squared_pixel_error_and_unknown_pixel_error_refused():
    """``pixel="l2"`` (Sanchez & Tzimiropoulos) swaps only the pixel term; the default stays L1."""
    gen = torch.Generator().manual_seed(46)
    x, y = torch.rand(2, 3, 8, 8, generator=gen), torch.rand(2, 3, 8, 8, generator=gen)
    perceptual = PerceptualLoss(torch.nn.AvgPool2d(2), "avgpool")
    l1_total, l1_parts = reconstruction_loss(x, y, perceptual)
    total, parts = reconstruction_loss(x, y, perceptual, pixel="l2")
    torch.testing.assert_close(total, (x - y).pow(2).mean() + l1_parts["perceptual"])
    assert set(parts) == {"l2", "perceptual"} and torch.equal(parts["perceptual"], l1_parts["perceptual"])
    with pytest.raises(ValueError, match="pixel must be one of"):
        reconstruction_loss(x, y, pixel="huber")


def test_smoothness_triples_follow_the_skeleton_inside_each_part():
    from kpfast.data.skeletons import face68_meta

    meta = face68_meta()
    t = smoothness_triples(meta.edges, [meta.parts["contour"], meta.parts["nose"]])
    contour = [tuple(r) for r in t.tolist() if r[1] < 17]
    assert contour == [(i - 1, i, i + 1) for i in range(1, 16)]
    assert all(27 <= v <= 35 for r in t.tolist() if r[1] >= 17 for v in r)


def test_smoothness_loss_is_zero_on_a_line_and_grows_with_bending():
    seed = 46
    gen = torch.Generator().manual_seed(seed)
    t = torch.tensor([[0, 1, 2], [1, 2, 3]])
    d = torch.randn(2, generator=gen)
    line = (torch.arange(4.0)[:, None] * d).unsqueeze(0)
    assert smoothness_loss(line, t).item() < 1e-6, f"seed {seed}"
    angle = 0.1 + 2.9 * float(torch.rand((), generator=gen))
    bent = torch.tensor([[[0.0, 0.0], [1.0, 0.0], [1 + math.cos(angle), math.sin(angle)],
                          [1 + 2 * math.cos(angle), 2 * math.sin(angle)]]], dtype=torch.float64)
    # one bend of `angle` at keypoint 1, straight at keypoint 2 (float64: 1 - cos cancels at small angles)
    assert math.isclose(smoothness_loss(bent, t).item(), (1 - math.cos(angle)) / 2, rel_tol=1e-9), f"angle {angle}"
