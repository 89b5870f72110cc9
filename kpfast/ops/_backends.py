"""Access to the two kernel families from the torch side."""

from __future__ import annotations

import importlib
from types import ModuleType

import torch


def cpp() -> ModuleType:
    """The compiled C++ extension ``kpfast._C``."""
    try:
        return importlib.import_module("kpfast._C")
    except ImportError as err:  # pragma: no cover - only on a broken install
        raise ImportError(
            "kpfast's C++ kernels (kpfast._C) are not built; reinstall with `pip install -e .` "
            "from the repository (needs a C++17 compiler)"
        ) from err


def triton_kernels(op: str) -> ModuleType:
    """The Triton kernel module ``kpfast.kernels.<op>`` (imports triton lazily)."""
    return importlib.import_module(f"kpfast.kernels.{op}")


def as_numpy(t: torch.Tensor | None):
    """A no-copy numpy view of a contiguous CPU tensor (None stays None)."""
    return None if t is None else t.detach().numpy()


def threads() -> int:
    return torch.get_num_threads()
