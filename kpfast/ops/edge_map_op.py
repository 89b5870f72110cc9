"""``kpfast.edge_map``: validation, the ``kpfast::edge_map`` custom op, its
autograd, and dispatch to the Triton (CUDA) or C++ (CPU) kernels."""

from __future__ import annotations

import operator
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..reference import EDGE_EPS, EDGE_MODES, edge_map_reference
from . import _checks, _tensors
from .backend import extension, get_backend, kernels


def _check_values(edges: Optional[Tensor], K: int, sigma2: Optional[Tensor]) -> None:
    """The checks that need tensor data: indices of ``edges`` in ``[0, K)`` and ``sigma2 > 0``
    (None: checked on the host already). Right before a launch, with one host sync on CUDA
    whatever is checked (more only to word an error), and none while a CUDA graph is captured,
    where a sync is not allowed."""
    tensors = [t for t in (edges, sigma2) if t is not None]
    if not tensors or _tensors.capturing(tensors[0].device):
        return
    bad = []
    if edges is not None:
        bad.append(((edges < 0) | (edges >= K)).any())
    if sigma2 is not None:
        bad.append(~(sigma2 > 0))
    if not any(torch.stack(bad).tolist()):
        return
    if edges is not None and ((edges < 0) | (edges >= K)).any():
        index = edges[(edges < 0) | (edges >= K)][0].item()
        raise ValueError(f"edges: index {index} is outside [0, K) with K = {K}")
    raise ValueError(f"sigma2 must be > 0, got {sigma2.item()}")


@torch.library.custom_op("kpfast::edge_map_checked_edges", mutates_args=(), device_types=("cpu", "cuda"))
def _checked_edges(edges: Tensor, K: int, sigma2: Optional[Tensor], check_edges: bool) -> Tensor:
    """A copy of ``edges`` after :func:`_check_values`, for the reference backend: as an opaque op
    the data-dependent checks do not break ``torch.compile(fullgraph=True)``, and the copy (which
    the reference indexes with) keeps the check in the graph."""
    _check_values(edges if check_edges else None, K, sigma2)
    return edges.clone()


@_checked_edges.register_fake
def _(edges, K, sigma2, check_edges):
    return torch.empty_like(edges)


@torch.library.custom_op("kpfast::edge_map", mutates_args=(), device_types=("cpu", "cuda"))
def _edge_map_op(
    keypoints: Tensor,
    edges: Tensor,
    height: int,
    width: int,
    uncertainty: Optional[Tensor],
    edge_weight: Optional[Tensor],
    sigma2: Optional[Tensor],
    sigma2_value: float,
    precision: bool,
    backend: str,
    check_edges: bool,
) -> tuple[Tensor, Tensor]:
    """``sigma2``: a 0-dim tensor, or None for the float ``sigma2_value`` (checked by the
    caller). ``check_edges=False``: the caller checked the edge indices on the host."""
    _check_values(edges if check_edges else None, keypoints.shape[1], sigma2)
    return kernels(backend, keypoints.device, "edge_map").edge_map_forward(
        keypoints, edges, uncertainty, edge_weight, sigma2, sigma2_value, height, width, precision, EDGE_EPS
    )


@_edge_map_op.register_fake
def _(keypoints, edges, height, width, uncertainty, edge_weight, sigma2, sigma2_value, precision, backend, check_edges):
    B = keypoints.shape[0]
    out = keypoints.new_empty(B, height, width)
    return out, keypoints.new_empty(B, height, width, dtype=torch.int32)


@torch.library.custom_op("kpfast::edge_map_backward", mutates_args=(), device_types=("cpu", "cuda"))
def _edge_map_backward_op(
    grad_out: Tensor,
    winner: Tensor,
    keypoints: Tensor,
    edges: Tensor,
    uncertainty: Optional[Tensor],
    edge_weight: Optional[Tensor],
    sigma2: Optional[Tensor],
    sigma2_value: float,
    precision: bool,
    backend: str,
) -> Tensor:
    return kernels(backend, keypoints.device, "edge_map").edge_map_backward(
        grad_out, winner, keypoints, edges, uncertainty, edge_weight, sigma2, sigma2_value, precision, EDGE_EPS
    )


@_edge_map_backward_op.register_fake
def _(grad_out, winner, keypoints, edges, uncertainty, edge_weight, sigma2, sigma2_value, precision, backend):
    ngrad = extension().EDGE_MAP_NGRAD
    return keypoints.new_empty(keypoints.shape[0], edges.shape[0], ngrad, dtype=_tensors.compute_dtype(keypoints.dtype))


def _setup_context(ctx, inputs, output):
    keypoints, edges, _, _, uncertainty, edge_weight, sigma2, sigma2_value, precision, backend, _ = inputs
    ctx.save_for_backward(keypoints, edges, uncertainty, edge_weight, sigma2, output[1])
    ctx.sigma2_value, ctx.precision, ctx.backend = sigma2_value, precision, backend


def _edge_sum(per_edge: Tensor, incidence: Tensor) -> Tensor:
    """``[B, E, C]`` per-edge values summed into their keypoints, ``[B, K, C]``, with the 0/1
    ``incidence [E, K]`` of one endpoint: a product with one-hot matrices (deterministic on every
    device), in which a non-finite value reaches only its own keypoints (a plain product would
    spread ``0 * NaN`` to every keypoint): finite parts are summed by the product, and the NaN and
    infinities are counted by keypoint and put back as a sum would give them."""
    finite = torch.isfinite(per_edge)
    total = torch.einsum("bec,ek->bkc", torch.where(finite, per_edge, 0.0), incidence)
    inf = float("inf")
    kinds = torch.stack((per_edge.isnan(), per_edge == inf, per_edge == -inf), -1).to(incidence.dtype)
    nan, pos, neg = (torch.einsum("becf,ek->bkcf", kinds, incidence) > 0).unbind(-1)
    total = torch.where(pos, inf, torch.where(neg, -inf, total))
    return torch.where(nan | (pos & neg), float("nan"), total)


def _backward(ctx, grad_out, _grad_winner):
    keypoints, edges, uncertainty, edge_weight, sigma2, winner = ctx.saved_tensors
    ge = _edge_map_backward_op(  # per edge: d/d(a_x, a_y, b_x, b_y, v_i, v_j, w, sigma2)
        grad_out, winner, keypoints, edges, uncertainty, edge_weight, sigma2, ctx.sigma2_value, ctx.precision, ctx.backend
    )
    K = keypoints.shape[1]
    first = F.one_hot(edges[:, 0], K).to(ge.dtype)
    second = F.one_hot(edges[:, 1], K).to(ge.dtype)
    grad_kp = _edge_sum(ge[..., 0:2], first) + _edge_sum(ge[..., 2:4], second)
    grad_unc = grad_w = None
    if uncertainty is not None and ctx.needs_input_grad[4]:
        grad_unc = (_edge_sum(ge[..., 4:5], first) + _edge_sum(ge[..., 5:6], second))[..., 0].to(uncertainty.dtype)
    if edge_weight is not None and ctx.needs_input_grad[5]:
        gw = ge[..., 6]
        grad_w = (gw if edge_weight.dim() == 2 else gw.sum(0)).to(edge_weight.dtype)
    grad_s2 = ge[..., 7].sum().reshape(sigma2.shape).to(sigma2.dtype) if sigma2 is not None and ctx.needs_input_grad[6] else None
    return grad_kp.to(keypoints.dtype), None, None, None, grad_unc, grad_w, grad_s2, None, None, None, None


_edge_map_op.register_autograd(_backward, setup_context=_setup_context)


def _size(size) -> tuple[int, int]:
    if isinstance(size, int) and not isinstance(size, bool):
        hw = (size, size)
    elif isinstance(size, Sequence) and len(size) == 2 and all(isinstance(v, int) and not isinstance(v, bool) for v in size):
        hw = (int(size[0]), int(size[1]))
    else:
        raise TypeError(f"size must be an int or a pair (H, W) of ints, got {size!r}")
    if min(hw) < 1:
        raise ValueError(f"size must be positive, got {hw}")
    _checks.plane("size", *hw)
    return hw


def edge_pairs(edges) -> Optional[tuple[int, ...]]:
    """The indices of edges given as a sequence of ``(i, j)`` integer pairs, flattened
    (``(i0, j0, i1, j1, ...)``), None for a tensor; an error that names ``edges`` for anything
    else. Nothing is coerced: float or bool indices and flat or ragged lists are rejected."""
    if isinstance(edges, Tensor):
        return None
    if isinstance(edges, (str, bytes)) or not hasattr(edges, "__iter__"):
        raise TypeError(f"edges must be an [E, 2] integer tensor or a sequence of (i, j) pairs, got {type(edges).__name__}")
    flat = []
    for pair in edges:
        if isinstance(pair, (str, bytes)) or not hasattr(pair, "__len__") or len(pair) != 2:
            raise ValueError(f"edges must be a sequence of (i, j) pairs, got {pair!r} in it")
        try:
            if any(isinstance(v, bool) for v in pair):
                raise TypeError
            flat += [operator.index(pair[0]), operator.index(pair[1])]
        except TypeError:
            raise TypeError(f"edges must hold integer indices, got the pair {pair!r}") from None
    return tuple(flat)


def edge_tensor(edges, device: Optional[torch.device] = None) -> Tensor:
    """``edges`` as an ``[E, 2]`` int64 tensor, or an error that names ``edges``.

    Takes an integer tensor of that shape (which must be on ``device`` when one is given) or a
    sequence of ``(i, j)`` pairs of integers (see :func:`edge_pairs`), put on ``device`` (default
    the CPU).
    """
    flat = edge_pairs(edges)
    if flat is not None:
        return torch.tensor(flat, dtype=torch.int64, device=device).reshape(-1, 2)
    if edges.dtype.is_floating_point or edges.dtype.is_complex or edges.dtype == torch.bool:
        raise TypeError(f"edges must hold integers, got {_checks.describe(edges)}")
    if edges.dim() != 2 or edges.shape[1] != 2:
        raise ValueError(f"edges must have shape [E, 2], got {_checks.describe(edges)}")
    if device is not None and edges.device != device:
        raise ValueError(f"all tensors must be on one device, got keypoints on {device}, edges on {edges.device}")
    return edges.to(torch.int64)


def edge_map(
    keypoints: Tensor,
    edges,
    size,
    *,
    uncertainty: Optional[Tensor] = None,
    edge_weight: Optional[Tensor] = None,
    sigma2=1e-3,
    mode: str = "intensity",
) -> Tensor:
    """Render a skeleton as the max over edges of uncertainty-weighted Gaussian lines.

    For every pixel centre ``p`` and edge ``e = (i, j)`` with ``a = k_i``, ``b = k_j``::

        t   = clamp((p - a)·(b - a) / |b - a|^2, 0, 1)      (0 for a zero-length edge)
        d2  = squared distance from p to the segment [a, b]
        u   = sigmoid((1 - t) v_i + t v_j)                 (1 without uncertainty)
        "intensity": S_e = w_e u exp(-d2 / sigma2)     "precision": S_e = w_e exp(-u d2 / sigma2)
        S(p) = max_e S_e(p)

    Only the winning edge of a pixel (the lowest index on ties, as ``torch.max``)
    receives its gradient; gradients reach ``keypoints``, ``uncertainty``,
    ``edge_weight`` and ``sigma2``. The fused kernels keep one int32 ``[B, H, W]``
    winner map for backward, never anything of size ``B*E*H*W``.

    Args:
        keypoints: ``[B, K, 2]`` (x, y) in [-1, 1], pixel centres at the ends
            (``align_corners=True``). Points outside the image are fine.
        edges: ``[E, 2]`` integer tensor on the keypoints' device, or a sequence of
            ``(i, j)`` pairs of integers, indices in ``[0, K)`` (nothing is coerced: float
            indices or other shapes are an error). ``E = 0`` gives zeros.
        size: ``H`` or ``(H, W)`` of the output.
        uncertainty: ``[B, K]`` logits ``v`` (the paper's keypoint uncertainty), or None.
        edge_weight: ``[E]`` or ``[B, E]`` non-negative weights ``w`` (AutoLink's learned
            weights, the paper's global ``alpha``), or None for ones.
        sigma2: line thickness ``sigma^2`` in normalized units: a positive float or a
            0-dim tensor (may require grad).
        mode: ``"intensity"`` (uncertain edges drawn lighter; the paper's text) or
            ``"precision"`` (uncertain edges drawn wider; Eq. 6 with its sign restored).

    Returns:
        ``[B, H, W]`` in the dtype of ``keypoints`` (float16, bfloat16, float32 or float64;
        kernels accumulate in float32, float64 for float64). ``uncertainty``, ``edge_weight``
        and ``sigma2`` may have any float dtype: they are used in the keypoints' compute
        dtype, and their gradients come back in their own dtypes.

    Degenerate and non-finite inputs: zero-length edges, ``E = 0`` (zeros), ``K = 1``,
    coincident keypoints and zero weights give finite values and gradients. ``S_e``
    follows IEEE arithmetic and NaN wins the max as in ``torch.max`` (the lowest NaN
    edge is the pixel's winner), so a NaN among an edge's inputs (either keypoint, its
    logit, the edge's weight) makes every pixel of that sample NaN; infinite inputs give
    infinite or NaN values. Gradients are those of autograd through the reference: each
    pixel's goes to its winner, and an edge with a NaN or infinite input also passes
    ``0 *`` its derivatives from every other pixel, so NaN gradients reach only the
    inputs of such edges and ``sigma2``; inputs of finite edges keep finite gradients
    (zero where a NaN edge wins every pixel). Same on every backend.
    The backend follows :func:`kpfast.use_backend` (CUDA: Triton, CPU: C++). On CUDA a call
    syncs with the host once when ``edges`` or ``sigma2`` is a tensor (to check their values
    before the launch) and never otherwise, nor while a CUDA graph is captured (the checks
    are skipped); a float ``sigma2`` reaches the kernels as a value and a list of edges is
    copied to the device once, so both can be captured.

    Example:
        >>> import torch, kpfast
        >>> kp = torch.tensor([[[-1.0, 0.0], [1.0, 0.0]]])  # a horizontal line through the middle row
        >>> kpfast.edge_map(kp, [(0, 1)], (3, 4), sigma2=1.0)
        tensor([[[0.3679, 0.3679, 0.3679, 0.3679],
                 [1.0000, 1.0000, 1.0000, 1.0000],
                 [0.3679, 0.3679, 0.3679, 0.3679]]])
    """
    _checks.tensor("keypoints", keypoints, ndim=3)
    if keypoints.shape[-1] != 2:
        raise ValueError(f"keypoints must have shape [B, K, 2], got {_checks.describe(keypoints)}")
    B, K = keypoints.shape[:2]
    if K < 1:
        raise ValueError(f"keypoints must hold at least one keypoint, got {_checks.describe(keypoints)}")
    device = keypoints.device
    H, W = _size(size)
    flat = edge_pairs(edges)
    if flat is None:
        e = edge_tensor(edges, device)
    else:  # checked here, on the host: no sync for it later
        if flat and not 0 <= min(flat) <= max(flat) < K:
            bad = next(i for i in flat if not 0 <= i < K)
            raise ValueError(f"edges: index {bad} is outside [0, K) with K = {K}")
        e = _tensors.device_constant(flat, torch.int64, device).reshape(-1, 2)  # copied once per list
    E = e.shape[0]
    if uncertainty is not None:
        _checks.tensor("uncertainty", uncertainty, ndim=2)
        if tuple(uncertainty.shape) != (B, K):
            raise ValueError(f"uncertainty must have shape [B, K] = [{B}, {K}], got {_checks.describe(uncertainty)}")
    if edge_weight is not None:
        _checks.tensor("edge_weight", edge_weight, ndim=(1, 2))
        if tuple(edge_weight.shape) not in ((E,), (B, E)):
            raise ValueError(f"edge_weight must have shape [E] or [B, E] with B = {B}, E = {E}, got {_checks.describe(edge_weight)}")
    if isinstance(sigma2, Tensor):
        _checks.tensor("sigma2", sigma2)
        if sigma2.numel() != 1 or sigma2.dim() > 1:
            raise ValueError(f"sigma2 must be a float or a 0-dim tensor, got {_checks.describe(sigma2)}")
        s2, s2_value = sigma2.reshape(()), 0.0
    elif isinstance(sigma2, (int, float)) and not isinstance(sigma2, bool):
        if not sigma2 > 0:
            raise ValueError(f"sigma2 must be > 0, got {sigma2}")
        s2, s2_value = None, float(sigma2)  # a kernel argument: no device tensor per call
    else:
        raise TypeError(f"sigma2 must be a positive float or a 0-dim tensor, got {type(sigma2).__name__}")
    if mode not in EDGE_MODES:
        raise ValueError(f"mode must be one of {EDGE_MODES}, got {mode!r}")
    _checks.same_device(keypoints=keypoints, uncertainty=uncertainty, edge_weight=edge_weight, sigma2=s2)

    chosen = get_backend()
    if chosen == "reference":
        if flat is None or s2 is not None:
            e = _checked_edges(e, K, s2, flat is None)
        return edge_map_reference(
            keypoints, e, (H, W), uncertainty=uncertainty, edge_weight=edge_weight,
            sigma2=s2 if s2 is not None else s2_value, mode=mode,
        )
    out, _ = _edge_map_op(keypoints, e, H, W, uncertainty, edge_weight, s2, s2_value, mode == "precision", chosen, flat is None)
    return out
