"""Checks only a GPU can make (marked `gpu`; skipped without CUDA): compiled Triton
kernels at real sizes, half precision, CUDA-graph capture, torch.compile on CUDA."""

from __future__ import annotations

import pytest
import torch

import kpfast
from kpfast.data.skeletons import all_pairs
from kpfast.reference import edge_map_reference

from _util import fresh_generator

pytestmark = pytest.mark.gpu


def _autolink_problem(gen, B=8, K=32, size=128, dtype=torch.float32):
    kp = (torch.rand(B, K, 2, generator=gen) * 1.6 - 0.8).cuda().to(dtype).requires_grad_()
    unc = torch.randn(B, K, generator=gen).cuda().to(dtype).requires_grad_()
    w = (torch.rand(len(all_pairs(K)), generator=gen) + 0.5).cuda().to(dtype).requires_grad_()
    edges = torch.tensor(all_pairs(K), device="cuda")
    return kp, edges, unc, w


@pytest.mark.parametrize("mode", ["intensity", "precision"])
def test_edge_map_triton_matches_reference_at_autolink_size(mode):
    gen, seed = fresh_generator()
    kp, edges, unc, w = _autolink_problem(gen)
    out = kpfast.edge_map(kp, edges, 128, uncertainty=unc, edge_weight=w, sigma2=2.7e-3, mode=mode)
    ref = edge_map_reference(kp, edges, 128, uncertainty=unc, edge_weight=w, sigma2=2.7e-3, mode=mode)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5, msg=f"seed {seed}")
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (kp, unc, w), g)
    want = torch.autograd.grad(ref, (kp, unc, w), g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3 * (1 + b.abs().max().item()), msg=f"seed {seed}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_edge_map_half_precision_on_triton(dtype):
    gen, seed = fresh_generator()
    kp, edges, unc, w = _autolink_problem(gen, dtype=dtype)
    out = kpfast.edge_map(kp, edges, 128, uncertainty=unc, edge_weight=w, sigma2=2.7e-3)
    assert out.dtype == dtype
    ref = edge_map_reference(kp.float(), edges, 128, uncertainty=unc.float(), edge_weight=w.float(), sigma2=2.7e-3)
    torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2, msg=f"seed {seed}")
    grads = torch.autograd.grad(out.float().sum(), (kp, unc, w))
    assert all(g.dtype == dtype and torch.isfinite(g).all() for g in grads)


def test_edge_map_captures_in_a_cuda_graph():
    gen, seed = fresh_generator()
    kp, edges, unc, w = _autolink_problem(gen)
    kp, unc, w = kp.detach(), unc.detach(), w.detach()
    s2 = torch.tensor(2.7e-3, device="cuda")
    kpfast.edge_map(kp, edges, 128, uncertainty=unc, edge_weight=w, sigma2=s2)  # warm-up compiles the kernels
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = kpfast.edge_map(kp, edges, 128, uncertainty=unc, edge_weight=w, sigma2=s2)
    kp.copy_(torch.rand_like(kp) * 1.6 - 0.8)
    graph.replay()
    torch.testing.assert_close(out, kpfast.edge_map(kp, edges, 128, uncertainty=unc, edge_weight=w, sigma2=s2), msg=f"seed {seed}")


def test_edge_map_torch_compile_on_cuda():
    gen, seed = fresh_generator()
    kp, edges, unc, w = _autolink_problem(gen, B=2)

    def f(kp, unc, w):
        return (kpfast.edge_map(kp, edges, 64, uncertainty=unc, edge_weight=w, sigma2=2.7e-3) ** 2).sum()

    got = torch.compile(f, fullgraph=True)(kp, unc, w)
    torch.testing.assert_close(got, f(kp, unc, w), msg=f"seed {seed}")
