"""kpfast.edge_map on a GPU (marked `gpu`; skipped without CUDA): compiled Triton kernels against
the float64 reference at real sizes in every dtype, the NaN rule of compiled min/max, CUDA-graph
capture, torch.compile, and offsets past 2^31 (about 27 GB of GPU memory)."""

from __future__ import annotations

import pytest
import torch

import kpfast
from kpfast.data.skeletons import all_pairs
from kpfast.reference import edge_map_reference

from _util import seeded_generator

pytestmark = pytest.mark.gpu
F64 = torch.float64


def _problem(gen, B, K, edges, H, W, dtype, weight="E", uncertainty=True):
    """Leaves on the GPU in ``dtype`` (sigma2 in the compute dtype) and their float64 copies."""
    E = len(edges)
    leaves = {"keypoints": torch.rand(B, K, 2, generator=gen, dtype=F64) * 1.6 - 0.8}
    if uncertainty:
        leaves["uncertainty"] = torch.randn(B, K, generator=gen, dtype=F64)
    if weight == "E":
        leaves["edge_weight"] = torch.rand(E, generator=gen, dtype=F64) + 0.5
    elif weight == "BE":
        leaves["edge_weight"] = torch.rand(B, E, generator=gen, dtype=F64) + 0.5
    gpu = {k: v.cuda().to(dtype).requires_grad_() for k, v in leaves.items()}
    gpu["sigma2"] = torch.tensor(2.7e-3, device="cuda", dtype=F64 if dtype == F64 else torch.float32, requires_grad=True)
    ref = {k: v.detach().to(F64).requires_grad_() for k, v in gpu.items()}
    return gpu, ref, torch.tensor(edges, device="cuda"), (H, W)


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| (in float64)."""
    a, b = a.detach().to(F64), b.detach().to(F64)
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def _reference_through_winner(ref, edges, size, mode, winner, grad):
    """The reference's gradient with each pixel's gradient routed to the kernel's winning edge (the
    kernel's own winner map), and the per-edge reference values ``[B, E, H, W]`` in float64.

    Comparing with the plain reference is flaky on a GPU: where two edges tie within rounding
    (approximate exp/div) the kernel may pick the other one, which moves that pixel's whole
    gradient to other keypoints (issue 16.8)."""
    leaves = list(ref.values())
    total = [torch.zeros_like(t) for t in leaves]
    values = []
    w = ref.get("edge_weight")
    for e in range(edges.shape[0]):
        one = edge_map_reference(ref["keypoints"], edges[e:e + 1], size, uncertainty=ref.get("uncertainty"),
                                 edge_weight=None if w is None else w[..., e:e + 1], sigma2=ref["sigma2"], mode=mode)
        values.append(one.detach())
        mine = winner == e
        if bool(mine.any()):
            parts = torch.autograd.grad((one * grad * mine).sum(), leaves, allow_unused=True)
            total = [t if p is None else t + p for t, p in zip(total, parts)]
    return total, torch.stack(values, 1)


CASES = [
    # name, B, K, edges, H, W, dtype, mode, weight, uncertainty
    ("all-pairs fp32 intensity", 16, 32, all_pairs(32), 128, 128, torch.float32, "intensity", "E", True),
    ("all-pairs fp32 precision w[B,E]", 16, 32, all_pairs(32), 128, 128, torch.float32, "precision", "BE", True),
    ("all-pairs bf16", 16, 32, all_pairs(32), 128, 128, torch.bfloat16, "intensity", "E", True),
    ("all-pairs fp16 precision", 8, 32, all_pairs(32), 128, 128, torch.float16, "precision", "E", True),
    ("all-pairs fp32 no logits, no weights", 8, 32, all_pairs(32), 128, 128, torch.float32, "intensity", None, False),
    ("partial tiles fp32", 4, 24, all_pairs(24), 129, 67, torch.float32, "intensity", "E", True),
    ("chain of 98 at 256x256 fp32", 16, 98, [(i, i + 1) for i in range(97)], 256, 256, torch.float32, "intensity", "E", True),
    ("all-pairs fp64 precision w[B,E]", 4, 16, all_pairs(16), 64, 61, F64, "precision", "BE", True),
]
TOLERANCES = {F64: (1e-9, 1e-8, 1e-12), torch.float32: (2e-5, 2e-3, 1e-5)}  # output, gradient, winner gap
HALF = (1.5e-2, 3e-2, 1e-5)


@pytest.mark.parametrize("name, B, K, edges, H, W, dtype, mode, weight, uncertainty", CASES, ids=[c[0] for c in CASES])
def test_matches_the_float64_reference_through_its_winner_map(name, B, K, edges, H, W, dtype, mode, weight, uncertainty):
    gen, seed = seeded_generator()
    gpu, ref, e, size = _problem(gen, B, K, edges, H, W, dtype, weight, uncertainty)
    kw = lambda d: dict(uncertainty=d.get("uncertainty"), edge_weight=d.get("edge_weight"), sigma2=d["sigma2"], mode=mode)  # noqa: E731
    out = kpfast.edge_map(gpu["keypoints"], e, size, **kw(gpu))
    want = edge_map_reference(ref["keypoints"], e, size, **kw(ref))
    out_tol, grad_tol, gap_tol = TOLERANCES.get(dtype, HALF)
    assert out.dtype == dtype
    assert (out.to(F64) - want).abs().max().item() <= out_tol * (1 + want.abs().max().item()), f"forward (seed {seed})"

    grad = torch.randn(out.shape, generator=gen, dtype=F64).cuda()
    got = torch.autograd.grad((out.to(F64) * grad).sum(), list(gpu.values()))
    with torch.no_grad():
        _, winner = torch.ops.kpfast.edge_map(gpu["keypoints"], e, H, W, gpu.get("uncertainty"), gpu.get("edge_weight"),
                                              gpu["sigma2"], 0.0, mode == "precision", "auto", True)
    routed, per_edge = _reference_through_winner(ref, e, size, mode, winner, grad)
    best = per_edge.max(1).values
    chosen = per_edge.gather(1, winner.long().clamp_min(0)[:, None]).squeeze(1)
    assert (best - chosen).max().item() <= gap_tol, f"the kernel's winner is not a maximal edge (seed {seed})"
    for leaf, g, r in zip(gpu, got, routed):
        assert g.dtype == gpu[leaf].dtype
        assert _relative_error(g, r) <= grad_tol, f"d/d{leaf}: {_relative_error(g, r):.3g} (seed {seed})"


@pytest.mark.parametrize("mode", ["intensity", "precision"])
@pytest.mark.parametrize("where", ["uncertainty", "keypoints", "edge_weight"])
def test_nan_follows_the_reference_with_compiled_min_max(mode, where):
    """Compiled tl.maximum/tl.minimum drop a NaN operand (PTX max.f32): tile culling must not turn a
    NaN edge's pixels finite (issue 16.2: 2048 NaN pixels of 4096 at 64 x 64, a NaN logit)."""
    kp = torch.tensor([[[-0.6, -0.6], [0.6, -0.6], [0.0, 0.7], [0.5, 0.7]]], dtype=F64)
    unc = torch.zeros(1, 4, dtype=F64)
    w = torch.ones(2, dtype=F64)
    {"keypoints": kp[0, 3], "uncertainty": unc[0, 3:4], "edge_weight": w[1:2]}[where][0] = float("nan")
    leaves = [t.cuda().float().requires_grad_() for t in (kp, unc, w)]
    edges = torch.tensor([(0, 1), (2, 3)], device="cuda")
    out = kpfast.edge_map(leaves[0], edges, 64, uncertainty=leaves[1], edge_weight=leaves[2], sigma2=0.01, mode=mode)
    got = torch.autograd.grad(out.sum(), leaves)
    ref_leaves = [t.detach().cpu().double().requires_grad_() for t in leaves]
    ref = edge_map_reference(ref_leaves[0], edges.cpu(), 64, uncertainty=ref_leaves[1], edge_weight=ref_leaves[2],
                             sigma2=0.01, mode=mode)
    want = torch.autograd.grad(ref.sum(), ref_leaves)
    assert torch.equal(torch.isnan(out).cpu(), torch.isnan(ref)), f"{int(torch.isnan(out).sum())} NaN pixels, reference {int(torch.isnan(ref).sum())}"
    for g, r in zip(got, want):
        assert torch.equal(torch.isnan(g).cpu(), torch.isnan(r))


@pytest.mark.parametrize("sigma2", ["float", "tensor"])
@pytest.mark.parametrize("edges_as", ["list", "tensor"])
def test_captures_in_a_cuda_graph_and_replays_new_inputs(sigma2, edges_as):
    """Issue 16.3: capture crashed with a float sigma2 (the default), copied to the device per call."""
    gen, seed = seeded_generator()
    gpu, _, edges, _ = _problem(gen, 8, 32, all_pairs(32), 128, 128, torch.float32)
    kp, unc, w = (gpu[k].detach() for k in ("keypoints", "uncertainty", "edge_weight"))
    s2 = 2.7e-3 if sigma2 == "float" else torch.tensor(2.7e-3, device="cuda")
    e = all_pairs(32) if edges_as == "list" else edges
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: compiles the kernels, copies a list of edges once
        kpfast.edge_map(kp, e, 128, uncertainty=unc, edge_weight=w, sigma2=s2)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = kpfast.edge_map(kp, e, 128, uncertainty=unc, edge_weight=w, sigma2=s2)
    kp.copy_(torch.rand_like(kp) * 1.6 - 0.8)
    graph.replay()
    torch.testing.assert_close(out, kpfast.edge_map(kp, e, 128, uncertainty=unc, edge_weight=w, sigma2=s2), msg=f"seed {seed}")


def test_torch_compile_on_cuda():
    gen, seed = seeded_generator()
    gpu, _, edges, _ = _problem(gen, 2, 32, all_pairs(32), 64, 64, torch.float32)

    def f(kp, unc, w):
        return (kpfast.edge_map(kp, edges, 64, uncertainty=unc, edge_weight=w, sigma2=2.7e-3) ** 2).sum()

    args = [gpu[k] for k in ("keypoints", "uncertainty", "edge_weight")]
    got = torch.compile(f, fullgraph=True)(*args)
    want = f(*args)
    torch.testing.assert_close(got, want, msg=f"seed {seed}")
    for a, b in zip(torch.autograd.grad(got, args), torch.autograd.grad(want, args)):
        torch.testing.assert_close(a, b, msg=f"seed {seed}")


def test_batch_past_the_grid_limit_of_65535():
    """Issue 16.4: B sat on grid axis 1, which CUDA caps at 65535."""
    gen, seed = seeded_generator()
    B = 70_000
    kp = (torch.rand(B, 3, 2, generator=gen) * 1.6 - 0.8).cuda().requires_grad_()
    out = kpfast.edge_map(kp, [(0, 1), (1, 2)], (4, 5), sigma2=0.05)
    (g,) = torch.autograd.grad(out.sum(), kp)
    some = torch.tensor([0, 1, B // 2, B - 1])
    ref_kp = kp.detach()[some].cpu().double().requires_grad_()
    ref = edge_map_reference(ref_kp, [(0, 1), (1, 2)], (4, 5), sigma2=0.05)
    torch.testing.assert_close(out[some].cpu().double(), ref, rtol=1e-5, atol=1e-6, msg=f"seed {seed}")
    torch.testing.assert_close(g[some].cpu().double(), torch.autograd.grad(ref.sum(), ref_kp)[0], rtol=1e-4, atol=1e-5)


def test_pixel_offsets_past_2_31():
    """Issue 16.4: B*H*W = 2.19e9 wrapped the int32 pixel offsets for the last rows of sample 2.
    Three identical samples: forward and gradients must agree (about 27 GB)."""
    B, H, W = 3, 27000, 27000
    kp = torch.tensor([[[-0.9, -0.9], [0.9, 0.95]]], device="cuda").expand(B, 2, 2).contiguous().requires_grad_()
    out = kpfast.edge_map(kp, [(0, 1)], (H, W), sigma2=1e-3)
    rows = torch.tensor([0, H // 2, 25000, 26000, H - 1], device="cuda")
    for b in (1, 2):
        assert torch.equal(out[b, rows], out[0, rows]), f"sample {b}"
    (g,) = torch.autograd.grad(out.sum(), kp)
    del out
    torch.testing.assert_close(g[1:], g[:1].expand(2, 2, 2), rtol=1e-4, atol=0)


def test_partial_sum_offsets_past_2_31():
    """Issue 16.4: the backward's per-(sample, tile, edge) partial sums, B*tiles*E*8 = 2.5e9 (about
    10 GB): the last samples' gradients must match a run of those samples alone."""
    gen, seed = seeded_generator()
    B, K, E = 64, 8, 300_000
    kp = (torch.rand(B, K, 2, generator=gen) * 1.6 - 0.8).cuda().requires_grad_()
    edges = torch.randint(0, K, (E, 2), generator=gen).cuda()
    w = (torch.rand(E, generator=gen) + 0.5).cuda()
    (g,) = torch.autograd.grad(kpfast.edge_map(kp, edges, 128, edge_weight=w, sigma2=2.7e-3).sum(), kp)
    last = kp.detach()[-4:].clone().requires_grad_()
    (g_last,) = torch.autograd.grad(kpfast.edge_map(last, edges, 128, edge_weight=w, sigma2=2.7e-3).sum(), last)
    torch.testing.assert_close(g[-4:], g_last, rtol=1e-5, atol=1e-6, msg=f"seed {seed}")
