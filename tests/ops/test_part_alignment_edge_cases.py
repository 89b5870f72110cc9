"""hypothesis properties of kpfast.umeyama and kpfast.part_alignment at the edges, on every
backend (C++, Triton, reference): degenerate point sets (two points, collinear, coincident, one
point, zero weights), NaN and infinite inputs, and coordinates from 1e-30 to 1e20, in float32
and float64. What must hold is the contract of the docstrings (README, "Non-finite and
degenerate inputs"):

- umeyama: a problem with a NaN or infinite coordinate or weight (anywhere, whatever its weight)
  has NaN R and t, NaN s (1 with scale=False) and NaN gradients for all of its entries; every
  other problem has finite values and gradients, a rotation to rounding, and the fitted points
  s R src + t of the float64 reference (degenerate sets by its rules); all-zero weights give
  R = I, s = 1, t = 0 and zero gradients.
- part_alignment: r[i, j, p] is NaN exactly when i != j and a point of part p in sample i or j
  has a non-finite coordinate or weight; then every coordinate and weight of part p's points in
  both samples gets a NaN gradient and nothing else does; everything else is finite, r[i, i] = 0,
  and r matches the float64 reference.
"""

from __future__ import annotations

import hypothesis.strategies as st
import torch
from hypothesis import assume

import kpfast
from kpfast.reference import part_alignment_reference, umeyama_reference

from _util import device_for, property_test, run
from test_part_alignment_properties import rotation

STRUCTURES = ("generic", "two points", "collinear src", "collinear dst", "coincident src", "coincident dst",
              "zero weights", "one weight")
NON_FINITE = (float("nan"), float("inf"), float("-inf"))


def line(gen, n, D):
    """n distinct points on a random line."""
    a, u = torch.randn(2, D, generator=gen, dtype=torch.float64)
    return a + torch.linspace(-1, 1, n, dtype=torch.float64)[:, None] * (u + 0.1 * u.sign())


@st.composite
def umeyama_problems(draw):
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    structure = draw(st.sampled_from(STRUCTURES))
    N, D = draw(st.integers(1, 3)), draw(st.sampled_from([2, 3]))
    M = 2 if structure == "two points" else draw(st.integers(3, 6))
    src = torch.randn(N, M, D, generator=gen, dtype=torch.float64)
    dst = torch.stack([(0.5 + torch.rand((), generator=gen, dtype=torch.float64)) * x @ rotation(gen, D).T
                       + torch.randn(D, generator=gen, dtype=torch.float64) for x in src])
    dst = dst + draw(st.floats(0.0, 0.3)) * torch.randn(N, M, D, generator=gen, dtype=torch.float64)
    w = torch.rand(N, M, generator=gen, dtype=torch.float64) + 0.1
    k = draw(st.integers(0, N - 1))  # the problem that gets the structure
    if structure == "collinear src":
        src[k] = line(gen, M, D)
    elif structure == "collinear dst":
        dst[k] = line(gen, M, D)
    elif structure == "coincident src":
        src[k] = src[k, :1].clone()
    elif structure == "coincident dst":
        dst[k] = dst[k, :1].clone()
    elif structure in ("zero weights", "one weight"):
        w[k] = 0.0
        if structure == "one weight":
            w[k, draw(st.integers(0, M - 1))] = 1.5
    for n in range(N):  # generic sets well conditioned: the fitted points of a near-tie are not unique
        if M > 2 and not (n == k and structure != "generic"):
            sv = torch.linalg.svdvals(src[n] - src[n].mean(0))
            assume(bool(sv[1] > 1e-2 * sv[0]))
    bad = torch.zeros(N, dtype=torch.bool)
    if draw(st.booleans()):  # one non-finite input, anywhere
        n, m, value = draw(st.integers(0, N - 1)), draw(st.integers(0, M - 1)), draw(st.sampled_from(NON_FINITE))
        target = draw(st.sampled_from(["src", "dst", "weights"]))
        if target == "weights":
            w[n, m] = abs(value)  # a negative weight is an error (on CPU)
        else:
            (src if target == "src" else dst)[n, m, draw(st.integers(0, D - 1))] = value
        bad[n] = True
    a = 10.0 ** draw(st.integers(-30, 20))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    weighted = structure in ("zero weights", "one weight") or bool(bad.any()) or draw(st.booleans())
    return dict(src=(a * src).to(dtype), dst=(a * dst).to(dtype), w=w.to(dtype) if weighted else None,
                scale=draw(st.booleans()), structure=structure, k=k, bad=bad, a=a, gen=gen)


@property_test(umeyama_problems(), {"cpp": 60, "triton": 3, "reference": 30})
def test_umeyama_keeps_its_contract_at_the_edges(backend, p):
    src, dst, w, bad, a = p["src"], p["dst"], p["w"], p["bad"], p["a"]
    dev = device_for(backend)
    leaves = [v.to(dev).requires_grad_() for v in (src, dst, w) if v is not None]
    R, s, t = run(backend, kpfast.umeyama, *leaves[:2], leaves[2] if w is not None else None, scale=p["scale"])
    upstream = [torch.randn(v.shape, generator=p["gen"], dtype=torch.float64).to(v.dtype) for v in (R, s, t)]
    for u in upstream:
        u[bad] = 0  # a NaN fit's gradient is NaN whatever flows into it
    grads = torch.autograd.grad(sum((v * u.to(dev)).sum() for v, u in zip((R, s, t), upstream)), leaves)
    R, s, t, grads = R.detach().cpu(), s.detach().cpu(), t.detach().cpu(), [g.cpu() for g in grads]
    what = f"{backend}, {p['structure']}, {src.dtype}, scale={p['scale']}, coordinates ~{a:g}"
    assert torch.isnan(R[bad]).all() and torch.isnan(t[bad]).all(), what
    assert torch.isnan(s[bad]).all() if p["scale"] else torch.all(s[bad] == 1), what
    for g in grads:
        assert torch.isnan(g[bad]).all() and torch.isfinite(g[~bad]).all(), what
    ok = ~bad
    assert torch.isfinite(R[ok]).all() and torch.isfinite(s[ok]).all() and torch.isfinite(t[ok]).all(), what
    if ok.any():
        # a rotation to a few ulps: the reference's SVD reached 9 eps on a float64 3D fit
        tol = 32 * torch.finfo(src.dtype).eps
        Rd = R[ok].double()
        assert (Rd.mT @ Rd - torch.eye(src.shape[-1], dtype=torch.float64)).abs().max() <= tol, what
        assert (torch.linalg.det(Rd) - 1).abs().max() <= tol, what
        x = src[ok].double()
        Rr, sr, tr = umeyama_reference(x, dst[ok].double(), None if w is None else w[ok].double(),
                                       scale=p["scale"], tol_dtype=src.dtype)
        fitted = s[ok].double()[:, None, None] * x @ Rd.mT + t[ok].double()[:, None]
        want = sr[:, None, None] * x @ Rr.mT + tr[:, None]
        size = a * (1 + dst[ok].double().abs().amax((1, 2)) / a + want.abs().amax((1, 2)) / a)
        tol = 1e-4 if src.dtype == torch.float32 else 1e-9
        assert ((fitted - want).abs().amax((1, 2)) <= tol * size).all(), what
    if p["structure"] == "zero weights" and not bad[p["k"]]:
        k = p["k"]
        assert torch.equal(R[k], torch.eye(src.shape[-1], dtype=src.dtype)) and s[k] == 1 and torch.all(t[k] == 0)
        assert all(torch.all(g[k] == 0) for g in grads), what


PART_STRUCTURES = ("generic", "two points", "collinear", "coincident", "one point", "empty", "no weight")


@st.composite
def part_problems(draw):
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    B, K, P = draw(st.integers(2, 4)), draw(st.integers(5, 8)), draw(st.integers(1, 3))
    D = draw(st.sampled_from([2, 3]))
    base = torch.randn(K, D, generator=gen, dtype=torch.float64)
    pts = torch.stack([(0.5 + torch.rand((), generator=gen, dtype=torch.float64)) * base @ rotation(gen, D).T
                       + torch.randn(D, generator=gen, dtype=torch.float64) for _ in range(B)])
    pts = pts + 0.2 * torch.randn(B, K, D, generator=gen, dtype=torch.float64)
    w = torch.rand(B, K, generator=gen, dtype=torch.float64) + 0.1
    parts = torch.zeros(P, K, dtype=torch.bool)
    structures = [draw(st.sampled_from(PART_STRUCTURES)) for _ in range(P)]
    free = torch.randperm(K, generator=gen).tolist()  # points for degenerate parts, used once
    for p, structure in enumerate(structures):
        if structure in ("generic", "no weight") or len(free) < 3:
            parts[p, torch.randperm(K, generator=gen)[: max(D + 1, K // 2 + 1)]] = True
            if structure == "no weight":
                w[draw(st.integers(0, B - 1)), parts[p]] = 0.0
            continue
        n = {"two points": 2, "collinear": 3, "coincident": 2, "one point": 1, "empty": 0}[structure]
        idx, free = free[:n], free[n:]
        parts[p, idx] = True
        for b in range(B):
            if structure == "collinear":
                pts[b, idx] = line(gen, 3, D)
            elif structure == "coincident":
                pts[b, idx] = pts[b, idx[0]].clone()
    for p, structure in enumerate(structures):  # generic parts well conditioned (see umeyama_problems)
        if parts[p].sum() > D and structure in ("generic", "no weight"):
            x = pts[:, parts[p]]
            sv = torch.linalg.svdvals(x - x.mean(1, keepdim=True))
            assume(bool((sv[:, 1] > 1e-2 * sv[:, 0]).all()))
    poisoned = torch.zeros(B, K, dtype=torch.bool)
    if draw(st.booleans()):
        b, k, value = draw(st.integers(0, B - 1)), draw(st.integers(0, K - 1)), draw(st.sampled_from(NON_FINITE))
        if draw(st.booleans()):
            w[b, k] = abs(value)  # a negative weight is an error (on CPU)
        else:
            pts[b, k, draw(st.integers(0, D - 1))] = value
        poisoned[b, k] = True
    a = 10.0 ** draw(st.integers(-30, 20))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    weighted = bool(poisoned.any()) or "no weight" in structures or draw(st.booleans())
    return dict(pts=(a * pts).to(dtype), parts=parts, w=w.to(dtype) if weighted else None, poisoned=poisoned,
                scale=draw(st.booleans()), detach=draw(st.booleans()), structures=structures, a=a, gen=gen)


@property_test(part_problems(), {"cpp": 40, "triton": 2, "reference": 20})
def test_part_alignment_keeps_its_contract_at_the_edges(backend, p):
    pts, parts, w, a = p["pts"], p["parts"], p["w"], p["a"]
    B, K, _ = pts.shape
    # the documented NaN pattern: fit (i, j, p) is NaN when part p holds a poisoned point of i or j
    touched = (p["poisoned"].double() @ parts.double().T) > 0  # [B, P]: sample b's part p holds one
    bad = (touched[:, None] | touched[None, :]) & ~torch.eye(B, dtype=torch.bool)[:, :, None]
    nan_points = ((bad.any(1) | bad.any(0)).double() @ parts.double()) > 0  # [B, K]: in some NaN fit
    dev = device_for(backend)
    x = pts.to(dev).requires_grad_()
    ww = None if w is None else w.to(dev).requires_grad_()
    r = run(backend, kpfast.part_alignment, x, parts.to(dev), ww, scale=p["scale"], detach_transform=p["detach"])
    upstream = torch.randn(r.shape, generator=p["gen"], dtype=torch.float64).masked_fill(bad, 0.0)
    grads = [g.cpu() for g in torch.autograd.grad(r, [v for v in (x, ww) if v is not None], upstream.to(r))]
    r = r.detach().cpu()
    what = f"{backend}, parts {p['structures']}, {pts.dtype}, scale={p['scale']}, coordinates ~{a:g}"
    assert torch.equal(torch.isnan(r), bad), what
    assert torch.all(torch.diagonal(r) == 0) and (r[~bad] >= 0).all(), what
    assert torch.equal(torch.isnan(grads[0]).any(-1), nan_points), what
    assert torch.isnan(grads[0][nan_points]).all() and torch.isfinite(grads[0][~nan_points]).all(), what
    if w is not None:
        assert torch.equal(torch.isnan(grads[1]), nan_points), what
    rr = part_alignment_reference(pts, parts, w, scale=p["scale"]).double()
    tol = 1e-4 if pts.dtype == torch.float32 else 1e-9
    scale_ = a * (1 + pts[torch.isfinite(pts)].double().abs().max() / a)
    assert ((r[~bad].double() - rr[~bad]).abs() <= tol * scale_).all(), what
