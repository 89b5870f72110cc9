"""kpfast.train end to end on tiny procedural faces: loss goes down, resume is bit for bit,
a NaN stops the run, every method and ablation runs, the config rejects nonsense."""

import csv
import json

import pytest
import torch

import kpfast
from kpfast.train import NonFiniteLossError, TrainConfig, Trainer
from kpfast.checkpoint import load_checkpoint


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("kpfast-cache"))


def tiny(cache, out, **kw):
    return TrainConfig.from_preset("tiny", cache_dir=cache, out=str(out), **kw)


def _rows(out):
    with open(out / "log.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_kpfast_train_is_a_plain_module_whose_run_trains():
    import importlib
    import types

    mod = importlib.import_module("kpfast.train")
    assert kpfast.train is mod and type(mod) is types.ModuleType and not callable(mod)
    assert mod.TrainConfig is TrainConfig and callable(mod.run)


def test_short_run_on_the_procedural_face_reduces_the_loss(cache, tmp_path):
    cfg = tiny(cache, tmp_path, iterations=60, lr=5e-3, checkpoint_every=60)
    metrics = kpfast.train.run(cfg)
    rows = _rows(tmp_path)
    assert len(rows) == 60
    first = sum(float(r["few_shot"]) for r in rows[:5]) / 5
    last = sum(float(r["few_shot"]) for r in rows[-5:]) / 5
    assert last < 0.75 * first, f"few-shot loss {first:.4f} -> {last:.4f}"
    first_total = sum(float(r["total"]) for r in rows[:5]) / 5
    last_total = sum(float(r["total"]) for r in rows[-5:]) / 5
    assert last_total < first_total
    assert {"few_shot", "recon", "geo2d", "geo3d", "smooth"} <= set(rows[0])
    assert float(rows[0]["strength"]) == 0.0 and 0.9 < float(rows[-1]["strength"]) < 1.0  # the 2D ramp
    # what a run leaves behind
    for name in ("metrics.json", "model.pt", "checkpoint.pt", "predictions.png", "reconstructions.png",
                 "edge_maps.png", "log.csv"):
        assert (tmp_path / name).is_file(), name
    assert any((tmp_path / "tb").iterdir())
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["test"]["nme"] == metrics["test"]["nme"] > 0
    for key in ("shots", "dataset", "method", "ops", "perceptual", "wall_time_s", "config", "few_shot_selection"):
        assert key in saved, key
    assert len(saved["test"]["per_keypoint"]) == 68 and saved["perceptual"] == "none"
    # the model fits its few labelled images better than the unseen test images
    assert saved["labeled_fit"]["nme"] < saved["test"]["nme"]


def _params(path):
    return load_checkpoint(path)["model"]


def test_resume_continues_bit_for_bit(cache, tmp_path, monkeypatch):
    straight = tmp_path / "straight"
    kpfast.train.run(tiny(cache, straight, iterations=6, checkpoint_every=3))

    interrupted = tmp_path / "interrupted"
    original = Trainer.train_step

    def crash_at_step_5(self, step):
        if step == 4:
            raise KeyboardInterrupt("simulated crash")
        return original(self, step)

    monkeypatch.setattr(Trainer, "train_step", crash_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        kpfast.train.run(tiny(cache, interrupted, iterations=6, checkpoint_every=3))
    assert load_checkpoint(interrupted / "checkpoint.pt")["step"] == 3
    monkeypatch.setattr(Trainer, "train_step", original)
    metrics = kpfast.train.run(tiny(cache, interrupted, iterations=6, checkpoint_every=3, resume=True))
    assert metrics["resumed_from"] == 3

    a, b = load_checkpoint(straight / "checkpoint.pt"), load_checkpoint(interrupted / "checkpoint.pt")
    assert a["step"] == b["step"] == 6
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), f"parameter {k} differs after resume"
    for (ka, sa), (kb, sb) in zip(a["optimizer"]["state"].items(), b["optimizer"]["state"].items()):
        for name in sa:
            assert torch.equal(torch.as_tensor(sa[name]), torch.as_tensor(sb[name])), f"optimizer {ka}.{name}"
    for name, state in a["rng"][0]["streams"].items():
        assert torch.equal(state, b["rng"][0]["streams"][name]), f"random stream {name}"
    rows_a, rows_b = _rows(straight), _rows(interrupted)
    assert [r["step"] for r in rows_b] == [str(i) for i in range(1, 7)]
    assert rows_a == rows_b, "the resumed run logs exactly what the straight run logged"


def test_resume_refuses_a_different_config(cache, tmp_path):
    kpfast.train.run(tiny(cache, tmp_path, iterations=2))
    with pytest.raises(ValueError, match="lr"):
        kpfast.train.run(tiny(cache, tmp_path, iterations=2, lr=5e-4, resume=True))


def test_a_non_finite_loss_stops_the_run_naming_term_and_step(cache, tmp_path, monkeypatch):
    original = Trainer.compute_losses

    def nan_at_step_4(self, batch, step):
        terms, out = original(self, batch, step)
        if step == 3:
            terms.geo3d = terms.geo3d * float("nan")
        return terms, out

    monkeypatch.setattr(Trainer, "compute_losses", nan_at_step_4)
    with pytest.raises(NonFiniteLossError, match=r"step 4: 'geo3d' = nan.*checkpoint"):
        kpfast.train.run(tiny(cache, tmp_path, iterations=6, checkpoint_every=2))
    ckpt = load_checkpoint(tmp_path / "checkpoint.pt")
    assert ckpt["step"] == 2, "the last good checkpoint is kept, nothing is written after the NaN"
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    assert not (tmp_path / "metrics.json").exists()


@pytest.mark.parametrize("method,without", [
    ("supervised", ()), ("autolink-few", ()), ("full", ("recon",)), ("full", ("geo2d", "geo3d")),
    ("full", ("uncertainty", "kmeans")),
])
def test_methods_and_ablations_train_the_right_terms(cache, tmp_path, method, without):
    metrics = kpfast.train.run(tiny(cache, tmp_path, iterations=2, method=method, without=without))
    row = _rows(tmp_path)[0]
    diagnostics = {k for k in row if k.startswith(("grad_", "align_"))} | {"certainty", "depth_corr", "alpha", "sigma2"}
    terms = set(row) - {"step", "total", "strength", "lr"} - diagnostics
    expected = {"supervised": {"few_shot"}, "autolink-few": {"few_shot", "recon"},
                "full": {"few_shot", "recon", "geo2d", "geo3d", "smooth"} - set(without)}[method]
    assert terms == expected
    assert {k[len("grad_"):] for k in row if k.startswith("grad_")} == expected, "one gradient diagnostic per term"
    assert metrics["method"] == method and metrics["without"] == list(without)
    assert metrics["few_shot_selection"].startswith("random" if "kmeans" in without else "k-means")
    assert (tmp_path / "reconstructions.png").exists() == ("recon" in expected)


def test_reference_ops_give_the_same_first_steps_as_the_fused_ones(cache, tmp_path):
    a = kpfast.train.run(tiny(cache, tmp_path / "fused", iterations=2, ops="fused"))
    b = kpfast.train.run(tiny(cache, tmp_path / "reference", iterations=2, ops="reference"))
    assert b["ops"] == "reference"
    ra, rb = _rows(tmp_path / "fused"), _rows(tmp_path / "reference")
    for k in ("few_shot", "recon", "geo2d", "geo3d"):
        assert abs(float(ra[0][k]) - float(rb[0][k])) <= 1e-4 * max(1.0, abs(float(ra[0][k]))), k
    assert abs(a["test"]["nme"] - b["test"]["nme"]) < 1.0


@pytest.mark.parametrize("change,match", [
    (dict(method="fancy"), "method must be one of"),
    (dict(without=("magic",)), "unknown component"),
    (dict(method="supervised", without=("geo2d",)), "only applies to method 'full'"),
    (dict(ops="cuda"), "ops must be one of"),
    (dict(shots=0), "shots"),
    (dict(image_size=36), "divisible"),
    (dict(batch_labeled=20), "exceeds shots"),
])
def test_bad_configs_are_rejected_with_the_field_named(change, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig.from_preset("tiny", **change)


def test_config_round_trips_through_a_dict():
    cfg = TrainConfig.from_preset("demo", without=("geo3d",))
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    paper = TrainConfig.from_preset("paper", shots=10)
    assert (paper.image_size, paper.lr, paper.betas, paper.batch_unlabeled, paper.labeled_batch, paper.iterations) == \
        (128, 1e-4, (0.9, 0.99), 16, 10, 20000)
    assert (paper.w_few_shot, paper.w_recon, paper.w_geo2d, paper.w_geo3d) == (1, 1, 1, 0.1)
