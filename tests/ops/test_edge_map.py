"""kpfast.edge_map: parity of every kernel with the reference, gradients, degenerate
inputs, validation, torch.compile/opcheck and memory kept for backward."""

from __future__ import annotations

import importlib

import pytest
import torch

import kpfast
from kpfast.ops.backend import interpreting_triton
from kpfast.data.skeletons import all_pairs
from kpfast.reference import edge_map_reference

from _util import (FACTORIES, HOST_READS, assert_close, calls_from_kpfast, device_for, seeded_generator,
                   interpreter_min_max_nan, kernel_backends, nan_rule_cases, run, tolerances)

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
    gen, seed = seeded_generator()
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
    gen, seed = seeded_generator()
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


@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
@pytest.mark.parametrize("mode", ["intensity", "precision"])
def test_degenerate_inputs_give_finite_values_and_gradients(backend, mode):
    """Every backend, the reference included (at E = 0 it returned zeros without a grad_fn)."""
    device = device_for(backend)
    gen, seed = seeded_generator()
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


def _nan_problem(where: str, device):
    """Two edges far apart (issue 16's layout): NaN in one input of the second edge."""
    kp = torch.tensor([[[-0.6, -0.6], [0.6, -0.6], [0.0, 0.7], [0.5, 0.7], [0.9, 0.9]]], dtype=torch.float64)
    unc = torch.zeros(1, 5, dtype=torch.float64)
    w = torch.tensor([1.0, 0.8, 0.5], dtype=torch.float64)
    {"keypoint": kp[0, 3], "uncertainty": unc[0, 3:4], "edge_weight": w[1:2]}[where][0] = float("nan")
    leaves = [t.to(device).requires_grad_() for t in (kp, unc, w, torch.tensor(0.01, dtype=torch.float64))]
    return leaves, torch.tensor([(0, 1), (2, 3), (0, 4)], device=device)


@pytest.mark.parametrize("backend, nan_rule", nan_rule_cases())
@pytest.mark.parametrize("where", ["keypoint", "uncertainty", "edge_weight"])
@pytest.mark.parametrize("mode", ["intensity", "precision"])
def test_nan_input_gives_the_references_nan_pixels_and_gradients(backend, nan_rule, where, mode):
    """Documented: NaN wins the max (every pixel of the sample is NaN); NaN gradients reach the inputs
    of the edges with a NaN input (here keypoints 2, 3, their logits, the weight of edge 1 and sigma2),
    as autograd through the reference gives, on either NaN rule of min/max (tile culling must not
    drop a NaN: issue 16 measured 2048 NaN pixels of 4096 at 64 x 64 with a NaN logit)."""
    leaves, edges = _nan_problem(where, device_for(backend))
    kp, unc, w, s2 = leaves
    with interpreter_min_max_nan(nan_rule):
        out = run(backend, kpfast.edge_map, kp, edges, 32, uncertainty=unc, edge_weight=w, sigma2=s2, mode=mode)
        got = torch.autograd.grad(out.sum(), leaves)
    ref_leaves = [t.detach().cpu().requires_grad_() for t in leaves]
    ref = edge_map_reference(ref_leaves[0], edges.cpu(), 32, uncertainty=ref_leaves[1], edge_weight=ref_leaves[2],
                             sigma2=ref_leaves[3], mode=mode)
    want = torch.autograd.grad(ref.sum(), ref_leaves)
    assert torch.isnan(out).all() and torch.isnan(ref).all()
    for name, g, r in zip(("keypoints", "uncertainty", "edge_weight", "sigma2"), got, want):
        g = g.cpu()
        assert torch.equal(torch.isnan(g), torch.isnan(r)), f"d/d{name}: NaN at {torch.isnan(g)}, reference {torch.isnan(r)}"
        torch.testing.assert_close(g.nan_to_num(), r.nan_to_num(), rtol=1e-9, atol=1e-12, msg=f"d/d{name}")
    assert not torch.isnan(got[0][0, [0, 1, 4]]).any(), "NaN reached keypoints of finite edges"


# The Triton interpreter computes bf16/fp16 arithmetic wrongly (docs/architecture.md): half precision on Triton is a GPU test.
@pytest.mark.parametrize("backend", ["cpp", pytest.param("triton", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_return_half_outputs_close_to_float32(backend, dtype):
    gen, seed = seeded_generator()
    problem = make_problem(gen, dtype=torch.float32, device=device_for(backend))
    half = {k: (v.detach().to(dtype).requires_grad_() if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in problem.items()}
    out = run(backend, call, half, "intensity")
    assert out.dtype == dtype
    ref, _ = reference(half, "intensity", dtype=torch.float32)
    assert_close(out.float().cpu(), ref.detach(), rtol=1e-2, atol=1e-2, what=str(dtype), seed=seed)
    grads = torch.autograd.grad(out.float().sum(), differentiable(half))
    assert all(g.dtype == dtype and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
def test_inputs_of_mixed_float_dtypes_are_computed_in_the_keypoints_dtype(backend):
    """float32 keypoints with float64 logits, float16 weights and a float64 sigma2: every backend
    computes in float32 (C++ rejected the mix), returns float32 and each gradient in its input's dtype."""
    gen, seed = seeded_generator()
    problem = make_problem(gen, dtype=torch.float32, device=device_for(backend))
    mixed = dict(problem)
    for name, dtype in (("uncertainty", torch.float64), ("edge_weight", torch.float16), ("sigma2", torch.float64)):
        mixed[name] = problem[name].detach().to(dtype).requires_grad_()
    out = run(backend, call, mixed, "intensity")
    assert out.dtype == torch.float32
    same = {k: (v.detach().to(torch.float32) if k in ("uncertainty", "edge_weight", "sigma2") else v) for k, v in mixed.items()}
    want = run(backend, call, same, "intensity")
    assert_close(out.detach().cpu(), want.detach().cpu(), rtol=0, atol=0, what="mixed vs float32", seed=seed)
    grads = torch.autograd.grad(out.sum(), differentiable(mixed))
    assert [g.dtype for g in grads] == [t.dtype for t in differentiable(mixed)]
    assert all(torch.isfinite(g).all() for g in grads)


@pytest.mark.skipif(not interpreting_triton(), reason="counts host reads on CPU tensors in the Triton interpreter")
@pytest.mark.parametrize("edges_as", ["list", "tensor"])
@pytest.mark.parametrize("sigma2_as", ["float", "tensor"])
def test_host_syncs_and_copies_per_call(edges_as, sigma2_as):
    """The Triton path on CPU tensors, counting what would sync or copy on CUDA (issue 16.3, 16.5):
    one host read (the value checks of tensor edges or sigma2) or none for a list and a float (was
    three: edges min, max, the sign of sigma2), and no tensor built from a Python value per call (a
    float sigma2 was copied to the device on every call, which a CUDA graph cannot capture; a list
    is copied once, see test_device_constants_are_copied_once_and_capturable)."""
    gen, seed = seeded_generator()
    problem = make_problem(gen, dtype=torch.float32)
    if edges_as == "list":
        problem["edges"] = [tuple(p) for p in problem["edges"].tolist()]
    if sigma2_as == "float":
        problem["sigma2"] = float(problem["sigma2"])
    run("triton", call, problem, "intensity")  # anything done once is done
    with calls_from_kpfast() as counts:
        out = run("triton", call, problem, "intensity")
        out.sum().backward()
    reads = sum(counts[name] for name in HOST_READS)
    assert reads == (0 if (edges_as, sigma2_as) == ("list", "float") else 1), f"host reads {dict(counts)}"
    assert not any(counts[name] for name in FACTORIES), f"tensors built from Python values: {dict(counts)}"


@pytest.mark.skipif(not interpreting_triton(), reason="counts calls inside the Triton interpreter")
def test_triton_backward_visits_only_the_edges_that_win_in_a_tile(monkeypatch):
    """Issue 16.7: the backward walked all E edges of every tile with a block-wide reduction each;
    it now visits the edges that win a pixel of the tile (and edges with a non-finite input)."""
    kernels = importlib.import_module("kpfast.kernels.edge_map")
    gen, seed = seeded_generator()
    B, K, H, W = 1, 9, 36, 40
    kp = (torch.rand(B, K, 2, generator=gen) * 2 - 1).requires_grad_()
    edges = torch.tensor(all_pairs(K))
    out, winner = run("triton", torch.ops.kpfast.edge_map, kp, edges, H, W, None, None, None, 0.01, False, "triton", True)
    loads = []
    load = kernels._load_edge
    monkeypatch.setattr(kernels, "_load_edge", lambda *args: loads.append(args[5]) or load.fn(*args))
    torch.autograd.grad(out.sum(), kp)
    bh, bw = kernels.BWD_BLOCK
    want = sum(
        len(torch.unique(winner[b, i:i + bh, j:j + bw])) for b in range(B) for i in range(0, H, bh) for j in range(0, W, bw)
    )
    assert len(loads) == want, f"visited {len(loads)} edge-tiles, {want} (tile, winner) pairs (seed {seed})"
    n_tiles = B * -(-H // bh) * -(-W // bw)
    assert want < n_tiles * len(edges) / 2  # the old loop visited n_tiles * E


def test_edges_as_pairs_or_tensor_agree():
    gen, seed = seeded_generator()
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
        (dict(edges=[(0.7, 1.9)]), TypeError, "edges"),  # was truncated to (0, 1)
        (dict(edges=[(True, 1)]), TypeError, "edges"),
        (dict(edges=[0, 1, 2]), ValueError, "edges"),
        (dict(edges="01"), TypeError, "edges"),
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
        (dict(size=(46341, 46341)), ValueError, "size"),  # kernels index inside a plane with int32
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
    gen, _ = seeded_generator()
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
