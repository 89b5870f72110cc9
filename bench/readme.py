"""Write measured results into README.md: benchmarks and the training demo.

    python bench/readme.py          # rewrite both blocks from the committed result files
    python bench/readme.py --check  # exit 1 if a README block is stale

Benchmarks come from ``bench/results/*.json`` (written by ``bench/run.py``), the
results table from ``docs/results/demo/summary.json`` (written by
``python -m kpfast.experiments docs/results/demo/grid.json``). The README's numbers come only from
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
DIAG_START, DIAG_END = "<!-- diagnose:start -->", "<!-- diagnose:end -->"
DIAGNOSE_RESULTS = ROOT / "docs" / "results" / "diagnose"


def _ms(q: dict) -> str:
    return f"{q['median_ms']:.3g}"


def step_speed_section(data: dict, path: Path) -> str:
    this, other = data["checkouts"]["this"], data["checkouts"].get("other")
    lines = [f"#### Training step, {data['preset']} preset: `{path.relative_to(ROOT)}`", "",
             f"`{data['command']}` — {data['threads']} threads, {data['rounds']} alternating rounds of "
             f"{data['steps']} steps; 1-minute load average during the run "
             f"{min(data['load_average_1min']):.1f}-{max(data['load_average_1min']):.1f} on {data['cores']} cores", "",
             "| checkout | commit | s/step (median) | per round |", "|---|---|---|---|"]
    for name, c in data["checkouts"].items():
        lines.append(f"| {name} ({c['folder']}) | `{c['commit'][:10]}` | {c['median_s']:.3g} | "
                     f"{', '.join(f'{x:.3g}' for x in c['seconds_per_step'])} |")
    if other:
        sp = data["speedup"]
        lines += ["", f"Speed-up of this checkout: {sp['median']:.2f}x (median of the rounds' ratios "
                      f"{', '.join(f'{x:.2f}' for x in sp['per_round'])})."]
    return "\n".join(lines)


def breakdown_section(data: dict, path: Path) -> str:
    env = data["environment"]
    lines = [f"#### Training step by phase, CPU ({env['cpu_threads']} threads): `{path.relative_to(ROOT)}`", "",
             f"`{env['command']}` — torch {env['torch']}, commit `{(env.get('git_commit') or '')[:10]}`, {env['date']}, "
             f"1-minute load average {env.get('load_average_1min', float('nan')):.1f} on {env.get('cores')} cores at the start", "",
             "| case | phase | ms (median) | share |", "|---|---|---|---|"]
    for b in data["breakdowns"]:
        total = sum(q["median_ms"] for q in b["phases"].values())
        for phase, q in b["phases"].items():
            lines.append(f"| {b['case']} | {phase} | {_ms(q)} | {100 * q['median_ms'] / total:.0f} % |")
    png = path.with_name(path.stem + "-breakdown.png")
    if png.exists():
        lines += ["", f"![time of one training step by phase]({png.relative_to(ROOT).as_posix()})"]
    return "\n".join(lines)


def section(path: Path) -> str:
    data = json.loads(path.read_text())
    if "checkouts" in data:
        return step_speed_section(data, path)
    if data.get("breakdowns") and not data.get("results"):
        return breakdown_section(data, path)
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
    """The experiment summaries the README shows: ``docs/results/<grid>/summary.json``."""
    return _committed(sorted(p for p in DEMO_RESULTS.glob("summary.json")), committed_only)


def verdicts(summary: dict) -> list[str]:
    """One line per dataset: the full method against supervised training and against each other arm."""
    lines = []
    for dataset, d in summary["datasets"].items():
        arms = {a["label"]: a for a in d["arms"]}
        full, sup = arms.get("full"), arms.get("supervised")
        if not full or not sup or full["nme"]["mean"] is None or sup["nme"]["mean"] is None:
            continue
        vs = sup["vs_full"]
        gain = vs["nme_relative"]
        pck = "above" if full["pck@0.1"]["mean"] > sup["pck@0.1"]["mean"] else "**not above**"
        worse = [a["label"] for a in d["arms"] if a["vs_full"] and a["vs_full"]["nme"]["worse_by_more_than_1sd"]]
        not_worse = [a["label"] for a in d["arms"] if a["vs_full"] and a["label"] != "supervised"
                     and not a["vs_full"]["nme"]["worse_by_more_than_1sd"]]
        line = (f"- **{dataset}**: the full method's mean test NME is {gain:.1f} % below supervised training's "
                f"({'meets' if gain >= 30 else '**misses**'} the 30 % target), its PCK@0.1 {pck} supervised's. "
                f"Worse than full by more than one sd (NME): {', '.join(worse) or 'none'}")
        if not_worse:
            line += f"; **not** worse by more than one sd: {', '.join(not_worse)}"
        every_seed = [a["label"] for a in d["arms"] if a["vs_full"] and a["label"] != "supervised"
                      and (a["vs_full"].get("nme_paired") or {}).get("n", 0) >= 2
                      and a["vs_full"]["nme_paired"]["worse"] == a["vs_full"]["nme_paired"]["n"]]
        if every_seed:
            line += (f"; worse than full on every seed, seed by seed (same data, initial weights and random streams): "
                     f"{', '.join(every_seed)}")
        lines.append(line + ".")
    return lines


def demo_block(files: list[Path]) -> str:
    if not files:
        return f"{DEMO_START}\nNo committed experiment results yet.\n{DEMO_END}"
    from kpfast.experiments import markdown

    summary = json.loads(files[0].read_text())
    any_info = next(iter(summary["datasets"].values()))["info"]
    env = any_info.get("environment", {})
    cmds = {f"{dataset}, {a['label']}": a.get("command") for dataset, d in summary["datasets"].items()
            for a in d["arms"]}
    lines = [markdown(summary).rstrip(), "",
             f"Mean ± sd over seeds {', '.join(map(str, summary['seeds']))} (each seed draws its own procedural "
             f"data and training streams); NME in % of the inter-ocular distance (faces) or the box size, PCK@0.1 of "
             f"the box size, spread = predicted / true keypoint extent (near 0: collapsed onto the object's centre). "
             f"{env.get('device')} with {env.get('cpu_threads')} thread(s) per run, torch {env.get('torch')}, "
             f"commit `{(env.get('git_commit') or '')[:10]}`; `python -m kpfast.experiments {files[0].parent.relative_to(ROOT).as_posix()}/grid.json` "
             "reruns the grid.", "", *verdicts(summary), "", "<details><summary>the command of each arm (its first seed)</summary>", ""]
    lines += [f"- {label}: `{cmd}`" for label, cmd in cmds.items() if cmd] + ["", "</details>"]
    return f"{DEMO_START}\n" + "\n".join(lines) + f"\n{DEMO_END}"


def diagnose_files(committed_only: bool) -> list[Path]:
    """The mechanism checks the README shows: ``docs/results/diagnose/*.json`` (``python -m kpfast.diagnose --json``)."""
    return _committed(sorted(DIAGNOSE_RESULTS.glob("*.json")), committed_only)


def _detail(v) -> str:
    if isinstance(v, dict) and "loss" in v:  # a reconstruction variant: its held-out loss
        return f"loss {v['loss']:.4g}" + (f" (edge strength {v['alpha']:.3g})" if "alpha" in v else "")
    return f"{v:.3g}" if isinstance(v, (int, float)) else str(v)


def diagnose_block(files: list[Path]) -> str:
    if not files:
        return f"{DIAG_START}\nNo committed mechanism checks yet.\n{DIAG_END}"
    lines = ["| data | check | value | needs | result | per noise level / variant |", "|---|---|---|---|---|---|"]
    for path in files:
        d = json.loads(path.read_text())
        for c in d["checks"]:
            detail = ", ".join(f"{k} {_detail(v)}" for k, v in c["detail"].items())
            data = d["dataset"] + (f" ({', '.join(d['set'])})" if d.get("set") else "")
            lines.append(f"| {data} | {c['name']} | {c['value']:.3f} | {c['threshold']:g} | "
                         f"{'pass' if c['passed'] else '**FAIL**'} | {detail} |")
    lines += ["", "Commands: " + "; ".join(f"`{json.loads(p.read_text())['command']}`" for p in files)]
    return f"{DIAG_START}\n" + "\n".join(lines) + f"\n{DIAG_END}"


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
    new = _replace(new, DIAG_START, DIAG_END, diagnose_block(diagnose_files(committed_only=check)))
    if check:
        if new != text:
            print("README.md's result blocks are stale: run python bench/readme.py")
            return 1
        return 0
    README.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
