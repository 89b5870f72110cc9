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
