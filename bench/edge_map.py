"""Benchmark cases for kpfast.edge_map: a face skeleton and AutoLink's all-pairs graph."""

from __future__ import annotations

import math

import torch

import kpfast
from kpfast.reference import edge_map_reference

from common import Case

SIGMA2 = math.exp(1.0) / 1000  # the paper's initial thickness (theta = 1)


def face_skeleton_98() -> list[tuple[int, int]]:
    """A WFLW-like 98-point skeleton: contour, brows, nose, eyes, mouth (loops closed), pupils."""

    def chain(a, b, closed=False):
        e = [(i, i + 1) for i in range(a, b)]
        return e + [(b, a)] if closed else e

    return (chain(0, 32) + chain(33, 41, True) + chain(42, 50, True) + chain(51, 54) + chain(55, 59)
            + [(54, 57)] + chain(60, 67, True) + chain(68, 75, True) + chain(76, 87, True) + chain(88, 95, True)
            + [(96, 60), (97, 68)])


def face_layout_98(B: int, gen: torch.Generator) -> torch.Tensor:
    """Face-like keypoints: a contour arc, brows, nose, eyes and mouth as small curves, with jitter."""
    def arc(n, cx, cy, rx, ry, a0, a1):
        t = torch.linspace(a0, a1, n)
        return torch.stack([cx + rx * torch.cos(t), cy + ry * torch.sin(t)], -1)

    pts = torch.cat([
        arc(33, 0.0, -0.1, 0.75, 0.8, 0.0, math.pi),          # contour (y down)
        arc(9, -0.35, -0.45, 0.2, 0.08, math.pi, 2 * math.pi),  # brows
        arc(9, 0.35, -0.45, 0.2, 0.08, math.pi, 2 * math.pi),
        arc(4, 0.0, -0.2, 0.01, 0.15, -math.pi / 2, math.pi / 2),  # nose bridge
        arc(5, 0.0, 0.1, 0.12, 0.04, 0.0, math.pi),
        arc(8, -0.33, -0.25, 0.14, 0.06, 0.0, 2 * math.pi),    # eyes
        arc(8, 0.33, -0.25, 0.14, 0.06, 0.0, 2 * math.pi),
        arc(12, 0.0, 0.4, 0.3, 0.12, 0.0, 2 * math.pi),        # mouth
        arc(8, 0.0, 0.4, 0.18, 0.05, 0.0, 2 * math.pi),
        torch.tensor([[-0.33, -0.25], [0.33, -0.25]]),        # pupils
    ])
    jitter = torch.randn(B, 98, 2, generator=gen) * 0.02
    scale = 1 + 0.1 * torch.randn(B, 1, 1, generator=gen)
    return pts * scale + jitter


def _case(name, B, K, edges, size, layout, per_edge_weights, targets=()):
    E = len(edges)
    H, W = size

    def make_inputs(device):
        gen = torch.Generator().manual_seed(0)
        kp = layout(B, gen) if layout else torch.rand(B, K, 2, generator=gen) * 1.4 - 0.7
        unc = torch.randn(B, K, generator=gen)
        w = torch.rand(E, generator=gen) + 0.5 if per_edge_weights else torch.full((E,), 0.0181)  # softplus(-4)
        s2 = torch.tensor(SIGMA2)
        leaves = dict(keypoints=kp, uncertainty=unc, edge_weight=w, sigma2=s2)
        out = {k: v.to(device).requires_grad_() for k, v in leaves.items()}
        out["edges"] = torch.tensor(edges, device=device)
        return out

    def reference(x):
        return edge_map_reference(x["keypoints"], x["edges"], size, uncertainty=x["uncertainty"],
                                  edge_weight=x["edge_weight"], sigma2=x["sigma2"])

    compiled = torch.compile(edge_map_reference, dynamic=False)

    def compiled_reference(x):
        return compiled(x["keypoints"], x["edges"], size, uncertainty=x["uncertainty"],
                        edge_weight=x["edge_weight"], sigma2=x["sigma2"])

    def fused(x):
        return kpfast.edge_map(x["keypoints"], x["edges"], size, uncertainty=x["uncertainty"],
                               edge_weight=x["edge_weight"], sigma2=x["sigma2"])

    # ~17 live float32 tensors of B*E*H*W elements in the reference's forward+backward
    reference_bytes = 17 * 4 * B * E * H * W
    return Case(
        op="edge_map", name=f"{name} B={B} K={K} E={E} {H}x{W}",
        config=dict(B=B, K=K, E=E, H=H, W=W, graph=name),
        make_inputs=make_inputs,
        providers={"reference": reference, "torch.compile(reference)": compiled_reference, "fused": fused},
        reference_bytes=reference_bytes,
        targets=list(targets),
    )


def cases(device: torch.device, quick: bool) -> list[Case]:
    face, pairs = face_skeleton_98(), [(i, j) for i in range(32) for j in range(i + 1, 32)]
    if quick:
        return [_case("all-pairs", 1, 8, [(i, j) for i in range(8) for j in range(i + 1, 8)], (32, 32), None, True)]
    cpu_target = [dict(metric="forward+backward", over="reference", at_least=10, device="cpu")]
    gpu_target = [
        dict(metric="forward+backward", over="reference", at_least=10, device="cuda"),
        dict(metric="forward+backward", over="torch.compile(reference)", at_least=3, device="cuda"),
        dict(metric="peak_bytes", over="reference", at_least=50, device="cuda"),
    ]
    out = [_case("all-pairs", 2, 32, pairs, (128, 128), None, True, cpu_target)]
    for size in ((128, 128), (256, 256)):
        out.append(_case("face", 32, 98, face, size, face_layout_98, False))
        out.append(_case("all-pairs", 64, 32, pairs, size, None, True, gpu_target if size == (128, 128) else ()))
    return out
