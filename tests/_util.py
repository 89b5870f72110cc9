"""Helpers shared by the tests: backends to run, fresh seeded generators, comparisons."""

from __future__ import annotations

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
    """Decorator: turn ``fn(backend, example)`` into a test parametrized over the kernel backends
    (and ``"reference"`` when ``examples`` budgets it), each running hypothesis on ``strategy``
    with that backend's example budget."""
    import pytest
    from hypothesis import HealthCheck, given, settings

    def decorate(fn):
        @pytest.mark.parametrize("backend", [b for b in kernel_backends() + ["reference"] if b in examples])
        def test(backend):
            config = settings(max_examples=examples[backend], deadline=None,
                              suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
            given(strategy)(config(lambda example: fn(backend, example)))()

        test.__name__ = fn.__name__
        test.__doc__ = fn.__doc__
        return test

    return decorate
