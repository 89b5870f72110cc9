"""Helpers shared by the tests: backends to run, fresh seeded generators, comparisons."""

from __future__ import annotations

import contextlib
import random

import torch

import kpfast
from kpfast.backend import interpreting_triton


def kernel_backends() -> list[str]:
    """Kernel families that can run here: C++ always, Triton in the interpreter or on CUDA."""
    out = ["cpp"]
    if interpreting_triton() or torch.cuda.is_available():
        out.append("triton")
    return out


def nan_rule_cases() -> list[tuple[str, str | None]]:
    """(backend, NaN rule of min/max) pairs: the C++ kernels; the Triton kernels under the
    interpreter once with the compiled GPU rule and once with IEEE propagation (see
    :func:`interpreter_min_max_nan`), or compiled on a GPU (its own rule)."""
    out: list[tuple[str, str | None]] = [("cpp", None)]
    if interpreting_triton():
        out += [("triton", "drop"), ("triton", "propagate")]
    elif torch.cuda.is_available():
        out.append(("triton", None))
    return out


@contextlib.contextmanager
def interpreter_min_max_nan(rule: str | None):
    """Run the Triton interpreter with a NaN rule for ``tl.maximum``/``tl.minimum`` and the
    ``tl.max``/``tl.min`` reductions: ``"drop"`` returns the non-NaN operand, as compiled code
    does on the GPU (PTX ``max.f32``), ``"propagate"`` returns NaN (IEEE maximum); None leaves
    the interpreter as it is. A kernel whose results depend on the rule is wrong on one of them."""
    if rule is None:
        yield
        return
    import numpy as np
    from triton.runtime import interpreter

    pairwise = {"drop": (np.fmax, np.fmin), "propagate": (np.maximum, np.minimum)}[rule]
    reduce = {"drop": {np.max: np.nanmax, np.min: np.nanmin}, "propagate": {np.nanmax: np.max, np.nanmin: np.min}}[rule]
    builder, ops = interpreter.InterpreterBuilder, interpreter.ReduceOps
    saved = builder.create_maxnumf, builder.create_minnumf, ops.min_max

    def min_max(self, input, val_reduce_op, idx_reduce_op=None):
        return saved[2](self, input, reduce.get(val_reduce_op, val_reduce_op), idx_reduce_op)

    builder.create_maxnumf = lambda self, lhs, rhs: self.binary_op(lhs, rhs, pairwise[0])
    builder.create_minnumf = lambda self, lhs, rhs: self.binary_op(lhs, rhs, pairwise[1])
    ops.min_max = min_max
    try:
        yield
    finally:
        builder.create_maxnumf, builder.create_minnumf, ops.min_max = saved


def device_for(backend: str) -> torch.device:
    if backend == "triton" and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def fresh_generator() -> tuple[torch.Generator, int]:
    """A generator with a new random seed each call (the seed goes into failure messages)."""
    seed = random.randrange(2**31)
    return torch.Generator().manual_seed(seed), seed


def run(backend: str, fn, *args, **kwargs):
    with kpfast.use_backend(backend):
        return fn(*args, **kwargs)


def assert_close(actual, expected, *, rtol, atol, what: str, seed: int):
    torch.testing.assert_close(
        actual, expected, rtol=rtol, atol=atol, msg=lambda m: f"{what} (seed {seed}): {m}"
    )


def tolerances(dtype: torch.dtype) -> dict:
    return dict(rtol=1e-9, atol=1e-11) if dtype == torch.float64 else dict(rtol=2e-4, atol=2e-5)


def property_test(strategy, examples: dict[str, int]):
    """Decorator: turn ``fn(backend, example)`` into a test parametrized over the kernel backends,
    each running hypothesis on ``strategy`` with that backend's example budget."""
    import pytest
    from hypothesis import HealthCheck, given, settings

    def decorate(fn):
        @pytest.mark.parametrize("backend", kernel_backends())
        def test(backend):
            config = settings(max_examples=examples[backend], deadline=None,
                              suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
            given(strategy)(config(lambda example: fn(backend, example)))()

        test.__name__ = fn.__name__
        test.__doc__ = fn.__doc__
        return test

    return decorate
