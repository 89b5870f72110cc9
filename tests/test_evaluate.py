"""Metrics (kpfast.evaluate): NME, PCK@0.1, per-keypoint errors, which keypoints count."""

import math

import pytest
import torch

from kpfast.data import KeypointMeta
from kpfast.evaluate import MetricAccumulator, evaluate

META = KeypointMeta("toy", ["a", "b", "c"], normalizer=(0, 1))
BOX = torch.tensor([[-0.5, -0.5, 0.5, 0.3]])  # longer side 1.0


def _gt():
    return torch.tensor([[[-0.4, 0.0], [0.4, 0.0], [0.0, 0.2]]])  # normalizer distance 0.8


def test_nme_divides_by_the_normalizer_distance_and_averages_over_labelled_keypoints():
    gt = _gt()
    pred = gt + torch.tensor([[[0.08, 0.0], [0.0, 0.16], [0.0, 0.0]]])
    acc = MetricAccumulator(META)
    acc.add(pred, gt, torch.ones(1, 3, dtype=torch.bool), torch.ones(1, 3, dtype=torch.bool), BOX)
    r = acc.result()
    assert math.isclose(r["nme"], 100 * (0.1 + 0.2 + 0.0) / 3, rel_tol=1e-6)
    assert math.isclose(r["per_keypoint"]["b"]["nme"], 20.0, rel_tol=1e-6)
    # PCK@0.1 with a box of longer side 1: errors 0.08, 0.16, 0 -> 2 of 3 within 0.1
    assert math.isclose(r["pck@0.1"], 200 / 3, rel_tol=1e-9)
    assert r["per_keypoint"]["b"]["pck"] == 0.0 and r["images"] == 1


def test_unlabelled_keypoints_are_ignored_and_pck_counts_visible_ones_only():
    gt = _gt()
    pred = gt.clone()
    pred[0, 2] += 5.0  # keypoint c is way off
    acc = MetricAccumulator(META)
    labeled = torch.tensor([[True, True, False]])
    acc.add(pred, gt, labeled, torch.tensor([[True, True, True]]), BOX)
    r = acc.result()
    assert r["nme"] == 0.0 and r["pck@0.1"] == 100.0
    assert r["per_keypoint"]["c"]["nme"] is None and r["per_keypoint"]["c"]["labeled"] == 0
    acc = MetricAccumulator(META)
    acc.add(pred, gt, torch.ones(1, 3, dtype=torch.bool), torch.tensor([[True, True, False]]), BOX)
    r = acc.result()
    assert r["pck@0.1"] == 100.0 and r["nme"] > 100  # occluded-but-labelled c counts for NME only


def test_without_a_normalizer_nme_uses_the_longer_box_side():
    meta = KeypointMeta("toy", ["a", "b"])
    seed = 31
    gen = torch.Generator().manual_seed(seed)
    gt = torch.rand(4, 2, 2, generator=gen) - 0.5
    err = torch.rand(4, 2, generator=gen) * 0.1
    pred = gt + torch.stack([err, torch.zeros_like(err)], -1)
    box = torch.tensor([[-1.0, -0.5, 1.0, 0.5]]).expand(4, 4)  # longer side 2
    acc = MetricAccumulator(meta)
    ones = torch.ones(4, 2, dtype=torch.bool)
    acc.add(pred, gt, ones, ones, box)
    assert math.isclose(acc.result()["nme"], float(100 * (err / 2).mean()), rel_tol=1e-6), f"seed {seed}"


def test_metrics_do_not_depend_on_batching():
    seed = 32
    gen = torch.Generator().manual_seed(seed)
    gt = torch.rand(10, 3, 2, generator=gen) - 0.5
    pred = gt + 0.1 * torch.randn(10, 3, 2, generator=gen)
    vis = torch.rand(10, 3, generator=gen) > 0.3
    box = torch.tensor([[-0.6, -0.6, 0.6, 0.6]]).expand(10, 4)
    lab = torch.ones(10, 3, dtype=torch.bool)
    whole, parts = MetricAccumulator(META), MetricAccumulator(META)
    whole.add(pred, gt, lab, vis, box)
    for s in (slice(0, 3), slice(3, 10)):
        parts.add(pred[s], gt[s], lab[s], vis[s], box[s])
    a, b = whole.result(), parts.result()
    assert math.isclose(a["nme"], b["nme"], rel_tol=1e-12) and a["pck@0.1"] == b["pck@0.1"], f"seed {seed}"


def test_evaluate_runs_a_predictor_over_a_dataset():
    from kpfast.data import open_dataset

    ds = open_dataset("face", "test", size=6, image_size=32, progress=False)
    perfect = {"kp": torch.stack([ds[i]["keypoints"] for i in range(len(ds))]), "i": 0}

    def oracle(images):
        out = perfect["kp"][perfect["i"]:perfect["i"] + len(images)]
        perfect["i"] += len(images)
        return out

    r = evaluate(oracle, ds, batch_size=4)
    assert r["nme"] == 0.0 and r["pck@0.1"] == 100.0 and r["images"] == 6
    assert set(r["per_keypoint"]) == set(ds.meta.keypoint_names)
    center = evaluate(lambda im: torch.zeros(len(im), ds.meta.num_keypoints, 2), ds, batch_size=4)
    assert center["nme"] > 10


@pytest.mark.parametrize("threshold", [0.05, 0.2])
def test_pck_threshold_is_a_share_of_the_box(threshold):
    gt = _gt()
    pred = gt + torch.tensor([0.1, 0.0])
    acc = MetricAccumulator(META, pck_threshold=threshold)
    ones = torch.ones(1, 3, dtype=torch.bool)
    acc.add(pred, gt, ones, ones, BOX)
    assert acc.result()[f"pck@{threshold:g}"] == (100.0 if threshold > 0.1 else 0.0)


def test_spread_reports_collapse_that_nme_hides():
    gt = _gt()
    ones = torch.ones(1, 3, dtype=torch.bool)
    centroid = gt.mean(1, keepdim=True)
    for pred, expected in ((gt, 1.0), (centroid + 0.5 * (gt - centroid), 0.5), (centroid.expand_as(gt), 0.0)):
        acc = MetricAccumulator(META)
        acc.add(pred, gt, ones, ones, BOX)
        assert acc.result()["spread"] == pytest.approx(expected, abs=1e-6)


class _Shapes(torch.utils.data.Dataset):
    """Samples whose keypoints are given shapes (for image-blind baselines)."""

    meta = META

    def __init__(self, shapes):
        self.shapes = shapes

    def __len__(self):
        return len(self.shapes)

    def __getitem__(self, i):
        k = self.shapes[i].float()
        return {"image": torch.zeros(3, 4, 4), "keypoints": k, "labeled": torch.ones(3, dtype=torch.bool),
                "visible": torch.ones(3, dtype=torch.bool), "bbox": BOX[0], "index": i}


def test_shape_baselines_score_the_mean_shape_and_its_oracle_placement():
    from kpfast.evaluate import shape_baselines

    base = _gt()[0]
    angle = torch.tensor(0.4)
    rot = torch.stack([torch.stack([angle.cos(), -angle.sin()]), torch.stack([angle.sin(), angle.cos()])])
    test = _Shapes([base, 0.7 * base @ rot.T + torch.tensor([0.1, -0.2])])  # similar copies of the shape
    r = shape_baselines(_Shapes([base, base]), [0, 1], test)
    assert r["fitted_mean_shape"]["nme"] == pytest.approx(0.0, abs=1e-4)
    assert r["mean_shape"]["nme"] > 10.0  # the second test shape is moved, turned and shrunk
    assert r["fitted_mean_shape"]["spread"] == pytest.approx(1.0, abs=1e-6)


def test_the_sanity_baseline_reports_the_nme_of_kpfast_evaluate(tmp_path, capsys):
    """One NME definition: a category without a normalizer pair (cars) is scored on the box's longer side."""
    import re

    from kpfast import sanity_baseline
    from kpfast.data import open_dataset

    sanity_baseline.main(["--category", "car", "--shots", "2", "--iters", "0", "--test-size", "8",
                          "--image-size", "32", "--cache-dir", str(tmp_path)])
    reported = float(re.search(r"test NME ([0-9.]+) %", capsys.readouterr().out).group(1))
    test = open_dataset("car", "test", size=8, image_size=32, cache_dir=str(tmp_path), progress=False)
    assert test.meta.normalizer is None
    torch.manual_seed(0)  # the untrained network main() evaluated (--iters 0, --seed 0)
    net = sanity_baseline.TinyRegressor(test.meta.num_keypoints)
    assert reported == round(evaluate(net, test)["nme"], 1)
