"""Speed and memory of every kpfast op against the reference and torch.compile(reference).

    python bench/run.py                       # every op, on CUDA if present, else CPU
    python bench/run.py --ops edge_map --device cpu
    python bench/run.py --quick               # tiny shapes: checks the machinery only
    python bench/run.py --replot bench/results/cpu-2threads.json   # redraw a PNG from its JSON

For each op module ``bench/<op>.py`` and each of its cases, every provider is
timed forward, backward and forward+backward (median, p20, p80 over repeated
runs; CUDA events on a GPU), with the bytes autograd keeps for backward and
the peak memory of one forward+backward. Results: a table on stdout, and
``<out>/<device>[-ops].json`` / ``.md`` / ``.png``. Targets that a case declares
are checked against the ratios measured side by side in this run. Whatever
could not be measured (out of the memory budget, a compile failure) is
recorded with the reason.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import math
import os
import platform
import subprocess
import sys
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import torch  # noqa: E402

from common import DIRECTIONS, Breakdown, Case, human_bytes, measure, measure_breakdown  # noqa: E402

# benchmark modules: every bench/*.py that defines cases(device, quick)
OP_MODULES = [p.stem for p in sorted(HERE.glob("*.py")) if "\ndef cases(" in p.read_text()]


def environment(device: torch.device) -> dict:
    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": str(device),
        "cpu_threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "load_average_1min": os.getloadavg()[0],  # other work on the machine when the run began
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    try:
        env["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=HERE, capture_output=True, text=True).stdout.strip()
    except OSError:
        env["git_commit"] = None
    return env


def memory_budget(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory * 0.8)
    pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return int(pages * 0.5)


def run_breakdown(case: Breakdown, device: torch.device, budget_s: float) -> list[dict]:
    row = {"op": case.op, "case": case.name, "config": case.config, "provider": "phases", "kind": "breakdown"}
    try:
        row.update(measure_breakdown(case, device, budget_s=budget_s))
        row["status"] = "ok"
    except Exception as err:  # record, keep going
        row["status"] = f"error: {type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"
        traceback.print_exc(file=sys.stderr)
    print(f"  {case.name:<40} {'phases':<26} {row['status'] if row['status'] != 'ok' else _fmt_ms(row['total'])}",
          flush=True)
    return [row]


def breakdown_table(rows: list[dict]) -> str:
    """One row per phase and case: median ms and share of the step."""
    lines = ["| case | phase | ms (median) | share |", "|---|---|---|---|"]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['case']} | {r['status']} | | |")
            continue
        total = sum(q["median_ms"] for q in r["phases"].values()) or 1.0
        for phase, q in r["phases"].items():
            lines.append(f"| {r['case']} | {phase} | {q['median_ms']:.3g} | {100 * q['median_ms'] / total:.0f} % |")
        lines.append(f"| {r['case']} | **whole step** | {r['total']['median_ms']:.3g} | |")
    return "\n".join(lines)


def plot_breakdown(rows: list[dict], path: Path, title: str) -> bool:
    """One stacked horizontal bar per case: its phases' shares of the step (cases of very different
    lengths side by side), each labelled with its median milliseconds, the whole step's beside the bar."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot")
        return False
    ok = [r for r in rows if r["status"] == "ok"]
    if not ok:
        return False
    phases = list(ok[0]["phases"])
    colours = plt.get_cmap("tab20")(range(len(phases)))
    fig, ax = plt.subplots(figsize=(11, 2.6 + 0.7 * len(ok)))
    for i, r in enumerate(ok):
        total = sum(q["median_ms"] for q in r["phases"].values())
        left = 0.0
        for j, phase in enumerate(phases):
            ms = r["phases"][phase]["median_ms"]
            share = 100 * ms / total
            ax.barh(i, share, left=left, color=colours[j], label=phase if i == 0 else None)
            if share > 6:
                ax.text(left + share / 2, i, f"{ms:.0f}", ha="center", va="center", fontsize=7)
            left += share
        ax.text(101, i, f"{total / 1e3:.2g} s", va="center", fontsize=8)
    ax.set_xlim(0, 110)
    ax.set_yticks(range(len(ok)))
    ax.set_yticklabels([r["case"] for r in ok], fontsize=8)
    ax.set_xlabel("share of the training step (%); labels: median milliseconds of the phase")
    ax.legend(fontsize=7, ncol=5, loc="upper center", bbox_to_anchor=(0.5, -0.45))
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def run_case(case: Case, device: torch.device, budget_s: float, mem_budget: int, providers) -> list[dict]:
    if isinstance(case, Breakdown):
        return run_breakdown(case, device, budget_s)
    rows = []
    for provider in case.providers:
        if providers and provider not in providers:
            continue
        row = {"op": case.op, "case": case.name, "config": case.config, "provider": provider}
        reason = case.skip.get(provider)
        if reason is None and provider != "fused" and case.reference_bytes > mem_budget:
            reason = f"skipped: needs about {human_bytes(case.reference_bytes)}, over the {human_bytes(mem_budget)} budget"
        if reason:
            row["status"] = reason
        else:
            try:
                row.update(measure(case, provider, device, budget_s=budget_s))
                row["status"] = "ok"
            except Exception as err:  # record, keep going
                row["status"] = f"error: {type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"
                traceback.print_exc(file=sys.stderr)
            finally:
                if device.type == "cuda":
                    torch.cuda.empty_cache()
        print(f"  {case.name:<40} {provider:<26} {row['status'] if row['status'] != 'ok' else _fmt_ms(row['forward+backward'])}", flush=True)
        rows.append(row)
    return rows


def _fmt_ms(q: dict | None) -> str:
    if not q:
        return "-"
    return f"{q['median_ms']:.3g} ms ({q['p20_ms']:.3g}-{q['p80_ms']:.3g})"


def speedups(rows: list[dict]) -> None:
    """Add, to each fused row, the ratio of every other provider's time and memory to the fused one."""
    by_case: dict[str, dict[str, dict]] = {}
    for r in rows:
        if r.get("kind") == "breakdown":
            continue
        by_case.setdefault(r["case"], {})[r["provider"]] = r
    for providers in by_case.values():
        fused = providers.get("fused")
        if not fused or fused["status"] != "ok":
            continue
        fused["ratios"] = {}
        for name, other in providers.items():
            if name == "fused" or other["status"] != "ok":
                continue
            ratios = {d: other[d]["median_ms"] / fused[d]["median_ms"] for d in DIRECTIONS}
            ratios["peak_bytes"] = other["peak_bytes"] / max(fused["peak_bytes"], 1)
            ratios["kept_for_backward_bytes"] = other["kept_for_backward_bytes"] / max(fused["kept_for_backward_bytes"], 1)
            fused["ratios"][name] = ratios


def check_targets(cases: list[Case], rows: list[dict], device: torch.device) -> list[dict]:
    checks = []
    fused = {r["case"]: r for r in rows if r["provider"] == "fused"}
    for case in cases:
        for t in getattr(case, "targets", []):
            if t.get("device", device.type) != device.type:
                continue
            r = fused.get(case.name)
            ratio = (r or {}).get("ratios", {}).get(t["over"], {}).get(t["metric"])
            checks.append({
                "case": case.name, "target": f"fused {t['metric']} >= {t['at_least']}x better than {t['over']}",
                "measured": ratio, "met": ratio is not None and ratio >= t["at_least"],
            })
    return checks


def table(rows: list[dict]) -> str:
    head = "| op | case | provider | forward ms | backward ms | fwd+bwd ms (p20-p80) | kept for bwd | peak | fwd+bwd speed-up of fused |"
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['op']} | {r['case']} | {r['provider']} | {r['status']} | | | | | |")
            continue
        sp = ", ".join(f"{v['forward+backward']:.1f}x vs {k}" for k, v in r.get("ratios", {}).items())
        lines.append(
            f"| {r['op']} | {r['case']} | {r['provider']} | {r['forward']['median_ms']:.3g} | {r['backward']['median_ms']:.3g} "
            f"| {_fmt_ms(r['forward+backward'])} | {human_bytes(r['kept_for_backward_bytes'])} | {human_bytes(r['peak_bytes'])} | {sp} |"
        )
    return "\n".join(lines)


def _provider_color(provider: str) -> str:
    """One colour per role in every panel: reference blue, compiled orange, fused green."""
    if provider == "fused":
        return "tab:green"
    if provider.startswith("torch.compile"):
        return "tab:orange"
    return "tab:blue" if provider == "reference" else "tab:gray"


def plot(rows: list[dict], path: Path, title: str) -> bool:
    """Two rows of panels per op (forward+backward time, peak memory); fused bars carry their
    speed-up over the reference measured in the same run."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install -e .[bench])")
        return False
    ops = list(dict.fromkeys(r["op"] for r in rows))
    fig, axes = plt.subplots(2, len(ops), figsize=(6 * len(ops), 8), squeeze=False)
    for col, op in enumerate(ops):
        mine = [r for r in rows if r["op"] == op]
        cases = list(dict.fromkeys(r["case"] for r in mine))
        providers = list(dict.fromkeys(r["provider"] for r in mine if r["status"] == "ok"))
        width = 0.8 / max(len(providers), 1)
        for row_i, (metric, scale) in enumerate((("forward+backward", 1.0), ("peak_bytes", 2**-20))):
            ax = axes[row_i, col]
            values = []
            for k, provider in enumerate(providers):
                xs, ys = [], []
                for ci, c in enumerate(cases):
                    r = next((r for r in mine if r["case"] == c and r["provider"] == provider), None)
                    if r and r["status"] == "ok":
                        xs.append(ci + k * width)
                        ys.append(r[metric]["median_ms"] if metric != "peak_bytes" else r[metric] * scale)
                        ratio = r.get("ratios", {}).get("reference", {}).get(metric)
                        if provider == "fused" and ratio:
                            ax.annotate(f"{ratio:.1f}x", (xs[-1], ys[-1]), ha="center", va="bottom", fontsize=7)
                ax.bar(xs, ys, width, label=provider, color=_provider_color(provider))
                values += ys
            ax.set_yscale("log")
            if values:
                ax.set_ylim(10 ** math.floor(math.log10(min(values)) - 0.5), max(values) * 3)
            ax.set_ylabel(("forward+backward time (ms, median)", "peak memory (MiB)")[row_i])
            ax.set_xticks([i + 0.4 - width / 2 for i in range(len(cases))])
            ax.set_xticklabels(cases, rotation=20, ha="right", fontsize=7)
            ax.set_title(op + ("" if row_i == 0 else " (memory)"))
            ax.legend(fontsize=7)
    fig.suptitle(title + "; labels on fused bars: ratio to the reference")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def replot(json_path: Path) -> int:
    """Redraw ``<slug>.png`` from a result JSON (no measurement)."""
    data = json.loads(json_path.read_text())
    env = data["environment"]
    where = f"kpfast on {env.get('gpu', env['cpu'])} ({env['device']})"
    written = []
    if data["results"] and plot(data["results"], json_path.with_suffix(".png"), where):
        written.append(json_path.with_suffix(".png"))
    breakdown_png = json_path.with_name(json_path.stem + "-breakdown.png")
    if data.get("breakdowns") and plot_breakdown(data["breakdowns"], breakdown_png, where + ": one training step"):
        written.append(breakdown_png)
    print("wrote " + (", ".join(map(str, written)) or "nothing"))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ops", default=",".join(OP_MODULES), help=f"comma-separated subset of {OP_MODULES}")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--providers", default="", help="comma-separated subset of providers (default: all)")
    parser.add_argument("--quick", action="store_true", help="tiny shapes, a check of the machinery")
    parser.add_argument("--budget", type=float, default=2.0, help="seconds of repeated timing per measurement")
    parser.add_argument("--out", default=str(HERE / "results"), help="directory for the JSON, table and plot")
    parser.add_argument("--replot", metavar="JSON", help="only redraw the PNG of an earlier run's result JSON")
    args = parser.parse_args(argv)
    if args.replot:
        return replot(Path(args.replot))

    device = torch.device(args.device)
    ops = [o for o in args.ops.split(",") if o]
    unknown = set(ops) - set(OP_MODULES)
    if unknown:
        parser.error(f"unknown ops {sorted(unknown)}; choose from {OP_MODULES}")
    providers = [p for p in args.providers.split(",") if p]
    env = environment(device)
    mem_budget = memory_budget(device)
    print(f"kpfast benchmarks on {env.get('gpu', env['cpu'])} ({device}), torch {env['torch']}, triton {env['triton']}")

    cases, rows = [], []
    for op in ops:
        module = importlib.import_module(op)
        for case in module.cases(device, args.quick):
            cases.append(case)
            rows.extend(run_case(case, device, args.budget, mem_budget, providers))
    speedups(rows)
    checks = check_targets(cases, rows, device)

    slug = env.get("gpu", f"cpu-{env['cpu_threads']}threads").lower().replace(" ", "-")
    if args.quick:
        slug += "-quick"
    if set(ops) != set(OP_MODULES):
        slug += "-" + "+".join(ops)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    phase_rows = [r for r in rows if r.get("kind") == "breakdown"]
    rows = [r for r in rows if r.get("kind") != "breakdown"]
    text = table(rows) if rows else ""
    if phase_rows:
        text += ("\n\n" if text else "") + breakdown_table(phase_rows)
    target_lines = [f"- {'MET' if c['met'] else 'NOT MET'}: {c['case']}: {c['target']} (measured {c['measured']:.2f}x)" if c["measured"] is not None
                    else f"- NOT MEASURED: {c['case']}: {c['target']}" for c in checks]
    md = f"# kpfast benchmarks: {slug}\n\n`{env['command']}`, torch {env['torch']}, triton {env['triton']}, commit {env['git_commit']}, {env['date']}\n\n{text}\n"
    if target_lines:
        md += "\n## Targets\n\n" + "\n".join(target_lines) + "\n"
    (out / f"{slug}.md").write_text(md)
    (out / f"{slug}.json").write_text(json.dumps({"environment": env, "results": rows, "breakdowns": phase_rows,
                                                  "targets": checks}, indent=1))
    where = f"kpfast on {env.get('gpu', env['cpu'])} ({device})"
    plotted = plot(rows, out / f"{slug}.png", where) if rows else False
    if phase_rows and plot_breakdown(phase_rows, out / f"{slug}-breakdown.png", where + ": one training step"):
        print(f"wrote {out / (slug + '-breakdown.png')}")
    print()
    print(text)
    if target_lines:
        print("\nTargets:\n" + "\n".join(target_lines))
    print(f"\nwrote {out / (slug + '.json')}, {out / (slug + '.md')}" + (f", {out / (slug + '.png')}" if plotted else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
