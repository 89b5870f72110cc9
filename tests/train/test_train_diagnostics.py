"""The per-term diagnostics of a run: they measure without changing the training."""

import csv
import math

import pytest
import torch

import kpfast
from kpfast.train import TrainConfig
from kpfast.checkpoint import load_checkpoint
from kpfast.train.diagnostics import depth_correlation, term_gradients


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("kpfast-cache"))


def test_a_term_pulling_straight_at_the_truth_has_alignment_one_and_its_opposite_minus_one():
    kp = torch.tensor([[[0.1, -0.2], [0.4, 0.3]]], requires_grad=True)
    truth = torch.tensor([[[0.5, 0.5], [-0.5, 0.0]]])
    d = term_gradients({"toward": (kp - truth).pow(2).sum(), "away": -(kp - truth).pow(2).sum()},
                       {"toward": 2.0, "away": 1.0}, kp, truth)
    assert d["align_toward"] == pytest.approx(1.0) and d["align_away"] == pytest.approx(-1.0)
    assert d["grad_toward"] == pytest.approx(2 * d["grad_away"])  # weighted terms
    known = torch.tensor([[True, False]])
    only_first = term_gradients({"t": (kp[:, 0] - truth[:, 0]).abs().sum()}, {"t": 1.0}, kp, truth, known)
    assert only_first["align_t"] == pytest.approx(torch.nn.functional.cosine_similarity(
        (truth - kp)[0, 0], -torch.sign(kp - truth)[0, 0], dim=0).item())


def test_depth_correlation_is_per_image_and_skips_unknown_depth():
    true = torch.tensor([[0.0, 1.0, 2.0, 3.0], [0.0, 1.0, 2.0, float("nan")]])
    pred = torch.tensor([[0.0, 2.0, 4.0, 6.0], [2.0, 1.0, 0.0, 5.0]])
    known = torch.ones(2, 4, dtype=torch.bool)
    assert depth_correlation(pred, true, known) == pytest.approx(0.0)  # +1 and -1
    assert math.isnan(depth_correlation(pred, true, torch.zeros(2, 4, dtype=torch.bool)))


def test_diagnostics_do_not_change_the_training(cache, tmp_path):
    def run(out, every):
        cfg = TrainConfig.from_preset("tiny", cache_dir=cache, out=str(out), iterations=3, checkpoint_every=3,
                                      diagnostics_every=every)
        kpfast.train.run(cfg)
        with open(out / "log.csv", newline="") as f:
            return load_checkpoint(out / "checkpoint.pt")["model"], list(csv.DictReader(f))

    with_d, rows = run(tmp_path / "on", 1)
    without_d, rows_off = run(tmp_path / "off", 0)
    for k in with_d:
        assert torch.equal(with_d[k], without_d[k]), k
    for term in ("recon", "geo2d", "geo3d"):
        assert float(rows[-1][f"grad_{term}"]) > 0 and -1 <= float(rows[-1][f"align_{term}"]) <= 1, term
        assert f"grad_{term}" not in rows_off[-1]
    # the few-shot term pulls on the labelled images only: no direction on the unlabelled ones
    assert float(rows[-1]["grad_few_shot"]) > 0 and math.isnan(float(rows[-1]["align_few_shot"]))
    assert 0 < float(rows[-1]["alpha"]) and 0 < float(rows[-1]["certainty"]) < 1
    assert -1 <= float(rows[-1]["depth_corr"]) <= 1  # procedural data carries true depth
