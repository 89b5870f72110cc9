"""Per-layer projections of frozen convolution weights (Sanchez & Tzimiropoulos, NeurIPS 2019, Eq. 1).

A convolution of a trained *core* network keeps its weights ``theta [Co, Ci, k, k]``
frozen and learns a square matrix ``W [Co, Co]`` on its output channels, initialized
to the identity: the layer computes with ``W x_1 theta`` (the 1-mode product,
``sum_o' W[o, o'] theta[o']``), which has the shape of ``theta``. Training ``W``
instead of ``theta`` learns ``Co^2`` numbers per layer instead of ``Co * Ci * k^2``.

:func:`project_convolutions` installs the projection on every convolution of a module
with :mod:`torch.nn.utils.parametrize` (the layer's ``weight`` is recomputed from
``W`` and the frozen original at each use, so any ``nn.Conv2d`` subclass keeps its
own forward); :func:`folded_state_dict` gives the weights the projected layers compute
with, in the layout of the plain module (what inference loads).
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize


class OutputProjection(nn.Module):
    """``weight [Co, ...] -> W x_1 weight`` with a learned ``W [Co, Co]`` (the identity at first).

    Example:
        >>> p = OutputProjection(4)
        >>> w = torch.randn(4, 3, 3, 3)
        >>> torch.equal(p(w), w)
        True
    """

    def __init__(self, channels: int):
        super().__init__()
        self.matrix = nn.Parameter(torch.eye(channels))

    def forward(self, weight: Tensor) -> Tensor:
        return (self.matrix @ weight.reshape(weight.shape[0], -1)).reshape(weight.shape)


def project_convolutions(module: nn.Module, *, skip: Iterable[nn.Module] = ()) -> list[str]:
    """Re-parametrize the weight of every ``nn.Conv2d`` in ``module`` (except ``skip``) as
    ``W x_1 theta``: ``theta`` (the current weight) frozen, ``W`` the identity and trainable.

    Biases are left as they are (trainable); the layers compute exactly what they computed
    before until ``W`` changes. Returns the names of the projected layers.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 2, 1))
        >>> project_convolutions(net, skip=[net[2]])
        ['0']
        >>> sorted(n for n, p in net.named_parameters() if p.requires_grad)
        ['0.bias', '0.parametrizations.weight.0.matrix', '2.bias', '2.weight']
    """
    skipped = {id(m) for m in skip}
    names = []
    for name, m in list(module.named_modules()):
        if isinstance(m, nn.Conv2d) and id(m) not in skipped and not parametrize.is_parametrized(m, "weight"):
            parametrize.register_parametrization(m, "weight", OutputProjection(m.out_channels))
            m.parametrizations.weight.original.requires_grad_(False)
            names.append(name)
    return names


def folded_state_dict(module: nn.Module) -> dict[str, Tensor]:
    """``module.state_dict()`` with every parametrized weight replaced by the weight it computes
    (``"layer.weight"`` instead of ``"layer.parametrizations.weight.original"`` and its
    projection): the state dict of the same module without parametrizations."""
    state = {k: v for k, v in module.state_dict().items() if ".parametrizations." not in f".{k}"}
    with torch.no_grad():
        for name, m in module.named_modules():
            if parametrize.is_parametrized(m):
                for tensor_name in m.parametrizations:
                    state[f"{name}.{tensor_name}" if name else tensor_name] = getattr(m, tensor_name).detach().clone()
    return state
