"""kpfast: fused kernels and training for few-shot, geometry-aware keypoint localization.

Ops (``[B, K, 2]`` keypoints in ``[-1, 1]``, ``align_corners=True`` pixel centres):
``edge_map``, ``soft_argmax``, ``umeyama`` and ``part_alignment`` (3D points ``[..., M, 3]``).
Backend selection: ``use_backend``, ``set_backend``,
``get_backend``. The plain-PyTorch spec of every op: ``kpfast.reference``.
"""

from . import reference
from .backend import get_backend, set_backend, use_backend
from .ops import edge_map, part_alignment, soft_argmax, umeyama

__version__ = "0.1.0"

from . import train  # noqa: E402  (callable: kpfast.train(config))
from .inference import load  # noqa: E402

__all__ = ["train", "load", "edge_map", "soft_argmax", "umeyama", "part_alignment", "get_backend", "set_backend",
           "use_backend", "reference"]
