"""Helpers shared by the Triton kernel modules."""

from __future__ import annotations

import struct

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
