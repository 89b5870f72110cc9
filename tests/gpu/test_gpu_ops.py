"""All four ops together on a GPU (marked `gpu`; skipped without CUDA): one CUDA graph of every
forward and backward replayed with new inputs, bitwise determinism, host syncs per call,
torch.compile(fullgraph=True) with inductor, opcheck on CUDA, and tensors on a second GPU."""

from __future__ import annotations

import warnings

import pytest
import torch

import kpfast
from kpfast.data.skeletons import all_pairs

from _util import seeded_generator

pytestmark = pytest.mark.gpu


def _problem(gen, device="cuda"):
    """Leaves of the four ops at modest real sizes (a float sigma2 and a float beta are not leaves)."""
    K = 32
    leaves = dict(
        kp=torch.rand(8, K, 2, generator=gen) * 1.6 - 0.8, unc=torch.randn(8, K, generator=gen),
        w=torch.rand(len(all_pairs(K)), generator=gen) + 0.5, s2=torch.tensor(2.7e-3),
        parent=torch.randn(16, 3 * 98, 64, 64, generator=gen) * 3, beta=torch.tensor(1.0),
        src=torch.randn(1024, 12, 3, generator=gen), uw=torch.rand(1024, 12, generator=gen) + 0.1,
        pts=torch.randn(16, 98, 3, generator=gen), pw=torch.rand(16, 98, generator=gen) + 0.2,
    )
    leaves["dst"] = 1.5 * leaves["src"].flip(-1) + 0.1 * torch.randn(leaves["src"].shape, generator=gen)
    leaves = {k: v.to(device).requires_grad_() for k, v in leaves.items()}
    parts = torch.zeros(8, 98, dtype=torch.bool, device=device)
    for p in range(8):
        parts[p, p * 12:(p + 1) * 12 + 2] = True
    edges = torch.tensor(all_pairs(K), device=device)

    def forward(x):
        em = kpfast.edge_map(x["kp"], edges, 128, uncertainty=x["unc"], edge_weight=x["w"], sigma2=x["s2"])
        em_float = kpfast.edge_map(x["kp"], all_pairs(K), 64, uncertainty=x["unc"], sigma2=2.7e-3)  # list, float
        h, r1, r2 = x["parent"].chunk(3, 1)
        kp, values = kpfast.soft_argmax(h, [r1, r2], beta=x["beta"])
        h64, r1_64, r2_64 = (m.double() for m in (h, r1, r2))
        kp_float, _ = kpfast.soft_argmax(h64, [r2_64, r1_64, r2_64], beta=1.3)  # float64, a float beta, an offset table
        R, s, t = kpfast.umeyama(x["src"], x["dst"], x["uw"])
        r = kpfast.part_alignment(x["pts"], parts, x["pw"], detach_transform=False)
        return em, em_float, kp, values, kp_float, R, s, t, r

    cotangents = [torch.randn(o.shape, generator=gen).to(device) for o in forward(leaves)]

    def loss(*values):
        x = dict(zip(leaves, values))
        return sum((o * c).sum() for o, c in zip(forward(x), cotangents))

    return leaves, forward, loss


def _relative_error(a, b) -> float:
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def test_one_cuda_graph_of_all_ops_replays_new_inputs():
    """Issue 16.3: capture crashed with a float sigma2, a list of edges, a float beta in float64."""
    gen, seed = seeded_generator()
    leaves, forward, loss = _problem(gen)
    names = list(leaves)

    def step():
        value = loss(*leaves.values())
        return value, torch.autograd.grad(value, [leaves[n] for n in names])

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: compiles the kernels, copies the list of edges once
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        value, grads = step()
    with torch.no_grad():
        for n in ("kp", "parent", "src", "pts"):
            leaves[n].add_(0.05 * torch.randn(leaves[n].shape, generator=gen).cuda())
    graph.replay()
    torch.cuda.synchronize()
    want_value, want_grads = step()
    worst = max([_relative_error(value, want_value)] + [_relative_error(a, b) for a, b in zip(grads, want_grads)])
    assert worst <= 1e-6, f"replayed graph vs eager: {worst:.3g} (seed {seed})"


def test_two_runs_are_bitwise_equal():
    gen, seed = seeded_generator()
    leaves, _, loss = _problem(gen)
    runs = []
    for _ in range(2):
        value = loss(*leaves.values())
        runs.append([value.detach(), *torch.autograd.grad(value, list(leaves.values()))])
    for name, a, b in zip(["loss", *leaves], *runs):
        assert torch.equal(a, b), f"{name} differs between two runs (seed {seed})"


@pytest.mark.parametrize(
    "call, syncs",
    [
        ("edge_map, tensor edges and sigma2", 1),  # their value checks, documented
        ("edge_map, list of edges and a float sigma2", 0),
        ("soft_argmax", 0),
        ("umeyama", 0),
        ("part_alignment", 0),
    ],
)
def test_host_syncs_per_forward_and_backward(call, syncs):
    """Issue 16.5: edge_map synced three times (edges min and max, the sign of sigma2)."""
    gen, _ = seeded_generator()
    x, _, _ = _problem(gen)
    edges = torch.tensor(all_pairs(32), device="cuda")
    parts = torch.ones(2, 98, dtype=torch.bool, device="cuda")
    h, r1, r2 = x["parent"].chunk(3, 1)
    fn = {
        "edge_map, tensor edges and sigma2": lambda: kpfast.edge_map(x["kp"], edges, 64, uncertainty=x["unc"], sigma2=x["s2"]),
        "edge_map, list of edges and a float sigma2": lambda: kpfast.edge_map(x["kp"], all_pairs(32), 64, sigma2=2.7e-3),
        "soft_argmax": lambda: kpfast.soft_argmax(h, [r1, r2], beta=x["beta"])[1],
        "umeyama": lambda: kpfast.umeyama(x["src"], x["dst"], x["uw"])[0],
        "part_alignment": lambda: kpfast.part_alignment(x["pts"], parts, x["pw"], detach_transform=False),
    }[call]
    fn().sum().backward()  # warm-up
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn().sum().backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    found = [str(w.message) for w in caught if "synchroniz" in str(w.message)]
    assert len(found) == syncs, found


def test_torch_compile_fullgraph_with_inductor_matches_eager():
    gen, seed = seeded_generator()
    leaves, _, loss = _problem(gen)
    values = list(leaves.values())
    got = torch.compile(loss, fullgraph=True)(*values)
    want = loss(*values)
    worst = max([_relative_error(got, want)] + [
        _relative_error(a, b) for a, b in zip(torch.autograd.grad(got, values), torch.autograd.grad(want, values))
    ])
    assert worst <= 1e-4, f"compiled vs eager: {worst:.3g} (seed {seed})"


def test_opcheck_on_cuda():
    gen, _ = seeded_generator()
    dev = "cuda"
    kp = (torch.rand(2, 6, 2, generator=gen) * 2 - 1).to(dev).requires_grad_()
    unc = torch.randn(2, 6, generator=gen).to(dev).requires_grad_()
    w = torch.rand(7, generator=gen).to(dev).requires_grad_()
    s2 = torch.tensor(0.05, device=dev, requires_grad=True)
    edges = torch.randint(0, 6, (7, 2), generator=gen).to(dev)
    heat = torch.randn(2, 3, 9, 11, generator=gen).to(dev).requires_grad_()
    rd = torch.randn(2, 3, 2, 9, 11, generator=gen).to(dev).requires_grad_()
    beta = torch.tensor(1.3, device=dev, requires_grad=True)
    pts = torch.randn(3, 6, 3, generator=gen).to(dev).requires_grad_()
    pw = (torch.rand(3, 6, generator=gen) + 0.1).to(dev).requires_grad_()
    parts = torch.tensor([[1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1]], dtype=torch.bool, device=dev)
    ops = torch.ops.kpfast
    for op, args in [
        (ops.edge_map.default, (kp, edges, 7, 9, unc, w, s2, 0.0, False, "auto", True)),
        (ops.edge_map.default, (kp.detach().bfloat16().requires_grad_(), edges, 7, 9, None, None, None, 0.05, True, "auto", False)),
        (ops.soft_argmax.default, (heat, [rd], True, beta, 0.0, "auto")),
        (ops.soft_argmax.default, (heat, list(rd.unbind(2)), False, None, 0.7, "auto")),
        (ops.umeyama.default, (pts[:2], pts[1:], pw[:2], True, "auto")),
        (ops.part_alignment.default, (pts, parts, pw, True, True, "auto")),
    ]:
        torch.library.opcheck(op, args)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_tensors_on_a_second_gpu_run_there_on_its_current_stream():
    """Issue 16.1: the launchers ran on the current device (cuda:0) and its stream, not the tensors'."""
    gen, seed = seeded_generator()
    on1, _, loss1 = _problem(torch.Generator().manual_seed(seed), device="cuda:1")
    on0, _, loss0 = _problem(torch.Generator().manual_seed(seed), device="cuda:0")
    torch.cuda.set_device(0)
    stream = torch.cuda.Stream(device="cuda:1")
    with torch.cuda.stream(stream):  # the current stream of cuda:1, while cuda:0 is the current device
        value = loss1(*on1.values())
        grads = torch.autograd.grad(value, list(on1.values()))
    stream.synchronize()
    want = loss0(*on0.values())
    want_grads = torch.autograd.grad(want, list(on0.values()))
    assert value.device == torch.device("cuda:1")
    worst = max([_relative_error(value.cpu(), want.cpu())] + [_relative_error(a.cpu(), b.cpu()) for a, b in zip(grads, want_grads)])
    assert worst <= 1e-6, f"cuda:1 vs cuda:0: {worst:.3g} (seed {seed})"
