"""Benchmark cases for kpfast.soft_argmax: the paper's detector head (K = 98 WFLW
keypoints, uncertainty and depth readouts, C = 2).

Each provider returns ``cat([keypoints, values], -1)`` ``[B, K, 2 + C]`` so that one
backward reaches the heatmaps, the readouts and (where it is a tensor) beta.
Layouts: "stacked" readouts ``[B, K, C, H, W]`` with a float beta, and "chunks":
heatmaps and readouts are channel slices of one ``[B, (1 + C) K, H, W]`` network
output (the paper's 3K-channel head) passed as a sequence, with a learnable beta.
The fused op reads the slices in place; the reference stacks them.
"""

from __future__ import annotations

import torch

import kpfast
from kpfast.reference import soft_argmax_reference

from common import Case


def _case(B, K, C, H, W, layout="stacked", targets=()):
    def make_inputs(device):
        gen = torch.Generator().manual_seed(0)
        # peaked heatmaps, as a trained detector gives: a Gaussian bump per keypoint plus noise
        ys = torch.linspace(-1, 1, H).view(1, 1, H, 1)
        xs = torch.linspace(-1, 1, W).view(1, 1, 1, W)
        centre = torch.rand(B, K, 2, 1, 1, generator=gen) * 1.6 - 0.8
        heat = -((xs - centre[:, :, 0]) ** 2 + (ys - centre[:, :, 1]) ** 2) / 0.01 + torch.randn(B, K, H, W, generator=gen)
        readouts = torch.randn(B, K, C, H, W, generator=gen)
        if layout == "chunks":
            parent = torch.cat([heat, *readouts.unbind(2)], 1)
            return dict(features=parent.to(device).requires_grad_(), beta=torch.tensor(1.0, device=device).requires_grad_())
        return dict(heatmaps=heat.to(device).requires_grad_(), readouts=readouts.to(device).requires_grad_())

    def args(x):
        if layout == "chunks":
            maps = x["features"].chunk(1 + C, dim=1)
            return maps[0], list(maps[1:]), x["beta"]
        return x["heatmaps"], x["readouts"], 1.0

    def packed(fn):
        def run(x):
            heat, readouts, beta = args(x)
            kp, values = fn(heat, readouts, beta=beta)
            return torch.cat([kp, values], -1)

        return run

    compiled = torch.compile(soft_argmax_reference, dynamic=False)
    # the reference keeps/produces about 10 + 2C float32 maps of B*K*H*W in forward+backward
    reference_bytes = (10 + 2 * C) * 4 * B * K * H * W
    return Case(
        op="soft_argmax", name=f"{layout} B={B} K={K} C={C} {H}x{W}",
        config=dict(B=B, K=K, C=C, H=H, W=W, layout=layout, beta="learned" if layout == "chunks" else "float",
                    forward_bytes_read=4 * B * K * (1 + C) * H * W),
        make_inputs=make_inputs,
        providers={
            "reference": packed(soft_argmax_reference),
            "torch.compile(reference)": packed(compiled),
            "fused": packed(kpfast.soft_argmax),
        },
        reference_bytes=reference_bytes,
        targets=list(targets),
    )


def cases(device: torch.device, quick: bool) -> list[Case]:
    if quick:
        return [_case(2, 5, 2, 16, 16), _case(2, 5, 2, 16, 16, "chunks")]
    cpu_target = [dict(metric="forward+backward", over="reference", at_least=2, device="cpu")]
    gpu_target = [
        dict(metric="forward+backward", over="reference", at_least=3, device="cuda"),
        dict(metric="forward+backward", over="torch.compile(reference)", at_least=1, device="cuda"),
    ]
    return [
        _case(16, 98, 2, 64, 64, targets=cpu_target),
        _case(32, 98, 2, 32, 32, targets=gpu_target),
        _case(32, 98, 2, 64, 64, targets=gpu_target),
        _case(32, 98, 2, 128, 128, targets=gpu_target),
        _case(32, 98, 2, 64, 64, "chunks", targets=gpu_target),
    ]
