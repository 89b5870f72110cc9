"""kpfast.umeyama: parity of every kernel with the float64 reference and with roma,
gradients (gradcheck, coinciding singular values), degenerate point sets, validation."""

from __future__ import annotations

import math

import pytest
import roma
import torch

import kpfast
from kpfast.reference import umeyama_reference

from _util import assert_close, device_for, seeded_generator, kernel_backends, run, tolerances

BACKENDS = kernel_backends()


def random_rotation(gen, n, D, dtype=torch.float64):
    q, r = torch.linalg.qr(torch.randn(n, D, D, generator=gen, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1)).unsqueeze(-2)
    q[torch.linalg.det(q) < 0, :, 0] *= -1
    return q.to(dtype)


def make_problem(gen, *, N=12, M=7, D=3, dtype=torch.float64, weights=True, reflect=True, noise=0.1):
    """Targets = a random similarity of the sources plus noise; a third of them mirrored."""
    src = torch.randn(N, M, D, generator=gen, dtype=torch.float64)
    R = random_rotation(gen, N, D)
    s = torch.rand(N, generator=gen, dtype=torch.float64) * 2 + 0.5
    t = torch.randn(N, D, generator=gen, dtype=torch.float64)
    dst = s[:, None, None] * src @ R.mT + t[:, None] + noise * torch.randn(N, M, D, generator=gen, dtype=torch.float64)
    if reflect:
        dst[: N // 3, :, 0] *= -1
    w = torch.rand(N, M, generator=gen, dtype=torch.float64) + 0.05 if weights else None
    cast = lambda v: None if v is None else v.to(dtype)  # noqa: E731
    return cast(src), cast(dst), cast(w)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("D", [2, 3])
@pytest.mark.parametrize("weights", [False, True])
@pytest.mark.parametrize("scale", [False, True])
def test_matches_reference_forward_and_backward(backend, dtype, D, weights, scale):
    gen, seed = seeded_generator()
    src, dst, w = make_problem(gen, D=D, dtype=dtype, weights=weights)
    dev = device_for(backend)
    leaves = [v.to(dev).requires_grad_() for v in (src, dst, w) if v is not None]
    out = run(backend, kpfast.umeyama, leaves[0], leaves[1], leaves[2] if weights else None, scale=scale)
    ref_leaves = [v.detach().cpu().requires_grad_() for v in leaves]
    ref = umeyama_reference(ref_leaves[0], ref_leaves[1], ref_leaves[2] if weights else None, scale=scale)
    tol = tolerances(dtype) if dtype == torch.float64 else dict(rtol=1e-4, atol=2e-5)
    for name, a, b in zip("Rst", out, ref):
        assert a.dtype == dtype and a.shape == b.shape
        assert_close(a.detach().cpu(), b.detach(), **tol, what=name, seed=seed)
    assert torch.allclose(torch.linalg.det(out[0].detach().cpu().double()), torch.ones(12, dtype=torch.float64), atol=1e-5)
    grads = [torch.randn(o.shape, generator=gen, dtype=torch.float64).to(dtype) for o in out]
    got = torch.autograd.grad(sum((o * g.to(dev)).sum() for o, g in zip(out, grads)), leaves)
    want = torch.autograd.grad(sum((o * g).sum() for o, g in zip(ref, grads) if o.requires_grad), ref_leaves)
    for name, a, b in zip(("src", "dst", "weights"), got, want):
        scale_ = 1.0 + b.abs().max().item()
        assert_close(a.cpu(), b, rtol=tol["rtol"] * 10, atol=tol["atol"] * 10 * scale_, what=f"d/d{name}", seed=seed)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("D", [2, 3])
def test_matches_roma(backend, D):
    """roma minimizes sum_m w_m |s R x_m + t - y_m|^2 with w (not w^2): the same fit."""
    gen, seed = seeded_generator()
    src, dst, w = make_problem(gen, N=20, D=D, noise=0.3)
    dev = device_for(backend)
    R, s, t = run(backend, kpfast.umeyama, src.to(dev), dst.to(dev), w.to(dev))
    R2, t2, s2 = roma.rigid_points_registration(src, dst, weights=w, compute_scaling=True)
    assert_close(R.cpu(), R2, rtol=1e-9, atol=1e-9, what="R vs roma", seed=seed)
    assert_close(s.cpu(), s2, rtol=1e-9, atol=1e-9, what="s vs roma", seed=seed)
    assert_close(t.cpu(), t2, rtol=1e-9, atol=1e-9, what="t vs roma", seed=seed)
    R, s, t = run(backend, kpfast.umeyama, src.to(dev), dst.to(dev), w.to(dev), scale=False)
    R2, t2 = roma.rigid_points_registration(src, dst, weights=w)
    assert_close(R.cpu(), R2, rtol=1e-9, atol=1e-9, what="R vs roma (rigid)", seed=seed)
    assert_close(t.cpu(), t2, rtol=1e-9, atol=1e-9, what="t vs roma (rigid)", seed=seed)
    assert torch.all(s == 1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_recovers_exact_similarity_and_broadcasts_batch_dims(backend):
    gen, seed = seeded_generator()
    dev = device_for(backend)
    template = torch.randn(6, 3, generator=gen, dtype=torch.float64)  # [M, D], broadcast against [2, 3, M, D]
    R = random_rotation(gen, 6, 3).reshape(2, 3, 3, 3)
    s = torch.rand(2, 3, generator=gen, dtype=torch.float64) + 0.5
    t = torch.randn(2, 3, 3, generator=gen, dtype=torch.float64)
    dst = s[..., None, None] * template @ R.mT + t.unsqueeze(-2)
    w = torch.rand(6, generator=gen, dtype=torch.float64) + 0.1
    R_, s_, t_ = run(backend, kpfast.umeyama, template.to(dev), dst.to(dev), w.to(dev))
    assert R_.shape == (2, 3, 3, 3) and s_.shape == (2, 3) and t_.shape == (2, 3, 3)
    assert_close(R_.cpu(), R, rtol=1e-9, atol=1e-10, what="R", seed=seed)
    assert_close(s_.cpu(), s, rtol=1e-9, atol=1e-10, what="s", seed=seed)
    assert_close(t_.cpu(), t, rtol=1e-9, atol=1e-10, what="t", seed=seed)
    R1, s1, t1 = run(backend, kpfast.umeyama, template.to(dev), dst[0, 0].to(dev))  # no batch dims
    assert R1.shape == (3, 3) and s1.shape == () and t1.shape == (3,)
    assert_close(s1.cpu(), s[0, 0], rtol=1e-9, atol=1e-10, what="unbatched s", seed=seed)


@pytest.mark.parametrize("backend,scale", [("cpp", False), ("cpp", True)] + [(b, True) for b in BACKENDS[1:]])
def test_gradcheck_float64(backend, scale):
    gen, seed = seeded_generator()
    dev = device_for(backend)
    for D in (2, 3) if backend == "cpp" else (3,):  # the interpreter is slow; D = 2 has parity tests there
        src, dst, w = make_problem(gen, N=3, M=5, D=D, noise=0.3)
        leaves = [v.to(dev).requires_grad_() for v in (src, dst, w)]
        with kpfast.use_backend(backend):
            ok = torch.autograd.gradcheck(lambda a, b, c: kpfast.umeyama(a, b, c, scale=scale), leaves,
                                          eps=1e-6, atol=1e-6, rtol=1e-4, fast_mode=backend == "triton")
        assert ok, f"gradcheck D={D} (seed {seed})"


@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
def test_tetrahedron_aligned_to_itself_has_finite_gradients(backend):
    """All three singular values coincide: torch.linalg.svd's backward gives NaN, ours does not."""
    gen, seed = seeded_generator()
    dev = device_for(backend)
    R0 = random_rotation(gen, 1, 3)[0]
    tet = torch.tensor([[1.0, 1, 1], [1, -1, -1], [-1, 1, -1], [-1, -1, 1]], dtype=torch.float64) @ R0.T
    src = tet.clone().to(dev).requires_grad_()
    dst = (2 * tet + 1).to(dev).requires_grad_()
    R, s, t = run(backend, kpfast.umeyama, src, dst)
    assert_close(R.detach().cpu(), torch.eye(3, dtype=torch.float64), rtol=0, atol=1e-12, what="R", seed=seed)
    assert abs(s.item() - 2) < 1e-12
    loss = (R * torch.randn(3, 3, generator=gen, dtype=torch.float64).to(dev)).sum() + s + t.sum()
    for g in torch.autograd.grad(loss, (src, dst), retain_graph=True):
        assert torch.isfinite(g).all(), f"non-finite gradient (seed {seed})"
    if backend != "reference":  # and the same numbers as the reference's implicit-function gradient
        src_r, dst_r = src.detach().cpu().requires_grad_(), dst.detach().cpu().requires_grad_()
        Rr, sr, tr = umeyama_reference(src_r, dst_r)
        gen2 = torch.Generator().manual_seed(seed)
        W = torch.randn(3, 3, generator=gen2, dtype=torch.float64)
        got = torch.autograd.grad(((R * W.to(dev)).sum() + s + t.sum()), (src, dst))
        want = torch.autograd.grad((Rr * W).sum() + sr + tr.sum(), (src_r, dst_r))
        for a, b in zip(got, want):
            assert_close(a.cpu(), b, rtol=1e-8, atol=1e-10, what="tetrahedron gradient", seed=seed)


def degenerate_cases(gen, D):
    """Named (src, dst, weights) point sets whose fit is defined by a special rule."""
    x = torch.randn(5, D, generator=gen, dtype=torch.float64)
    y = torch.randn(5, D, generator=gen, dtype=torch.float64)
    direction = torch.randn(D, generator=gen, dtype=torch.float64)
    line = x[:1] + torch.linspace(-1, 1, 5, dtype=torch.float64)[:, None] * direction
    cases = {
        "one point": (x[:1], y[:1], None),
        "coincident source": (x[:1].expand(5, D).clone(), y, None),
        "coincident target": (x, y[:1].expand(5, D).clone(), None),
        "all-zero weights": (x, y, torch.zeros(5, dtype=torch.float64)),
        "one nonzero weight": (x, y, torch.tensor([0.0, 0.0, 2.0, 0.0, 0.0], dtype=torch.float64)),
        "two points": (x[:2], y[:2], None),
        "collinear source": (line, y, None),
        "collinear target": (x, line, None),
        "no points": (x[:0], y[:0], None),
    }
    return cases


@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
@pytest.mark.parametrize("D", [2, 3])
def test_degenerate_point_sets_follow_the_documented_rules(backend, D):
    gen, seed = seeded_generator()
    dev = device_for(backend)
    eye = torch.eye(D, dtype=torch.float64)
    for name, (src, dst, w) in degenerate_cases(gen, D).items():
        for scale in (True, False) if backend != "triton" else (True,):  # the interpreter is slow
            a = src.clone().to(dev).requires_grad_()
            b = dst.clone().to(dev).requires_grad_()
            c = None if w is None else w.clone().to(dev).requires_grad_()
            R, s, t = run(backend, kpfast.umeyama, a, b, c, scale=scale)
            Rr, sr, tr = umeyama_reference(src, dst, w, scale=scale)
            what = f"{name}, scale={scale}"
            for got, want, n in ((R, Rr, "R"), (s, sr, "s"), (t, tr, "t")):
                assert torch.isfinite(got).all(), f"{what}: non-finite {n} (seed {seed})"
                assert_close(got.detach().cpu(), want, rtol=1e-7, atol=1e-9, what=f"{what}: {n}", seed=seed)
            assert abs(torch.linalg.det(R.detach().cpu()).item() - 1) < 1e-9
            ww = torch.ones(src.shape[0], dtype=torch.float64) if w is None else w
            W = ww.sum()
            mu_s = (ww[:, None] * src).sum(0) / W if W > 0 else torch.zeros(D, dtype=torch.float64)
            mu_d = (ww[:, None] * dst).sum(0) / W if W > 0 else torch.zeros(D, dtype=torch.float64)
            if name in ("one point", "coincident source", "all-zero weights", "one nonzero weight", "no points"):
                assert torch.equal(R.detach().cpu(), eye) and s.item() == 1, what
                assert_close(t.detach().cpu(), mu_d - mu_s, rtol=1e-9, atol=1e-12, what=f"{what}: t", seed=seed)
            if name == "coincident target":
                assert torch.equal(R.detach().cpu(), eye) and s.item() == (0.0 if scale else 1.0), what
            if name in ("two points", "collinear source") and D == 3:
                # the smallest rotation carrying the source line onto the target's best-fit direction
                d_src = src[-1] - src[0]
                mapped = R.detach().cpu() @ d_src
                angle = torch.arccos((mapped @ d_src / d_src.square().sum()).clamp(-1, 1))
                axis = torch.linalg.cross(d_src, mapped)
                if angle > 1e-6:  # R rotates about the axis perpendicular to both lines
                    Rrot = R.detach().cpu()
                    assert abs(torch.trace(Rrot) - (1 + 2 * torch.cos(angle))) < 1e-7, what
                    assert_close(Rrot @ axis, axis, rtol=1e-7, atol=1e-9, what=f"{what}: axis", seed=seed)
            loss = (R * torch.randn(R.shape, generator=gen, dtype=torch.float64).to(dev)).sum() + 2 * s + t.sum()
            if loss.requires_grad:
                for g in torch.autograd.grad(loss, [v for v in (a, b, c) if v is not None], allow_unused=True):
                    assert g is None or torch.isfinite(g).all(), f"{what}: non-finite gradient (seed {seed})"


@pytest.mark.parametrize("backend", ["cpp"] + (["triton"] if torch.cuda.is_available() else []))
def test_half_precision_inputs(backend):
    """float16/bfloat16 in, computed in float32, results in the input dtype (Triton only on a GPU:
    the interpreter computes half-precision arithmetic wrongly)."""
    gen, seed = seeded_generator()
    src, dst, w = make_problem(gen, D=3, noise=0.05)
    ref = umeyama_reference(src, dst, w)
    for dtype in (torch.float16, torch.bfloat16):
        out = run(backend, kpfast.umeyama, src.to(dtype), dst.to(dtype), w.to(dtype))
        ref = umeyama_reference(src.to(dtype), dst.to(dtype), w.to(dtype))
        for a, b in zip(out, ref):
            assert a.dtype == dtype
            assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2, what=str(dtype), seed=seed)


@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
def test_nan_inputs_give_nan_outputs(backend):
    gen, _ = seeded_generator()
    src, dst, w = make_problem(gen, N=4, D=3)
    src[1, 2, 0] = float("nan")
    R, s, t = run(backend, kpfast.umeyama, src, dst, w)
    assert torch.isnan(s[1]) and torch.isnan(t[1]).any()
    assert torch.isfinite(R[[0, 2, 3]]).all() and torch.isfinite(s[[0, 2, 3]]).all()


def non_finite_problems():
    """Problems 1, 3, 5, 7 and 9 each hold one NaN or infinite input (some of them degenerate
    sets, one at a zero weight); the others are clean."""
    gen = torch.Generator().manual_seed(11)
    src, dst, w = make_problem(gen, N=10, M=5, D=3)
    nan, inf = float("nan"), float("inf")
    src[1, 2, 0] = nan
    dst[3, 4, 1] = -inf
    w[5, 0] = nan
    w[7, 3] = inf
    w[9, 1] = 0.0
    src[9, 1, 2] = nan  # at a zero weight
    src[8] = src[8, :1]  # a clean degenerate problem (coincident source)
    src[1] = torch.where(torch.isnan(src[1]), src[1], src[1, :1])  # degenerate and NaN
    bad = torch.zeros(10, dtype=torch.bool)
    bad[[1, 3, 5, 7, 9]] = True
    return src, dst, w, bad


@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
@pytest.mark.parametrize("scale", [True, False])
def test_non_finite_input_gives_a_nan_fit_and_nan_gradients(backend, scale):
    """A NaN or infinite coordinate or weight anywhere in a problem: R, t (and s when fitted) NaN,
    and NaN gradients for every src, dst and weight entry of that problem, whatever the incoming
    gradient; the other problems keep finite values and gradients (issue 11 item 2: C++ gave a
    finite R = I and, through part_alignment, finite gradients)."""
    src, dst, w, bad = non_finite_problems()
    dev = device_for(backend)
    leaves = [v.to(dev).requires_grad_() for v in (src, dst, w)]
    R, s, t = run(backend, kpfast.umeyama, *leaves, scale=scale)
    R, s, t = R.cpu(), s.cpu(), t.cpu()
    assert torch.isnan(R[bad]).all() and torch.isnan(t[bad]).all()
    assert torch.isnan(s[bad]).all() if scale else torch.all(s[bad] == 1)
    assert torch.isfinite(R[~bad]).all() and torch.isfinite(s[~bad]).all() and torch.isfinite(t[~bad]).all()
    upstream = torch.randn(10, 3, 3, generator=torch.Generator().manual_seed(12), dtype=torch.float64)
    upstream[bad] = 0  # a NaN fit's gradient is NaN even when nothing flows into it
    loss = (R * upstream).sum() + (s * upstream[:, 0, 0]).sum() + (t * upstream[:, 1]).sum()
    for name, g in zip(("src", "dst", "weights"), torch.autograd.grad(loss, leaves)):
        g = g.cpu()
        assert torch.isnan(g[bad]).all(), f"{backend}: d/d{name} of a NaN fit is not all NaN"
        assert torch.isfinite(g[~bad]).all(), f"{backend}: d/d{name} of a clean fit is not finite"


@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
def test_two_point_and_collinear_fits_are_finite_in_float32(backend):
    """Horn's matrix has tied eigenvalues for two-point and collinear 3D sets: the C++ Jacobi
    step divided 0 by 0 there (issue 11 item 1: 1,240 of 20,000 two-point fits NaN)."""
    gen = torch.Generator().manual_seed(3)
    N = 64 if backend == "triton" else 4000
    two_src = torch.randn(N, 2, 3, generator=gen, dtype=torch.float64)
    two_dst = torch.randn(N, 2, 3, generator=gen, dtype=torch.float64)
    line = torch.randn(N, 1, 3, generator=gen, dtype=torch.float64)
    along = torch.linspace(-1, 1, 10, dtype=torch.float64)[:, None]
    line = line + torch.randn(N, 1, 3, generator=gen, dtype=torch.float64) * along
    dst = torch.randn(N, 10, 3, generator=gen, dtype=torch.float64)
    dev = device_for(backend)
    for src_, dst_ in ((two_src, two_dst), (line, dst)):
        x, y = src_.float(), dst_.float()
        R, s, t = (v.cpu().double() for v in run(backend, kpfast.umeyama, x.to(dev), y.to(dev)))
        assert torch.isfinite(R).all() and torch.isfinite(s).all() and torch.isfinite(t).all(), backend
        # the fitted points (unique, unlike the rotation about the line) match the float64 fit
        Rr, sr, tr = umeyama_reference(x.double(), y.double())
        fitted = s[:, None, None] * x.double() @ R.mT + t[:, None]
        want = sr[:, None, None] * x.double() @ Rr.mT + tr[:, None]
        assert (fitted - want).abs().max() < 1e-4, backend


@pytest.mark.parametrize("backend", BACKENDS)
def test_float32_fits_are_right_from_1e_minus_30_to_1e20(backend):
    """Every fit runs in a frame scaled by a power of two near its largest coordinate: before,
    both kernels returned a wrong R and a negative s near 1e10 and 1e-12, NaN at 1e20 (issue 11
    item 5); the float64 reference is the check, on the same float32 inputs."""
    gen = torch.Generator().manual_seed(5)
    src, dst, w = make_problem(gen, N=32, M=6, D=3, noise=0.05)
    dev = device_for(backend)
    for exponent in (-30, -12, 0, 10, 20):
        a = 10.0 ** exponent
        x, y, ww = (a * src).float(), (a * dst).float(), w.float()
        R, s, t = (v.cpu().double() for v in run(backend, kpfast.umeyama, x.to(dev), y.to(dev), ww.to(dev)))
        Rr, sr, tr = umeyama_reference(x.double(), y.double(), ww.double())
        what = f"{backend} at 1e{exponent}"
        assert (R - Rr).abs().max() < 1e-4, what
        assert ((s - sr).abs() / sr.abs()).max() < 1e-4, what
        assert (t - tr).abs().max() < 1e-4 * a * (1 + tr.abs().max() / a), what


@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
def test_zero_total_weight_gives_zero_gradients(backend):
    """With sum w = 0 the fit (R = I, s = 1, t = 0) jumps as soon as a weight turns positive: it
    is not differentiable in the weights, and every backend returns 0 for every gradient (the
    reference returned dt/dw_m = dst_m - src_m, the kernels 0: issue 11 item 7)."""
    gen = torch.Generator().manual_seed(7)
    src, dst, w = make_problem(gen, N=3, M=5, D=3)
    w[1] = 0.0
    dev = device_for(backend)
    leaves = [v.to(dev).requires_grad_() for v in (src, dst, w)]
    R, s, t = run(backend, kpfast.umeyama, *leaves)
    assert torch.equal(R[1].detach().cpu(), torch.eye(3, dtype=torch.float64)) and s[1].item() == 1
    assert torch.equal(t[1].detach().cpu(), torch.zeros(3, dtype=torch.float64))
    loss = R.sum() + s.sum() + t.sum()
    for name, g in zip(("src", "dst", "weights"), torch.autograd.grad(loss, leaves)):
        assert torch.all(g[1] == 0), f"{backend}: d/d{name} at zero weights is {g[1]}"
        assert torch.any(g[0] != 0), f"{backend}: d/d{name} of a weighted problem is 0"


@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
def test_mixed_float_dtypes_are_converted_to_the_dtype_of_src(backend):
    """dst and weights of another float dtype are accepted alike by every backend (issue 11 item 7):
    the fit is the one of the inputs converted to src's dtype, gradients come back in each input's."""
    gen = torch.Generator().manual_seed(9)
    src, dst, w = make_problem(gen, N=4, M=6, D=3)
    dev = device_for(backend)
    src32 = src.float().to(dev).requires_grad_()
    dst64 = dst.to(dev).requires_grad_()
    w16 = w.half().to(dev).requires_grad_()
    out = run(backend, kpfast.umeyama, src32, dst64, w16)
    want = run(backend, kpfast.umeyama, src.float().to(dev), dst.float().to(dev), w.half().float().to(dev))
    for a, b in zip(out, want):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    grads = torch.autograd.grad(sum(o.sum() for o in out), (src32, dst64, w16))
    assert [g.dtype for g in grads] == [torch.float32, torch.float64, torch.float16]
    assert all(torch.isfinite(g).all() for g in grads)


@pytest.fixture
def gpu_approximate_math(monkeypatch):
    """The interpreter's float32 sqrt and division made as inexact as a GPU's approximate
    instructions, with room to spare (4 ulp, where sqrt.approx.f32 and div.full.f32 are within 2)."""
    import numpy as np
    from triton.runtime.interpreter import interpreter_builder

    def skewed(op, factor):
        def approximate(*args):
            out = op(*args)
            if out.data.dtype == np.float32:
                out.data = (out.data * np.float32(factor)).astype(np.float32)
            return out

        return approximate

    monkeypatch.setattr(interpreter_builder, "create_sqrt", skewed(interpreter_builder.create_sqrt, 1 + 2**-21))
    monkeypatch.setattr(interpreter_builder, "create_fdiv", skewed(interpreter_builder.create_fdiv, 1 - 2**-21))


def assert_orthogonal_to_rounding(R, what):
    eps = torch.finfo(R.dtype).eps
    R = R.double()
    gap = (R.mT @ R - torch.eye(R.shape[-1], dtype=torch.float64)).abs().max().item()
    assert gap <= 8 * eps, f"{what}: |R^T R - I| = {gap:.3g} = {gap / eps:.1f} eps"
    assert (torch.linalg.det(R) - 1).abs().max().item() <= 8 * eps, what


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rotation_is_orthogonal_to_rounding(backend, dtype):
    """R comes from the normalized quaternion: |R^T R - I| at rounding level (C++ drifted to 16 eps
    with the Jacobi rotations; issue 16 item 6)."""
    gen = torch.Generator().manual_seed(13)
    src, dst, w = make_problem(gen, N=64 if backend == "triton" else 512, M=8, D=3, noise=0.5)
    R, _, _ = run(backend, kpfast.umeyama, src.to(dtype), dst.to(dtype), w.to(dtype))
    assert_orthogonal_to_rounding(R.cpu(), f"{backend} {dtype}")


@pytest.mark.skipif("triton" not in BACKENDS or torch.cuda.is_available(), reason="the Triton interpreter")
def test_rotation_is_orthogonal_with_approximate_gpu_math(gpu_approximate_math):
    """With sqrt and division as inexact as on a GPU the Jacobi sweeps drift (the quaternion was
    used unnormalized: |R^T R - I| about 3e-5 here); R is still orthogonal to rounding."""
    gen = torch.Generator().manual_seed(13)
    src, dst, w = make_problem(gen, N=32, M=8, D=3, noise=0.5)
    R, _, _ = run("triton", kpfast.umeyama, src.float(), dst.float(), w.float())
    assert_orthogonal_to_rounding(R, "triton with approximate sqrt and division")


def test_validation_names_the_argument():
    x = torch.randn(4, 5, 3)
    cases = [
        (lambda: kpfast.umeyama(x.numpy(), x), TypeError, "src"),
        (lambda: kpfast.umeyama(x, x.long()), TypeError, "dst"),
        (lambda: kpfast.umeyama(torch.randn(4, 5, 4), torch.randn(4, 5, 4)), ValueError, "D in"),
        (lambda: kpfast.umeyama(torch.randn(5), torch.randn(5)), ValueError, "src"),
        (lambda: kpfast.umeyama(x, torch.randn(4, 6, 3)), ValueError, "dst"),
        (lambda: kpfast.umeyama(x, torch.randn(3, 5, 3)), ValueError, "broadcast"),
        (lambda: kpfast.umeyama(x, x, torch.rand(4, 6)), ValueError, "weights"),
        (lambda: kpfast.umeyama(x, x, torch.ones(4, 5, dtype=torch.int64)), TypeError, "weights"),
        (lambda: kpfast.umeyama(x, x, -torch.rand(4, 5)), ValueError, "non-negative"),
        (lambda: kpfast.umeyama(x, x, scale=1), TypeError, "scale"),
        (lambda: kpfast.umeyama(x, x.to("meta")), ValueError, "device"),
    ]
    for fn, exc, text in cases:
        with pytest.raises(exc, match=text):
            fn()


def test_rotation_angle_matches_closed_form_2d():
    """2D: R is the rotation by atan2(S10 - S01, S00 + S11) of the cross-covariance."""
    gen, seed = seeded_generator()
    src = torch.randn(8, 2, generator=gen, dtype=torch.float64)
    theta = float(torch.rand((), generator=gen)) * 2 * math.pi - math.pi
    c, s_ = math.cos(theta), math.sin(theta)
    dst = src @ torch.tensor([[c, s_], [-s_, c]], dtype=torch.float64)
    for backend in BACKENDS:
        R, s, _ = run(backend, kpfast.umeyama, src, dst)
        assert abs(math.atan2(R[1, 0].item(), R[0, 0].item()) - theta) < 1e-9, f"{backend} (seed {seed})"


def test_docstring_examples_run():
    import doctest

    import kpfast.reference as ref

    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    for fn in (kpfast.umeyama, kpfast.part_alignment, ref.umeyama_reference, ref.part_alignment_reference):
        tests = doctest.DocTestFinder().find(fn, globs=dict(vars(ref)))  # the reference module's names
        assert tests and tests[0].examples, fn.__name__
        for t in tests:
            runner.run(t)
    assert runner.failures == 0, f"{runner.failures} docstring example(s) failed"
