"""Triton kernels of ``kpfast.umeyama`` and ``kpfast.part_alignment``: forward and backward.

Each lane of a program is one fit, so every 3x3 solve runs in registers, vectorized
across fits. Point sets are loaded as tiles ``[fits, points]`` (chunks of
``BLOCK_K`` points) and reduced along the point axis into per-fit weighted moments,
in coordinates shifted near each set's centroid (the fit is exactly invariant to the
shift; raw second moments then lose no precision). 2D fits are solved in closed form,
3D fits with Horn's quaternion method: a fixed number of cyclic Jacobi sweeps
diagonalizes the symmetric 4x4 matrix, a sorting network orders the eigenpairs.

- ``umeyama``: one program per ``BLOCK_N`` problems; forward two passes over the
  points (centroids, then moments); backward recomputes the fit, runs the
  implicit-function chain (rotation modes from the same eigen-decomposition) and
  writes per-point gradients in a third pass.
- ``part_alignment`` forward: one program per (target sample ``i``, part ``p``, block
  of ``BLOCK_J`` source samples ``j``): moments, solve, residual pass; with the full
  gradient the same pass also accumulates the sign sums of the L1 residual and the
  program writes the adjoints of the fit's moments for a unit upstream gradient (all
  of backward that does not depend on it, since the rest is linear in it) into a
  30-float record per fit.
- ``part_alignment`` backward: one program per (sample ``n``, part ``p``, block of
  points); it walks the other samples ``m`` in tiles ``[BLOCK_M, BLOCK_K]`` and
  gathers both roles of ``n`` (target of fit ``(n, m, p)``, source of ``(m, n, p)``)
  from the records: a deterministic gather, no atomics. The launcher sums the ``P``
  per-part partial gradients.

No host synchronization anywhere. Semantics: ``kpfast/reference.py``
(``umeyama_reference``, ``part_alignment_reference``, ``UMEYAMA_TOL``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

NREC = 30  # record layout: A (9), t (3), 1/W, adj. Sd (3), Ss (3), C (9), Qs, W; as csrc/umeyama.cpp
NSWEEP = 6  # Jacobi sweeps: off-diagonal below 1e-15 (float64) / 1e-7 (float32) relative
UMEYAMA_BLOCK_N = 32
UMEYAMA_BLOCK_M = 16
PART_BLOCK_J = 32
PART_BLOCK_K = 16
PART_BWD_BLOCK_M = 16
PART_BWD_BLOCK_K = 32


# ----------------------------------------------------------------------------- helpers


@triton.jit
def _jrot(app, aqq, apq, arp, arq, asp, asq, v0p, v1p, v2p, v3p, v0q, v1q, v2q, v3q):
    """One Jacobi rotation zeroing a[p][q] of a symmetric 4x4 (r, s: the other indices)."""
    # t = tan(angle) = sign(theta) / (|theta| + sqrt(theta^2 + 1)), theta = (aqq - app) / (2 apq),
    # written without dividing by apq (no overflow for tiny apq)
    diff = aqq - app
    num = tl.where(diff < 0.0, -2.0 * apq, 2.0 * apq)
    den = tl.abs(diff) + tl.sqrt(diff * diff + 4.0 * apq * apq)
    t = tl.where(den > 0.0, num / tl.where(den > 0.0, den, 1.0), 0.0)
    c = 1.0 / tl.sqrt(t * t + 1.0)
    s = t * c
    app2 = app - t * apq
    aqq2 = aqq + t * apq
    arp2 = c * arp - s * arq
    arq2 = s * arp + c * arq
    asp2 = c * asp - s * asq
    asq2 = s * asp + c * asq
    w0p = c * v0p - s * v0q
    w0q = s * v0p + c * v0q
    w1p = c * v1p - s * v1q
    w1q = s * v1p + c * v1q
    w2p = c * v2p - s * v2q
    w2q = s * v2p + c * v2q
    w3p = c * v3p - s * v3q
    w3q = s * v3p + c * v3q
    return app2, aqq2, apq * 0.0, arp2, arq2, asp2, asq2, w0p, w1p, w2p, w3p, w0q, w1q, w2q, w3q


@triton.jit
def _ce(la, a0, a1, a2, a3, lb, b0, b1, b2, b3):
    """Compare-exchange of two eigenpairs: the larger eigenvalue first."""
    sw = lb > la
    return (tl.where(sw, lb, la), tl.where(sw, b0, a0), tl.where(sw, b1, a1), tl.where(sw, b2, a2), tl.where(sw, b3, a3),
            tl.where(sw, la, lb), tl.where(sw, a0, b0), tl.where(sw, a1, b1), tl.where(sw, a2, b2), tl.where(sw, a3, b3))


@triton.jit
def _mode(qw, qx, qy, qz, pw, px, py, pz, lam1, laml, tie):
    """Body-frame rotation axis vec(conj(q) * p) of eigenvector p, and 1 / half-gap (0 if tied)."""
    vx = qw * px - pw * qx - (qy * pz - qz * py)
    vy = qw * py - pw * qy - (qz * px - qx * pz)
    vz = qw * pz - pw * qz - (qx * py - qy * px)
    g = (lam1 - laml) * 0.5
    keep = 2.0 * g > tie * lam1
    f = tl.where(keep, 1.0 / tl.where(keep, g, 1.0), 0.0)
    return vx, vy, vz, f


@triton.jit
def _rotation3(s00, s01, s02, s10, s11, s12, s20, s21, s22, tie, NSWEEPS: tl.constexpr):
    """Proper rotation maximizing tr(R^T Sigma) (Horn), its optimal value, tie flag and modes."""
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
    # eigenpairs (lambda, q) sorted by a network: (0,1) (2,3) (0,2) (1,3) (1,2)
    l0, p00, p01, p02, p03 = a00, v00, v10, v20, v30
    l1, p10, p11, p12, p13 = a11, v01, v11, v21, v31
    l2, p20, p21, p22, p23 = a22, v02, v12, v22, v32
    l3, p30, p31, p32, p33 = a33, v03, v13, v23, v33
    l0, p00, p01, p02, p03, l1, p10, p11, p12, p13 = _ce(l0, p00, p01, p02, p03, l1, p10, p11, p12, p13)
    l2, p20, p21, p22, p23, l3, p30, p31, p32, p33 = _ce(l2, p20, p21, p22, p23, l3, p30, p31, p32, p33)
    l0, p00, p01, p02, p03, l2, p20, p21, p22, p23 = _ce(l0, p00, p01, p02, p03, l2, p20, p21, p22, p23)
    l1, p10, p11, p12, p13, l3, p30, p31, p32, p33 = _ce(l1, p10, p11, p12, p13, l3, p30, p31, p32, p33)
    l1, p10, p11, p12, p13, l2, p20, p21, p22, p23 = _ce(l1, p10, p11, p12, p13, l2, p20, p21, p22, p23)
    # ties of the top two: the member of their span closest to the identity quaternion
    n2 = p00 * p00 + p10 * p10
    tied = ((l0 - l1) <= tie * l0) & (n2 > 5e-7)
    inv = 1.0 / tl.sqrt(tl.where(tied, n2, 1.0))
    qw = tl.where(tied, (p00 * p00 + p10 * p10) * inv, p00)
    qx = tl.where(tied, (p00 * p01 + p10 * p11) * inv, p01)
    qy = tl.where(tied, (p00 * p02 + p10 * p12) * inv, p02)
    qz = tl.where(tied, (p00 * p03 + p10 * p13) * inv, p03)
    r00 = qw * qw + qx * qx - qy * qy - qz * qz
    r01 = 2.0 * (qx * qy - qw * qz)
    r02 = 2.0 * (qx * qz + qw * qy)
    r10 = 2.0 * (qx * qy + qw * qz)
    r11 = qw * qw - qx * qx + qy * qy - qz * qz
    r12 = 2.0 * (qy * qz - qw * qx)
    r20 = 2.0 * (qx * qz - qw * qy)
    r21 = 2.0 * (qy * qz + qw * qx)
    r22 = qw * qw - qx * qx - qy * qy + qz * qz
    m0x, m0y, m0z, f0 = _mode(qw, qx, qy, qz, p10, p11, p12, p13, l0, l1, tie)
    m1x, m1y, m1z, f1 = _mode(qw, qx, qy, qz, p20, p21, p22, p23, l0, l2, tie)
    m2x, m2y, m2z, f2 = _mode(qw, qx, qy, qz, p30, p31, p32, p33, l0, l3, tie)
    return (r00, r01, r02, r10, r11, r12, r20, r21, r22, l0, tied,
            m0x, m0y, m0z, m1x, m1y, m1z, m2x, m2y, m2z, f0, f1, f2)


@triton.jit
def _solve(W, sdx, sdy, sdz, ssx, ssy, ssz, c00, c01, c02, c10, c11, c12, c20, c21, c22, qs, qd,
           odx, ody, odz, osx, osy, osz, spread, corr, tie,
           D: tl.constexpr, SCALE: tl.constexpr, NSWEEPS: tl.constexpr):
    """The fit from moments in shifted coordinates (shifts od, os): see UMEYAMA_TOL for the branches."""
    has = W > 0.0
    invW = tl.where(has, 1.0 / tl.where(has, W, 1.0), 0.0)
    mdx = sdx * invW
    mdy = sdy * invW
    mdz = sdz * invW
    msx = ssx * invW
    msy = ssy * invW
    msz = ssz * invW
    g00 = c00 * invW - mdx * msx
    g01 = c01 * invW - mdx * msy
    g02 = c02 * invW - mdx * msz
    g10 = c10 * invW - mdy * msx
    g11 = c11 * invW - mdy * msy
    g12 = c12 * invW - mdy * msz
    g20 = c20 * invW - mdz * msx
    g21 = c21 * invW - mdz * msy
    g22 = c22 * invW - mdz * msz
    var_s = qs * invW - (msx * msx + msy * msy + msz * msz)
    var_d = qd * invW - (mdx * mdx + mdy * mdy + mdz * mdz)
    msq_s = var_s + (msx + osx) * (msx + osx) + (msy + osy) * (msy + osy) + (msz + osz) * (msz + osz)
    msq_d = var_d + (mdx + odx) * (mdx + odx) + (mdy + ody) * (mdy + ody) + (mdz + odz) * (mdz + odz)
    zero = W * 0.0
    if D == 3:
        (r00, r01, r02, r10, r11, r12, r20, r21, r22, lam1, _tied,
         m0x, m0y, m0z, m1x, m1y, m1z, m2x, m2y, m2z, f0, f1, f2) = _rotation3(
            g00, g01, g02, g10, g11, g12, g20, g21, g22, tie, NSWEEPS)
    else:
        a = g00 + g11
        b = g10 - g01
        lam1 = tl.sqrt(a * a + b * b)
        pos = lam1 > 0.0
        il = 1.0 / tl.where(pos, lam1, 1.0)
        r00 = tl.where(pos, a * il, 1.0)
        r01 = tl.where(pos, -b * il, 0.0)
        r10 = tl.where(pos, b * il, 0.0)
        r11 = tl.where(pos, a * il, 1.0)
        r02 = zero
        r12 = zero
        r20 = zero
        r21 = zero
        r22 = zero + 1.0
        m0x = zero
        m0y = zero
        m0z = zero + 1.0
        m1x = zero
        m1y = zero
        m1z = zero
        m2x = zero
        m2y = zero
        m2z = zero
        f0 = tl.where(pos, il, 0.0)
        f1 = zero
        f2 = zero
    no_src = var_s <= spread * msq_s
    no_dst = (var_d <= spread * msq_d) & (no_src == 0)
    uncorr = (lam1 <= corr * tl.sqrt(tl.maximum(var_s, 0.0) * tl.maximum(var_d, 0.0))) & (no_src == 0) & (no_dst == 0)
    forced = no_src | no_dst | uncorr
    r00 = tl.where(forced, 1.0, r00)
    r01 = tl.where(forced, 0.0, r01)
    r02 = tl.where(forced, 0.0, r02)
    r10 = tl.where(forced, 0.0, r10)
    r11 = tl.where(forced, 1.0, r11)
    r12 = tl.where(forced, 0.0, r12)
    r20 = tl.where(forced, 0.0, r20)
    r21 = tl.where(forced, 0.0, r21)
    r22 = tl.where(forced, 1.0, r22)
    lam = (r00 * g00 + r01 * g01 + r02 * g02 + r10 * g10 + r11 * g11 + r12 * g12
           + r20 * g20 + r21 * g21 + r22 * g22)
    var_safe = tl.where(no_src, 1.0, var_s)
    if SCALE:
        s = tl.where(no_src, 1.0, tl.where(no_dst, 0.0, lam / var_safe))
    else:
        s = zero + 1.0
    tx = mdx - s * (r00 * msx + r01 * msy + r02 * msz)
    ty = mdy - s * (r10 * msx + r11 * msy + r12 * msz)
    tz = mdz - s * (r20 * msx + r21 * msy + r22 * msz)
    optimal = forced == 0
    return (invW, mdx, mdy, mdz, msx, msy, msz, var_safe, r00, r01, r02, r10, r11, r12, r20, r21, r22, s,
            tx, ty, tz, optimal, uncorr, m0x, m0y, m0z, m1x, m1y, m1z, m2x, m2y, m2z, f0, f1, f2)


@triton.jit
def _solve_backward(b00, b01, b02, b10, b11, b12, b20, b21, b22, sbar, udx, udy, udz, usx, usy, usz,
                    invW, mdx, mdy, mdz, msx, msy, msz, var_safe, r00, r01, r02, r10, r11, r12, r20, r21, r22, s,
                    optimal, uncorr, m0x, m0y, m0z, m1x, m1y, m1z, m2x, m2y, m2z, f0, f1, f2,
                    c00, c01, c02, c10, c11, c12, c20, c21, c22, qs, SCALE: tl.constexpr):
    """Adjoints of the moments (W, Sd, Ss, C, Qs) from those of R (b), s and the means (ud, us)."""
    if SCALE:
        through_s = optimal | uncorr
        lambar = tl.where(through_s, sbar / var_safe, 0.0)
        varbar = tl.where(through_s, -sbar * s / var_safe, 0.0)
    else:
        lambar = sbar * 0.0
        varbar = sbar * 0.0
    # z = vee(Z - Z^T), Z = R^T Rbar
    z01 = r00 * b01 + r10 * b11 + r20 * b21
    z10 = r01 * b00 + r11 * b10 + r21 * b20
    z20 = r02 * b00 + r12 * b10 + r22 * b20
    z02 = r00 * b02 + r10 * b12 + r20 * b22
    z12 = r01 * b02 + r11 * b12 + r21 * b22
    z21 = r02 * b01 + r12 * b11 + r22 * b21
    zx = z21 - z12
    zy = z02 - z20
    zz = z10 - z01
    k0 = f0 * (m0x * zx + m0y * zy + m0z * zz)
    k1 = f1 * (m1x * zx + m1y * zy + m1z * zz)
    k2 = f2 * (m2x * zx + m2y * zy + m2z * zz)
    yx = tl.where(optimal, k0 * m0x + k1 * m1x + k2 * m2x, 0.0)
    yy = tl.where(optimal, k0 * m0y + k1 * m1y + k2 * m2y, 0.0)
    yz = tl.where(optimal, k0 * m0z + k1 * m1z + k2 * m2z, 0.0)
    # Sbar = lambar R + R [y]_x,  [y]_x = [[0, -yz, yy], [yz, 0, -yx], [-yy, yx, 0]]
    e00 = lambar * r00 + (r01 * yz - r02 * yy)
    e01 = lambar * r01 + (-r00 * yz + r02 * yx)
    e02 = lambar * r02 + (r00 * yy - r01 * yx)
    e10 = lambar * r10 + (r11 * yz - r12 * yy)
    e11 = lambar * r11 + (-r10 * yz + r12 * yx)
    e12 = lambar * r12 + (r10 * yy - r11 * yx)
    e20 = lambar * r20 + (r21 * yz - r22 * yy)
    e21 = lambar * r21 + (-r20 * yz + r22 * yx)
    e22 = lambar * r22 + (r20 * yy - r21 * yx)
    wbar = -(e00 * c00 + e01 * c01 + e02 * c02 + e10 * c10 + e11 * c11 + e12 * c12 + e20 * c20 + e21 * c21 + e22 * c22)
    udx = udx - (e00 * msx + e01 * msy + e02 * msz)
    udy = udy - (e10 * msx + e11 * msy + e12 * msz)
    udz = udz - (e20 * msx + e21 * msy + e22 * msz)
    usx = usx - (e00 * mdx + e10 * mdy + e20 * mdz) - 2.0 * varbar * msx
    usy = usy - (e01 * mdx + e11 * mdy + e21 * mdz) - 2.0 * varbar * msy
    usz = usz - (e02 * mdx + e12 * mdy + e22 * mdz) - 2.0 * varbar * msz
    wbar = (wbar - varbar * qs) * invW * invW
    wbar -= (udx * mdx + udy * mdy + udz * mdz + usx * msx + usy * msy + usz * msz) * invW
    return (wbar, udx * invW, udy * invW, udz * invW, usx * invW, usy * invW, usz * invW,
            e00 * invW, e01 * invW, e02 * invW, e10 * invW, e11 * invW, e12 * invW, e20 * invW, e21 * invW, e22 * invW,
            varbar * invW)


@triton.jit
def _sgn(x):
    return tl.where(x > 0.0, 1.0, tl.where(x < 0.0, -1.0, 0.0))


# ----------------------------------------------------------------------------- umeyama


@triton.jit
def _load3(ptr, offs, mask, D: tl.constexpr, DT: tl.constexpr):
    x = tl.load(ptr + offs * D, mask=mask, other=0.0).to(DT)
    y = tl.load(ptr + offs * D + 1, mask=mask, other=0.0).to(DT)
    if D == 3:
        z = tl.load(ptr + offs * D + 2, mask=mask, other=0.0).to(DT)
    else:
        z = x * 0.0
    return x, y, z


@triton.jit
def _umeyama_moments(src_ptr, dst_ptr, w_ptr, rows, row_ok, M,
                     D: tl.constexpr, HAS_W: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
                     DT: tl.constexpr):
    """Two passes over the points of BLOCK_N problems: centroids (the shifts), then moments."""
    zero = tl.zeros([BLOCK_N], DT)
    W = zero
    sdx = zero
    sdy = zero
    sdz = zero
    ssx = zero
    ssy = zero
    ssz = zero
    for m0 in range(0, M, BLOCK_M):
        cols = m0 + tl.arange(0, BLOCK_M)
        ok = row_ok[:, None] & (cols[None, :] < M)
        offs = rows[:, None] * M + cols[None, :]
        if HAS_W:
            c = tl.load(w_ptr + offs, mask=ok, other=0.0).to(DT)
        else:
            c = tl.where(ok, 1.0, 0.0).to(DT)
        dx, dy, dz = _load3(dst_ptr, offs, ok, D, DT)
        sx, sy, sz = _load3(src_ptr, offs, ok, D, DT)
        W += tl.sum(c, 1)
        sdx += tl.sum(c * dx, 1)
        sdy += tl.sum(c * dy, 1)
        sdz += tl.sum(c * dz, 1)
        ssx += tl.sum(c * sx, 1)
        ssy += tl.sum(c * sy, 1)
        ssz += tl.sum(c * sz, 1)
    inv = tl.where(W > 0.0, 1.0 / tl.where(W > 0.0, W, 1.0), 0.0)
    odx = sdx * inv
    ody = sdy * inv
    odz = sdz * inv
    osx = ssx * inv
    osy = ssy * inv
    osz = ssz * inv
    sdx = zero
    sdy = zero
    sdz = zero
    ssx = zero
    ssy = zero
    ssz = zero
    c00 = zero
    c01 = zero
    c02 = zero
    c10 = zero
    c11 = zero
    c12 = zero
    c20 = zero
    c21 = zero
    c22 = zero
    qs = zero
    qd = zero
    for m0 in range(0, M, BLOCK_M):
        cols = m0 + tl.arange(0, BLOCK_M)
        ok = row_ok[:, None] & (cols[None, :] < M)
        offs = rows[:, None] * M + cols[None, :]
        if HAS_W:
            c = tl.load(w_ptr + offs, mask=ok, other=0.0).to(DT)
        else:
            c = tl.where(ok, 1.0, 0.0).to(DT)
        dx, dy, dz = _load3(dst_ptr, offs, ok, D, DT)
        sx, sy, sz = _load3(src_ptr, offs, ok, D, DT)
        dx = dx - odx[:, None]
        dy = dy - ody[:, None]
        dz = dz - odz[:, None]
        sx = sx - osx[:, None]
        sy = sy - osy[:, None]
        sz = sz - osz[:, None]
        sdx += tl.sum(c * dx, 1)
        sdy += tl.sum(c * dy, 1)
        sdz += tl.sum(c * dz, 1)
        ssx += tl.sum(c * sx, 1)
        ssy += tl.sum(c * sy, 1)
        ssz += tl.sum(c * sz, 1)
        c00 += tl.sum(c * dx * sx, 1)
        c01 += tl.sum(c * dx * sy, 1)
        c02 += tl.sum(c * dx * sz, 1)
        c10 += tl.sum(c * dy * sx, 1)
        c11 += tl.sum(c * dy * sy, 1)
        c12 += tl.sum(c * dy * sz, 1)
        c20 += tl.sum(c * dz * sx, 1)
        c21 += tl.sum(c * dz * sy, 1)
        c22 += tl.sum(c * dz * sz, 1)
        qs += tl.sum(c * (sx * sx + sy * sy + sz * sz), 1)
        qd += tl.sum(c * (dx * dx + dy * dy + dz * dz), 1)
    return (W, sdx, sdy, sdz, ssx, ssy, ssz, c00, c01, c02, c10, c11, c12, c20, c21, c22, qs, qd,
            odx, ody, odz, osx, osy, osz)


@triton.jit(do_not_specialize=["N", "M"])
def _umeyama_fwd_kernel(
    src_ptr, dst_ptr, w_ptr, r_ptr, s_ptr, t_ptr, N, M, spread, corr, tie,
    D: tl.constexpr, HAS_W: tl.constexpr, SCALE: tl.constexpr, NSWEEPS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, DT: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    (W, sdx, sdy, sdz, ssx, ssy, ssz, c00, c01, c02, c10, c11, c12, c20, c21, c22, qs, qd,
     odx, ody, odz, osx, osy, osz) = _umeyama_moments(
        src_ptr, dst_ptr, w_ptr, rows, row_ok, M, D, HAS_W, BLOCK_N, BLOCK_M, DT)
    (invW, mdx, mdy, mdz, msx, msy, msz, var_safe, r00, r01, r02, r10, r11, r12, r20, r21, r22, s,
     tx, ty, tz, optimal, uncorr, m0x, m0y, m0z, m1x, m1y, m1z, m2x, m2y, m2z, f0, f1, f2) = _solve(
        W, sdx, sdy, sdz, ssx, ssy, ssz, c00, c01, c02, c10, c11, c12, c20, c21, c22, qs, qd,
        odx, ody, odz, osx, osy, osz, spread, corr, tie, D, SCALE, NSWEEPS)
    # back to unshifted coordinates: t = t' + od - s R os
    tx = tx + odx - s * (r00 * osx + r01 * osy + r02 * osz)
    ty = ty + ody - s * (r10 * osx + r11 * osy + r12 * osz)
    tz = tz + odz - s * (r20 * osx + r21 * osy + r22 * osz)
    ty_ = t_ptr.dtype.element_ty
    tl.store(s_ptr + rows, s.to(ty_), mask=row_ok)
    tl.store(t_ptr + rows * D, tx.to(ty_), mask=row_ok)
    tl.store(t_ptr + rows * D + 1, ty.to(ty_), mask=row_ok)
    base = r_ptr + rows * (D * D)
    tl.store(base + 0, r00.to(ty_), mask=row_ok)
    tl.store(base + 1, r01.to(ty_), mask=row_ok)
    if D == 3:
        tl.store(t_ptr + rows * D + 2, tz.to(ty_), mask=row_ok)
        tl.store(base + 2, r02.to(ty_), mask=row_ok)
        tl.store(base + 3, r10.to(ty_), mask=row_ok)
        tl.store(base + 4, r11.to(ty_), mask=row_ok)
        tl.store(base + 5, r12.to(ty_), mask=row_ok)
        tl.store(base + 6, r20.to(ty_), mask=row_ok)
        tl.store(base + 7, r21.to(ty_), mask=row_ok)
        tl.store(base + 8, r22.to(ty_), mask=row_ok)
    else:
        tl.store(base + 2, r10.to(ty_), mask=row_ok)
        tl.store(base + 3, r11.to(ty_), mask=row_ok)


@triton.jit(do_not_specialize=["N", "M"])
def _umeyama_bwd_kernel(
    gr_ptr, gs_ptr, gt_ptr, src_ptr, dst_ptr, w_ptr, gsrc_ptr, gdst_ptr, gw_ptr, N, M, spread, corr, tie,
    D: tl.constexpr, HAS_W: tl.constexpr, SCALE: tl.constexpr, NSWEEPS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, DT: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    (W, sdx, sdy, sdz, ssx, ssy, ssz, c00, c01, c02, c10, c11, c12, c20, c21, c22, qs, qd,
     odx, ody, odz, osx, osy, osz) = _umeyama_moments(
        src_ptr, dst_ptr, w_ptr, rows, row_ok, M, D, HAS_W, BLOCK_N, BLOCK_M, DT)
    (invW, mdx, mdy, mdz, msx, msy, msz, var_safe, r00, r01, r02, r10, r11, r12, r20, r21, r22, s,
     tx, ty, tz, optimal, uncorr, m0x, m0y, m0z, m1x, m1y, m1z, m2x, m2y, m2z, f0, f1, f2) = _solve(
        W, sdx, sdy, sdz, ssx, ssy, ssz, c00, c01, c02, c10, c11, c12, c20, c21, c22, qs, qd,
        odx, ody, odz, osx, osy, osz, spread, corr, tie, D, SCALE, NSWEEPS)
    zero = W * 0.0
    gbase = gr_ptr + rows * (D * D)
    if D == 3:
        b00 = tl.load(gbase + 0, mask=row_ok, other=0.0).to(DT)
        b01 = tl.load(gbase + 1, mask=row_ok, other=0.0).to(DT)
        b02 = tl.load(gbase + 2, mask=row_ok, other=0.0).to(DT)
        b10 = tl.load(gbase + 3, mask=row_ok, other=0.0).to(DT)
        b11 = tl.load(gbase + 4, mask=row_ok, other=0.0).to(DT)
        b12 = tl.load(gbase + 5, mask=row_ok, other=0.0).to(DT)
        b20 = tl.load(gbase + 6, mask=row_ok, other=0.0).to(DT)
        b21 = tl.load(gbase + 7, mask=row_ok, other=0.0).to(DT)
        b22 = tl.load(gbase + 8, mask=row_ok, other=0.0).to(DT)
        gtz = tl.load(gt_ptr + rows * D + 2, mask=row_ok, other=0.0).to(DT)
    else:
        b00 = tl.load(gbase + 0, mask=row_ok, other=0.0).to(DT)
        b01 = tl.load(gbase + 1, mask=row_ok, other=0.0).to(DT)
        b10 = tl.load(gbase + 2, mask=row_ok, other=0.0).to(DT)
        b11 = tl.load(gbase + 3, mask=row_ok, other=0.0).to(DT)
        b02 = zero
        b12 = zero
        b20 = zero
        b21 = zero
        b22 = zero
        gtz = zero
    gtx = tl.load(gt_ptr + rows * D, mask=row_ok, other=0.0).to(DT)
    gty = tl.load(gt_ptr + rows * D + 1, mask=row_ok, other=0.0).to(DT)
    # t = mu_d - A mu_s (unshifted), A = s R
    ux = msx + osx
    uy = msy + osy
    uz = msz + osz
    a00 = -gtx * ux
    a01 = -gtx * uy
    a02 = -gtx * uz
    a10 = -gty * ux
    a11 = -gty * uy
    a12 = -gty * uz
    a20 = -gtz * ux
    a21 = -gtz * uy
    a22 = -gtz * uz
    usx = -s * (r00 * gtx + r10 * gty + r20 * gtz)
    usy = -s * (r01 * gtx + r11 * gty + r21 * gtz)
    usz = -s * (r02 * gtx + r12 * gty + r22 * gtz)
    if SCALE:
        sbar = tl.load(gs_ptr + rows, mask=row_ok, other=0.0).to(DT)
        sbar += (a00 * r00 + a01 * r01 + a02 * r02 + a10 * r10 + a11 * r11 + a12 * r12
                 + a20 * r20 + a21 * r21 + a22 * r22)
    else:
        sbar = zero
    (wbar, sdbx, sdby, sdbz, ssbx, ssby, ssbz, k00, k01, k02, k10, k11, k12, k20, k21, k22, qsb) = _solve_backward(
        b00 + s * a00, b01 + s * a01, b02 + s * a02, b10 + s * a10, b11 + s * a11, b12 + s * a12,
        b20 + s * a20, b21 + s * a21, b22 + s * a22, sbar, gtx, gty, gtz, usx, usy, usz,
        invW, mdx, mdy, mdz, msx, msy, msz, var_safe, r00, r01, r02, r10, r11, r12, r20, r21, r22, s,
        optimal, uncorr, m0x, m0y, m0z, m1x, m1y, m1z, m2x, m2y, m2z, f0, f1, f2,
        c00, c01, c02, c10, c11, c12, c20, c21, c22, qs, SCALE)
    for m0 in range(0, M, BLOCK_M):
        cols = m0 + tl.arange(0, BLOCK_M)
        ok = row_ok[:, None] & (cols[None, :] < M)
        offs = rows[:, None] * M + cols[None, :]
        if HAS_W:
            c = tl.load(w_ptr + offs, mask=ok, other=0.0).to(DT)
        else:
            c = tl.where(ok, 1.0, 0.0).to(DT)
        dx, dy, dz = _load3(dst_ptr, offs, ok, D, DT)
        sx, sy, sz = _load3(src_ptr, offs, ok, D, DT)
        dx = dx - odx[:, None]
        dy = dy - ody[:, None]
        dz = dz - odz[:, None]
        sx = sx - osx[:, None]
        sy = sy - osy[:, None]
        sz = sz - osz[:, None]
        gdx, gdy, gdz, gsx, gsy, gsz, gc = _point_grad(
            c, dx, dy, dz, sx, sy, sz, wbar[:, None], sdbx[:, None], sdby[:, None], sdbz[:, None],
            ssbx[:, None], ssby[:, None], ssbz[:, None], k00[:, None], k01[:, None], k02[:, None],
            k10[:, None], k11[:, None], k12[:, None], k20[:, None], k21[:, None], k22[:, None], qsb[:, None])
        ot = gsrc_ptr.dtype.element_ty
        tl.store(gdst_ptr + offs * D, gdx.to(ot), mask=ok)
        tl.store(gdst_ptr + offs * D + 1, gdy.to(ot), mask=ok)
        tl.store(gsrc_ptr + offs * D, gsx.to(ot), mask=ok)
        tl.store(gsrc_ptr + offs * D + 1, gsy.to(ot), mask=ok)
        if D == 3:
            tl.store(gdst_ptr + offs * D + 2, gdz.to(ot), mask=ok)
            tl.store(gsrc_ptr + offs * D + 2, gsz.to(ot), mask=ok)
        tl.store(gw_ptr + offs, gc.to(ot), mask=ok)


@triton.jit
def _point_grad(c, dx, dy, dz, sx, sy, sz, wbar, sdbx, sdby, sdbz, ssbx, ssby, ssbz,
                k00, k01, k02, k10, k11, k12, k20, k21, k22, qsb):
    """Gradients of a point (dst d, src s, weight c) from the adjoints of the raw moments."""
    ksx = k00 * sx + k01 * sy + k02 * sz
    ksy = k10 * sx + k11 * sy + k12 * sz
    ksz = k20 * sx + k21 * sy + k22 * sz
    kdx = k00 * dx + k10 * dy + k20 * dz
    kdy = k01 * dx + k11 * dy + k21 * dz
    kdz = k02 * dx + k12 * dy + k22 * dz
    gdx = c * (sdbx + ksx)
    gdy = c * (sdby + ksy)
    gdz = c * (sdbz + ksz)
    gsx = c * (ssbx + kdx + 2.0 * qsb * sx)
    gsy = c * (ssby + kdy + 2.0 * qsb * sy)
    gsz = c * (ssbz + kdz + 2.0 * qsb * sz)
    gc = (wbar + sdbx * dx + sdby * dy + sdbz * dz + ssbx * sx + ssby * sy + ssbz * sz
          + dx * ksx + dy * ksy + dz * ksz + qsb * (sx * sx + sy * sy + sz * sz))
    return gdx, gdy, gdz, gsx, gsy, gsz, gc


# ---------------------------------------------------------------------- part_alignment


@triton.jit(do_not_specialize=["B", "K", "P"])
def _part_fwd_kernel(
    x_ptr, m_ptr, w_ptr, o_ptr, r_ptr, rec_ptr, B, K, P, spread, corr, tie,
    D: tl.constexpr, HAS_W: tl.constexpr, SCALE: tl.constexpr, FULL: tl.constexpr, NSWEEPS: tl.constexpr,
    BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr, DT: tl.constexpr,
):
    i = tl.program_id(0)
    p = tl.program_id(1)
    js = tl.program_id(2) * BLOCK_J + tl.arange(0, BLOCK_J)
    j_ok = js < B
    zero = tl.zeros([BLOCK_J], DT)
    odx = tl.load(o_ptr + (i * P + p) * 3).to(DT)
    ody = tl.load(o_ptr + (i * P + p) * 3 + 1).to(DT)
    odz = tl.load(o_ptr + (i * P + p) * 3 + 2).to(DT)
    osx = tl.load(o_ptr + (js * P + p) * 3, mask=j_ok, other=0.0).to(DT)
    osy = tl.load(o_ptr + (js * P + p) * 3 + 1, mask=j_ok, other=0.0).to(DT)
    osz = tl.load(o_ptr + (js * P + p) * 3 + 2, mask=j_ok, other=0.0).to(DT)
    W = zero
    sdx = zero
    sdy = zero
    sdz = zero
    ssx = zero
    ssy = zero
    ssz = zero
    c00 = zero
    c01 = zero
    c02 = zero
    c10 = zero
    c11 = zero
    c12 = zero
    c20 = zero
    c21 = zero
    c22 = zero
    qs = zero
    qd = zero
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        c, dx, dy, dz, sx, sy, sz = _part_tile(x_ptr, m_ptr, w_ptr, i, js, j_ok, ks, k_ok, p, K,
                                               odx, ody, odz, osx, osy, osz, D, HAS_W, DT)
        W += tl.sum(c, 1)
        sdx += tl.sum(c * dx, 1)
        sdy += tl.sum(c * dy, 1)
        sdz += tl.sum(c * dz, 1)
        ssx += tl.sum(c * sx, 1)
        ssy += tl.sum(c * sy, 1)
        ssz += tl.sum(c * sz, 1)
        c00 += tl.sum(c * dx * sx, 1)
        c01 += tl.sum(c * dx * sy, 1)
        c02 += tl.sum(c * dx * sz, 1)
        c10 += tl.sum(c * dy * sx, 1)
        c11 += tl.sum(c * dy * sy, 1)
        c12 += tl.sum(c * dy * sz, 1)
        c20 += tl.sum(c * dz * sx, 1)
        c21 += tl.sum(c * dz * sy, 1)
        c22 += tl.sum(c * dz * sz, 1)
        qs += tl.sum(c * (sx * sx + sy * sy + sz * sz), 1)
        qd += tl.sum(c * (dx * dx + dy * dy + dz * dz), 1)
    (invW, mdx, mdy, mdz, msx, msy, msz, var_safe, r00, r01, r02, r10, r11, r12, r20, r21, r22, s,
     tx, ty, tz, optimal, uncorr, m0x, m0y, m0z, m1x, m1y, m1z, m2x, m2y, m2z, f0, f1, f2) = _solve(
        W, sdx, sdy, sdz, ssx, ssy, ssz, c00, c01, c02, c10, c11, c12, c20, c21, c22, qs, qd,
        odx + zero, ody + zero, odz + zero, osx, osy, osz, spread, corr, tie, D, SCALE, NSWEEPS)
    live = j_ok & (js != i)  # the self-fit is exact: r = 0 and a zero record
    invW = tl.where(live, invW, 0.0)
    a00 = s * r00
    a01 = s * r01
    a02 = s * r02
    a10 = s * r10
    a11 = s * r11
    a12 = s * r12
    a20 = s * r20
    a21 = s * r21
    a22 = s * r22
    res = zero
    ecx = zero
    ecy = zero
    ecz = zero
    e00 = zero
    e01 = zero
    e02 = zero
    e10 = zero
    e11 = zero
    e12 = zero
    e20 = zero
    e21 = zero
    e22 = zero
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        c, dx, dy, dz, sx, sy, sz = _part_tile(x_ptr, m_ptr, w_ptr, i, js, j_ok, ks, k_ok, p, K,
                                               odx, ody, odz, osx, osy, osz, D, HAS_W, DT)
        ex = dx - (a00[:, None] * sx + a01[:, None] * sy + a02[:, None] * sz) - tx[:, None]
        ey = dy - (a10[:, None] * sx + a11[:, None] * sy + a12[:, None] * sz) - ty[:, None]
        ez = dz - (a20[:, None] * sx + a21[:, None] * sy + a22[:, None] * sz) - tz[:, None]
        res += tl.sum(c * (tl.abs(ex) + tl.abs(ey) + tl.abs(ez)), 1)
        if FULL:
            hx = c * _sgn(ex)
            hy = c * _sgn(ey)
            hz = c * _sgn(ez)
            ecx += tl.sum(hx, 1)
            ecy += tl.sum(hy, 1)
            ecz += tl.sum(hz, 1)
            e00 += tl.sum(hx * sx, 1)
            e01 += tl.sum(hx * sy, 1)
            e02 += tl.sum(hx * sz, 1)
            e10 += tl.sum(hy * sx, 1)
            e11 += tl.sum(hy * sy, 1)
            e12 += tl.sum(hy * sz, 1)
            e20 += tl.sum(hz * sx, 1)
            e21 += tl.sum(hz * sy, 1)
            e22 += tl.sum(hz * sz, 1)
    fit = (i * B + js) * P + p
    tl.store(r_ptr + fit, tl.where(live, res * invW, 0.0).to(r_ptr.dtype.element_ty), mask=j_ok)
    rec = rec_ptr + fit * 30
    tl.store(rec + 0, tl.where(live, a00, 0.0), mask=j_ok)
    tl.store(rec + 1, tl.where(live, a01, 0.0), mask=j_ok)
    tl.store(rec + 2, tl.where(live, a02, 0.0), mask=j_ok)
    tl.store(rec + 3, tl.where(live, a10, 0.0), mask=j_ok)
    tl.store(rec + 4, tl.where(live, a11, 0.0), mask=j_ok)
    tl.store(rec + 5, tl.where(live, a12, 0.0), mask=j_ok)
    tl.store(rec + 6, tl.where(live, a20, 0.0), mask=j_ok)
    tl.store(rec + 7, tl.where(live, a21, 0.0), mask=j_ok)
    tl.store(rec + 8, tl.where(live, a22, 0.0), mask=j_ok)
    tl.store(rec + 9, tl.where(live, tx, 0.0), mask=j_ok)
    tl.store(rec + 10, tl.where(live, ty, 0.0), mask=j_ok)
    tl.store(rec + 11, tl.where(live, tz, 0.0), mask=j_ok)
    tl.store(rec + 12, invW, mask=j_ok)
    if FULL:
        # unit upstream gradient: e_k = d_k - A s_k - t, t = mu_d - A mu_s
        gtx = -ecx * invW
        gty = -ecy * invW
        gtz = -ecz * invW
        ga00 = -e00 * invW - gtx * msx
        ga01 = -e01 * invW - gtx * msy
        ga02 = -e02 * invW - gtx * msz
        ga10 = -e10 * invW - gty * msx
        ga11 = -e11 * invW - gty * msy
        ga12 = -e12 * invW - gty * msz
        ga20 = -e20 * invW - gtz * msx
        ga21 = -e21 * invW - gtz * msy
        ga22 = -e22 * invW - gtz * msz
        usx = -(a00 * gtx + a10 * gty + a20 * gtz)
        usy = -(a01 * gtx + a11 * gty + a21 * gtz)
        usz = -(a02 * gtx + a12 * gty + a22 * gtz)
        sbar = (ga00 * r00 + ga01 * r01 + ga02 * r02 + ga10 * r10 + ga11 * r11 + ga12 * r12
                + ga20 * r20 + ga21 * r21 + ga22 * r22)
        (wbar, sdbx, sdby, sdbz, ssbx, ssby, ssbz, k00, k01, k02, k10, k11, k12, k20, k21, k22, qsb) = _solve_backward(
            s * ga00, s * ga01, s * ga02, s * ga10, s * ga11, s * ga12, s * ga20, s * ga21, s * ga22,
            sbar, gtx, gty, gtz, usx, usy, usz,
            invW, mdx, mdy, mdz, msx, msy, msz, var_safe, r00, r01, r02, r10, r11, r12, r20, r21, r22, s,
            optimal, uncorr, m0x, m0y, m0z, m1x, m1y, m1z, m2x, m2y, m2z, f0, f1, f2,
            c00, c01, c02, c10, c11, c12, c20, c21, c22, qs, SCALE)
        tl.store(rec + 13, sdbx, mask=j_ok)
        tl.store(rec + 14, sdby, mask=j_ok)
        tl.store(rec + 15, sdbz, mask=j_ok)
        tl.store(rec + 16, ssbx, mask=j_ok)
        tl.store(rec + 17, ssby, mask=j_ok)
        tl.store(rec + 18, ssbz, mask=j_ok)
        tl.store(rec + 19, k00, mask=j_ok)
        tl.store(rec + 20, k01, mask=j_ok)
        tl.store(rec + 21, k02, mask=j_ok)
        tl.store(rec + 22, k10, mask=j_ok)
        tl.store(rec + 23, k11, mask=j_ok)
        tl.store(rec + 24, k12, mask=j_ok)
        tl.store(rec + 25, k20, mask=j_ok)
        tl.store(rec + 26, k21, mask=j_ok)
        tl.store(rec + 27, k22, mask=j_ok)
        tl.store(rec + 28, qsb, mask=j_ok)
        tl.store(rec + 29, wbar, mask=j_ok)
    else:
        for f in tl.static_range(13, 30):
            tl.store(rec + f, zero, mask=j_ok)


@triton.jit
def _part_tile(x_ptr, m_ptr, w_ptr, i, js, j_ok, ks, k_ok, p, K, odx, ody, odz, osx, osy, osz,
               D: tl.constexpr, HAS_W: tl.constexpr, DT: tl.constexpr):
    """Tile [BLOCK_J, BLOCK_K] of fit weights c and shifted dst (sample i) / src (samples js) points."""
    inpart = tl.load(m_ptr + p * K + ks, mask=k_ok, other=0).to(DT)
    # points outside the part are not loaded: a non-finite one must not reach this part's fit
    member = k_ok & (inpart != 0.0)
    smember = j_ok[:, None] & member[None, :]
    if HAS_W:
        wi = tl.load(w_ptr + i * K + ks, mask=member, other=0.0).to(DT)
        wj = tl.load(w_ptr + js[:, None] * K + ks[None, :], mask=smember, other=0.0).to(DT)
        c = wi[None, :] * wj
    else:
        c = tl.where(smember, 1.0, 0.0).to(DT)
    dbase = x_ptr + (i * K + ks) * D
    dx = tl.load(dbase, mask=member, other=0.0).to(DT) - odx
    dy = tl.load(dbase + 1, mask=member, other=0.0).to(DT) - ody
    sbase = x_ptr + (js[:, None] * K + ks[None, :]) * D
    sx = tl.load(sbase, mask=smember, other=0.0).to(DT) - osx[:, None]
    sy = tl.load(sbase + 1, mask=smember, other=0.0).to(DT) - osy[:, None]
    if D == 3:
        dz = tl.load(dbase + 2, mask=member, other=0.0).to(DT) - odz
        sz = tl.load(sbase + 2, mask=smember, other=0.0).to(DT) - osz[:, None]
    else:
        dz = dx * 0.0
        sz = sx * 0.0
    return c, dx[None, :], dy[None, :], dz[None, :], sx, sy, sz


@triton.jit
def _rec_field(rec_ptr, fit, f, ok, DT: tl.constexpr):
    return tl.load(rec_ptr + fit * 30 + f, mask=ok, other=0.0).to(DT)[:, None]


@triton.jit
def _fit_point_grad(rec_ptr, fit, ok, g, r, c, dx, dy, dz, sx, sy, sz, FULL: tl.constexpr, DT: tl.constexpr):
    """Gradient of fit `fit` (lanes) at its points: dst d, src s and weight c (tiles)."""
    a00 = _rec_field(rec_ptr, fit, 0, ok, DT)
    a01 = _rec_field(rec_ptr, fit, 1, ok, DT)
    a02 = _rec_field(rec_ptr, fit, 2, ok, DT)
    a10 = _rec_field(rec_ptr, fit, 3, ok, DT)
    a11 = _rec_field(rec_ptr, fit, 4, ok, DT)
    a12 = _rec_field(rec_ptr, fit, 5, ok, DT)
    a20 = _rec_field(rec_ptr, fit, 6, ok, DT)
    a21 = _rec_field(rec_ptr, fit, 7, ok, DT)
    a22 = _rec_field(rec_ptr, fit, 8, ok, DT)
    tx = _rec_field(rec_ptr, fit, 9, ok, DT)
    ty = _rec_field(rec_ptr, fit, 10, ok, DT)
    tz = _rec_field(rec_ptr, fit, 11, ok, DT)
    invW = _rec_field(rec_ptr, fit, 12, ok, DT)
    ex = dx - (a00 * sx + a01 * sy + a02 * sz) - tx
    ey = dy - (a10 * sx + a11 * sy + a12 * sz) - ty
    ez = dz - (a20 * sx + a21 * sy + a22 * sz) - tz
    gi = g * invW
    hx = gi * c * _sgn(ex)
    hy = gi * c * _sgn(ey)
    hz = gi * c * _sgn(ez)
    gdx = hx
    gdy = hy
    gdz = hz
    gsx = -(a00 * hx + a10 * hy + a20 * hz)
    gsy = -(a01 * hx + a11 * hy + a21 * hz)
    gsz = -(a02 * hx + a12 * hy + a22 * hz)
    gc = gi * (tl.abs(ex) + tl.abs(ey) + tl.abs(ez) - r)
    if FULL:
        pdx, pdy, pdz, psx, psy, psz, pc = _point_grad(
            c, dx, dy, dz, sx, sy, sz,
            g * _rec_field(rec_ptr, fit, 29, ok, DT),
            g * _rec_field(rec_ptr, fit, 13, ok, DT), g * _rec_field(rec_ptr, fit, 14, ok, DT),
            g * _rec_field(rec_ptr, fit, 15, ok, DT), g * _rec_field(rec_ptr, fit, 16, ok, DT),
            g * _rec_field(rec_ptr, fit, 17, ok, DT), g * _rec_field(rec_ptr, fit, 18, ok, DT),
            g * _rec_field(rec_ptr, fit, 19, ok, DT), g * _rec_field(rec_ptr, fit, 20, ok, DT),
            g * _rec_field(rec_ptr, fit, 21, ok, DT), g * _rec_field(rec_ptr, fit, 22, ok, DT),
            g * _rec_field(rec_ptr, fit, 23, ok, DT), g * _rec_field(rec_ptr, fit, 24, ok, DT),
            g * _rec_field(rec_ptr, fit, 25, ok, DT), g * _rec_field(rec_ptr, fit, 26, ok, DT),
            g * _rec_field(rec_ptr, fit, 27, ok, DT), g * _rec_field(rec_ptr, fit, 28, ok, DT))
        gdx += pdx
        gdy += pdy
        gdz += pdz
        gsx += psx
        gsy += psy
        gsz += psz
        gc += pc
    return gdx, gdy, gdz, gsx, gsy, gsz, gc


@triton.jit(do_not_specialize=["B", "K", "P"])
def _part_bwd_kernel(
    g_ptr, r_ptr, rec_ptr, x_ptr, m_ptr, w_ptr, o_ptr, gx_ptr, gw_ptr, B, K, P,
    D: tl.constexpr, HAS_W: tl.constexpr, FULL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, DT: tl.constexpr,
):
    nn = tl.program_id(0)
    p = tl.program_id(1)
    ks = tl.program_id(2) * BLOCK_K + tl.arange(0, BLOCK_K)
    k_ok = ks < K
    onx = tl.load(o_ptr + (nn * P + p) * 3).to(DT)
    ony = tl.load(o_ptr + (nn * P + p) * 3 + 1).to(DT)
    onz = tl.load(o_ptr + (nn * P + p) * 3 + 2).to(DT)
    accx = tl.zeros([BLOCK_K], DT)
    accy = tl.zeros([BLOCK_K], DT)
    accz = tl.zeros([BLOCK_K], DT)
    accw = tl.zeros([BLOCK_K], DT)
    for mb in range(0, B, BLOCK_M):
        ms = mb + tl.arange(0, BLOCK_M)
        m_ok = (ms < B) & (ms != nn)
        omx = tl.load(o_ptr + (ms * P + p) * 3, mask=m_ok, other=0.0).to(DT)
        omy = tl.load(o_ptr + (ms * P + p) * 3 + 1, mask=m_ok, other=0.0).to(DT)
        omz = tl.load(o_ptr + (ms * P + p) * 3 + 2, mask=m_ok, other=0.0).to(DT)
        # c, x_n (as "dst" rows, broadcast) and x_m (tile), shifted
        c, xnx, xny, xnz, xmx, xmy, xmz = _part_tile(x_ptr, m_ptr, w_ptr, nn, ms, m_ok, ks, k_ok, p, K,
                                                     onx, ony, onz, omx, omy, omz, D, HAS_W, DT)
        # d c / d w[n, k] = parts[p, k] * w[m, k]
        member = m_ok[:, None] & (k_ok & (tl.load(m_ptr + p * K + ks, mask=k_ok, other=0) != 0))[None, :]
        if HAS_W:
            wm = tl.load(w_ptr + ms[:, None] * K + ks[None, :], mask=member, other=0.0).to(DT)
        else:
            wm = tl.where(member, 1.0, 0.0).to(DT)
        # n is the target of fit (n, m, p)
        fit1 = (nn * B + ms) * P + p
        g1 = tl.load(g_ptr + fit1, mask=m_ok, other=0.0).to(DT)[:, None]
        r1 = tl.load(r_ptr + fit1, mask=m_ok, other=0.0).to(DT)[:, None]
        gdx, gdy, gdz, _, _, _, gc = _fit_point_grad(rec_ptr, fit1, m_ok, g1, r1, c, xnx, xny, xnz, xmx, xmy, xmz,
                                                     FULL, DT)
        accx += tl.sum(gdx, 0)
        accy += tl.sum(gdy, 0)
        accz += tl.sum(gdz, 0)
        accw += tl.sum(gc * wm, 0)
        # n is the source of fit (m, n, p)
        fit2 = (ms * B + nn) * P + p
        g2 = tl.load(g_ptr + fit2, mask=m_ok, other=0.0).to(DT)[:, None]
        r2 = tl.load(r_ptr + fit2, mask=m_ok, other=0.0).to(DT)[:, None]
        _, _, _, gsx, gsy, gsz, gc = _fit_point_grad(rec_ptr, fit2, m_ok, g2, r2, c, xmx, xmy, xmz, xnx, xny, xnz,
                                                     FULL, DT)
        accx += tl.sum(gsx, 0)
        accy += tl.sum(gsy, 0)
        accz += tl.sum(gsz, 0)
        accw += tl.sum(gc * wm, 0)
    out = gx_ptr + ((nn * P + p) * K + ks) * D
    ot = gx_ptr.dtype.element_ty
    tl.store(out, accx.to(ot), mask=k_ok)
    tl.store(out + 1, accy.to(ot), mask=k_ok)
    if D == 3:
        tl.store(out + 2, accz.to(ot), mask=k_ok)
    tl.store(gw_ptr + (nn * P + p) * K + ks, accw.to(ot), mask=k_ok)


# ----------------------------------------------------------------------------- launchers


def _tl_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def umeyama_forward(src, dst, w, scale, tol):
    """``src, dst [N, M, D]``, ``w [N, M]`` or None (contiguous, float32/float64); tol = (spread, corr, tie).
    Returns ``R [N, D, D]``, ``s [N]``, ``t [N, D]`` in the dtype of ``src``."""
    N, M, D = src.shape
    R = torch.empty(N, D, D, dtype=src.dtype, device=src.device)
    s = torch.empty(N, dtype=src.dtype, device=src.device)
    t = torch.empty(N, D, dtype=src.dtype, device=src.device)
    if N == 0:
        return R, s, t
    _umeyama_fwd_kernel[(triton.cdiv(N, UMEYAMA_BLOCK_N),)](
        src, dst, w if w is not None else src, R, s, t, N, M, *tol,
        D=D, HAS_W=w is not None, SCALE=scale, NSWEEPS=NSWEEP,
        BLOCK_N=UMEYAMA_BLOCK_N, BLOCK_M=UMEYAMA_BLOCK_M, DT=_tl_dtype(src.dtype),
    )
    return R, s, t


def umeyama_backward(gR, gs, gt, src, dst, w, scale, tol):
    """Gradients ``(src [N,M,D], dst [N,M,D], weights [N,M])`` in the dtype of ``src``."""
    N, M, D = src.shape
    g_src = torch.empty_like(src)
    g_dst = torch.empty_like(src)
    g_w = torch.empty(N, M, dtype=src.dtype, device=src.device)
    if N == 0 or M == 0:
        return g_src.zero_(), g_dst.zero_(), g_w.zero_()
    _umeyama_bwd_kernel[(triton.cdiv(N, UMEYAMA_BLOCK_N),)](
        gR, gs, gt, src, dst, w if w is not None else src, g_src, g_dst, g_w, N, M, *tol,
        D=D, HAS_W=w is not None, SCALE=scale, NSWEEPS=NSWEEP,
        BLOCK_N=UMEYAMA_BLOCK_N, BLOCK_M=UMEYAMA_BLOCK_M, DT=_tl_dtype(src.dtype),
    )
    return g_src, g_dst, g_w


def part_shifts(x, m, w):
    """Per (sample, part) weighted centroids ``[B, P, 3]`` (the coordinate shifts; 0 for an empty part)."""
    B, K, D = x.shape
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    mw = torch.where(m.bool()[None], w[:, None, :] if w is not None else 1.0, zero)  # [B, P, K]
    tot = mw.sum(-1, keepdim=True)
    inside = torch.where(m.bool()[None, :, :, None], x[:, None], zero)
    o = (mw.unsqueeze(-1) * inside).sum(2) / torch.where(tot > 0, tot, torch.ones_like(tot))
    if D == 2:
        o = torch.cat([o, torch.zeros_like(o[..., :1])], -1)
    return o.contiguous()


def part_alignment_forward(x, m, w, scale, full, tol):
    """``x [B,K,D]``, ``m [P,K]`` uint8, ``w [B,K]`` or None. Returns ``r [B,B,P]`` and the record ``[B,B,P,30]``."""
    B, K, D = x.shape
    P = m.shape[0]
    r = torch.empty(B, B, P, dtype=x.dtype, device=x.device)
    rec = torch.empty(B, B, P, NREC, dtype=x.dtype, device=x.device)
    if P == 0:
        return r, rec
    o = part_shifts(x, m, w)
    grid = (B, P, triton.cdiv(B, PART_BLOCK_J))
    _part_fwd_kernel[grid](
        x, m, w if w is not None else x, o, r, rec, B, K, P, *tol,
        D=D, HAS_W=w is not None, SCALE=scale, FULL=full, NSWEEPS=NSWEEP,
        BLOCK_J=PART_BLOCK_J, BLOCK_K=PART_BLOCK_K, DT=_tl_dtype(x.dtype),
    )
    return r, rec


def part_alignment_backward(g, r, rec, x, m, w, full):
    """Gradients ``(points [B,K,D], weights [B,K])`` from ``grad_r``, ``r`` and the forward's record."""
    B, K, D = x.shape
    P = m.shape[0]
    if P == 0:
        return torch.zeros_like(x), torch.zeros(B, K, dtype=x.dtype, device=x.device)
    o = part_shifts(x, m, w)
    gx = torch.empty(B, P, K, D, dtype=x.dtype, device=x.device)
    gw = torch.empty(B, P, K, dtype=x.dtype, device=x.device)
    grid = (B, P, triton.cdiv(K, PART_BWD_BLOCK_K))
    _part_bwd_kernel[grid](
        g, r, rec, x, m, w if w is not None else x, o, gx, gw, B, K, P,
        D=D, HAS_W=w is not None, FULL=full,
        BLOCK_M=PART_BWD_BLOCK_M, BLOCK_K=PART_BWD_BLOCK_K, DT=_tl_dtype(x.dtype),
    )
    return gx.sum(1), gw.sum(1)


def _compile_cases():
    """Every kernel in float32 for D = 2 and 3 and in float64 for D = 3 (with weights, scale, both
    gradient modes), plus the forward kernels without weights and scale (float32, D = 3): the
    flags are plain constexpr switches (CI time: each variant takes seconds to lower)."""
    tol = {"spread": "fp32", "corr": "fp32", "tie": "fp32"}
    u_sig = {"src_ptr": None, "dst_ptr": None, "w_ptr": None, "r_ptr": None, "s_ptr": None, "t_ptr": None}
    ub_sig = {k: None for k in ("gr_ptr", "gs_ptr", "gt_ptr", "src_ptr", "dst_ptr", "w_ptr", "gsrc_ptr", "gdst_ptr",
                                "gw_ptr")}
    u_const = ("D", "HAS_W", "SCALE", "NSWEEPS", "BLOCK_N", "BLOCK_M", "DT")
    pf_const = ("D", "HAS_W", "SCALE", "FULL", "NSWEEPS", "BLOCK_J", "BLOCK_K", "DT")
    pb_const = ("D", "HAS_W", "FULL", "BLOCK_M", "BLOCK_K", "DT")
    variants = [(tl.float32, "*fp32", 2, True, True), (tl.float32, "*fp32", 3, True, True),
                (tl.float64, "*fp64", 3, True, True), (tl.float32, "*fp32", 3, False, False)]
    cases = []
    for dt, ptr, D, has_w, scale in variants:
        lean = not has_w  # the switched-off flags: forward kernels only
        label = f"{ptr[1:]} D={D} w={int(has_w)} scale={int(scale)}"
        const = dict(D=D, HAS_W=has_w, SCALE=scale, NSWEEPS=NSWEEP, DT=dt)
        sig = {**{k: ptr for k in u_sig}, "N": "i32", "M": "i32", **tol, **{k: "constexpr" for k in u_const}}
        ub = dict(const, BLOCK_N=UMEYAMA_BLOCK_N, BLOCK_M=UMEYAMA_BLOCK_M)
        cases.append((f"umeyama fwd {label}", _umeyama_fwd_kernel, sig, ub))
        sig = {**{k: ptr for k in ub_sig}, "N": "i32", "M": "i32", **tol, **{k: "constexpr" for k in u_const}}
        if not lean:
            cases.append((f"umeyama bwd {label}", _umeyama_bwd_kernel, sig, ub))
        for full in (False,) if lean else (False, True):
            sig = {"x_ptr": ptr, "m_ptr": "*u8", "w_ptr": ptr, "o_ptr": ptr, "r_ptr": ptr, "rec_ptr": ptr,
                   "B": "i32", "K": "i32", "P": "i32", **tol, **{k: "constexpr" for k in pf_const}}
            cases.append((f"part_alignment fwd {label} full={int(full)}", _part_fwd_kernel, sig,
                          dict(const, FULL=full, BLOCK_J=PART_BLOCK_J, BLOCK_K=PART_BLOCK_K)))
            if lean:
                continue
            sig = {"g_ptr": ptr, "r_ptr": ptr, "rec_ptr": ptr, "x_ptr": ptr, "m_ptr": "*u8", "w_ptr": ptr,
                   "o_ptr": ptr, "gx_ptr": ptr, "gw_ptr": ptr, "B": "i32", "K": "i32", "P": "i32",
                   **{k: "constexpr" for k in pb_const}}
            cases.append((f"part_alignment bwd {ptr[1:]} D={D} w={int(has_w)} full={int(full)}", _part_bwd_kernel,
                          sig, dict(D=D, HAS_W=has_w, FULL=full, BLOCK_M=PART_BWD_BLOCK_M,
                                    BLOCK_K=PART_BWD_BLOCK_K, DT=dt)))
    return cases


GPU_COMPILE_CASES = _compile_cases()
