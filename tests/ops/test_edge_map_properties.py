"""hypothesis properties of kpfast.edge_map, on every kernel family."""

from __future__ import annotations

import hypothesis.strategies as st
import torch
from hypothesis import assume

import kpfast
from kpfast.reference import EDGE_EPS, edge_map_reference, pixel_centers

from _util import device_for, kernel_backends, run, property_test as _property_test

BACKENDS = kernel_backends()
EXAMPLES = {"cpp": 60, "triton": 8}
coord = st.floats(-1.5, 1.5, allow_nan=False, width=64)


@st.composite
def problems(draw, max_k=5, max_e=6, max_side=9):
    K = draw(st.integers(1, max_k))
    E = draw(st.integers(1, max_e))
    H, W = draw(st.integers(1, max_side)), draw(st.integers(1, max_side))
    kp = torch.tensor(draw(st.lists(st.tuples(coord, coord), min_size=K, max_size=K)), dtype=torch.float64)[None]
    edges = torch.tensor(draw(st.lists(st.tuples(st.integers(0, K - 1), st.integers(0, K - 1)), min_size=E, max_size=E)))
    unc = torch.tensor(draw(st.lists(st.floats(-8, 8), min_size=K, max_size=K)), dtype=torch.float64)[None] if draw(st.booleans()) else None
    w = torch.tensor(draw(st.lists(st.floats(0, 4), min_size=E, max_size=E)), dtype=torch.float64) if draw(st.booleans()) else None
    s2 = draw(st.floats(1e-3, 1.0))
    mode = draw(st.sampled_from(["intensity", "precision"]))
    return dict(kp=kp, edges=edges, size=(H, W), uncertainty=unc, edge_weight=w, sigma2=s2, mode=mode)


def render(backend, p, **change):
    q = {**p, **change}
    dev = device_for(backend)
    to = lambda t: None if t is None else t.to(dev)  # noqa: E731
    out = run(backend, kpfast.edge_map, to(q["kp"]), to(q["edges"]), q["size"], uncertainty=to(q["uncertainty"]),
              edge_weight=to(q["edge_weight"]), sigma2=q["sigma2"], mode=q["mode"])
    return out.cpu()


property_test = _property_test(problems(), EXAMPLES)


@property_test
def test_matches_reference(backend, p):
    """Every kernel computes the reference function on any valid input."""
    ref = edge_map_reference(p["kp"], p["edges"], p["size"], uncertainty=p["uncertainty"], edge_weight=p["edge_weight"],
                             sigma2=p["sigma2"], mode=p["mode"])
    torch.testing.assert_close(render(backend, p), ref, rtol=1e-9, atol=1e-12)


@property_test
def test_output_lies_in_zero_to_max_weight(backend, p):
    out = render(backend, p)
    top = 1.0 if p["edge_weight"] is None else p["edge_weight"].max().item()
    assert (out >= 0).all() and (out <= top * (1 + 1e-12)).all()


@property_test
def test_permuting_edges_changes_nothing(backend, p):
    perm = torch.randperm(p["edges"].shape[0])
    w = p["edge_weight"]
    out = render(backend, p, edges=p["edges"][perm], edge_weight=None if w is None else w[perm])
    assert torch.equal(out, render(backend, p))


@property_test
def test_swapping_endpoints_changes_nothing(backend, p):
    """Up to rounding; a zero-length edge (|b - a|^2 < EDGE_EPS) takes its uncertainty from its first endpoint."""
    a, b = p["kp"][0, p["edges"][:, 0]], p["kp"][0, p["edges"][:, 1]]
    assume(p["uncertainty"] is None or bool((((b - a) ** 2).sum(-1) >= EDGE_EPS).all()))
    out = render(backend, p, edges=p["edges"].flip(-1))
    torch.testing.assert_close(out, render(backend, p), rtol=1e-7, atol=1e-10)


@property_test
def test_adding_an_edge_never_lowers_a_pixel(backend, p):
    K = p["kp"].shape[1]
    extra = torch.randint(0, K, (1, 2))
    w = p["edge_weight"]
    more = render(backend, p, edges=torch.cat([p["edges"], extra]), edge_weight=None if w is None else torch.cat([w, w[:1]]))
    assert (more >= render(backend, p)).all()


@property_test
def test_whole_pixel_shift_shifts_the_map(backend, p):
    H, W = p["size"]
    assume(H > 2 and W > 2)
    dy, dx = 1, 2 if W > 3 else 1
    step = torch.tensor([2.0 / (W - 1), 2.0 / (H - 1)], dtype=torch.float64)
    shifted = render(backend, p, kp=p["kp"] + torch.tensor([dx, dy]) * step)
    torch.testing.assert_close(shifted[:, dy:, dx:], render(backend, p)[:, : H - dy, : W - dx], rtol=1e-7, atol=1e-9)


def test_pixel_centres_follow_align_corners():
    assert torch.equal(pixel_centers(5, torch.float64), torch.tensor([-1.0, -0.5, 0.0, 0.5, 1.0], dtype=torch.float64))


# ----------------------------------------------------------------------------------------------------
# Degenerate and non-finite inputs: the documented semantics (kpfast.edge_map's docstring, README
# "Non-finite and degenerate inputs"), on the C++ and Triton kernels and on the reference itself.

SPECIALS = st.sampled_from([float("nan"), float("inf"), float("-inf")])
SPECIAL_EXAMPLES = {"cpp": 50, "triton": 12, "reference": 30}


@st.composite
def special_problems(draw, nonfinite: bool):
    """Small problems whose values come from a few levels (coincident keypoints, zero-length and
    repeated edges, zero weights, E = 0, K = 1), with NaN and infinities mixed in when ``nonfinite``."""
    B, K, E = draw(st.integers(1, 2)), draw(st.integers(1, 4)), draw(st.integers(0 if not nonfinite else 1, 4))
    H, W = draw(st.integers(1, 6)), draw(st.integers(1, 6))
    level = st.sampled_from([-1.0, 0.0, 0.5, 1.0, 2.5])

    def values(n, finite):
        out = []
        for _ in range(n):
            special = nonfinite and draw(st.integers(0, 5)) == 0
            out.append(draw(SPECIALS) if special else draw(finite))
        return out

    kp = torch.tensor(values(B * K * 2, st.one_of(level, coord)), dtype=torch.float64).reshape(B, K, 2)
    edges = torch.tensor(draw(st.lists(st.tuples(st.integers(0, K - 1), st.integers(0, K - 1)), min_size=E, max_size=E)),
                         dtype=torch.int64).reshape(E, 2)
    unc = torch.tensor(values(B * K, st.floats(-8, 8)), dtype=torch.float64).reshape(B, K) if draw(st.booleans()) else None
    weight = draw(st.sampled_from([None, "E", "BE"]))
    w_level = st.sampled_from([0.0, 1.0, 2.5])
    w = None if weight is None else torch.tensor(values(E if weight == "E" else B * E, w_level), dtype=torch.float64).reshape(
        (E,) if weight == "E" else (B, E))
    return dict(kp=kp, edges=edges, size=(H, W), uncertainty=unc, edge_weight=w, sigma2=draw(st.floats(1e-3, 1.0)),
                mode=draw(st.sampled_from(["intensity", "precision"])))


def render_with_gradients(backend, p):
    """(out, {name: gradient}) of sum(out) for every float input, sigma2 as a tensor; on CPU."""
    dev = device_for(backend)
    leaves = {k: p[k].to(dev).requires_grad_() for k in ("kp", "uncertainty", "edge_weight") if p[k] is not None}
    leaves["sigma2"] = torch.tensor(p["sigma2"], dtype=torch.float64, device=dev, requires_grad=True)
    out = run(backend, kpfast.edge_map, leaves["kp"], p["edges"].to(dev), p["size"], uncertainty=leaves.get("uncertainty"),
              edge_weight=leaves.get("edge_weight"), sigma2=leaves["sigma2"], mode=p["mode"])
    grads = torch.autograd.grad(out.sum(), list(leaves.values()))
    return out.detach().cpu(), {k: g.cpu() for k, g in zip(leaves, grads)}


def edge_inputs_bad(p, test) -> torch.Tensor:
    """``[B, E]``: whether ``test`` (isnan, or not isfinite) holds for any input of edge e in sample b."""
    kp, e = p["kp"], p["edges"]
    bad = test(kp[:, e]).flatten(2).any(-1)
    if p["uncertainty"] is not None:
        bad |= test(p["uncertainty"][:, e]).any(-1)
    if p["edge_weight"] is not None:
        bad |= test(p["edge_weight"]).expand(bad.shape)
    return bad


@_property_test(special_problems(nonfinite=True), SPECIAL_EXAMPLES)
def test_non_finite_inputs_follow_the_documented_rule(backend, p):
    """NaN in an edge's inputs makes every pixel of its sample NaN; NaN gradients reach only the inputs
    of edges with a non-finite input (and sigma2); and kernels give the reference's NaN (with +-inf:
    non-finite) values and gradients exactly where it does, the same finite values elsewhere."""
    out, grads = render_with_gradients(backend, p)
    nan_edge = edge_inputs_bad(p, torch.isnan)
    bad_edge = edge_inputs_bad(p, lambda t: ~torch.isfinite(t))
    for b in range(out.shape[0]):
        if nan_edge[b].any():
            assert torch.isnan(out[b]).all(), f"sample {b}: a NaN edge, finite pixels"
        if not bad_edge[b].any():
            assert torch.isfinite(out[b]).all(), f"sample {b}: finite edges, non-finite pixels"
    K = p["kp"].shape[1]
    touched = torch.zeros(out.shape[0], K, dtype=torch.bool)
    for end in (0, 1):
        touched |= (bad_edge[:, :, None] & (p["edges"][None, :, end, None] == torch.arange(K))).any(1)
    assert not (torch.isnan(grads["kp"]).any(-1) & ~touched).any(), "NaN gradient on a keypoint of finite edges only"
    if "uncertainty" in grads:
        assert not (torch.isnan(grads["uncertainty"]) & ~touched).any(), "NaN gradient on a logit of finite edges only"
    if "edge_weight" in grads:
        w_bad = bad_edge if grads["edge_weight"].dim() == 2 else bad_edge.any(0)
        assert not (torch.isnan(grads["edge_weight"]) & ~w_bad).any(), "NaN gradient on the weight of a finite edge"
    if not bad_edge.any():
        assert torch.isfinite(grads["sigma2"]), "finite inputs, non-finite sigma2 gradient"
    if backend == "reference":
        return
    ref, ref_grads = render_with_gradients("reference", p)
    same = torch.isnan if not any(torch.isinf(t).any() for t in (p["kp"], p["uncertainty"], p["edge_weight"]) if t is not None) \
        else (lambda t: ~torch.isfinite(t))
    for name, a, r in [("output", out, ref)] + [(f"d/d{k}", grads[k], ref_grads[k]) for k in grads]:
        assert torch.equal(same(a), same(r)), f"{name}: special values at {same(a)}, reference {same(r)}"
        ok = torch.isfinite(r)
        torch.testing.assert_close(a[ok], r[ok], rtol=1e-7, atol=1e-9, msg=name)


@_property_test(special_problems(nonfinite=False), SPECIAL_EXAMPLES)
def test_degenerate_inputs_give_finite_values_and_gradients(backend, p):
    """Coincident keypoints, zero-length and repeated edges, zero weights, E = 0, K = 1, points far
    outside: finite values and gradients, the reference's values (gradients may route a pixel whose
    edges tie within rounding to either edge, so only their finiteness is compared)."""
    out, grads = render_with_gradients(backend, p)
    assert torch.isfinite(out).all()
    for name, g in grads.items():
        assert torch.isfinite(g).all(), f"d/d{name}"
    if backend != "reference":
        ref, _ = render_with_gradients("reference", p)
        torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-12)
