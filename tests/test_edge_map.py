"""kpfast.edge_map: parity of every kernel with the reference, gradients, degenerate
inputs, validation, torch.compile/opcheck and memory kept for backward."""

from __future__ import annotations

import pytest
import torch

import kpfast
from kpfast.reference import edge_map_reference

from _util import assert_close, device_for, fresh_generator, kernel_backends, run, tolerances

BACKENDS = kernel_backends()


def make_problem(gen, *, B=2, K=6, E=9, H=11, W=19, dtype=torch.float64, device="cpu", uncertainty=True, weight="E"):
    """Random keypoints partly outside the image, random edges (self-edges included)."""
    kp = (torch.rand(B, K, 2, generator=gen, dtype=torch.float64) * 2.6 - 1.3).to(dtype)
    edges = torch.randint(0, K, (E, 2), generator=gen)
    unc = (torch.randn(B, K, generator=gen, dtype=torch.float64) * 2).to(dtype) if uncertainty else None
    if weight == "E":
        w = torch.rand(E, generator=gen, dtype=torch.float64).to(dtype)
    elif weight == "BE":
        w = torch.rand(B, E, generator=gen, dtype=torch.float64).to(dtype)
    else:
        w = None
    s2 = torch.tensor(0.02 + 0.1 * torch.rand((), generator=gen, dtype=torch.float64).item(), dtype=dtype)
    to = lambda t: None if t is None else t.to(device).requires_grad_()  # noqa: E731
    return dict(keypoints=to(kp), edges=edges.to(device), size=(H, W), uncertainty=to(unc), edge_weight=to(w), sigma2=to(s2))


def differentiable(problem):
    return [problem[k] for k in ("keypoints", "uncertainty", "edge_weight", "sigma2") if problem[k] is not None]


def call(problem, mode):
    p = dict(problem)
    return kpfast.edge_map(p.pop("keypoints"), p.pop("edges"), p.pop("size"), mode=mode, **p)


def reference(problem, mode, dtype=None):
    """The reference on CPU copies of the problem's leaves (optionally cast); returns (out, copies)."""
    p = {
        k: v.detach().cpu().to(dtype or v.dtype).requires_grad_() if isinstance(v, torch.Tensor) and v.is_floating_point() else v
        for k, v in problem.items()
    }
    p["edges"] = p["edges"].cpu()
    q = dict(p)
    out = edge_map_reference(q.pop("keypoints"), q.pop("edges"), q.pop("size"), mode=mode, **q)
    return out, p


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("mode", ["intensity", "precision"])
@pytest.mark.parametrize("uncertainty", [False, True])
@pytest.mark.parametrize("weight", [None, "E", "BE"])
def test_matches_reference_forward_and_backward(backend, dtype, mode, uncertainty, weight):
    gen, seed = fresh_generator()
    problem = make_problem(gen, dtype=dtype, device=device_for(backend), uncertainty=uncertainty, weight=weight)
    out = run(backend, call, problem, mode)
    ref, ref_problem = reference(problem, mode)
    tol = tolerances(dtype)
    assert out.dtype == dtype and out.shape == (2, 11, 19)
    assert_close(out.detach().cpu(), ref.detach(), **tol, what="forward", seed=seed)

    grad = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(dtype)
    got = torch.autograd.grad(out, differentiable(problem), grad.to(out.device))
    want = torch.autograd.grad(ref, differentiable(ref_problem), grad)
    names = [k for k in ("keypoints", "uncertainty", "edge_weight", "sigma2") if problem[k] is not None]
    for name, g, w in zip(names, got, want):
        assert g.dtype == w.dtype and g.shape == w.shape
        scale = 1.0 + w.abs().max().item()
        assert_close(g.cpu(), w, rtol=tol["rtol"], atol=tol["atol"] * scale, what=f"d/d{name}", seed=seed)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["intensity", "precision"])
def test_gradcheck_float64(backend, mode):
    gen, seed = fresh_generator()
    problem = make_problem(gen, B=2, K=4, E=5, H=6, W=7, device=device_for(backend), weight="BE")
    p = dict(problem)
    edges, size = p.pop("edges"), p.pop("size")

    def f(kp, unc, w, s2):
        return kpfast.edge_map(kp, edges, size, uncertainty=unc, edge_weight=w, sigma2=s2, mode=mode)

    with kpfast.use_backend(backend):
        ok = torch.autograd.gradcheck(
            f, (p["keypoints"], p["uncertainty"], p["edge_weight"], p["sigma2"]),
            eps=1e-6, atol=1e-5, rtol=1e-3, fast_mode=(backend == "triton"),
        )
    assert ok, f"gradcheck failed (seed {seed})"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["intensity", "precision"])
def test_degenerate_inputs_give_finite_values_and_gradients(backend, mode):
    device = device_for(backend)
    gen, seed = fresh_generator()
    kp = torch.rand(1, 3, 2, generator=gen, dtype=torch.float64).to(device) * 2 - 1
    kp[0, 2] = kp[0, 1]  # two coincident keypoints
    unc = torch.randn(1, 3, generator=gen, dtype=torch.float64).to(device)
    cases = {
        "self-edge": ([(0, 0)], kp),
        "coincident endpoints": ([(1, 2), (2, 1)], kp),
        "K = 1": ([(0, 0)], kp[:, :1]),
        "E = 0": (torch.zeros(0, 2, dtype=torch.int64, device=device), kp),
    }
    for name, (edges, points) in cases.items():
        points = points.clone().requires_grad_()
        u = unc[:, : points.shape[1]].clone().requires_grad_()
        s2 = torch.tensor(0.05, dtype=torch.float64, device=device, requires_grad=True)
        out = run(backend, kpfast.edge_map, points, edges, (5, 8), uncertainty=u, sigma2=s2, mode=mode)
        ref = edge_map_reference(points.detach().cpu(), torch.as_tensor(edges).cpu(), (5, 8), uncertainty=u.detach().cpu(), sigma2=0.05, mode=mode)
        assert_close(out.detach().cpu(), ref, rtol=1e-9, atol=1e-12, what=name, seed=seed)
        grads = torch.autograd.grad(out.sum(), (points, u, s2))
        for g in grads:
            assert torch.isfinite(g).all(), f"{name}: non-finite gradient (seed {seed})"
        if name == "E = 0":
            assert (out == 0).all() and all((g == 0).all() for g in grads)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_keypoint_is_not_hidden(backend):
    device = device_for(backend)
    kp = torch.tensor([[[-0.5, 0.0], [0.5, 0.0], [float("nan"), 0.2]]], device=device)
    out = run(backend, kpfast.edge_map, kp, [(0, 1), (1, 2)], 9, sigma2=0.05)
    ref = edge_map_reference(kp.cpu(), [(0, 1), (1, 2)], 9, sigma2=0.05)
    assert torch.isnan(out).any()
    assert torch.equal(torch.isnan(out.cpu()), torch.isnan(ref))


# The Triton interpreter computes bf16/fp16 arithmetic wrongly (docs/architecture.md): half precision on Triton is a GPU test.
@pytest.mark.parametrize("backend", ["cpp", pytest.param("triton", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_return_half_outputs_close_to_float32(backend, dtype):
    gen, seed = fresh_generator()
    problem = make_problem(gen, dtype=torch.float32, device=device_for(backend))
    half = {k: (v.detach().to(dtype).requires_grad_() if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in problem.items()}
    out = run(backend, call, half, "intensity")
    assert out.dtype == dtype
    ref, _ = reference(half, "intensity", dtype=torch.float32)
    assert_close(out.float().cpu(), ref.detach(), rtol=1e-2, atol=1e-2, what=str(dtype), seed=seed)
    grads = torch.autograd.grad(out.float().sum(), differentiable(half))
    assert all(g.dtype == dtype and torch.isfinite(g).all() for g in grads)


def test_edges_as_pairs_or_tensor_agree():
    gen, seed = fresh_generator()
    kp = torch.rand(2, 4, 2, generator=gen) * 2 - 1
    pairs = [(0, 1), (1, 2), (3, 0)]
    assert torch.equal(kpfast.edge_map(kp, pairs, 12), kpfast.edge_map(kp, torch.tensor(pairs), 12))


def test_size_int_means_square():
    kp = torch.zeros(1, 2, 2)
    assert kpfast.edge_map(kp, [(0, 1)], 7).shape == (1, 7, 7)


@pytest.mark.parametrize(
    "change, error, words",
    [
        (dict(keypoints=torch.zeros(4, 2)), ValueError, "keypoints"),
        (dict(keypoints=torch.zeros(1, 4, 3)), ValueError, "keypoints"),
        (dict(keypoints=torch.zeros(1, 4, 2, dtype=torch.int64)), TypeError, "keypoints"),
        (dict(keypoints=[[0.0, 0.0]]), TypeError, "keypoints"),
        (dict(edges=[(0, 4)]), ValueError, "edges"),
        (dict(edges=[(-1, 0)]), ValueError, "edges"),
        (dict(edges=torch.tensor([[0.0, 1.0]])), TypeError, "edges"),
        (dict(edges=torch.tensor([0, 1, 2])), ValueError, "edges"),
        (dict(edges=[(0, 1, 2)]), ValueError, "edges"),
        (dict(uncertainty=torch.zeros(2, 4)), ValueError, "uncertainty"),
        (dict(uncertainty=torch.zeros(1, 3)), ValueError, "uncertainty"),
        (dict(edge_weight=torch.ones(3)), ValueError, "edge_weight"),
        (dict(edge_weight=torch.ones(2, 2)), ValueError, "edge_weight"),
        (dict(sigma2=0.0), ValueError, "sigma2"),
        (dict(sigma2=-1e-3), ValueError, "sigma2"),
        (dict(sigma2=torch.tensor(-1.0)), ValueError, "sigma2"),
        (dict(sigma2=torch.ones(2)), ValueError, "sigma2"),
        (dict(sigma2="big"), TypeError, "sigma2"),
        (dict(mode="soft"), ValueError, "mode"),
        (dict(size=(0, 5)), ValueError, "size"),
        (dict(size=(4, 5, 6)), TypeError, "size"),
        (dict(uncertainty=torch.zeros(1, 4, device="meta")), ValueError, "device"),
    ],
)
@pytest.mark.parametrize("backend", ["cpp", "reference"])
def test_bad_input_raises_naming_the_argument(backend, change, error, words):
    args = dict(keypoints=torch.zeros(1, 4, 2), edges=[(0, 1), (2, 3)], size=(6, 5), uncertainty=None, edge_weight=None, sigma2=1e-3, mode="intensity")
    args.update(change)
    with pytest.raises(error, match=words):
        run(backend, kpfast.edge_map, args.pop("keypoints"), args.pop("edges"), args.pop("size"), **args)


def test_triton_on_cpu_without_interpreter_says_how(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        run("triton", kpfast.edge_map, torch.zeros(1, 2, 2), [(0, 1)], 4)


def test_backend_names_are_checked():
    with pytest.raises(ValueError, match="backend"):
        kpfast.set_backend("cuda")


@pytest.mark.parametrize("backend", BACKENDS)
def test_memory_kept_for_backward_is_one_int32_map(backend):
    """Saved for backward beyond the inputs: the int32 winner map only (B*H*W*4 bytes)."""
    gen, _ = fresh_generator()
    problem = make_problem(gen, B=2, K=8, E=20, H=16, W=24, dtype=torch.float32, device=device_for(backend))
    inputs = {t.data_ptr() for t in differentiable(problem)} | {problem["edges"].data_ptr()}
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = run(backend, call, problem, "intensity")
    extra = sum(t.numel() * t.element_size() for t in saved if t.data_ptr() not in inputs)
    assert extra <= 2 * 16 * 24 * 4 + 64, f"kept {extra} bytes for backward"
    out.sum().backward()
