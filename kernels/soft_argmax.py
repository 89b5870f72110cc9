"""Triton kernels of ``kpfast.soft_argmax``: forward, split combine and backward.

Forward: one program per (heatmap row, channel group, split). A program walks
its tiles of the H*W plane once, keeping per-lane running maxima and rescaled
sums (normalizer, x, y and one per readout channel of its group), so the
softmax is never materialized and no block-wide reduction runs inside the loop;
lanes are combined once at the end. Readout channels beyond ``CG`` go to more
programs along axis 1 (each re-reads the heatmap, never more than CG readouts at
a time in registers). When there are too few rows to fill the GPU, axis 2
splits each plane into ranges whose partial (max, sums) a small combine kernel
merges. Every program also produces the per-row max logit ``m`` and normalizer
``l``, the only state kept for backward besides the inputs and outputs.

Backward: one program per (row, split); the weights are recomputed as
``exp(beta h - m) / l`` and each map is read once: the heatmap, each readout
(for ``delta``) and the output gradients written once. The gradient to beta is
reduced per program into a ``[rows, splits]`` buffer that the launcher sums.

Readouts are addressed as ``base + b*r_sb + k*r_sk + offset_c + p`` with
``offset_c = c * r_sc`` (a stacked tensor, or a sequence of maps that are equally
spaced in memory such as channel chunks of one network output) or read from an
int64 table of element offsets relative to the first map (any other sequence of
same-dtype maps; a device constant copied once per layout, capturable in a CUDA
graph): a sequence of readouts is never copied into a stacked tensor. Channel
offsets are int64; a float beta is passed as a value (its float64 bits).
Semantics: ``kpfast/reference.py::soft_argmax_reference``.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from kpfast.ops import _tensors

from ._common import f64_bits, pixel_steps, scalar_arg, tl_dtype

MAX_CG = 8  # readout channels accumulated by one program
FAST_DIV_MAX = 1 << 20  # planes up to this many pixels find their row without integer division
TARGET_PROGRAMS_PER_SM = 4


@triton.jit
def _coords(offs, W, step_x, step_y, DT: tl.constexpr, FAST_DIV: tl.constexpr):
    """Pixel centres of flat plane offsets. With FAST_DIV (H*W <= FAST_DIV_MAX) the row is
    trunc((offs + 0.5) / W) in float32, exact there: the quotient is at least 0.5 / W away
    from an integer and its relative error is a few 2^-24 (no integer division on the GPU)."""
    if FAST_DIV:
        i = ((offs.to(tl.float32) + 0.5) * (1.0 / W.to(tl.float32))).to(tl.int32)
    else:
        i = offs // W
    j = offs - i * W
    return j.to(DT) * step_x - 1.0, i.to(DT) * step_y - 1.0


@triton.jit
def _tile_logits(h_row, t, lanes, HW, beta, BLOCK: tl.constexpr, DT: tl.constexpr):
    """Tile ``t`` of a heatmap row: offsets, in-plane mask, heatmap values (``-inf`` outside) and
    logits ``beta * h`` (``-inf`` where ``h = -inf``: a masked pixel whatever beta is)."""
    offs = t * BLOCK + lanes
    ok = offs < HW
    neg_inf = float("-inf")
    hv = tl.load(h_row + offs, mask=ok, other=neg_inf).to(DT)
    return offs, ok, hv, tl.where(hv == neg_inf, neg_inf, beta * hv)


@triton.jit
def _channel_offset(c, stride):
    """``c * stride`` in int64: a channel stride can be close to 2^31 (``B*K*H*W`` between the maps
    of a ``[C, B, K, H, W]`` gradient, or between equally spaced readouts)."""
    return tl.cast(c, tl.int64) * stride  # c may be a loop index (a Python int when interpreted)


@triton.jit(do_not_specialize=["beta_bits"])
def _soft_argmax_fwd_kernel(
    h_ptr, r_ptr, roff_ptr, beta_ptr, kp_ptr, val_ptr, stats_ptr, part_ptr,
    beta_bits: tl.int64, K, H, W, h_sb, h_sk, r_sb, r_sk, r_sc, C, tiles_per_split, nsplit,
    HAS_BETA_PTR: tl.constexpr, HAS_R: tl.constexpr, USE_TABLE: tl.constexpr, SPLIT: tl.constexpr,
    CG: tl.constexpr, BLOCK: tl.constexpr, DT: tl.constexpr, FAST_DIV: tl.constexpr,
):
    row = tl.program_id(0)
    grp = tl.program_id(1)
    split = tl.program_id(2)
    b = (row // K).to(tl.int64)
    k = (row % K).to(tl.int64)
    HW = H * W
    beta = scalar_arg(beta_ptr, beta_bits, HAS_BETA_PTR, DT)
    step_x, step_y = pixel_steps(H, W, DT)
    h_row = h_ptr + b * h_sb + k * h_sk
    lanes = tl.arange(0, BLOCK)
    neg_inf = float("-inf")

    c_idx = grp * CG + tl.arange(0, CG)
    c_ok = c_idx < C
    if HAS_R:
        if USE_TABLE:
            roff = tl.load(roff_ptr + c_idx, mask=c_ok, other=0)
        else:
            roff = _channel_offset(c_idx, r_sc)
        r_rows = r_ptr + b * r_sb + k * r_sk + roff  # [CG] pointers

    m = tl.full([BLOCK], neg_inf, DT)
    l = tl.zeros([BLOCK], DT)
    sx = tl.zeros([BLOCK], DT)
    sy = tl.zeros([BLOCK], DT)
    sr = tl.zeros([CG, BLOCK], DT)
    t0 = split * tiles_per_split
    t1 = tl.minimum(t0 + tiles_per_split, tl.cdiv(HW, BLOCK))
    for t in range(t0, t1):
        offs, ok, hv, z = _tile_logits(h_row, t, lanes, HW, beta, BLOCK, DT)
        m_new = tl.maximum(m, z)
        mu = tl.where(m_new == neg_inf, 0.0, m_new)  # a lane that saw only masked pixels adds exp(-inf) = 0
        alpha = tl.exp(m - mu)
        e = tl.exp(z - mu)
        x, y = _coords(offs, W, step_x, step_y, DT, FAST_DIV)
        l = l * alpha + e
        sx = sx * alpha + e * x
        sy = sy * alpha + e * y
        if HAS_R:
            rv = tl.load(r_rows[:, None] + offs[None, :], mask=c_ok[:, None] & ok[None, :], other=0.0).to(DT)
            sr = sr * alpha[None, :] + e[None, :] * rv
        m = m_new

    # Combine the lanes.
    mx = tl.max(m, 0)
    mxu = tl.where(mx == neg_inf, 0.0, mx)
    s = tl.exp(m - mxu)
    L = tl.sum(l * s, 0)
    SX = tl.sum(sx * s, 0)
    SY = tl.sum(sy * s, 0)
    if SPLIT:
        width = 4 + C
        part = part_ptr + (row.to(tl.int64) * nsplit + split) * width
        if grp == 0:
            tl.store(part + 0, mx)
            tl.store(part + 1, L)
            tl.store(part + 2, SX)
            tl.store(part + 3, SY)
        if HAS_R:
            SR = tl.sum(sr * s[None, :], 1)
            tl.store(part + 4 + c_idx, SR, mask=c_ok)
    else:
        # A row that is masked everywhere has L = 0: NaN keypoints and values, as torch.softmax.
        if grp == 0:
            tl.store(kp_ptr + 2 * row, SX / L)
            tl.store(kp_ptr + 2 * row + 1, SY / L)
            tl.store(stats_ptr + 2 * row, mx)
            tl.store(stats_ptr + 2 * row + 1, L)
        if HAS_R:
            SR = tl.sum(sr * s[None, :], 1)
            tl.store(val_ptr + row.to(tl.int64) * C + c_idx, SR / L, mask=c_ok)


@triton.jit
def _soft_argmax_combine_kernel(
    part_ptr, kp_ptr, val_ptr, stats_ptr, nsplit, C,
    NS: tl.constexpr, CB: tl.constexpr, DT: tl.constexpr,
):
    row = tl.program_id(0)
    width = 4 + C
    sp = tl.arange(0, NS)
    ok = sp < nsplit
    base = part_ptr + (row.to(tl.int64) * nsplit + sp) * width
    m = tl.load(base + 0, mask=ok, other=float("-inf"))
    mx = tl.max(m, 0)
    mxu = tl.where(mx == float("-inf"), 0.0, mx)
    s = tl.where(ok, tl.exp(m - mxu), 0.0)
    L = tl.sum(tl.load(base + 1, mask=ok, other=0.0) * s, 0)
    SX = tl.sum(tl.load(base + 2, mask=ok, other=0.0) * s, 0)
    SY = tl.sum(tl.load(base + 3, mask=ok, other=0.0) * s, 0)
    tl.store(kp_ptr + 2 * row, SX / L)
    tl.store(kp_ptr + 2 * row + 1, SY / L)
    tl.store(stats_ptr + 2 * row, mx)
    tl.store(stats_ptr + 2 * row + 1, L)
    for c0 in range(0, C, CB):
        cc = c0 + tl.arange(0, CB)
        cok = cc < C
        tile = tl.load(base[:, None] + 4 + cc[None, :], mask=ok[:, None] & cok[None, :], other=0.0)
        SR = tl.sum(tile * s[:, None], 0)
        tl.store(val_ptr + row.to(tl.int64) * C + cc, SR / L, mask=cok)


@triton.jit(do_not_specialize=["beta_bits"])
def _soft_argmax_bwd_kernel(
    gkp_ptr, gval_ptr, h_ptr, r_ptr, roff_ptr, beta_ptr, kp_ptr, val_ptr, stats_ptr,
    gh_ptr, gr_ptr, gb_ptr,
    beta_bits: tl.int64, K, H, W, h_sb, h_sk, r_sb, r_sk, r_sc, C, g_sc, g_sb, g_sk, tiles_per_split, nsplit,
    HAS_BETA_PTR: tl.constexpr, USE_TABLE: tl.constexpr,
    NEED_H: tl.constexpr, NEED_R: tl.constexpr, NEED_BETA: tl.constexpr,
    BLOCK: tl.constexpr, DT: tl.constexpr, FAST_DIV: tl.constexpr,
):
    row = tl.program_id(0)
    split = tl.program_id(1)
    row64 = row.to(tl.int64)
    b = row64 // K
    k = row64 % K
    HW = H * W
    beta = scalar_arg(beta_ptr, beta_bits, HAS_BETA_PTR, DT)
    step_x, step_y = pixel_steps(H, W, DT)
    neg_inf = float("-inf")
    h_row = h_ptr + b * h_sb + k * h_sk
    r_row = r_ptr + b * r_sb + k * r_sk
    gr_row = gr_ptr + b * g_sb + k * g_sk
    mx = tl.load(stats_ptr + 2 * row64).to(DT)
    inv_l = 1.0 / tl.load(stats_ptr + 2 * row64 + 1).to(DT)
    gx = tl.load(gkp_ptr + 2 * row64).to(DT)
    gy = tl.load(gkp_ptr + 2 * row64 + 1).to(DT)
    kx = tl.load(kp_ptr + 2 * row64).to(DT)
    ky = tl.load(kp_ptr + 2 * row64 + 1).to(DT)
    # sum_p w (h - c0) delta = sum_p w h delta because sum_p w delta = 0; c0 ~ max h keeps the terms small.
    finite = (beta != 0.0) & (mx > neg_inf) & (mx < float("inf"))
    c0 = tl.where(finite, mx / tl.where(finite, beta, 1.0), 0.0)
    lanes = tl.arange(0, BLOCK)
    gb = tl.zeros([BLOCK], DT)
    t0 = split * tiles_per_split
    t1 = tl.minimum(t0 + tiles_per_split, tl.cdiv(HW, BLOCK))
    for t in range(t0, t1):
        offs, ok, hv, z = _tile_logits(h_row, t, lanes, HW, beta, BLOCK, DT)
        w = tl.exp(z - mx) * inv_l
        if NEED_H or NEED_BETA:
            x, y = _coords(offs, W, step_x, step_y, DT, FAST_DIV)
            delta = gx * (x - kx) + gy * (y - ky)
        for c in range(C):
            g = tl.load(gval_ptr + row64 * C + c).to(DT)
            if NEED_H or NEED_BETA:
                if USE_TABLE:
                    roff = tl.load(roff_ptr + c)
                else:
                    roff = _channel_offset(c, r_sc)
                v = tl.load(val_ptr + row64 * C + c).to(DT)
                rv = tl.load(r_row + roff + offs, mask=ok, other=0.0).to(DT)
                delta += g * (rv - v)
            if NEED_R:
                tl.store(gr_row + _channel_offset(c, g_sc) + offs, (g * w).to(gr_ptr.dtype.element_ty), mask=ok)
        if NEED_H:
            gh = tl.where(hv == neg_inf, 0.0, beta * w * delta)  # a masked pixel gets none (not 0 * NaN)
            tl.store(gh_ptr + row64 * HW + offs, gh.to(gh_ptr.dtype.element_ty), mask=ok)
        if NEED_BETA:
            gb += tl.where(hv == neg_inf, 0.0, w * (hv - c0) * delta)
    if NEED_BETA:
        tl.store(gb_ptr + row64 * nsplit + split, tl.sum(gb, 0))


# ---------------------------------------------------------------------------------------------------------------------
# Launchers


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _programs_wanted(device: torch.device) -> int:
    sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device()) if device.type == "cuda" else 132
    return TARGET_PROGRAMS_PER_SM * sms


def _block(HW: int, cg: int) -> int:
    cap = 1024 if cg <= 2 else 512
    return max(16, min(cap, triton.next_power_of_2(HW)))


def _warps(block: int, cg: int = 1, dtype: torch.dtype = torch.float32) -> int:
    """Warps of a program: one per 256 lanes, at most 4; float64 with more than 2 readout channels
    in registers takes 4 (2 spilled registers on sm_90 at cg = 8)."""
    if dtype == torch.float64 and cg > 2:
        return 4
    return max(1, min(4, block // 256))


def _splits(rows: int, n_tiles: int, programs: int, split) -> int:
    if split is not None:
        return max(1, min(int(split), n_tiles))
    if rows >= programs // 2 or n_tiles < 4:
        return 1
    return max(1, min(n_tiles // 2, triton.cdiv(programs, rows)))


class _Readouts:
    """Where readout channel c of row (b, k) starts: ``base + b*sb + k*sk + off_c`` (elements)."""

    def __init__(self, heatmaps: torch.Tensor, readouts: list, stacked: bool):
        self.C = 0
        self.base, self.table, self.sb, self.sk, self.sc = heatmaps, None, 0, 0, 0
        if stacked:
            r = readouts[0]
            self.C = r.shape[2]
            self.base, self.sb, self.sk, self.sc = r, r.stride(0), r.stride(1), r.stride(2)
        elif readouts:
            self.C = len(readouts)
            first = readouts[0]
            self.base, self.sb, self.sk = first, first.stride(0), first.stride(1)
            if any((r.stride(0), r.stride(1)) != (self.sb, self.sk) for r in readouts):
                raise ValueError("readouts: the maps of a sequence must share their batch and keypoint strides")
            es = first.element_size()
            deltas = [r.data_ptr() - first.data_ptr() for r in readouts]
            if any(d % es for d in deltas):
                raise ValueError("readouts: maps must be aligned to their element size")
            offs = [d // es for d in deltas]
            step = offs[1] if len(offs) > 1 else 0
            if all(o == c * step for c, o in enumerate(offs)):
                self.sc = step  # equally spaced, e.g. chunks of one tensor: no table
            else:
                # The int64 offsets, copied to the device once per layout (the caching allocator
                # usually hands a training loop the same addresses every step) and capturable.
                self.table = _tensors.device_constant(tuple(offs), torch.int64, heatmaps.device)

    @property
    def use_table(self) -> bool:
        return self.table is not None

    def table_or(self, dummy: torch.Tensor) -> torch.Tensor:
        return self.table if self.table is not None else dummy


def soft_argmax_forward(heatmaps, readouts, stacked, beta, beta_value, *, split=None, group=None):
    """Launch the forward.

    Args: ``heatmaps [B,K,H,W]`` with contiguous H x W planes (any batch/keypoint strides),
    ``readouts`` a list (one ``[B,K,C,H,W]`` tensor when ``stacked``, else C ``[B,K,H,W]``
    maps of the heatmaps' dtype sharing their batch/keypoint strides), ``beta`` a 0-dim tensor or
    None (then ``beta_value``). ``split``/``group`` force the number of plane ranges per row and
    readout channels per program (tests). Returns ``(keypoints [B,K,2], values [B,K,C],
    stats [B,K,2])`` in float32 (float64 for float64 input); ``stats`` holds (max logit, normalizer).
    """
    heatmaps, readouts = _tensors.planes(heatmaps), _tensors.plane_list(readouts, stacked)
    B, K, H, W = heatmaps.shape
    device, acc = heatmaps.device, _tensors.compute_dtype(heatmaps.dtype)
    R = _Readouts(heatmaps, readouts, stacked)
    C = R.C
    kp = torch.empty(B, K, 2, dtype=acc, device=device)
    values = torch.empty(B, K, C, dtype=acc, device=device)
    stats = torch.empty(B, K, 2, dtype=acc, device=device)
    rows, HW = B * K, H * W
    if rows == 0:
        return kp, values, stats
    cg = triton.next_power_of_2(min(max(C, 1), MAX_CG if group is None else int(group)))
    groups = triton.cdiv(C, cg) if C else 1
    block = _block(HW, cg)
    n_tiles = triton.cdiv(HW, block)
    nsplit = _splits(rows, n_tiles, _programs_wanted(device), split)
    per = triton.cdiv(n_tiles, nsplit)
    nsplit = triton.cdiv(n_tiles, per)
    part = torch.empty(rows, nsplit, 4 + C, dtype=acc, device=device) if nsplit > 1 else stats
    _soft_argmax_fwd_kernel[(rows, groups, nsplit)](
        heatmaps, R.base, R.table_or(stats), beta if beta is not None else stats, kp, values, stats, part,
        f64_bits(beta_value), K, H, W, heatmaps.stride(0), heatmaps.stride(1), R.sb, R.sk, R.sc, C, per, nsplit,
        HAS_BETA_PTR=beta is not None, HAS_R=C > 0, USE_TABLE=R.use_table, SPLIT=nsplit > 1,
        CG=cg, BLOCK=block, DT=tl_dtype(heatmaps.dtype), FAST_DIV=HW <= FAST_DIV_MAX,
        num_warps=_warps(block, cg, heatmaps.dtype),
    )
    if nsplit > 1:
        _soft_argmax_combine_kernel[(rows,)](
            part, kp, values, stats, nsplit, C,
            NS=max(2, triton.next_power_of_2(nsplit)), CB=8, DT=tl_dtype(heatmaps.dtype), num_warps=1,
        )
    return kp, values, stats


def soft_argmax_backward(grad_kp, grad_values, heatmaps, readouts, stacked, beta, beta_value, kp, values, stats,
                         need_heatmaps, need_readouts, need_beta, *, split=None):
    """Launch the backward.

    Returns ``(grad_heatmaps [B,K,H,W] or [0], grad_readouts or [0], grad_beta [B,K] or [0])``;
    ``grad_readouts`` is ``[B,K,C,H,W]`` when ``stacked`` and ``[C,B,K,H,W]`` otherwise, in the
    heatmaps' dtype; ``grad_beta`` holds per-row sums in the accumulation dtype.
    """
    heatmaps, readouts = _tensors.planes(heatmaps), _tensors.plane_list(readouts, stacked)
    grad_kp, grad_values = grad_kp.contiguous(), grad_values.contiguous()
    kp, values, stats = kp.contiguous(), values.contiguous(), stats.contiguous()
    B, K, H, W = heatmaps.shape
    device, dtype, acc = heatmaps.device, heatmaps.dtype, _tensors.compute_dtype(heatmaps.dtype)
    R = _Readouts(heatmaps, readouts, stacked)
    C = R.C
    need_readouts = need_readouts and C > 0
    gh = torch.empty(B, K, H, W, dtype=dtype, device=device) if need_heatmaps else heatmaps.new_empty(0)
    if need_readouts:
        gr = torch.empty((B, K, C, H, W) if stacked else (C, B, K, H, W), dtype=dtype, device=device)
        g_sc, g_sb, g_sk = (gr.stride(2), gr.stride(0), gr.stride(1)) if stacked else (gr.stride(0), gr.stride(1), gr.stride(2))
    else:
        gr, g_sc, g_sb, g_sk = heatmaps.new_empty(0), 0, 0, 0
    rows, HW = B * K, H * W
    block = _block(HW, 1)
    n_tiles = triton.cdiv(HW, block)
    nsplit = _splits(rows, n_tiles, _programs_wanted(device), split)
    per = triton.cdiv(n_tiles, nsplit)
    nsplit = triton.cdiv(n_tiles, per)
    gb = torch.empty(rows, nsplit, dtype=acc, device=device) if need_beta else heatmaps.new_empty(0, dtype=acc)
    if rows and (need_heatmaps or need_readouts or need_beta):
        _soft_argmax_bwd_kernel[(rows, nsplit)](
            grad_kp, grad_values, heatmaps, R.base, R.table_or(stats), beta if beta is not None else stats,
            kp, values, stats, gh if need_heatmaps else stats, gr if need_readouts else stats, gb if need_beta else stats,
            f64_bits(beta_value), K, H, W, heatmaps.stride(0), heatmaps.stride(1), R.sb, R.sk, R.sc, C, g_sc, g_sb, g_sk,
            per, nsplit, HAS_BETA_PTR=beta is not None, USE_TABLE=R.use_table,
            NEED_H=need_heatmaps, NEED_R=need_readouts, NEED_BETA=need_beta,
            BLOCK=block, DT=tl_dtype(dtype), FAST_DIV=HW <= FAST_DIV_MAX, num_warps=_warps(block),
        )
    if need_beta:
        gb = gb.sum(1).reshape(B, K)
    return gh, gr, gb


# ---------------------------------------------------------------------------------------------------------------------
# Variants lowered for sm_90 in CI (kpfast.kernels.gpu_compile)

_CONSTEXPR = "constexpr"


def _compile_cases():
    cases = []
    for ptr in ("*fp32", "*fp64", "*bf16", "*fp16"):
        acc = "*fp64" if ptr == "*fp64" else "*fp32"
        dt = tl.float64 if ptr == "*fp64" else tl.float32
        ints = ("K", "H", "W", "h_sb", "h_sk", "r_sb", "r_sk", "r_sc", "C", "tiles_per_split", "nsplit")
        fwd_sig = {
            "h_ptr": ptr, "r_ptr": ptr, "roff_ptr": "*i64", "beta_ptr": acc, "kp_ptr": acc, "val_ptr": acc,
            "stats_ptr": acc, "part_ptr": acc, "beta_bits": "i64", **{n: "i32" for n in ints},
            **{n: _CONSTEXPR for n in ("HAS_BETA_PTR", "HAS_R", "USE_TABLE", "SPLIT", "CG", "BLOCK", "DT", "FAST_DIV")},
        }
        fwd_variants = [
            dict(HAS_BETA_PTR=False, HAS_R=False, USE_TABLE=False, SPLIT=False, CG=1, FAST_DIV=True),
            dict(HAS_BETA_PTR=True, HAS_R=True, USE_TABLE=False, SPLIT=False, CG=2, FAST_DIV=True),
            dict(HAS_BETA_PTR=False, HAS_R=True, USE_TABLE=True, SPLIT=True, CG=2, FAST_DIV=False),
            dict(HAS_BETA_PTR=True, HAS_R=True, USE_TABLE=False, SPLIT=True, CG=MAX_CG, FAST_DIV=True),
        ]
        for v in fwd_variants:
            block = _block(1 << 16, v["CG"])
            label = f"{ptr[1:]} " + " ".join(f"{k.lower()}={int(x)}" for k, x in v.items())
            cases.append((f"soft_argmax fwd {label}", _soft_argmax_fwd_kernel, fwd_sig, dict(v, BLOCK=block, DT=dt),
                          {"num_warps": _warps(block, v["CG"], torch.float64 if dt == tl.float64 else torch.float32)}))
        if ptr in ("*fp32", "*fp64"):
            comb_sig = {"part_ptr": acc, "kp_ptr": acc, "val_ptr": acc, "stats_ptr": acc, "nsplit": "i32", "C": "i32",
                        "NS": _CONSTEXPR, "CB": _CONSTEXPR, "DT": _CONSTEXPR}
            cases.append((f"soft_argmax combine {acc[1:]}", _soft_argmax_combine_kernel, comb_sig, dict(NS=64, CB=8, DT=dt),
                          {"num_warps": 1}))
        bwd_ints = ints[:-2] + ("g_sc", "g_sb", "g_sk", "tiles_per_split", "nsplit")
        bwd_sig = {
            "gkp_ptr": acc, "gval_ptr": acc, "h_ptr": ptr, "r_ptr": ptr, "roff_ptr": "*i64", "beta_ptr": acc,
            "kp_ptr": acc, "val_ptr": acc, "stats_ptr": acc, "gh_ptr": ptr, "gr_ptr": ptr, "gb_ptr": acc,
            "beta_bits": "i64", **{n: "i32" for n in bwd_ints},
            **{n: _CONSTEXPR for n in ("HAS_BETA_PTR", "USE_TABLE", "NEED_H", "NEED_R", "NEED_BETA", "BLOCK", "DT", "FAST_DIV")},
        }
        bwd_variants = [
            dict(HAS_BETA_PTR=False, USE_TABLE=False, NEED_H=True, NEED_R=True, NEED_BETA=False, FAST_DIV=True),
            dict(HAS_BETA_PTR=True, USE_TABLE=False, NEED_H=True, NEED_R=True, NEED_BETA=True, FAST_DIV=True),
            dict(HAS_BETA_PTR=True, USE_TABLE=True, NEED_H=False, NEED_R=True, NEED_BETA=False, FAST_DIV=False),
            dict(HAS_BETA_PTR=True, USE_TABLE=False, NEED_H=False, NEED_R=False, NEED_BETA=True, FAST_DIV=False),
        ]
        for v in bwd_variants:
            label = f"{ptr[1:]} " + " ".join(f"{k.lower()}={int(x)}" for k, x in v.items())
            block = _block(1 << 16, 1)
            cases.append((f"soft_argmax bwd {label}", _soft_argmax_bwd_kernel, bwd_sig, dict(v, BLOCK=block, DT=dt),
                          {"num_warps": _warps(block)}))
    return cases


GPU_COMPILE_CASES = _compile_cases()
