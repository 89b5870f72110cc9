"""Test set-up: Triton kernels run on CPU tensors in the interpreter.

TRITON_INTERPRET must be set before triton is imported, so it is set here,
unless a CUDA device is present (then the Triton kernels run compiled and the
`gpu` tests run).
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
