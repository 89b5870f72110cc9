"""kpfast.models.EdgeMap: the paper's parametrization on top of kpfast.edge_map."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import kpfast
from kpfast.data.skeletons import all_pairs
from kpfast.models import EdgeMap


def test_initial_values_follow_the_paper():
    m = EdgeMap([(0, 1)], 8)
    assert math.isclose(m.sigma2.item(), math.exp(1) / 1000, rel_tol=1e-6)
    assert math.isclose(m.alpha.item(), math.log1p(math.exp(-4)), rel_tol=1e-6)


def test_output_is_alpha_times_edge_map_and_gradients_reach_the_parameters():
    seed = 3
    gen = torch.Generator().manual_seed(seed)
    kp = torch.rand(3, 5, 2, generator=gen) * 2 - 1
    unc = torch.randn(3, 5, generator=gen)
    edges = [(0, 1), (1, 2), (2, 3), (3, 4)]
    m = EdgeMap(edges, (12, 10), theta=0.5, gamma=-1.0)
    out = m(kp, unc)
    want = kpfast.edge_map(kp, edges, (12, 10), uncertainty=unc, sigma2=math.exp(0.5) / 1000) * F.softplus(torch.tensor(-1.0))
    torch.testing.assert_close(out, want, msg=f"seed {seed}")
    out.sum().backward()
    assert m.theta.grad is not None and m.theta.grad != 0
    assert m.gamma.grad is not None and m.gamma.grad != 0


def test_learned_edge_weights_are_per_edge():
    seed = 4
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    m = EdgeMap(all_pairs(6), 16, learn_edge_weights=True, edge_weight_noise=0.1)
    assert m.gamma.shape == (15,) and m.alpha.shape == (15,)
    assert len(set(m.gamma.tolist())) == 15
    kp = (torch.rand(2, 6, 2, generator=gen) * 2 - 1).requires_grad_()
    m(kp).sum().backward()
    assert m.gamma.grad.shape == (15,) and (m.gamma.grad != 0).any()
    assert torch.isfinite(kp.grad).all()


def test_all_pairs_counts():
    assert len(all_pairs(32)) == 496 and all_pairs(1) == []


@pytest.mark.parametrize(
    "edges, error",
    [
        (torch.tensor([[0, 1, 2], [1, 2, 3]]), ValueError),  # was reshaped into three pairs
        ([0, 1, 2], ValueError),  # was an error inside reshape
        ([0, 1, 2, 3], ValueError),  # was read as two pairs
        ([(0.7, 1.9)], TypeError),  # was truncated to (0, 1)
        (torch.tensor([[0.0, 1.0]]), TypeError),
    ],
)
def test_edges_are_checked_as_by_edge_map(edges, error):
    with pytest.raises(error, match="edges"):
        EdgeMap(edges, 8)


def test_edges_may_be_pairs_of_numpy_or_tensor_integers():
    want = torch.tensor([[0, 1], [1, 2]])
    for edges in (np.array([[0, 1], [1, 2]]), list(want), [(np.int32(0), np.int64(1)), (1, 2)]):
        assert torch.equal(EdgeMap(edges, 8).edges, want)
