"""Triton kernels of ``kpfast.umeyama`` and ``kpfast.part_alignment``: forward and backward.

One thread is one fit (a program is one warp of ``BLOCK`` lanes, ``num_warps=1``): the
thread loops over the fit's points, accumulates its weighted moments in registers and
solves it there, so no value is reduced across threads and no lane is computed twice.
2D fits are solved in closed form, 3D fits with Horn's quaternion method: a fixed number
of cyclic Jacobi sweeps diagonalizes the symmetric 4x4 matrix, a sorting network orders
the eigenpairs, and the rotation comes from the normalized quaternion. Small vectors and
matrices are tuples (rows of 3).

Every fit runs in its own frame: coordinates shifted by a weighted centroid and divided by
a power of two near their largest magnitude (exact), so that float32 moments neither
overflow nor underflow from about 1e-30 to 1e20; the fit is exactly equivariant to both.
A fit with a non-finite coordinate or weight among its points returns NaN (see
:func:`kpfast.umeyama`).

- ``umeyama``: forward two passes over the points (centroids and scale, then moments);
  backward recomputes the fit, runs the implicit-function chain (rotation modes from the
  same eigen-decomposition) and writes per-point gradients in a third pass.
- ``part_alignment`` forward: one program per (block of sample pairs ``(i, j)``, part
  ``p``): moments, solve, residual pass; with the full gradient the same pass also sums
  the signs of the L1 residual and the program writes the adjoints of the fit's moments
  for a unit upstream gradient into the fit's record (:data:`RECORD`).
- ``part_alignment`` backward: one program per (block of points ``k`` of samples ``n``,
  part ``p``); it walks the other samples ``m`` and gathers both roles of ``n`` (target of
  fit ``(n, m, p)``, source of ``(m, n, p)``) from the records: deterministic, no atomics.
  A fit whose upstream gradient is 0 (and that is not NaN) is skipped. The launcher sums
  the ``P`` per-part partial gradients.

No host synchronization anywhere. Semantics: ``kpfast/reference.py``
(``umeyama_reference``, ``part_alignment_reference``, ``UMEYAMA_TOL``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kpfast.ops._tensors import compute
from kpfast.ops.backend import extension

from ._common import tl_dtype

# The per-fit record part_alignment's forward keeps for its backward, defined in csrc/umeyama.cpp
# (kpfast._C.PART_RECORD_LAYOUT): A = s R (9, row-major) and t of the fit in its frame, 1/W, and
# for the full gradient the adjoints of the moments sum c d, sum c s, sum c d s^T, sum c |s|^2
# and W for a unit upstream gradient.
RECORD = dict(extension().PART_RECORD_LAYOUT)
REC_A = tl.constexpr(RECORD["A"])
REC_T = tl.constexpr(RECORD["t"])
REC_INVW = tl.constexpr(RECORD["inv_W"])
REC_SD = tl.constexpr(RECORD["Sd"])
REC_SS = tl.constexpr(RECORD["Ss"])
REC_C = tl.constexpr(RECORD["C"])
REC_QS = tl.constexpr(RECORD["Qs"])
REC_W = tl.constexpr(RECORD["W"])
NREC = tl.constexpr(RECORD["size"])

NSWEEP = 6  # Jacobi sweeps: off-diagonal below 1e-15 (float64) / 1e-7 (float32) relative
NUM_WARPS = 1  # one lane per fit: more warps would only replicate the lanes
UMEYAMA_BLOCK_N = 32
PART_BLOCK_PAIRS = 32
PART_BWD_BLOCK_POINTS = 32


# ------------------------------------------------------------------- small linear algebra


@triton.jit
def _add(a, b):
    return (a[0] + b[0], a[1] + b[1], a[2] + b[2])


@triton.jit
def _sub(a, b):
    return (a[0] - b[0], a[1] - b[1], a[2] - b[2])


@triton.jit
def _mul(a, k):
    return (a[0] * k, a[1] * k, a[2] * k)


@triton.jit
def _dot(a, b):
    return a[0] * b[0] + a[1] * b[1] + a[2] * b[2]


@triton.jit
def _cross(a, b):
    return (a[1] * b[2] - a[2] * b[1], a[2] * b[0] - a[0] * b[2], a[0] * b[1] - a[1] * b[0])


@triton.jit
def _matvec(M, v):
    return (_dot(M[0], v), _dot(M[1], v), _dot(M[2], v))


@triton.jit
def _matTvec(M, v):
    return _add(_add(_mul(M[0], v[0]), _mul(M[1], v[1])), _mul(M[2], v[2]))


@triton.jit
def _mat_add(A, B):
    return (_add(A[0], B[0]), _add(A[1], B[1]), _add(A[2], B[2]))


@triton.jit
def _mat_mul(A, k):
    return (_mul(A[0], k), _mul(A[1], k), _mul(A[2], k))


@triton.jit
def _outer(a, b):
    return (_mul(b, a[0]), _mul(b, a[1]), _mul(b, a[2]))


@triton.jit
def _mat_dot(A, B):
    return _dot(A[0], B[0]) + _dot(A[1], B[1]) + _dot(A[2], B[2])


@triton.jit
def _select(cond, a, b):
    return (tl.where(cond, a[0], b[0]), tl.where(cond, a[1], b[1]), tl.where(cond, a[2], b[2]))


@triton.jit
def _finite(x):
    return tl.abs(x) < float("inf")  # False for NaN too


@triton.jit
def _finite3(v):
    return _finite(v[0]) & _finite(v[1]) & _finite(v[2])


@triton.jit
def _amax3(v):
    return tl.maximum(tl.maximum(tl.abs(v[0]), tl.abs(v[1])), tl.abs(v[2]))


@triton.jit
def _sgn(x):
    return tl.where(x > 0.0, 1.0, tl.where(x < 0.0, -1.0, 0.0))


@triton.jit
def _inverse_rn(x):
    """1 / x correctly rounded (a GPU's float32 `/` is approximate, its float64 one exact)."""
    if x.dtype == tl.float32:
        return tl.math.div_rn(1.0, x)
    else:
        return 1.0 / x


@triton.jit
def _pow2_floor(m, DT: tl.constexpr):
    """The largest power of two <= m (dividing by it is exact); 1 when m is 0 or subnormal."""
    if DT == tl.float64:
        k = (m.to(tl.int64, bitcast=True) & 0x7FF0000000000000).to(tl.float64, bitcast=True)
    else:
        k = (m.to(tl.int32, bitcast=True) & 0x7F800000).to(tl.float32, bitcast=True)
    return tl.where(k > 0.0, k, 1.0)


@triton.jit
def _load3(ptr, idx, mask, D: tl.constexpr, DT: tl.constexpr):
    x = tl.load(ptr + idx * D, mask=mask, other=0.0).to(DT)
    y = tl.load(ptr + idx * D + 1, mask=mask, other=0.0).to(DT)
    if D == 3:
        z = tl.load(ptr + idx * D + 2, mask=mask, other=0.0).to(DT)
    else:
        z = x * 0.0
    return (x, y, z)


@triton.jit
def _store3(ptr, idx, v, mask, D: tl.constexpr):
    for a in tl.static_range(D):
        tl.store(ptr + idx * D + a, v[a].to(ptr.dtype.element_ty), mask=mask)


# ------------------------------------------------------------------------- the solve


@triton.jit
def _moments_add(mom, c, d, s):
    """Add point (dst d, src s, weight c) to the moments (W, sum c d, sum c s, sum c d s^T,
    sum c |s|^2, sum c |d|^2)."""
    W, Sd, Ss, C, Qs, Qd = mom
    cs = _mul(s, c)
    return (W + c, _add(Sd, _mul(d, c)), _add(Ss, cs), _mat_add(C, _outer(d, cs)), Qs + _dot(cs, s), Qd + c * _dot(d, d))


@triton.jit
def _zero_moments(z):
    v = (z, z, z)
    return (z, v, v, (v, v, v), z, z)


@triton.jit
def _jrot(app, aqq, apq, arp, arq, asp, asq, v0p, v1p, v2p, v3p, v0q, v1q, v2q, v3q):
    """One Jacobi rotation zeroing a[p][q] of a symmetric 4x4 (r, s: the other indices)."""
    # t = tan(angle) = sign(theta) / (|theta| + sqrt(theta^2 + 1)), theta = (aqq - app) / (2 apq),
    # without dividing by apq; no rotation when apq^2 underflows against a zero diff
    diff = aqq - app
    num = tl.where(diff < 0.0, -2.0 * apq, 2.0 * apq)
    den = tl.abs(diff) + tl.sqrt(diff * diff + 4.0 * apq * apq)
    t = tl.where(den > 0.0, num / tl.where(den > 0.0, den, 1.0), 0.0)
    c = 1.0 / tl.sqrt(t * t + 1.0)
    s = t * c
    return (app - t * apq, aqq + t * apq, apq * 0.0, c * arp - s * arq, s * arp + c * arq, c * asp - s * asq,
            s * asp + c * asq, c * v0p - s * v0q, c * v1p - s * v1q, c * v2p - s * v2q, c * v3p - s * v3q,
            s * v0p + c * v0q, s * v1p + c * v1q, s * v2p + c * v2q, s * v3p + c * v3q)


@triton.jit
def _ce(la, a, lb, b):
    """Compare-exchange of two eigenpairs (value, 4-vector): the larger eigenvalue first."""
    sw = lb > la
    hi = (tl.where(sw, b[0], a[0]), tl.where(sw, b[1], a[1]), tl.where(sw, b[2], a[2]), tl.where(sw, b[3], a[3]))
    lo = (tl.where(sw, a[0], b[0]), tl.where(sw, a[1], b[1]), tl.where(sw, a[2], b[2]), tl.where(sw, a[3], b[3]))
    return tl.where(sw, lb, la), hi, tl.where(sw, la, lb), lo


@triton.jit
def _mode(q, p, lam1, laml, tie):
    """Body-frame rotation axis vec(conj(q) * p) of eigenvector p, and 1 / half-gap (0 if tied)."""
    qv = (q[1], q[2], q[3])
    pv = (p[1], p[2], p[3])
    v = _sub(_sub(_mul(pv, q[0]), _mul(qv, p[0])), _cross(qv, pv))
    g = (lam1 - laml) * 0.5
    keep = 2.0 * g > tie * lam1
    return v, tl.where(keep, 1.0 / tl.where(keep, g, 1.0), 0.0)


@triton.jit
def _rotation3(S, tie, NSWEEPS: tl.constexpr):
    """Proper rotation maximizing tr(R^T S) (Horn), its optimal value, and the rotation modes."""
    (s00, s01, s02), (s10, s11, s12), (s20, s21, s22) = S
    a00 = s00 + s11 + s22
    a01 = s21 - s12
    a02 = s02 - s20
    a03 = s10 - s01
    a11 = s00 - s11 - s22
    a12 = s01 + s10
    a13 = s02 + s20
    a22 = -s00 + s11 - s22
    a23 = s12 + s21
    a33 = -s00 - s11 + s22
    one = a00 * 0.0 + 1.0
    zero = a00 * 0.0
    v00, v01, v02, v03 = one, zero, zero, zero
    v10, v11, v12, v13 = zero, one, zero, zero
    v20, v21, v22, v23 = zero, zero, one, zero
    v30, v31, v32, v33 = zero, zero, zero, one
    for _ in range(NSWEEPS):
        a00, a11, a01, a02, a12, a03, a13, v00, v10, v20, v30, v01, v11, v21, v31 = _jrot(
            a00, a11, a01, a02, a12, a03, a13, v00, v10, v20, v30, v01, v11, v21, v31)
        a00, a22, a02, a01, a12, a03, a23, v00, v10, v20, v30, v02, v12, v22, v32 = _jrot(
            a00, a22, a02, a01, a12, a03, a23, v00, v10, v20, v30, v02, v12, v22, v32)
        a00, a33, a03, a01, a13, a02, a23, v00, v10, v20, v30, v03, v13, v23, v33 = _jrot(
            a00, a33, a03, a01, a13, a02, a23, v00, v10, v20, v30, v03, v13, v23, v33)
        a11, a22, a12, a01, a02, a13, a23, v01, v11, v21, v31, v02, v12, v22, v32 = _jrot(
            a11, a22, a12, a01, a02, a13, a23, v01, v11, v21, v31, v02, v12, v22, v32)
        a11, a33, a13, a01, a03, a12, a23, v01, v11, v21, v31, v03, v13, v23, v33 = _jrot(
            a11, a33, a13, a01, a03, a12, a23, v01, v11, v21, v31, v03, v13, v23, v33)
        a22, a33, a23, a02, a03, a12, a13, v02, v12, v22, v32, v03, v13, v23, v33 = _jrot(
            a22, a33, a23, a02, a03, a12, a13, v02, v12, v22, v32, v03, v13, v23, v33)
    # eigenpairs sorted by a network: (0,1) (2,3) (0,2) (1,3) (1,2)
    l0, p0, l1, p1 = _ce(a00, (v00, v10, v20, v30), a11, (v01, v11, v21, v31))
    l2, p2, l3, p3 = _ce(a22, (v02, v12, v22, v32), a33, (v03, v13, v23, v33))
    l0, p0, l2, p2 = _ce(l0, p0, l2, p2)
    l1, p1, l3, p3 = _ce(l1, p1, l3, p3)
    l1, p1, l2, p2 = _ce(l1, p1, l2, p2)
    # ties of the top two: the member of their span closest to the identity quaternion
    n2 = p0[0] * p0[0] + p1[0] * p1[0]
    tied = ((l0 - l1) <= tie * l0) & (n2 > 5e-7)
    w0 = tl.where(tied, p0[0], 1.0)
    w1 = tl.where(tied, p1[0], 0.0)
    q = (w0 * p0[0] + w1 * p1[0], w0 * p0[1] + w1 * p1[1], w0 * p0[2] + w1 * p1[2], w0 * p0[3] + w1 * p1[3])
    # R of the unit quaternion q / |q|: orthogonal to rounding whatever the Jacobi drift
    qw, qx, qy, qz = q
    n = _inverse_rn(qw * qw + qx * qx + qy * qy + qz * qz)
    R = (((qw * qw + qx * qx - qy * qy - qz * qz) * n, 2.0 * (qx * qy - qw * qz) * n, 2.0 * (qx * qz + qw * qy) * n),
         (2.0 * (qx * qy + qw * qz) * n, (qw * qw - qx * qx + qy * qy - qz * qz) * n, 2.0 * (qy * qz - qw * qx) * n),
         (2.0 * (qx * qz - qw * qy) * n, 2.0 * (qy * qz + qw * qx) * n, (qw * qw - qx * qx - qy * qy + qz * qz) * n))
    q = (qw * tl.sqrt(n), qx * tl.sqrt(n), qy * tl.sqrt(n), qz * tl.sqrt(n))
    m0, f0 = _mode(q, p1, l0, l1, tie)
    m1, f1 = _mode(q, p2, l0, l2, tie)
    m2, f2 = _mode(q, p3, l0, l3, tie)
    return R, l0, (m0, m1, m2), (f0, f1, f2)


@triton.jit
def _solve(mom, od, os, spread, corr, tie, D: tl.constexpr, SCALE: tl.constexpr, NSWEEPS: tl.constexpr):
    """The fit from moments taken in a frame with origins od, os (see UMEYAMA_TOL for the branches).
    Returns (1/W, mu_d, mu_s, var_s or 1, R, s, t, optimal, uncorrelated, rotation modes, their 1/gap)."""
    W, Sd, Ss, C, Qs, Qd = mom
    has = W > 0.0
    invW = tl.where(has, 1.0 / tl.where(has, W, 1.0), 0.0)
    md = _mul(Sd, invW)
    ms = _mul(Ss, invW)
    G = _mat_add(_mat_mul(C, invW), _mat_mul(_outer(md, ms), -1.0))
    var_s = Qs * invW - _dot(ms, ms)
    var_d = Qd * invW - _dot(md, md)
    msq_s = var_s + _dot(_add(ms, os), _add(ms, os))
    msq_d = var_d + _dot(_add(md, od), _add(md, od))
    zero = tl.zeros_like(W)  # not W * 0: W may be NaN
    e = (zero + 1.0, zero, zero)
    I = (e, (zero, zero + 1.0, zero), (zero, zero, zero + 1.0))
    if D == 3:
        R, lam1, modes, f = _rotation3(G, tie, NSWEEPS)
    else:
        a = G[0][0] + G[1][1]
        b = G[1][0] - G[0][1]
        lam1 = tl.sqrt(a * a + b * b)
        pos = lam1 > 0.0
        il = 1.0 / tl.where(pos, lam1, 1.0)
        R = ((tl.where(pos, a * il, 1.0), tl.where(pos, -b * il, 0.0), zero),
             (tl.where(pos, b * il, 0.0), tl.where(pos, a * il, 1.0), zero), I[2])
        z3 = (zero, zero, zero)
        modes = (I[2], z3, z3)
        f = (tl.where(pos, il, 0.0), zero, zero)
    no_src = var_s <= spread * msq_s
    no_dst = (var_d <= spread * msq_d) & (no_src == 0)
    uncorr = (lam1 <= corr * tl.sqrt(tl.maximum(var_s, 0.0) * tl.maximum(var_d, 0.0))) & (no_src == 0) & (no_dst == 0)
    forced = no_src | no_dst | uncorr
    R = (_select(forced, I[0], R[0]), _select(forced, I[1], R[1]), _select(forced, I[2], R[2]))
    var_safe = tl.where(no_src, 1.0, var_s)
    if SCALE:
        s = tl.where(no_src, 1.0, tl.where(no_dst, 0.0, _mat_dot(R, G) / var_safe))
    else:
        s = zero + 1.0
    t = _sub(md, _mul(_matvec(R, ms), s))
    return invW, md, ms, var_safe, R, s, t, forced == 0, uncorr, modes, f


@triton.jit
def _solve_backward(fit, C, Qs, Rbar, sbar, mubar_d, mubar_s, SCALE: tl.constexpr):
    """Adjoints of the moments (W, Sd, Ss, C, Qs) from those of R, s and the means."""
    invW, md, ms, var_safe, R, s, _t, optimal, uncorr, modes, f = fit
    if SCALE:
        through_s = optimal | uncorr
        lambar = tl.where(through_s, sbar / var_safe, 0.0)
        varbar = tl.where(through_s, -sbar * s / var_safe, 0.0)
    else:
        lambar = sbar * 0.0
        varbar = sbar * 0.0
    # y = H^+ z, z = vee(Z - Z^T), Z = R^T Rbar: from the rotation modes
    Z = (_matTvec(R, (Rbar[0][0], Rbar[1][0], Rbar[2][0])), _matTvec(R, (Rbar[0][1], Rbar[1][1], Rbar[2][1])),
         _matTvec(R, (Rbar[0][2], Rbar[1][2], Rbar[2][2])))  # columns of Z
    z = (Z[1][2] - Z[2][1], Z[2][0] - Z[0][2], Z[0][1] - Z[1][0])
    y = _add(_add(_mul(modes[0], f[0] * _dot(modes[0], z)), _mul(modes[1], f[1] * _dot(modes[1], z))),
             _mul(modes[2], f[2] * _dot(modes[2], z)))
    y = _mul(y, tl.where(optimal, 1.0, 0.0))
    # Sbar = lambar R + R [y]_x
    E = (_add(_mul(R[0], lambar), _cross(R[0], y)), _add(_mul(R[1], lambar), _cross(R[1], y)),
         _add(_mul(R[2], lambar), _cross(R[2], y)))
    mubar_d = _sub(mubar_d, _matvec(E, ms))
    mubar_s = _sub(_sub(mubar_s, _matTvec(E, md)), _mul(ms, 2.0 * varbar))
    wbar = (-_mat_dot(E, C) - varbar * Qs) * invW * invW - (_dot(mubar_d, md) + _dot(mubar_s, ms)) * invW
    return wbar, _mul(mubar_d, invW), _mul(mubar_s, invW), _mat_mul(E, invW), varbar * invW


@triton.jit
def _point_grad(G, c, d, s):
    """Gradients of a point (dst d, src s, weight c) from the adjoints G of the moments."""
    wbar, sdbar, ssbar, Cbar, qsbar = G
    Cs = _matvec(Cbar, s)
    CTd = _matTvec(Cbar, d)
    gd = _mul(_add(sdbar, Cs), c)
    gs = _mul(_add(_add(ssbar, CTd), _mul(s, 2.0 * qsbar)), c)
    gc = wbar + _dot(sdbar, d) + _dot(ssbar, s) + _dot(d, Cs) + qsbar * _dot(s, s)
    return gd, gs, gc


# ----------------------------------------------------------------------------- umeyama


@triton.jit
def _umeyama_point(src_ptr, dst_ptr, w_ptr, idx, mask, od, os, ik, D: tl.constexpr, HAS_W: tl.constexpr,
                   DT: tl.constexpr):
    """Point idx of each problem in the frame (origins od, os, scale 1 / ik): weight, dst, src."""
    c = tl.load(w_ptr + idx, mask=mask, other=0.0).to(DT) if HAS_W else tl.where(mask, 1.0, 0.0).to(DT)
    d = _mul(_sub(_load3(dst_ptr, idx, mask, D, DT), od), ik)
    return c, d, _mul(_sub(_load3(src_ptr, idx, mask, D, DT), os), ik)


@triton.jit
def _umeyama_fit(src_ptr, dst_ptr, w_ptr, rows, row_ok, M, spread, corr, tie,
                 D: tl.constexpr, HAS_W: tl.constexpr, SCALE: tl.constexpr, NSWEEPS: tl.constexpr,
                 BLOCK_N: tl.constexpr, DT: tl.constexpr):
    """Two passes over the points of BLOCK_N problems: the frame (centroids, one power-of-two scale;
    the finite flag), then the moments in it; and the fit. Returns (fit, moments, frame)."""
    z = tl.zeros([BLOCK_N], DT)
    W = z
    Sd = (z, z, z)
    Ss = (z, z, z)
    big = z
    ok = row_ok
    for m in range(M):
        c, d, s = _umeyama_point(src_ptr, dst_ptr, w_ptr, rows * M + m, row_ok, (z, z, z), (z, z, z), 1.0, D, HAS_W, DT)
        ok = ok & _finite(c) & _finite3(d) & _finite3(s)
        W += c
        Sd = _add(Sd, _mul(d, c))
        Ss = _add(Ss, _mul(s, c))
        big = tl.maximum(big, tl.where(c != 0.0, tl.maximum(_amax3(d), _amax3(s)), 0.0))
    inv = tl.where(W > 0.0, 1.0 / tl.where(W > 0.0, W, 1.0), 0.0)
    od = _mul(Sd, inv)
    os = _mul(Ss, inv)
    k = _pow2_floor(big, DT)
    ik = _inverse_rn(k)
    mom = _zero_moments(z)
    for m in range(M):
        c, d, s = _umeyama_point(src_ptr, dst_ptr, w_ptr, rows * M + m, row_ok, od, os, ik, D, HAS_W, DT)
        mom = _moments_add(mom, c, d, s)
    fit = _solve(mom, _mul(od, ik), _mul(os, ik), spread, corr, tie, D, SCALE, NSWEEPS)
    return fit, mom, (od, os, k, ik, ok == 0)


@triton.jit(do_not_specialize=["N", "M"])
def _umeyama_fwd_kernel(
    src_ptr, dst_ptr, w_ptr, r_ptr, s_ptr, t_ptr, N, M, spread, corr, tie,
    D: tl.constexpr, HAS_W: tl.constexpr, SCALE: tl.constexpr, NSWEEPS: tl.constexpr,
    BLOCK_N: tl.constexpr, DT: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    fit, _mom, frame = _umeyama_fit(src_ptr, dst_ptr, w_ptr, rows, row_ok, M, spread, corr, tie,
                                    D, HAS_W, SCALE, NSWEEPS, BLOCK_N, DT)
    _invW, _md, _ms, _var, R, s, t, _opt, _unc, _modes, _f = fit
    od, os, k, _ik, bad = frame
    # back from the frame: t = od + k t' - s R os
    t = _sub(_add(od, _mul(t, k)), _mul(_matvec(R, os), s))
    nan = float("nan")
    for a in tl.static_range(D):
        for b in tl.static_range(D):
            tl.store(r_ptr + rows * (D * D) + a * D + b, tl.where(bad, nan, R[a][b]).to(r_ptr.dtype.element_ty),
                     mask=row_ok)
    _store3(t_ptr, rows, _select(bad, (nan, nan, nan), t), row_ok, D)
    if SCALE:  # with scale=False s is the constant 1
        s = tl.where(bad, nan, s)
    tl.store(s_ptr + rows, s.to(s_ptr.dtype.element_ty), mask=row_ok)


@triton.jit(do_not_specialize=["N", "M"])
def _umeyama_bwd_kernel(
    gr_ptr, gs_ptr, gt_ptr, src_ptr, dst_ptr, w_ptr, gsrc_ptr, gdst_ptr, gw_ptr, N, M, spread, corr, tie,
    D: tl.constexpr, HAS_W: tl.constexpr, SCALE: tl.constexpr, NSWEEPS: tl.constexpr,
    BLOCK_N: tl.constexpr, DT: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    fit, mom, frame = _umeyama_fit(src_ptr, dst_ptr, w_ptr, rows, row_ok, M, spread, corr, tie,
                                   D, HAS_W, SCALE, NSWEEPS, BLOCK_N, DT)
    _invW, _md, ms, _var, R, s, _t, _opt, _unc, _modes, _f = fit
    od, os, k, ik, bad = frame
    z = tl.zeros([BLOCK_N], DT)
    gR = gr_ptr + rows * (D * D)
    Rbar = (_load3(gR, 0, row_ok, D, DT), _load3(gR + D, 0, row_ok, D, DT),
            _load3(gR + 2 * D, 0, row_ok, D, DT) if D == 3 else (z, z, z))
    # t = od + k (mu_d' - s R (mu_s' + os')) in the frame: its adjoint there is k tbar
    tbar = _mul(_load3(gt_ptr, rows, row_ok, D, DT), k)
    us = _add(ms, _mul(os, ik))
    Abar = _mat_mul(_outer(tbar, us), -1.0)
    sbar = tl.load(gs_ptr + rows, mask=row_ok, other=0.0).to(DT) + _mat_dot(Abar, R) if SCALE else z
    G = _solve_backward(fit, mom[3], mom[4], _mat_add(Rbar, _mat_mul(Abar, s)), sbar, tbar,
                        _mul(_matTvec(R, tbar), -s), SCALE)
    nan = float("nan")
    for m in range(M):
        c, d, s_ = _umeyama_point(src_ptr, dst_ptr, w_ptr, rows * M + m, row_ok, od, os, ik, D, HAS_W, DT)
        gd, gs, gc = _point_grad(G, c, d, s_)
        _store3(gdst_ptr, rows * M + m, _select(bad, (nan, nan, nan), _mul(gd, ik)), row_ok, D)
        _store3(gsrc_ptr, rows * M + m, _select(bad, (nan, nan, nan), _mul(gs, ik)), row_ok, D)
        tl.store(gw_ptr + rows * M + m, tl.where(bad, nan, gc).to(gw_ptr.dtype.element_ty), mask=row_ok)


# ---------------------------------------------------------------------- part_alignment


@triton.jit
def _part_frame(f_ptr, b, p, P, mask, DT: tl.constexpr):
    """Origin (3) and scale of the frame of part p of sample(s) b (see part_frames)."""
    base = f_ptr + (b * P + p) * 4
    o = (tl.load(base, mask=mask, other=0.0).to(DT), tl.load(base + 1, mask=mask, other=0.0).to(DT),
         tl.load(base + 2, mask=mask, other=0.0).to(DT))
    return o, tl.load(base + 3, mask=mask, other=1.0).to(DT)


@triton.jit
def _part_point(x_ptr, w_ptr, b, k, K, mask, o, ik, D: tl.constexpr, HAS_W: tl.constexpr, DT: tl.constexpr):
    """Point k of sample(s) b in the frame (o, 1/k), its weight, and whether both are finite."""
    x = _load3(x_ptr, b * K + k, mask, D, DT)
    w = tl.load(w_ptr + b * K + k, mask=mask, other=0.0).to(DT) if HAS_W else tl.where(mask, 1.0, 0.0).to(DT)
    return _mul(_sub(x, o), ik), w, _finite3(x) & _finite(w)


@triton.jit(do_not_specialize=["B", "K", "P"])
def _part_fwd_kernel(
    x_ptr, m_ptr, w_ptr, f_ptr, r_ptr, rec_ptr, B, K, P, spread, corr, tie,
    D: tl.constexpr, HAS_W: tl.constexpr, SCALE: tl.constexpr, FULL: tl.constexpr, NSWEEPS: tl.constexpr,
    BLOCK_PAIRS: tl.constexpr, DT: tl.constexpr,
):
    pairs = tl.program_id(0) * BLOCK_PAIRS + tl.arange(0, BLOCK_PAIRS)  # fit (i, j) of part p, lane i * B + j
    p = tl.program_id(1)
    pair_ok = pairs < B * B
    i = pairs // B
    j = pairs % B
    od, k = _part_frame(f_ptr, i, p, P, pair_ok, DT)  # one scale per part: a rigid fit stays rigid
    os, _k = _part_frame(f_ptr, j, p, P, pair_ok, DT)
    ik = _inverse_rn(k)
    z = tl.zeros([BLOCK_PAIRS], DT)
    mom = _zero_moments(z)
    ok = pair_ok
    for q in range(K):  # points outside the part are never loaded: their NaN does not reach the fit
        if tl.load(m_ptr + p * K + q) != 0:
            d, wi, ok_i = _part_point(x_ptr, w_ptr, i, q, K, pair_ok, od, ik, D, HAS_W, DT)
            s, wj, ok_j = _part_point(x_ptr, w_ptr, j, q, K, pair_ok, os, ik, D, HAS_W, DT)
            ok = ok & ok_i & ok_j
            mom = _moments_add(mom, wi * wj, d, s)
    fit = _solve(mom, _mul(od, ik), _mul(os, ik), spread, corr, tie, D, SCALE, NSWEEPS)
    invW, _md, ms, _var, R, s, t, _opt, _unc, _modes, _f = fit
    A = _mat_mul(R, s)
    res = z
    E = (z, z, z)
    ES = ((z, z, z), (z, z, z), (z, z, z))
    for q in range(K):
        if tl.load(m_ptr + p * K + q) != 0:
            d, wi, _ok_i = _part_point(x_ptr, w_ptr, i, q, K, pair_ok, od, ik, D, HAS_W, DT)
            sk, wj, _ok_j = _part_point(x_ptr, w_ptr, j, q, K, pair_ok, os, ik, D, HAS_W, DT)
            c = wi * wj
            e = _sub(_sub(d, _matvec(A, sk)), t)
            res += c * (tl.abs(e[0]) + tl.abs(e[1]) + tl.abs(e[2]))
            if FULL:
                h = (c * _sgn(e[0]), c * _sgn(e[1]), c * _sgn(e[2]))
                E = _add(E, h)
                ES = _mat_add(ES, _outer(h, sk))
    live = pair_ok & (i != j)  # the self-fit is exact: r = 0 and a zero record
    bad = live & (ok == 0)
    nan = float("nan")
    fits = pairs * P + p
    r = tl.where(bad, nan, tl.where(live, res * invW * k, 0.0))
    tl.store(r_ptr + fits, r.to(r_ptr.dtype.element_ty), mask=pair_ok)
    rec = rec_ptr + fits * NREC
    invW = tl.where(live, invW, 0.0)
    for a in tl.static_range(3):
        for b in tl.static_range(3):
            tl.store(rec + REC_A + a * 3 + b, tl.where(bad, nan, tl.where(live, A[a][b], 0.0)), mask=pair_ok)
        tl.store(rec + REC_T + a, tl.where(bad, nan, tl.where(live, t[a], 0.0)), mask=pair_ok)
    tl.store(rec + REC_INVW, tl.where(bad, nan, invW), mask=pair_ok)
    if FULL:
        # unit upstream gradient of r' (r in the frame): e_k = d_k - A s_k - t, t = mu_d - A mu_s
        tbar = _mul(E, -invW)
        Abar = _mat_add(_mat_mul(ES, -invW), _mat_mul(_outer(tbar, ms), -1.0))
        wbar, sdbar, ssbar, Cbar, qsbar = _solve_backward(fit, mom[3], mom[4], _mat_mul(Abar, s), _mat_dot(Abar, R),
                                                          tbar, _mul(_matTvec(A, tbar), -1.0), SCALE)
        for a in tl.static_range(3):
            tl.store(rec + REC_SD + a, tl.where(bad, nan, sdbar[a]), mask=pair_ok)
            tl.store(rec + REC_SS + a, tl.where(bad, nan, ssbar[a]), mask=pair_ok)
            for b in tl.static_range(3):
                tl.store(rec + REC_C + a * 3 + b, tl.where(bad, nan, Cbar[a][b]), mask=pair_ok)
        tl.store(rec + REC_QS, tl.where(bad, nan, qsbar), mask=pair_ok)
        tl.store(rec + REC_W, tl.where(bad, nan, wbar), mask=pair_ok)
    else:
        for f in tl.static_range(REC_SD, NREC):
            tl.store(rec + f, tl.where(bad, nan, z), mask=pair_ok)


@triton.jit
def _fit_point_grad(rec_ptr, fit, ok, g, r, c, d, s, FULL: tl.constexpr, DT: tl.constexpr):
    """Gradient of fits `fit` (their records; g the upstream gradient of r in the fit's frame and r
    that value) at points (dst d, src s, weight c): the explicit L1 term plus the moment adjoints."""
    rec = rec_ptr + fit * NREC
    A = (_load3(rec + REC_A, 0, ok, 3, DT), _load3(rec + REC_A + 3, 0, ok, 3, DT),
         _load3(rec + REC_A + 6, 0, ok, 3, DT))
    gi = g * tl.load(rec + REC_INVW, mask=ok, other=0.0).to(DT)
    e = _sub(_sub(d, _matvec(A, s)), _load3(rec + REC_T, 0, ok, 3, DT))
    h = (gi * c * _sgn(e[0]), gi * c * _sgn(e[1]), gi * c * _sgn(e[2]))
    gd = h
    gs = _mul(_matTvec(A, h), -1.0)
    gc = gi * (tl.abs(e[0]) + tl.abs(e[1]) + tl.abs(e[2]) - r)
    if FULL:
        G = (g * tl.load(rec + REC_W, mask=ok, other=0.0).to(DT),
             _mul(_load3(rec + REC_SD, 0, ok, 3, DT), g), _mul(_load3(rec + REC_SS, 0, ok, 3, DT), g),
             (_mul(_load3(rec + REC_C, 0, ok, 3, DT), g), _mul(_load3(rec + REC_C + 3, 0, ok, 3, DT), g),
              _mul(_load3(rec + REC_C + 6, 0, ok, 3, DT), g)),
             g * tl.load(rec + REC_QS, mask=ok, other=0.0).to(DT))
        pd, ps, pc = _point_grad(G, c, d, s)
        gd = _add(gd, pd)
        gs = _add(gs, ps)
        gc += pc
    return gd, gs, gc


@triton.jit(do_not_specialize=["B", "K", "P"])
def _part_bwd_kernel(
    g_ptr, r_ptr, rec_ptr, x_ptr, m_ptr, w_ptr, f_ptr, gx_ptr, gw_ptr, B, K, P,
    D: tl.constexpr, HAS_W: tl.constexpr, FULL: tl.constexpr, BLOCK_POINTS: tl.constexpr, DT: tl.constexpr,
):
    points = tl.program_id(0) * BLOCK_POINTS + tl.arange(0, BLOCK_POINTS)  # point k of sample n: lane n * K + k
    p = tl.program_id(1)
    n = points // K
    k = points % K
    member = (points < B * K) & (tl.load(m_ptr + p * K + k, mask=points < B * K, other=0) != 0)
    on, kn = _part_frame(f_ptr, n, p, P, member, DT)
    z = tl.zeros([BLOCK_POINTS], DT)
    acc = (z, z, z)
    accw = z
    for m in range(B):
        fit1 = (n * B + m) * P + p  # n is the target of fit (n, m, p)
        fit2 = (m * B + n) * P + p  # and the source of fit (m, n, p)
        live = member & (n != m)
        g1 = tl.load(g_ptr + fit1, mask=live, other=0.0).to(DT)
        g2 = tl.load(g_ptr + fit2, mask=live, other=0.0).to(DT)
        r1 = tl.load(r_ptr + fit1, mask=live, other=0.0).to(DT)
        r2 = tl.load(r_ptr + fit2, mask=live, other=0.0).to(DT)
        # a fit whose upstream gradient is 0 contributes nothing, unless it is NaN (then NaN)
        need = live & ((g1 != 0.0) | (g2 != 0.0) | (r1 != r1) | (r2 != r2))
        if tl.max(need.to(tl.int32), 0) > 0:
            om, _km = _part_frame(f_ptr, m, p, P, True, DT)
            ik = _inverse_rn(kn)
            xn, wn, _ok_n = _part_point(x_ptr, w_ptr, n, k, K, need, on, ik, D, HAS_W, DT)
            xm, wm, _ok_m = _part_point(x_ptr, w_ptr, m, k, K, need, om, ik, D, HAS_W, DT)
            # in the frame r = k r' and x' = (x - o) / k: dr/dx = dr'/dx', dr/dc = k dr'/dc
            gd, _gs1, gc1 = _fit_point_grad(rec_ptr, fit1, need, g1 * kn, r1 * ik, wn * wm, xn, xm, FULL, DT)
            _gd2, gs, gc2 = _fit_point_grad(rec_ptr, fit2, need, g2 * kn, r2 * ik, wn * wm, xm, xn, FULL, DT)
            acc = _select(need, _add(acc, _mul(_add(gd, gs), ik)), acc)
            accw = tl.where(need, accw + (gc1 + gc2) * wm, accw)
    out = p * B * K + points
    _store3(gx_ptr, out, acc, points < B * K, D)
    tl.store(gw_ptr + out, accw.to(gw_ptr.dtype.element_ty), mask=points < B * K)


# ----------------------------------------------------------------------------- launchers


def umeyama_forward(src, dst, w, scale, tol):
    """``src, dst [N, M, D]``, ``w [N, M]`` or None; tol = (spread, corr, tie).
    Returns ``R [N, D, D]``, ``s [N]``, ``t [N, D]`` in the dtype of ``src``."""
    dtype = src.dtype
    src, dst, w = compute(src), compute(dst), compute(w)
    N, M, D = src.shape
    R = torch.empty(N, D, D, dtype=src.dtype, device=src.device)
    s = torch.empty(N, dtype=src.dtype, device=src.device)
    t = torch.empty(N, D, dtype=src.dtype, device=src.device)
    if N == 0:
        return R.to(dtype), s.to(dtype), t.to(dtype)
    _umeyama_fwd_kernel[(triton.cdiv(N, UMEYAMA_BLOCK_N),)](
        src, dst, w if w is not None else src, R, s, t, N, M, *tol,
        D=D, HAS_W=w is not None, SCALE=scale, NSWEEPS=NSWEEP, BLOCK_N=UMEYAMA_BLOCK_N, DT=tl_dtype(src.dtype),
        num_warps=NUM_WARPS,
    )
    return R.to(dtype), s.to(dtype), t.to(dtype)


def umeyama_backward(gR, gs, gt, src, dst, w, scale, tol):
    """Gradients ``(src [N,M,D], dst [N,M,D], weights [N,M])`` in the compute dtype."""
    src, dst, w = compute(src), compute(dst), compute(w)
    gR, gs, gt = (compute(g, src.dtype) for g in (gR, gs, gt))
    N, M, D = src.shape
    g_src = torch.empty_like(src)
    g_dst = torch.empty_like(src)
    g_w = torch.empty(N, M, dtype=src.dtype, device=src.device)
    if N == 0 or M == 0:
        return g_src.zero_(), g_dst.zero_(), g_w.zero_()
    _umeyama_bwd_kernel[(triton.cdiv(N, UMEYAMA_BLOCK_N),)](
        gR, gs, gt, src, dst, w if w is not None else src, g_src, g_dst, g_w, N, M, *tol,
        D=D, HAS_W=w is not None, SCALE=scale, NSWEEPS=NSWEEP, BLOCK_N=UMEYAMA_BLOCK_N, DT=tl_dtype(src.dtype),
        num_warps=NUM_WARPS,
    )
    return g_src, g_dst, g_w


def part_frames(x, m, w):
    """The frame of each (sample, part), ``[B, P, 4]``: the weighted centroid of the part's points
    (0 for an empty or weightless part), and one scale per part for every sample, the largest power
    of two not above the largest finite coordinate magnitude of the part's weighted points (1 when
    that is 0): as ``csrc/umeyama.cpp``'s ``PProblem::prepare``."""
    B, K, D = x.shape
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    inside = m.bool()[None, :, :, None]  # [1, P, K, 1]
    mw = torch.where(inside[..., 0], w[:, None, :] if w is not None else 1.0, zero)  # [B, P, K]
    tot = mw.sum(-1, keepdim=True)
    pts = torch.where(inside, x[:, None], zero)
    o = (mw.unsqueeze(-1) * pts).sum(2) / torch.where(tot > 0, tot, torch.ones_like(tot))
    sized = (mw.unsqueeze(-1) != 0) & torch.isfinite(pts)
    big = torch.where(sized, pts.abs(), zero).amax((0, 2, 3))  # [P]
    mantissa, _ = torch.frexp(big)  # big = mantissa 2^e, mantissa in [0.5, 1): 2^(e - 1) exactly
    k = torch.where((big >= torch.finfo(x.dtype).tiny) & torch.isfinite(big), big / (2 * mantissa), 1.0)
    if D == 2:
        o = torch.cat([o, torch.zeros_like(o[..., :1])], -1)
    return torch.cat([o, k.expand(B, -1).unsqueeze(-1)], -1).contiguous()


def part_alignment_forward(points, parts, w, scale, full, tol):
    """``points [B,K,D]``, ``parts [P,K]`` bool, ``w [B,K]`` or None. Returns ``r [B,B,P]`` in the
    dtype of ``points`` and the records ``[B,B,P,NREC]``."""
    x, w, m = compute(points), compute(w), parts.to(torch.uint8).contiguous()
    B, K, D = x.shape
    P = m.shape[0]
    r = torch.empty(B, B, P, dtype=x.dtype, device=x.device)
    rec = torch.empty(B, B, P, RECORD["size"], dtype=x.dtype, device=x.device)
    if P == 0:
        return r.to(points.dtype), rec
    _part_fwd_kernel[(triton.cdiv(B * B, PART_BLOCK_PAIRS), P)](
        x, m, w if w is not None else x, part_frames(x, m, w), r, rec, B, K, P, *tol,
        D=D, HAS_W=w is not None, SCALE=scale, FULL=full, NSWEEPS=NSWEEP, BLOCK_PAIRS=PART_BLOCK_PAIRS,
        DT=tl_dtype(x.dtype), num_warps=NUM_WARPS,
    )
    return r.to(points.dtype), rec


def part_alignment_backward(grad_r, r, record, points, parts, w, scale, full):
    """Gradients ``(points [B,K,D], weights [B,K])`` in the compute dtype from ``grad_r``, ``r`` and the
    forward's records (``scale`` is in the records)."""
    x, w, m = compute(points), compute(w), parts.to(torch.uint8).contiguous()
    g, r, rec = compute(grad_r, x.dtype), compute(r, x.dtype), record.contiguous()
    B, K, D = x.shape
    P = m.shape[0]
    if P == 0:
        return torch.zeros_like(x), torch.zeros(B, K, dtype=x.dtype, device=x.device)
    gx = torch.empty(P, B, K, D, dtype=x.dtype, device=x.device)
    gw = torch.empty(P, B, K, dtype=x.dtype, device=x.device)
    _part_bwd_kernel[(triton.cdiv(B * K, PART_BWD_BLOCK_POINTS), P)](
        g, r, rec, x, m, w if w is not None else x, part_frames(x, m, w), gx, gw, B, K, P,
        D=D, HAS_W=w is not None, FULL=full, BLOCK_POINTS=PART_BWD_BLOCK_POINTS, DT=tl_dtype(x.dtype),
        num_warps=NUM_WARPS,
    )
    return gx.sum(0), gw.sum(0)


def _signature(fn, ptr, constexprs):
    """Triton's signature of ``fn``: pointers of type ``ptr`` (the part mask ``*u8``), int32 sizes,
    float32 tolerances and the given constexprs."""
    def kind(name):
        if name in constexprs:
            return "constexpr"
        if name.endswith("_ptr"):
            return "*u8" if name == "m_ptr" else ptr
        return "fp32" if name in ("spread", "corr", "tie") else "i32"

    return {name: kind(name) for name in fn.arg_names}


def _compile_cases():
    """Every kernel in float32 for D = 2 and 3 and in float64 for D = 3 (with weights, scale, both
    gradient modes), plus the forward kernels without weights and scale (float32, D = 3): the
    flags are plain constexpr switches (CI time: each variant takes seconds to lower)."""
    options = {"num_warps": NUM_WARPS}
    cases = []
    for dt, ptr, D, has_w, scale in [(tl.float32, "*fp32", 2, True, True), (tl.float32, "*fp32", 3, True, True),
                                     (tl.float64, "*fp64", 3, True, True), (tl.float32, "*fp32", 3, False, False)]:
        lean = not has_w  # the switched-off flags: forward kernels only
        label = f"{ptr[1:]} D={D} w={int(has_w)} scale={int(scale)}"
        u = dict(D=D, HAS_W=has_w, SCALE=scale, NSWEEPS=NSWEEP, BLOCK_N=UMEYAMA_BLOCK_N, DT=dt)
        kernels = [(f"umeyama fwd {label}", _umeyama_fwd_kernel, u)]
        if not lean:
            kernels.append((f"umeyama bwd {label}", _umeyama_bwd_kernel, u))
        for full in (False,) if lean else (False, True):
            pf = dict(D=D, HAS_W=has_w, SCALE=scale, FULL=full, NSWEEPS=NSWEEP, BLOCK_PAIRS=PART_BLOCK_PAIRS, DT=dt)
            kernels.append((f"part_alignment fwd {label} full={int(full)}", _part_fwd_kernel, pf))
            if not lean:
                pb = dict(D=D, HAS_W=has_w, FULL=full, BLOCK_POINTS=PART_BWD_BLOCK_POINTS, DT=dt)
                kernels.append((f"part_alignment bwd {ptr[1:]} D={D} w={int(has_w)} full={int(full)}",
                                _part_bwd_kernel, pb))
        cases += [(name, fn, _signature(fn, ptr, const), const, options) for name, fn, const in kernels]
    return cases


GPU_COMPILE_CASES = _compile_cases()
