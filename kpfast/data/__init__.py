"""kpfast.data: keypoint datasets, transforms and few-shot selection.

Conventions (every dataset, procedural or real): items are dicts

- ``image``: float32 ``[3, S, S]`` in [0, 1];
- ``keypoints``: float32 ``[K, 2]``, ``(x, y)`` in ``[-1, 1]`` with pixel centres at
  the ends (column ``j`` of a ``W``-wide image is ``x = -1 + 2 j / (W - 1)``,
  ``F.grid_sample(align_corners=True)``); see :mod:`kpfast.data.coords`;
- ``visible``: bool ``[K]`` (annotated, not occluded, inside the image);
- ``labeled``: bool ``[K]`` (has an annotation at all);
- ``depth``: float32 ``[K]``: procedural data: camera depth relative to the object
  origin in normalized-image units, ``(Z_k - Z_o) f / Z_o``; real data: NaN;
- ``bbox``: float32 ``[4]`` ``(x0, y0, x1, y1)`` in normalized coordinates;
- ``index``: int.

Each dataset has ``.meta`` (:class:`KeypointMeta`). Entry point: :func:`open_dataset`.
"""

from .array_dataset import KeypointArrayDataset, collate_samples
from .coords import normalized_to_pixels, pixel_grid, pixels_to_normalized
from .meta import KeypointMeta, flip_perm_from_names, flip_perm_from_pairs
from .open import open_dataset

__all__ = [
    "open_dataset",
    "KeypointMeta",
    "KeypointArrayDataset",
    "collate_samples",
    "pixels_to_normalized",
    "normalized_to_pixels",
    "pixel_grid",
    "flip_perm_from_names",
    "flip_perm_from_pairs",
]
