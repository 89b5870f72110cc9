"""Helpers shared by the Triton kernel modules."""

from __future__ import annotations

import struct

import torch
import triton
import triton.language as tl


def f64_bits(x: float) -> int:
    """The bit pattern of ``x`` as a float64, as a signed int64: how a Python float reaches a
    kernel exactly (Triton passes a float argument as float32) without a device tensor, which a
    CUDA graph could not capture when it is built from a Python float on every call."""
    return struct.unpack("<q", struct.pack("<d", float(x)))[0]


@triton.jit
def from_f64_bits(bits, DT: tl.constexpr):
    """Inverse of :func:`f64_bits` inside a kernel, converted to ``DT``."""
    return bits.to(tl.int64).to(tl.float64, bitcast=True).to(DT)


def tl_dtype(dtype: torch.dtype):
    """The Triton compute dtype of tensors of ``dtype``: float64 for float64, else float32."""
    return tl.float64 if dtype == torch.float64 else tl.float32


@triton.jit
def scalar_arg(ptr, bits, HAS_PTR: tl.constexpr, DT: tl.constexpr):
    """A scalar argument given as a one-element tensor (``HAS_PTR``) or as a float's
    :func:`f64_bits`, in ``DT``."""
    if HAS_PTR:
        value = tl.load(ptr).to(DT)
    else:
        value = from_f64_bits(bits, DT)
    return value


@triton.jit
def pixel_steps(H, W, DT: tl.constexpr):
    """The distances ``(step_x, step_y)`` between pixel centres in ``[-1, 1]`` (0 for a side of 1):
    column ``j`` is at ``j * step_x - 1``, as ``kpfast.reference.pixel_centers``."""
    step_x = tl.where(W > 1, 2.0 / tl.maximum(W - 1, 1).to(DT), 0.0).to(DT)
    step_y = tl.where(H > 1, 2.0 / tl.maximum(H - 1, 1).to(DT), 0.0).to(DT)
    return step_x, step_y
