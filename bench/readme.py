"""Write the measured benchmark results into README.md (between the bench markers).

    python bench/readme.py          # rewrite the block from bench/results/*.json
    python bench/readme.py --check  # exit 1 if the README block is stale

The README's numbers come only from committed result files, never by hand.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
README = HERE.parent / "README.md"
START, END = "<!-- bench:start -->", "<!-- bench:end -->"


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


def result_files(committed_only: bool) -> list[Path]:
    """Non-quick result JSONs; with ``committed_only``, those git tracks (untracked runs don't count)."""
    files = sorted(p for p in (HERE / "results").glob("*.json") if "-quick" not in p.name)
    if committed_only:
        tracked = subprocess.run(["git", "ls-files", "results"], cwd=HERE, capture_output=True, text=True)
        if tracked.returncode == 0:
            names = set(tracked.stdout.split())
            files = [p for p in files if f"results/{p.name}" in names]
    return files


def block(files: list[Path]) -> str:
    body = "\n\n".join(section(p) for p in files) if files else "No committed results yet."
    return f"{START}\n{body}\n{END}"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    text = README.read_text()
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    check = "--check" in argv
    new = head + block(result_files(committed_only=check)) + tail
    if check:
        if new != text:
            print("README.md's benchmark block is stale: run python bench/readme.py")
            return 1
        return 0
    README.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
