"""torch.compile(fullgraph=True) and torch.library.opcheck on the CPU (C++) path,
and the Triton kernels lowered for a real GPU target (sm_90) without a GPU."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import kpfast

from _util import seeded_generator


def edge_map_problem(gen):
    kp = (torch.rand(2, 5, 2, generator=gen) * 2 - 1).requires_grad_()
    unc = torch.randn(2, 5, generator=gen).requires_grad_()
    w = torch.rand(6, generator=gen).requires_grad_()
    s2 = torch.tensor(0.03, requires_grad=True)
    edges = torch.randint(0, 5, (6, 2), generator=gen)
    return kp, edges, unc, w, s2


def test_edge_map_compiles_fullgraph_and_matches_eager():
    gen, seed = seeded_generator()
    kp, edges, unc, w, s2 = edge_map_problem(gen)

    def f(kp, unc, w, s2):
        return kpfast.edge_map(kp, edges, (9, 12), uncertainty=unc, edge_weight=w, sigma2=s2).square().sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    with kpfast.use_backend("cpp"):
        got = compiled(kp, unc, w, s2)
        got_grads = torch.autograd.grad(got, (kp, unc, w, s2))
        want = f(kp, unc, w, s2)
        want_grads = torch.autograd.grad(want, (kp, unc, w, s2))
    torch.testing.assert_close(got, want, msg=f"seed {seed}")
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b, msg=f"seed {seed}")


def test_reference_backend_compiles_fullgraph_and_still_checks_edges():
    """The reference backend's value checks broke torch.compile(fullgraph=True) on a data-dependent guard."""
    gen, seed = seeded_generator()
    kp, edges, unc, w, s2 = edge_map_problem(gen)
    heat, readouts, beta = soft_argmax_problem(gen)

    def f(kp, s2, heat, edges):
        em = kpfast.edge_map(kp, edges, (9, 12), uncertainty=unc, edge_weight=w, sigma2=s2)
        keypoints, values = kpfast.soft_argmax(heat, readouts, beta=beta)
        return em.square().sum() + keypoints.sum() + values.sum()

    with kpfast.use_backend("reference"):
        compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
        got = compiled(kp, s2, heat, edges)
        want = f(kp, s2, heat, edges)
        for a, b in zip(torch.autograd.grad(got, (kp, s2, heat)), torch.autograd.grad(want, (kp, s2, heat))):
            torch.testing.assert_close(a, b, msg=f"seed {seed}")
        with pytest.raises(ValueError, match="edges"):
            compiled(kp, s2, heat, torch.cat([edges[:-1], torch.tensor([[0, 5]])]))
    torch.testing.assert_close(got, want, msg=f"seed {seed}")


@pytest.mark.slow
def test_edge_map_compiles_with_inductor():
    gen, seed = seeded_generator()
    kp, edges, unc, w, s2 = edge_map_problem(gen)

    def f(kp, unc, w, s2):
        return (kpfast.edge_map(kp, edges, (9, 12), uncertainty=unc, edge_weight=w, sigma2=s2) * 2 + 1).sum()

    with kpfast.use_backend("cpp"):
        got = torch.compile(f, fullgraph=True)(kp, unc, w, s2)
        want = f(kp, unc, w, s2)
    torch.testing.assert_close(got, want, msg=f"seed {seed}")


def test_edge_map_opcheck():
    gen, _ = seeded_generator()
    kp, edges, unc, w, s2 = edge_map_problem(gen)
    for args in [
        (kp, edges, 7, 9, unc, w, s2, 0.0, False, "cpp", True),
        (kp, edges, 7, 9, None, None, None, 0.05, True, "cpp", False),
        (kp.detach().double().requires_grad_(), edges, 4, 3, None, w.detach().double()[None].expand(2, -1).contiguous(), s2.detach().double(), 0.0, False, "cpp", True),
    ]:
        torch.library.opcheck(torch.ops.kpfast.edge_map.default, args)
    torch.library.opcheck(torch.ops.kpfast.edge_map_checked_edges.default, (edges, 5, s2, True))


@pytest.mark.slow
def test_triton_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "kpfast.kernels.gpu_compile", "90"], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # every variant compiles, and no float32 or bfloat16 one spills (gpu_compile fails those)
    assert "FAIL" not in proc.stdout and proc.stdout.count("ok ") >= 1, proc.stdout


def test_ptxas_report_gives_registers_and_spills():
    from kpfast.kernels.gpu_compile import ptxas_usage

    log = ("ptxas info    : Compiling entry function '_umeyama_bwd_kernel' for 'sm_90a'\n"
           "ptxas info    : Function properties for _umeyama_bwd_kernel\n"
           "    160 bytes stack frame, 160 bytes spill stores, 160 bytes spill loads\n"
           "ptxas info    : Used 255 registers, used 0 barriers, 160 bytes cumulative stack size\n")
    assert ptxas_usage(log) == (255, 160)
    with pytest.raises(ValueError, match="register report"):
        ptxas_usage("")


def soft_argmax_problem(gen, dtype=torch.float32):
    heat = (torch.randn(2, 3, 5, 7, generator=gen) * 2).to(dtype).requires_grad_()
    readouts = torch.randn(2, 3, 2, 5, 7, generator=gen).to(dtype).requires_grad_()
    beta = torch.tensor(1.3, dtype=dtype, requires_grad=True)
    return heat, readouts, beta


@pytest.mark.parametrize("as_list", [False, True])
def test_soft_argmax_compiles_fullgraph_and_matches_eager(as_list):
    gen, seed = seeded_generator()
    heat, readouts, beta = soft_argmax_problem(gen)

    def f(heat, readouts, beta):
        r = list(readouts.unbind(2)) if as_list else readouts
        kp, values = kpfast.soft_argmax(heat, r, beta=beta)
        kp2, _ = kpfast.soft_argmax(heat * 2, beta=0.5)
        return kp.square().sum() + values.sum() + kp2.sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    with kpfast.use_backend("cpp"):
        got = compiled(heat, readouts, beta)
        got_grads = torch.autograd.grad(got, (heat, readouts, beta))
        want = f(heat, readouts, beta)
        want_grads = torch.autograd.grad(want, (heat, readouts, beta))
    torch.testing.assert_close(got, want, msg=f"seed {seed}")
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b, msg=f"seed {seed}")


def part_problem(gen, dtype=torch.float32):
    pts = torch.randn(3, 6, 3, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()
    w = (torch.rand(3, 6, generator=gen, dtype=torch.float64) + 0.1).to(dtype).requires_grad_()
    parts = torch.tensor([[1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    return pts, parts, w


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_umeyama_and_part_alignment_compile_fullgraph_and_match_eager(backend):
    gen, seed = seeded_generator()
    pts, parts, w = part_problem(gen)

    def f(pts, w):
        r_detached = kpfast.part_alignment(pts, parts, w)
        r_full = kpfast.part_alignment(pts, parts, w, scale=False, detach_transform=False)
        R, s, t = kpfast.umeyama(pts[1:], pts[:1], w[1:])  # broadcasting batch dims
        return r_detached.min(1).values.sum() + r_full.sum() + R.sum() + s.sum() + t.square().sum()

    compiled = torch.compile(f, fullgraph=True, backend=backend)
    with kpfast.use_backend("cpp"):
        got = compiled(pts, w)
        got_grads = torch.autograd.grad(got, (pts, w))
        want = f(pts, w)
        want_grads = torch.autograd.grad(want, (pts, w))
    torch.testing.assert_close(got, want, msg=f"seed {seed}")
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b, msg=f"seed {seed}")


@pytest.mark.slow
def test_soft_argmax_compiles_with_inductor():
    gen, seed = seeded_generator()
    heat, readouts, beta = soft_argmax_problem(gen)

    def f(heat, readouts, beta):
        kp, values = kpfast.soft_argmax(heat.sigmoid(), readouts, beta=beta)
        return (kp * 2 + 1).sum() + values.exp().sum()

    with kpfast.use_backend("cpp"):
        got = torch.compile(f, fullgraph=True)(heat, readouts, beta)
        got_grads = torch.autograd.grad(got, (heat, readouts, beta))
        want = f(heat, readouts, beta)
        want_grads = torch.autograd.grad(want, (heat, readouts, beta))
    torch.testing.assert_close(got, want, msg=f"seed {seed}")
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b, msg=f"seed {seed}")


def test_soft_argmax_opcheck():
    gen, _ = seeded_generator()
    heat, readouts, beta = soft_argmax_problem(gen)
    h64, r64 = heat.detach().double().requires_grad_(), readouts.detach().double().requires_grad_()
    for args in [
        (heat, [readouts], True, beta, 0.0, "cpp"),
        (heat, list(readouts.unbind(2)), False, None, 0.7, "cpp"),
        (heat, [], False, None, 1.0, "cpp"),
        (h64, [r64[:, :, 0]], False, beta.detach().double().requires_grad_(), 0.0, "cpp"),
    ]:
        torch.library.opcheck(torch.ops.kpfast.soft_argmax.default, args)
    with kpfast.use_backend("cpp"):
        kp, values, stats = torch.ops.kpfast.soft_argmax(heat, [readouts], True, beta, 0.0, "cpp")
    gk, gv = torch.randn(kp.shape, generator=gen), torch.randn(values.shape, generator=gen)
    for need in [(True, True, True), (False, True, False), (True, False, True)]:
        torch.library.opcheck(
            torch.ops.kpfast.soft_argmax_backward.default,
            (gk, gv, heat.detach(), [readouts.detach()], True, beta.detach(), 0.0, kp.detach(), values.detach(),
             stats.detach(), *need, "cpp"),
        )


def test_umeyama_and_part_alignment_opcheck():
    gen, _ = seeded_generator()
    pts, parts, w = part_problem(gen)
    pts64, w64 = pts.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    for args in [
        (pts, parts, w, True, False, "cpp"),
        (pts64, parts, None, False, True, "cpp"),
        (pts64[..., :2].detach().requires_grad_(), parts, w64, True, True, "cpp"),
    ]:
        torch.library.opcheck(torch.ops.kpfast.part_alignment.default, args)
    src, dst = pts[:2], pts[1:]
    for args in [
        (src, dst, w[:2], True, "cpp"),
        (pts64[:2, :, :2].detach().requires_grad_(), pts64[1:, :, :2].detach(), None, False, "cpp"),
    ]:
        torch.library.opcheck(torch.ops.kpfast.umeyama.default, args)
