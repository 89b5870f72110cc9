"""``kpfast.umeyama`` and ``kpfast.part_alignment``: validation, the ``kpfast::umeyama``
and ``kpfast::part_alignment`` custom ops, their autograd, and dispatch to the Triton
(CUDA) or C++ (CPU) kernels. Semantics: :func:`kpfast.reference.umeyama_reference`
and :func:`kpfast.reference.part_alignment_reference`."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..reference import part_alignment_reference, umeyama_reference, umeyama_tolerances
from . import _checks, _tensors
from .backend import extension, get_backend, kernels


def _check_weights_cpu(weights: Optional[Tensor]) -> None:
    """Negative weights are rejected on CPU tensors (free there); on CUDA the check would
    need a host synchronization, so it is skipped (see the docstrings)."""
    if weights is not None and weights.device.type == "cpu" and weights.numel() and bool((weights < 0).any()):
        raise ValueError(f"weights must be non-negative, got a minimum of {weights.min().item()}")


def _tol(dtype: torch.dtype) -> tuple[float, float, float]:
    t = umeyama_tolerances(dtype)
    return t["spread"], t["corr"], t["tie"]


# ------------------------------------------------------------------------------ umeyama


@torch.library.custom_op("kpfast::umeyama", mutates_args=(), device_types=("cpu", "cuda"))
def _umeyama_op(
    src: Tensor, dst: Tensor, weights: Optional[Tensor], scale: bool, backend: str
) -> tuple[Tensor, Tensor, Tensor]:
    _check_weights_cpu(weights)
    return kernels(backend, src.device, "umeyama").umeyama_forward(src, dst, weights, scale, _tol(src.dtype))


@_umeyama_op.register_fake
def _(src, dst, weights, scale, backend):
    N, _, D = src.shape
    return src.new_empty(N, D, D), src.new_empty(N), src.new_empty(N, D)


@torch.library.custom_op("kpfast::umeyama_backward", mutates_args=(), device_types=("cpu", "cuda"))
def _umeyama_backward_op(
    grad_R: Tensor, grad_s: Tensor, grad_t: Tensor, src: Tensor, dst: Tensor, weights: Optional[Tensor],
    scale: bool, backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    return kernels(backend, src.device, "umeyama").umeyama_backward(
        grad_R, grad_s, grad_t, src, dst, weights, scale, _tol(src.dtype)
    )


@_umeyama_backward_op.register_fake
def _(grad_R, grad_s, grad_t, src, dst, weights, scale, backend):
    N, M, D = src.shape
    dt = _tensors.compute_dtype(src.dtype)
    return src.new_empty(N, M, D, dtype=dt), src.new_empty(N, M, D, dtype=dt), src.new_empty(N, M, dtype=dt)


def _umeyama_setup_context(ctx, inputs, output):
    src, dst, weights, scale, backend = inputs
    ctx.save_for_backward(src, dst, weights)
    ctx.scale, ctx.backend = scale, backend


def _umeyama_backward(ctx, grad_R, grad_s, grad_t):
    src, dst, weights = ctx.saved_tensors
    N, _, D = src.shape
    grad_R = torch.zeros(N, D, D, dtype=src.dtype, device=src.device) if grad_R is None else grad_R
    grad_s = torch.zeros(N, dtype=src.dtype, device=src.device) if grad_s is None else grad_s
    grad_t = torch.zeros(N, D, dtype=src.dtype, device=src.device) if grad_t is None else grad_t
    g_src, g_dst, g_w = _umeyama_backward_op(grad_R, grad_s, grad_t, src, dst, weights, ctx.scale, ctx.backend)
    g_w = None if weights is None else g_w.to(weights.dtype)
    return g_src.to(src.dtype), g_dst.to(dst.dtype), g_w, None, None


_umeyama_op.register_autograd(_umeyama_backward, setup_context=_umeyama_setup_context)


def _points(name: str, t) -> Tensor:
    _checks.tensor(name, t)
    if t.dim() < 2 or t.shape[-1] not in (2, 3):
        raise ValueError(f"{name} must have shape [..., M, D] with D in (2, 3), got {_checks.describe(t)}")
    return t


def umeyama(src: Tensor, dst: Tensor, weights: Optional[Tensor] = None, *, scale: bool = True):
    """Weighted least-squares similarity (or rigid) fit carrying ``src`` onto ``dst`` (Umeyama 1991).

    Minimizes ``sum_m w_m |dst_m - (s R src_m + t)|^2`` over proper rotations ``R``
    (``det R = +1``; a reflection is corrected with ``diag(1, .., 1, sign(det U det V))``),
    scales ``s`` (``s = 1`` when ``scale=False``) and translations ``t``. The weighted
    cross-covariance ``Sigma = sum w (dst - mu_d)(src - mu_s)^T / sum w`` uses ``w``
    itself (not ``w^2`` as pytorch3d's ``corresponding_points_alignment``), matching
    ``roma.rigid_points_registration``. 2D is solved in closed form, 3D with Horn's
    quaternion method (Jacobi eigen-decomposition of a symmetric 4x4 matrix) in
    registers: no ``torch.linalg.svd`` and no host synchronization.

    Leading dimensions: ``src [*a, M, D]``, ``dst [*b, M, D]`` and ``weights [*c, M]``
    broadcast their batch dimensions ``a``, ``b``, ``c`` to one batch shape ``*N``
    (``torch.broadcast_shapes``); the fits run flattened as ``[prod(N), M, D]`` and
    the results come back as ``R [*N, D, D]``, ``s [*N]``, ``t [*N, D]`` (so a single
    ``[M, D]`` problem gives ``R [D, D]``, a 0-dim ``s``, ``t [D]``). ``M = 0`` is valid.

    Degenerate problems give finite values and finite gradients, defined (identically
    in the reference and the kernels; tolerances :data:`kpfast.reference.UMEYAMA_TOL`):

    - no source spread (one point, coincident points, ``sum w = 0``): ``R = I``,
      ``s = 1``, ``t = mu_d - mu_s`` (a pure translation; ``t = 0`` when ``sum w = 0``);
    - no target spread: ``R = I``, ``s = 0`` (1 with ``scale=False``), ``t = mu_d - s mu_s``;
    - uncorrelated source and target: ``R = I``, ``s = tr(Sigma) / var_src``;
    - 3D collinear or two-point sets (the rotation about the line is free): the optimal
      rotation closest to the identity (the smallest rotation carrying the source line
      onto the target line); its gradient has no component about that line.

    In the first three cases ``R`` (and ``s`` in the first two) are constants for
    autograd; with ``sum w = 0`` the fit is not differentiable in the weights (it jumps to
    ``t = dst_m - src_m`` as soon as one weight ``w_m`` turns positive) and every gradient
    of the problem is 0. Gradients stay finite when singular values coincide (a regular
    tetrahedron aligned to itself): the rotation is differentiated through its optimality
    condition, whose denominators are sums, not differences, of singular values. A
    reflected target whose two smaller singular values coincide has no unique best
    rotation; one of them is returned.

    Non-finite inputs: a problem with a NaN or infinite coordinate (in ``src`` or ``dst``)
    or weight, at any point and whatever that point's weight, returns NaN ``R``, ``t`` and
    ``s`` (``s = 1`` with ``scale=False``), and its backward gives NaN gradients to all of
    its ``src``, ``dst`` and ``weights``, whatever the incoming gradient. The other
    problems of the batch are unaffected. Every fit runs in its own frame (shifted to a
    centroid and divided by a power of two near its largest coordinate), so float32 fits
    are as accurate from coordinates of about 1e-30 to 1e20 as near 1.

    Args:
        src: ``[..., M, D]`` source points, D in {2, 3}.
        dst: ``[..., M, D]`` target points on the same device (any float dtype: converted
            to the dtype of ``src``, as ``weights``).
        weights: ``[..., M]`` non-negative weights, or None (ones).
            Negative weights are rejected on CPU; on CUDA they are not checked (that
            would synchronize) and give the formula's value, not a least-squares fit.
        scale: fit the scale (similarity); ``False`` fits a rigid motion, ``s = 1``.

    Returns:
        ``(R [*N, D, D], s [*N], t [*N, D])`` in the dtype of ``src`` (kernels compute in
        float32, float64 for float64 inputs), with ``dst ~ s * src @ R.mT + t``.

    The backend follows :func:`kpfast.use_backend` (CUDA: Triton, CPU: C++).

    Example:
        >>> import math, torch, kpfast
        >>> src = torch.tensor([[0., 0., 0.], [1., 0., 0.], [0., 2., 0.], [0., 0., 3.]])
        >>> c, s_ = math.cos(0.3), math.sin(0.3)
        >>> Rz = torch.tensor([[c, -s_, 0.], [s_, c, 0.], [0., 0., 1.]])
        >>> R, s, t = kpfast.umeyama(src, 2.0 * src @ Rz.T + torch.tensor([1., 2., 3.]))
        >>> torch.allclose(R, Rz, atol=1e-5), round(float(s), 4), t.round(decimals=4)
        (True, 2.0, tensor([1., 2., 3.]))
    """
    _points("src", src)
    _points("dst", dst)
    M, D = src.shape[-2:]
    if tuple(dst.shape[-2:]) != (M, D):
        raise ValueError(f"dst must have shape [..., M, D] = [..., {M}, {D}] like src, got {_checks.describe(dst)}")
    batch_shapes = [src.shape[:-2], dst.shape[:-2]]
    if weights is not None:
        _checks.tensor("weights", weights)
        if weights.dim() < 1 or weights.shape[-1] != M:
            raise ValueError(f"weights must have shape [..., M] with M = {M}, got {_checks.describe(weights)}")
        batch_shapes.append(weights.shape[:-1])
    if not isinstance(scale, bool):
        raise TypeError(f"scale must be a bool, got {type(scale).__name__}")
    _checks.same_device(src=src, dst=dst, weights=weights)
    try:
        batch = torch.broadcast_shapes(*batch_shapes)
    except RuntimeError as err:
        shapes = ", ".join(str(tuple(s)) for s in batch_shapes)
        raise ValueError(f"the batch dimensions of src, dst (and weights) must broadcast, got {shapes}") from err

    N = 1
    for d in batch:
        N *= d
    x = src.expand(*batch, M, D).reshape(N, M, D)
    y = dst.to(src.dtype).expand(*batch, M, D).reshape(N, M, D)
    w = None if weights is None else weights.to(src.dtype).expand(*batch, M).reshape(N, M)
    chosen = get_backend()
    if chosen == "reference":
        _check_weights_cpu(w)
        R, s, t = umeyama_reference(x, y, w, scale=scale)
    else:
        R, s, t = _umeyama_op(x, y, w, scale, chosen)
    return R.reshape(*batch, D, D), s.reshape(batch), t.reshape(*batch, D)


# ----------------------------------------------------------------------- part_alignment


@torch.library.custom_op("kpfast::part_alignment", mutates_args=(), device_types=("cpu", "cuda"))
def _part_alignment_op(
    points: Tensor, parts: Tensor, weights: Optional[Tensor], scale: bool, full: bool, backend: str
) -> tuple[Tensor, Tensor]:
    _check_weights_cpu(weights)
    return kernels(backend, points.device, "part_alignment").part_alignment_forward(
        points, parts, weights, scale, full, _tol(points.dtype)
    )


@_part_alignment_op.register_fake
def _(points, parts, weights, scale, full, backend):
    B, P = points.shape[0], parts.shape[0]
    record = points.new_empty(B, B, P, extension().PART_RECORD_SIZE, dtype=_tensors.compute_dtype(points.dtype))
    return points.new_empty(B, B, P), record


@torch.library.custom_op("kpfast::part_alignment_backward", mutates_args=(), device_types=("cpu", "cuda"))
def _part_alignment_backward_op(
    grad_r: Tensor, r: Tensor, record: Tensor, points: Tensor, parts: Tensor, weights: Optional[Tensor],
    scale: bool, full: bool, backend: str,
) -> tuple[Tensor, Tensor]:
    return kernels(backend, points.device, "part_alignment").part_alignment_backward(
        grad_r, r, record, points, parts, weights, scale, full
    )


@_part_alignment_backward_op.register_fake
def _(grad_r, r, record, points, parts, weights, scale, full, backend):
    B, K, D = points.shape
    dt = _tensors.compute_dtype(points.dtype)
    return points.new_empty(B, K, D, dtype=dt), points.new_empty(B, K, dtype=dt)


def _part_setup_context(ctx, inputs, output):
    points, parts, weights, scale, full, backend = inputs
    ctx.save_for_backward(points, parts, weights, output[0], output[1])
    ctx.scale, ctx.full, ctx.backend = scale, full, backend


def _part_backward(ctx, grad_r, _grad_record):
    points, parts, weights, r, record = ctx.saved_tensors
    if grad_r is None:
        grad_r = torch.zeros_like(r)
    gx, gw = _part_alignment_backward_op(grad_r, r, record, points, parts, weights, ctx.scale, ctx.full, ctx.backend)
    gw = None if weights is None else gw.to(weights.dtype)
    return gx.to(points.dtype), None, gw, None, None, None


_part_alignment_op.register_autograd(_part_backward, setup_context=_part_setup_context)


def part_alignment(
    points: Tensor,
    parts: Tensor,
    weights: Optional[Tensor] = None,
    *,
    scale: bool = True,
    detach_transform: bool = True,
) -> Tensor:
    """Per-part similarity-alignment residuals between all pairs of samples (paper Eq. 5).

    For samples ``i, j`` and part ``p``, the similarity ``(R, s, t)`` of :func:`umeyama`
    carrying part ``p`` of sample ``j`` onto part ``p`` of sample ``i`` is fitted, and::

        r[i, j, p] = sum_k c_k |points[i, k] - (s R points[j, k] + t)|_1 / sum_k c_k,
        c_k = parts[p, k] * w[i, k] * w[j, k]         (w = 1 without weights)

    the (weighted) mean over the part's points of the L1 norm of the residual vector.
    ``r[i, i, p] = 0`` exactly (the self-fit), and ``r = 0`` for a part with no weight.
    Degenerate parts (one or two points, coincident or collinear points, zero weights)
    follow :func:`umeyama`'s definitions. All ``B*B*P`` fits and residuals run in one
    kernel launch, each solve in registers, without host synchronization.

    Gradients reach ``points`` and ``weights``. With ``detach_transform=True`` (the
    paper's choice: "the shape instead of transformation itself would be optimized")
    they flow only through the explicit ``points[i, k]`` and ``points[j, k]`` (and
    ``c_k``) of the residual, ``(R, s, t)`` held constant; with ``False`` also through
    the fitted transform (implicit-function derivative of the rotation, finite at
    coinciding singular values). The L1 subgradient at a zero residual component is 0
    (as ``torch.abs``); parts that fit exactly (one or two points) have residuals at
    rounding level, whose signs are rounding noise. A part with no weight (``sum_k c_k =
    0``) has ``r = 0`` and gives no gradient.

    Non-finite inputs: points outside a part never enter its fits, and a NaN or infinite
    coordinate or weight makes ``r[i, j, p]`` NaN exactly for the pairs ``i != j`` of its
    sample and the parts ``p`` that contain that point (whatever its weight); backward then
    gives NaN gradients to every coordinate and weight of those parts' points in both
    samples, whatever the incoming gradient, and leaves the other points' gradients as
    they are. ``r[i, i, p]`` stays 0.

    Invariances (``scale=True``): ``r[i, j, p]`` does not change when any similarity
    (proper rotation, positive scale, translation) is applied to sample ``j`` alone;
    applying ``a Q x + b`` to every sample with ``Q`` a signed permutation (the
    rotations and reflections that preserve the L1 norm) multiplies ``r`` by ``a``. A
    general rotation of every sample changes ``r`` (the L1 norm is not rotation
    invariant). With ``scale=False`` the first holds for rigid motions of sample ``j``
    and the second when every sample gets the same scale ``a``.

    Args:
        points: ``[B, K, D]`` keypoints, D in {2, 3} (the paper's ``(x, y, depth)``).
        parts: ``[P, K]`` bool mask, one row per part (the whole object may be a part).
        weights: ``[B, K]`` non-negative per-keypoint weights (any float dtype: converted to
            the dtype of ``points``), or None.
            Negative weights are rejected on CPU, not checked on CUDA (see :func:`umeyama`).
        scale: fit similarities (``True``) or rigid motions (``False``).
        detach_transform: hold the fitted transforms constant in backward.

    Returns:
        ``r [B, B, P]`` in the dtype of ``points``.

    The backend follows :func:`kpfast.use_backend` (CUDA: Triton, CPU: C++).

    Example:
        >>> import torch, kpfast
        >>> g = torch.Generator().manual_seed(0)
        >>> pts = torch.randn(3, 6, 3, generator=g)
        >>> parts = torch.tensor([[1, 1, 1, 0, 0, 0], [0, 0, 0, 1, 1, 1], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
        >>> pts[1] = 2.0 * pts[0] + 1.0            # sample 1 is a similar copy of sample 0
        >>> r = kpfast.part_alignment(pts, parts)
        >>> r.shape, bool(r[0, 1].abs().max() < 1e-5), bool((r[0, 2] > 0).all())
        (torch.Size([3, 3, 3]), True, True)
    """
    _checks.tensor("points", points, ndim=3)
    B, K, D = points.shape
    if D not in (2, 3):
        raise ValueError(f"points must have shape [B, K, D] with D in (2, 3), got {_checks.describe(points)}")
    if B < 1 or K < 1:
        raise ValueError(f"points must hold at least one sample and one keypoint, got {_checks.describe(points)}")
    if not isinstance(parts, Tensor):
        raise TypeError(f"parts must be a [P, K] bool tensor, got {type(parts).__name__}")
    if parts.dtype != torch.bool:
        raise TypeError(f"parts must be a bool tensor, got {_checks.describe(parts)}")
    if parts.dim() != 2 or parts.shape[1] != K:
        raise ValueError(f"parts must have shape [P, K] with K = {K}, got {_checks.describe(parts)}")
    if weights is not None:
        _checks.tensor("weights", weights, ndim=2)
        if tuple(weights.shape) != (B, K):
            raise ValueError(f"weights must have shape [B, K] = [{B}, {K}], got {_checks.describe(weights)}")
    for name, flag in (("scale", scale), ("detach_transform", detach_transform)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {type(flag).__name__}")
    _checks.same_device(points=points, parts=parts, weights=weights)
    weights = None if weights is None else weights.to(points.dtype)

    chosen = get_backend()
    if chosen == "reference":
        _check_weights_cpu(weights)
        return part_alignment_reference(points, parts, weights, scale=scale, detach_transform=detach_transform)
    r, _ = _part_alignment_op(points, parts, weights, scale, not detach_transform, chosen)
    return r
