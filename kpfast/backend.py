"""Which implementation the fused ops run on.

``"auto"`` (the default) runs CUDA tensors on the Triton kernels and CPU tensors
on the C++ kernels. ``"triton"`` forces the Triton kernels (on CPU tensors this
needs ``TRITON_INTERPRET=1`` set before ``triton`` is imported), ``"cpp"`` forces
the C++ kernels (CPU tensors only), and ``"reference"`` runs the plain-PyTorch
spec in :mod:`kpfast.reference` with ordinary autograd. The initial value comes
from the ``KPFAST_BACKEND`` environment variable.

Example:
    >>> import kpfast
    >>> with kpfast.use_backend("reference"):
    ...     kpfast.get_backend()
    'reference'
"""

from __future__ import annotations

import contextlib
import os

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


def resolve(backend: str, device: "torch.device", op: str) -> str:  # noqa: F821
    """The kernel family (``"triton"`` or ``"cpp"``) that runs ``op`` on ``device``."""
    if device.type == "cuda":
        if backend == "cpp":
            raise ValueError(f"{op}: the 'cpp' backend runs on CPU tensors only, got tensors on {device}")
        return "triton"
    if device.type != "cpu":
        raise ValueError(f"{op}: tensors on {device} are not supported (cpu or cuda)")
    if backend == "triton":
        if not interpreting_triton():
            raise RuntimeError(
                f"{op}: the Triton kernels run on CPU tensors only in the interpreter; "
                "set TRITON_INTERPRET=1 before triton is imported"
            )
        return "triton"
    return "cpp"
