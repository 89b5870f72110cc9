"""Triton kernels of ``kpfast.edge_map``: forward and backward.

One program per (sample, pixel tile), on one flat grid axis. The forward walks
the edges in index order keeping a running per-pixel maximum and winner; an
edge whose upper bound over the tile (weight x largest certainty x Gaussian of
the tile-to-segment distance, padded for rounding) cannot beat the tile's
smallest running maximum is skipped, which changes no output and no gradient
(an edge with a NaN or inf input is never skipped: compiled min/max drop NaN).
The backward visits the edges that win a pixel of the tile (and those with a
non-finite input), recomputes their values per pixel and writes
per-(tile, edge) partial sums of the eight gradients (a_x, a_y, b_x, b_y, v_i,
v_j, w, sigma2) to a buffer that the launcher reduces, as the layer-norm
tutorial does, instead of contended atomics. Memory kept between the two: the
``[B, H, W]`` int32 winner. Offsets across samples are int64.
Semantics: ``kpfast/reference.py::edge_map_reference``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kpfast.ops.backend import extension
from kpfast.reference import compute_dtype

from ._common import f64_bits, pixel_steps, scalar_arg, tl_dtype

NGRAD = tl.constexpr(extension().EDGE_MAP_NGRAD)  # per-edge gradient slots, in csrc/edge_map.cpp's order
FWD_BLOCK = (16, 16)
FWD_REFRESH = 4  # evaluated edges between two block-wide refreshes of the forward's culling bound
BWD_BLOCK = (32, 32)
BWD_BLOCK_F64 = (16, 32)  # float64 at 32 x 32 (8 pixels a thread) spilled registers on sm_90


@triton.jit
def _sigmoid(z):
    return 1.0 / (1.0 + tl.exp(-z))


@triton.jit
def _load_edge(kp_ptr, edges_ptr, unc_ptr, w_ptr, b, e, K, w_bstride, eps, HAS_U: tl.constexpr, HAS_W: tl.constexpr, DT: tl.constexpr):
    i = tl.load(edges_ptr + 2 * e)
    j = tl.load(edges_ptr + 2 * e + 1)
    base = kp_ptr + b * K * 2
    ax = tl.load(base + 2 * i).to(DT)
    ay = tl.load(base + 2 * i + 1).to(DT)
    bx = tl.load(base + 2 * j).to(DT)
    by = tl.load(base + 2 * j + 1).to(DT)
    if HAS_U:
        vi = tl.load(unc_ptr + b * K + i).to(DT)
        vj = tl.load(unc_ptr + b * K + j).to(DT)
    else:
        vi = ax * 0.0
        vj = ax * 0.0
    if HAS_W:
        w = tl.load(w_ptr + b * w_bstride + e).to(DT)
    else:
        w = ax * 0.0 + 1.0
    abx = bx - ax
    aby = by - ay
    len2 = abx * abx + aby * aby
    point = len2 < eps
    # NaN or inf among the edge's inputs (x * 0 is 0 only for finite x): never culled, since the
    # compiled tl.maximum/tl.minimum drop a NaN operand and would make its upper bound finite.
    finite = (ax * 0.0 + ay * 0.0 + bx * 0.0 + by * 0.0 + vi * 0.0 + vj * 0.0 + w * 0.0) == 0.0
    return ax, ay, bx, by, abx, aby, len2, point, vi, vj, w, finite


@triton.jit
def _evaluate(px, py, ax, ay, bx, by, abx, aby, len2, point, vi, vj, w, s2, HAS_U: tl.constexpr, PRECISION: tl.constexpr):
    apx = px - ax
    apy = py - ay
    safe_len2 = tl.where(point, 1.0, len2)
    t_raw = tl.where(point, 0.0, (apx * abx + apy * aby) / safe_len2)
    lo = t_raw <= 0.0
    hi = t_raw >= 1.0
    t = tl.where(lo, 0.0, tl.where(hi, 1.0, t_raw))
    qx = tl.where(lo, apx, tl.where(hi, px - bx, apx - t * abx))
    qy = tl.where(lo, apy, tl.where(hi, py - by, apy - t * aby))
    d2 = qx * qx + qy * qy
    if HAS_U:
        u = _sigmoid((1.0 - t) * vi + t * vj)
    else:
        u = d2 * 0.0 + 1.0
    if PRECISION:
        ex = tl.exp(-(u * d2) / s2)
        s = ex * w
    else:
        ex = tl.exp(-d2 / s2)
        s = (u * ex) * w
    return apx, apy, t_raw, t, qx, qy, d2, u, ex, s


@triton.jit
def _point_segment_dist2(px, py, ax, ay, abx, aby, len2, point):
    t = tl.where(point, 0.0, ((px - ax) * abx + (py - ay) * aby) / tl.where(point, 1.0, len2))
    t = tl.minimum(tl.maximum(t, 0.0), 1.0)
    dx = px - ax - t * abx
    dy = py - ay - t * aby
    return dx * dx + dy * dy


@triton.jit
def _point_box_dist2(px, py, x0, y0, x1, y1):
    dx = tl.maximum(tl.maximum(x0 - px, px - x1), 0.0)
    dy = tl.maximum(tl.maximum(y0 - py, py - y1), 0.0)
    return dx * dx + dy * dy


@triton.jit
def _segment_box_dist2(ax, ay, bx, by, abx, aby, len2, point, x0, y0, x1, y1):
    best = tl.minimum(_point_box_dist2(ax, ay, x0, y0, x1, y1), _point_box_dist2(bx, by, x0, y0, x1, y1))
    best = tl.minimum(best, _point_segment_dist2(x0, y0, ax, ay, abx, aby, len2, point))
    best = tl.minimum(best, _point_segment_dist2(x1, y0, ax, ay, abx, aby, len2, point))
    best = tl.minimum(best, _point_segment_dist2(x0, y1, ax, ay, abx, aby, len2, point))
    best = tl.minimum(best, _point_segment_dist2(x1, y1, ax, ay, abx, aby, len2, point))
    c00 = abx * (y0 - ay) - aby * (x0 - ax)
    c10 = abx * (y0 - ay) - aby * (x1 - ax)
    c01 = abx * (y1 - ay) - aby * (x0 - ax)
    c11 = abx * (y1 - ay) - aby * (x1 - ax)
    cmin = tl.minimum(tl.minimum(c00, c10), tl.minimum(c01, c11))
    cmax = tl.maximum(tl.maximum(c00, c10), tl.maximum(c01, c11))
    overlap = (tl.maximum(ax, bx) >= x0) & (tl.minimum(ax, bx) <= x1) & (tl.maximum(ay, by) >= y0) & (tl.minimum(ay, by) <= y1)
    crosses = overlap & (cmin <= 0.0) & (cmax >= 0.0)
    return tl.where(crosses, 0.0, best)


@triton.jit
def _sample_and_tile(pid, n_tiles):
    """Program -> (sample as int64, pixel tile): one flat grid axis, so B is not capped at 65535."""
    return (pid // n_tiles).to(tl.int64), pid % n_tiles


@triton.jit
def _plane_offset(b, H, W):
    """Element offset of sample ``b``'s ``[H, W]`` plane, in int64 (``B*H*W`` may pass 2^31; offsets
    inside a plane are int32, the caller checks ``H*W < 2^31``)."""
    return b.to(tl.int64) * H * W


@triton.jit
def _partial_offset(b, tile, n_tiles, E):
    """Element offset of the ``(b, tile)`` block of the ``[B, tiles, E, NGRAD]`` partial sums, in int64."""
    return (b.to(tl.int64) * n_tiles + tile) * E * NGRAD


@triton.jit
def _tile_pixels(tile, H, W, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, DT: tl.constexpr):
    """The pixels of a tile: first row and column, rows, columns, in-image mask, pixel steps and
    the centres ``px [1, BLOCK_W]``, ``py [BLOCK_H, 1]``."""
    tiles_w = tl.cdiv(W, BLOCK_W)
    r0 = (tile // tiles_w) * BLOCK_H
    c0 = (tile % tiles_w) * BLOCK_W
    rows = r0 + tl.arange(0, BLOCK_H)
    cols = c0 + tl.arange(0, BLOCK_W)
    valid = (rows[:, None] < H) & (cols[None, :] < W)
    step_x, step_y = pixel_steps(H, W, DT)
    py = (rows.to(DT) * step_y - 1.0)[:, None]
    px = (cols.to(DT) * step_x - 1.0)[None, :]
    return r0, c0, rows, cols, valid, step_x, step_y, px, py


@triton.jit
def _tile_sum(sel, g, v):
    """The sum over the tile of ``g * v`` where ``sel``."""
    return tl.sum(tl.sum(tl.where(sel, g * v, 0.0), 1), 0)


@triton.jit(do_not_specialize=["K", "E", "H", "W", "n_tiles", "w_bstride", "s2_bits"])
def _edge_map_fwd_kernel(
    kp_ptr, edges_ptr, unc_ptr, w_ptr, s2_ptr, out_ptr, win_ptr,
    K, E, H, W, n_tiles, w_bstride, s2_bits: tl.int64, eps, tol_scale,
    HAS_U: tl.constexpr, HAS_W: tl.constexpr, PRECISION: tl.constexpr, HAS_S2_PTR: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, DT: tl.constexpr, REFRESH: tl.constexpr,
):
    b, tile = _sample_and_tile(tl.program_id(0), n_tiles)
    r0, c0, rows, cols, valid, step_x, step_y, px, py = _tile_pixels(tile, H, W, BLOCK_H, BLOCK_W, DT)
    y0 = r0.to(DT) * step_y - 1.0
    y1 = tl.minimum(r0 + BLOCK_H - 1, H - 1).to(DT) * step_y - 1.0
    x0 = c0.to(DT) * step_x - 1.0
    x1 = tl.minimum(c0 + BLOCK_W - 1, W - 1).to(DT) * step_x - 1.0
    s2 = scalar_arg(s2_ptr, s2_bits, HAS_S2_PTR, DT)

    best = tl.full([BLOCK_H, BLOCK_W], float("-inf"), DT)
    arg = tl.full([BLOCK_H, BLOCK_W], -1, tl.int32)
    # A lower bound of the tile's smallest running maximum (best only grows, so a stale value is
    # still one): refreshed by a block-wide min after the first and every REFRESH-th evaluated edge.
    tile_min = tl.min(tl.min(best, 1), 0)
    evaluated = 0
    for e in range(0, E):
        ax, ay, bx, by, abx, aby, len2, point, vi, vj, w, finite = _load_edge(
            kp_ptr, edges_ptr, unc_ptr, w_ptr, b, e, K, w_bstride, eps, HAS_U, HAS_W, DT)
        tol = tol_scale * (2.0 + ax * ax + ay * ay + bx * bx + by * by)
        dmin2 = tl.maximum(_segment_box_dist2(ax, ay, bx, by, abx, aby, len2, point, x0, y0, x1, y1) - tol, 0.0)
        if HAS_U:
            si = _sigmoid(vi)
            sj = _sigmoid(vj)
            if PRECISION:
                ub = tl.exp(-(tl.minimum(si, sj) * dmin2) / s2)
            else:
                ub = tl.maximum(si, sj) * tl.exp(-dmin2 / s2)
        else:
            ub = tl.exp(-dmin2 / s2)
        ub = ub * w * 1.0001
        culled = finite & (w >= 0.0) & (ub <= tile_min)
        if culled == 0:
            _, _, _, _, _, _, _, _, _, s = _evaluate(
                px, py, ax, ay, bx, by, abx, aby, len2, point, vi, vj, w, s2, HAS_U, PRECISION)
            win = (s > best) | (arg < 0) | ((s != s) & (best == best))  # as torch.max: edge 0 first, NaN sticks
            best = tl.where(win, s, best)
            arg = tl.where(win, e, arg)
            if evaluated % REFRESH == 0:
                tile_min = tl.min(tl.min(tl.where(valid, best, float("inf")), 1), 0)
            evaluated += 1

    plane = _plane_offset(b, H, W)
    offs = rows[:, None] * W + cols[None, :]
    out = tl.where(arg >= 0, best, 0.0)
    tl.store(out_ptr + plane + offs, out.to(out_ptr.dtype.element_ty), mask=valid)
    tl.store(win_ptr + plane + offs, arg, mask=valid)


@triton.jit(do_not_specialize=["K", "E", "H", "W", "n_tiles", "w_bstride", "s2_bits"])
def _edge_map_bwd_kernel(
    grad_ptr, win_ptr, kp_ptr, edges_ptr, unc_ptr, w_ptr, s2_ptr, part_ptr, bad_ptr,
    K, E, H, W, n_tiles, w_bstride, s2_bits: tl.int64, eps,
    HAS_U: tl.constexpr, HAS_W: tl.constexpr, PRECISION: tl.constexpr, HAS_S2_PTR: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, DT: tl.constexpr,
):
    b, tile = _sample_and_tile(tl.program_id(0), n_tiles)
    _r0, _c0, rows, cols, valid, _step_x, _step_y, px, py = _tile_pixels(tile, H, W, BLOCK_H, BLOCK_W, DT)
    s2 = scalar_arg(s2_ptr, s2_bits, HAS_S2_PTR, DT)
    plane = _plane_offset(b, H, W)
    offs = rows[:, None] * W + cols[None, :]
    go = tl.load(grad_ptr + plane + offs, mask=valid, other=0.0).to(DT)
    winner = tl.load(win_ptr + plane + offs, mask=valid, other=-1)
    part = part_ptr + _partial_offset(b, tile, n_tiles, E)

    # Visit, in increasing order, the edges that win a pixel of the tile (one block-wide min finds
    # the next) and the edges with a non-finite input (next_bad[b, e]: the first one >= e, E if none),
    # which also pass 0 * (their derivatives) from every pixel they do not win, as autograd through
    # the reference does: NaN reaches exactly their inputs.
    bad = bad_ptr + b * (E + 1)
    e = tl.minimum(tl.min(tl.min(tl.where(winner >= 0, winner, E), 1), 0), tl.load(bad))
    while e < E:
        mine = winner == e
        ax, ay, bx, by, abx, aby, len2, point, vi, vj, w, finite = _load_edge(
            kp_ptr, edges_ptr, unc_ptr, w_ptr, b, e, K, w_bstride, eps, HAS_U, HAS_W, DT)
        sel = mine | (valid & (finite == 0))
        apx, apy, t_raw, t, qx, qy, d2, u, ex, s = _evaluate(
            px, py, ax, ay, bx, by, abx, aby, len2, point, vi, vj, w, s2, HAS_U, PRECISION)
        if PRECISION:  # S = w exp(-u d2 / s2)
            dw = ex
            dd2 = -s * u / s2
            du = -s * d2 / s2
            ds2 = s * u * d2 / (s2 * s2)
        else:  # S = w u exp(-d2 / s2)
            dw = u * ex
            dd2 = -s / s2
            du = ex * w
            ds2 = s * d2 / (s2 * s2)
        # d2 is minimal in t, so its gradient ignores t: dd2/da = -2 q (1 - t), dd2/db = -2 q t.
        # Beyond an end (t clamped to 0 or 1) the other end gets nothing, not 0 * dd2 (NaN stays put).
        past_b = t_raw >= 1.0
        past_a = t_raw <= 0.0
        gax = tl.where(past_b, 0.0, dd2 * -2.0 * qx * (1.0 - t))
        gay = tl.where(past_b, 0.0, dd2 * -2.0 * qy * (1.0 - t))
        gbx = tl.where(past_a, 0.0, dd2 * -2.0 * qx * t)
        gby = tl.where(past_a, 0.0, dd2 * -2.0 * qy * t)
        if HAS_U:
            dz = du * u * (1.0 - u)
            gvi = dz * (1.0 - t)
            gvj = dz * t
            through_t = (t_raw >= 0.0) & (t_raw <= 1.0) & (point == 0)
            c = tl.where(through_t, dz * (vj - vi) / tl.where(point, 1.0, len2), 0.0)
            gax += c * (2.0 * t * abx - abx - apx)
            gay += c * (2.0 * t * aby - aby - apy)
            gbx += c * (apx - 2.0 * t * abx)
            gby += c * (apy - 2.0 * t * aby)
        else:
            gvi = d2 * 0.0
            gvj = d2 * 0.0
        g = tl.where(mine, go, 0.0)
        grads = (gax, gay, gbx, gby, gvi, gvj, dw, ds2)
        for k in tl.static_range(NGRAD):
            tl.store(part + e * NGRAD + k, _tile_sum(sel, g, grads[k]))
        e = tl.minimum(tl.min(tl.min(tl.where(winner > e, winner, E), 1), 0), tl.load(bad + e + 1))


def _tiles(H: int, W: int, block) -> int:
    return triton.cdiv(H, block[0]) * triton.cdiv(W, block[1])


def _inputs(kp, edges, unc, w, s2):
    """Contiguous inputs, int32 edges and a one-element ``s2`` (or None)."""
    contiguous = (None if t is None else t.contiguous() for t in (kp, unc, w))
    kp, unc, w = contiguous
    return kp, edges.to(torch.int32).contiguous(), unc, w, None if s2 is None else s2.reshape(1)


def edge_map_forward(kp, edges, unc, w, s2, s2_value, H, W, precision, eps):
    """Launch the forward kernel.

    Args: ``kp [B,K,2]``, ``edges [E,2]`` integers, ``unc [B,K]`` or None, ``w [E]``/``[B,E]``
    or None (any float dtypes: converted on load), ``s2`` a 0-dim tensor, or None for the
    Python float ``s2_value`` (passed to the kernel as a value: nothing is copied to the device).
    Returns ``(out [B,H,W] in kp.dtype, winner [B,H,W] int32)``.
    """
    kp, edges, unc, w, s2 = _inputs(kp, edges, unc, w, s2)
    B, K, _ = kp.shape
    E = edges.shape[0]
    out = torch.empty(B, H, W, dtype=kp.dtype, device=kp.device)
    winner = torch.empty(B, H, W, dtype=torch.int32, device=kp.device)
    dt = tl_dtype(kp.dtype)
    tol_scale = 1e-12 if kp.dtype == torch.float64 else 1e-5
    n_tiles = _tiles(H, W, FWD_BLOCK)
    _edge_map_fwd_kernel[(B * n_tiles,)](
        kp, edges, unc if unc is not None else kp, w if w is not None else kp, s2 if s2 is not None else kp, out, winner,
        K, E, H, W, n_tiles, (E if w is not None and w.dim() == 2 else 0), f64_bits(s2_value), eps, tol_scale,
        HAS_U=unc is not None, HAS_W=w is not None, PRECISION=precision, HAS_S2_PTR=s2 is not None,
        BLOCK_H=FWD_BLOCK[0], BLOCK_W=FWD_BLOCK[1], DT=dt, REFRESH=FWD_REFRESH,
    )
    return out, winner


def _next_nonfinite(kp, edges, unc, w):
    """``[B, E + 1]`` int32: for each sample and edge ``e`` the first edge ``>= e`` with a NaN or inf
    among its inputs (its keypoints, their logits, its weight), ``E`` if none."""
    B, E = kp.shape[0], edges.shape[0]
    ends = edges.long()
    finite = torch.isfinite(kp[:, ends]).flatten(2).all(-1)
    if unc is not None:
        finite &= torch.isfinite(unc[:, ends]).all(-1)
    if w is not None:
        finite &= torch.isfinite(w).expand(B, E)
    index = torch.where(finite, E, torch.arange(E, device=kp.device))
    next_bad = index.flip(1).cummin(1).values.flip(1)
    return torch.cat([next_bad, next_bad.new_full((B, 1), E)], 1).to(torch.int32)


def edge_map_backward(grad_out, winner, kp, edges, unc, w, s2, s2_value, precision, eps):
    """Launch the backward kernel; returns per-edge gradients ``[B, E, NGRAD]`` in the compute dtype."""
    kp, edges, unc, w, s2 = _inputs(kp, edges, unc, w, s2)
    grad_out, winner = grad_out.contiguous(), winner.contiguous()
    B, K, _ = kp.shape
    E = edges.shape[0]
    H, W = grad_out.shape[1:]
    acc = compute_dtype(kp.dtype)
    block = BWD_BLOCK_F64 if kp.dtype == torch.float64 else BWD_BLOCK
    n_tiles = _tiles(H, W, block)
    partial = torch.zeros(B, n_tiles, E, NGRAD.value, dtype=acc, device=kp.device)
    _edge_map_bwd_kernel[(B * n_tiles,)](
        grad_out, winner, kp, edges, unc if unc is not None else kp, w if w is not None else kp,
        s2 if s2 is not None else kp, partial, _next_nonfinite(kp, edges, unc, w),
        K, E, H, W, n_tiles, (E if w is not None and w.dim() == 2 else 0), f64_bits(s2_value), eps,
        HAS_U=unc is not None, HAS_W=w is not None, PRECISION=precision, HAS_S2_PTR=s2 is not None,
        BLOCK_H=block[0], BLOCK_W=block[1], DT=tl_dtype(kp.dtype),
    )
    return partial.sum(1)


def _compile_cases():
    """Every flag combination in float32; float64 and bfloat16 (other load/compute types) with all inputs."""
    combos = [(tl.float32, "*fp32", u, w, p) for u in (False, True) for w in (False, True) for p in (False, True)]
    combos += [(dt, ptr, True, True, p) for dt, ptr in ((tl.float64, "*fp64"), (tl.float32, "*bf16")) for p in (False, True)]
    flags = {k: "constexpr" for k in ("HAS_U", "HAS_W", "PRECISION", "HAS_S2_PTR", "BLOCK_H", "BLOCK_W", "DT")}
    cases = []
    for dt, ptr, has_u, has_w, precision in combos:
        common = dict(HAS_U=has_u, HAS_W=has_w, PRECISION=precision, HAS_S2_PTR=precision, DT=dt)
        acc = "*fp64" if dt == tl.float64 else "*fp32"
        label = f"{ptr[1:]} u={int(has_u)} w={int(has_w)} precision={int(precision)} s2={'tensor' if precision else 'float'}"
        fwd_sig = {
            "kp_ptr": ptr, "edges_ptr": "*i32", "unc_ptr": ptr, "w_ptr": ptr, "s2_ptr": acc,
            "out_ptr": ptr, "win_ptr": "*i32", "K": "i32", "E": "i32", "H": "i32", "W": "i32",
            "n_tiles": "i32", "w_bstride": "i32", "s2_bits": "i64", "eps": "fp32", "tol_scale": "fp32", **flags,
        }
        cases.append((f"edge_map fwd {label}", _edge_map_fwd_kernel, {**fwd_sig, "REFRESH": "constexpr"},
                      dict(common, BLOCK_H=FWD_BLOCK[0], BLOCK_W=FWD_BLOCK[1], REFRESH=FWD_REFRESH)))
        bwd_sig = {
            "grad_ptr": ptr, "win_ptr": "*i32", "kp_ptr": ptr, "edges_ptr": "*i32", "unc_ptr": ptr,
            "w_ptr": ptr, "s2_ptr": acc, "part_ptr": acc, "bad_ptr": "*i32", "K": "i32", "E": "i32", "H": "i32",
            "W": "i32", "n_tiles": "i32", "w_bstride": "i32", "s2_bits": "i64", "eps": "fp32", **flags,
        }
        block = BWD_BLOCK_F64 if dt == tl.float64 else BWD_BLOCK
        cases.append((f"edge_map bwd {label}", _edge_map_bwd_kernel, bwd_sig, dict(common, BLOCK_H=block[0], BLOCK_W=block[1])))
    return cases


GPU_COMPILE_CASES = _compile_cases()
