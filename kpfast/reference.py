"""The plain-PyTorch specification of every kpfast op.

Readable, float64-safe and differentiable by ordinary autograd; every kernel is
checked against these functions. They materialize everything (``edge_map``
keeps several ``B*E*H*W`` tensors for backward), which is why the fused kernels
exist. Conventions (``../shared/DESIGN.md``): keypoints are ``(x, y)`` in
``[-1, 1]`` with pixel centres at the ends, so column ``j`` of a ``W``-wide
image sits at ``x = -1 + 2 j / (W - 1)``.
"""

from __future__ import annotations

from typing import Sequence

import torch

EDGE_EPS = 1e-10
"""An edge whose squared length is below this is a point: its ``t`` is 0."""

EDGE_MODES = ("intensity", "precision")


def pixel_centers(n: int, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """Normalized coordinates of ``n`` pixel centres: ``-1 + 2 j / (n - 1)`` (``[-1]`` when n = 1).

    Example:
        >>> pixel_centers(3)
        tensor([-1.,  0.,  1.])
    """
    step = 2.0 / (n - 1) if n > 1 else 0.0
    return torch.arange(n, dtype=dtype, device=device) * step - 1.0


def _as_edges(edges, device) -> torch.Tensor:
    e = torch.as_tensor(edges, dtype=torch.int64, device=device)
    return e.reshape(-1, 2)


def _upcast(t: torch.Tensor | None) -> torch.Tensor | None:
    if t is None or t.dtype in (torch.float32, torch.float64):
        return t
    return t.float()


def edge_map_reference(
    keypoints: torch.Tensor,
    edges,
    size,
    *,
    uncertainty: torch.Tensor | None = None,
    edge_weight: torch.Tensor | None = None,
    sigma2=1e-3,
    mode: str = "intensity",
) -> torch.Tensor:
    """Uncertainty-weighted Gaussian line map with max over edges (spec of :func:`kpfast.edge_map`).

    For pixel centre ``p`` and edge ``(i, j)`` with ``a = k_i``, ``b = k_j``::

        t  = clamp((p - a)·(b - a) / |b - a|^2, 0, 1)     (0 when |b - a|^2 < EDGE_EPS)
        d2 = |p - a|^2 if t = 0, |p - b|^2 if t = 1, else |p - a - t (b - a)|^2
        u  = sigmoid((1 - t) v_i + t v_j)                (1 without uncertainty)
        intensity: S_e = w_e u exp(-d2 / sigma2)    precision: S_e = w_e exp(-u d2 / sigma2)
        S = max_e S_e     (first maximal edge wins, as torch.max; zeros when E = 0)

    Args:
        keypoints: ``[B, K, 2]`` (x, y) in [-1, 1].
        edges: ``[E, 2]`` int tensor or a sequence of (i, j) pairs.
        size: ``H`` or ``(H, W)``.
        uncertainty: ``[B, K]`` logits ``v``, or None.
        edge_weight: ``[E]`` or ``[B, E]`` non-negative weights ``w``, or None (ones).
        sigma2: positive float or 0-dim tensor.
        mode: ``"intensity"`` or ``"precision"``.

    Returns:
        ``[B, H, W]`` in the dtype of ``keypoints``.

    Example:
        >>> kp = torch.tensor([[[-0.5, 0.0], [0.5, 0.0]]])
        >>> edge_map_reference(kp, [(0, 1)], 5, sigma2=0.1)[0, 2]
        tensor([0.0821, 1.0000, 1.0000, 1.0000, 0.0821])
    """
    H, W = (size, size) if isinstance(size, int) else tuple(size)
    out_dtype = keypoints.dtype
    kp = _upcast(keypoints)
    dtype, device = kp.dtype, kp.device
    B = kp.shape[0]
    e = _as_edges(edges, device)
    if e.shape[0] == 0:
        return torch.zeros(B, H, W, dtype=out_dtype, device=device)
    s2 = sigma2.to(dtype) if isinstance(sigma2, torch.Tensor) else torch.tensor(float(sigma2), dtype=dtype, device=device)

    ys, xs = pixel_centers(H, dtype, device), pixel_centers(W, dtype, device)
    p = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), -1).reshape(1, 1, H * W, 2)
    a = kp[:, e[:, 0]].unsqueeze(2)  # [B, E, 1, 2]
    b = kp[:, e[:, 1]].unsqueeze(2)
    ab = b - a
    ap = p - a
    len2 = (ab * ab).sum(-1)
    point = len2 < EDGE_EPS
    t_raw = torch.where(point, torch.zeros_like(len2), (ap * ab).sum(-1) / torch.where(point, torch.ones_like(len2), len2))
    t = t_raw.clamp(0.0, 1.0)
    q = torch.where(
        (t_raw <= 0).unsqueeze(-1),
        ap,
        torch.where((t_raw >= 1).unsqueeze(-1), p - b, ap - t.unsqueeze(-1) * ab),
    )
    d2 = (q * q).sum(-1)  # [B, E, HW]

    if uncertainty is not None:
        v = _upcast(uncertainty)
        z = (1 - t) * v[:, e[:, 0]].unsqueeze(-1) + t * v[:, e[:, 1]].unsqueeze(-1)
        u = torch.sigmoid(z)
    else:
        u = None
    if mode == "intensity":
        s = torch.exp(-d2 / s2)
        if u is not None:
            s = u * s
    elif mode == "precision":
        s = torch.exp(-(d2 if u is None else u * d2) / s2)
    else:
        raise ValueError(f"mode must be one of {EDGE_MODES}, got {mode!r}")
    if edge_weight is not None:
        w = _upcast(edge_weight)
        s = s * (w.unsqueeze(-1) if w.dim() == 2 else w.view(1, -1, 1))
    return s.max(dim=1).values.reshape(B, H, W).to(out_dtype)


def _readout_stack(readouts, B: int, K: int, H: int, W: int, dtype, device) -> torch.Tensor | None:
    """``[B, K, C, H*W]`` from a ``[B, K, C, H, W]`` tensor or a sequence of ``[B, K, H, W]`` maps."""
    if readouts is None:
        return None
    if isinstance(readouts, torch.Tensor):
        r = readouts
    elif len(readouts) == 0:
        r = torch.zeros(B, K, 0, H, W, dtype=dtype, device=device)
    else:
        r = torch.stack(list(readouts), dim=2)
    return _upcast(r).to(dtype).reshape(B, K, r.shape[2], H * W)


def soft_argmax_reference(heatmaps: torch.Tensor, readouts=None, *, beta=1.0):
    """Softmax expectation of each heatmap and readout (spec of :func:`kpfast.soft_argmax`).

    Paper Eqs. 1 and 4. For the heatmap ``H_k`` of keypoint ``k`` and pixel centres ``p``::

        z(p) = beta * H_k(p)          (-inf where H_k(p) = -inf, whatever beta: a masked pixel)
        w    = softmax over the H*W pixels of z
        k    = sum_p w(p) p           (x, y) in [-1, 1], align_corners=True pixel centres
        r_c  = sum_p w(p) R_c(p)      one value per readout map (uncertainty logit, depth, ...)

    A row that is -inf everywhere has no weights: its keypoint and values are NaN (as
    ``torch.softmax``); ``+inf`` or NaN anywhere in a row makes that row NaN.

    Args:
        heatmaps: ``[B, K, H, W]`` logits.
        readouts: ``[B, K, C, H, W]``, a sequence of ``C`` maps ``[B, K, H, W]``, or None.
        beta: inverse temperature, a float or a 0-dim tensor.

    Returns:
        ``(keypoints [B, K, 2], values [B, K, C] or None)`` in the dtype of ``heatmaps``.

    Example:
        >>> h = torch.full((1, 1, 3, 5), -1e4)
        >>> h[0, 0, 2, 1] = 0.0
        >>> kp, v = soft_argmax_reference(h, [torch.arange(15.0).reshape(1, 1, 3, 5)])
        >>> kp, v
        (tensor([[[-0.5000,  1.0000]]]), tensor([[[11.]]]))
    """
    out_dtype = heatmaps.dtype
    h = _upcast(heatmaps)
    dtype, device = h.dtype, h.device
    B, K, H, W = h.shape
    b = beta.to(dtype) if isinstance(beta, torch.Tensor) else float(beta)
    masked = h == float("-inf")
    # The where on both sides keeps beta's gradient finite at masked pixels (0 * -inf would be NaN).
    z = torch.where(masked, float("-inf"), b * torch.where(masked, 0.0, h))
    w = torch.softmax(z.reshape(B, K, H * W), dim=-1)
    ys, xs = pixel_centers(H, dtype, device), pixel_centers(W, dtype, device)
    grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), -1).reshape(H * W, 2)
    keypoints = w @ grid
    r = _readout_stack(readouts, B, K, H, W, dtype, device)
    values = None if r is None else torch.einsum("bkcp,bkp->bkc", r, w).to(out_dtype)
    return keypoints.to(out_dtype), values
