"""Argument checks shared by the ops: each error names the argument, what it
got (shape, dtype, device) and what was expected, before any kernel runs."""

from __future__ import annotations

from typing import Sequence

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def describe(t: torch.Tensor) -> str:
    return f"shape {tuple(t.shape)}, {str(t.dtype).replace('torch.', '')}, on {t.device}"


def tensor(name: str, t, *, ndim: int | Sequence[int] | None = None, floating: bool = True) -> torch.Tensor:
    """Check that ``t`` is a tensor of the expected rank and (by default) a float dtype."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if t.dim() not in allowed:
            want = " or ".join(str(n) for n in allowed)
            raise ValueError(f"{name} must have {want} dimensions, got {describe(t)}")
    if floating and t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {describe(t)}")
    return t


def same_device(**tensors: torch.Tensor | None) -> torch.device:
    """All given tensors live on one device; return it."""
    present = {k: v for k, v in tensors.items() if isinstance(v, torch.Tensor)}
    devices = {v.device for v in present.values()}
    if len(devices) > 1:
        where = ", ".join(f"{k} on {v.device}" for k, v in present.items())
        raise ValueError(f"all tensors must be on one device, got {where}")
    return next(iter(devices))


def dim_size(name: str, t: torch.Tensor, dim: int, expected: int, what: str) -> None:
    if t.shape[dim] != expected:
        raise ValueError(f"{name} must have {what} = {expected} in dimension {dim}, got {describe(t)}")


PLANE_MAX = 2**31
"""Kernels index inside one ``H x W`` plane with int32 (offsets across planes are int64)."""


def plane(name: str, H: int, W: int) -> None:
    if H * W >= PLANE_MAX:
        raise ValueError(f"{name}: an H x W plane of {H} x {W} = {H * W} pixels is too large (H*W must be below 2^31)")
