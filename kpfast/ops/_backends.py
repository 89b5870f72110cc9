"""Access to the two kernel families from the torch side."""

from __future__ import annotations

import contextlib
import functools
import importlib
import inspect
from collections import OrderedDict
from types import ModuleType

import torch


def cpp() -> ModuleType:
    """The compiled C++ extension ``kpfast._C``."""
    try:
        return importlib.import_module("kpfast._C")
    except ImportError as err:  # pragma: no cover - only on a broken install
        raise ImportError(
            "kpfast's C++ kernels (kpfast._C) are not built; reinstall with `pip install -e .` "
            "from the repository (needs a C++17 compiler)"
        ) from err


@functools.lru_cache(maxsize=None)
def triton_kernels(op: str) -> ModuleType:
    """The Triton kernel module ``kpfast.kernels.<op>`` (imports triton lazily). On first use its
    launchers (public functions) are wrapped to run on their tensors' device: see
    :func:`on_tensor_device`."""
    module = importlib.import_module(f"kpfast.kernels.{op}")
    for name, value in list(vars(module).items()):
        if inspect.isfunction(value) and not name.startswith("_") and value.__module__ == module.__name__:
            setattr(module, name, on_tensor_device(value))
    return module


def tensor_device(args, kwargs) -> torch.device | None:
    """The device of the first tensor among ``args`` and ``kwargs`` (looking into lists and tuples)."""
    for a in (*args, *kwargs.values()):
        if isinstance(a, (list, tuple)):
            found = tensor_device(a, {})
            if found is not None:
                return found
        elif isinstance(a, torch.Tensor):
            return a.device
    return None


def device_guard(device: torch.device | None):
    """Makes ``device`` the current CUDA device inside the block (nothing for other devices)."""
    return torch.cuda.device(device) if device is not None and device.type == "cuda" else contextlib.nullcontext()


def on_tensor_device(launcher):
    """``launcher`` run with the CUDA device of its first tensor argument made current. Triton
    launches on the current device and its current stream; tensors on ``cuda:1`` while ``cuda:0``
    is current would otherwise fault, or run on the wrong device unordered with their stream."""
    if getattr(launcher, "on_tensor_device", False):
        return launcher

    @functools.wraps(launcher)
    def launch(*args, **kwargs):
        with device_guard(tensor_device(args, kwargs)):
            return launcher(*args, **kwargs)

    launch.on_tensor_device = True
    return launch


def as_numpy(t: torch.Tensor | None):
    """A no-copy numpy view of a contiguous CPU tensor (None stays None)."""
    return None if t is None else t.detach().numpy()


def threads() -> int:
    return torch.get_num_threads()


def capturing(device: torch.device) -> bool:
    """True while a CUDA graph is being captured on ``device``'s current stream (no host sync and no
    host-to-device copy is allowed then)."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


_CONSTANTS: OrderedDict = OrderedDict()
CONSTANTS_CACHED = 64
CONSTANT_FILLS_MAX = 64


def device_constant(values: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A 1-D tensor of the Python numbers ``values`` on ``device``, not to be modified.

    Copied once and cached (the last 64 kept), so later calls copy nothing. While a CUDA graph is captured no host-to-device copy is allowed, and the graph
    must not point into a cache that may free its entry: a cached tensor is cloned into the
    graph's memory (a device copy replayed with the graph), and one not cached yet is written by
    fill kernels when it is small (at most 64 values) or else is an error: call once before capturing.
    """
    key = (values, dtype, device)
    cached = _CONSTANTS.get(key)
    if capturing(device):
        if cached is not None:
            return cached.clone()
        if len(values) > CONSTANT_FILLS_MAX:
            raise ValueError(
                f"{len(values)} values given as a Python sequence are seen for the first time while a CUDA graph "
                "is captured, where they cannot be copied to the GPU: pass them as a tensor on the device, or "
                "make the same call once before capturing"
            )
        out = torch.empty(len(values), dtype=dtype, device=device)
        for i, v in enumerate(values):
            out[i].fill_(v)
        return out
    if cached is None:
        cached = _CONSTANTS[key] = torch.tensor(values, dtype=dtype, device=device)
        if len(_CONSTANTS) > CONSTANTS_CACHED:
            _CONSTANTS.popitem(last=False)
    _CONSTANTS.move_to_end(key)
    return cached
