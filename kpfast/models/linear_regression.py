"""Linear maps between point sets, fitted in closed form: the evaluation protocol of
unsupervised landmark discovery (Thewlis et al.; Jakab et al.; Sanchez & Tzimiropoulos).

Discovered landmarks are not the dataset's keypoints; a linear regressor (with a bias)
from the ``2 K_d`` landmark coordinates to the ``2 K`` keypoint coordinates, fitted on
the labelled images, makes them comparable (the *forward* direction). The *backward*
regressor maps the annotated keypoints to the discovered landmarks: it is accurate only
if every landmark moves with the object (an unstable landmark cannot be predicted from
the annotation).

With few labelled images the least-squares problem is under-determined (10 images,
``2 K_d + 1 = 21`` unknowns per output), so the fit is ridge regression with an
unpenalized bias, its strength chosen among :data:`RIDGE_ALPHAS` by the exact
leave-one-out error on the labelled images (closed form through the hat matrix; no
test image is seen).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn

RIDGE_ALPHAS = tuple(10.0 ** e for e in torch.arange(-6.0, 3.01, 0.5).tolist())
"""Ridge strengths tried, relative to the mean squared norm of a centred input feature column."""


@dataclass
class RidgeFit:
    """``y ~ x @ weight.T + bias`` (``weight [m, d]``, ``bias [m]``); ``alpha`` the chosen relative
    ridge strength and ``loo_rmse`` its leave-one-out RMS error per output value (NaN when no
    output had two examples)."""

    weight: Tensor
    bias: Tensor
    alpha: float
    loo_rmse: float


def fit_ridge(x: Tensor, y: Tensor, mask: Optional[Tensor] = None, alphas=RIDGE_ALPHAS) -> RidgeFit:
    """Multi-output ridge regression with an unpenalized bias and a leave-one-out choice of strength.

    Args:
        x: ``[n, d]`` inputs.
        y: ``[n, m]`` targets.
        mask: ``[n, m]`` bool: which targets are known (None: all). Each output is fitted on
            the examples that know it; one strength is chosen for all outputs (the smallest
            total leave-one-out squared error). An output known on fewer than two examples
            predicts its mean (0 when unknown everywhere).
        alphas: relative strengths to try: ``lambda = alpha * ||x_c||_F^2 / d`` per output group.

    Returns:
        :class:`RidgeFit` (float64, on the CPU: the fit runs there whatever the inputs' device).

    Example:
        >>> x = torch.randn(12, 3, dtype=torch.float64)
        >>> y = x @ torch.tensor([[1.0, -2.0, 0.5]], dtype=torch.float64).T + 3
        >>> fit = fit_ridge(x, y)
        >>> torch.allclose(fit.weight, torch.tensor([[1.0, -2.0, 0.5]], dtype=torch.float64), atol=1e-3)
        True
    """
    x, y = x.detach().to("cpu", torch.float64), y.detach().to("cpu", torch.float64)  # tiny: the same on every device
    n, d = x.shape
    m = y.shape[1]
    if y.shape[0] != n:
        raise ValueError(f"x has {n} rows but y has {y.shape[0]}")
    mask = torch.ones(n, m, dtype=torch.bool) if mask is None else mask.to("cpu", torch.bool)
    if mask.shape != y.shape:
        raise ValueError(f"mask must have the shape of y {tuple(y.shape)}, got {tuple(mask.shape)}")
    alphas = torch.tensor(list(alphas), dtype=torch.float64, device=x.device)
    weight = torch.zeros(m, d, dtype=torch.float64, device=x.device)
    bias = torch.zeros(m, dtype=torch.float64, device=x.device)
    groups = []  # (rows, columns, U, s, V, x mean, y_c, y mean) of the outputs sharing a row set
    patterns, group_of = torch.unique(mask.T, dim=0, return_inverse=True)
    loo = torch.zeros(len(alphas), dtype=torch.float64, device=x.device)
    counted = 0
    for g, rows in enumerate(patterns):
        cols = torch.nonzero(group_of == g).flatten()
        k = int(rows.sum())
        if k < 2:
            bias[cols] = y[rows][:, cols].mean(0) if k else 0.0
            continue
        xr, yr = x[rows], y[rows][:, cols]
        x_mean, y_mean = xr.mean(0), yr.mean(0)
        xc, yc = xr - x_mean, yr - y_mean
        u, s, vt = torch.linalg.svd(xc, full_matrices=False)
        scale = xc.pow(2).sum() / d
        lam = alphas * (scale if scale > 0 else 1.0)
        shrink = s.pow(2)[None] / (s.pow(2)[None] + lam[:, None])  # [A, r]
        hat = 1.0 / k + (u.pow(2)[None] * shrink[:, None, :]).sum(-1)  # [A, k] leverages, bias included
        uy = u.T @ yc  # [r, c]
        fitted = torch.einsum("ir,ar,rc->aic", u, shrink, uy)  # [A, k, c], centred
        residual = (yc[None] - fitted) / (1.0 - hat).clamp_min(1e-12)[..., None]
        loo += residual.pow(2).sum((1, 2))
        counted += residual[0].numel()
        groups.append((cols, u, s, vt, x_mean, y_mean, uy, lam))
    best = int(torch.argmin(loo)) if counted else 0
    for cols, u, s, vt, x_mean, y_mean, uy, lam in groups:
        w = vt.T @ ((s / (s.pow(2) + lam[best]))[:, None] * uy)  # [d, c]
        weight[cols] = w.T
        bias[cols] = y_mean - x_mean @ w
    rmse = float((loo[best] / counted).sqrt()) if counted else float("nan")
    return RidgeFit(weight=weight, bias=bias, alpha=float(alphas[best]), loo_rmse=rmse)


class PointRegressor(nn.Module):
    """A linear map between point sets: ``[B, P_in, 2] -> [B, P_out, 2]`` (all coordinates to all
    coordinates, with a bias), fitted by :meth:`fit`. Its weights are buffers (saved with the
    model, never trained by an optimizer); before a fit it predicts zeros.

    Example:
        >>> reg = PointRegressor(3, 2)
        >>> reg(torch.rand(5, 3, 2)).shape
        torch.Size([5, 2, 2])
    """

    def __init__(self, in_points: int, out_points: int):
        super().__init__()
        self.in_points, self.out_points = int(in_points), int(out_points)
        self.register_buffer("weight", torch.zeros(2 * out_points, 2 * in_points))
        self.register_buffer("bias", torch.zeros(2 * out_points))
        self.fit_info: Optional[dict] = None

    def forward(self, points: Tensor) -> Tensor:
        if points.dim() != 3 or points.shape[1:] != (self.in_points, 2):
            raise ValueError(f"points must be [B, {self.in_points}, 2], got {tuple(points.shape)}")
        out = points.flatten(1).to(self.weight.dtype) @ self.weight.T + self.bias
        return out.view(points.shape[0], self.out_points, 2).to(points.dtype)

    @torch.no_grad()
    def fit(self, inputs: Tensor, targets: Tensor, known: Optional[Tensor] = None) -> dict:
        """Fit on ``inputs [n, P_in, 2]`` -> ``targets [n, P_out, 2]`` (``known [n, P_out]``: which target
        points count). Returns ``{"alpha", "loo_rmse", "examples"}`` (also kept in ``fit_info``)."""
        n = inputs.shape[0]
        mask = None if known is None else known.to(torch.bool)[..., None].expand(n, self.out_points, 2).reshape(n, -1)
        fit = fit_ridge(inputs.reshape(n, -1), targets.reshape(n, -1), mask)
        self.weight.copy_(fit.weight)
        self.bias.copy_(fit.bias)
        self.fit_info = {"alpha": fit.alpha, "loo_rmse": fit.loo_rmse, "examples": int(n)}
        return self.fit_info
