"""``python -m kpfast.train``: a smoke run and argument errors."""

import json
import os
import subprocess
import sys

import pytest

import shlex

from kpfast.train import TrainConfig
from kpfast.train.cli import command_line, config_from_args, main, parser
from kpfast.config import RUN_FIELDS


def _run(args, tmp_path, **kw):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "kpfast.train", *args], env=env, capture_output=True, text=True,
                          timeout=240, cwd=tmp_path, **kw)


def test_cli_smoke_run_writes_the_results(tmp_path):
    r = _run(["--preset", "tiny", "--out", "run", "--cache-dir", "cache", "--iterations", "2",
              "--without", "geo3d", "--set", "w_geo2d=0.5"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert m["iterations"] == 2 and m["without"] == ["geo3d"] and m["config"]["w_geo2d"] == 0.5
    assert "test NME" in r.stdout + r.stderr
    assert (tmp_path / "run" / "predictions.png").is_file()


@pytest.mark.parametrize("argv,message", [
    (["--method", "supervised", "--without", "geo2d"], "only applies to method 'full'"),
    (["--set", "nonsense=1"], "FIELD=VALUE"),
    (["--set", "progress=maybe"], "true/false"),
    (["--method", "fancy"], "invalid choice"),
])
def test_cli_rejects_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--preset", "tiny", "--out", "run", *argv])
    assert e.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("argv,field,value", [
    (["--set", "detector_widths=8,16,32"], "detector_widths", (8, 16, 32)),
    (["--set", "batch_labeled=none"], "batch_labeled", None),
    (["--set", "progress=false"], "progress", False),
    (["--shots", "3", "--ops", "reference"], "ops", "reference"),
    (["--without", "kmeans", "--without", "recon"], "without", ("recon", "kmeans")),
])
def test_cli_options_map_onto_the_config(argv, field, value):
    cfg = config_from_args(parser().parse_args(["--preset", "tiny", "--out", "x", *argv]))
    assert getattr(cfg, field) == value


@pytest.mark.parametrize("preset,changes", [
    ("demo", {}),
    ("demo", {"method": "supervised", "progress": False}),
    ("demo", {"without": ("recon", "geo3d"), "lr": 5e-4, "detector_widths": (16, 32, 64), "batch_labeled": 4}),
    ("paper", {"shots": 5, "w_geo3d": 0.2, "betas": (0.8, 0.9), "dataset": "car", "device": "cpu"}),
    ("demo", {"method": "moskvyak", "without": ("sc", "ti"), "w_te": 10.0, "heatmap_readout": "soft_argmax"}),
])
def test_command_line_reproduces_the_config(preset, changes):
    cfg = TrainConfig.from_preset(preset, out="/somewhere/run-a", **changes)
    argv = shlex.split(command_line(cfg.to_dict()))
    assert argv[:3] == ["python", "-m", "kpfast.train"] and argv[-2:] == ["--out", "runs/run-a"]
    again = config_from_args(parser().parse_args(argv[3:])).to_dict()
    want = cfg.to_dict()
    assert {k: v for k, v in again.items() if k not in RUN_FIELDS} == \
        {k: v for k, v in want.items() if k not in RUN_FIELDS}
