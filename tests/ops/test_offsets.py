"""Index arithmetic of the Triton kernels past 2^31 and their launch grids (issue 16.4), on CPU.

A wrapped int32 offset needs tensors of 8 GB and more to show in a real launch (those cases are in
tests/gpu/). Here the kernels' own offset helpers run in the interpreter on the scalar
values a real launch would pass them, against exact Python integers; and the launchers' grids are
recorded for a batch past 65535 (CUDA caps grid axes 1 and 2 there)."""

from __future__ import annotations

import importlib

import pytest
import torch

from _util import kernel_backends

pytestmark = pytest.mark.skipif(
    "triton" not in kernel_backends() or torch.cuda.is_available(), reason="the Triton interpreter on CPU"
)
CUDA_GRID_MAX = (2**31 - 1, 65535, 65535)


triton = pytest.importorskip("triton")
tl = triton.language
em = importlib.import_module("kpfast.kernels.edge_map")
sa = importlib.import_module("kpfast.kernels.soft_argmax")


@triton.jit
def edge_map_probe(out_ptr, pid, n_tiles, E, H, W):
    b, tile = em._sample_and_tile(pid, n_tiles)
    tl.store(out_ptr + 0, b)
    tl.store(out_ptr + 1, tile.to(tl.int64))
    tl.store(out_ptr + 2, em._plane_offset(b, H, W))
    tl.store(out_ptr + 3, em._partial_offset(b, tile, n_tiles, E))


@triton.jit
def channel_probe(out_ptr, c, stride):
    tl.store(out_ptr, sa._channel_offset(c, stride))


@pytest.mark.parametrize(
    "B, H, W, E, n_tiles",
    [
        (3, 27000, 27000, 1, 2_848_314),  # B*H*W = 2.19e9: the last rows of sample 2 (issue 16.4)
        (70_000, 200, 200, 3, 169),  # B past 65535 and B*H*W = 2.8e9
        (64, 128, 128, 300_000, 16),  # the backward's partial sums: B*tiles*E*8 = 2.5e9
    ],
)
def test_edge_map_offsets_are_exact_past_2_31(B, H, W, E, n_tiles):
    for pid in (0, B * n_tiles - 1, (B // 2) * n_tiles + n_tiles // 3):
        out = torch.zeros(4, dtype=torch.int64)
        edge_map_probe[(1,)](out, pid, n_tiles, E, H, W)
        b, tile = divmod(pid, n_tiles)
        assert out.tolist() == [b, tile, b * H * W, (b * n_tiles + tile) * E * 8], f"program {pid}"


@pytest.mark.parametrize("c, stride", [(2, 1100 * 1024 * 1024), (7, 400_000_000), (0, 2**31 - 1)])
def test_soft_argmax_channel_offsets_are_exact_past_2_31(c, stride):
    """c * stride of the backward: grad readouts [C, B, K, H, W] with B*K*H*W = 1.15e9 put channel 2
    2.3e9 elements in (issue 16.4: the third channel's gradient landed gigabytes away)."""
    out = torch.zeros(1, dtype=torch.int64)
    channel_probe[(1,)](out, c, stride)
    assert out.item() == c * stride


class _Recorder:
    """Stands in for a jitted kernel: records the launch grid, launches nothing."""

    def __init__(self):
        self.grids = []

    def __getitem__(self, grid):
        self.grids.append(tuple(grid))
        return lambda *args, **kwargs: None


def test_launch_grids_stay_within_cuda_limits_for_a_large_batch(monkeypatch):
    recorders = {name: _Recorder() for name in ("_edge_map_fwd_kernel", "_edge_map_bwd_kernel")}
    for name, rec in recorders.items():
        monkeypatch.setattr(em, name, rec)
    for name in ("_soft_argmax_fwd_kernel", "_soft_argmax_bwd_kernel", "_soft_argmax_combine_kernel"):
        recorders[name] = _Recorder()
        monkeypatch.setattr(sa, name, recorders[name])
    B = 70_000
    kp = torch.zeros(B, 2, 2)
    edges = torch.tensor([[0, 1]], dtype=torch.int32)
    out, winner = em.edge_map_forward(kp, edges, None, None, None, 0.01, 1, 1, False, 1e-10)
    em.edge_map_backward(out, winner, kp, edges, None, None, None, 0.01, False, 1e-10)
    h = torch.zeros(B, 1, 2, 2)
    kp2, values, stats = sa.soft_argmax_forward(h, [], False, None, 1.0)
    sa.soft_argmax_backward(kp2, values, h, [], False, None, 1.0, kp2, values, stats, True, False, False)
    grids = [g for rec in recorders.values() for g in rec.grids]
    assert len(grids) >= 4
    for grid in grids:
        assert all(n <= cap for n, cap in zip(grid, CUDA_GRID_MAX)), f"grid {grid} exceeds {CUDA_GRID_MAX}"
