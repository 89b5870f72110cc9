"""The benchmark entry point runs end to end (tiny shapes) and writes its table, JSON and plot."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_bench_quick_runs_every_op(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "run.py"), "--quick", "--budget", "0.05", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    [result] = list(tmp_path.glob("*.json"))
    data = json.loads(result.read_text())
    ops = {r["op"] for r in data["results"]}
    assert {"edge_map", "soft_argmax", "umeyama"} <= ops
    fused = [r for r in data["results"] if r["provider"] == "fused"]
    assert fused and all(r["status"] == "ok" and r["forward+backward"]["median_ms"] > 0 for r in fused)
    assert (tmp_path / result.name.replace(".json", ".md")).exists()
