"""The dispatch layer shared by the ops (kpfast/ops/_backends.py): small device constants that a
CUDA graph can capture, and launches on the tensors' device."""

from __future__ import annotations

import pytest
import torch

from kpfast.ops import _backends

META = torch.device("meta")  # a device that is not the CPU, without data: the caching logic runs as on CUDA


def test_device_constants_are_copied_once_and_capturable(monkeypatch):
    values = (3, 1, 4, 1, 5)
    first = _backends.device_constant(values, torch.int64, META)
    assert first.shape == (5,) and first.dtype == torch.int64 and first.device == META
    assert _backends.device_constant(values, torch.int64, META) is first  # cached: no copy
    assert _backends.device_constant(values, torch.int32, META) is not first

    # While a CUDA graph is captured: a clone into the graph's memory, never the cache entry
    # (evicting it would free memory the graph reads), and fills for a small new constant.
    monkeypatch.setattr(_backends, "capturing", lambda device: True)
    captured = _backends.device_constant(values, torch.int64, META)
    assert captured is not first and captured.shape == first.shape
    fresh = _backends.device_constant((7, 8), torch.int64, META)
    assert fresh.shape == (2,) and (7, 8, torch.int64, META) not in _backends._CONSTANTS
    big = tuple(range(_backends.CONSTANT_FILLS_MAX + 1))
    with pytest.raises(ValueError, match="before capturing"):
        _backends.device_constant(big, torch.int64, META)


def test_device_constants_keep_the_most_recent():
    made = [_backends.device_constant((i, -1), torch.int64, META) for i in range(_backends.CONSTANTS_CACHED + 5)]
    assert len(_backends._CONSTANTS) <= _backends.CONSTANTS_CACHED
    assert _backends.device_constant((_backends.CONSTANTS_CACHED + 4, -1), torch.int64, META) is made[-1]
