"""The plain-PyTorch specification of every kpfast op.

Readable, float64-safe and differentiable by ordinary autograd; every kernel is
checked against these functions. They materialize everything (``edge_map``
keeps several ``B*E*H*W`` tensors for backward), which is why the fused kernels
exist. Conventions (README, "A tour of the API"): keypoints are ``(x, y)`` in
``[-1, 1]`` with pixel centres at the ends, so column ``j`` of a ``W``-wide
image sits at ``x = -1 + 2 j / (W - 1)``.
"""

from __future__ import annotations


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


def pixel_grid(H: int, W: int, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """The ``(x, y)`` pixel centres of an ``H x W`` image, row by row: ``[H * W, 2]``.

    Example:
        >>> pixel_grid(2, 3)
        tensor([[-1., -1.],
                [ 0., -1.],
                [ 1., -1.],
                [-1.,  1.],
                [ 0.,  1.],
                [ 1.,  1.]])
    """
    ys, xs = pixel_centers(H, dtype, device), pixel_centers(W, dtype, device)
    return torch.stack(torch.meshgrid(xs, ys, indexing="xy"), -1).reshape(H * W, 2)


def _as_edges(edges, device) -> torch.Tensor:
    e = torch.as_tensor(edges, dtype=torch.int64, device=device)
    return e.reshape(-1, 2)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype every op computes in: float64 for float64 inputs, else float32 (also in the kernels)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


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

    Everything is computed in the dtype of ``keypoints`` (float32 for float16/bfloat16):
    ``uncertainty``, ``edge_weight`` and ``sigma2`` may have any float dtype.

    Returns:
        ``[B, H, W]`` in the dtype of ``keypoints``.

    Example:
        >>> kp = torch.tensor([[[-0.5, 0.0], [0.5, 0.0]]])
        >>> edge_map_reference(kp, [(0, 1)], 5, sigma2=0.1)[0, 2]
        tensor([0.0821, 1.0000, 1.0000, 1.0000, 0.0821])
    """
    H, W = (size, size) if isinstance(size, int) else tuple(size)
    out_dtype = keypoints.dtype
    kp = keypoints.to(compute_dtype(keypoints.dtype))
    dtype, device = kp.dtype, kp.device
    B = kp.shape[0]
    e = _as_edges(edges, device)
    if e.shape[0] == 0:  # zeros that still depend on every input, with exact zero gradients
        inputs = (keypoints, uncertainty, edge_weight, sigma2)
        zero = sum(t.reshape(-1)[:0].sum() for t in inputs if isinstance(t, torch.Tensor))
        return (torch.zeros(B, H, W, dtype=dtype, device=device) + zero).to(out_dtype)
    s2 = sigma2.to(dtype) if isinstance(sigma2, torch.Tensor) else torch.tensor(float(sigma2), dtype=dtype, device=device)

    p = pixel_grid(H, W, dtype, device).reshape(1, 1, H * W, 2)
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
        v = uncertainty.to(dtype)
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
        w = edge_weight.to(dtype)
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
    return r.to(dtype).reshape(B, K, r.shape[2], H * W)


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
    h = heatmaps.to(compute_dtype(heatmaps.dtype))
    dtype, device = h.dtype, h.device
    B, K, H, W = h.shape
    b = beta.to(dtype) if isinstance(beta, torch.Tensor) else float(beta)
    masked = h == float("-inf")
    # The where on both sides keeps beta's gradient finite at masked pixels (0 * -inf would be NaN).
    z = torch.where(masked, float("-inf"), b * torch.where(masked, 0.0, h))
    w = torch.softmax(z.reshape(B, K, H * W), dim=-1)
    keypoints = w @ pixel_grid(H, W, dtype, device)
    r = _readout_stack(readouts, B, K, H, W, dtype, device)
    values = None if r is None else torch.einsum("bkcp,bkp->bkc", r, w).to(out_dtype)
    return keypoints.to(out_dtype), values


# --------------------------------------------------------------------------------------
# Op 3: weighted Umeyama similarity fit, and all-pairs per-part alignment residuals.
# --------------------------------------------------------------------------------------

UMEYAMA_TOL = {
    torch.float32: {"spread": 1e-10, "corr": 1e-5, "tie": 1e-5},
    torch.float64: {"spread": 1e-24, "corr": 1e-12, "tie": 1e-10},
}
"""Relative tolerances of the degenerate-case rules of :func:`umeyama_reference`, by the
dtype the kernels compute in (float32 for float16/bfloat16/float32 inputs, float64 for
float64). With ``var``/``msq`` the weighted variance / mean squared norm of a point set
and ``lam`` the optimal value ``max_R tr(R^T Sigma)``:

- ``spread``: a point set has no spread when ``var <= spread * msq``;
- ``corr``: source and target are uncorrelated when ``lam <= corr * sqrt(var_src * var_dst)``;
- ``tie`` (3D): the rotation is not unique when the top two eigenvalues of Horn's 4x4
  matrix are closer than ``tie * lam``, and a rotation mode whose eigenvalue gap is
  below that bound gets no gradient.
"""


def umeyama_tolerances(dtype: torch.dtype) -> dict:
    """The :data:`UMEYAMA_TOL` entry for inputs of ``dtype``."""
    return UMEYAMA_TOL[compute_dtype(dtype)]


def _vee(a: torch.Tensor) -> torch.Tensor:
    """``[..., D, D] -> [..., 3]`` (D = 3) or ``[..., 1]`` (D = 2): the axial vector of ``a - a^T``."""
    if a.shape[-1] == 2:
        return (a[..., 1, 0] - a[..., 0, 1]).unsqueeze(-1)
    return torch.stack(
        (a[..., 2, 1] - a[..., 1, 2], a[..., 0, 2] - a[..., 2, 0], a[..., 1, 0] - a[..., 0, 1]), -1
    )


def _hat(y: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`_vee` on skew matrices: ``[..., 3] -> [y]_x``, ``[..., 1] -> y J``."""
    z = torch.zeros_like(y[..., 0])
    if y.shape[-1] == 1:
        y0 = y[..., 0]
        return torch.stack((torch.stack((z, -y0), -1), torch.stack((y0, z), -1)), -2)
    a, b, c = y.unbind(-1)
    return torch.stack(
        (torch.stack((z, -c, b), -1), torch.stack((c, z, -a), -1), torch.stack((-b, a, z), -1)), -2
    )


class _OptimalRotation(torch.autograd.Function):
    """``Sigma [..., D, D] -> R``: the proper rotation maximizing ``tr(R^T Sigma)``.

    Forward: SVD ``Sigma = U diag(sigma) V^T``, ``R = U diag(1, .., 1, d) V^T`` with
    ``d = sign(det U det V)`` (Umeyama's reflection correction). In 3D, when the top
    two eigenvalues of Horn's matrix tie (``2 (sigma_2 + d sigma_3) <= tie * lam``:
    collinear or two-point sets, or a reflected target with ``sigma_2 = sigma_3``),
    every rotation carrying ``v_1`` to ``u_1`` is optimal and the one closest to the
    identity is returned: the smallest rotation taking ``v_1`` onto ``u_1``.

    Backward (implicit function theorem on the optimality condition ``R^T Sigma``
    symmetric): with ``M = R^T Sigma = V diag(sigma') V^T``, ``z = vee(R^T dR - dR^T R)``
    (``dR`` the incoming gradient) and ``H = tr(M) I - M``, ``dSigma = R [H^+ z]_x``,
    where ``H^+`` inverts ``H`` on its eigenvectors ``v_l`` (eigenvalue ``g_l =
    tr(M) - sigma'_l``, a sum of two signed singular values, half a gap of Horn's
    spectrum) whose ``2 g_l > tie * lam`` and drops the others (rotation about an axis
    the fit does not determine gets no gradient). Coinciding singular values (the
    regular tetrahedron aligned to itself) leave ``g_l`` large, so the gradient is
    finite where ``torch.linalg.svd``'s own backward is not. In 2D: ``H = tr(M)``.
    """

    @staticmethod
    def forward(ctx, sigma: torch.Tensor, tie: float):
        D = sigma.shape[-1]
        bad = ~torch.isfinite(sigma).all(-1).all(-1)  # LAPACK refuses them: NaN results instead
        U, S, Vh = torch.linalg.svd(torch.where(bad[..., None, None], torch.zeros_like(sigma), sigma))
        d = torch.sign(torch.linalg.det(U) * torch.linalg.det(Vh))
        d = torch.where(d == 0, torch.ones_like(d), d)
        flip = torch.ones_like(S)
        flip[..., -1] = d
        R = U @ (flip.unsqueeze(-1) * Vh)
        sp = S * flip  # signed singular values sigma'
        lam = sp.sum(-1)
        if D == 3:
            u1, v1 = U[..., :, 0], Vh[..., 0, :]
            c = (u1 * v1).sum(-1)
            k = torch.linalg.cross(v1, u1)
            # the quaternion (1 + c, k) of half the angle, normalized: orthogonal to rounding near c = -1 too
            eye = torch.eye(3, dtype=sigma.dtype, device=sigma.device)
            w, kk = (1 + c)[..., None, None], (k * k).sum(-1)[..., None, None]
            smallest = ((w * w - kk) * eye + 2 * k.unsqueeze(-1) * k.unsqueeze(-2) + 2 * w * _hat(k)) / (w * w + kk)
            tied = (2 * (sp[..., 1] + sp[..., 2]) <= tie * lam) & (1 + c > 1e-6)
            R = torch.where(tied[..., None, None], smallest, R)
            gaps = torch.stack((sp[..., 1] + sp[..., 2], sp[..., 0] + sp[..., 2], sp[..., 0] + sp[..., 1]), -1)
        else:
            gaps = lam.unsqueeze(-1)
        nan = torch.full_like(lam, float("nan"))
        R = torch.where(bad[..., None, None], nan[..., None, None], R)
        lam = torch.where(bad, nan, lam)
        ctx.save_for_backward(R, Vh, gaps, lam)
        ctx.tie = tie
        ctx.mark_non_differentiable(lam)
        return R, lam

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_R, _grad_lam):
        R, Vh, gaps, lam = ctx.saved_tensors
        z = _vee(R.transpose(-1, -2) @ grad_R)
        keep = 2 * gaps > ctx.tie * lam.unsqueeze(-1)
        inv = torch.where(keep, 1.0 / torch.where(keep, gaps, torch.ones_like(gaps)), torch.zeros_like(gaps))
        if R.shape[-1] == 3:
            V = Vh.transpose(-1, -2)
            y = V @ (inv * (Vh @ z.unsqueeze(-1)).squeeze(-1)).unsqueeze(-1)
            y = y.squeeze(-1)
        else:
            y = inv * z
        return R @ _hat(y), None


class _NaNGradient(torch.autograd.Function):
    """Identity on ``tensors`` (each ``[*bad.shape, ...]``); in backward every entry of a problem
    flagged in ``bad`` gets a NaN gradient, whatever arrives: the gradient of a fit with a
    non-finite input (see :func:`umeyama_reference`)."""

    @staticmethod
    def forward(ctx, bad: torch.Tensor, *tensors: torch.Tensor):
        ctx.save_for_backward(bad)
        return tuple(t.view_as(t) for t in tensors)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grads):
        (bad,) = ctx.saved_tensors
        out = []
        for g in grads:
            if g is not None:
                mask = bad
                for d in range(bad.dim()):  # a tensor broadcast along d: NaN if any problem along d is bad
                    if g.shape[d] == 1 < bad.shape[d]:
                        mask = mask.any(d, keepdim=True)
                g = g.masked_fill(mask.reshape(mask.shape + (1,) * (g.dim() - mask.dim())), float("nan"))
            out.append(g)
        return (None, *out)


def _non_finite(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Per problem (broadcast): whether ``x``, ``y`` ``[..., M, D]`` or ``w [..., M]`` hold a NaN or
    infinite entry."""
    return ~(torch.isfinite(x).all(-1).all(-1) & torch.isfinite(y).all(-1).all(-1) & torch.isfinite(w).all(-1))


def umeyama_reference(
    src: torch.Tensor,
    dst: torch.Tensor,
    weights: torch.Tensor | None = None,
    *,
    scale: bool = True,
    tol_dtype: torch.dtype | None = None,
):
    """Weighted similarity fit (spec of :func:`kpfast.umeyama`), in float64.

    Minimizes ``sum_m w_m |dst_m - (s R src_m + t)|^2`` over proper rotations ``R``,
    ``s > 0`` (``s = 1`` when ``scale=False``) and ``t`` (Umeyama 1991), with the
    weights entering the covariance linearly::

        W = sum w,  mu_x = sum w x / W,  Sigma = sum w (dst - mu_d)(src - mu_s)^T / W
        var_x = sum w |x - mu_x|^2 / W,  msq_x = sum w |x|^2 / W
        R = argmax_{R in SO(D)} tr(R^T Sigma)  (:class:`_OptimalRotation`),  lam = tr(R^T Sigma)
        s = lam / var_s,  t = mu_d - s R mu_s

    Degenerate cases (tolerances :data:`UMEYAMA_TOL`, chosen by ``tol_dtype``, default the
    inputs' dtype), checked in this order:

    1. ``W = 0`` or the source has no spread (one point, coincident points, all-zero
       weights): ``R = I``, ``s = 1``, ``t = mu_d - mu_s`` (means are 0 when ``W = 0``;
       the fit is then not differentiable in the weights and every gradient is 0).
    2. The target has no spread: ``R = I``, ``s = 0`` (1 with ``scale=False``), ``t = mu_d - s mu_s``.
    3. Uncorrelated (``lam`` negligible): ``R = I``, ``s = tr(Sigma) / var_s``.
    4. 3D ties (collinear or two-point sets): ``R`` is the optimal rotation closest to
       the identity (see :class:`_OptimalRotation`).

    In cases 1-3 ``R`` (and ``s`` in 1-2) are constants for autograd. A problem with a NaN
    or infinite coordinate or weight (any point, whatever its weight) gives NaN ``R``, ``t``
    and ``s`` (``s = 1`` with ``scale=False``), and NaN gradients to all of its ``src``,
    ``dst`` and ``weights``, whatever the incoming gradient.

    Args:
        src, dst: ``[..., M, D]`` with D in {2, 3} (same shape).
        weights: ``[..., M]`` non-negative, or None (ones).
        scale: fit the scale; ``s = 1`` otherwise.
        tol_dtype: dtype whose tolerances apply (default ``src.dtype``).

    Returns:
        ``R [..., D, D]``, ``s [...]``, ``t [..., D]`` in the dtype of ``src``.

    Example:
        >>> src = torch.tensor([[0., 0.], [1., 0.], [0., 1.]])
        >>> R, s, t = umeyama_reference(src, 2 * src @ torch.tensor([[0., 1.], [-1., 0.]]) + 3)
        >>> R.round(decimals=4) + 0.0, s.round(decimals=4), t.round(decimals=4)
        (tensor([[ 0., -1.],
                [ 1.,  0.]]), tensor(2.), tensor([3., 3.]))
    """
    out_dtype = src.dtype
    tol = umeyama_tolerances(tol_dtype or src.dtype)
    x, y = src.double(), dst.double()
    D = x.shape[-1]
    w = torch.ones_like(x[..., 0]) if weights is None else weights.double()
    bad = _non_finite(x, y, w)
    x, y, w = _NaNGradient.apply(bad, x, y, w)
    W = w.sum(-1)
    has = W != 0  # NaN too
    Wsafe = torch.where(has, W, torch.ones_like(W))

    def mean(v):  # 0, a constant, when W = 0
        return torch.where(has.unsqueeze(-1), (w.unsqueeze(-1) * v).sum(-2) / Wsafe.unsqueeze(-1), 0.0)

    mu_s, mu_d = mean(x), mean(y)
    xs, yd = x - mu_s.unsqueeze(-2), y - mu_d.unsqueeze(-2)
    sigma = torch.einsum("...m,...ma,...mb->...ab", w, yd, xs) / Wsafe[..., None, None]
    var_s = (w * xs.square().sum(-1)).sum(-1) / Wsafe
    var_d = (w * yd.square().sum(-1)).sum(-1) / Wsafe
    msq_s = (w * x.square().sum(-1)).sum(-1) / Wsafe
    msq_d = (w * y.square().sum(-1)).sum(-1) / Wsafe

    no_src = var_s <= tol["spread"] * msq_s
    no_dst = ~no_src & (var_d <= tol["spread"] * msq_d)
    R_opt, lam_opt = _OptimalRotation.apply(sigma, tol["tie"])
    uncorr = ~no_src & ~no_dst & (lam_opt <= tol["corr"] * torch.sqrt(var_s.clamp_min(0) * var_d.clamp_min(0)))
    forced = (no_src | no_dst | uncorr)[..., None, None]
    eye = torch.eye(D, dtype=x.dtype, device=x.device).expand_as(sigma)
    R = torch.where(forced, eye, R_opt)
    if scale:
        lam = (R * sigma).sum((-2, -1))
        var_safe = torch.where(no_src, torch.ones_like(var_s), var_s)
        s = torch.where(no_src, torch.ones_like(lam), torch.where(no_dst, torch.zeros_like(lam), lam / var_safe))
    else:
        s = torch.ones_like(W)
    t = mu_d - s.unsqueeze(-1) * (R @ mu_s.unsqueeze(-1)).squeeze(-1)
    R = R.masked_fill(bad[..., None, None], float("nan"))
    t = t.masked_fill(bad.unsqueeze(-1), float("nan"))
    s = s.masked_fill(bad, float("nan")) if scale else s
    return R.to(out_dtype), s.to(out_dtype), t.to(out_dtype)


def part_alignment_reference(
    points: torch.Tensor,
    parts: torch.Tensor,
    weights: torch.Tensor | None = None,
    *,
    scale: bool = True,
    detach_transform: bool = True,
) -> torch.Tensor:
    """All-pairs per-part alignment residuals (spec of :func:`kpfast.part_alignment`).

    For samples ``i, j`` and part ``p`` (points ``k`` with ``parts[p, k]``), with
    ``c_k = parts[p, k] * w[i, k] * w[j, k]`` (``w = 1`` without weights)::

        (R, s, t) = umeyama_reference(src = points[j], dst = points[i], weights = c)
        r[i, j, p] = sum_k c_k |points[i, k] - (s R points[j, k] + t)|_1 / sum_k c_k

    ``r[i, j, p] = 0`` with zero gradients when ``sum_k c_k = 0`` and on the diagonal
    ``i = j`` (the exact self-fit; set, not computed, so that rounding gives no spurious
    gradient). Points outside part ``p`` never enter its fits: a NaN or infinite coordinate
    or weight makes ``r`` NaN exactly for the pairs ``(i, j)`` of its sample and the parts
    that contain it (weight zero or not), and the gradient of every coordinate and weight of
    those parts' points in both samples NaN, whatever the incoming gradient. With
    ``detach_transform`` the gradient flows only through the explicit points of the
    residual, ``(R, s, t)`` held constant (the paper's choice). Everything is
    materialized: ``B*B*P`` fits of ``K`` points each, in float64, batched through one
    ``torch.linalg.svd`` call.

    Args:
        points: ``[B, K, D]``, D in {2, 3}.
        parts: ``[P, K]`` bool.
        weights: ``[B, K]`` non-negative, or None.
        scale, detach_transform: as in :func:`kpfast.part_alignment`.

    Returns:
        ``r [B, B, P]`` in the dtype of ``points``.

    Example:
        >>> pts = torch.randn(2, 5, 3, dtype=torch.float64)
        >>> moved = torch.cat([pts[:1], 3 * pts[:1] + 1])
        >>> part_alignment_reference(moved, torch.ones(1, 5, dtype=torch.bool)).abs().max() < 1e-12
        tensor(True)
    """
    B, K, D = points.shape
    x = points.double()
    w = torch.ones(B, K, dtype=x.dtype, device=x.device) if weights is None else weights.double()
    inside = parts[None, None, :, :, None]  # a point outside part p never enters its fit (nor a NaN of it)
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    dst = torch.where(inside, x[:, None, None], zero)  # [B, B, P, K, D]: target sample i
    src = torch.where(inside, x[None, :, None], zero)  # source sample j
    wi = torch.where(inside[..., 0], w[:, None, None, :], zero)  # masked before the product: the
    c = wi * torch.where(inside[..., 0], w[None, :, None, :], zero)  # NaN weight of a non-member gets no gradient
    diag = torch.eye(B, dtype=torch.bool, device=x.device)[:, :, None]
    bad = _non_finite(dst, src, c) & ~diag
    dst, src, c = _NaNGradient.apply(bad, dst, src, c)
    R, s, t = umeyama_reference(src, dst, c, scale=scale, tol_dtype=points.dtype)
    if detach_transform:
        R, s, t = R.detach(), s.detach(), t.detach()
    fitted = s[..., None, None] * (src @ R.transpose(-1, -2)) + t.unsqueeze(-2)
    err = (dst - fitted).abs().sum(-1)
    W = c.sum(-1)
    r = (c * err).sum(-1) / torch.where(W != 0, W, torch.ones_like(W))
    r = torch.where(diag | (W == 0), torch.zeros_like(r), r).masked_fill(bad, float("nan"))
    return r.to(points.dtype)
