"""kpfast: fused kernels and training for few-shot, geometry-aware keypoint localization.

Ops (``[B, K, 2]`` keypoints in ``[-1, 1]``, ``align_corners=True`` pixel centres):
``edge_map``, ``soft_argmax``, ``umeyama`` and ``part_alignment`` (3D points ``[..., M, 3]``).
Backend selection: ``use_backend``, ``set_backend``,
``get_backend``. The plain-PyTorch spec of every op: ``kpfast.reference``.

Training: ``kpfast.train.run(config, **overrides)`` (``python -m kpfast.train`` on the
command line); inference: ``kpfast.load(run_folder)``. ``import kpfast`` loads the ops
only; ``kpfast.load`` and the subpackages (``kpfast.data``, ``kpfast.models``,
``kpfast.losses``, ``kpfast.train``, ...) are imported on first use.
"""

import importlib as _importlib

from . import reference
from .ops.backend import get_backend, set_backend, use_backend
from .ops import edge_map, part_alignment, soft_argmax, umeyama

__version__ = "0.1.0"

_SUBMODULES = ("checkpoint", "config", "data", "diagnose", "evaluate", "experiments", "inference", "losses", "models",
               "predict", "safe_load", "train", "viz")


def __getattr__(name: str):
    """``kpfast.load`` and the subpackages, imported when first used (PEP 562)."""
    if name == "load":
        from .inference import load

        return load
    if name in _SUBMODULES:
        return _importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'kpfast' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), "load", *_SUBMODULES})


__all__ = ["load", "edge_map", "soft_argmax", "umeyama", "part_alignment", "get_backend", "set_backend",
           "use_backend", "reference"]
