"""Helpers shared by the tests: backends to run, generators with fixed seeds, comparisons."""

from __future__ import annotations

import collections
import contextlib
import importlib
import os
import zlib

import torch

import kpfast
from kpfast.ops.backend import interpreting_triton


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


_SEEDS_GIVEN: collections.Counter = collections.Counter()


def fixed_seed() -> int:
    """A seed fixed by the running test's name and parameters and by how many seeds the test took
    before (the same on every run and wherever the test file lives; different between tests and
    between the calls of one test). Random inputs belong to hypothesis."""
    name = os.environ.get("PYTEST_CURRENT_TEST", "").rpartition(" (")[0].rpartition("::")[2]
    _SEEDS_GIVEN[name] += 1
    return zlib.crc32(f"{name}#{_SEEDS_GIVEN[name]}".encode()) % 2**31


def seeded_generator() -> tuple[torch.Generator, int]:
    """A generator seeded with :func:`fixed_seed` (the seed goes into failure messages)."""
    seed = fixed_seed()
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
    """Decorator: turn ``fn(backend, example)`` into a test parametrized over the kernel backends
    (and ``"reference"`` when ``examples`` gives it a budget), each running hypothesis on
    ``strategy`` with that backend's example budget."""
    import pytest
    from hypothesis import HealthCheck, given, settings

    def decorate(fn):
        @pytest.mark.parametrize("backend", [b for b in (*kernel_backends(), "reference") if b in examples])
        def test(backend):
            config = settings(max_examples=examples[backend], deadline=None,
                              suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
            given(strategy)(config(lambda example: fn(backend, example)))()

        test.__name__ = fn.__name__
        test.__doc__ = fn.__doc__
        return test

    return decorate


KPFAST_DIR = os.path.dirname(kpfast.__file__)
KERNELS_DIR = os.path.dirname(importlib.import_module("kpfast.kernels").__file__)
HOST_READS = ("item", "tolist", "numpy", "cpu", "__bool__", "__int__", "__float__", "__index__")
FACTORIES = ("tensor", "as_tensor", "full", "scalar_tensor")


@contextlib.contextmanager
def calls_from_kpfast(tensor_methods=HOST_READS, torch_functions=FACTORIES):
    """Count calls made directly from kpfast's own code (its Python files and the kernel modules)
    to the given ``torch.Tensor`` methods and ``torch`` functions: yields a Counter by name.

    On CPU tensors this shows what a call would do on CUDA: a tensor read on the host (``item``,
    ``bool(t)``, ...) is a host sync there, and a tensor built from Python values is a host-to-device
    copy, which a CUDA graph cannot capture.
    """
    import sys

    counts = collections.Counter()
    ours = (KPFAST_DIR, KERNELS_DIR)
    patched = [(torch.Tensor, name) for name in tensor_methods] + [(torch, name) for name in torch_functions]
    saved = [(owner, name, getattr(owner, name)) for owner, name in patched]

    def counting(name, fn):
        def wrapper(*args, **kwargs):
            if sys._getframe(1).f_code.co_filename.startswith(ours):
                counts[name] += 1
            return fn(*args, **kwargs)
        return wrapper

    for owner, name, fn in saved:
        setattr(owner, name, counting(name, fn))
    try:
        yield counts
    finally:
        for owner, name, fn in saved:
            setattr(owner, name, fn)
