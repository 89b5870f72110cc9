"""hypothesis properties of kpfast.soft_argmax, on every kernel family."""

from __future__ import annotations

import hypothesis.strategies as st
import pytest
import torch

import kpfast
from kpfast.reference import pixel_centers, soft_argmax_reference

from _util import device_for, kernel_backends, run, property_test as _property_test

BACKENDS = kernel_backends()
EXAMPLES = {"cpp": 60, "triton": 20}
logit = st.floats(-30, 30, allow_nan=False, width=64)

pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # interpreter, masked lanes


@st.composite
def problems(draw, max_k=3, max_c=3, max_side=9):
    K = draw(st.integers(1, max_k))
    C = draw(st.integers(0, max_c))
    H, W = draw(st.integers(1, max_side)), draw(st.integers(1, max_side))
    h = torch.tensor(draw(st.lists(logit, min_size=K * H * W, max_size=K * H * W)), dtype=torch.float64).reshape(1, K, H, W)
    if draw(st.booleans()):  # mask some pixels, keeping one per row
        mask = torch.tensor(draw(st.lists(st.booleans(), min_size=K * H * W, max_size=K * H * W))).reshape(1, K, H, W)
        keep = draw(st.integers(0, H * W - 1))
        mask.view(1, K, H * W)[..., keep] = False
        h[mask] = float("-inf")
    values = st.floats(-10, 10, allow_nan=False, width=64)
    r = torch.tensor(draw(st.lists(values, min_size=K * C * H * W, max_size=K * C * H * W)), dtype=torch.float64)
    r = r.reshape(1, K, C, H, W)
    beta = draw(st.floats(0.05, 5.0))
    as_list = draw(st.booleans())
    return dict(h=h, r=r, beta=beta, as_list=as_list)


def soft_argmax(backend, p, **change):
    q = {**p, **change}
    dev = device_for(backend)
    r = q["r"].to(dev)
    readouts = list(r.unbind(2)) if q["as_list"] else r
    kp, values = run(backend, kpfast.soft_argmax, q["h"].to(dev), readouts, beta=q["beta"])
    return kp.cpu(), values.cpu()


property_test = _property_test(problems(), EXAMPLES)


@property_test
def test_matches_reference(backend, p):
    """Every kernel computes the reference function on any valid input."""
    kp, values = soft_argmax(backend, p)
    ref_kp, ref_v = soft_argmax_reference(p["h"], p["r"], beta=p["beta"])
    torch.testing.assert_close(kp, ref_kp, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(values, ref_v, rtol=1e-9, atol=1e-11)


@property_test
def test_one_hot_heatmap_with_large_beta_returns_that_pixel(backend, p):
    """A pixel that leads by 1 with beta = 200 takes all the weight: its centre and its readouts come back."""
    _, K, H, W = p["h"].shape
    idx = torch.arange(K) * 7 % (H * W)  # one pixel per row, a different one for each keypoint
    h = torch.rand(1, K, H * W, dtype=torch.float64)
    h[0, torch.arange(K), idx] = 2.0
    kp, values = soft_argmax(backend, p, h=h.reshape(1, K, H, W), beta=200.0)
    i, j = idx // W, idx % W
    want = torch.stack([pixel_centers(W, torch.float64)[j], pixel_centers(H, torch.float64)[i]], -1)[None]
    torch.testing.assert_close(kp, want, rtol=0, atol=1e-12)
    r = p["r"].reshape(1, K, -1, H * W)
    torch.testing.assert_close(values, r[0, torch.arange(K), :, idx][None], rtol=0, atol=1e-12)


@property_test
def test_adding_a_constant_to_a_heatmap_changes_nothing(backend, p):
    K = p["h"].shape[1]
    shift = torch.linspace(-40.0, 40.0, K, dtype=torch.float64).reshape(1, K, 1, 1)
    kp, values = soft_argmax(backend, p, h=p["h"] + shift)
    want_kp, want_v = soft_argmax(backend, p)
    torch.testing.assert_close(kp, want_kp, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(values, want_v, rtol=1e-9, atol=1e-11)


@property_test
def test_results_lie_in_the_convex_hull(backend, p):
    """Keypoints inside the grid's bounding box, each value between its map's min and max (over unmasked pixels)."""
    kp, values = soft_argmax(backend, p)
    _, K, H, W = p["h"].shape
    eps = 1e-12
    xs, ys = pixel_centers(W, torch.float64), pixel_centers(H, torch.float64)
    assert (kp[..., 0] >= xs.min() - eps).all() and (kp[..., 0] <= xs.max() + eps).all()
    assert (kp[..., 1] >= ys.min() - eps).all() and (kp[..., 1] <= ys.max() + eps).all()
    unmasked = (p["h"] > float("-inf")).unsqueeze(2)
    r = p["r"]
    lo = torch.where(unmasked, r, float("inf")).amin((-1, -2))
    hi = torch.where(unmasked, r, float("-inf")).amax((-1, -2))
    assert (values >= lo - 1e-9).all() and (values <= hi + 1e-9).all()


@property_test
def test_mirroring_the_maps_mirrors_x(backend, p):
    kp, values = soft_argmax(backend, p, h=p["h"].flip(-1), r=p["r"].flip(-1))
    want_kp, want_v = soft_argmax(backend, p)
    W = p["h"].shape[-1]
    x = want_kp[..., 0] if W == 1 else -want_kp[..., 0]
    torch.testing.assert_close(kp, torch.stack([x, want_kp[..., 1]], -1), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(values, want_v, rtol=1e-9, atol=1e-11)


@property_test
def test_permuting_keypoints_permutes_outputs(backend, p):
    K = p["h"].shape[1]
    perm = torch.randperm(K)
    kp, values = soft_argmax(backend, p, h=p["h"][:, perm], r=p["r"][:, perm])
    want_kp, want_v = soft_argmax(backend, p)
    assert torch.equal(kp, want_kp[:, perm]) and torch.equal(values, want_v[:, perm])


@property_test
def test_heatmap_gradient_sums_to_zero_per_row(backend, p):
    """Shift invariance, differentiated: the gradient to each heatmap sums to zero over its pixels."""
    dev = device_for(backend)
    h = p["h"].to(dev).requires_grad_()
    with kpfast.use_backend(backend):
        kp, values = kpfast.soft_argmax(h, p["r"].to(dev), beta=p["beta"])
    gk = torch.randn(kp.shape, dtype=torch.float64, device=dev)
    gv = torch.randn(values.shape, dtype=torch.float64, device=dev)
    (g,) = torch.autograd.grad((kp * gk).sum() + (values * gv).sum(), h)
    scale = 1.0 + p["beta"] * (1.0 + p["r"].abs().max().item() if p["r"].numel() else 1.0)
    assert g.sum((-1, -2)).abs().max().item() <= 1e-12 * scale * g[0, 0].numel()
    assert torch.isfinite(g).all()


# ----------------------------------------------------------------------------------------------------
# Degenerate and non-finite inputs: the documented semantics (kpfast.soft_argmax's docstring, README
# "Non-finite and degenerate inputs"), on the C++ and Triton kernels and on the reference itself.

SPECIAL_EXAMPLES = {"cpp": 50, "triton": 12, "reference": 30}


@st.composite
def special_problems(draw, nonfinite: bool):
    """Small maps with masked pixels (rows masked everywhere included), ties, large logits, one-pixel
    sides, beta of any sign or 0; with NaN and +-inf in heatmaps and NaN in readouts when ``nonfinite``."""
    B, K, C = draw(st.integers(1, 2)), draw(st.integers(1, 3)), draw(st.integers(0, 2))
    H, W = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    n = B * K * H * W
    heat_specials = [float("-inf")] + ([float("nan"), float("inf")] if nonfinite else [])
    level = st.sampled_from([0.0, 1.0, -3.0, 1e4, -1e4])

    def entry(finite, specials, one_in):
        return draw(st.sampled_from(specials)) if specials and draw(st.integers(0, one_in)) == 0 else draw(finite)

    h = torch.tensor([entry(st.one_of(level, logit), heat_specials, 4) for _ in range(n)], dtype=torch.float64)
    r = torch.tensor([entry(st.floats(-10, 10), [float("nan")] if nonfinite else [], 6) for _ in range(n * C)],
                     dtype=torch.float64)
    return dict(h=h.reshape(B, K, H, W), r=r.reshape(B, K, C, H, W), beta=draw(st.sampled_from([0.0, -1.5, 0.7, 3.0])),
                as_list=draw(st.booleans()), use=draw(st.sampled_from(["keypoints", "values", "both"])),
                beta_tensor=draw(st.booleans()))


def outputs_and_gradients(backend, p):
    """(keypoints, values, {name: gradient}) of the used outputs' sum; on CPU."""
    dev = device_for(backend)
    h, r = p["h"].to(dev).requires_grad_(), p["r"].to(dev).requires_grad_()
    beta = torch.tensor(p["beta"], dtype=torch.float64, device=dev, requires_grad=True) if p["beta_tensor"] else p["beta"]
    kp, values = run(backend, kpfast.soft_argmax, h, list(r.unbind(2)) if p["as_list"] else r, beta=beta)
    used = {"keypoints": kp.sum(), "values": values.sum(), "both": kp.sum() + values.sum()}[p["use"]]
    leaves = {"heatmaps": h, "readouts": r, **({"beta": beta} if p["beta_tensor"] else {})}
    grads = torch.autograd.grad(used, list(leaves.values()), allow_unused=True)
    grads = {k: (torch.zeros_like(v) if g is None else g).detach().cpu() for (k, v), g in zip(leaves.items(), grads)}
    return kp.detach().cpu(), values.detach().cpu(), grads


@_property_test(special_problems(nonfinite=True), SPECIAL_EXAMPLES)
def test_non_finite_inputs_follow_the_documented_rule(backend, p):
    """A logit beta*h of NaN or +inf in a row, or a row masked everywhere: NaN keypoint and values; NaN in a readout: that
    value NaN; a masked pixel's heatmap gradient is 0; a NaN readout reaches no gradient when the values
    are not used; and kernels give the reference's NaN values and gradients exactly where it does."""
    kp, values, grads = outputs_and_gradients(backend, p)
    h, r = p["h"], p["r"]
    masked = h == float("-inf")
    z = torch.where(masked, float("-inf"), p["beta"] * h)  # the logits, as documented
    row_nan = (torch.isnan(z) | (z == float("inf"))).any((-1, -2)) | (z == float("-inf")).all((-1, -2))
    assert torch.isnan(kp[row_nan]).all() and torch.isnan(values[row_nan]).all()
    readout_nan = torch.isnan(r).any((-1, -2))
    assert torch.isfinite(kp[~row_nan]).all()
    assert torch.equal(torch.isnan(values), row_nan[..., None] | readout_nan) or not values.numel()
    assert (grads["heatmaps"][masked] == 0).all(), "a masked pixel got a heatmap gradient"
    if p["use"] == "keypoints":
        rows = ~row_nan[..., None, None].expand_as(h)
        assert torch.isfinite(grads["heatmaps"][rows]).all(), "a NaN readout reached the gradient of unused values"
    if backend == "reference":
        return
    _, _, ref_grads = outputs_and_gradients("reference", p)
    ref_kp, ref_v = soft_argmax_reference(p["h"], p["r"], beta=p["beta"])
    for name, a, w in [("keypoints", kp, ref_kp), ("values", values, ref_v)] + [(f"d/d{k}", grads[k], ref_grads[k]) for k in grads]:
        assert torch.equal(torch.isnan(a), torch.isnan(w)), f"{name}: NaN at {torch.isnan(a)}, reference {torch.isnan(w)}"
        ok = torch.isfinite(w)
        torch.testing.assert_close(a[ok], w[ok], rtol=1e-7, atol=1e-9, msg=name)


@_property_test(special_problems(nonfinite=False), SPECIAL_EXAMPLES)
def test_degenerate_inputs_give_finite_results(backend, p):
    """Ties, logits of +-1e4, masked pixels, one-pixel sides, beta 0 or negative: finite keypoints,
    values and gradients wherever a row keeps an unmasked pixel, and the reference's values."""
    kp, values, grads = outputs_and_gradients(backend, p)
    live = ~(p["h"] == float("-inf")).all((-1, -2))
    assert torch.isfinite(kp[live]).all() and torch.isfinite(values[live]).all()
    rows = live[..., None, None].expand_as(p["h"])
    assert torch.isfinite(grads["heatmaps"][rows]).all()
    assert torch.isfinite(grads["readouts"][live[..., None, None, None].expand_as(p["r"])]).all()
    if backend != "reference":
        ref_kp, ref_v = soft_argmax_reference(p["h"], p["r"], beta=p["beta"])
        torch.testing.assert_close(kp, ref_kp, rtol=1e-9, atol=1e-12, equal_nan=True)
        torch.testing.assert_close(values, ref_v, rtol=1e-9, atol=1e-11, equal_nan=True)
