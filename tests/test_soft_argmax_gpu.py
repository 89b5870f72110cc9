"""kpfast.soft_argmax checks only a GPU can make (marked `gpu`; skipped without CUDA):
compiled Triton kernels at the paper's and larger sizes, the split-plane path,
half precision, CUDA-graph capture and torch.compile on CUDA."""

from __future__ import annotations

import pytest
import torch

import kpfast
from kpfast.reference import soft_argmax_reference

from _util import fresh_generator

pytestmark = pytest.mark.gpu
DEVICE = "cuda"


def _problem(gen, B, K, C, H, W, dtype=torch.float32, chunks=False):
    """Peaked heatmaps (a bump per keypoint plus noise, some pixels masked) and readouts."""
    ys = torch.linspace(-1, 1, H).view(1, 1, H, 1)
    xs = torch.linspace(-1, 1, W).view(1, 1, 1, W)
    centre = torch.rand(B, K, 2, 1, 1, generator=gen) * 1.6 - 0.8
    heat = -((xs - centre[:, :, 0]) ** 2 + (ys - centre[:, :, 1]) ** 2) / 0.02 + torch.randn(B, K, H, W, generator=gen)
    heat[torch.rand(B, K, H, W, generator=gen) < 0.05] = float("-inf")
    readouts = torch.randn(B, K, C, H, W, generator=gen)
    beta = torch.tensor(1.5, device=DEVICE, requires_grad=True)
    if chunks:
        parent = torch.cat([heat, *readouts.unbind(2)], 1).to(DEVICE, dtype).requires_grad_()
        maps = parent.chunk(1 + C, dim=1)
        return (maps[0], list(maps[1:]), beta), (parent, beta)
    heat = heat.to(DEVICE, dtype).requires_grad_()
    readouts = readouts.to(DEVICE, dtype).requires_grad_()
    return (heat, readouts, beta), (heat, readouts, beta)


def _check_against_float64_reference(args, leaves, seed, rtol, atol):
    heat, readouts, beta = args
    kp, values = kpfast.soft_argmax(heat, readouts, beta=beta)
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    if len(leaves) == 2:  # chunks of one parent
        C = len(readouts)
        maps = leaves64[0].chunk(1 + C, dim=1)
        ref = soft_argmax_reference(maps[0], list(maps[1:]), beta=leaves64[1])
    else:
        ref = soft_argmax_reference(leaves64[0], leaves64[1], beta=leaves64[2])
    torch.testing.assert_close(kp.double(), ref[0], rtol=rtol, atol=atol, msg=lambda m: f"keypoints (seed {seed}): {m}")
    torch.testing.assert_close(values.double(), ref[1], rtol=rtol, atol=atol, msg=lambda m: f"values (seed {seed}): {m}")
    gen = torch.Generator().manual_seed(seed)
    gk = torch.randn(kp.shape, generator=gen, dtype=torch.float64).to(DEVICE)
    gv = torch.randn(values.shape, generator=gen, dtype=torch.float64).to(DEVICE)
    got = torch.autograd.grad((kp.double() * gk).sum() + (values.double() * gv).sum(), leaves)
    want = torch.autograd.grad((ref[0] * gk).sum() + (ref[1] * gv).sum(), leaves64)
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w, rtol=rtol * 10, atol=atol * 10 * (1 + w.abs().max().item()),
                                   msg=lambda m: f"gradient (seed {seed}): {m}")


@pytest.mark.parametrize(
    "B, K, C, H, W, chunks",
    [
        (32, 98, 2, 128, 128, False),  # the paper's detector head, larger maps
        (32, 98, 2, 64, 64, True),     # channel slices of one 3K-channel output
        (1, 2, 2, 256, 256, False),    # few rows: the split-plane path and its combine kernel
        (2, 300, 3, 256, 256, False),  # many keypoints, large maps
        (4, 17, 11, 50, 37, False),    # odd sizes, two channel groups
    ],
)
def test_triton_matches_reference_at_real_sizes(B, K, C, H, W, chunks):
    gen, seed = fresh_generator()
    args, leaves = _problem(gen, B, K, C, H, W, chunks=chunks)
    _check_against_float64_reference(args, leaves, seed, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(dtype):
    gen, seed = fresh_generator()
    args, leaves = _problem(gen, 8, 98, 2, 64, 64, dtype=dtype)
    kp, values = kpfast.soft_argmax(*args[:2], beta=args[2])
    assert kp.dtype == dtype and values.dtype == dtype
    _check_against_float64_reference(args, leaves, seed, rtol=1e-2, atol=2e-2)
    grads = torch.autograd.grad(kp.float().sum() + values.float().sum(), leaves[:2])
    assert all(g.dtype == dtype and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("beta", [1.3, "tensor"])
def test_captures_in_a_cuda_graph(beta):
    gen, seed = fresh_generator()
    (heat, readouts, b), _ = _problem(gen, 4, 98, 2, 64, 64)
    heat, readouts = heat.detach(), readouts.detach()
    b = b.detach() if beta == "tensor" else beta
    kpfast.soft_argmax(heat, readouts, beta=b)  # warm-up compiles the kernels
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        kp, values = kpfast.soft_argmax(heat, readouts, beta=b)
    heat.copy_(torch.randn_like(heat))
    graph.replay()
    want_kp, want_v = kpfast.soft_argmax(heat, readouts, beta=b)
    torch.testing.assert_close(kp, want_kp, msg=f"seed {seed}")
    torch.testing.assert_close(values, want_v, msg=f"seed {seed}")


def test_torch_compile_on_cuda():
    gen, seed = fresh_generator()
    (heat, readouts, beta), _ = _problem(gen, 2, 5, 2, 32, 32)

    def f(heat, readouts, beta):
        kp, values = kpfast.soft_argmax(heat, list(readouts.unbind(2)), beta=beta)
        return (kp ** 2).sum() + values.sum()

    got = torch.compile(f, fullgraph=True)(heat, readouts, beta)
    want = f(heat, readouts, beta)
    torch.testing.assert_close(got, want, msg=f"seed {seed}")
    got_g = torch.autograd.grad(got, (heat, readouts, beta))
    want_g = torch.autograd.grad(want, (heat, readouts, beta))
    for a, b in zip(got_g, want_g):
        torch.testing.assert_close(a, b, msg=f"seed {seed}")
