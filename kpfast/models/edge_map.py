"""The trainable edge map: :func:`kpfast.edge_map` with the paper's learned thickness and strength."""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops import edge_map
from ..ops.edge_map_op import edge_tensor


class EdgeMap(nn.Module):
    """The paper's edge map (Eqs. 6-8, 11, 12) with learnable thickness and weight.

    ``sigma2 = exp(theta) / 1000`` (theta from 1, about 3.3 px at 128 px) and
    ``alpha = softplus(gamma)`` (gamma from -4), rendered by :func:`kpfast.edge_map`
    as ``max_e alpha_e S_e``. With ``learn_edge_weights=True`` every edge has its
    own ``gamma_e`` (AutoLink's learned graph; start it from ``gamma`` plus
    ``edge_weight_noise`` x N(0, 1) to break symmetry) instead of one shared alpha.

    Args:
        edges: ``[E, 2]`` integer tensor or sequence of ``(i, j)`` pairs (e.g.
            :func:`kpfast.data.skeletons.all_pairs`), checked as by :func:`kpfast.edge_map`.
        size: output ``H`` or ``(H, W)``.
        learn_edge_weights: one weight per edge instead of one for all.
        theta, gamma: initial values of the two parameters.
        mode: ``"intensity"`` or ``"precision"`` (see :func:`kpfast.edge_map`).

    Shapes: ``keypoints [B, K, 2]``, ``uncertainty [B, K]`` logits or None -> ``[B, H, W]``.

    Example:
        >>> m = EdgeMap([(0, 1), (1, 2)], 16)
        >>> m(torch.tensor([[[-0.5, 0.0], [0.0, 0.5], [0.5, 0.0]]])).shape
        torch.Size([1, 16, 16])
        >>> round(m.sigma2.item(), 5), round(m.alpha.item(), 5)
        (0.00272, 0.01815)
    """

    def __init__(
        self,
        edges,
        size,
        *,
        learn_edge_weights: bool = False,
        theta: float = 1.0,
        gamma: float = -4.0,
        edge_weight_noise: float = 0.0,
        mode: str = "intensity",
    ):
        super().__init__()
        e = edge_tensor(edges, edges.device if isinstance(edges, Tensor) else None)
        self.register_buffer("edges", e, persistent=False)
        self.size = (size, size) if isinstance(size, int) else tuple(size)
        self.mode = mode
        self.theta = nn.Parameter(torch.tensor(float(theta)))
        shape: Sequence[int] = (e.shape[0],) if learn_edge_weights else ()
        init = torch.full(shape, float(gamma))
        if learn_edge_weights and edge_weight_noise:
            init = init + edge_weight_noise * torch.randn(shape)
        self.gamma = nn.Parameter(init)

    @property
    def sigma2(self) -> Tensor:
        return torch.exp(self.theta) / 1000

    @property
    def alpha(self) -> Tensor:
        """``softplus(gamma)``: a 0-dim tensor, or ``[E]`` with learned edge weights."""
        return F.softplus(self.gamma)

    def forward(self, keypoints: Tensor, uncertainty: Optional[Tensor] = None) -> Tensor:
        weight = self.alpha.to(keypoints.dtype).expand(self.edges.shape[0])
        return edge_map(keypoints, self.edges, self.size, uncertainty=uncertainty, edge_weight=weight,
                        sigma2=self.sigma2.to(keypoints.dtype), mode=self.mode)

    def extra_repr(self) -> str:
        learned = "per-edge" if self.gamma.dim() else "shared"
        return f"edges={self.edges.shape[0]}, size={self.size}, mode={self.mode!r}, weights={learned}"


__all__ = ["EdgeMap"]
