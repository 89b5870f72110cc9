"""``kpfast.soft_argmax``: validation, the ``kpfast::soft_argmax`` custom op, its
autograd, and dispatch to the Triton (CUDA) or C++ (CPU) kernels."""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor

from ..reference import soft_argmax_reference
from . import _checks, _tensors
from .backend import get_backend, kernels


def _n_readouts(readouts: list[Tensor], stacked: bool) -> int:
    return readouts[0].shape[2] if stacked else len(readouts)


@torch.library.custom_op("kpfast::soft_argmax", mutates_args=(), device_types=("cpu", "cuda"))
def _soft_argmax_op(
    heatmaps: Tensor,
    readouts: list[Tensor],
    stacked: bool,
    beta: Optional[Tensor],
    beta_value: float,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    return kernels(backend, heatmaps.device, "soft_argmax").soft_argmax_forward(heatmaps, readouts, stacked, beta, beta_value)


@_soft_argmax_op.register_fake
def _(heatmaps, readouts, stacked, beta, beta_value, backend):
    B, K = heatmaps.shape[:2]
    acc = _tensors.compute_dtype(heatmaps.dtype)
    C = _n_readouts(readouts, stacked)
    return (
        heatmaps.new_empty(B, K, 2, dtype=acc),
        heatmaps.new_empty(B, K, C, dtype=acc),
        heatmaps.new_empty(B, K, 2, dtype=acc),
    )


@torch.library.custom_op("kpfast::soft_argmax_backward", mutates_args=(), device_types=("cpu", "cuda"))
def _soft_argmax_backward_op(
    grad_keypoints: Tensor,
    grad_values: Tensor,
    heatmaps: Tensor,
    readouts: list[Tensor],
    stacked: bool,
    beta: Optional[Tensor],
    beta_value: float,
    keypoints: Tensor,
    values: Tensor,
    stats: Tensor,
    need_heatmaps: bool,
    need_readouts: bool,
    need_beta: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    return kernels(backend, heatmaps.device, "soft_argmax").soft_argmax_backward(
        grad_keypoints, grad_values, heatmaps, readouts, stacked, beta, beta_value, keypoints, values, stats,
        need_heatmaps, need_readouts, need_beta,
    )


@_soft_argmax_backward_op.register_fake
def _(grad_keypoints, grad_values, heatmaps, readouts, stacked, beta, beta_value, keypoints, values, stats,
      need_heatmaps, need_readouts, need_beta, backend):
    B, K, H, W = heatmaps.shape
    C = _n_readouts(readouts, stacked)
    acc = _tensors.compute_dtype(heatmaps.dtype)
    gh = heatmaps.new_empty(B, K, H, W) if need_heatmaps else heatmaps.new_empty(0)
    if need_readouts and C > 0:
        gr = heatmaps.new_empty((B, K, C, H, W) if stacked else (C, B, K, H, W))
    else:
        gr = heatmaps.new_empty(0)
    gb = heatmaps.new_empty(B, K, dtype=acc) if need_beta else heatmaps.new_empty(0, dtype=acc)
    return gh, gr, gb


def _setup_context(ctx, inputs, output):
    heatmaps, readouts, stacked, beta, beta_value, backend = inputs
    keypoints, values, stats = output
    ctx.save_for_backward(heatmaps, beta, keypoints, values, stats, *readouts)
    ctx.stacked, ctx.beta_value, ctx.backend = stacked, beta_value, backend
    ctx.need = (
        heatmaps.requires_grad,
        any(r.requires_grad for r in readouts),
        beta is not None and beta.requires_grad,
    )
    ctx.n_lists = len(readouts)
    ctx.set_materialize_grads(False)  # an unused output's gradient comes as None, not zeros


def _backward(ctx, grad_keypoints, grad_values, _grad_stats):
    heatmaps, beta, keypoints, values, stats, *readouts = ctx.saved_tensors
    need_h, need_r, need_b = ctx.need
    stacked = ctx.stacked
    if grad_keypoints is None:
        grad_keypoints = torch.zeros_like(keypoints)
    if grad_values is None:  # values unused: the readouts enter no gradient (a NaN in them neither)
        readouts, stacked, values, need_r = [], False, values[..., :0], False
        grad_values = torch.zeros_like(values)
    gh, gr, gb = _soft_argmax_backward_op(
        grad_keypoints, grad_values, heatmaps, readouts, stacked, beta, ctx.beta_value,
        keypoints, values, stats, need_h, need_r, need_b, ctx.backend,
    )
    grad_h = gh if need_h else None
    if need_r and values.shape[-1] > 0:
        grad_r = [gr] if ctx.stacked else list(gr.unbind(0))
    else:
        grad_r = [None] * ctx.n_lists
    grad_beta = gb.sum().reshape(beta.shape).to(beta.dtype) if need_b else None
    return grad_h, grad_r, None, grad_beta, None, None


_soft_argmax_op.register_autograd(_backward, setup_context=_setup_context)


def _readouts(readouts, heatmaps: Tensor) -> tuple[list[Tensor], bool]:
    """Validate ``readouts``; returns (list of tensors, stacked)."""
    B, K, H, W = heatmaps.shape
    if readouts is None:
        return [], False
    if isinstance(readouts, Tensor):
        _checks.tensor("readouts", readouts, ndim=5)
        if readouts.shape[:2] != (B, K) or readouts.shape[3:] != (H, W):
            raise ValueError(
                f"readouts must have shape [B, K, C, H, W] = [{B}, {K}, C, {H}, {W}] to match heatmaps, "
                f"got {_checks.describe(readouts)}"
            )
        if readouts.dtype != heatmaps.dtype:
            raise TypeError(f"readouts must have the dtype of heatmaps ({heatmaps.dtype}), got {_checks.describe(readouts)}")
        return [readouts], True
    if isinstance(readouts, (str, bytes)) or not isinstance(readouts, Sequence):
        raise TypeError(
            f"readouts must be a [B, K, C, H, W] tensor, a sequence of [B, K, H, W] tensors or None, "
            f"got {type(readouts).__name__}"
        )
    out = []
    for i, r in enumerate(readouts):
        name = f"readouts[{i}]"
        _checks.tensor(name, r, ndim=4)
        if tuple(r.shape) != (B, K, H, W):
            raise ValueError(f"{name} must have the shape of heatmaps [{B}, {K}, {H}, {W}], got {_checks.describe(r)}")
        if r.dtype != heatmaps.dtype:
            raise TypeError(f"{name} must have the dtype of heatmaps ({heatmaps.dtype}), got {_checks.describe(r)}")
        out.append(r)
    return out, False


def _beta(beta, heatmaps: Tensor) -> tuple[Optional[Tensor], float]:
    """(0-dim tensor or None, float value used when it is None)."""
    if isinstance(beta, Tensor):
        _checks.tensor("beta", beta)
        if beta.numel() != 1 or beta.dim() > 1:
            raise ValueError(f"beta must be a float or a 0-dim tensor, got {_checks.describe(beta)}")
        return beta.reshape(()), 0.0
    if isinstance(beta, (int, float)) and not isinstance(beta, bool):
        if not math.isfinite(beta):
            raise ValueError(f"beta must be finite, got {beta}")
        return None, float(beta)
    raise TypeError(f"beta must be a float or a 0-dim tensor, got {type(beta).__name__}")


def soft_argmax(heatmaps: Tensor, readouts=None, *, beta=1.0) -> tuple[Tensor, Optional[Tensor]]:
    """Keypoints as the softmax expectation of heatmaps, and the same weights reading out other maps.

    The detector head of He et al. (CVPR 2023, Eqs. 1 and 4). For the heatmap ``H_k``
    of each keypoint, over the ``H*W`` pixel centres ``p``::

        w(p) = softmax_p( beta * H_k(p) )
        k    = sum_p w(p) p            (x, y) in [-1, 1], pixel centres at the ends
        r_c  = sum_p w(p) R_c(p)       one value per readout map (uncertainty logit, depth, ...)

    Column ``j`` of a ``W``-wide map sits at ``x = -1 + 2 j / (W - 1)`` (row ``i`` at
    ``y = -1 + 2 i / (H - 1)``), the ``align_corners=True`` convention of kornia's
    ``spatial_expectation2d`` for sides of 2 or more. A side of 1 sits at ``-1``, where
    kornia 0.9 puts it at ``0``: a ``[B, K, 1, W]`` map gives ``y = -1`` here, ``0`` there
    (``x`` agrees). Gradients reach ``heatmaps``, the
    readouts and ``beta``. The fused kernels read each map once (online max and
    normalizer; the Triton forward re-reads a heatmap once per 8 readout channels),
    never materialize the softmax, and keep for backward only the inputs, the outputs
    and two numbers per row (max logit and normalizer): ``O(B*K*C)``.

    Args:
        heatmaps: ``[B, K, H, W]`` logits. Each H x W plane should be contiguous (any
            batch/keypoint strides, e.g. a channel slice of a network output, are read in
            place; other layouts are copied).
        readouts: ``[B, K, C, H, W]``, a sequence of ``C`` maps ``[B, K, H, W]`` (read in
            place, never stacked; on CUDA, 3 or more maps that are not equally spaced in memory
            need a small offset table, copied to the device the first time a layout is seen),
            or None. ``C = 0`` is allowed. Same dtype and device as ``heatmaps``.
        beta: softmax inverse temperature: a finite float or a 0-dim tensor (may require
            grad; its value is not inspected, so there is no host sync, and a NaN beta gives
            NaN). Any sign; ``0`` averages uniformly over the unmasked pixels.

    Returns:
        ``(keypoints [B, K, 2], values [B, K, C])``, or ``(keypoints, None)`` without
        readouts, in the dtype of ``heatmaps`` (float16, bfloat16, float32, float64;
        kernels accumulate in float32, float64 for float64).

    Special values: a ``-inf`` heatmap entry masks its pixel (weight 0 and heatmap
    gradient 0, for any beta). Logits of any finite size give finite results (``+-1e4``,
    all equal). A row masked everywhere has no weights: its keypoint, values and readout
    gradients are NaN, as ``torch.softmax`` gives. NaN in a heatmap row, or a logit
    ``beta * h`` of ``+inf``, makes that row's outputs and gradients NaN (``h = +inf``
    with ``beta < 0`` is a logit of ``-inf``: weight 0); NaN in a readout map makes that
    value NaN (even where the weight is 0) and, if the values are used, that row's
    heatmap and beta gradients; an infinite readout gives an infinite or NaN value. Gradients are those of
    autograd through the reference, on every backend. The backend follows
    :func:`kpfast.use_backend` (CUDA: Triton, CPU: C++). First derivatives only: the
    backward is itself not differentiable (no double backward).

    Example:
        >>> import torch, kpfast
        >>> heat = torch.full((1, 2, 5, 9), -1e4)
        >>> heat[0, 0, 0, 0] = heat[0, 1, 2, 4] = 0.0
        >>> depth = torch.arange(45.0).reshape(1, 1, 5, 9).expand(1, 2, 5, 9)
        >>> kp, values = kpfast.soft_argmax(heat, [depth], beta=2.0)
        >>> kp
        tensor([[[-1., -1.],
                 [ 0.,  0.]]])
        >>> values.squeeze(-1)
        tensor([[ 0., 22.]])
    """
    _checks.tensor("heatmaps", heatmaps, ndim=4)
    B, K, H, W = heatmaps.shape
    if H < 1 or W < 1:
        raise ValueError(f"heatmaps must have at least one pixel (H, W >= 1), got {_checks.describe(heatmaps)}")
    _checks.plane("heatmaps", H, W)
    rs, stacked = _readouts(readouts, heatmaps)
    b, beta_value = _beta(beta, heatmaps)
    _checks.same_device(heatmaps=heatmaps, beta=b, **{f"readouts[{i}]": r for i, r in enumerate(rs)})

    chosen = get_backend()
    if chosen == "reference":
        return soft_argmax_reference(heatmaps, readouts, beta=b if b is not None else beta_value)
    keypoints, values, _ = _soft_argmax_op(heatmaps, rs, stacked, b, beta_value, chosen)
    dtype = heatmaps.dtype
    return keypoints.to(dtype), (values.to(dtype) if readouts is not None else None)
