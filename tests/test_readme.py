"""The README stays true: its Python examples run and its result numbers come from committed result files."""

import re
import subprocess
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
BLOCKS = re.findall(r"```python\n(.*?)```", README, flags=re.S)


def test_readme_has_python_examples():
    assert len(BLOCKS) >= 2


def test_readme_python_examples_run(tmp_path, monkeypatch):
    monkeypatch.setenv("KPFAST_CACHE", str(tmp_path / "cache"))  # the data example generates into a fresh cache
    monkeypatch.chdir(tmp_path)  # the training example writes runs/tiny
    namespace: dict = {}
    for block in BLOCKS:
        exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102 - the README's own code


def test_readme_result_blocks_match_committed_results():
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "readme.py"), "--check"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "<!-- test-command -->" in ci and "<!-- test-command -->" in README


def test_main_command_is_the_full_arm_of_the_committed_demo_grid():
    """The README's main job is the demo grid's full arm on faces, seed aside: each committed run's
    command, with its seed and data seed removed, is the main command."""
    import json

    from kpfast.train.cli import command_line

    main = re.search(r"<!-- main-command -->\n```bash\n(.*?)\n```", README).group(1)
    demo = ROOT / "docs" / "results" / "demo"
    grid = json.loads((demo / "grid.json").read_text())
    assert grid["preset"] == "demo" and "face" in grid["datasets"] and {"label": "full"} in grid["arms"]
    runs = sorted((demo / "face" / "full").glob("seed*/metrics.json"))
    assert len(runs) >= 3, runs
    for path in runs:
        m = json.loads(path.read_text())
        seed = m["config"]["seed"]
        assert m["method_label"] == "full" and m["config"]["data_seed"] == seed
        cmd = command_line({**m["config"], "out": "runs/demo"})
        cmd = cmd.replace(f" --set data_seed={seed}", "").replace(f" --seed {seed}", "")
        assert main.endswith(cmd), (main, cmd)


def test_gpu_check_command_names_real_marks_ops_and_providers():
    """The documented GPU check: `pytest -m gpu` (a declared mark) and a bench run of existing ops and providers."""
    check = re.search(r"<!-- gpu-check -->\n```bash\n(.*?)\n```", README).group(1)
    tests, bench = check.split(" && ")
    assert tests == "python -m pytest -m gpu" and '"gpu:' in (ROOT / "pyproject.toml").read_text()
    args = dict(re.findall(r"--(\w+) (\S+)", bench))
    assert bench.startswith("python bench/run.py ")
    ops = args["ops"].split(",")
    assert all((ROOT / "bench" / f"{op}.py").exists() for op in ops)
    assert f"bench/results/<gpu>-{'+'.join(ops)}.json" in README  # where bench/run.py writes a subset of ops
    assert set(args["providers"].split(",")) <= {"fused", "reference", "torch.compile(reference)"}
