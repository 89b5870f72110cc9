"""Write measured results into README.md: benchmarks and the training demo.

    python bench/readme.py          # rewrite both blocks from the committed result files
    python bench/readme.py --check  # exit 1 if a README block is stale

Benchmarks come from ``bench/results/*.json`` (written by ``bench/run.py``), the
demo table from ``docs/results/demo/*/metrics.json`` (written by
``python -m kpfast.train --out ...``). The README's numbers come only from
committed result files, never by hand.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
README = ROOT / "README.md"
START, END = "<!-- bench:start -->", "<!-- bench:end -->"
DEMO_START, DEMO_END = "<!-- demo:start -->", "<!-- demo:end -->"
DEMO_RESULTS = ROOT / "docs" / "results" / "demo"


def _ms(q: dict) -> str:
    return f"{q['median_ms']:.3g}"


def section(path: Path) -> str:
    data = json.loads(path.read_text())
    env = data["environment"]
    where = env.get("gpu") or f"CPU ({env['cpu_threads']} threads)"
    lines = [
        f"#### {where}: `{path.relative_to(HERE.parent)}`",
        "",
        f"`{env['command']}` — torch {env['torch']}, triton {env['triton']}, commit `{(env.get('git_commit') or '')[:10]}`, {env['date']}",
        "",
        "| op | case | provider | fwd+bwd ms (median) | kept for backward | peak memory | fused speed-up |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in data["results"]:
        if r["status"] != "ok":
            lines.append(f"| {r['op']} | {r['case']} | {r['provider']} | {r['status']} | | | |")
            continue
        sp = ", ".join(f"{v['forward+backward']:.1f}x vs {k}" for k, v in r.get("ratios", {}).items())
        lines.append(
            f"| {r['op']} | {r['case']} | {r['provider']} | {_ms(r['forward+backward'])} "
            f"| {r['kept_for_backward_bytes'] / 2**20:.2f} MiB | {r['peak_bytes'] / 2**20:.1f} MiB | {sp} |"
        )
    if data.get("targets"):
        lines += ["", "Targets:", ""]
        for t in data["targets"]:
            got = "not measured" if t["measured"] is None else f"{t['measured']:.1f}x"
            lines.append(f"- {'met' if t['met'] else '**not met**'}: {t['case']}: {t['target']} — measured {got}")
    return "\n".join(lines)


def _committed(files: list[Path], committed_only: bool) -> list[Path]:
    """``files``, or with ``committed_only`` those git tracks (untracked runs don't count)."""
    if not committed_only:
        return files
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True)
    if tracked.returncode != 0:
        return files
    names = set(tracked.stdout.split())
    return [p for p in files if p.relative_to(ROOT).as_posix() in names]


def result_files(committed_only: bool) -> list[Path]:
    """Non-quick benchmark result JSONs."""
    files = sorted(p for p in (HERE / "results").glob("*.json") if "-quick" not in p.name)
    return _committed(files, committed_only)


def block(files: list[Path]) -> str:
    body = "\n\n".join(section(p) for p in files) if files else "No committed results yet."
    return f"{START}\n{body}\n{END}"


def demo_files(committed_only: bool) -> list[Path]:
    """The demo runs' metrics: ``docs/results/demo/<run>/metrics.json``."""
    return _committed(sorted(DEMO_RESULTS.glob("*/metrics.json")), committed_only)


def demo_block(files: list[Path]) -> str:
    if not files:
        return f"{DEMO_START}\nNo committed demo results yet.\n{DEMO_END}"
    from kpfast.train.cli import command_line

    runs = sorted((json.loads(p.read_text()) for p in files), key=lambda m: m["test"]["nme"])
    lines = ["| method | test NME (%) | PCK@0.1 (%) | labelled-set NME (%) | wall time | command |",
             "|---|---|---|---|---|---|"]
    for m in runs:
        t = m["test"]
        lines.append(f"| {m['method_label']} | {t['nme']:.2f} | {t['pck@0.1']:.1f} | {m['labeled_fit']['nme']:.2f} "
                     f"| {m['wall_time_s']['total'] / 60:.1f} min (data {m['wall_time_s']['data']:.0f} s) "
                     f"| `{command_line(m['config'])}` |")
    by_label = {m["method_label"]: m for m in runs}
    first = runs[0]
    env = first["environment"]
    lines += ["", f"{first['shots']}-shot, {first['dataset']} ({first['train_images']} training and "
              f"{first['test_images']} test images, {first['keypoints']} keypoints), {first['iterations']} "
              f"iterations; {env['device']} with {env['cpu_threads']} threads, torch {env['torch']}, "
              f"commit `{(env.get('git_commit') or '')[:10]}`. Wall time is the whole run (data, training, evaluation, "
              "pictures); data is generated on the first run and read from the cache afterwards."]
    if "full" in by_label and "supervised" in by_label:
        full, sup = by_label["full"]["test"]["nme"], by_label["supervised"]["test"]["nme"]
        gain = 100 * (1 - full / sup)
        lines += ["", f"The full method's test NME is {gain:.1f} % lower than supervised training on the same "
                  f"labelled images ({'meets' if gain >= 30 else '**misses**'} the 30 % target)."]
    return f"{DEMO_START}\n" + "\n".join(lines) + f"\n{DEMO_END}"


def _replace(text: str, start: str, end: str, new_block: str) -> str:
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    return head + new_block + tail


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    text = README.read_text()
    check = "--check" in argv
    new = _replace(text, START, END, block(result_files(committed_only=check)))
    new = _replace(new, DEMO_START, DEMO_END, demo_block(demo_files(committed_only=check)))
    if check:
        if new != text:
            print("README.md's result blocks are stale: run python bench/readme.py")
            return 1
        return 0
    README.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
