"""Dtype, layout and device helpers shared by the ops and both kernel families."""

from __future__ import annotations

import contextlib
import functools
from collections import OrderedDict
from typing import Optional, Sequence

import torch
from torch import Tensor

from ..reference import compute_dtype


def compute(t: Optional[Tensor], dtype: Optional[torch.dtype] = None, *, contiguous: bool = True) -> Optional[Tensor]:
    """``t`` in ``dtype`` (default: its compute dtype, :func:`compute_dtype`) and contiguous unless
    ``contiguous=False``; None stays None. No copy when nothing changes."""
    if t is None:
        return None
    t = t.to(compute_dtype(t.dtype) if dtype is None else dtype)
    return t.contiguous() if contiguous else t


def planes(t: Tensor) -> Tensor:
    """``t`` itself when each trailing H x W plane is contiguous (any leading strides), else a contiguous copy."""
    H, W = t.shape[-2:]
    if (W == 1 or t.stride(-1) == 1) and (H == 1 or t.stride(-2) == W) and all(s >= 0 for s in t.stride()):
        return t
    return t.contiguous()


def plane_list(readouts: Sequence[Tensor], stacked: bool) -> list[Tensor]:
    """Readout maps with contiguous planes: a stacked ``[B, K, C, H, W]`` tensor (``stacked``, one
    element), or maps sharing one (batch, keypoint) stride pair.

    Channel slices of one tensor (``out.chunk(3, dim=1)``) and separately allocated
    contiguous maps pass through without a copy; only maps laid out differently are copied.
    """
    rs = [planes(r) for r in readouts]
    if not stacked and len({(r.stride(0), r.stride(1)) for r in rs}) > 1:
        rs = [r.contiguous() for r in rs]
    return rs


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
