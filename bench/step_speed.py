"""Seconds per training step of a preset, in this checkout or side by side with another one.

    python bench/step_speed.py                              # this checkout, demo preset
    python bench/step_speed.py --against ../kpfast-49420bb  # alternate with another checkout, same run
    python bench/step_speed.py --preset paper --steps 5

Each measurement is a fresh process that builds the preset's trainer (procedural
faces, the default ops), runs ``--warmup`` steps, then times ``--steps`` steps of
``Trainer.train_step`` past the 3D loss's random-partner warm-up. With
``--against`` the two checkouts alternate (A B A B ...) for ``--rounds`` rounds,
so both see the same machine load, and the ratio is taken round by round; the
median ratio is the speed-up. The other checkout must be importable with its own
compiled extension: its own ``.venv`` (``python -m venv .venv && pip install
torch==2.13.0 && pip install -e .`` in it) is used when present. Results go to
``bench/results/step-speed-<preset>.json`` with the command and both commits.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

PROBE = r"""
import json, sys, time, torch
from kpfast.train import TrainConfig, Trainer
preset, warmup, steps, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
torch.set_num_threads(threads)
kw = dict(out=None, progress=False, train_size=256, test_size=16)
try:
    cfg = TrainConfig.from_preset(preset, diagnostics_every=0, **kw)
except TypeError:  # a checkout from before the diagnostics
    cfg = TrainConfig.from_preset(preset, **kw)
tr = Trainer(cfg)
start = cfg.random_partner_iterations
for s in range(start, start + warmup):
    tr.train_step(s)
t0 = time.perf_counter()
for s in range(start + warmup, start + warmup + steps):
    tr.train_step(s)
print(json.dumps({"seconds_per_step": (time.perf_counter() - t0) / steps}))
"""


def commit(path: Path) -> str:
    r = subprocess.run(["git", "rev-parse", "HEAD"], cwd=path, capture_output=True, text=True)
    return r.stdout.strip() or "unknown"


def python_of(checkout: Path) -> str:
    """The checkout's own virtual environment's interpreter, or this one."""
    own = checkout / ".venv" / "bin" / "python"
    return str(own) if own.is_file() else sys.executable


def measure(checkout: Path, preset: str, warmup: int, steps: int, threads: int) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
    env.pop("PYTHONPATH", None)
    r = subprocess.run([python_of(checkout), "-c", PROBE, preset, str(warmup), str(steps), str(threads)],
                       cwd=checkout, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise RuntimeError(f"{checkout}: the step probe failed:\n{r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])["seconds_per_step"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="demo")
    p.add_argument("--against", type=Path, default=None, help="another checkout to time in the same run")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--out", type=Path, default=HERE / "results")
    args = p.parse_args(argv)
    sides = {"this": ROOT} | ({"other": args.against.resolve()} if args.against else {})
    times = {k: [] for k in sides}
    load = [os.getloadavg()[0]]
    for r in range(args.rounds):
        for name, path in sides.items():
            t = measure(path, args.preset, args.warmup, args.steps, args.threads)
            times[name].append(t)
            print(f"round {r + 1}/{args.rounds}: {name} ({path.name}) {1e3 * t:.1f} ms/step", flush=True)
        load.append(os.getloadavg()[0])
    command = ["python", "bench/step_speed.py", *(argv if argv is not None else sys.argv[1:])]
    if args.against:  # the other checkout by its folder's name: nothing in a result points outside the repository
        command = [f"../{args.against.resolve().name}" if c == str(args.against) else c for c in command]
    result = {"command": " ".join(command), "preset": args.preset, "threads": args.threads,
              "steps": args.steps, "rounds": args.rounds, "cores": os.cpu_count(),
              "load_average_1min": load,  # other work on the machine while it ran: a ratio is only as good as this
              "checkouts": {k: {"folder": v.name, "commit": commit(v), "seconds_per_step": times[k],
                                "median_s": statistics.median(times[k])} for k, v in sides.items()}}
    if args.against:
        ratios = [o / t for o, t in zip(times["other"], times["this"])]
        result["speedup"] = {"per_round": ratios, "median": statistics.median(ratios)}
        print(f"speed-up of this checkout over {args.against}: {statistics.median(ratios):.2f}x "
              f"(rounds: {', '.join(f'{x:.2f}' for x in ratios)})")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"step-speed-{args.preset}.json"
    path.write_text(json.dumps(result, indent=1))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
