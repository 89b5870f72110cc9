"""kpfast.part_alignment: parity with the float64 reference and with per-pair roma fits,
both gradient modes (gradcheck), self-pairs, degenerate parts, validation, CUDA graphs."""

from __future__ import annotations

import pytest
import roma
import torch

import kpfast
from kpfast.ops.backend import extension, triton_kernels
from kpfast.reference import part_alignment_reference

from _util import assert_close, device_for, seeded_generator, kernel_backends, run, tolerances

BACKENDS = kernel_backends()


def make_problem(gen, *, B=4, K=9, P=3, D=3, dtype=torch.float64, weights=True):
    """A base shape, per-sample random similarities and noise (sample 0 mirrored), random parts plus the whole."""
    base = torch.randn(K, D, generator=gen, dtype=torch.float64)
    q, r = torch.linalg.qr(torch.randn(B, D, D, generator=gen, dtype=torch.float64))
    q[torch.linalg.det(q) < 0, :, 0] *= -1
    s = torch.rand(B, 1, 1, generator=gen, dtype=torch.float64) + 0.5
    pts = s * base @ q.mT + torch.randn(B, 1, D, generator=gen, dtype=torch.float64)
    pts = pts + 0.2 * torch.randn(B, K, D, generator=gen, dtype=torch.float64)
    pts[0, :, 0] *= -1  # sample 0 is mirrored: its fits with the others correct a reflection
    # at least 3 points per part: fewer fit exactly (in 2D and 3D), and the signs of the L1
    # subgradient of a residual at rounding level are noise (tested in the degenerate cases)
    parts = torch.rand(P - 1, K, generator=gen) < 0.4
    for p in range(P - 1):
        parts[p, torch.randperm(K, generator=gen)[:3]] = True
    parts = torch.cat([parts, torch.ones(1, K, dtype=torch.bool)])
    w = torch.rand(B, K, generator=gen, dtype=torch.float64) + 0.05 if weights else None
    return pts.to(dtype), parts, None if w is None else w.to(dtype)


def min_abs_residual(pts, parts, w):
    """The smallest |component| of the residual vectors over all fits (float64 reference)."""
    B, K, D = pts.shape
    P = parts.shape[0]
    x = pts.double()
    ww = torch.ones(B, K, dtype=torch.float64) if w is None else w.double()
    src = x[None, :, None].expand(B, B, P, K, D)
    dst = x[:, None, None].expand(B, B, P, K, D)
    c = parts[None, None] * (ww[:, None, None] * ww[None, :, None])
    R, s, t = kpfast.reference.umeyama_reference(src, dst, c)
    e = dst - (s[..., None, None] * src @ R.mT + t.unsqueeze(-2))
    live = parts[None, None, :, :, None] & ~torch.eye(B, dtype=torch.bool)[:, :, None, None, None]
    return e.abs()[live.expand_as(e)].min().item()


def clean_problem(gen, dtype, **kw):
    """make_problem, redrawn while a residual component is within 1e-4 of zero: there the L1
    subgradient jumps, so float32 rounding may pick the other side than the float64 reference,
    and finite differences (step 1e-6) may straddle the kink."""
    while True:
        pts, parts, w = make_problem(gen, dtype=dtype, **kw)
        if min_abs_residual(pts, parts, w) > 1e-4:
            return pts, parts, w


def call_and_grad(backend, pts, parts, w, detach, gen):
    dev = device_for(backend)
    x = pts.to(dev).requires_grad_()
    ww = None if w is None else w.to(dev).requires_grad_()
    r = run(backend, kpfast.part_alignment, x, parts.to(dev), ww, detach_transform=detach)
    g = torch.randn(r.shape, generator=gen, dtype=torch.float64).to(pts.dtype)
    grads = torch.autograd.grad(r, [v for v in (x, ww) if v is not None], g.to(dev))
    xr = pts.detach().requires_grad_()
    wr = None if w is None else w.detach().requires_grad_()
    rr = part_alignment_reference(xr, parts, wr, detach_transform=detach)
    want = torch.autograd.grad(rr, [v for v in (xr, wr) if v is not None], g)
    return r, rr, grads, want


CASES = [(b, dt, D, w, detach) for b in ("cpp",) for dt in (torch.float32, torch.float64) for D in (2, 3)
         for w in (False, True) for detach in (True, False)]
CASES += [(b, *c) for b in BACKENDS[1:] for c in ((torch.float32, 3, True, True), (torch.float32, 3, True, False),
                                                  (torch.float64, 2, True, False), (torch.float64, 3, False, True))]


@pytest.mark.parametrize("backend,dtype,D,weights,detach", CASES)
def test_matches_reference_forward_and_backward(backend, dtype, D, weights, detach):
    gen, seed = seeded_generator()
    pts, parts, w = clean_problem(gen, dtype, B=4 if backend == "cpp" else 3, D=D, weights=weights)
    r, rr, got, want = call_and_grad(backend, pts, parts, w, detach, gen)
    tol = tolerances(dtype) if dtype == torch.float64 else dict(rtol=1e-4, atol=2e-5)
    assert r.dtype == dtype and r.shape == rr.shape
    assert_close(r.detach().cpu(), rr.detach(), **tol, what="r", seed=seed)
    for name, a, b in zip(("points", "weights"), got, want):
        scale_ = 1.0 + b.abs().max().item()
        assert_close(a.cpu(), b, rtol=tol["rtol"] * 10, atol=tol["atol"] * 10 * scale_, what=f"d/d{name}", seed=seed)


@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_per_pair_roma_fits(backend):
    """r[i, j, p] from roma's weighted similarity fit of part p of sample j onto sample i."""
    gen, seed = seeded_generator()
    pts, parts, w = make_problem(gen, B=3, K=8, P=2)
    r = run(backend, kpfast.part_alignment, pts.to(device_for(backend)), parts.to(device_for(backend)),
            w.to(device_for(backend))).cpu()
    want = torch.zeros_like(r)
    for i in range(3):
        for j in range(3):
            if i == j:
                continue
            for p in range(parts.shape[0]):
                k = parts[p]
                c = w[i, k] * w[j, k]
                R, t, s = roma.rigid_points_registration(pts[j, k], pts[i, k], weights=c, compute_scaling=True)
                res = (pts[i, k] - (s * pts[j, k] @ R.T + t)).abs().sum(-1)
                want[i, j, p] = (c * res).sum() / c.sum()
    assert_close(r, want, rtol=1e-9, atol=1e-12, what="r vs roma", seed=seed)


@pytest.mark.parametrize("backend", BACKENDS)
def test_self_pairs_are_exactly_zero_and_similar_copies_align(backend):
    gen, seed = seeded_generator()
    pts, parts, _ = make_problem(gen, B=3)
    q, _ = torch.linalg.qr(torch.randn(3, 3, generator=gen, dtype=torch.float64))
    q[:, 0] *= torch.sign(torch.linalg.det(q))
    pts[1] = 1.7 * pts[0] @ q.T + 0.3  # sample 1 is a similar copy of sample 0
    r = run(backend, kpfast.part_alignment, pts.to(device_for(backend)), parts.to(device_for(backend))).cpu()
    assert torch.all(torch.diagonal(r) == 0), f"seed {seed}"
    assert r[0, 1].abs().max() < 1e-12 and r[1, 0].abs().max() < 1e-12, f"seed {seed}"
    assert (r[0, 2] > 1e-3).all() and (r[2, 1] > 1e-3).all(), f"seed {seed}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_float64_full_gradient(backend):
    """detach_transform=False: the exact derivative, through the fitted transforms."""
    gen, seed = seeded_generator()
    for D in (2, 3) if backend == "cpp" else (3,):
        pts, parts, w = clean_problem(gen, torch.float64, B=3 if backend == "cpp" else 2, K=7, P=2, D=D)
        dev = device_for(backend)
        x, ww = pts.to(dev).requires_grad_(), w.to(dev).requires_grad_()
        for scale in (True, False) if backend == "cpp" else (True,):
            with kpfast.use_backend(backend):
                ok = torch.autograd.gradcheck(
                    lambda a, b: kpfast.part_alignment(a, parts.to(dev), b, scale=scale, detach_transform=False),
                    (x, ww), eps=1e-6, atol=1e-6, rtol=1e-4, fast_mode=backend == "triton")
            assert ok, f"gradcheck D={D} scale={scale} (seed {seed})"


def frozen_residuals(x, parts, w, fits):
    """r with every transform fixed to fits[(i, j, p)] = (R, s, t): plain torch, differentiable."""
    B, P = x.shape[0], parts.shape[0]
    rows = []
    for i in range(B):
        for j in range(B):
            for p in range(P):
                k = parts[p]
                if i == j:
                    rows.append(x.new_zeros(()))
                    continue
                R, s, t = fits[i, j, p]
                c = w[i, k] * w[j, k]
                e = (x[i, k] - (s * x[j, k] @ R.T + t)).abs().sum(-1)
                rows.append((c * e).sum() / c.sum())
    return torch.stack(rows).reshape(B, B, P)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_float64_detached_gradient(backend):
    """detach_transform=True is the derivative of the residual with (R, s, t) frozen at their fitted
    values: compared with autograd and with central finite differences of that frozen residual."""
    gen, seed = seeded_generator()
    pts, parts, w = clean_problem(gen, torch.float64, B=3, K=7, P=2)
    dev = device_for(backend)
    x, ww = pts.to(dev).requires_grad_(), w.to(dev).requires_grad_()
    r = run(backend, kpfast.part_alignment, x, parts.to(dev), ww)
    g = torch.randn(r.shape, generator=gen, dtype=torch.float64)
    gx, gw = (v.cpu() for v in torch.autograd.grad(r, (x, ww), g.to(dev)))
    fits = {}
    for i in range(3):
        for j in range(3):
            for p in range(2):
                k = parts[p]
                fits[i, j, p] = kpfast.umeyama(pts[j, k], pts[i, k], w[i, k] * w[j, k])
    xf, wf = pts.clone().requires_grad_(), w.clone().requires_grad_()
    rf = frozen_residuals(xf, parts, wf, fits)
    assert_close(r.detach().cpu(), rf.detach(), rtol=1e-10, atol=1e-12, what="frozen residual value", seed=seed)
    want_x, want_w = torch.autograd.grad(rf, (xf, wf), g)
    assert_close(gx, want_x, rtol=1e-9, atol=1e-11, what="d/dpoints vs frozen autograd", seed=seed)
    assert_close(gw, want_w, rtol=1e-9, atol=1e-11, what="d/dweights vs frozen autograd", seed=seed)
    eps = 1e-6
    for _ in range(3):
        vx = torch.randn(pts.shape, generator=gen, dtype=torch.float64)
        vw = torch.randn(w.shape, generator=gen, dtype=torch.float64)
        plus = (g * frozen_residuals(pts + eps * vx, parts, w + eps * vw, fits)).sum()
        minus = (g * frozen_residuals(pts - eps * vx, parts, w - eps * vw, fits)).sum()
        numeric = (plus - minus) / (2 * eps)
        analytic = (gx * vx).sum() + (gw * vw).sum()
        assert abs(numeric - analytic) <= 1e-5 * (1 + abs(numeric)), f"{numeric} vs {analytic} (seed {seed})"


def degenerate_problem(gen, D):
    """Parts of one point, two points, collinear and coincident points, an empty part, and the
    whole set; sample 2 has zero weight on the first four points."""
    B, K = 3, 10
    pts = torch.randn(B, K, D, generator=gen, dtype=torch.float64)
    direction = torch.randn(B, 1, D, generator=gen, dtype=torch.float64)
    pts[:, 3:6] = pts[:, 3:4] + torch.tensor([0.0, 0.7, -1.3], dtype=torch.float64)[None, :, None] * direction
    pts[:, 7] = pts[:, 6]  # coincident
    parts = torch.zeros(6, K, dtype=torch.bool)
    parts[0, 0] = True          # one point
    parts[1, 1:3] = True        # two points
    parts[2, 3:6] = True        # collinear
    parts[3, 6:8] = True        # coincident
    parts[5] = True             # everything; part 4 stays empty
    w = torch.rand(B, K, generator=gen, dtype=torch.float64) + 0.1
    w[2, :4] = 0
    return pts, parts, w


@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
@pytest.mark.parametrize("D", [2, 3])
def test_degenerate_parts_give_finite_values_and_gradients(backend, D):
    gen, seed = seeded_generator()
    pts, parts, w = degenerate_problem(gen, D)
    dev = device_for(backend)
    modes = [(True, None), (True, w), (False, None), (False, w)] if backend != "triton" else [(False, w)]
    for detach, weights in modes:  # the interpreter is slow: the Triton kernels get the hardest mode
        x = pts.to(dev).requires_grad_()
        ww = None if weights is None else weights.to(dev).requires_grad_()
        r = run(backend, kpfast.part_alignment, x, parts.to(dev), ww, detach_transform=detach)
        rr = part_alignment_reference(pts, parts, weights, detach_transform=detach)
        what = f"detach={detach}, weights={weights is not None}"
        assert torch.isfinite(r).all(), what
        assert_close(r.detach().cpu(), rr, rtol=1e-7, atol=1e-9, what=what, seed=seed)
        # one / two / coincident points and the empty part fit exactly
        assert r[:, :, [0, 1, 3, 4]].abs().max() < 1e-9, what
        g = torch.randn(r.shape, generator=gen, dtype=torch.float64).to(dev)
        for grad in torch.autograd.grad(r, [v for v in (x, ww) if v is not None], g):
            assert torch.isfinite(grad).all(), f"{what}: non-finite gradient (seed {seed})"


def test_float16_and_bfloat16_inputs():
    gen, seed = seeded_generator()
    pts, parts, w = make_problem(gen, B=3)
    for dtype in (torch.float16, torch.bfloat16):
        r = run("cpp", kpfast.part_alignment, pts.to(dtype), parts, w.to(dtype))
        rr = part_alignment_reference(pts.to(dtype), parts, w.to(dtype))
        assert r.dtype == dtype
        assert_close(r.float(), rr.float(), rtol=2e-2, atol=1e-2, what=str(dtype), seed=seed)


def test_validation_names_the_argument():
    x = torch.randn(3, 5, 3)
    parts = torch.ones(2, 5, dtype=torch.bool)
    cases = [
        (lambda: kpfast.part_alignment(x[0], parts), ValueError, "points"),
        (lambda: kpfast.part_alignment(torch.randn(3, 5, 4), parts), ValueError, "D in"),
        (lambda: kpfast.part_alignment(x.long(), parts), TypeError, "points"),
        (lambda: kpfast.part_alignment(x, parts.int()), TypeError, "parts"),
        (lambda: kpfast.part_alignment(x, [[True] * 5]), TypeError, "parts"),
        (lambda: kpfast.part_alignment(x, torch.ones(2, 4, dtype=torch.bool)), ValueError, "parts"),
        (lambda: kpfast.part_alignment(x, torch.ones(5, dtype=torch.bool)), ValueError, "parts"),
        (lambda: kpfast.part_alignment(x, parts, torch.rand(3, 4)), ValueError, "weights"),
        (lambda: kpfast.part_alignment(x, parts, torch.ones(3, 5, dtype=torch.int64)), TypeError, "weights"),
        (lambda: kpfast.part_alignment(x, parts, -torch.rand(3, 5)), ValueError, "non-negative"),
        (lambda: kpfast.part_alignment(x, parts, scale="yes"), TypeError, "scale"),
        (lambda: kpfast.part_alignment(x, parts, detach_transform=0), TypeError, "detach_transform"),
        (lambda: kpfast.part_alignment(x, parts.to("meta")), ValueError, "device"),
        (lambda: kpfast.part_alignment(torch.randn(0, 5, 3), parts), ValueError, "points"),
    ]
    for fn, exc, text in cases:
        with pytest.raises(exc, match=text):
            fn()


def test_record_layout_is_the_one_of_the_extension():
    """The Triton kernels keep the per-fit record in the layout of csrc/umeyama.cpp (issue 15: the
    30-float record was written in three places)."""
    kernels = triton_kernels("umeyama")
    assert kernels.RECORD == extension().PART_RECORD_LAYOUT
    assert kernels.RECORD["size"] == extension().PART_RECORD_SIZE
    # the fields follow one another with the sizes both kernels read (3x3 A and C, 3-vectors, scalars)
    sizes = dict(A=9, t=3, inv_W=1, Sd=3, Ss=3, C=9, Qs=1, W=1)
    offsets = sorted((offset, name) for name, offset in kernels.RECORD.items() if name != "size")
    ends = [offset + sizes[name] for offset, name in offsets]
    assert [offset for offset, _ in offsets] == [0] + ends[:-1] and ends[-1] == kernels.RECORD["size"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_parts(backend):
    x = torch.randn(2, 4, 3, requires_grad=True)
    r = run(backend, kpfast.part_alignment, x, torch.zeros(0, 4, dtype=torch.bool))
    assert r.shape == (2, 2, 0)
    (g,) = torch.autograd.grad(r.sum(), x)
    assert torch.all(g == 0)


@pytest.mark.gpu
def test_cuda_graph_capture_and_no_host_sync():
    """The whole forward+backward can be captured in a CUDA graph (which fails on any host sync)."""
    gen, seed = seeded_generator()
    pts, parts, w = make_problem(gen, B=32, K=98, P=8, dtype=torch.float32)
    x = pts.cuda().requires_grad_()
    parts, w = parts.cuda(), w.cuda()
    for detach in (True, False):
        def step():
            r = kpfast.part_alignment(x, parts, w, detach_transform=detach)
            (g,) = torch.autograd.grad(r.sum(), x)
            return r, g

        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            step()  # warm-up (compilation) outside the capture
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            r, g = step()
        graph.replay()
        torch.cuda.synchronize()
        rr = part_alignment_reference(pts, parts.cpu(), w.cpu().double(), detach_transform=detach)
        assert_close(r.cpu().double(), rr.double(), rtol=1e-3, atol=1e-4, what="captured r", seed=seed)
        assert torch.isfinite(g).all()


@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
def test_nan_reaches_exactly_the_fits_of_its_parts(backend):
    gen, seed = seeded_generator()
    pts, _, w = make_problem(gen, B=3, K=8)
    parts = torch.zeros(2, 8, dtype=torch.bool)
    parts[0, :4] = True
    parts[1, 4:] = True
    pts[1, 2, 0] = float("nan")  # in part 0 of sample 1
    w[2, 6] = float("nan")       # in part 1 of sample 2
    dev = device_for(backend)
    r = run(backend, kpfast.part_alignment, pts.to(dev), parts.to(dev), w.to(dev)).cpu()
    nan = torch.zeros(3, 3, 2, dtype=torch.bool)
    nan[1, [0, 2], 0] = nan[[0, 2], 1, 0] = True
    nan[2, [0, 1], 1] = nan[[0, 1], 2, 1] = True
    assert torch.equal(torch.isnan(r), nan), f"seed {seed}: {r}"


@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
@pytest.mark.parametrize("detach", [True, False])
def test_nan_gradients_reach_exactly_the_points_of_nan_fits(backend, detach):
    """Backward of a fit with a non-finite input: NaN for every coordinate and weight of its
    part's points in both samples, whatever the incoming gradient (here 0 on those fits), and
    nothing else (issue 11 item 2: C++ returned finite gradients for a NaN weight)."""
    gen = torch.Generator().manual_seed(21)
    pts, _, w = make_problem(gen, B=3, K=10)
    parts = torch.zeros(3, 10, dtype=torch.bool)
    parts[0, :4] = True
    parts[1, 4:8] = True
    parts[2, 5:] = True
    pts[1, 2, 0] = float("nan")  # in part 0 of sample 1
    w[2, 4] = float("nan")       # in part 1 (not part 2) of sample 2
    dev = device_for(backend)
    x, ww = pts.to(dev).requires_grad_(), w.to(dev).requires_grad_()
    r = run(backend, kpfast.part_alignment, x, parts.to(dev), ww, detach_transform=detach)
    bad = torch.isnan(r.detach().cpu())
    upstream = torch.randn(r.shape, generator=gen, dtype=torch.float64).masked_fill(bad, 0.0)
    gx, gw = (g.cpu() for g in torch.autograd.grad(r, (x, ww), upstream.to(dev)))
    want = torch.zeros(3, 10, dtype=torch.bool)  # [sample, point]: a member of a NaN fit
    for i, j, p in bad.nonzero().tolist():
        want[i, parts[p]] = want[j, parts[p]] = True
    assert torch.equal(want, torch.arange(10).expand(3, 10) < 8)  # parts 0 and 1 of every sample
    assert torch.equal(torch.isnan(gx).any(-1), want) and torch.equal(torch.isnan(gx).all(-1), want), backend
    assert torch.equal(torch.isnan(gw), want), backend
    assert torch.isfinite(gx[~want]).all() and (gx[~want] != 0).any(), backend


@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
def test_a_part_without_weight_gives_zero_and_no_gradient(backend):
    """r = 0 and no gradient at all for a fit whose weights are all 0 (the reference gave d r / d w
    = the residual of an unweighted sum there: issue 11 item 7)."""
    gen = torch.Generator().manual_seed(23)
    pts, _, w = make_problem(gen, B=3, K=9)
    parts = torch.ones(1, 9, dtype=torch.bool)
    w[1] = 0.0  # every fit with sample 1 has no weight
    dev = device_for(backend)
    x, ww = pts.to(dev).requires_grad_(), w.to(dev).requires_grad_()
    r = run(backend, kpfast.part_alignment, x, parts.to(dev), ww, detach_transform=False)
    assert torch.all(r[1] == 0) and torch.all(r[:, 1] == 0)
    upstream = torch.zeros(r.shape, dtype=torch.float64)
    upstream[1, 0] = upstream[2, 1] = 1.0
    gx, gw = torch.autograd.grad(r, (x, ww), upstream.to(dev))
    assert torch.all(gx == 0) and torch.all(gw == 0), backend


@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
def test_two_point_and_collinear_parts_are_finite_in_float32(backend):
    """Two-point parts and collinear 3-point parts (an animal's leg) on the default float32 CPU
    path: 246 and 244 of 4,096 residuals were NaN in C++ (issue 11 item 1)."""
    gen = torch.Generator().manual_seed(25)
    B = 6 if backend == "triton" else 32
    pts = torch.randn(B, 5, 3, generator=gen, dtype=torch.float64)
    direction = torch.randn(B, 1, 3, generator=gen, dtype=torch.float64)
    pts[:, 2:5] = pts[:, 2:3] + torch.tensor([0.0, 0.6, -1.1], dtype=torch.float64)[:, None] * direction
    parts = torch.tensor([[1, 1, 0, 0, 0], [0, 0, 1, 1, 1]], dtype=torch.bool)
    dev = device_for(backend)
    noise = 1e-3 * torch.randn(B, 5, 3, generator=gen, dtype=torch.float64)
    for pts_ in (pts, pts + noise):  # the residual of an exactly collinear part is unique, a noisy one's is not
        x = pts_.float().to(dev).requires_grad_()
        r = run(backend, kpfast.part_alignment, x, parts.to(dev))
        (g,) = torch.autograd.grad(r.sum(), x)
        assert torch.isfinite(r).all() and torch.isfinite(g).all(), backend
    x = pts.float()
    r = run(backend, kpfast.part_alignment, x.to(dev), parts.to(dev)).cpu().double()
    assert (r - part_alignment_reference(x.double(), parts)).abs().max() < 1e-5, backend


@pytest.mark.parametrize("backend", BACKENDS)
def test_float32_residuals_are_right_from_1e_minus_30_to_1e20(backend):
    """r in float32 at every coordinate scale the float64 reference handles (issue 11 item 5)."""
    gen = torch.Generator().manual_seed(27)
    pts, parts, w = make_problem(gen, B=3 if backend == "triton" else 6, K=9)
    dev = device_for(backend)
    for exponent in (-30, -12, 10, 20):
        a = 10.0 ** exponent
        x = (a * pts).float()
        r = run(backend, kpfast.part_alignment, x.to(dev), parts.to(dev), w.float().to(dev)).cpu().double()
        rr = part_alignment_reference(x.double(), parts, w.float().double())
        assert ((r - rr).abs() / a).max() < 1e-4, f"{backend} at 1e{exponent}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_shapes_spanning_several_blocks(backend, monkeypatch):
    """More samples and points than one program's block: every loop over blocks of samples and
    points runs more than once (the Triton blocks are shrunk so that the interpreter stays fast)."""
    gen, seed = seeded_generator()
    B, K, P, N, M = 17, 37, 2, 45, 21
    if backend == "triton":
        kernels = triton_kernels("umeyama")
        for name, value in dict(PART_BLOCK_PAIRS=4, PART_BWD_BLOCK_POINTS=8, UMEYAMA_BLOCK_N=8).items():
            monkeypatch.setattr(kernels, name, value)
        B, K, P, N, M = 3, 11, 1, 9, 6
    pts, parts, w = make_problem(gen, B=B, K=K, P=P)
    r, rr, got, want = call_and_grad(backend, pts, parts, w, False, gen)
    assert_close(r.detach().cpu(), rr, rtol=1e-9, atol=1e-11, what="r", seed=seed)
    for name, a, b in zip(("points", "weights"), got, want):
        assert_close(a.cpu(), b, rtol=1e-8, atol=1e-10 * (1 + b.abs().max().item()), what=f"d/d{name}", seed=seed)
    src = torch.randn(N, M, 3, generator=gen, dtype=torch.float64)
    dst = torch.randn(N, M, 3, generator=gen, dtype=torch.float64)
    dev = device_for(backend)
    a, b = src.to(dev).requires_grad_(), dst.to(dev).requires_grad_()
    out = run(backend, kpfast.umeyama, a, b)
    ref_a, ref_b = src.clone().requires_grad_(), dst.clone().requires_grad_()
    ref = kpfast.reference.umeyama_reference(ref_a, ref_b)
    for x, y in zip(out, ref):
        assert_close(x.detach().cpu(), y.detach(), rtol=1e-9, atol=1e-11, what="umeyama", seed=seed)
    g = [torch.randn(o.shape, generator=gen, dtype=torch.float64) for o in out]
    got = torch.autograd.grad(sum((o * gg.to(dev)).sum() for o, gg in zip(out, g)), (a, b))
    want = torch.autograd.grad(sum((o * gg).sum() for o, gg in zip(ref, g)), (ref_a, ref_b))
    for x, y in zip(got, want):
        assert_close(x.cpu(), y, rtol=1e-8, atol=1e-10 * (1 + y.abs().max().item()), what="umeyama grad", seed=seed)
