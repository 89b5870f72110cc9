"""Measurement machinery shared by every op's benchmark module.

A module ``bench/<op>.py`` exposes ``cases(device, quick) -> list[Case]``. Each
case builds fresh inputs and names one callable per provider; this file times
forward, backward and forward+backward of each, measures the memory autograd
keeps for backward and the peak memory of one forward+backward, and returns
plain dicts that ``run.py`` turns into a table, JSON and a plot. Nothing is
typed in by hand: a number that could not be measured is recorded with the
reason.
"""

from __future__ import annotations

import gc
import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

DIRECTIONS = ("forward", "backward", "forward+backward")


@dataclass
class Case:
    op: str
    name: str
    config: dict
    make_inputs: Callable[[torch.device], dict]
    """Fresh inputs: a dict of tensors (leaves that need gradients already require them)."""
    providers: dict[str, Callable[[dict], torch.Tensor]]
    """Provider name -> function(inputs) -> output tensor (any shape; backward uses a ones-like gradient)."""
    reference_bytes: int = 0
    """Estimated peak bytes of the plain reference, to skip configurations that cannot fit."""
    skip: dict[str, str] = field(default_factory=dict)
    """Provider name -> reason it is not measured in this case."""
    targets: list[dict] = field(default_factory=list)
    """Goals checked on the measured ratios: {"metric": "forward+backward" | "peak_bytes" | ...,
    "over": provider, "at_least": ratio, "device": "cpu" | "cuda"}."""


@dataclass
class Breakdown:
    """A case measured as phases of one call instead of providers: ``make(device)`` returns a
    function that runs the call once and returns seconds per phase (names in ``phases``)."""

    op: str
    name: str
    config: dict
    make: Callable[[torch.device], Callable[[], dict]]
    phases: tuple


def measure_breakdown(case: Breakdown, device: torch.device, *, budget_s: float, min_reps: int = 5) -> dict:
    """Median / p20 / p80 milliseconds of every phase and of their sum, over repeated calls."""
    fn = case.make(device)
    fn()
    fn()  # warm-up: allocator, caches, first-use compilation
    samples: list[dict] = []
    start = time.perf_counter()
    while len(samples) < min_reps or (time.perf_counter() - start < budget_s and len(samples) < 200):
        samples.append(fn())
    phases = {p: _quantiles([1e3 * s.get(p, 0.0) for s in samples]) for p in case.phases}
    return {"phases": phases, "total": _quantiles([1e3 * sum(s.values()) for s in samples])}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _quantiles(samples: list[float]) -> dict:
    qs = statistics.quantiles(samples, n=10, method="inclusive") if len(samples) > 1 else [samples[0]] * 9
    return {"median_ms": statistics.median(samples), "p20_ms": qs[1], "p80_ms": qs[7], "reps": len(samples)}


def time_callable(fn: Callable[[], object], device: torch.device, *, budget_s: float, min_reps: int = 5, max_reps: int = 200) -> dict:
    """Median / p20 / p80 wall time of ``fn`` in milliseconds (device events on CUDA)."""
    fn()  # warm-up: compilation, caches, allocator
    _sync(device)
    samples: list[float] = []
    start = time.perf_counter()
    while len(samples) < max_reps and (len(samples) < min_reps or time.perf_counter() - start < budget_s):
        if device.type == "cuda":
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(begin.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e3)
    return _quantiles(samples)


def _leaves(inputs: dict) -> list[torch.Tensor]:
    return [t for t in inputs.values() if isinstance(t, torch.Tensor) and t.requires_grad]


def _zero_grads(inputs: dict) -> None:
    for t in _leaves(inputs):
        t.grad = None


def kept_for_backward(fn: Callable[[dict], torch.Tensor], inputs: dict) -> int:
    """Bytes autograd saves for backward beyond the inputs themselves (unique storages)."""
    input_storages = {t.untyped_storage().data_ptr() for t in inputs.values() if isinstance(t, torch.Tensor)}
    saved: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in input_storages:
            saved[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(inputs)
    del out
    return sum(saved.values())


def peak_bytes(fn: Callable[[dict], torch.Tensor], inputs: dict, device: torch.device) -> int:
    """Peak bytes allocated above the starting point during one forward+backward."""
    if device.type == "cuda":
        _sync(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        out = fn(inputs)
        out.backward(torch.ones_like(out))
        _sync(device)
        return torch.cuda.max_memory_allocated(device) - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn(inputs)
        out.backward(torch.ones_like(out))
        del out
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    current = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        current += e.nbytes()
        peak = max(peak, current)
    return peak


def measure(case: Case, provider: str, device: torch.device, *, budget_s: float) -> dict:
    """Every number for one (case, provider): times per direction and memory."""
    fn = case.providers[provider]
    inputs = case.make_inputs(device)
    result: dict = {}

    def forward():  # with autograd recording, as in training
        return fn(inputs)

    result["forward"] = time_callable(forward, device, budget_s=budget_s)

    out = fn(inputs)

    def backward(out=out, grad=torch.ones_like(out)):  # one graph, replayed with retain_graph
        _zero_grads(inputs)
        out.backward(grad, retain_graph=True)

    result["backward"] = time_callable(backward, device, budget_s=budget_s)
    del out, backward

    def forward_backward():
        _zero_grads(inputs)
        o = fn(inputs)
        o.backward(torch.ones_like(o))

    result["forward+backward"] = time_callable(forward_backward, device, budget_s=budget_s)
    _zero_grads(inputs)
    gc.collect()
    result["kept_for_backward_bytes"] = kept_for_backward(fn, inputs)
    _zero_grads(inputs)
    result["peak_bytes"] = peak_bytes(fn, inputs, device)
    return result


def human_bytes(n: float | None) -> str:
    if n is None or (isinstance(n, float) and math.isnan(n)):
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"
