"""The C++ CPU kernels (``csrc/``, built as ``kpfast._C``) behind the kernel interface of
:mod:`kpfast.ops.backend`: the functions of the Triton launchers in ``kernels/``, same names,
arguments and results. The extension takes float32/float64 numpy views and writes into
buffers; these functions convert the inputs to the compute dtype, allocate the outputs and
convert them back where the interface asks for the input dtype."""

from __future__ import annotations

import torch

from . import _tensors
from ._tensors import compute
from .backend import extension


def _np(t):
    """A no-copy numpy view of a contiguous CPU tensor (None stays None)."""
    return None if t is None else t.detach().numpy()


def _threads() -> int:
    return torch.get_num_threads()


def _value(t, value: float) -> float:
    """The float a 0-dim tensor argument holds, or ``value`` when it is None."""
    return float(t) if t is not None else value


# ----------------------------------------------------------------------------- edge_map


def edge_map_forward(kp, edges, unc, w, s2, s2_value, H, W, precision, eps):
    """``(out [B,H,W] in kp.dtype, winner [B,H,W] int32)``; see ``kernels/edge_map.py``."""
    x = compute(kp)
    B = x.shape[0]
    out = torch.empty(B, H, W, dtype=x.dtype)
    winner = torch.empty(B, H, W, dtype=torch.int32)
    extension().edge_map_forward(
        _np(x), _np(edges.to(torch.int32).contiguous()), _np(compute(unc, x.dtype)), _np(compute(w, x.dtype)),
        _value(s2, s2_value), H, W, precision, eps, _np(out), _np(winner), _threads(),
    )
    return out.to(kp.dtype), winner


def edge_map_backward(grad_out, winner, kp, edges, unc, w, s2, s2_value, precision, eps):
    """Per-edge gradients ``[B, E, NGRAD]`` in the compute dtype; see ``kernels/edge_map.py``."""
    ext = extension()
    x = compute(kp)
    grad_edges = torch.empty(x.shape[0], edges.shape[0], ext.EDGE_MAP_NGRAD, dtype=x.dtype)
    ext.edge_map_backward(
        _np(compute(grad_out, x.dtype)), _np(winner.contiguous()), _np(x), _np(edges.to(torch.int32).contiguous()),
        _np(compute(unc, x.dtype)), _np(compute(w, x.dtype)), _value(s2, s2_value), precision, eps,
        _np(grad_edges), _threads(),
    )
    return grad_edges


# -------------------------------------------------------------------------- soft_argmax


def _maps(heatmaps, readouts, stacked):
    """The heatmaps in their compute dtype with contiguous planes, and one numpy ``[B, K, H, W]``
    view per readout channel."""
    h = _tensors.planes(compute(heatmaps, contiguous=False))
    rs = [_tensors.planes(compute(r, contiguous=False)) for r in readouts]
    if stacked:
        return h, [_np(rs[0][:, :, c]) for c in range(rs[0].shape[2])]
    return h, [_np(r) for r in rs]


def soft_argmax_forward(heatmaps, readouts, stacked, beta, beta_value):
    """``(keypoints [B,K,2], values [B,K,C], stats [B,K,2])`` in the compute dtype; see
    ``kernels/soft_argmax.py``."""
    B, K = heatmaps.shape[:2]
    h, rs = _maps(heatmaps, _tensors.plane_list(readouts, stacked), stacked)
    kp = torch.empty(B, K, 2, dtype=h.dtype)
    values = torch.empty(B, K, len(rs), dtype=h.dtype)
    stats = torch.empty(B, K, 2, dtype=h.dtype)
    extension().soft_argmax_forward(_np(h), rs, _value(beta, beta_value), _np(kp), _np(values), _np(stats), _threads())
    return kp, values, stats


def soft_argmax_backward(grad_kp, grad_values, heatmaps, readouts, stacked, beta, beta_value, kp, values, stats,
                         need_heatmaps, need_readouts, need_beta):
    """``(grad_heatmaps, grad_readouts, grad_beta)`` as ``kernels/soft_argmax.py`` returns them."""
    B, K, H, W = heatmaps.shape
    h, rs = _maps(heatmaps, _tensors.plane_list(readouts, stacked), stacked)
    acc, C = h.dtype, len(rs)
    need_readouts = need_readouts and C > 0
    gh = torch.empty(B, K, H, W, dtype=acc) if need_heatmaps else None
    gr = torch.empty((B, K, C, H, W) if stacked else (C, B, K, H, W), dtype=acc) if need_readouts else None
    gr_views = ([_np(gr[:, :, c]) for c in range(C)] if stacked else [_np(g) for g in gr]) if need_readouts else []
    gb = torch.empty(B, K, dtype=acc) if need_beta else None
    extension().soft_argmax_backward(
        _np(compute(grad_kp, acc)), _np(compute(grad_values, acc)), _np(h), rs, _value(beta, beta_value),
        _np(compute(kp, acc)), _np(compute(values, acc)), _np(compute(stats, acc)), _np(gh), gr_views, _np(gb), _threads(),
    )
    dtype = heatmaps.dtype
    return (
        gh.to(dtype) if gh is not None else heatmaps.new_empty(0),
        gr.to(dtype) if gr is not None else heatmaps.new_empty(0),
        gb if gb is not None else heatmaps.new_empty(0, dtype=acc),
    )


# ------------------------------------------------------------------ umeyama, part_alignment


def umeyama_forward(src, dst, w, scale, tol):
    """``R [N,D,D]``, ``s [N]``, ``t [N,D]`` in the dtype of ``src``; see ``kernels/umeyama.py``."""
    x, y, w = compute(src), compute(dst), compute(w)
    N, _, D = x.shape
    R, s, t = torch.empty(N, D, D, dtype=x.dtype), torch.empty(N, dtype=x.dtype), torch.empty(N, D, dtype=x.dtype)
    extension().umeyama_forward(_np(x), _np(y), _np(w), scale, *tol, _np(R), _np(s), _np(t), _threads())
    return R.to(src.dtype), s.to(src.dtype), t.to(src.dtype)


def umeyama_backward(gR, gs, gt, src, dst, w, scale, tol):
    """Gradients ``(src [N,M,D], dst [N,M,D], weights [N,M])`` in the compute dtype."""
    x, y, w = compute(src), compute(dst), compute(w)
    N, M, D = x.shape
    g_src, g_dst, g_w = torch.empty(N, M, D, dtype=x.dtype), torch.empty(N, M, D, dtype=x.dtype), torch.empty(N, M, dtype=x.dtype)
    extension().umeyama_backward(
        *(_np(compute(g, x.dtype)) for g in (gR, gs, gt)), _np(x), _np(y), _np(w), scale, *tol,
        _np(g_src), _np(g_dst), _np(g_w), _threads(),
    )
    return g_src, g_dst, g_w


def part_alignment_forward(points, parts, w, scale, full, tol):
    """``r [B,B,P]`` in the dtype of ``points`` and the per-fit records ``[B,B,P,PART_RECORD_SIZE]``."""
    ext = extension()
    x, w, m = compute(points), compute(w), parts.to(torch.uint8).contiguous()
    B, P = x.shape[0], m.shape[0]
    r, rec = torch.empty(B, B, P, dtype=x.dtype), torch.empty(B, B, P, ext.PART_RECORD_SIZE, dtype=x.dtype)
    ext.part_alignment_forward(_np(x), _np(m), _np(w), scale, full, *tol, _np(r), _np(rec), _threads())
    return r.to(points.dtype), rec


def part_alignment_backward(grad_r, r, record, points, parts, w, scale, full):
    """Gradients ``(points [B,K,D], weights [B,K])`` in the compute dtype."""
    x, w, m = compute(points), compute(w), parts.to(torch.uint8).contiguous()
    B, K, D = x.shape
    gx, gw = torch.empty(B, K, D, dtype=x.dtype), torch.empty(B, K, dtype=x.dtype)
    extension().part_alignment_backward(
        _np(compute(grad_r, x.dtype)), _np(compute(r, x.dtype)), _np(record.contiguous()), _np(x), _np(m), _np(w),
        scale, full, _np(gx), _np(gw), _threads(),
    )
    return gx, gw
