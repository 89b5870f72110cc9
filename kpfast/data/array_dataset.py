"""``KeypointArrayDataset``: a dataset held in (memory-mapped) numpy arrays.

Items follow the kpfast sample convention (see ``kpfast.data``):

==========  ================  =====================================================
key         type / shape      meaning
==========  ================  =====================================================
image       float32 [3, S, S] RGB in [0, 1]
keypoints   float32 [K, 2]    (x, y) in [-1, 1], pixel centres at the ends
visible     bool [K]          annotated and not occluded (and inside the image)
labeled     bool [K]          has an annotation at all
depth       float32 [K]       normalized camera depth (procedural) or NaN (real)
bbox        float32 [4]       (x0, y0, x1, y1) in the same normalized coordinates
index       int               position in the dataset
==========  ================  =====================================================
"""

from __future__ import annotations

from typing import Mapping, Optional

import numpy as np
import torch
from torch.utils.data import Dataset

from .meta import KeypointMeta

__all__ = ["KeypointArrayDataset", "SAMPLE_KEYS", "collate_samples"]

SAMPLE_KEYS = ("image", "keypoints", "visible", "labeled", "depth", "bbox", "index")


class KeypointArrayDataset(Dataset):
    """Samples from arrays: ``images`` uint8 ``[N, 3, S, S]``, ``keypoints`` ``[N, K, 2]``,
    ``visible``/``labeled`` bool ``[N, K]``, ``depth`` ``[N, K]``, ``bbox`` ``[N, 4]``.

    Example:
        >>> import numpy as np
        >>> from kpfast.data.meta import KeypointMeta
        >>> n, k = 2, 3
        >>> ds = KeypointArrayDataset(
        ...     {"images": np.zeros((n, 3, 8, 8), np.uint8), "keypoints": np.zeros((n, k, 2), np.float32),
        ...      "visible": np.ones((n, k), bool), "labeled": np.ones((n, k), bool),
        ...      "depth": np.zeros((n, k), np.float32), "bbox": np.zeros((n, 4), np.float32)},
        ...     KeypointMeta("toy", ["a", "b", "c"]))
        >>> ds[1]["image"].shape, ds[1]["index"]
        (torch.Size([3, 8, 8]), 1)
    """

    def __init__(self, arrays: Mapping[str, np.ndarray], meta: KeypointMeta, *, info: Optional[dict] = None):
        need = ("images", "keypoints", "visible", "labeled", "depth", "bbox")
        missing = [k for k in need if k not in arrays]
        if missing:
            raise ValueError(f"KeypointArrayDataset: arrays lack {missing}")
        self.arrays = dict(arrays)
        n = len(self.arrays["images"])
        k = meta.num_keypoints
        im = self.arrays["images"]
        if im.ndim != 4 or im.shape[1] != 3 or im.dtype != np.uint8:
            raise ValueError(f"images must be uint8 [N, 3, S, S], got {im.dtype} {tuple(im.shape)}")
        for name, shape in (("keypoints", (n, k, 2)), ("visible", (n, k)), ("labeled", (n, k)), ("depth", (n, k)),
                            ("bbox", (n, 4))):
            if tuple(self.arrays[name].shape) != shape:
                raise ValueError(f"{name} must have shape {shape} for {n} images and K = {k} keypoints of meta "
                                 f"{meta.name!r}, got {tuple(self.arrays[name].shape)}")
        self.meta = meta
        self.info = dict(info or {})

    def __len__(self) -> int:
        return len(self.arrays["images"])

    @property
    def image_size(self) -> int:
        return int(self.arrays["images"].shape[-1])

    def __getitem__(self, i: int) -> dict:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for a dataset of {n} samples")
        i = int(i) % n
        a = self.arrays
        return {
            "image": torch.from_numpy(np.array(a["images"][i], dtype=np.float32)) / 255.0,
            "keypoints": torch.from_numpy(np.array(a["keypoints"][i], dtype=np.float32)),
            "visible": torch.from_numpy(np.array(a["visible"][i], dtype=bool)),
            "labeled": torch.from_numpy(np.array(a["labeled"][i], dtype=bool)),
            "depth": torch.from_numpy(np.array(a["depth"][i], dtype=np.float32)),
            "bbox": torch.from_numpy(np.array(a["bbox"][i], dtype=np.float32)),
            "index": i,
        }

    def labeled_counts(self) -> np.ndarray:
        """``[N]`` number of labelled keypoints of each sample."""
        return np.asarray(self.arrays["labeled"], dtype=bool).sum(axis=1).astype(np.int64)

    def images(self, indices=None) -> torch.Tensor:
        """A batch of images ``[B, 3, S, S]`` float32 in [0, 1] (all by default)."""
        idx = np.arange(len(self)) if indices is None else np.asarray(indices)
        return torch.from_numpy(np.asarray(self.arrays["images"][idx], dtype=np.float32)) / 255.0


def collate_samples(samples) -> dict:
    """Stack a list of samples into a batch dict (tensors get a leading batch dim,
    ``index`` becomes an int64 tensor). ``torch.utils.data.default_collate`` does the same."""
    out = {}
    for k in samples[0]:
        vals = [s[k] for s in samples]
        out[k] = torch.stack(vals) if isinstance(vals[0], torch.Tensor) else torch.tensor(vals)
    return out
