"""Batched analytic ray casting of procedural scenes in torch (CPU or GPU).

Every pixel of every image in a batch is intersected with every primitive slot
(ellipsoids: a quadratic in the ray parameter; boxes: slabs); the nearest hit is
the z-buffer. Shading (Lambert + ambient + Blinn-Phong, procedural textures) is
computed once per pixel for the winning primitive only.

Bit-reproducibility: scenes are packed per sample in float64 numpy and cast to
float32, and the torch side uses only elementwise ``+ - * / sqrt floor min max``,
comparisons and gathers (no reductions over more than one operand order, no
fused multiply-adds, no transcendental functions on per-pixel data), so a
sample's pixels do not depend on the batch it was rendered in or on the number
of threads.
"""

from __future__ import annotations

import numpy as np
import torch

from .scene import ELLIPSOID, N_WAVES, Primitive

# packed per-primitive parameter layout (columns of a [N, D] float32 tensor)
_ACTIVE = 0
_R = slice(1, 10)  # row-major 3x3
_C = slice(10, 13)
_SIZE = slice(13, 16)
_QUAD = slice(16, 22)  # axx, ayy, axy, ax, ay, a1   (a = d^T A d as a function of pixel x, y)
_LIN = slice(22, 25)  # gx, gy, g1                  (b = d^T A c)
_CC = 25  # c^T A c - 1
_SLAB = slice(26, 35)  # for local axis i: coefficients (cx, cy, c1) of d'_i = R_i . d
_ORIG = slice(35, 38)  # o'_i = -(R^T c)_i
_COL1 = slice(38, 41)
_COL2 = slice(41, 44)
_WDIR = slice(44, 44 + 3 * N_WAVES)
_WFREQ = slice(_WDIR.stop, _WDIR.stop + N_WAVES)
_WPHASE = slice(_WFREQ.stop, _WFREQ.stop + N_WAVES)
_WWEIGHT = slice(_WPHASE.stop, _WPHASE.stop + N_WAVES)
_SPEC = _WWEIGHT.stop
_D = _SPEC + 1

# packed per-sample globals
_G_F = 0
_G_LIGHT = slice(1, 4)
_G_AMB = 4
_G_DIFF = 5
_G_TINT = slice(6, 9)
_G_NOISE = 9
_G_GRATING = slice(10, 15)  # dir x, dir y, freq, amp, unused
_G_HALF = slice(15, 18)  # Blinn-Phong half vector for a viewer along -Z
_G_D = 18

_SHAPE_D = 12  # active, kind, cx, cy, 1/rx, 1/ry, cos, sin, r, g, b, unused


def pack_primitive(p: Primitive, f: float) -> np.ndarray:
    """One primitive's row of the packed layout (float64)."""
    row = np.zeros(_D, dtype=np.float64)
    row[_ACTIVE] = float(p.active)
    R, c, s = p.R, p.center, p.size
    row[_R] = R.reshape(-1)
    row[_C] = c
    row[_SIZE] = s
    if p.kind == ELLIPSOID:
        A = R @ np.diag(1.0 / s**2) @ R.T
        # ray direction d = (x / f, y / f, 1)
        row[_QUAD] = [A[0, 0] / f**2, A[1, 1] / f**2, 2 * A[0, 1] / f**2, 2 * A[0, 2] / f, 2 * A[1, 2] / f, A[2, 2]]
        g = A @ c
        row[_LIN] = [g[0] / f, g[1] / f, g[2]]
        row[_CC] = c @ A @ c - 1.0
    else:
        row[_SLAB] = np.stack([R[0, :] / f, R[1, :] / f, R[2, :]], axis=1).reshape(-1)
        row[_ORIG] = -(R.T @ c)
    m = p.material
    row[_COL1] = m.color1
    row[_COL2] = m.color1 if m.color2 is None else m.color2
    row[_WDIR] = m.wave_dirs.reshape(-1)
    row[_WFREQ] = m.wave_freq
    row[_WPHASE] = m.wave_phase
    row[_WWEIGHT] = m.wave_weight if m.color2 is not None else 0.0
    row[_SPEC] = m.specular
    return row


def _sphere_bounds(c: np.ndarray, rb: float, f: float):
    """Normalized image bounds ``(x0, x1, y0, y1)`` of a sphere's projection, or None
    if the sphere reaches the camera plane (then it may cover anything)."""
    cx, cy, cz = c
    den = cz * cz - rb * rb
    if cz <= rb or den <= 1e-9:
        return None
    out = []
    for q in (cx, cy):
        root = np.sqrt(max(q * q + cz * cz - rb * rb, 0.0))
        out += [f * (q * cz - rb * root) / den, f * (q * cz + rb * root) / den]
    return out


def primitive_bounds(p: Primitive, f: float) -> np.ndarray:
    """``[x0, x1, y0, y1, active]`` normalized image bounds of a primitive (conservative)."""
    if not p.active:
        return np.array([0.0, 0.0, 0.0, 0.0, 0.0])
    rb = float(np.max(p.size)) if p.kind == ELLIPSOID else float(np.linalg.norm(p.size))
    b = _sphere_bounds(p.center, rb, f)
    if b is None:
        return np.array([-np.inf, np.inf, -np.inf, np.inf, 1.0])
    return np.array([*b, 1.0])


def pack_scenes(scenes: list) -> dict:
    """Stack per-sample scenes into float32 tensors: ``prims [S, N, D]``, ``kinds``
    (list of slot kinds), ``globals [N, G]``, ``grid [N, 3, g*g]``, ``shapes
    [N, n, 12]``, ``keypoints [N, K, 3]``, ``tol [N, K]``, ``object_slots``."""
    first = scenes[0]
    kinds = [p.kind for p in first.primitives]
    for sc in scenes:
        if [p.kind for p in sc.primitives] != kinds:
            raise ValueError("all scenes of a batch must have the same primitive slots")
    prims = np.stack([np.stack([pack_primitive(p, sc.focal) for p in sc.primitives]) for sc in scenes], axis=1)
    bounds = np.stack([np.stack([primitive_bounds(p, sc.focal) for p in sc.primitives]) for sc in scenes], axis=1)
    glob = np.zeros((len(scenes), _G_D))
    grids, shapes = [], []
    for i, sc in enumerate(scenes):
        L, B = sc.light, sc.background
        glob[i, _G_F] = sc.focal
        glob[i, _G_LIGHT] = L.direction
        glob[i, _G_AMB] = L.ambient
        glob[i, _G_DIFF] = L.diffuse
        glob[i, _G_TINT] = L.tint
        glob[i, _G_NOISE] = B.noise_sigma
        glob[i, _G_GRATING] = [B.grating_dir[0], B.grating_dir[1], B.grating_freq, B.grating_amp, 0.0]
        half = L.direction + np.array([0.0, 0.0, -1.0])
        glob[i, _G_HALF] = half / np.linalg.norm(half)
        grids.append(B.grid.reshape(3, -1))
        sh = np.zeros((len(B.shapes), _SHAPE_D))
        for j, (act, kind, cx, cy, rx, ry, ang, r, g, b) in enumerate(B.shapes):
            sh[j] = [act, kind, cx, cy, 1.0 / rx, 1.0 / ry, np.cos(ang), np.sin(ang), r, g, b, 0.0]
        shapes.append(sh)
    return {
        "prims": torch.from_numpy(prims.astype(np.float32)),
        "bounds": bounds,
        "kinds": kinds,
        "globals": torch.from_numpy(glob.astype(np.float32)),
        "grid": torch.from_numpy(np.stack(grids).astype(np.float32)),
        "grid_size": int(round(np.sqrt(first.background.grid[0].size))),
        "shapes": torch.from_numpy(np.stack(shapes).astype(np.float32)),
        "noise_seed": torch.tensor([sc.background.noise_seed for sc in scenes], dtype=torch.int64),
        "keypoints": torch.from_numpy(np.stack([sc.keypoints for sc in scenes]).astype(np.float32)),
        "tol": torch.from_numpy(np.stack([sc.keypoint_tol for sc in scenes]).astype(np.float32)),
        "object_depth": torch.from_numpy(np.array([sc.object_depth for sc in scenes], dtype=np.float32)),
        "object_slots": first.object_slots,
    }


def _col(t: torch.Tensor, i) -> torch.Tensor:
    """Column(s) of a packed [N, D] tensor, shaped [N, 1] for broadcasting."""
    return t[:, i].unsqueeze(1)


def intersect(kind: int, prm: torch.Tensor, x, y, xx, yy, xy) -> torch.Tensor:
    """Ray parameter (= camera depth Z) of the nearest hit of one primitive slot.

    Args:
        kind: ``ELLIPSOID`` or ``BOX``.
        prm: ``[N, D]`` packed parameters of this slot.
        x, y: normalized image coordinates of the rays, broadcastable to ``[N, M]``;
            ``xx = x*x``, ``yy = y*y``, ``xy = x*y`` precomputed.

    Returns:
        ``[N, M]`` depth, ``inf`` where the ray misses or the slot is inactive.
    """
    inf = torch.tensor(float("inf"), dtype=prm.dtype, device=prm.device)
    if kind == ELLIPSOID:
        q = prm[:, _QUAD]
        a = _col(q, 0) * xx + _col(q, 1) * yy + _col(q, 2) * xy + _col(q, 3) * x + _col(q, 4) * y + _col(q, 5)
        g = prm[:, _LIN]
        b = _col(g, 0) * x + _col(g, 1) * y + _col(g, 2)
        disc = b * b - a * _col(prm, _CC)
        t = (b - torch.sqrt(torch.clamp(disc, min=0.0))) / a
        hit = (disc >= 0) & (t > 0)
    else:
        s = prm[:, _SLAB]
        o = prm[:, _ORIG]
        h = prm[:, _SIZE]
        tnear = None
        tfar = None
        for i in range(3):
            d = _col(s, 3 * i) * x + _col(s, 3 * i + 1) * y + _col(s, 3 * i + 2)
            t1 = (_col(h, i) - _col(o, i)) / d
            t2 = (-_col(h, i) - _col(o, i)) / d
            lo, hi = torch.minimum(t1, t2), torch.maximum(t1, t2)
            tnear = lo if tnear is None else torch.maximum(tnear, lo)
            tfar = hi if tfar is None else torch.minimum(tfar, hi)
        t = tnear
        hit = (tnear <= tfar) & (tnear > 0)
    hit = hit & (_col(prm, _ACTIVE) > 0.5)
    return torch.where(hit, t, inf)


def zbuffer(packed: dict, x, y, slots=None):
    """Nearest depth and winning slot for rays at ``(x, y)`` (``[N, M]`` or broadcastable).

    Returns ``(depth [N, M], winner [N, M] int64, -1 = background)``; ties go to the
    lowest slot index."""
    xx, yy, xy = x * x, y * y, x * y
    prims, kinds = packed["prims"], packed["kinds"]
    depth = None
    win = None
    for s in (range(len(kinds)) if slots is None else slots):
        t = intersect(kinds[s], prims[s], x, y, xx, yy, xy)
        if depth is None:
            shape = torch.broadcast_shapes(t.shape, x.shape)
            depth = torch.full(shape, float("inf"), dtype=t.dtype, device=t.device)
            win = torch.full(shape, -1, dtype=torch.int64, device=t.device)
        closer = t < depth
        depth = torch.where(closer, t, depth)
        win = torch.where(closer, torch.full_like(win, s), win)
    return depth, win


def _pixel_range(lo: np.ndarray, hi: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel index range [a, b] (inclusive) covering normalized [lo, hi] on an n-pixel axis, with a 1-pixel margin."""
    with np.errstate(invalid="ignore", over="ignore"):
        a = np.floor((np.clip(lo, -2.0, 2.0) + 1.0) * 0.5 * (n - 1)) - 1
        b = np.ceil((np.clip(hi, -2.0, 2.0) + 1.0) * 0.5 * (n - 1)) + 1
    return np.clip(a, 0, n - 1).astype(np.int64), np.clip(b, 0, n - 1).astype(np.int64)


def zbuffer_grid(packed: dict, lin: torch.Tensor, *, dense_fraction: float = 0.6):
    """Z-buffer of the square pixel grid whose row/column centres are ``lin`` ([S]).

    Each slot is intersected only inside a per-sample window around its projected
    bounding sphere (all windows of a batch share the largest size), which gives the
    same values as intersecting every pixel. Returns ``(depth [N, S*S], winner [N, S*S])``.
    """
    n_img = packed["prims"].shape[1]
    s = lin.shape[0]
    npx = s * s
    depth = torch.full((n_img, npx), float("inf"), dtype=torch.float32)
    win = torch.full((n_img, npx), -1, dtype=torch.int64)
    xg = lin.reshape(1, 1, s).expand(1, s, s).reshape(1, npx)
    yg = lin.reshape(1, s, 1).expand(1, s, s).reshape(1, npx)
    bounds = packed["bounds"]
    for slot, kind in enumerate(packed["kinds"]):
        b = bounds[slot]
        act = b[:, 4] > 0.5
        if not act.any():
            continue
        c0, c1 = _pixel_range(b[:, 0], b[:, 1], s)
        r0, r1 = _pixel_range(b[:, 2], b[:, 3], s)
        wmax = int((c1 - c0 + 1)[act].max())
        hmax = int((r1 - r0 + 1)[act].max())
        prm = packed["prims"][slot]
        if hmax * wmax >= dense_fraction * npx:
            t = intersect(kind, prm, xg, yg, xg * xg, yg * yg, xg * yg)
            closer = t < depth
            depth = torch.where(closer, t, depth)
            win = torch.where(closer, torch.full_like(win, slot), win)
            continue
        c0 = torch.from_numpy(np.minimum(np.where(act, c0, 0), s - wmax))
        r0 = torch.from_numpy(np.minimum(np.where(act, r0, 0), s - hmax))
        cols = c0.unsqueeze(1) + torch.arange(wmax).unsqueeze(0)  # [N, w]
        rows = r0.unsqueeze(1) + torch.arange(hmax).unsqueeze(0)  # [N, h]
        x = lin[cols].unsqueeze(1).expand(n_img, hmax, wmax).reshape(n_img, -1)
        y = lin[rows].unsqueeze(2).expand(n_img, hmax, wmax).reshape(n_img, -1)
        pix = (rows.unsqueeze(2) * s + cols.unsqueeze(1)).reshape(n_img, -1)
        t = intersect(kind, prm, x, y, x * x, y * y, x * y)
        cur = depth.gather(1, pix)
        closer = t < cur
        depth.scatter_(1, pix, torch.where(closer, t, cur))
        curw = win.gather(1, pix)
        win.scatter_(1, pix, torch.where(closer, torch.full_like(curw, slot), curw))
    return depth, win


def _tri(v: torch.Tensor) -> torch.Tensor:
    """Triangle wave with period 1, values in [0, 1]."""
    return torch.abs((v - torch.floor(v)) * 2.0 - 1.0)


def _normalize3(a, b, c):
    n = torch.sqrt(a * a + b * b + c * c) + 1e-12
    return a / n, b / n, c / n


# rows of the per-slot shading table (a transposed, compact copy of the packed layout)
_SHADE_COLS = np.r_[np.arange(_R.start, _SIZE.stop), np.arange(_COL1.start, _SPEC + 1)]
_S_R, _S_C, _S_SIZE = 0, 9, 12
_S_COL1, _S_COL2, _S_WDIR = 15, 18, 21
_S_WFREQ = _S_WDIR + 3 * N_WAVES
_S_WPHASE = _S_WFREQ + N_WAVES
_S_WWEIGHT = _S_WPHASE + N_WAVES
_S_SPEC = _S_WWEIGHT + N_WAVES


def shade(packed: dict, depth: torch.Tensor, win: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Colour of every object/occluder pixel: ``[N, 3, M]`` (zeros on background).

    ``x``, ``y`` are ``[M]`` normalized pixel coordinates shared by the batch. Pixels are
    grouped by winning slot with one stable sort; per-pixel parameters are gathered
    from transposed tables so every operand below is contiguous."""
    n, m = win.shape
    out = torch.zeros(3, n * m, dtype=depth.dtype, device=depth.device)
    flat = win.reshape(-1)
    n_slots = len(packed["kinds"])
    order = torch.sort(flat.to(torch.int16), stable=True).indices
    counts = torch.bincount(flat + 1, minlength=n_slots + 1).tolist()
    table = packed["prims"][:, :, torch.from_numpy(_SHADE_COLS)].permute(0, 2, 1).contiguous()  # [S, C, N]
    globt = packed["globals"].t().contiguous()  # [G, N]
    dflat = depth.reshape(-1)
    start = counts[0]
    for s, kind in enumerate(packed["kinds"]):
        cnt = counts[s + 1]
        idx = order[start:start + cnt]
        start += cnt
        if cnt == 0:
            continue
        img = idx // m
        pix = idx - img * m
        P = table[s].index_select(1, img)  # [C, Q]
        g = globt.index_select(1, img)  # [G, Q]
        f = g[_G_F]
        t = dflat.index_select(0, idx)
        px, py, pz = t * x.index_select(0, pix) / f, t * y.index_select(0, pix) / f, t
        R = P[_S_R:_S_R + 9]
        c = P[_S_C:_S_C + 3]
        size = P[_S_SIZE:_S_SIZE + 3]
        qx, qy, qz = px - c[0], py - c[1], pz - c[2]
        # local coordinates in units of the primitive's size: R^T q / size
        u = [(R[i] * qx + R[3 + i] * qy + R[6 + i] * qz) / size[i] for i in range(3)]
        if kind == ELLIPSOID:
            nl = [u[i] / size[i] for i in range(3)]
        else:
            a0, a1, a2 = torch.abs(u[0]), torch.abs(u[1]), torch.abs(u[2])
            ax0 = (a0 >= a1) & (a0 >= a2)
            ax1 = (~ax0) & (a1 >= a2)
            ax2 = (~ax0) & (~ax1)
            zero = torch.zeros_like(a0)
            nl = [torch.where(ax0, torch.sign(u[0]), zero), torch.where(ax1, torch.sign(u[1]), zero),
                  torch.where(ax2, torch.sign(u[2]), zero)]
        # camera-space normal R n_local
        nx = R[0] * nl[0] + R[1] * nl[1] + R[2] * nl[2]
        ny = R[3] * nl[0] + R[4] * nl[1] + R[5] * nl[2]
        nz = R[6] * nl[0] + R[7] * nl[1] + R[8] * nl[2]
        nx, ny, nz = _normalize3(nx, ny, nz)
        # texture: weighted triangle waves of the local coordinates
        pat = None
        wsum = None
        for k in range(N_WAVES):
            wd = P[_S_WDIR + 3 * k:_S_WDIR + 3 * k + 3]
            proj = wd[0] * u[0] + wd[1] * u[1] + wd[2] * u[2]
            term = P[_S_WWEIGHT + k] * _tri(proj * P[_S_WFREQ + k] + P[_S_WPHASE + k])
            pat = term if pat is None else pat + term
            wsum = P[_S_WWEIGHT + k] if wsum is None else wsum + P[_S_WWEIGHT + k]
        pat = pat / (wsum + 1e-6)
        pat = pat * pat * (3.0 - 2.0 * pat)
        mix = torch.where(wsum > 0, pat, torch.zeros_like(pat))
        # lighting: Lambert + ambient, Blinn-Phong with the viewer along -Z (per-sample half vector)
        lx, ly, lz = g[1], g[2], g[3]
        ndl = torch.clamp(nx * lx + ny * ly + nz * lz, min=0.0)
        ndh = torch.clamp(nx * g[_G_HALF.start] + ny * g[_G_HALF.start + 1] + nz * g[_G_HALF.start + 2], min=0.0)
        sp = ndh * ndh
        for _ in range(4):
            sp = sp * sp  # ndh ** 32
        light = (g[_G_AMB] + g[_G_DIFF] * ndl) * (0.8 - 0.2 * nz)
        spec = P[_S_SPEC] * sp
        for ch in range(3):
            c1 = P[_S_COL1 + ch]
            alb = c1 + (P[_S_COL2 + ch] - c1) * mix
            tint = g[_G_TINT.start + ch]
            out[ch].index_copy_(0, idx, alb * light * tint + spec * tint)
    return out.reshape(3, n, m).permute(1, 0, 2)


_NOISE_SIDE = 256
_NOISE_TABLE = None


def _noise_table() -> torch.Tensor:
    """A fixed table of uniform noise in [-1, 1), ``[3, 256 * 256]`` (same on every machine)."""
    global _NOISE_TABLE
    if _NOISE_TABLE is None:
        rng = np.random.Generator(np.random.PCG64(20230617))
        _NOISE_TABLE = torch.from_numpy((rng.random((3, _NOISE_SIDE * _NOISE_SIDE)) * 2.0 - 1.0).astype(np.float32))
    return _NOISE_TABLE


def background(packed: dict, x: torch.Tensor, y: torch.Tensor, pix_id: torch.Tensor) -> torch.Tensor:
    """Cluttered background ``[N, 3, M]`` at pixels ``(x, y)`` (``[M]`` each)."""
    glob, grid, shapes = packed["globals"], packed["grid"], packed["shapes"]
    n = glob.shape[0]
    gs = packed["grid_size"]
    # bilinear upsampling of the colour grid (explicit, so it is exactly per pixel)
    u = (x + 1.0) * (0.5 * (gs - 1))
    v = (y + 1.0) * (0.5 * (gs - 1))
    i0 = torch.clamp(torch.floor(u), 0, gs - 2)
    j0 = torch.clamp(torch.floor(v), 0, gs - 2)
    wx, wy = u - i0, v - j0
    i0, j0 = i0.long(), j0.long()
    f00, f01 = j0 * gs + i0, j0 * gs + i0 + 1
    f10, f11 = (j0 + 1) * gs + i0, (j0 + 1) * gs + i0 + 1
    w00, w01, w10, w11 = (1 - wx) * (1 - wy), wx * (1 - wy), (1 - wx) * wy, wx * wy
    out = (grid.index_select(2, f00) * w00 + grid.index_select(2, f01) * w01
           + grid.index_select(2, f10) * w10 + grid.index_select(2, f11) * w11)
    # grating
    gr = glob[:, _G_GRATING]
    proj = (_col(gr, 0) * x + _col(gr, 1) * y) * _col(gr, 2)
    out = out + (_col(gr, 3) * (_tri(proj) * 2.0 - 1.0)).unsqueeze(1)
    # flat shapes, painted in order, each inside its own window (see zbuffer_grid)
    sz = int(round(np.sqrt(x.shape[0])))
    lin = x[:sz]
    sh_np = shapes.numpy().astype(np.float64)
    for j in range(shapes.shape[1]):
        sh = shapes[:, j]
        act = sh_np[:, j, 0] > 0.5
        if not act.any():
            continue
        rad = np.hypot(1.0 / sh_np[:, j, 4], 1.0 / sh_np[:, j, 5])
        c0, c1 = _pixel_range(sh_np[:, j, 2] - rad, sh_np[:, j, 2] + rad, sz)
        r0, r1 = _pixel_range(sh_np[:, j, 3] - rad, sh_np[:, j, 3] + rad, sz)
        wmax = int((c1 - c0 + 1)[act].max())
        hmax = int((r1 - r0 + 1)[act].max())
        c0 = torch.from_numpy(np.minimum(np.where(act, c0, 0), sz - wmax))
        r0 = torch.from_numpy(np.minimum(np.where(act, r0, 0), sz - hmax))
        cols = c0.unsqueeze(1) + torch.arange(wmax).unsqueeze(0)
        rows = r0.unsqueeze(1) + torch.arange(hmax).unsqueeze(0)
        wx = lin[cols].unsqueeze(1).expand(n, hmax, wmax).reshape(n, -1)
        wy = lin[rows].unsqueeze(2).expand(n, hmax, wmax).reshape(n, -1)
        pix = (rows.unsqueeze(2) * sz + cols.unsqueeze(1)).reshape(n, -1)
        dx, dy = wx - _col(sh, 2), wy - _col(sh, 3)
        a = (dx * _col(sh, 6) + dy * _col(sh, 7)) * _col(sh, 4)
        b = (dy * _col(sh, 6) - dx * _col(sh, 7)) * _col(sh, 5)
        ell = (a * a + b * b) < 1.0
        rect = (torch.abs(a) < 1.0) & (torch.abs(b) < 1.0)
        inside = torch.where(_col(sh, 1) > 0.5, rect, ell) & (_col(sh, 0) > 0.5)
        for ch in range(3):
            plane = out[:, ch]
            cur = plane.gather(1, pix)
            plane.scatter_(1, pix, torch.where(inside, _col(sh, 8 + ch).expand_as(cur), cur))
    return out


def render(packed: dict, size: int, supersample: int = 1) -> dict:
    """Render a packed batch.

    Returns ``image [N, 3, size, size]`` float32 in [0, 1], ``keypoints [N, K, 2]``
    (normalized), ``visible [N, K]`` bool, ``depth [N, K]`` (normalized as in
    ``kpfast.data.procedural``), ``bbox [N, 4]`` (object silhouette, normalized).
    """
    glob = packed["globals"]
    n = glob.shape[0]
    f = glob[:, _G_F]
    ss = int(supersample)
    hi = size * ss
    # sub-pixel ray positions in normalized coordinates: output pixel j, sample k sits at
    # pixel coordinate j + (k + 0.5) / ss - 0.5
    step = 2.0 / (size - 1)
    base = torch.arange(hi, dtype=torch.float64)
    pcoord = torch.div(base, ss, rounding_mode="floor") + ((base - torch.div(base, ss, rounding_mode="floor") * ss) + 0.5) / ss - 0.5
    lin = (-1.0 + pcoord * step).to(torch.float32)
    ys, xs = torch.meshgrid(lin, lin, indexing="ij")
    x = xs.reshape(1, -1)
    y = ys.reshape(1, -1)
    depth, win = zbuffer_grid(packed, lin)
    col = shade(packed, depth, win, x[0], y[0])
    pid = torch.arange(hi * hi, dtype=torch.int64)
    bg = background(packed, x[0], y[0], pid)
    img = torch.where((win >= 0).unsqueeze(1), col, bg)
    # sensor noise: a window of a fixed noise table at a per-sample offset
    seeds = packed["noise_seed"]
    ox = (seeds % _NOISE_SIDE).unsqueeze(1)
    oy = ((seeds // _NOISE_SIDE) % _NOISE_SIDE).unsqueeze(1)
    rows = torch.div(pid, hi, rounding_mode="floor").unsqueeze(0)
    cols = (pid - torch.div(pid, hi, rounding_mode="floor") * hi).unsqueeze(0)
    nidx = ((rows + oy) % _NOISE_SIDE) * _NOISE_SIDE + (cols + ox) % _NOISE_SIDE  # [N, P]
    table = _noise_table()
    sig = _col(glob, _G_NOISE)
    for ch in range(3):
        img[:, ch] = img[:, ch] + table[ch][nidx] * sig
    img = torch.clamp(img, 0.0, 1.0).reshape(n, 3, hi, hi)
    if ss > 1:
        img = img.reshape(n, 3, size, ss, size, ss)
        acc = None
        for a in range(ss):
            for b in range(ss):
                acc = img[:, :, :, a, :, b] if acc is None else acc + img[:, :, :, a, :, b]
        img = acc / float(ss * ss)
    # keypoints: projection, depth, visibility by a ray cast through each keypoint
    kp3 = packed["keypoints"]
    fz = f.unsqueeze(1)
    kx = kp3[..., 0] / kp3[..., 2] * fz
    ky = kp3[..., 1] / kp3[..., 2] * fz
    zk = kp3[..., 2]
    zhit, _ = zbuffer(packed, kx, ky)
    inside = (kx >= -1) & (kx <= 1) & (ky >= -1) & (ky <= 1)
    visible = (zhit >= zk - packed["tol"]) & inside
    zc = packed["object_depth"].unsqueeze(1)
    depth_n = (zk - zc) * fz / zc
    # object silhouette box (at the supersampled resolution)
    obj = (win >= 0) & (win < packed["object_slots"])
    big = torch.tensor(float("inf"))
    x0 = torch.where(obj, x, big).amin(dim=1)
    x1 = torch.where(obj, x, -big).amax(dim=1)
    y0 = torch.where(obj, y, big).amin(dim=1)
    y1 = torch.where(obj, y, -big).amax(dim=1)
    bbox = torch.stack([x0, y0, x1, y1], dim=1).clamp(-1.0, 1.0)
    kp = torch.stack([kx, ky], dim=-1)
    empty = ~obj.any(dim=1)
    if empty.any():  # object fully hidden: fall back to the keypoints' box
        kb = torch.cat([kp.amin(dim=1), kp.amax(dim=1)], dim=1).clamp(-1.0, 1.0)
        bbox = torch.where(empty.unsqueeze(1), kb, bbox)
    return {"image": img, "keypoints": kp, "visible": visible, "depth": depth_n, "bbox": bbox}
