"""--method adaptation (Sanchez & Tzimiropoulos, NeurIPS 2019): the projected core, the Gaussian
bottleneck, the regressors, the cached source detector, and the run end to end (resume, DDP, load)."""

import csv
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import kpfast
from kpfast import experiments
from kpfast.checkpoint import CheckpointError, load_checkpoint
from kpfast.evaluate import evaluate
from kpfast.models import KeypointDetector
from kpfast.models.adaptation import LandmarkDetector, gaussian_heatmaps
from kpfast.models.linear_regression import RIDGE_ALPHAS, PointRegressor, fit_ridge
from kpfast.models.projection import folded_state_dict, project_convolutions
from kpfast.config import PRESETS, run_differences
from kpfast.train import TrainConfig
from kpfast.train.adaptation import AdaptationTrainer, load_core
from kpfast.train.cli import config_from_args, parser
from kpfast.train.run_folder import LOCK_NAME, run_files

ROOT = Path(__file__).resolve().parents[2]


def tiny(cache, out, **kw):
    """A tiny face -> animal adaptation; every run trains or reads the same 4-step face source (``source_iterations``
    pinned, so a run's ``iterations`` do not change its source)."""
    kw = {"method": "adaptation", "dataset": "animal", "source": "face", "source_iterations": 4,
          "adapt_generator_widths": (8, 16, 32), "adapt_generator_blocks": 1, **kw}
    return TrainConfig.from_preset("tiny", cache_dir=str(cache), out=str(out), **kw)


def _rows(out):
    with open(out / "log.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("kpfast-cache")


@pytest.fixture(scope="module")
def projection_run(tmp_path_factory, cache):
    """A finished 4-step projection run, face -> animal (it trains and caches the face source)."""
    out = tmp_path_factory.mktemp("projection")
    return out, kpfast.train.run(tiny(cache, out))


# -- the networks ------------------------------------------------------------------------------------------

def _core(seed=0):
    torch.manual_seed(seed)
    core = KeypointDetector(5, widths=(8, 16), up_widths=(8,))
    with torch.no_grad():  # batch norm statistics as a trained detector has them
        for m in core.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
    return core.eval()


def test_projected_core_computes_what_the_core_did_and_trains_only_projections_norms_and_head():
    core = _core()
    det = LandmarkDetector(3, widths=(8, 16), up_widths=(8,))
    load_core(det, core.state_dict())
    projected = project_convolutions(det, skip=[det.head])
    assert len(projected) == 2 * 2 + 1 + 1 + 1  # two residual blocks (two convs each, one shortcut each), one up conv
    det.eval()
    x = torch.rand(2, 3, 32, 32)
    body = lambda m: m.up(m.down(m.stem(x - 0.5)))  # noqa: E731
    with torch.no_grad():
        torch.testing.assert_close(body(det), body(core), rtol=0, atol=0)
    norms = {f"{m}.{p}" for m, mod in det.named_modules() if isinstance(mod, torch.nn.BatchNorm2d)
             for p in ("weight", "bias")}
    projections = {f"{m}.parametrizations.weight.0.matrix" for m in projected}
    trained = {n for n, p in det.named_parameters() if p.requires_grad}
    assert trained == norms | projections | {"head.weight", "head.bias"}
    frozen = {n for n, p in det.named_parameters() if not p.requires_grad}
    assert frozen == {f"{m}.parametrizations.weight.original" for m in projected}


def test_folded_weights_give_a_plain_detector_the_projected_outputs():
    det = LandmarkDetector(3, widths=(8, 16), up_widths=(8,))
    load_core(det, _core().state_dict())
    project_convolutions(det, skip=[det.head])
    with torch.no_grad():
        for n, p in det.named_parameters():
            if n.endswith("matrix"):
                p.add_(0.1 * torch.randn_like(p))
    plain = LandmarkDetector(3, widths=(8, 16), up_widths=(8,))
    plain.load_state_dict(folded_state_dict(det))
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(plain.eval()(x)[1], det.eval()(x)[1], rtol=1e-5, atol=1e-5)


def test_a_core_of_another_architecture_is_refused():
    det = LandmarkDetector(3, widths=(8, 32), up_widths=(8,))
    with pytest.raises(CheckpointError, match="do not fit"):
        load_core(det, _core().state_dict())


def test_gaussian_bottleneck_peaks_at_the_landmark_and_soft_argmax_reads_it_back():
    g = torch.Generator().manual_seed(3)
    points = torch.rand(4, 6, 2, generator=g, dtype=torch.float64) * 1.2 - 0.6  # 4 sigma from the border
    maps = gaussian_heatmaps(points, (32, 32), 1.5)
    assert maps.shape == (4, 6, 32, 32) and float(maps.max()) <= 1.0
    back, _ = kpfast.soft_argmax(maps.log(), None, beta=1.0)  # softmax of log(G) is G normalized
    torch.testing.assert_close(back, points, rtol=0, atol=1e-6)
    on_grid = torch.tensor([[[-1.0 + 2 * 5 / 15, -1.0 + 2 * 9 / 15]]], dtype=torch.float64)
    assert float(gaussian_heatmaps(on_grid, (16, 16), 0.8)[0, 0, 9, 5]) == 1.0  # row 9, column 5


# -- the regressors ----------------------------------------------------------------------------------------

def _brute_force_loo(x, y, lam):
    """Leave-one-out squared error of ridge with an unpenalized bias, refitted n times."""
    total = 0.0
    for i in range(len(x)):
        keep = torch.arange(len(x)) != i
        xm, ym = x[keep].mean(0), y[keep].mean(0)
        xc, yc = x[keep] - xm, y[keep] - ym
        w = torch.linalg.solve(xc.T @ xc + lam * torch.eye(x.shape[1], dtype=x.dtype), xc.T @ yc)
        total += float(((x[i] - xm) @ w + ym - y[i]).pow(2).sum())
    return total


@pytest.mark.parametrize("n,d", [(30, 4), (10, 21)])
def test_ridge_leave_one_out_error_is_the_refitted_one(n, d):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = x @ torch.randn(d, 3, generator=g, dtype=torch.float64) + 0.1 * torch.randn(n, 3, generator=g,
                                                                                      dtype=torch.float64)
    for alpha in (1e-3, 1.0):
        fit = fit_ridge(x, y, alphas=[alpha])
        lam = alpha * float((x - x.mean(0)).pow(2).sum()) / d
        assert fit.loo_rmse ** 2 * y.numel() == pytest.approx(_brute_force_loo(x, y, lam), rel=1e-9)


def test_ridge_recovers_a_linear_map_and_fits_each_output_on_the_examples_that_know_it():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 3, generator=g, dtype=torch.float64)
    w = torch.randn(4, 3, generator=g, dtype=torch.float64)
    y = x @ w.T + torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=torch.float64)
    known = torch.ones(40, 4, dtype=torch.bool)
    known[:20, 1] = False
    y[:20, 1] = 1e6  # unknown values must not matter
    known[:, 3] = False
    known[5, 3] = True  # one example: its value is the prediction
    fit = fit_ridge(x, y, known)
    assert fit.alpha == min(RIDGE_ALPHAS)
    torch.testing.assert_close(fit.weight[:3], w[:3], rtol=0, atol=1e-4)
    torch.testing.assert_close(fit.bias[:3], torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64), rtol=0, atol=1e-4)
    assert torch.equal(fit.weight[3], torch.zeros(3, dtype=torch.float64)) and float(fit.bias[3]) == float(y[5, 3])


def test_point_regressor_maps_point_sets_and_rejects_the_wrong_shape():
    g = torch.Generator().manual_seed(1)
    src = torch.rand(12, 3, 2, generator=g)
    dst = src[:, [0, 1, 2, 0]] * 2 - 0.5  # a linear function of the source points
    reg = PointRegressor(3, 4)
    info = reg.fit(src, dst)
    assert info["examples"] == 12
    torch.testing.assert_close(reg(src), dst, rtol=0, atol=1e-3)
    with pytest.raises(ValueError, match=r"\[B, 3, 2\]"):
        reg(torch.rand(2, 4, 2))


# -- configuration -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("change,match", [
    (dict(source=None), "needs source"),
    (dict(adapt="scratch"), "leave source unset"),
    (dict(adapt="frozen"), "adapt must be one of"),
    (dict(method="supervised"), "source only applies to method 'adaptation'"),
    (dict(adapt_generator_widths=(8, 16, 32, 64, 128, 256, 512)), "adapt_generator_widths has 7 levels"),
    (dict(adapt_landmarks=0), "adapt_landmarks"),
    (dict(batch_unlabeled=0), "batch_unlabeled must be >= 1"),
    (dict(adapt_landmark_beta=0.0), "adapt_landmark_beta"),
])
def test_bad_adaptation_configs_are_refused_naming_the_field(change, match, tmp_path):
    with pytest.raises(ValueError, match=match):
        tiny(tmp_path, tmp_path / "x", **change)


def test_runs_finished_before_the_adaptation_fields_existed_are_the_same_runs():
    """No preset sets an adaptation field: a config written without them (every run finished before this
    method) reads back as the same run, so the experiment runner and --resume keep those runs."""
    new = {"source", "adapt", "source_iterations", "source_seed", "adapt_landmarks", "adapt_landmark_beta",
           "adapt_landmark_sigma", "adapt_generator_widths", "adapt_generator_blocks"}
    assert new <= set(TrainConfig().to_dict())
    for preset in PRESETS:
        cfg = TrainConfig.from_preset(preset).to_dict()
        assert run_differences({k: v for k, v in cfg.items() if k not in new}, cfg) == [], preset


def test_the_command_line_takes_source_and_adapt():
    args = parser().parse_args(["--preset", "demo", "--method", "adaptation", "--source", "runs/face-sup",
                                "--set", "adapt=finetune", "--out", "runs/x"])
    cfg = config_from_args(args)
    assert (cfg.method, cfg.source, cfg.adapt) == ("adaptation", "runs/face-sup", "finetune")


def test_the_grid_files_are_valid_and_compare_the_three_arms_at_10_shots():
    grids = sorted((ROOT / "docs" / "results" / "adaptation").glob("*/grid.json"))
    assert len(grids) == 2
    for path in grids:
        grid = experiments.Grid.load(path)
        assert grid.seeds == [100, 101, 102]
        adapted = [r.config for r in grid.runs() if r.config.method == "adaptation"]
        assert {c.adapt for c in adapted} == {"projection", "finetune", "scratch"}
        assert {r.config.shots for r in grid.runs()} == {10} and {r.config.iterations for r in grid.runs()} == {1100}
        assert {(c.adapt_generator_widths, c.adapt_generator_blocks) for c in adapted} == {((16, 32, 64), 4)}
        assert len({c.source for c in adapted if c.adapt != "scratch"}) == 1  # one cached source for every run


# -- runs --------------------------------------------------------------------------------------------------

def test_a_run_reports_forward_and_backward_errors_and_draws_the_landmarks(projection_run):
    out, metrics = projection_run
    a = metrics["adaptation"]
    assert a["adapt"] == "projection" and a["forward_error"]["test"] == metrics["test"]["nme"]
    assert a["backward_error"]["test"] > 0 and metrics["extra_metrics"]["backward error (%)"] == a["backward_error"]["test"]
    assert a["source"]["kind"] == "trained" and a["source"]["test"]["nme"] > 0 and a["source"]["keypoints"] == 68
    assert 0 < a["parameters"]["detector_trained"] < a["parameters"]["detector"] / 2
    assert a["regressors"]["forward"]["examples"] == 4 and len(metrics["test"]["per_keypoint"]) == 20
    assert set(_rows(out)[0]) == {"step", "recon", "total", "recon_pixel", "landmark_spread", "lr"}
    written = {p for p in out.rglob("*") if p.is_file()} - {out / LOCK_NAME}
    assert {p.name for p in written} >= {"landmarks.png", "reconstructions.png", "predictions.png", "model.pt"}
    assert written == set(run_files(out))


def test_the_saved_model_predicts_what_the_run_evaluated(projection_run):
    out, metrics = projection_run
    predictor = kpfast.load(out)
    test = kpfast.data.open_dataset("animal", "test", image_size=32, size=16, cache_dir=str(
        Path(metrics["config"]["cache_dir"])), progress=False)
    m = evaluate(lambda im: predictor.detector(im).keypoints, test)
    assert m["nme"] == pytest.approx(metrics["test"]["nme"], abs=1e-4)
    pred = predictor.predict(torch.rand(2, 3, 48, 64, generator=torch.Generator().manual_seed(0)))  # any size
    assert pred.keypoints.shape == (2, 20, 2) and torch.isfinite(pred.keypoints).all()
    with pytest.raises(CheckpointError, match="load the run's model.pt"):
        kpfast.load(out / "checkpoint.pt")


def test_the_source_detector_is_cached_and_the_run_does_not_depend_on_who_trained_it(tmp_path, projection_run):
    """A run that trains its source in-process draws exactly what one reading it from the cache draws."""
    fresh = tmp_path / "cache"
    t0 = time.perf_counter()
    first = kpfast.train.run(tiny(fresh, tmp_path / "a", iterations=2))
    elapsed = time.perf_counter() - t0
    again = kpfast.train.run(tiny(fresh, tmp_path / "b", iterations=2))
    assert first["adaptation"]["source"]["trained_now"] and not again["adaptation"]["source"]["trained_now"]
    stage1 = first["adaptation"]["source"]["seconds_this_run"]
    assert 0 < first["adaptation"]["source"]["training_seconds_this_run"] <= stage1
    assert first["wall_time_s"]["total"] <= elapsed - stage1, "the run's wall time leaves stage 1 out"
    assert _rows(tmp_path / "a") == _rows(tmp_path / "b")
    a, b = load_checkpoint(tmp_path / "a" / "checkpoint.pt"), load_checkpoint(tmp_path / "b" / "checkpoint.pt")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert first["adaptation"]["source"]["sha256"] == again["adaptation"]["source"]["sha256"]


def test_resume_continues_bit_for_bit(cache, tmp_path, monkeypatch, projection_run):
    straight = tmp_path / "straight"
    kpfast.train.run(tiny(cache, straight, iterations=6, checkpoint_every=3))
    original = AdaptationTrainer.train_step

    def crash_at_step_5(self, step):
        if step == 4:
            raise KeyboardInterrupt("simulated crash")
        return original(self, step)

    interrupted = tmp_path / "interrupted"
    monkeypatch.setattr(AdaptationTrainer, "train_step", crash_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        kpfast.train.run(tiny(cache, interrupted, iterations=6, checkpoint_every=3))
    monkeypatch.setattr(AdaptationTrainer, "train_step", original)
    metrics = kpfast.train.run(tiny(cache, interrupted, iterations=6, checkpoint_every=3, resume=True))
    assert metrics["resumed_from"] == 3 and metrics["adaptation"]["source"]["kind"] == "trained"
    a, b = load_checkpoint(straight / "checkpoint.pt"), load_checkpoint(interrupted / "checkpoint.pt")
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for (ka, sa), (kb, sb) in zip(a["optimizer"]["state"].items(), b["optimizer"]["state"].items()):
        for name in sa:
            assert torch.equal(torch.as_tensor(sa[name]), torch.as_tensor(sb[name])), f"optimizer {ka}.{name}"
    assert _rows(straight) == _rows(interrupted)
    straight_metrics = json.loads((straight / "metrics.json").read_text())
    assert metrics["adaptation"]["backward_error"] == straight_metrics["adaptation"]["backward_error"]
    assert metrics["test"]["nme"] == straight_metrics["test"]["nme"]


def _same_run(a: Path, b: Path) -> None:
    """Two finished run folders hold the same weights, optimizer state, log and test metrics."""
    ca, cb = load_checkpoint(a / "checkpoint.pt"), load_checkpoint(b / "checkpoint.pt")
    for k in ca["model"]:
        assert torch.equal(ca["model"][k], cb["model"][k]), k
    ma, mb = load_checkpoint(a / "model.pt")["model"], load_checkpoint(b / "model.pt")["model"]
    assert ma.keys() == mb.keys() and all(torch.equal(ma[k], mb[k]) for k in ma)
    assert _rows(a) == _rows(b)
    ja, jb = (json.loads((f / "metrics.json").read_text()) for f in (a, b))
    assert ja["test"] == jb["test"] and ja["adaptation"]["backward_error"] == jb["adaptation"]["backward_error"]


def test_a_run_interrupted_while_training_its_source_resumes_it_bit_for_bit(tmp_path, monkeypatch):
    """Stage 1 is a kpfast run of its own in the cache: a crash there leaves its checkpoint, and the rerun
    continues the source from it and then adapts exactly as a run that was never interrupted."""
    from kpfast.train import Trainer

    kpfast.train.run(tiny(tmp_path / "cache-a", tmp_path / "straight", iterations=2))
    original = Trainer.train_step

    def crash_in_the_source_at_step_3(self, step):
        if self.cfg.method == "supervised" and step == 2:
            raise KeyboardInterrupt("simulated crash")
        return original(self, step)

    monkeypatch.setattr(Trainer, "train_step", crash_in_the_source_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        kpfast.train.run(tiny(tmp_path / "cache-b", tmp_path / "interrupted", iterations=2))
    monkeypatch.setattr(Trainer, "train_step", original)
    metrics = kpfast.train.run(tiny(tmp_path / "cache-b", tmp_path / "interrupted", iterations=2, resume=True))
    source = Path(metrics["adaptation"]["source"]["path"])
    assert metrics["adaptation"]["source"]["trained_now"]
    assert json.loads((source / "metrics.json").read_text())["resumed_from"] == 2
    straight_source = Path(json.loads((tmp_path / "straight" / "metrics.json").read_text())
                           ["adaptation"]["source"]["path"])
    a, b = load_checkpoint(straight_source / "model.pt")["model"], load_checkpoint(source / "model.pt")["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    _same_run(tmp_path / "straight", tmp_path / "interrupted")


def test_a_run_interrupted_after_its_last_step_refits_the_regressors_on_resume(cache, tmp_path, monkeypatch,
                                                                               projection_run):
    """A crash in stage 3 (after the last checkpoint): the resumed run trains no step, refits the regressors
    from the checkpointed detector and reports what the uninterrupted run reported."""
    from kpfast.train.adaptation import AdaptationEvaluation

    original = AdaptationEvaluation.metrics

    def crash(self):
        raise KeyboardInterrupt("simulated crash")

    monkeypatch.setattr(AdaptationEvaluation, "metrics", crash)
    with pytest.raises(KeyboardInterrupt):
        kpfast.train.run(tiny(cache, tmp_path / "interrupted"))
    monkeypatch.setattr(AdaptationEvaluation, "metrics", original)
    metrics = kpfast.train.run(tiny(cache, tmp_path / "interrupted", resume=True))
    assert metrics["resumed_from"] == 4 and _rows(tmp_path / "interrupted") == _rows(projection_run[0])
    _same_run(projection_run[0], tmp_path / "interrupted")


def test_finetune_trains_every_weight_and_scratch_needs_no_source(cache, tmp_path, projection_run):
    fine = kpfast.train.run(tiny(cache, tmp_path / "finetune", iterations=1, adapt="finetune"))
    scratch = kpfast.train.run(tiny(cache, tmp_path / "scratch", iterations=1, adapt="scratch", source=None))
    random_shots = kpfast.train.run(tiny(cache, tmp_path / "random-shots", iterations=1, without=("kmeans",)))
    assert random_shots["adaptation"]["regressors"]["forward"]["examples"] == 4
    chosen = [load_checkpoint(f / "checkpoint.pt")["labeled"] for f in (projection_run[0], tmp_path / "random-shots")]
    assert chosen[0] != chosen[1], "--without kmeans picks other labelled images for the regressors"
    for m in (fine, scratch):
        assert m["adaptation"]["parameters"]["detector_trained"] == m["adaptation"]["parameters"]["detector"]
    assert fine["adaptation"]["source"]["trained_now"] is False and scratch["adaptation"]["source"] is None
    # the three arms start from the same head and generator; finetune from the core's body, scratch from none
    p = load_checkpoint(projection_run[0] / "checkpoint.pt")["model"]
    f = load_checkpoint(tmp_path / "finetune" / "checkpoint.pt")["model"]
    assert torch.equal(p["detector.down.0.body.0.parametrizations.weight.original"], load_checkpoint(
        Path(fine["adaptation"]["source"]["path"]) / "model.pt")["model"]["down.0.body.0.weight"])
    assert f["detector.down.0.body.0.weight"].shape == p["detector.down.0.body.0.parametrizations.weight.original"].shape


def test_a_run_folder_of_a_trained_detector_is_a_source_and_another_architecture_is_refused(cache, tmp_path,
                                                                                            projection_run):
    sup = tmp_path / "face-supervised"
    kpfast.train.run(TrainConfig.from_preset("tiny", cache_dir=str(cache), out=str(sup), method="supervised",
                                             iterations=1))
    metrics = kpfast.train.run(tiny(cache, tmp_path / "run", iterations=1, source=str(sup)))
    src = metrics["adaptation"]["source"]
    assert src["kind"] == "checkpoint" and src["path"] == str((sup / "model.pt").resolve())
    assert src["test"]["nme"] == json.loads((sup / "metrics.json").read_text())["test"]["nme"]
    with pytest.raises(CheckpointError, match=r"another architecture.*detector_widths"):
        kpfast.train.run(tiny(cache, tmp_path / "other", iterations=1, source=str(sup), detector_widths=(8, 32)))


def test_the_experiment_runner_tables_the_backward_error(tmp_path, projection_run):
    out, metrics = projection_run
    grid = {"name": "toy", "preset": "tiny", "datasets": ["animal"], "seeds": [0],
            "set": {"method": "adaptation", "source": "face"}, "arms": [{"label": "projection"}]}
    path = tmp_path / "grid.json"
    path.write_text(json.dumps(grid))
    (tmp_path / "animal" / "projection" / "seed0").mkdir(parents=True)
    (tmp_path / "animal" / "projection" / "seed0" / "metrics.json").write_text((out / "metrics.json").read_text())
    summary = experiments.summarize(experiments.Grid.load(path), tmp_path)
    arm = summary["datasets"]["animal"]["arms"][0]
    assert arm["extra"]["backward error (%)"]["values"] == [metrics["adaptation"]["backward_error"]["test"]]
    table = experiments.markdown(summary)
    assert "backward error (%)" in table and f"{metrics['adaptation']['backward_error']['test']:.2f}" in table


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_ddp_run_trains_the_source_and_adapts(tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "KPFAST_NO_REEXEC": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), "-m", "kpfast.train", "--preset", "tiny", "--method", "adaptation",
           "--source", "face", "--dataset", "animal", "--out", str(out), "--cache-dir", str(tmp_path / "cache"),
           "--iterations", "2", "--set", "checkpoint_every=2", "--set", "adapt_generator_widths=8,16,32",
           "--set", "adapt_generator_blocks=1"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["adaptation"]["source"]["trained_now"]
    source = json.loads((Path(metrics["adaptation"]["source"]["path"]) / "metrics.json").read_text())
    assert source["world_size"] == 2, "both processes trained the source detector"
    ckpt = load_checkpoint(out / "checkpoint.pt")
    assert ckpt["world_size"] == 2 and not torch.equal(ckpt["rng"][0]["streams"]["transforms"],
                                                       ckpt["rng"][1]["streams"]["transforms"])
