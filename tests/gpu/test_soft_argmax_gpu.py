"""kpfast.soft_argmax checks only a GPU can make (marked `gpu`; skipped without CUDA):
compiled Triton kernels at the paper's and larger sizes, the split-plane path,
half precision, CUDA-graph capture and torch.compile on CUDA."""

from __future__ import annotations

import pytest
import torch

import kpfast
from kpfast.reference import soft_argmax_reference

from _util import seeded_generator

pytestmark = pytest.mark.gpu
DEVICE = "cuda"


def _problem(gen, B, K, C, H, W, dtype=torch.float32, chunks=False, beta_dtype=torch.float32):
    """Peaked heatmaps (a bump per keypoint plus noise, some pixels masked) and readouts."""
    ys = torch.linspace(-1, 1, H).view(1, 1, H, 1)
    xs = torch.linspace(-1, 1, W).view(1, 1, 1, W)
    centre = torch.rand(B, K, 2, 1, 1, generator=gen) * 1.6 - 0.8
    heat = -((xs - centre[:, :, 0]) ** 2 + (ys - centre[:, :, 1]) ** 2) / 0.02 + torch.randn(B, K, H, W, generator=gen)
    heat[torch.rand(B, K, H, W, generator=gen) < 0.05] = float("-inf")
    readouts = torch.randn(B, K, C, H, W, generator=gen)
    beta = torch.tensor(1.5, device=DEVICE, dtype=beta_dtype, requires_grad=True)
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
    gen, seed = seeded_generator()
    args, leaves = _problem(gen, B, K, C, H, W, chunks=chunks)
    _check_against_float64_reference(args, leaves, seed, rtol=1e-4, atol=1e-5)


def test_float64_with_a_float_beta():
    """A float beta reaches the float64 kernels exactly (as its bit pattern), not through a tensor."""
    gen, seed = seeded_generator()
    (heat, readouts, _), (h, r, _) = _problem(gen, 2, 5, 2, 33, 47, dtype=torch.float64, beta_dtype=torch.float64)
    kp, values = kpfast.soft_argmax(heat, readouts, beta=1.3)
    ref_kp, ref_v = soft_argmax_reference(h.detach(), r.detach(), beta=1.3)
    torch.testing.assert_close(kp, ref_kp, rtol=1e-12, atol=1e-13, msg=f"seed {seed}")
    torch.testing.assert_close(values, ref_v, rtol=1e-12, atol=1e-13, msg=f"seed {seed}")


def test_scattered_readouts_and_no_readouts():
    """Separately allocated readouts at uneven distances (the offset-table path), and none."""
    gen, seed = seeded_generator()
    (heat, readouts, beta), _ = _problem(gen, 4, 17, 3, 64, 64)
    spacers, maps = [], []
    for c in range(3):
        maps.append(readouts[:, :, c].detach().clone().requires_grad_())
        spacers.append(torch.empty((c + 1) * (1 << 18) + 1000, device=DEVICE))
    kp, values = kpfast.soft_argmax(heat, maps, beta=beta)
    leaves64 = [t.detach().double().requires_grad_() for t in (heat, *maps)]
    ref_kp, ref_v = soft_argmax_reference(leaves64[0], leaves64[1:], beta=beta.detach().double())
    torch.testing.assert_close(kp.double(), ref_kp, rtol=1e-4, atol=1e-5, msg=f"seed {seed}")
    torch.testing.assert_close(values.double(), ref_v, rtol=1e-4, atol=1e-5, msg=f"seed {seed}")
    gk, gv = torch.randn_like(ref_kp), torch.randn_like(ref_v)
    got = torch.autograd.grad((kp.double() * gk).sum() + (values.double() * gv).sum(), [heat, *maps])
    want = torch.autograd.grad((ref_kp * gk).sum() + (ref_v * gv).sum(), leaves64)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b, rtol=1e-3, atol=1e-4 * (1 + b.abs().max().item()), msg=f"seed {seed}")
    kp_none, none = kpfast.soft_argmax(heat, beta=beta)
    assert none is None
    torch.testing.assert_close(kp_none.double(), ref_kp, rtol=1e-4, atol=1e-5, msg=f"seed {seed}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(dtype):
    gen, seed = seeded_generator()
    args, leaves = _problem(gen, 8, 98, 2, 64, 64, dtype=dtype)
    kp, values = kpfast.soft_argmax(*args[:2], beta=args[2])
    assert kp.dtype == dtype and values.dtype == dtype
    _check_against_float64_reference(args, leaves, seed, rtol=1e-2, atol=2e-2)
    grads = torch.autograd.grad(kp.float().sum() + values.float().sum(), leaves[:2])
    assert all(g.dtype == dtype and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("beta", [1.3, "tensor"])
def test_captures_in_a_cuda_graph(beta):
    gen, seed = seeded_generator()
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


def test_offset_table_first_seen_during_capture():
    """Issue 16.3: the offset table of scattered readouts was copied to the device the first time a
    layout was seen, which crashed when that was during capture."""
    gen, seed = seeded_generator()
    heat = torch.randn(2, 5, 16, 16, device=DEVICE)
    maps, spacers = [], []
    for c in range(3):
        maps.append(torch.randn(2, 5, 16, 16, device=DEVICE))
        spacers.append(torch.empty((c + 1) * 1000 + 17, device=DEVICE))
    kpfast.soft_argmax(heat, [maps[0], maps[2], maps[1]])  # compiles the table variant, another layout
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        kp, values = kpfast.soft_argmax(heat, maps)
    heat.copy_(torch.randn_like(heat))
    graph.replay()
    want_kp, want_v = kpfast.soft_argmax(heat, maps)
    torch.testing.assert_close(kp, want_kp, msg=f"seed {seed}")
    torch.testing.assert_close(values, want_v, msg=f"seed {seed}")


def test_readout_gradient_offsets_past_2_31():
    """Issue 16.4: three list readouts with B*K*H*W = 1.15e9: the backward computed c * g_sc (and
    c * r_sc) in int32, so the third channel's gradient landed 2.3e9 elements off (about 19 GB)."""
    B, K, H, W, C = 1, 1100, 1024, 1024, 3
    gen, seed = seeded_generator()
    heat = torch.randn(B, K, H, W, device=DEVICE, dtype=torch.bfloat16).requires_grad_()
    maps = [torch.randn(B, K, H, W, device=DEVICE, dtype=torch.bfloat16).requires_grad_() for _ in range(C)]
    kp, values = kpfast.soft_argmax(heat, maps)
    gv = torch.randn(values.shape, device=DEVICE)
    grads = torch.autograd.grad((values.float() * gv).sum(), [heat, *maps])
    for k in (0, K - 1):
        w = torch.softmax(heat[0, k].float().flatten(), 0)
        v = [(w * m[0, k].float().flatten()).sum() for m in maps]
        for c in range(C):
            torch.testing.assert_close(grads[1 + c][0, k].float().flatten(), gv[0, k, c] * w, rtol=2e-2, atol=1e-6,
                                       msg=f"d/dreadouts[{c}] row {k} (seed {seed})")
        delta = sum(gv[0, k, c] * (maps[c][0, k].float().flatten() - v[c]) for c in range(C))
        torch.testing.assert_close(grads[0][0, k].float().flatten(), w * delta, rtol=3e-2, atol=1e-5,
                                   msg=f"d/dheatmaps row {k} (seed {seed})")


def test_torch_compile_on_cuda():
    gen, seed = seeded_generator()
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
