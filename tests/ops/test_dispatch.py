"""The dispatch layer shared by the ops (kpfast/ops/backend.py, kpfast/ops/_tensors.py): small device constants that a
CUDA graph can capture, and launches on the tensors' device."""

from __future__ import annotations

import contextlib
import importlib

import pytest
import torch

import kpfast
from kpfast.ops import _tensors
from kpfast.ops.backend import triton_kernels

from _util import device_for, kernel_backends

META = torch.device("meta")  # a device that is not the CPU, without data: the caching logic runs as on CUDA


def test_device_constants_are_copied_once_and_capturable(monkeypatch):
    values = (3, 1, 4, 1, 5)
    first = _tensors.device_constant(values, torch.int64, META)
    assert first.shape == (5,) and first.dtype == torch.int64 and first.device == META
    assert _tensors.device_constant(values, torch.int64, META) is first  # cached: no copy
    assert _tensors.device_constant(values, torch.int32, META) is not first

    # While a CUDA graph is captured: a clone into the graph's memory, never the cache entry
    # (evicting it would free memory the graph reads), and fills for a small new constant.
    monkeypatch.setattr(_tensors, "capturing", lambda device: True)
    captured = _tensors.device_constant(values, torch.int64, META)
    assert captured is not first and captured.shape == first.shape
    fresh = _tensors.device_constant((7, 8), torch.int64, META)
    assert fresh.shape == (2,) and (7, 8, torch.int64, META) not in _tensors._CONSTANTS
    big = tuple(range(_tensors.CONSTANT_FILLS_MAX + 1))
    with pytest.raises(ValueError, match="before capturing"):
        _tensors.device_constant(big, torch.int64, META)


def test_device_constants_keep_the_most_recent():
    made = [_tensors.device_constant((i, -1), torch.int64, META) for i in range(_tensors.CONSTANTS_CACHED + 5)]
    assert len(_tensors._CONSTANTS) <= _tensors.CONSTANTS_CACHED
    assert _tensors.device_constant((_tensors.CONSTANTS_CACHED + 4, -1), torch.int64, META) is made[-1]


@pytest.mark.skipif("triton" not in kernel_backends(), reason="Triton kernels need the interpreter or a GPU")
def test_guarded_launchers_keep_their_module_patchable(monkeypatch):
    """The guard wraps the launchers in place: triton_kernels(op) is the module itself, whose constants
    tests patch (a proxy object broke pytest's undo of such patches)."""
    module = triton_kernels("edge_map")
    assert module is importlib.import_module("kpfast.kernels.edge_map")
    assert module.edge_map_forward.on_tensor_device and module.edge_map_backward.on_tensor_device
    monkeypatch.setattr(module, "FWD_REFRESH", 1)
    monkeypatch.undo()
    assert module.FWD_REFRESH == 4


def test_tensor_device_looks_into_sequences():
    t = torch.zeros(1, device=META)
    assert _tensors.tensor_device((None, [t], 3), {}) == META
    assert _tensors.tensor_device((1.0,), {"x": (t,)}) == META
    assert _tensors.tensor_device((1.0, []), {}) is None


@pytest.mark.skipif("triton" not in kernel_backends(), reason="Triton kernels need the interpreter or a GPU")
def test_every_op_launches_under_the_guard_of_its_tensors_device(monkeypatch):
    """Issue 16.1: the Triton launchers ran on the current CUDA device, not the tensors'. Every launch of
    the four ops now goes through device_guard(device of its tensors) (the guard itself, on two GPUs:
    tests/gpu/test_gpu_ops.py)."""
    seen = []

    def recording_guard(device):
        seen.append(device)
        return contextlib.nullcontext()

    monkeypatch.setattr(_tensors, "device_guard", recording_guard)
    kp = torch.rand(1, 3, 2, device=device_for("triton"), requires_grad=True)
    device = kp.device  # cuda:0 on a GPU
    heat = torch.randn(1, 2, 4, 4, device=device, requires_grad=True)
    pts = torch.randn(2, 4, 3, device=device, requires_grad=True)
    with kpfast.use_backend("triton"):
        for name, out in {
            "edge_map": kpfast.edge_map(kp, [(0, 1)], 4),
            "soft_argmax": kpfast.soft_argmax(heat)[0],
            "umeyama": kpfast.umeyama(pts[:1], pts[1:])[0],
            "part_alignment": kpfast.part_alignment(pts, torch.ones(1, 4, dtype=torch.bool), detach_transform=False),
        }.items():
            seen.clear()
            out.sum().backward()
            assert seen and set(seen) == {device}, f"{name} backward: {seen}"
    seen.clear()
    with kpfast.use_backend("triton"):
        kpfast.edge_map(kp, [(0, 1)], 4)
        kpfast.soft_argmax(heat)
        kpfast.umeyama(pts[:1], pts[1:])
        kpfast.part_alignment(pts, torch.ones(1, 4, dtype=torch.bool))
    assert len(seen) >= 4 and set(seen) == {device}


@pytest.mark.skipif("triton" not in kernel_backends(), reason="Triton kernels need the interpreter or a GPU")
def test_both_kernel_families_have_one_interface():
    """Issue 15: the C++ kernels (kpfast/ops/cpp_kernels.py) and the Triton launchers (kernels/<op>.py)
    have the same functions with the same positional arguments, so a custom op only picks one."""
    import inspect

    from kpfast.ops import backend

    cpp = importlib.import_module("kpfast.ops.cpp_kernels")

    def positional(fn):
        kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        return [p.name for p in inspect.signature(fn).parameters.values() if p.kind in kinds]

    for op, module in backend.TRITON_MODULES.items():
        triton_module = backend.triton_kernels(module)
        for name in (f"{op}_forward", f"{op}_backward"):
            assert positional(getattr(cpp, name)) == positional(getattr(triton_module, name)), name
