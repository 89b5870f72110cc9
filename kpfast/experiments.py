"""The experiment runner: a grid of methods x ablations x datasets x seeds, run and summarized.

``python -m kpfast.experiments GRID.json`` trains every run of the grid that has
not finished yet (``--jobs`` at a time, each with ``--threads`` CPU threads; an
interrupted run continues from its checkpoint, a finished one is skipped), copies
each run's ``metrics.json`` and ``log.csv`` into the results folder, and writes
there ``summary.json``, ``summary.md`` (one table per dataset: mean +- sd over
seeds and every seed's number, the image-blind reference rows, and each arm's
difference to the full method) and ``summary.png``. ``--report`` rebuilds the
summary from the results folder alone (nothing is trained), which is how the
README's results table is made (``python bench/readme.py``).

A grid file (JSON)::

    {"name": "demo", "preset": "demo", "datasets": ["face", "animal"],
     "seeds": [100, 101, 102],
     "set": {"train_size": 2000},
     "arms": [{"label": "full"},
              {"label": "supervised", "method": "supervised"},
              {"label": "without recon", "without": ["recon"]}]}

Each run is ``TrainConfig.from_preset(preset, dataset=d, seed=s, data_seed=s,
**set, **arm)``: a seed draws both the procedural data and the training's random
streams, so the spread over seeds includes the data's.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .config import RUN_FIELDS, TrainConfig

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Run:
    """One cell of a grid: an arm on a dataset with a seed."""

    dataset: str
    arm: str
    seed: int
    config: TrainConfig

    @property
    def key(self) -> str:
        return f"{self.dataset}/{slug(self.arm)}/seed{self.seed}"


def slug(label: str) -> str:
    """``"without recon, geo3d"`` -> ``"without-recon-geo3d"``."""
    return re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-")


@dataclass
class Grid:
    """A grid file (see the module docstring)."""

    name: str
    preset: str
    datasets: list
    seeds: list
    arms: list
    set: dict
    path: Optional[Path] = None
    description: str = ""

    @classmethod
    def load(cls, path) -> "Grid":
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: cannot read the grid file ({e})") from None
        missing = [k for k in ("name", "preset", "datasets", "seeds", "arms") if k not in d]
        if missing:
            raise ValueError(f"{path}: the grid lacks {missing}")
        unknown = set(d) - {"name", "preset", "datasets", "seeds", "arms", "set", "description"}
        if unknown:
            raise ValueError(f"{path}: unknown grid field(s) {sorted(unknown)}")
        labels = [a.get("label") for a in d["arms"]]
        if None in labels or len(set(map(slug, labels))) != len(labels):
            raise ValueError(f"{path}: every arm needs a distinct 'label', got {labels}")
        grid = cls(d["name"], d["preset"], list(d["datasets"]), [int(s) for s in d["seeds"]], list(d["arms"]),
                   dict(d.get("set", {})), path, d.get("description", ""))
        grid.runs()  # validates every config now, naming the arm
        return grid

    def runs(self, out_root: Optional[Path] = None) -> list[Run]:
        out = []
        for dataset in self.datasets:
            for arm in self.arms:
                fields = {k: (tuple(v) if isinstance(v, list) else v) for k, v in arm.items() if k != "label"}
                for seed in self.seeds:
                    folder = (out_root or Path("runs")) / self.name / dataset / slug(arm["label"]) / f"seed{seed}"
                    try:
                        cfg = TrainConfig.from_preset(
                            self.preset, **{k: (tuple(v) if isinstance(v, list) else v) for k, v in self.set.items()},
                            **fields, dataset=dataset, seed=seed, data_seed=seed, out=str(folder), progress=False,
                            resume=True)
                    except (TypeError, ValueError) as e:
                        raise ValueError(f"{self.path}: arm {arm['label']!r} on {dataset}: {e}") from None
                    out.append(Run(dataset, arm["label"], seed, cfg))
        return out


def _science(config: dict) -> dict:
    return {k: v for k, v in config.items() if k not in RUN_FIELDS}


def finished(run: Run) -> bool:
    """Whether ``run``'s folder holds a finished run of exactly its config."""
    path = Path(run.config.out) / "metrics.json"
    if not path.is_file():
        return False
    try:
        done = json.loads(path.read_text())["config"]
    except (OSError, ValueError, KeyError):
        return False
    return _science(TrainConfig.from_dict(done).to_dict()) == _science(run.config.to_dict())


def execute(runs: list[Run], *, jobs: int, threads: int, progress: bool = True) -> list[tuple[Run, int]]:
    """Train ``runs`` in subprocesses, ``jobs`` at a time; returns ``(run, exit status)`` per run.

    Each writes ``train.log`` (its output) into its folder and continues from its
    checkpoint when one is there.
    """
    from .train.cli import argv_for

    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    pending, active, results = list(runs), [], []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(runs), desc="kpfast experiments", unit="run", dynamic_ncols=True)
    try:
        while pending or active:
            while pending and len(active) < jobs:
                run = pending.pop(0)
                folder = Path(run.config.out)
                folder.mkdir(parents=True, exist_ok=True)
                log = open(folder / "train.log", "a")
                cmd = [sys.executable, "-m", "kpfast.train", *argv_for(run.config.to_dict()), "--resume",
                       "--no-progress"]
                active.append((run, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), log,
                               time.perf_counter()))
            time.sleep(0.5)
            for item in list(active):
                run, proc, log, t0 = item
                if proc.poll() is None:
                    continue
                log.close()
                active.remove(item)
                results.append((run, proc.returncode))
                msg = f"{run.key}: " + (_headline(run) if proc.returncode == 0 else
                                        f"FAILED (exit {proc.returncode}; see {run.config.out}/train.log)")
                msg += f" ({time.perf_counter() - t0:.0f} s)"
                if bar is not None:
                    bar.update(1)
                    bar.write(msg)
                else:
                    print(msg, flush=True)
    finally:
        for run, proc, log, _ in active:
            proc.terminate()
            log.close()
        if bar is not None:
            bar.close()
    return results


def _headline(run: Run) -> str:
    m = json.loads((Path(run.config.out) / "metrics.json").read_text())["test"]
    return f"test NME {m['nme']:.2f} %, PCK@0.1 {m['pck@0.1']:.1f} %, spread {m['spread']:.2f}"


def collect(grid: Grid, runs: list[Run], results: Path) -> None:
    """Copy each finished run's ``metrics.json`` and ``log.csv`` to ``results/<run key>/``."""
    for run in runs:
        src = Path(run.config.out)
        if not finished(run):
            continue
        dst = results / run.key
        dst.mkdir(parents=True, exist_ok=True)
        if (src / "log.csv").is_file():
            shutil.copyfile(src / "log.csv", dst / "log.csv")
        if (src / "metrics.json").is_file():
            (dst / "metrics.json").write_text(json.dumps(_portable(json.loads((src / "metrics.json").read_text()), grid, run),
                                                         indent=1))
    if grid.path is not None and grid.path.resolve() != (results / "grid.json").resolve():
        shutil.copyfile(grid.path, results / "grid.json")


def _portable(metrics: dict, grid: "Grid", run: Run) -> dict:
    """A run's metrics with its run folder named as under the default ``--runs runs``, not as the
    absolute path of the machine that trained it (results are committed; nothing in them should
    point outside the repository)."""
    if "config" in metrics and "out" in metrics["config"]:
        metrics = {**metrics, "config": {**metrics["config"], "out": f"runs/{grid.name}/{run.key}"}}
    return metrics


# -- the summary -------------------------------------------------------------------------------------------------
METRICS = (("nme", "test NME (%)", 2), ("pck@0.1", "PCK@0.1 (%)", 1), ("spread", "spread", 2))
EXTRA_KEY = "extra_metrics"
"""A method's own test numbers in its ``metrics.json`` (``{name: value}``, e.g. the adaptation's backward
error): summarized like the others, one more column each in the tables of the datasets where an arm has them."""


def _stats(values: list) -> dict:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    return {"mean": statistics.fmean(vals) if vals else None, "sd": statistics.stdev(vals) if len(vals) > 1 else None,
            "n": len(vals), "values": values}


def summarize(grid: Grid, results: Path) -> dict:
    """``summary.json``'s content from the run folders under ``results``."""
    out = {"grid": grid.name, "preset": grid.preset, "description": grid.description, "seeds": grid.seeds,
           "set": grid.set, "datasets": {}}
    for dataset in grid.datasets:
        arms, reference, info = [], {"mean_shape": {}, "fitted_mean_shape": {}}, {}
        for arm in grid.arms:
            label = arm["label"]
            metrics = []
            for seed in grid.seeds:
                p = results / dataset / slug(label) / f"seed{seed}" / "metrics.json"
                metrics.append(json.loads(p.read_text()) if p.is_file() else None)
            done = [m for m in metrics if m is not None]
            row = {"label": label, "seeds": [s for s, m in zip(grid.seeds, metrics) if m is not None],
                   "missing": [s for s, m in zip(grid.seeds, metrics) if m is None]}
            for key, _, _ in METRICS:
                row[key] = _stats([m["test"].get(key) for m in done])
            row["labeled_nme"] = _stats([m["labeled_fit"]["nme"] for m in done])
            extra = dict.fromkeys(k for m in done for k in m.get(EXTRA_KEY, {}))
            row["extra"] = {k: _stats([m.get(EXTRA_KEY, {}).get(k) for m in done]) for k in extra}
            row["minutes"] = _stats([m["wall_time_s"]["total"] / 60 for m in done])
            if done:
                from .train.cli import command_line

                row["command"] = command_line({**done[0]["config"], "out": f"runs/{slug(label)}"})
                if label == "full" or not info:
                    info = {k: done[0][k] for k in ("shots", "keypoints", "train_images", "test_images", "iterations",
                                                    "perceptual")}
                    info["environment"] = {k: done[0]["environment"].get(k) for k in
                                           ("device", "torch", "cpu_threads", "git_commit")}
                if label == "full" or not reference["mean_shape"]:  # the full method's, else the first arm's
                    for name in reference:
                        for key, _, _ in METRICS:
                            reference[name][key] = _stats([m["reference"][name].get(key) for m in done])
            arms.append(row)
        full = next((a for a in arms if a["label"] == "full"), None)
        for a in arms:
            a["vs_full"] = _versus(a, full) if full is not None and a is not full else None
        out["datasets"][dataset] = {"arms": arms, "reference": reference, "info": info}
    return out


def _versus(arm: dict, full: dict) -> Optional[dict]:
    """NME and PCK of ``arm`` against the full method: differences of the means, and whether the
    arm is worse by more than one standard deviation (the larger of the two arms' sds)."""
    out = {}
    for key, worse_sign in (("nme", 1), ("pck@0.1", -1)):
        a, f = arm[key], full[key]
        if a["mean"] is None or f["mean"] is None:
            return None
        diff = a["mean"] - f["mean"]
        sd = max(a["sd"] or 0.0, f["sd"] or 0.0)
        out[key] = {"difference": diff, "sd": sd, "worse_by_more_than_1sd": worse_sign * diff > sd}
    out["nme_relative"] = 100.0 * (1 - full["nme"]["mean"] / arm["nme"]["mean"]) if arm["nme"]["mean"] else None
    out["nme_paired"] = _paired(arm, full, "nme")
    return out


def _paired(arm: dict, full: dict, key: str) -> dict:
    """Seed by seed ``arm - full`` of ``key``: a seed draws the same data, initial weights and random
    streams in both arms (kpfast/train/streams.py), so its difference is the term's own effect
    plus training noise. ``worse``: how many of the seeds the arm lost."""
    mine = dict(zip(arm["seeds"], arm[key]["values"]))
    theirs = dict(zip(full["seeds"], full[key]["values"]))
    seeds = [s for s in arm["seeds"] if s in theirs and mine[s] is not None and theirs[s] is not None]
    diffs = [mine[s] - theirs[s] for s in seeds]
    return {"seeds": seeds, "differences": diffs, **{k: v for k, v in _stats(diffs).items() if k != "values"},
            "worse": sum(d > 0 for d in diffs) if key == "nme" else sum(d < 0 for d in diffs)}


def _fmt(stats: dict, digits: int) -> str:
    if stats["mean"] is None:
        return "—"
    sd = f" ± {stats['sd']:.{digits}f}" if stats["sd"] is not None else ""
    return f"{stats['mean']:.{digits}f}{sd}"


def _seeds(stats: dict, digits: int) -> str:
    return ", ".join("—" if v is None else f"{v:.{digits}f}" for v in stats["values"])


def markdown(summary: dict) -> str:
    """The tables of ``summary.md`` (and the README's results block)."""
    lines = []
    for dataset, d in summary["datasets"].items():
        info = d["info"]
        extra = list(dict.fromkeys(k for a in d["arms"] for k in a.get("extra", {})))
        lines += [f"**{dataset}** — {info.get('shots')} shots, {info.get('keypoints')} keypoints, "
                  f"{info.get('train_images')} training / {info.get('test_images')} test images, "
                  f"{info.get('iterations')} iterations, seeds {', '.join(map(str, summary['seeds']))}", "",
                  "| arm | test NME (%) | PCK@0.1 (%) | spread | NME per seed | vs full: NME, PCK | "
                  "NME − full, seed by seed | " + "".join(f"{k} | " for k in extra) + "minutes |",
                  "|---|---|---|---|---|---|---|---|" + "---|" * len(extra)]
        for a in d["arms"]:
            vs = a["vs_full"]
            if vs is None:
                cmp_ = ""
            else:
                mark = lambda k: " (worse > 1 sd)" if vs[k]["worse_by_more_than_1sd"] else ""  # noqa: E731
                cmp_ = f"{vs['nme']['difference']:+.2f}{mark('nme')}, {vs['pck@0.1']['difference']:+.1f}{mark('pck@0.1')}"
            paired = (vs or {}).get("nme_paired")
            pair = (f"{', '.join(f'{x:+.2f}' for x in paired['differences'])} (worse on {paired['worse']} of "
                    f"{len(paired['differences'])})" if paired and paired["differences"] else "")
            missing = f" (missing seeds {a['missing']})" if a["missing"] else ""
            cells = "".join(f"{_fmt(a['extra'][k], 2) if k in a.get('extra', {}) else '—'} | " for k in extra)
            lines.append(f"| {a['label']}{missing} | {_fmt(a['nme'], 2)} | {_fmt(a['pck@0.1'], 1)} | "
                         f"{_fmt(a['spread'], 2)} | {_seeds(a['nme'], 2)} | {cmp_} | {pair} | {cells}{_fmt(a['minutes'], 1)} |")
        names = {"mean_shape": "reference: mean labelled shape (sees no image)",
                 "fitted_mean_shape": "reference: mean shape, oracle similarity placement"}
        for key, label in names.items():
            r = d["reference"][key]
            if r:
                lines.append(f"| *{label}* | {_fmt(r['nme'], 2)} | {_fmt(r['pck@0.1'], 1)} | {_fmt(r['spread'], 2)} | "
                             f"{_seeds(r['nme'], 2)} | | | " + "| " * len(extra) + "|")
        lines.append("")
    return "\n".join(lines)


def plot(summary: dict, path: Path) -> Optional[Path]:
    """``summary.png``: per dataset, NME and PCK of every arm, each seed a dot, mean and sd a bar."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("kpfast experiments: matplotlib is not installed, no plot", file=sys.stderr)
        return None
    datasets = list(summary["datasets"])
    fig, axes = plt.subplots(2, len(datasets), figsize=(1.2 + 0.9 * max(len(d["arms"]) for d in
                                                                        summary["datasets"].values()) * len(datasets),
                                                          7), squeeze=False)
    for col, dataset in enumerate(datasets):
        d = summary["datasets"][dataset]
        labels = [a["label"] for a in d["arms"]]
        for row, (key, title, _) in enumerate(METRICS[:2]):
            ax = axes[row][col]
            for i, a in enumerate(d["arms"]):
                s = a[key]
                colour = "tab:blue" if a["label"] == "full" else "tab:gray"
                if s["mean"] is not None:
                    ax.bar(i, s["mean"], color=colour, alpha=0.35)
                    ax.errorbar(i, s["mean"], yerr=s["sd"] or 0, color=colour, capsize=4)
                vals = [v for v in s["values"] if v is not None]
                ax.scatter([i] * len(vals), vals, color=colour, s=14, zorder=3)
            for name, style in (("mean_shape", ":"), ("fitted_mean_shape", "--")):
                r = d["reference"][name].get(key) if d["reference"][name] else None
                if r and r["mean"] is not None:
                    ax.axhline(r["mean"], color="tab:red", linestyle=style, linewidth=1,
                               label={"mean_shape": "mean shape", "fitted_mean_shape": "oracle-placed mean shape"}[name])
            ax.set_xticks(range(len(labels)))
            ax.set_xticklabels(labels, rotation=35, ha="right", fontsize=8)
            ax.set_title(f"{dataset}: {title}" + (" (lower is better)" if key == "nme" else " (higher is better)"),
                         fontsize=9)
            if col == 0 and row == 0:
                ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_summary(grid: Grid, results: Path) -> dict:
    summary = summarize(grid, results)
    (results / "summary.json").write_text(json.dumps(summary, indent=1))
    (results / "summary.md").write_text(f"# {grid.name}\n\n{grid.description}\n\n{markdown(summary)}")
    plot(summary, results / "summary.png")
    return summary


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m kpfast.experiments", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("grid", help="grid file (JSON), e.g. docs/results/demo/grid.json")
    p.add_argument("--runs", default="runs", help="where the run folders go (default: runs/)")
    p.add_argument("--results", default=None,
                   help="where metrics, logs and the summary go (default: the grid file's folder)")
    p.add_argument("--jobs", type=int, default=None, help="runs at a time (default: cores // threads)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads per run (default 1)")
    p.add_argument("--only", action="append", default=[], help="run only keys matching this regex (repeatable)")
    p.add_argument("--dry-run", action="store_true", help="list what would run")
    p.add_argument("--report", action="store_true", help="only rebuild the summary from the results folder")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    try:
        grid = Grid.load(args.grid)
    except ValueError as e:
        p.error(str(e))
    results = Path(args.results) if args.results else Path(args.grid).resolve().parent
    results.mkdir(parents=True, exist_ok=True)
    if not args.report:
        runs = grid.runs(Path(args.runs))
        if args.only:
            runs = [r for r in runs if any(re.search(o, r.key) for o in args.only)]
        todo = [r for r in runs if not finished(r)]
        print(f"kpfast experiments: {grid.name}: {len(runs)} runs, {len(runs) - len(todo)} finished, "
              f"{len(todo)} to train", flush=True)
        if args.dry_run:
            for r in todo:
                print("  " + r.key)
            return 0
        jobs = args.jobs or max(1, (os.cpu_count() or 1) // args.threads)
        failed = [r for r, code in execute(todo, jobs=jobs, threads=args.threads, progress=not args.no_progress)
                  if code != 0]
        collect(grid, runs, results)
        if failed:
            print(f"kpfast experiments: {len(failed)} run(s) failed: {[r.key for r in failed]}", file=sys.stderr)
    summary = write_summary(grid, results)
    print(markdown(summary))
    print(f"kpfast experiments: wrote {results}/summary.json, summary.md, summary.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
