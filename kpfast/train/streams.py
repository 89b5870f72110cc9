"""Independent random streams: one generator per kind of random draw of a run.

Every kind of draw a run makes has its own generator, seeded from the run's
``seed`` and the stream's name (and the process rank), so that switching one
component off changes only what that component draws: ``--without geo2d`` stops
drawing transforms, and the masks, partners, data order, few-shot selection and
initial weights stay exactly those of the full run.

=================  ===========================================================
``init``           initial network weights (identical on every rank)
``selection``      few-shot selection (k-means++ seeding, or the random choice)
``unlabeled``      order of the unlabelled images (epoch permutations)
``labeled``        order of the labelled images
``transforms``     the 2D equivariance transforms (per rank)
``masks``          the reconstruction's patch masks (per rank)
``partners``       the 3D loss's random partners (per rank)
=================  ===========================================================
"""

from __future__ import annotations

import hashlib
import random
from typing import Iterable

import numpy as np
import torch

STEP_STREAMS = ("transforms", "masks", "partners")
"""The streams a training step draws from (their states are part of a checkpoint)."""


def stream_seed(seed: int, name: str, rank: int = 0) -> int:
    """A 63-bit seed for stream ``name`` of run ``seed`` on process ``rank``: stable across
    Python versions and platforms (SHA-256 of the three), distinct per name and rank.

    Example:
        >>> stream_seed(0, "masks") == stream_seed(0, "masks"), stream_seed(0, "masks") == stream_seed(0, "transforms")
        (True, False)
    """
    digest = hashlib.sha256(f"kpfast/{int(seed)}/{name}/{int(rank)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def generator(seed: int, name: str, rank: int = 0) -> torch.Generator:
    """A CPU generator seeded with :func:`stream_seed`."""
    return torch.Generator().manual_seed(stream_seed(seed, name, rank))


class RandomStreams:
    """The per-step generators of one process: ``streams["masks"]`` etc. (see the module docstring).

    Example:
        >>> a, b = RandomStreams(0), RandomStreams(0)
        >>> _ = torch.rand(3, generator=a["transforms"])      # drawing transforms ...
        >>> torch.equal(torch.rand(3, generator=a["masks"]), torch.rand(3, generator=b["masks"]))
        True
    """

    def __init__(self, seed: int, rank: int = 0, names: Iterable[str] = STEP_STREAMS):
        self.generators = {name: generator(seed, name, rank) for name in names}

    def __getitem__(self, name: str) -> torch.Generator:
        return self.generators[name]

    def state_dict(self) -> dict:
        return {name: g.get_state() for name, g in self.generators.items()}

    def load_state_dict(self, state: dict) -> None:
        missing = set(self.generators) - set(state)
        if missing:
            raise ValueError(f"random stream state lacks {sorted(missing)}")
        for name, g in self.generators.items():
            g.set_state(state[name].cpu())


def global_rng_state() -> dict:
    """torch (CPU and CUDA), numpy and Python global random states, as plain containers and tensors
    (what a checkpoint can hold: see :mod:`kpfast.checkpoint`)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": {"bit_generator": str(kind), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_global_rng_state(state: dict) -> None:
    """Restore what :func:`global_rng_state` returned."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["bit_generator"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
