"""The experiment runner: a grid runs once, resumes, skips what is finished, and summarizes over seeds."""

import json
import statistics

import pytest

from kpfast import experiments


def _grid(tmp_path, cache):
    grid = {"name": "toy", "preset": "tiny", "datasets": ["face"], "seeds": [1, 2],
            "set": {"iterations": 2, "cache_dir": cache},
            "arms": [{"label": "full"}, {"label": "supervised", "method": "supervised"}]}
    path = tmp_path / "results" / "grid.json"
    path.parent.mkdir()
    path.write_text(json.dumps(grid))
    return path


def test_a_grid_runs_skips_finished_runs_and_summarizes_over_seeds(tmp_path, capsys):
    path = _grid(tmp_path, str(tmp_path / "cache"))
    args = [str(path), "--runs", str(tmp_path / "runs"), "--jobs", "2", "--no-progress"]
    assert experiments.main(args) == 0
    out = capsys.readouterr().out
    assert "4 runs, 0 finished, 4 to train" in out
    summary = json.loads((path.parent / "summary.json").read_text())
    arms = {a["label"]: a for a in summary["datasets"]["face"]["arms"]}
    for label in ("full", "supervised"):
        nmes = [json.loads((path.parent / "face" / label / f"seed{s}" / "metrics.json").read_text())["test"]["nme"]
                for s in (1, 2)]
        assert arms[label]["nme"]["values"] == nmes
        assert arms[label]["nme"]["mean"] == pytest.approx(statistics.fmean(nmes))
        assert arms[label]["nme"]["sd"] == pytest.approx(statistics.stdev(nmes))
        assert (path.parent / "face" / label / "seed1" / "log.csv").is_file()
        copied = json.loads((path.parent / "face" / label / "seed1" / "metrics.json").read_text())
        assert copied["config"]["out"] == f"runs/toy/face/{label}/seed1"  # not this machine's path
    assert arms["supervised"]["vs_full"]["nme"]["difference"] == pytest.approx(
        arms["supervised"]["nme"]["mean"] - arms["full"]["nme"]["mean"])
    assert summary["datasets"]["face"]["reference"]["fitted_mean_shape"]["nme"]["n"] == 2
    assert (path.parent / "summary.png").is_file() and "| full |" in (path.parent / "summary.md").read_text()

    assert experiments.main(args) == 0  # nothing left to train
    assert "4 runs, 4 finished, 0 to train" in capsys.readouterr().out
    # a changed setting is a different run: retrained, not skipped
    changed = json.loads(path.read_text())
    changed["set"]["lr"] = 5e-4
    path.write_text(json.dumps(changed))
    assert experiments.main(args + ["--dry-run"]) == 0
    assert "4 runs, 0 finished, 4 to train" in capsys.readouterr().out


def test_bad_grids_are_rejected_naming_the_file_and_arm(tmp_path):
    path = tmp_path / "grid.json"
    path.write_text(json.dumps({"name": "x", "preset": "tiny", "datasets": ["face"], "seeds": [0],
                                "arms": [{"label": "full", "method": "nonsense"}]}))
    with pytest.raises(ValueError, match=r"grid.json: arm 'full' on face: .*method"):
        experiments.Grid.load(path)
    path.write_text(json.dumps({"name": "x", "preset": "tiny", "datasets": ["face"], "seeds": [0],
                                "arms": [{"label": "a"}, {"label": "A"}]}))
    with pytest.raises(ValueError, match="distinct"):
        experiments.Grid.load(path)


def _metrics(nme, extra=None):
    from kpfast.train import TrainConfig

    test = {"nme": nme, "pck@0.1": 50.0, "spread": 1.0}
    m = {"test": test, "labeled_fit": {"nme": 1.0}, "wall_time_s": {"total": 60.0},
         "config": TrainConfig.from_preset("tiny").to_dict(), "shots": 4, "keypoints": 68, "train_images": 64,
         "test_images": 16, "iterations": 4, "perceptual": "none",
         "environment": {"device": "cpu", "torch": "x", "cpu_threads": 1, "git_commit": "x"},
         "reference": {"mean_shape": dict(test, nme=nme + 10), "fitted_mean_shape": dict(test, nme=nme + 5)}}
    return {**m, **({experiments.EXTRA_KEY: extra} if extra is not None else {})}


def test_a_methods_extra_metrics_get_columns_and_a_grid_without_full_takes_the_first_arms_reference(tmp_path):
    path = tmp_path / "grid.json"
    path.write_text(json.dumps({"name": "x", "preset": "tiny", "datasets": ["face"], "seeds": [0, 1],
                                "arms": [{"label": "a"}, {"label": "b", "method": "supervised"}]}))
    runs = {("a", 0): _metrics(20.0, {"backward (%)": 3.0}), ("a", 1): _metrics(22.0, {"backward (%)": 5.0}),
            ("b", 0): _metrics(30.0), ("b", 1): _metrics(32.0)}
    for (label, seed), m in runs.items():
        (tmp_path / "face" / label / f"seed{seed}").mkdir(parents=True)
        (tmp_path / "face" / label / f"seed{seed}" / "metrics.json").write_text(json.dumps(m))
    summary = experiments.summarize(experiments.Grid.load(path), tmp_path)
    arms = {a["label"]: a for a in summary["datasets"]["face"]["arms"]}
    assert arms["a"]["extra"]["backward (%)"]["mean"] == 4.0 and arms["b"]["extra"] == {}
    assert summary["datasets"]["face"]["reference"]["mean_shape"]["nme"]["values"] == [30.0, 32.0]  # arm a's
    rows = {line.split(" | ")[0]: line for line in experiments.markdown(summary).splitlines()}
    assert "backward (%) | minutes |" in rows["| arm"]
    assert rows["| a"].endswith("| 4.00 ± 1.41 | 1.0 ± 0.0 |") and rows["| b"].endswith("| — | 1.0 ± 0.0 |")
    assert rows["| *reference: mean labelled shape (sees no image)*"].count("|") == rows["| arm"].count("|")


def test_paired_differences_pair_seeds_and_count_the_seeds_an_arm_lost():
    def arm(seeds, nmes):
        return {"seeds": seeds, "nme": experiments._stats(nmes)}

    full = arm([100, 101, 102], [30.0, 40.0, 35.0])
    ablation = arm([100, 102], [31.0, 34.0])  # seed 101 missing: paired on the seeds both have
    paired = experiments._paired(ablation, full, "nme")
    assert paired["seeds"] == [100, 102]
    assert paired["differences"] == pytest.approx([1.0, -1.0])
    assert paired["worse"] == 1 and paired["mean"] == pytest.approx(0.0) and paired["n"] == 2
    # the unpaired comparison of the means would mix in seed 101's data: 32.5 vs 35.0
    assert ablation["nme"]["mean"] - full["nme"]["mean"] == pytest.approx(-2.5)
