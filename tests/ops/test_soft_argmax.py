"""kpfast.soft_argmax: parity of every kernel with the reference (forward and the
gradients to heatmaps, readouts and beta), gradcheck, readout layouts, extreme and
degenerate inputs, validation and memory kept for backward."""

from __future__ import annotations

import doctest
import math

import pytest
import torch

import kpfast
from kpfast.ops import soft_argmax_op as op_module
from kpfast.ops.backend import interpreting_triton
from kpfast.reference import soft_argmax_reference

from _util import (assert_close, calls_from_kpfast, device_for, seeded_generator, interpreter_min_max_nan, kernel_backends,
                   nan_rule_cases, run, tolerances)

BACKENDS = kernel_backends()
LAYOUTS = ["none", "stacked", "list", "chunks", "scattered", "empty"]

pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # interpreter, masked lanes


def make_problem(gen, *, B=2, K=3, C=2, H=7, W=9, dtype=torch.float64, device="cpu", layout="stacked", beta="tensor",
                 scale=3.0):
    """Random logits (some -inf), readouts in the given layout and beta; leaves require grad.

    Layouts: "none" (no readouts), "stacked" ``[B,K,C,H,W]``, "list" (separate maps),
    "chunks" (heatmaps and readouts are channel slices of one ``[B, (1+C)K, H, W]``
    tensor, equally spaced), "scattered" (C = 3 slices of one tensor, unequally spaced
    and out of order: the Triton kernels' offset table), "empty" (an empty sequence).
    """
    f64 = dict(generator=gen, dtype=torch.float64)
    h = torch.randn(B, K, H, W, **f64) * scale
    h[torch.rand(B, K, H, W, **f64) < 0.1] = float("-inf")
    h[:, :, 0, 0] = torch.randn(B, K, **f64)  # every row keeps a finite logit
    r = torch.randn(B, K, C, H, W, **f64) * 2
    b = 0.4 + 1.6 * torch.rand((), **f64).item()
    leaves = {}
    if layout in ("chunks", "scattered"):
        # slot (in units of K channels) of the heatmaps and of each readout inside one parent tensor
        slots = list(range(1 + C)) if layout == "chunks" else [1, 3, 0, 4][: 1 + C]
        parent = torch.zeros(B, (max(slots) + 1) * K, H, W, dtype=torch.float64)
        for slot, t in zip(slots, [h] + list(r.unbind(2))):
            parent[:, slot * K:(slot + 1) * K] = t
        parent = parent.to(dtype=dtype, device=device).requires_grad_()
        leaves["parent"] = parent
        maps = [parent[:, slot * K:(slot + 1) * K] for slot in slots]
        heat, readouts = maps[0], maps[1:]
    else:
        heat = h.to(dtype=dtype, device=device).requires_grad_()
        leaves["heatmaps"] = heat
        if layout == "none":
            readouts = None
        elif layout == "empty":
            readouts = []
        elif layout == "stacked":
            readouts = r.to(dtype=dtype, device=device).requires_grad_()
            leaves["readouts"] = readouts
        else:
            readouts = [t.to(dtype=dtype, device=device).clone().requires_grad_() for t in r.unbind(2)]
            leaves.update({f"readouts[{c}]": t for c, t in enumerate(readouts)})
    if beta == "tensor":
        beta = torch.tensor(b, dtype=dtype, device=device, requires_grad=True)
        leaves["beta"] = beta
    else:
        beta = b
    return dict(heatmaps=heat, readouts=readouts, beta=beta), leaves


def call(problem):
    return kpfast.soft_argmax(problem["heatmaps"], problem["readouts"], beta=problem["beta"])


def reference_copy(leaves, problem, dtype=None):
    """The reference on detached CPU copies of the leaves (optionally cast), rebuilt with the same views."""
    copies = {k: v.detach().cpu().to(dtype or v.dtype).requires_grad_() for k, v in leaves.items()}
    if "parent" in leaves:
        parent = copies["parent"]
        heat = problem["heatmaps"]
        K = heat.shape[1]
        offset = lambda t: (t.storage_offset() - leaves["parent"].storage_offset()) // (t.stride(1))  # noqa: E731
        view = lambda t: parent[:, offset(t):offset(t) + K]  # noqa: E731
        heat_c, readouts_c = view(heat), [view(t) for t in problem["readouts"]]
    else:
        heat_c = copies["heatmaps"]
        r = problem["readouts"]
        if r is None or isinstance(r, list) and not r:
            readouts_c = r
        elif isinstance(r, torch.Tensor):
            readouts_c = copies["readouts"]
        else:
            readouts_c = [copies[f"readouts[{c}]"] for c in range(len(r))]
    beta = copies.get("beta", problem["beta"])
    return soft_argmax_reference(heat_c, readouts_c, beta=beta), copies


def outputs_and_cotangents(out, gen):
    kp, values = out
    gk = torch.randn(kp.shape, generator=gen, dtype=torch.float64)
    gv = None if values is None else torch.randn(values.shape, generator=gen, dtype=torch.float64)
    return gk, gv


def loss(out, gk, gv):
    kp, values = out
    total = (kp * gk.to(kp)).sum()
    if values is not None:
        total = total + (values * gv.to(values)).sum()
    return total


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_matches_reference_forward_and_backward(backend, dtype, layout):
    gen, seed = seeded_generator()
    beta = "tensor" if layout != "list" else "float"
    C = {"empty": 0, "scattered": 3}.get(layout, 2)
    problem, leaves = make_problem(gen, C=C, dtype=dtype, device=device_for(backend), layout=layout, beta=beta)
    out = run(backend, call, problem)
    (ref_kp, ref_v), copies = reference_copy(leaves, problem)
    tol = tolerances(dtype)
    kp, values = out
    assert kp.dtype == dtype and kp.shape == (2, 3, 2)
    assert_close(kp.detach().cpu(), ref_kp.detach(), **tol, what="keypoints", seed=seed)
    if layout == "none":
        assert values is None
    else:
        assert values.dtype == dtype and values.shape == (2, 3, C)
        assert_close(values.detach().cpu(), ref_v.detach(), **tol, what="values", seed=seed)

    gk, gv = outputs_and_cotangents(out, gen)
    names = list(leaves)
    got = torch.autograd.grad(loss(out, gk, gv), [leaves[k] for k in names])
    want = torch.autograd.grad(loss((ref_kp, ref_v), gk, gv), [copies[k] for k in names])
    for name, g, w in zip(names, got, want):
        assert g.dtype == w.dtype and g.shape == w.shape, name
        scale = 1.0 + w.abs().max().item()
        assert_close(g.cpu(), w, rtol=tol["rtol"], atol=tol["atol"] * scale, what=f"d/d{name}", seed=seed)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("wanted", ["heatmaps", "readouts", "beta"])
def test_gradient_to_one_input_only(backend, wanted):
    """Each of the three gradients is right when it is the only one asked for (the kernels skip the others)."""
    gen, seed = seeded_generator()
    problem, leaves = make_problem(gen, device=device_for(backend), layout="stacked")
    for k, v in leaves.items():
        v.requires_grad_(k == wanted)
    out = run(backend, call, problem)
    (ref_kp, ref_v), copies = reference_copy(leaves, problem)
    gk, gv = outputs_and_cotangents(out, gen)
    (got,) = torch.autograd.grad(loss(out, gk, gv), [leaves[wanted]])
    (want,) = torch.autograd.grad(loss((ref_kp, ref_v), gk, gv), [copies[wanted]])
    assert_close(got.cpu(), want, rtol=1e-9, atol=1e-11 * (1 + want.abs().max().item()), what=wanted, seed=seed)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_float64(backend):
    gen, seed = seeded_generator()
    problem, _ = make_problem(gen, B=2, K=2, C=2, H=5, W=6, device=device_for(backend), layout="list", scale=1.0)
    heat = problem["heatmaps"]
    r0, r1 = problem["readouts"]
    beta = torch.tensor(float(problem["beta"]), dtype=torch.float64, device=heat.device, requires_grad=True)

    def f(h, r0, r1, beta):
        kp, values = kpfast.soft_argmax(h, [r0, r1], beta=beta)
        return kp, values

    with kpfast.use_backend(backend):
        ok = torch.autograd.gradcheck(f, (heat, r0, r1, beta), eps=1e-6, atol=1e-6, rtol=1e-4,
                                      fast_mode=(backend == "triton"))
    assert ok, f"gradcheck failed (seed {seed})"


@pytest.mark.skipif("triton" not in BACKENDS, reason="Triton kernels need the interpreter or a GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_triton_split_planes_and_channel_groups(dtype):
    """The split-over-tiles path (with its combine kernel) and several readout channel groups."""
    from kpfast.kernels import soft_argmax as tk

    gen, seed = seeded_generator()
    device = device_for("triton")
    B, K, C, H, W = 1, 2, 5, 13, 11  # 143 pixels: 9 tiles of 16
    h = (torch.randn(B, K, H, W, generator=gen, dtype=torch.float64) * 3).to(dtype=dtype, device=device)
    h[0, 1, :6] = float("-inf")  # whole tiles and a whole split masked
    r = torch.randn(B, K, C, H, W, generator=gen, dtype=torch.float64).to(dtype=dtype, device=device)
    beta = torch.tensor(1.3, dtype=dtype, device=device)
    tk_block = tk._block
    try:
        tk._block = lambda HW, cg: 16
        kp, values, stats = tk.soft_argmax_forward(h, [r], True, beta, 0.0, split=3, group=2)
        gk = torch.randn(B, K, 2, generator=gen, dtype=torch.float64).to(kp)
        gv = torch.randn(B, K, C, generator=gen, dtype=torch.float64).to(kp)
        gh, gr, gb = tk.soft_argmax_backward(gk, gv, h, [r], True, beta, 0.0, kp, values, stats, True, True, True,
                                             split=4)
    finally:
        tk._block = tk_block
    hc, rc, bc = (t.detach().cpu().double().requires_grad_() for t in (h, r, beta))
    ref_kp, ref_v = soft_argmax_reference(hc, rc, beta=bc)
    tol = tolerances(dtype)
    assert_close(kp.cpu().double(), ref_kp.detach(), **tol, what="keypoints", seed=seed)
    assert_close(values.cpu().double(), ref_v.detach(), **tol, what="values", seed=seed)
    want = torch.autograd.grad((ref_kp * gk.cpu().double()).sum() + (ref_v * gv.cpu().double()).sum(), (hc, rc, bc))
    for name, g, w in zip(("heatmaps", "readouts", "beta"), (gh, gr, gb.sum()), want):
        assert_close(g.cpu().double(), w, rtol=tol["rtol"], atol=tol["atol"] * (1 + w.abs().max().item()),
                     what=f"d/d{name}", seed=seed)


def test_float_row_index_is_exact():
    """The Triton kernels find a pixel's row as trunc((q + 0.5) * (1 / W)) in float32 (FAST_DIV):
    exact for every offset q of planes of 2^16 pixels (256 x 256), also when 1 / W is off by
    2 ulp (the GPU's div.full.f32)."""
    import numpy as np

    q = np.arange(1 << 16, dtype=np.int64)
    qf = q.astype(np.float32) + np.float32(0.5)
    for W in list(range(1, 300)) + [511, 512, 1000, 1023, 4097, 65535, 65536]:
        inv = np.float32(1.0) / np.float32(W)
        # the exact reciprocal, then 1 and 2 ulp off in both directions
        candidates = [inv, np.nextafter(inv, np.float32(1)), np.nextafter(np.nextafter(inv, np.float32(1)), np.float32(1)),
                      np.nextafter(inv, np.float32(0)), np.nextafter(np.nextafter(inv, np.float32(0)), np.float32(0))]
        for r in candidates:
            assert np.array_equal((qf * r).astype(np.int32), q // W), (W, r)


@pytest.mark.skipif("triton" not in BACKENDS, reason="Triton kernels need the interpreter or a GPU")
def test_triton_integer_row_index_path(monkeypatch):
    """Planes above FAST_DIV_MAX pixels use integer division: the same results."""
    from kpfast.kernels import soft_argmax as tk

    gen, seed = seeded_generator()
    problem, leaves = make_problem(gen, H=6, W=11, device=device_for("triton"), layout="stacked")
    want = run("triton", call, problem)
    monkeypatch.setattr(tk, "FAST_DIV_MAX", 0)
    got = run("triton", call, problem)
    gk, gv = outputs_and_cotangents(got, gen)
    names = list(leaves)
    g_fast = torch.autograd.grad(loss(want, gk, gv), [leaves[k] for k in names])
    g_int = torch.autograd.grad(loss(got, gk, gv), [leaves[k] for k in names])
    for a, b in zip(list(got) + list(g_int), list(want) + list(g_fast)):
        assert_close(a, b, rtol=1e-12, atol=1e-14, what="integer vs float row index", seed=seed)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_maps_spanning_several_tiles(backend, dtype):
    """37 x 41 = 1517 pixels: several C++ chunks / Triton tiles per row, the running max rescaled between them."""
    device = device_for(backend)
    gen, seed = seeded_generator()
    B, K, C, H, W = 1, 3, 2, 37, 41
    h = torch.randn(B, K, H, W, generator=gen, dtype=torch.float64) * 2
    h[0, 0, 30:] += 6.0  # the largest logits come last: the running max grows in the last tile
    h[0, 1, :30] = float("-inf")  # the first tiles are masked entirely
    h[0, 2, :5] += 8.0  # the largest logits come first
    r = torch.randn(B, K, C, H, W, generator=gen, dtype=torch.float64)
    hd, rd = (t.to(dtype=dtype, device=device).requires_grad_() for t in (h, r))
    bd = torch.tensor(1.1, dtype=dtype, device=device, requires_grad=True)
    kp, values = run(backend, kpfast.soft_argmax, hd, rd, beta=bd)
    hc, rc, bc = (t.detach().cpu().requires_grad_() for t in (hd, rd, bd))
    ref_kp, ref_v = soft_argmax_reference(hc, rc, beta=bc)
    tol = tolerances(dtype)
    assert_close(kp.detach().cpu(), ref_kp.detach(), **tol, what="keypoints", seed=seed)
    assert_close(values.detach().cpu(), ref_v.detach(), **tol, what="values", seed=seed)
    gk = torch.randn(kp.shape, generator=gen, dtype=torch.float64).to(dtype)
    gv = torch.randn(values.shape, generator=gen, dtype=torch.float64).to(dtype)
    got = torch.autograd.grad((kp * gk.to(device)).sum() + (values * gv.to(device)).sum(), (hd, rd, bd))
    want = torch.autograd.grad((ref_kp * gk).sum() + (ref_v * gv).sum(), (hc, rc, bc))
    for name, g, w in zip(("heatmaps", "readouts", "beta"), got, want):
        assert_close(g.cpu(), w, rtol=tol["rtol"], atol=tol["atol"] * (1 + w.abs().max().item()), what=f"d/d{name}", seed=seed)


@pytest.mark.parametrize("backend", BACKENDS)
def test_extreme_logits_give_finite_results(backend):
    """+-1e4 logits, rows of equal logits, -inf pixels, a large beta: finite and equal to the reference."""
    device = device_for(backend)
    gen, seed = seeded_generator()
    B, K, H, W = 1, 4, 6, 7
    h = torch.randn(B, K, H, W, generator=gen, dtype=torch.float64) * 1e4
    h[0, 1] = 1e4  # all equal, large
    h[0, 2] = -1e4  # all equal, very negative
    h[0, 3] = torch.where(torch.rand(H, W, generator=gen) < 0.5, float("-inf"), 1e4 * torch.rand(H, W, generator=gen, dtype=torch.float64))
    h[0, 3, 2, 3] = -1e4  # at least one finite pixel
    r = torch.randn(B, K, 2, H, W, generator=gen, dtype=torch.float64) * 1e3
    for dtype in (torch.float32, torch.float64):
        for beta in (1.0, 50.0):
            hd = h.to(dtype=dtype, device=device).requires_grad_()
            rd = r.to(dtype=dtype, device=device).requires_grad_()
            bd = torch.tensor(beta, dtype=dtype, device=device, requires_grad=True)
            kp, values = run(backend, kpfast.soft_argmax, hd, rd, beta=bd)
            ref_kp, ref_v = soft_argmax_reference(hd.detach().cpu(), rd.detach().cpu(), beta=bd.detach().cpu())
            assert torch.isfinite(kp).all() and torch.isfinite(values).all(), f"{dtype} beta={beta} (seed {seed})"
            tol = tolerances(dtype)
            assert_close(kp.detach().cpu(), ref_kp, **tol, what=f"keypoints {dtype} {beta}", seed=seed)
            assert_close(values.detach().cpu(), ref_v, rtol=tol["rtol"], atol=tol["atol"] * 1e3, what=f"values {dtype} {beta}", seed=seed)
            grads = torch.autograd.grad(kp.sum() + values.sum(), (hd, rd, bd))
            for g in grads:
                assert torch.isfinite(g).all(), f"non-finite gradient {dtype} beta={beta} (seed {seed})"
    # Equal logits: the centre of the grid and the mean of the readouts.
    kp, values = run(backend, kpfast.soft_argmax, h[:, 1:2].to(device), r[:, 1:2].to(device))
    assert torch.allclose(kp.cpu(), torch.zeros(1, 1, 2, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(values.cpu(), r[:, 1:2].mean((-1, -2)), rtol=1e-12, atol=1e-9)


@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_pixels_get_no_weight_for_any_beta(backend):
    """-inf masks its pixel for positive, zero and negative beta (beta = 0 averages the unmasked pixels)."""
    device = device_for(backend)
    gen, seed = seeded_generator()
    h = torch.randn(2, 3, 5, 6, generator=gen, dtype=torch.float64)
    mask = torch.rand(2, 3, 5, 6, generator=gen) < 0.4
    mask[..., 0, 0] = False
    h[mask] = float("-inf")
    r = torch.randn(2, 3, 1, 5, 6, generator=gen, dtype=torch.float64)
    for beta in (2.0, 0.0, -1.5):
        hd = h.to(device).requires_grad_()
        bd = torch.tensor(beta, dtype=torch.float64, device=device, requires_grad=True)
        kp, values = run(backend, kpfast.soft_argmax, hd, r.to(device), beta=bd)
        ref_kp, ref_v = soft_argmax_reference(h, r, beta=beta)
        assert_close(kp.detach().cpu(), ref_kp, rtol=1e-9, atol=1e-12, what=f"keypoints beta={beta}", seed=seed)
        assert_close(values.detach().cpu(), ref_v, rtol=1e-9, atol=1e-12, what=f"values beta={beta}", seed=seed)
        gh, gb = torch.autograd.grad(kp.sum() + values.sum(), (hd, bd))
        assert torch.isfinite(gh).all() and torch.isfinite(gb).all(), f"beta={beta} (seed {seed})"
        assert (gh.cpu()[mask] == 0).all()
    kp, _ = run(backend, kpfast.soft_argmax, h.to(device), None, beta=0.0)
    ys = torch.linspace(-1, 1, 5, dtype=torch.float64)[:, None].expand(5, 6)
    xs = torch.linspace(-1, 1, 6, dtype=torch.float64)[None, :].expand(5, 6)
    keep = (~mask).double()
    mean = torch.stack([(xs * keep).sum((-1, -2)), (ys * keep).sum((-1, -2))], -1) / keep.sum((-1, -2))[..., None]
    assert_close(kp.cpu(), mean, rtol=1e-12, atol=1e-12, what="beta = 0 mean", seed=seed)


@pytest.mark.parametrize("backend", BACKENDS)
def test_row_masked_everywhere_is_nan_and_others_are_not(backend):
    """Documented: a row of -inf has no softmax; its keypoint and values are NaN (as torch.softmax)."""
    device = device_for(backend)
    gen, seed = seeded_generator()
    h = torch.randn(1, 3, 4, 5, generator=gen, dtype=torch.float64)
    h[0, 1] = float("-inf")
    r = torch.randn(1, 3, 2, 4, 5, generator=gen, dtype=torch.float64)
    hd = h.to(device).requires_grad_()
    kp, values = run(backend, kpfast.soft_argmax, hd, r.to(device))
    assert torch.isnan(kp[0, 1]).all() and torch.isnan(values[0, 1]).all()
    assert torch.isfinite(kp[0, [0, 2]]).all() and torch.isfinite(values[0, [0, 2]]).all()
    ref_kp, _ = soft_argmax_reference(h, r)
    assert torch.equal(torch.isnan(kp.detach().cpu()), torch.isnan(ref_kp))
    (g,) = torch.autograd.grad(kp[0, [0, 2]].sum() + values[0, [0, 2]].sum(), hd)
    assert torch.isfinite(g[0, [0, 2]]).all(), f"seed {seed}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_is_not_hidden(backend):
    """NaN anywhere in a heatmap row makes the row NaN; NaN in a readout map makes its value NaN."""
    device = device_for(backend)
    gen, seed = seeded_generator()
    h = torch.randn(1, 3, 4, 5, generator=gen, dtype=torch.float64)
    r = torch.randn(1, 3, 2, 4, 5, generator=gen, dtype=torch.float64)
    h[0, 0, 2, 2] = float("nan")
    h[0, 2, 1, 1] = float("inf")
    r[0, 1, 1, 3, 4] = float("nan")
    kp, values = run(backend, kpfast.soft_argmax, h.to(device), r.to(device))
    kp, values = kp.cpu(), values.cpu()
    assert torch.isnan(kp[0, 0]).all() and torch.isnan(values[0, 0]).all()
    assert torch.isnan(kp[0, 2]).all() and torch.isnan(values[0, 2]).all()
    assert torch.isfinite(kp[0, 1]).all() and torch.isfinite(values[0, 1, 0]) and torch.isnan(values[0, 1, 1])
    ref_kp, ref_v = soft_argmax_reference(h, r)
    assert torch.equal(torch.isnan(kp), torch.isnan(ref_kp)) and torch.equal(torch.isnan(values), torch.isnan(ref_v))


@pytest.mark.parametrize("backend, nan_rule", nan_rule_cases())
@pytest.mark.parametrize("use", ["keypoints", "values", "both"])
def test_nan_gradients_match_the_reference(backend, nan_rule, use):
    """Documented: gradients are those of autograd through the reference. Row 0 has a NaN logit,
    row 1 is masked everywhere, row 2 a NaN readout and masked pixels, row 3 is finite: a masked
    pixel's heatmap gradient is 0 (not 0 * NaN), and a NaN readout reaches no gradient when the
    values are not used."""
    device = device_for(backend)
    gen, seed = seeded_generator()
    h = torch.randn(1, 4, 4, 5, generator=gen, dtype=torch.float64)
    r = torch.randn(1, 4, 2, 4, 5, generator=gen, dtype=torch.float64)
    h[0, 0, 2, 2] = float("nan")
    h[0, 1] = float("-inf")
    h[0, 2, 0, :3] = float("-inf")
    r[0, 2, 1, 0, 1] = float("nan")  # under a masked pixel
    r[0, 2, 0, 3, 4] = float("nan")
    leaves = [t.to(device).requires_grad_() for t in (h, r, torch.tensor(1.3, dtype=torch.float64))]
    with interpreter_min_max_nan(nan_rule):
        out = run(backend, kpfast.soft_argmax, *leaves[:2], beta=leaves[2])
        used = {"keypoints": out[0].sum(), "values": out[1].sum(), "both": out[0].sum() + out[1].sum()}[use]
        got = torch.autograd.grad(used, leaves, allow_unused=True)
    ref_leaves = [t.detach().cpu().requires_grad_() for t in leaves]
    ref = soft_argmax_reference(*ref_leaves[:2], beta=ref_leaves[2])
    want = torch.autograd.grad({"keypoints": ref[0].sum(), "values": ref[1].sum(), "both": ref[0].sum() + ref[1].sum()}[use],
                               ref_leaves, allow_unused=True)
    for name, g, w, leaf in zip(("heatmaps", "readouts", "beta"), got, want, ref_leaves):
        g = torch.zeros_like(leaf) if g is None else g.cpu()
        w = torch.zeros_like(leaf) if w is None else w
        assert torch.equal(torch.isnan(g), torch.isnan(w)), f"d/d{name} (seed {seed}): NaN at {torch.isnan(g)}, reference {torch.isnan(w)}"
        assert_close(g.nan_to_num(), w.nan_to_num(), rtol=1e-9, atol=1e-12, what=f"d/d{name}", seed=seed)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("beta", [1e2, 1e4, 1e10])
def test_float32_heatmap_gradient_keeps_its_precision_at_large_beta(backend, beta):
    """Issue 11: the C++ backward formed gx x - gx kx, whose rounding error (~eps |gx|) beta multiplied:
    error 7e-5 at beta 1e4 and 72 at 1e10 where the true gradient is about 0. Now no worse than the
    float32 reference."""
    gen, seed = seeded_generator()
    h = torch.randn(2, 4, 16, 16, generator=gen)
    r = torch.randn(2, 4, 2, 16, 16, generator=gen)
    gk, gv = torch.randn(2, 4, 2, generator=gen, dtype=torch.float64), torch.randn(2, 4, 2, generator=gen, dtype=torch.float64)

    def grad(fn, dtype, device="cpu"):
        hh = h.to(device, dtype).requires_grad_()
        kp, v = fn(hh, r.to(device, dtype), beta=beta)
        return torch.autograd.grad((kp.double().cpu() * gk).sum() + (v.double().cpu() * gv).sum(), hh)[0].double().cpu()

    truth = grad(soft_argmax_reference, torch.float64)
    ref_err = (grad(soft_argmax_reference, torch.float32) - truth).abs().max().item()
    err = (grad(lambda *a, **k: run(backend, kpfast.soft_argmax, *a, **k), torch.float32, device_for(backend)) - truth).abs().max().item()
    assert err <= 4 * ref_err + 1e-6, f"beta={beta} (seed {seed}): error {err:.3g}, float32 reference {ref_err:.3g}"


@pytest.mark.skipif(not interpreting_triton(), reason="counts host reads on CPU tensors in the Triton interpreter")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layout", ["stacked", "scattered"])
def test_no_host_syncs_or_copies_per_call(dtype, layout):
    """The Triton path on CPU tensors, counting what would sync or copy on CUDA (issue 16.3): a float
    beta in float64 was copied to the device on every call (a CUDA graph cannot capture that); the
    offset table of scattered readouts is copied once per layout (test_device_constants_...)."""
    gen, _ = seeded_generator()
    args, _ = make_problem(gen, dtype=dtype, layout=layout, beta="float")
    out = run("triton", call, args)
    with calls_from_kpfast() as counts:
        out = run("triton", call, args)
        loss(out, *outputs_and_cotangents(out, gen)).backward()
    assert not counts, f"host reads or tensors built from Python values: {dict(counts)}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_degenerate_shapes(backend):
    """One-pixel rows and columns, K = 1, an empty batch, C = 0 and a 1 x 1 map."""
    device = device_for(backend)
    gen, seed = seeded_generator()
    for B, K, C, H, W in [(2, 1, 1, 1, 7), (1, 2, 3, 6, 1), (1, 1, 2, 1, 1), (0, 3, 2, 4, 4), (2, 0, 1, 3, 3), (1, 2, 0, 3, 5)]:
        h = torch.randn(B, K, H, W, generator=gen, dtype=torch.float64)
        r = torch.randn(B, K, C, H, W, generator=gen, dtype=torch.float64)
        hd, rd = h.to(device).requires_grad_(), r.to(device).requires_grad_()
        kp, values = run(backend, kpfast.soft_argmax, hd, rd, beta=1.7)
        ref_kp, ref_v = soft_argmax_reference(h, r, beta=1.7)
        assert kp.shape == (B, K, 2) and values.shape == (B, K, C)
        assert_close(kp.detach().cpu(), ref_kp, rtol=1e-9, atol=1e-12, what=f"{(B, K, C, H, W)}", seed=seed)
        assert_close(values.detach().cpu(), ref_v, rtol=1e-9, atol=1e-12, what=f"{(B, K, C, H, W)}", seed=seed)
        gh, gr = torch.autograd.grad(kp.sum() + values.sum(), (hd, rd), allow_unused=True, materialize_grads=True)
        assert gh.shape == h.shape and gr.shape == r.shape
        assert torch.isfinite(gh).all() and torch.isfinite(gr).all()
    # a single pixel takes all the weight: its gradient to the heatmap is zero
    h = torch.randn(1, 1, 1, 1, dtype=torch.float64, device=device, requires_grad=True)
    kp, _ = run(backend, kpfast.soft_argmax, h)
    assert (kp == -1).all()
    assert (torch.autograd.grad(kp.sum(), h)[0] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_and_transposed_maps(backend):
    """Channel slices are read in place; maps whose planes are not contiguous (a transpose) are copied first."""
    device = device_for(backend)
    gen, seed = seeded_generator()
    base = torch.randn(2, 9, 6, 5, generator=gen, dtype=torch.float64).to(device)
    heat = base[:, 0:3].transpose(-1, -2)  # [2, 3, 5, 6], planes not contiguous
    readouts = [base[:, 3:6].transpose(-1, -2), base[:, 6:9].transpose(-1, -2).contiguous()]
    kp, values = run(backend, kpfast.soft_argmax, heat, readouts, beta=0.9)
    ref_kp, ref_v = soft_argmax_reference(heat.cpu(), [t.cpu() for t in readouts], beta=0.9)
    assert_close(kp.cpu(), ref_kp, rtol=1e-9, atol=1e-12, what="keypoints", seed=seed)
    assert_close(values.cpu(), ref_v, rtol=1e-9, atol=1e-12, what="values", seed=seed)
    expanded = torch.randn(1, 1, 4, 5, generator=gen, dtype=torch.float64).to(device).expand(3, 2, 4, 5)
    kp, _ = run(backend, kpfast.soft_argmax, expanded)
    assert_close(kp.cpu(), soft_argmax_reference(expanded.cpu())[0], rtol=1e-9, atol=1e-12, what="expanded", seed=seed)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_sequence_of_readouts_is_never_stacked(backend, monkeypatch):
    gen, seed = seeded_generator()
    problem, _ = make_problem(gen, device=device_for(backend), layout="list")
    want = run(backend, call, problem)

    def refuse(*args, **kwargs):
        raise AssertionError("readouts were copied into a stacked tensor")

    monkeypatch.setattr(torch, "stack", refuse)
    monkeypatch.setattr(torch, "cat", refuse)
    got = run(backend, call, problem)
    torch.autograd.grad(got[0].sum() + got[1].sum(), problem["readouts"])
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


# The Triton interpreter computes bf16/fp16 arithmetic wrongly (docs/architecture.md): half precision on Triton is a GPU test.
@pytest.mark.parametrize("backend", ["cpp", pytest.param("triton", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_return_half_outputs_close_to_float32(backend, dtype):
    gen, seed = seeded_generator()
    problem, leaves = make_problem(gen, dtype=dtype, device=device_for(backend), layout="stacked", scale=1.0)
    kp, values = run(backend, call, problem)
    assert kp.dtype == dtype and values.dtype == dtype
    (ref_kp, ref_v), copies = reference_copy(leaves, problem, dtype=torch.float32)
    assert_close(kp.float().cpu(), ref_kp.detach(), rtol=1e-2, atol=1e-2, what=f"{dtype} keypoints", seed=seed)
    assert_close(values.float().cpu(), ref_v.detach(), rtol=1e-2, atol=2e-2, what=f"{dtype} values", seed=seed)
    grads = torch.autograd.grad(kp.float().sum() + values.float().sum(), list(leaves.values()))
    want = torch.autograd.grad(ref_kp.sum() + ref_v.sum(), list(copies.values()))
    for name, g, w in zip(leaves, grads, want):
        assert g.dtype == dtype and torch.isfinite(g).all(), name
        assert_close(g.float().cpu(), w, rtol=2e-2, atol=2e-2 * (1 + w.abs().max().item()), what=f"d/d{name}", seed=seed)


@pytest.mark.parametrize(
    "change, error, words",
    [
        (dict(heatmaps=torch.zeros(3, 4, 5)), ValueError, "heatmaps"),
        (dict(heatmaps=torch.zeros(1, 3, 4, 5, dtype=torch.int64)), TypeError, "heatmaps"),
        (dict(heatmaps=[[0.0]]), TypeError, "heatmaps"),
        (dict(heatmaps=torch.zeros(1, 3, 0, 5)), ValueError, "heatmaps"),
        (dict(readouts=torch.zeros(1, 3, 4, 5)), ValueError, "readouts"),
        (dict(readouts=torch.zeros(1, 3, 2, 4, 6)), ValueError, "readouts"),
        (dict(readouts=torch.zeros(2, 3, 2, 4, 5)), ValueError, "readouts"),
        (dict(readouts=torch.zeros(1, 3, 2, 4, 5, dtype=torch.float64)), TypeError, "readouts"),
        (dict(readouts=[torch.zeros(1, 3, 4, 5), torch.zeros(1, 2, 4, 5)]), ValueError, r"readouts\[1\]"),
        (dict(readouts=[torch.zeros(1, 3, 4, 5, dtype=torch.int32)]), TypeError, r"readouts\[0\]"),
        (dict(readouts=[torch.zeros(1, 3, 4, 5, dtype=torch.float16)]), TypeError, r"readouts\[0\]"),
        (dict(readouts=[torch.zeros(1, 3, 1, 4, 5)]), ValueError, r"readouts\[0\]"),
        (dict(readouts=["depth"]), TypeError, r"readouts\[0\]"),
        (dict(readouts="depth"), TypeError, "readouts"),
        (dict(readouts=torch.zeros(1, 3, 2, 4, 5, device="meta")), ValueError, "device"),
        (dict(beta=torch.ones(2)), ValueError, "beta"),
        (dict(beta=torch.ones(1, 1)), ValueError, "beta"),
        (dict(beta=torch.tensor(1)), TypeError, "beta"),
        (dict(beta=float("nan")), ValueError, "beta"),
        (dict(beta=float("inf")), ValueError, "beta"),
        (dict(beta="hot"), TypeError, "beta"),
        (dict(beta=True), TypeError, "beta"),
        (dict(beta=torch.tensor(1.0, device="meta")), ValueError, "device"),
        (dict(heatmaps=torch.zeros(1, 1, 1, 1).expand(1, 1, 46341, 46341)), ValueError, "2\\^31"),
    ],
)
@pytest.mark.parametrize("backend", ["cpp", "reference"])
def test_bad_input_raises_naming_the_argument(backend, change, error, words, monkeypatch):
    def no_launch(*args, **kwargs):
        raise AssertionError("a kernel ran before validation")

    monkeypatch.setattr(op_module, "kernels", no_launch)
    args = dict(heatmaps=torch.zeros(1, 3, 4, 5), readouts=None, beta=1.0)
    args.update(change)
    with pytest.raises(error, match=words):
        run(backend, kpfast.soft_argmax, args.pop("heatmaps"), args.pop("readouts"), **args)


def test_triton_on_cpu_without_interpreter_says_how(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        run("triton", kpfast.soft_argmax, torch.zeros(1, 2, 3, 3))


@pytest.mark.parametrize("backend", BACKENDS)
def test_memory_kept_for_backward_is_inputs_plus_per_row_numbers(backend):
    """Saved for backward beyond the inputs: keypoints, values and (max, normalizer), O(B*K*C) numbers."""
    gen, _ = seeded_generator()
    B, K, C, H, W = 2, 3, 2, 12, 20
    problem, leaves = make_problem(gen, B=B, K=K, C=C, H=H, W=W, dtype=torch.float32, device=device_for(backend),
                                   layout="list")
    inputs = {t.data_ptr() for t in leaves.values()}
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = run(backend, call, problem)
    extra = sum(t.numel() * t.element_size() for t in saved if t.data_ptr() not in inputs)
    per_row = (2 + C + 2) * 4
    assert extra <= B * K * per_row + 64, f"kept {extra} bytes for backward"
    assert len({t.data_ptr() for t in saved} & inputs) == len(inputs), "inputs are saved by reference"
    # the reference keeps at least the softmax weights, B*K*H*W numbers
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        saved.clear()
        ref, _ = reference_copy(leaves, problem)
    assert sum(t.numel() * t.element_size() for t in saved) >= B * K * H * W * 4
    (out[0].sum() + out[1].sum()).backward()


def test_docstring_examples_run():
    for fn in (kpfast.soft_argmax, soft_argmax_reference):
        finder = doctest.DocTestFinder()
        runner = doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE)
        for test in finder.find(fn, globs={"torch": torch, "soft_argmax_reference": soft_argmax_reference}):
            runner.run(test)
        assert runner.failures == 0 and runner.tries > 0, fn.__name__


def test_public_export():
    assert kpfast.soft_argmax is op_module.soft_argmax is kpfast.ops.soft_argmax and "soft_argmax" in kpfast.__all__
    assert math.isclose(float(kpfast.soft_argmax(torch.zeros(1, 1, 3, 3))[0].abs().sum()), 0.0, abs_tol=1e-7)
