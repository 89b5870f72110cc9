"""Benchmark cases for kpfast.part_alignment (the paper's 3D geometric loss, Eq. 5) and kpfast.umeyama.

part_alignment at the WFLW setting: 98 keypoints with depth, 8 parts (contour, two brows,
nose, two eyes, mouth, the whole face), all B*B*P per-part similarity fits of a batch. The
reference materializes every pair and solves with one batched float64 torch.linalg.svd.
"""

from __future__ import annotations

import torch

import kpfast
from kpfast.reference import part_alignment_reference, umeyama_reference

from common import Case
from edge_map import face_layout_98

WFLW_PARTS = {  # WFLW's 98-point index ranges
    "contour": range(0, 33), "left brow": range(33, 42), "right brow": range(42, 51), "nose": range(51, 60),
    "left eye": list(range(60, 68)) + [96], "right eye": list(range(68, 76)) + [97], "mouth": range(76, 96),
}


def wflw_parts() -> torch.Tensor:
    parts = torch.zeros(len(WFLW_PARTS) + 1, 98, dtype=torch.bool)
    for p, idx in enumerate(WFLW_PARTS.values()):
        parts[p, list(idx)] = True
    parts[-1] = True  # the whole face
    return parts


def faces_3d(B: int, gen: torch.Generator) -> torch.Tensor:
    """Face-like 2D layouts plus a smooth depth, each sample in its own small 3D pose."""
    xy = face_layout_98(B, gen)
    depth = 0.3 * (1 - xy.square().sum(-1, keepdim=True)) + 0.02 * torch.randn(B, 98, 1, generator=gen)
    pts = torch.cat([xy, depth], -1)
    angle = 0.3 * torch.randn(B, 3, generator=gen)
    A = torch.zeros(B, 3, 3)
    A[:, 0, 1], A[:, 0, 2], A[:, 1, 2] = -angle[:, 2], angle[:, 1], -angle[:, 0]
    R = torch.linalg.matrix_exp(A - A.mT)
    return pts @ R.mT


def _part_case(B, detach, targets=(), K=98):
    parts = wflw_parts() if K == 98 else torch.ones(2, K, dtype=torch.bool)
    P = parts.shape[0]

    def make_inputs(device):
        gen = torch.Generator().manual_seed(0)
        pts = faces_3d(B, gen) if K == 98 else torch.randn(B, K, 3, generator=gen)
        return {"points": pts.to(device).requires_grad_(), "parts": parts.to(device)}

    def reference(x):
        return part_alignment_reference(x["points"], x["parts"], detach_transform=detach)

    compiled = torch.compile(part_alignment_reference, dynamic=False)

    def compiled_reference(x):
        return compiled(x["points"], x["parts"], detach_transform=detach)

    def fused(x):
        return kpfast.part_alignment(x["points"], x["parts"], detach_transform=detach)

    mode = "detached transform" if detach else "full gradient"
    return Case(
        op="part_alignment", name=f"B={B} K={K} P={P} 3D, {mode}",
        config=dict(B=B, K=K, P=P, D=3, detach_transform=detach),
        make_inputs=make_inputs,
        providers={"reference": reference, "torch.compile(reference)": compiled_reference, "fused": fused},
        # ~25 live float64 tensors of B*B*P*K*3 elements in the reference's forward+backward
        reference_bytes=25 * 8 * B * B * P * K * 3,
        targets=list(targets),
    )


def _umeyama_case(N, M):
    def make_inputs(device):
        gen = torch.Generator().manual_seed(0)
        src = torch.randn(N, M, 3, generator=gen)
        dst = 1.5 * src.flip(-1) + 0.1 * torch.randn(N, M, 3, generator=gen)
        w = torch.rand(N, M, generator=gen) + 0.1
        return {k: v.to(device).requires_grad_() for k, v in dict(src=src, dst=dst, w=w).items()}

    def pack(R, s, t):  # one tensor out, every output in the gradient
        return torch.cat([R.flatten(1), s[:, None], t], 1)

    def reference(x):
        return pack(*umeyama_reference(x["src"], x["dst"], x["w"]))

    compiled = torch.compile(umeyama_reference, dynamic=False)

    def compiled_reference(x):
        return pack(*compiled(x["src"], x["dst"], x["w"]))

    def fused(x):
        return pack(*kpfast.umeyama(x["src"], x["dst"], x["w"]))

    return Case(
        op="umeyama", name=f"N={N} M={M} 3D weighted",
        config=dict(N=N, M=M, D=3),
        make_inputs=make_inputs,
        providers={"reference": reference, "torch.compile(reference)": compiled_reference, "fused": fused},
        reference_bytes=20 * 8 * N * M * 3,
    )


def cases(device: torch.device, quick: bool) -> list[Case]:
    if quick:
        return [_part_case(4, True, K=10), _umeyama_case(64, 8)]
    targets = [
        dict(metric="forward+backward", over="reference", at_least=3, device="cpu"),
        dict(metric="forward+backward", over="reference", at_least=50, device="cuda"),
    ]
    return [
        _part_case(16, True),
        _part_case(32, True, targets),
        _part_case(64, True),
        _part_case(32, False),
        _umeyama_case(8192, 12),
    ]
