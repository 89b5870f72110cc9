"""TEMPORARY shim: ``soft_argmax`` and ``part_alignment`` until they land on main.

Models and losses import the two ops from here only. When ``kpfast`` exports the
fused ops, they are used; otherwise this falls back to plain-PyTorch versions with
exactly the public signatures of DESIGN.md. Delete this module (and import from
``kpfast`` directly) once the ``soft-argmax`` and ``umeyama`` branches are merged.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

import kpfast


def _soft_argmax_fallback(heatmaps: Tensor, readouts=None, *, beta=1.0):
    B, K, H, W = heatmaps.shape
    w = torch.softmax((beta * heatmaps).reshape(B, K, H * W), dim=-1)
    xs = torch.linspace(-1, 1, W, dtype=heatmaps.dtype, device=heatmaps.device)
    ys = torch.linspace(-1, 1, H, dtype=heatmaps.dtype, device=heatmaps.device)
    grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), -1).reshape(H * W, 2)
    kp = w @ grid
    if readouts is None:
        return kp, None
    r = readouts if isinstance(readouts, Tensor) else torch.stack(list(readouts), 2)
    values = torch.einsum("bkp,bkcp->bkc", w, r.reshape(B, K, r.shape[2], H * W))
    return kp, values


def _part_alignment_fallback(points: Tensor, parts: Tensor, weights: Optional[Tensor] = None, *,
                             scale: bool = True, detach_transform: bool = True) -> Tensor:
    B, K, D = points.shape
    P = parts.shape[0]
    x = points.double()
    w = torch.ones(B, K, dtype=x.dtype, device=x.device) if weights is None else weights.double()
    c = parts.to(x.dtype)[None, None] * (w[:, None, None, :] * w[None, :, None, :])  # [B, B, P, K]
    dst = x[:, None, None].expand(B, B, P, K, D)
    src = x[None, :, None].expand(B, B, P, K, D)
    with torch.set_grad_enabled(not detach_transform and torch.is_grad_enabled()):
        tot = c.sum(-1, keepdim=True).clamp_min(1e-12)
        mu_s = (c[..., None] * src).sum(-2) / tot
        mu_d = (c[..., None] * dst).sum(-2) / tot
        cs, cd = src - mu_s[..., None, :], dst - mu_d[..., None, :]
        cov = torch.einsum("...k,...ki,...kj->...ij", c, cd, cs) / tot[..., None]
        U, S, Vh = torch.linalg.svd(cov)
        sign = torch.sign(torch.det(U) * torch.det(Vh))
        sign = torch.where(sign == 0, torch.ones_like(sign), sign)
        d = torch.ones(*sign.shape, D, dtype=x.dtype, device=x.device)
        d[..., -1] = sign
        R = U @ torch.diag_embed(d) @ Vh
        if scale:
            var = (c * (cs ** 2).sum(-1)).sum(-1) / tot[..., 0]
            s = (S * d).sum(-1) / var.clamp_min(1e-12)
        else:
            s = torch.ones_like(sign)
        t = mu_d - s[..., None] * (R @ mu_s[..., None])[..., 0]
    fitted = s[..., None, None] * (src @ R.transpose(-1, -2)) + t[..., None, :]
    err = (dst - fitted).abs().sum(-1)
    W = c.sum(-1)
    r = (c * err).sum(-1) / torch.where(W > 0, W, torch.ones_like(W))
    diag = torch.eye(B, dtype=torch.bool, device=x.device)[:, :, None]
    return torch.where(diag, torch.zeros_like(r), r).to(points.dtype)


soft_argmax = getattr(kpfast, "soft_argmax", _soft_argmax_fallback)
part_alignment = getattr(kpfast, "part_alignment", _part_alignment_fallback)

__all__ = ["soft_argmax", "part_alignment"]
