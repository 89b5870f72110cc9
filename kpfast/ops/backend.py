"""Which implementation the ops run on: the one place where it is chosen.

``"auto"`` (the default) runs CUDA tensors on the Triton kernels and CPU tensors
on the C++ kernels. ``"triton"`` forces the Triton kernels (on CPU tensors this
needs ``TRITON_INTERPRET=1`` set before ``triton`` is imported), ``"cpp"`` forces
the C++ kernels (CPU tensors only), and ``"reference"`` runs the plain-PyTorch
spec in :mod:`kpfast.reference` with ordinary autograd. The initial value comes
from the ``KPFAST_BACKEND`` environment variable.

The two kernel implementations have one interface: :func:`kernels` returns a module
(``kpfast.kernels.<op>`` for Triton, :mod:`kpfast.ops.cpp_kernels` for C++) with the
same functions, ``<op>_forward`` and ``<op>_backward`` for ``edge_map``,
``soft_argmax``, ``umeyama`` and ``part_alignment``, taking the same tensors and
returning new ones (allocation, dtype and layout preparation inside).

Example:
    >>> import kpfast
    >>> with kpfast.use_backend("reference"):
    ...     kpfast.get_backend()
    'reference'
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import inspect
import os
from types import ModuleType

import torch

from . import _tensors

BACKENDS = ("auto", "triton", "cpp", "reference")


def _checked(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    return name


_current = _checked(os.environ.get("KPFAST_BACKEND", "auto"))


def get_backend() -> str:
    """The backend the ops dispatch to now."""
    return _current


def set_backend(name: str) -> None:
    """Set the backend for every later call (see the module docstring)."""
    global _current
    _current = _checked(name)


@contextlib.contextmanager
def use_backend(name: str):
    """Context manager: run the ops inside the block on backend ``name``."""
    previous = get_backend()
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


def interpreting_triton() -> bool:
    """True when Triton kernels run in the interpreter (CPU tensors)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def extension() -> ModuleType:
    """The compiled C++ extension ``kpfast._C``."""
    try:
        return importlib.import_module("kpfast._C")
    except ImportError as err:  # pragma: no cover - only on a broken install
        raise ImportError(
            "kpfast's C++ kernels (kpfast._C) are not built; reinstall with `pip install -e .` "
            "from the repository (needs a C++17 compiler)"
        ) from err


TRITON_MODULES = {"edge_map": "edge_map", "soft_argmax": "soft_argmax", "umeyama": "umeyama", "part_alignment": "umeyama"}
"""The module of ``kpfast.kernels`` that holds each op's Triton launchers."""


@functools.lru_cache(maxsize=None)
def triton_kernels(module_name: str) -> ModuleType:
    """The Triton kernel module ``kpfast.kernels.<module_name>`` (imports triton lazily). On first
    use its launchers (public functions) are wrapped to run on their tensors' device: see
    :func:`kpfast.ops._tensors.on_tensor_device`."""
    module = importlib.import_module(f"kpfast.kernels.{module_name}")
    for name, value in list(vars(module).items()):
        if inspect.isfunction(value) and not name.startswith("_") and value.__module__ == module.__name__:
            setattr(module, name, _tensors.on_tensor_device(value))
    return module


def kernels(backend: str, device: torch.device, op: str) -> ModuleType:
    """The kernel implementation of ``op`` for tensors on ``device`` under ``backend`` (not
    ``"reference"``): the Triton module on CUDA (or with ``"triton"`` in the interpreter), else
    the C++ one."""
    if device.type == "cuda":
        if backend == "cpp":
            raise ValueError(f"{op}: the 'cpp' backend runs on CPU tensors only, got tensors on {device}")
        return triton_kernels(TRITON_MODULES[op])
    if device.type != "cpu":
        raise ValueError(f"{op}: tensors on {device} are not supported (cpu or cuda)")
    if backend == "triton":
        if not interpreting_triton():
            raise RuntimeError(
                f"{op}: the Triton kernels run on CPU tensors only in the interpreter; "
                "set TRITON_INTERPRET=1 before triton is imported"
            )
        return triton_kernels(TRITON_MODULES[op])
    return importlib.import_module("kpfast.ops.cpp_kernels")
