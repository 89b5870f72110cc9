"""The face smoothness penalty on jaw and nose (paper Supp. A, weight 0.02).

The supplement says "we encourage the cosine of the angle of the two neighboring
landmarks to be 0" for jaw and nose landmarks. We read it as a bending penalty:
for every landmark ``b`` with two skeleton neighbours ``a, c`` inside a smoothed
part, ``1 - cos`` of the angle between the directions ``b - a`` and ``c - b`` (0 on
a straight line, 2 for a full reversal), averaged over such triples.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import torch
from torch import Tensor

SMOOTH_PARTS = ("contour", "jaw", "nose")
"""Part names (of ``KeypointMeta.parts``) the penalty applies to when present."""


def smoothness_triples(edges: Sequence[tuple[int, int]], part_members: Iterable[Sequence[int]]) -> Tensor:
    """``[T, 3]`` triples ``(a, b, c)``: every keypoint ``b`` of a part with exactly two
    skeleton neighbours ``a < c`` inside the same part.

    Example:
        >>> smoothness_triples([(0, 1), (1, 2), (2, 3)], [[0, 1, 2, 3]]).tolist()
        [[0, 1, 2], [1, 2, 3]]
    """
    out = []
    for members in part_members:
        s = set(members)
        nbrs: dict[int, set] = {k: set() for k in s}
        for i, j in edges:
            if i in s and j in s:
                nbrs[i].add(j)
                nbrs[j].add(i)
        for b in sorted(s):
            if len(nbrs[b]) == 2:
                a, c = sorted(nbrs[b])
                out.append((a, b, c))
    return torch.tensor(out, dtype=torch.int64).reshape(-1, 3)


def smoothness_loss(keypoints: Tensor, triples: Tensor, eps: float = 1e-8) -> Tensor:
    """Mean ``1 - cos(angle(k_b - k_a, k_c - k_b))`` over ``triples [T, 3]``; ``keypoints [B, K, 2]``.

    Example:
        >>> kp = torch.tensor([[[0.0, 0.0], [1.0, 0.0], [2.0, 0.0], [2.0, 1.0]]])
        >>> smoothness_loss(kp, torch.tensor([[0, 1, 2], [1, 2, 3]])).item()  # straight, then a right angle
        0.5
    """
    if triples.numel() == 0:
        return keypoints.sum() * 0.0
    t = triples.to(keypoints.device)
    a, b, c = keypoints[:, t[:, 0]], keypoints[:, t[:, 1]], keypoints[:, t[:, 2]]
    u, v = b - a, c - b
    cos = (u * v).sum(-1) / (u.norm(dim=-1) * v.norm(dim=-1)).clamp_min(eps)
    return (1 - cos).mean()
