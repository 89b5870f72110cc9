"""kpfast.diagnose: the mechanism checks measure what they claim, and the fast ones pass on the built-in data."""

import math

import pytest
import torch

from kpfast import diagnose
from kpfast.data import open_dataset
from kpfast.train import TrainConfig


@pytest.fixture(scope="module")
def faces(tmp_path_factory):
    cache = str(tmp_path_factory.mktemp("kpfast-cache"))
    return (open_dataset("face", "train", image_size=32, size=48, seed=0, cache_dir=cache, progress=False),
            open_dataset("face", "test", image_size=32, size=16, seed=0, cache_dir=cache, progress=False))


def test_descent_alignment_is_one_toward_the_truth_minus_one_away_and_zero_sideways():
    truth = torch.zeros(2, 3, 2, dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    assert diagnose.descent_alignment(lambda x: (x - truth).pow(2).sum(), truth, 0.1, g) == pytest.approx(1.0)
    assert diagnose.descent_alignment(lambda x: -(x - truth).pow(2).sum(), truth, 0.1, g) == pytest.approx(-1.0)
    # a pull along a fixed direction is unrelated to where the perturbation went: near 0 on average
    direction = torch.randn(2, 3, 2, generator=g, dtype=torch.float64)
    sideways = [diagnose.descent_alignment(lambda x: (x * direction).sum(), truth, 0.1, g) for _ in range(200)]
    assert abs(sum(sideways) / len(sideways)) < 0.1


def test_the_2d_and_3d_terms_pull_perturbed_truth_back_on_procedural_faces(faces):
    train, _ = faces
    meta = train.meta
    parts = meta.part_mask(include_whole=True)
    weights = torch.tensor([1.0] * len(meta.parts) + [0.1])
    geo2d = diagnose.geo2d_check(train)
    geo3d = diagnose.geo3d_check(train, parts, weights)
    assert geo2d.passed and geo2d.value > 0.5, geo2d
    assert geo3d.passed, geo3d
    # both report every noise level
    assert set(geo2d.detail) == set(geo3d.detail) == {f"noise {n:g}" for n in diagnose.NOISE}


def test_the_reconstruction_check_trains_three_variants_and_measures_the_gradient(faces):
    train, test = faces
    cfg = TrainConfig.from_preset("tiny", unet_widths=(8, 16), batch_unlabeled=2, batch_labeled=2)
    uses, gradient = diagnose.recon_checks(train, test, cfg, steps=3, progress=False)
    assert set(uses.detail) == {"true", "zero", "shuffled"}
    assert all(math.isfinite(v["loss"]) and v["loss"] > 0 for v in uses.detail.values())
    best_other = min(uses.detail["zero"]["loss"], uses.detail["shuffled"]["loss"])
    assert uses.value == pytest.approx(1 - uses.detail["true"]["loss"] / best_other)
    assert -1 <= gradient.value <= 1
