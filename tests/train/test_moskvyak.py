"""--method moskvyak (Moskvyak et al., ICLR 2021): the perspective warps, each loss on the property it
encodes, the representations and readouts, and the method on kpfast's loop (terms and ablations, pictures,
metrics, inference, resume bit for bit, the NaN guard)."""

import csv
import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kpfast
from kpfast.checkpoint import load_checkpoint
from kpfast.config import TrainConfig
from kpfast.data.perspective import PerspectiveRanges, PerspectiveWarp, homography_from_corners, sample_perspective
from kpfast.losses import equivariance_mse, gaussian_heatmaps, heatmap_loss, invariance_mse, semantic_consistency_loss
from kpfast.models import KeypointDetector
from kpfast.models.moskvyak import (HeatmapDetector, HeatmapLabels, MoskvyakModel, _MaxProductPool, heatmap_keypoints,
                                    keypoint_representations, with_labels)
from kpfast.train import NonFiniteLossError, Trainer
from kpfast.train.data import Batch
from kpfast.train.moskvyak import build_moskvyak_model
from kpfast.train.moskvyak_objective import MoskvyakObjective
from kpfast.train.run_folder import LOCK_NAME, run_files
from kpfast.train.streams import RandomStreams

ROOT = Path(__file__).resolve().parents[2]


def _pixels(keypoints, side):
    return (keypoints + 1) / 2 * (side - 1)


# -- the perspective warps -----------------------------------------------------------------------------------------
def test_a_warp_moves_heatmaps_of_any_size_and_keypoints_alike():
    g = torch.Generator().manual_seed(11)
    warp = sample_perspective(32, size=(64, 64), generator=g)
    kp = torch.rand(32, 4, 2, generator=g) - 0.5
    moved, inside = warp.apply_keypoints(kp)
    assert bool(inside.all())
    for side in (16, 64):  # the heatmaps' and the images' resolution: one warp for both
        found, _ = heatmap_keypoints(warp.warp(gaussian_heatmaps(kp, (side, side), 1.5)))
        err = (_pixels(found, side) - _pixels(moved, side)).norm(dim=-1)
        assert float(err.max()) < 0.5, side  # the quarter-pixel readout of a warped Gaussian


def test_homography_carries_the_corners_and_identity_warps_nothing():
    g = torch.Generator().manual_seed(12)
    src = torch.rand(5, 4, 2, generator=g, dtype=torch.float64) * 2 - 1
    dst = src + 0.2 * torch.rand(5, 4, 2, generator=g, dtype=torch.float64)
    moved, _ = PerspectiveWarp(homography_from_corners(src, dst)).apply_keypoints(src)
    assert torch.allclose(moved, dst, atol=1e-9)
    maps = torch.rand(3, 2, 7, 9, generator=g)
    identity = sample_perspective(3, size=(7, 9), ranges=PerspectiveRanges(0, 0, 0, 0), generator=g)
    assert torch.allclose(identity.warp(maps), maps, atol=1e-6)
    assert torch.equal(identity[1:].matrix, identity.matrix[1:])


def test_a_rotation_is_a_rotation_in_pixels_on_a_non_square_image():
    rotation_only = PerspectiveRanges(rotation_deg=30.0, scale=0.0, translation=0.0, perspective=0.0)
    warp = sample_perspective(8, size=(40, 100), ranges=rotation_only, generator=torch.Generator().manual_seed(13))
    kp = torch.tensor([[[-0.5, -0.5], [0.5, 0.25], [0.0, 0.8]]], dtype=torch.float64).expand(8, 3, 2)
    moved, _ = warp.apply_keypoints(kp)
    half = torch.tensor([99 / 2, 39 / 2], dtype=torch.float64)
    distances = lambda p: torch.cdist(p * half, p * half)  # noqa: E731
    assert torch.allclose(distances(moved), distances(kp), atol=1e-9)
    assert not torch.allclose(moved, kp)


def test_warps_come_from_the_generator_alone():
    a = sample_perspective(4, size=32, generator=torch.Generator().manual_seed(5))
    b = sample_perspective(4, size=32, generator=torch.Generator().manual_seed(5))
    c = sample_perspective(4, size=32, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a.matrix, b.matrix) and not torch.equal(a.matrix, c.matrix)


# -- ground truth and the supervised loss --------------------------------------------------------------------------
def test_gaussian_heatmaps_peak_at_the_keypoint_and_vanish_where_unlabelled():
    kp = torch.tensor([[[-1.0, -1.0], [0.0, 1.0 / 3.0], [0.5, 0.5]]])  # pixels (0, 0) and (3.5, 4) of an 8 x 7 map
    hm = gaussian_heatmaps(kp, (7, 8), 1.0, torch.tensor([[True, True, False]]))
    assert hm[0, 0, 0, 0] == 1.0 and hm[0, 0].argmax() == 0
    assert torch.allclose(hm[0, 1, 4, 3], hm[0, 1, 4, 4]) and hm[0, 1, 4].argmax() in (3, 4)
    assert not hm[0, 2].any()
    nan = gaussian_heatmaps(torch.full((1, 1, 2), float("nan")), (4, 4), 1.0)
    assert torch.equal(nan, torch.zeros_like(nan))


def test_heatmap_loss_is_zero_at_the_truth_and_counts_labelled_keypoints_only():
    g = torch.Generator().manual_seed(21)
    truth = torch.rand(2, 3, 8, 8, generator=g)
    mask = torch.tensor([[True, False, True], [False, False, True]])
    assert heatmap_loss(truth, truth, mask) == 0
    wrong = truth.clone()
    wrong[~mask] += 5.0  # only unlabelled keypoints are wrong
    assert heatmap_loss(wrong, truth, mask) == 0
    wrong[0, 0] += 1.0
    assert torch.isclose(heatmap_loss(wrong, truth, mask), torch.tensor(0.5 / 3))
    p = truth.clone().requires_grad_()
    heatmap_loss(p, truth, torch.zeros(2, 3, dtype=torch.bool)).backward()
    assert torch.equal(p.grad, torch.zeros_like(p))


# -- transformation equivariance -----------------------------------------------------------------------------------
def test_te_is_zero_for_an_equivariant_predictor_and_not_for_others():
    g = torch.Generator().manual_seed(31)
    images = torch.rand(6, 3, 32, 32, generator=g)
    warp = sample_perspective(6, size=32, generator=g)
    torch.manual_seed(31)
    pointwise = torch.nn.Conv2d(3, 5, 1, bias=False).requires_grad_(False)  # commutes with any warp
    assert float(equivariance_mse(pointwise(warp.warp(images)), pointwise(images), warp.warp)) < 1e-12
    position = torch.linspace(0, 1, 32).view(1, 1, 1, 32)  # a predictor that sees absolute position

    def biased(x):
        return pointwise(x) + position

    assert float(equivariance_mse(biased(warp.warp(images)), biased(images), warp.warp)) > 1e-3


# -- keypoint representations, semantic consistency, transformation invariance --------------------------------------
def test_representations_are_the_max_of_features_times_heatmap_with_its_gradient(monkeypatch):
    g = torch.Generator().manual_seed(41)
    f = torch.randn(2, 5, 4, 6, generator=g, dtype=torch.float64, requires_grad=True)
    h = torch.randn(2, 7, 4, 6, generator=g, dtype=torch.float64, requires_grad=True)
    reference = (h.flatten(2)[:, :, None] * f.flatten(2)[:, None]).amax(-1)
    monkeypatch.setattr(_MaxProductPool, "CHUNK_ELEMENTS", 100)  # a few keypoints at a time
    assert torch.equal(keypoint_representations(f, h), reference)
    assert torch.autograd.gradcheck(keypoint_representations, (f, h))
    with pytest.raises(ValueError, match="share B, h, w"):
        keypoint_representations(f, h[..., :3])


def _separable(K=5, C=8, side=6):
    """Features with a distinct code at each keypoint's pixel and heatmaps peaking there."""
    features = torch.zeros(1, C, side, side)
    heatmaps = torch.zeros(1, K, side, side)
    for k in range(K):
        features[0, k, k, k] = 1.0
        heatmaps[0, k, k, k] = 1.0
    return features, heatmaps


def test_sc_rewards_separable_keypoint_representations():
    K = 5
    features, heatmaps = _separable(K)
    z = keypoint_representations(features, heatmaps)  # [1, K, C]: row k is code k
    classifier = torch.nn.Linear(8, K, bias=False).requires_grad_(False)
    with torch.no_grad():
        classifier.weight.zero_()
        classifier.weight[:, :K] = 20 * torch.eye(K)
    assert float(semantic_consistency_loss(classifier(z))) < 1e-6
    # the same keypoints on features that do not tell them apart: no classifier does better than chance
    collapsed = keypoint_representations(torch.ones_like(features), heatmaps)
    torch.manual_seed(42)
    for _ in range(5):
        classifier = torch.nn.Linear(8, K).requires_grad_(False)
        assert float(semantic_consistency_loss(classifier(collapsed))) >= math.log(K) - 1e-6


def test_ti_is_zero_for_invariant_representations_and_not_for_others():
    g = torch.Generator().manual_seed(51)
    features = torch.randn(3, 8, 12, 12, generator=g)
    heatmaps = gaussian_heatmaps(torch.rand(3, 4, 2, generator=g) - 0.5, (12, 12), 1.0)
    z = keypoint_representations(features, heatmaps)
    for turn in (lambda m: torch.rot90(m, 1, (-2, -1)), lambda m: torch.roll(m, (2, -3), (-2, -1))):
        # features and heatmaps that move with the image: the same representations
        assert float(invariance_mse(z, keypoint_representations(turn(features), turn(heatmaps)))) == 0.0
    # features that do not move with the image: the representations change
    moved = keypoint_representations(features, torch.rot90(heatmaps, 1, (-2, -1)))
    assert float(invariance_mse(z, moved)) > 1e-2


def test_labelled_keypoints_take_the_ground_truth_in_the_unsupervised_losses():
    g = torch.Generator().manual_seed(61)
    predicted, truth = torch.rand(4, 3, 5, 5, generator=g), torch.rand(2, 3, 5, 5, generator=g)
    mask = torch.tensor([[True, False, True], [False, False, False]])
    out = with_labels(predicted, truth, mask)
    assert torch.equal(out[:2], predicted[:2]) and torch.equal(out[3], predicted[3])
    assert torch.equal(out[2, 0], truth[0, 0]) and torch.equal(out[2, 2], truth[0, 2])
    assert torch.equal(out[2, 1], predicted[2, 1])
    assert torch.equal(with_labels(predicted[2:], truth, mask)[0, 0], truth[0, 0])  # a batch of labelled images only


# -- readouts ------------------------------------------------------------------------------------------------------
def test_readouts_of_exact_gaussians_and_the_quarter_pixel_refinement():
    """The evidence for the readouts on ideal heatmaps: 16 x 16 maps (the demo's), sigma 1 (the default)."""
    g = torch.Generator().manual_seed(71)
    kp = torch.rand(400, 1, 2, generator=g) * 1.6 - 0.8
    hm = gaussian_heatmaps(kp, (16, 16), 1.0)
    err = {r: float((_pixels(heatmap_keypoints(hm, r)[0], 16) - _pixels(kp, 16)).norm(dim=-1).mean())
           for r in ("argmax", "soft_argmax")}
    flat_index = hm.flatten(2).argmax(-1)
    integer = torch.stack([flat_index % 16, flat_index // 16], -1).float()
    integer_err = float((integer - _pixels(kp, 16)).norm(dim=-1).mean())
    assert err["argmax"] < 0.6 * integer_err and err["argmax"] < 0.25, (err, integer_err)
    assert err["soft_argmax"] < 0.25, err
    # peaks on the border keep the pixel centre; every readout stays in [-1, 1]
    corner = gaussian_heatmaps(torch.tensor([[[1.0, -1.0]]]), (16, 16), 1.0)
    assert heatmap_keypoints(corner)[0].tolist() == [[[1.0, -1.0]]]


# -- the model -----------------------------------------------------------------------------------------------------
def test_the_detector_has_kpfasts_trunk_and_comparable_capacity():
    cfg = TrainConfig.from_preset("demo")
    K = 68
    ours = HeatmapDetector(K, widths=cfg.detector_widths, up_widths=cfg.detector_up_widths,
                           feature_channels=cfg.sc_channels)
    theirs = KeypointDetector(K, widths=cfg.detector_widths, up_widths=cfg.detector_up_widths)
    assert _trunk(ours) == _trunk(theirs)
    assert 0.9 < _count(ours) / _count(theirs) < 1.1
    classifier = MoskvyakModel(K, widths=cfg.detector_widths, up_widths=cfg.detector_up_widths).classifier
    assert _count(classifier) == (cfg.sc_channels + 1) * K


def _trunk(module):
    return {k: v.shape for k, v in module.state_dict().items() if k.split(".")[0] in ("stem", "down", "up")}


def _count(module):
    return sum(p.numel() for p in module.parameters())


def _batch(K=4, U=3, L=2, side=32, seed=81):
    g = torch.Generator().manual_seed(seed)
    labeled = torch.rand(L, K, 2, generator=g) - 0.5
    return Batch(images=torch.rand(U + L, 3, side, side, generator=g), labeled_keypoints=labeled,
                 labeled_mask=torch.ones(L, K, dtype=torch.bool))


@pytest.mark.parametrize("without,terms", [
    ((), {"heatmap", "sc", "te", "ti"}), (("sc",), {"heatmap", "te", "ti"}), (("te",), {"heatmap", "sc", "ti"}),
    (("ti",), {"heatmap", "sc", "te"}), (("sc", "te", "ti"), {"heatmap"}),
])
def test_each_switch_removes_its_term_and_only_what_it_needs(without, terms):
    cfg = TrainConfig.from_preset("tiny", method="moskvyak", without=without)
    torch.manual_seed(0)
    model, objective = build_moskvyak_model(cfg, 4), MoskvyakObjective(cfg)
    streams = RandomStreams(0)
    result, out = objective(model, _batch(), 0, streams)
    assert set(result.as_dict()) == terms
    assert (model.classifier is not None) == ("sc" in terms)
    assert (model.detector.features is not None) == bool({"sc", "ti"} & terms)
    assert (out.heatmaps_transformed is not None) == bool({"te", "ti"} & terms)
    assert objective.uses_unlabeled == (terms != {"heatmap"})
    drew = not torch.equal(streams["transforms"].get_state(), RandomStreams(0)["transforms"].get_state())
    assert drew == bool({"te", "ti"} & terms), "only the warped terms draw warps"
    objective.total(result).backward()
    assert all(p.grad is not None for p in model.parameters()), "every parameter is trained (DDP needs it)"


def test_the_ground_truth_replaces_the_labelled_heatmaps_in_te():
    cfg = TrainConfig.from_preset("tiny", method="moskvyak")
    torch.manual_seed(0)
    model = MoskvyakModel(4, widths=cfg.detector_widths, up_widths=cfg.detector_up_widths, feature_channels=8)
    batch = _batch()
    terms, out = MoskvyakObjective(cfg)(model, batch, 0, RandomStreams(0))
    truth = gaussian_heatmaps(batch.labeled_keypoints, tuple(out.heatmaps.shape[-2:]), cfg.heatmap_sigma)
    assert torch.equal(out.reference[-2:], truth) and torch.equal(out.reference[:3], out.heatmaps[:3])
    assert torch.allclose(out.reference_transformed[-2:], out.warp[-2:].warp(truth))
    assert torch.isclose(terms.te, equivariance_mse(out.heatmaps_transformed, out.reference, out.warp.warp))


# -- the method on kpfast's loop -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("kpfast-cache"))


def tiny(cache, out, **kw):
    return TrainConfig.from_preset("tiny", method="moskvyak", cache_dir=cache, out=str(out), **kw)


def _rows(out):
    with open(out / "log.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_a_run_logs_its_terms_draws_heatmaps_and_loads_for_inference(cache, tmp_path):
    metrics = kpfast.train.run(tiny(cache, tmp_path, iterations=3, image_every=3))
    written = {p for p in tmp_path.rglob("*") if p.is_file()} - {tmp_path / LOCK_NAME}
    assert written == set(run_files(tmp_path)), "--overwrite would leave the heatmap pictures behind"
    row = _rows(tmp_path)[0]
    assert {"heatmap", "sc", "te", "ti", "total", "lr", "peak", "sc_accuracy"} <= set(row)
    assert {k[len("grad_"):] for k in row if k.startswith("grad_")} == {"heatmap", "sc", "te", "ti"}
    for name in ("predictions.png", "heatmaps.png", "model.pt", "checkpoint.pt", "metrics.json"):
        assert (tmp_path / name).is_file(), name
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["method"] == "moskvyak" and set(saved["readouts"]) == {"argmax", "soft_argmax"}
    assert saved["readouts"]["argmax"]["nme"] == metrics["test"]["nme"]  # the config's readout
    predictor = kpfast.load(tmp_path)
    assert isinstance(predictor.detector, HeatmapDetector)
    pred = predictor.predict(torch.rand(2, 3, 40, 50))
    assert pred.keypoints.shape == (2, 68, 2) and bool(((pred.confidence > 0) & (pred.confidence < 1)).all())
    with pytest.raises(ValueError, match="load the run's model.pt"):
        kpfast.load(tmp_path / "checkpoint.pt")


def test_resume_continues_bit_for_bit(cache, tmp_path, monkeypatch):
    straight = tmp_path / "straight"
    kpfast.train.run(tiny(cache, straight, iterations=4, checkpoint_every=2))
    interrupted = tmp_path / "interrupted"
    original = Trainer.train_step

    def crash_at_step_4(self, step):
        if step == 3:
            raise KeyboardInterrupt("simulated crash")
        return original(self, step)

    monkeypatch.setattr(Trainer, "train_step", crash_at_step_4)
    with pytest.raises(KeyboardInterrupt):
        kpfast.train.run(tiny(cache, interrupted, iterations=4, checkpoint_every=2))
    monkeypatch.setattr(Trainer, "train_step", original)
    resumed = kpfast.train.run(tiny(cache, interrupted, iterations=4, checkpoint_every=2, resume=True))
    assert resumed["resumed_from"] == 2
    a, b = load_checkpoint(straight / "checkpoint.pt"), load_checkpoint(interrupted / "checkpoint.pt")
    assert a["model"].keys() == b["model"].keys() and any(k.startswith("classifier.") for k in a["model"])
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), f"parameter {k} differs after resume"
    assert _rows(straight) == _rows(interrupted)


def test_two_process_ddp_run(cache, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "KPFAST_NO_REEXEC": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(port), "-m", "kpfast.train", "--preset", "tiny", "--method", "moskvyak",
           "--out", str(out), "--cache-dir", cache, "--iterations", "3", "--set", "checkpoint_every=3"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert json.loads((out / "metrics.json").read_text())["world_size"] == 2
    ckpt = load_checkpoint(out / "checkpoint.pt")
    # each rank warped its own images
    assert not torch.equal(ckpt["rng"][0]["streams"]["transforms"], ckpt["rng"][1]["streams"]["transforms"])
    assert len(_rows(out)) == 3


class _NaNGradient(torch.autograd.Function):
    """The identity whose gradient is NaN: a finite loss with a non-finite gradient."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


def test_the_nan_guard_replays_the_step_and_names_the_term(cache, tmp_path, monkeypatch):
    import kpfast.train.moskvyak_objective as objective

    original = objective.invariance_mse
    monkeypatch.setattr(objective, "invariance_mse", lambda *a: _NaNGradient.apply(original(*a)))
    with pytest.raises(NonFiniteLossError, match=r"gradient of loss term 'ti' is not finite at step 1.*w_ti="):
        kpfast.train.run(tiny(cache, tmp_path, iterations=2))


def test_config_and_grids():
    with pytest.raises(ValueError, match="heatmap_readout"):
        TrainConfig(method="moskvyak", heatmap_readout="mean")
    with pytest.raises(ValueError, match=r"without 'sc' only applies to method 'moskvyak'"):
        TrainConfig(without=("sc",))
    with pytest.raises(ValueError, match=r"method 'moskvyak' can switch off"):
        TrainConfig(method="moskvyak", without=("recon",))
    from kpfast.experiments import Grid

    for folder, shots in (("10-shots", 10), ("5-percent", 100)):
        grid = Grid.load(ROOT / "docs" / "results" / "moskvyak" / folder / "grid.json")
        assert grid.seeds == [100, 101, 102] and grid.datasets == ["face", "animal"]
        runs = grid.runs()
        assert {r.config.shots for r in runs} == {shots}
        ablations = {r.config.without for r in runs if r.config.method == "moskvyak"}
        assert ablations == {(), ("sc",), ("te",), ("ti",), ("sc", "te", "ti")}
