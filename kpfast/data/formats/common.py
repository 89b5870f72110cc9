"""Shared machinery of the real-data readers: records, cropping, errors.

A reader turns a dataset's files into :class:`Record` s (image path, keypoints in
*source pixel coordinates* with ``(0, 0)`` the centre of the top-left pixel, flags,
box) and wraps them in a :class:`RealKeypointDataset`, which loads each image, crops
a square around the box (side = longer box side x ``1 + margin``, centred on the
box), resizes it to ``image_size`` with antialiasing and maps the keypoints into the
kpfast convention.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from ..coords import pixels_to_normalized
from ..image_file import read_image
from ..meta import KeypointMeta

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")

# share of the images that form the test split of a source without a test set of its own
TEST_FRACTION = 0.2


class DatasetFormatError(ValueError):
    """A dataset file is missing or malformed; the message names the file (and line)."""

    def __init__(self, path, message: str, line: Optional[int] = None):
        where = f"{path}" + (f", line {line}" if line is not None else "")
        super().__init__(f"{where}: {message}")
        self.path = str(path)
        self.line = line


def read_lines(path: Path, what: str) -> list[str]:
    """The lines of a text file, with an error that names it when it is absent."""
    if not path.is_file():
        raise DatasetFormatError(path, f"{what} not found")
    return path.read_text(encoding="utf-8", errors="replace").splitlines()


def parse_floats(tokens: Sequence[str], path, line: Optional[int], what: str) -> list[float]:
    """``tokens`` as finite floats; a :class:`DatasetFormatError` naming ``path``, ``line`` and
    the token for anything else (``abc``, ``nan``, ``inf``)."""
    out = []
    for t in tokens:
        try:
            v = float(t)
        except (TypeError, ValueError):
            raise DatasetFormatError(path, f"{what}: {t!r} is not a number", line) from None
        if not math.isfinite(v):
            raise DatasetFormatError(path, f"{what}: {t!r} is not a finite number", line)
        out.append(v)
    return out


def json_number(value, path, where: str, what: str) -> float:
    """A JSON value that must be a finite number (not a string, bool or null); ``where`` is
    its JSON path (``annotations[3].keypoints[7]``) for the error message."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise DatasetFormatError(path, f"{where}: {what} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise DatasetFormatError(path, f"{where}: {what} must be finite, got {value!r}")
    return float(value)


def check_box(box, path, where: str, line: Optional[int] = None) -> np.ndarray:
    """``(x0, y0, x1, y1)`` pixel box: four finite numbers with ``x0 <= x1`` and ``y0 <= y1``."""
    b = np.asarray(box, dtype=np.float64)
    if b.shape != (4,):
        raise DatasetFormatError(path, f"{where}: a box needs 4 numbers (x0, y0, x1, y1), got {len(b.reshape(-1))}",
                                 line)
    if not np.isfinite(b).all():
        raise DatasetFormatError(path, f"{where}: box {b.tolist()} is not finite", line)
    if b[2] < b[0] or b[3] < b[1]:
        raise DatasetFormatError(path, f"{where}: box {b.tolist()} has x1 < x0 or y1 < y0", line)
    return b


def check_split(split: str, allowed: Sequence[str], fmt: str) -> None:
    if split not in allowed:
        raise ValueError(f"{fmt} splits are {', '.join(map(repr, allowed))}, got {split!r}")


def hashed_split(key: str) -> str:
    """``"test"`` for a fixed :data:`TEST_FRACTION` of keys, ``"train"`` for the rest: the first 8
    bytes of the SHA-256 of ``key`` (UTF-8) as a big-endian integer, test below
    ``TEST_FRACTION * 2**64``. A key keeps its side when other keys are added or removed."""
    h = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big")
    return "test" if h < TEST_FRACTION * 2**64 else "train"


def split_without_test_set(records: list, split: str, source, *, hash_split: bool = True) -> tuple[list, str]:
    """The ``split`` of a source that has no test set of its own: ``(records, rule)``.

    With ``hash_split`` a record goes to the side :func:`hashed_split` gives its
    ``key`` (the image's path relative to the dataset, so every object of one image
    lands on the same side); without it (the other split comes from elsewhere) every
    record serves ``split``. ``rule`` says which, for the log and ``metrics.json``.
    """
    if split == "all":
        return records, f"all of {source}"
    if not hash_split:
        return records, f"all of {source} (the other split is given separately)"
    rule = (f"{source} has no test set of its own: {TEST_FRACTION:.0%} of its images form the test split, chosen "
            f"by the SHA-256 of each image's relative path (stable when images are added), the rest the train split")
    return [r for r in records if hashed_split(r.key) == split], rule


@dataclass
class Record:
    """One annotated (or unannotated) object instance in source pixel coordinates."""

    image: Path
    keypoints: np.ndarray  # [K, 2] float64, NaN where unlabeled
    visible: np.ndarray  # [K] bool
    labeled: np.ndarray  # [K] bool
    box: Optional[np.ndarray] = None  # [4] x0, y0, x1, y1 (pixel coordinates) or None = whole image
    extra: dict = field(default_factory=dict)
    key: str = ""  # the image's path relative to the dataset (what a hashed split hashes)


def crop_box(box: Optional[np.ndarray], width: int, height: int, margin: float) -> tuple[float, float, float]:
    """Square crop ``(cx, cy, side)`` around ``box`` (pixel-centre coordinates); the
    whole image (padded to a square) when ``box`` is None."""
    if box is None:
        return (width - 1) / 2.0, (height - 1) / 2.0, float(max(width, height))
    x0, y0, x1, y1 = (float(v) for v in box)
    side = max(x1 - x0, y1 - y0, 1.0) * (1.0 + margin)
    return (x0 + x1) / 2.0, (y0 + y1) / 2.0, side


def crop_and_resize(img: Image.Image, cx: float, cy: float, side: float, size: int, fill=(0, 0, 0)) -> Image.Image:
    """The square of side ``side`` (pixels) centred on pixel coordinate ``(cx, cy)``,
    resampled to ``size x size`` (antialiased bilinear); outside the image: ``fill``."""
    # area coordinates (PIL): pixel i covers [i, i + 1), its centre is i + 0.5
    x0, y0 = cx + 0.5 - side / 2.0, cy + 0.5 - side / 2.0
    x1, y1 = x0 + side, y0 + side
    w, h = img.size
    px0, py0 = max(0, int(np.ceil(-x0))), max(0, int(np.ceil(-y0)))
    px1, py1 = max(0, int(np.ceil(x1 - w))), max(0, int(np.ceil(y1 - h)))
    if px0 or py0 or px1 or py1:
        canvas = Image.new("RGB", (w + px0 + px1, h + py0 + py1), fill)
        canvas.paste(img, (px0, py0))
        img = canvas
        x0, x1, y0, y1 = x0 + px0, x1 + px0, y0 + py0, y1 + py0
    return img.resize((size, size), Image.BILINEAR, box=(x0, y0, x1, y1))


def map_keypoints(xy: np.ndarray, cx: float, cy: float, side: float, size: int) -> np.ndarray:
    """Source pixel coordinates -> normalized coordinates of the crop (see :func:`crop_and_resize`)."""
    j = (xy - np.array([cx, cy])) * (size / side) + size / 2.0 - 0.5
    return pixels_to_normalized(j, size)


class RealKeypointDataset(Dataset):
    """A real dataset: records loaded and cropped on access (see the module docstring).

    Items follow the kpfast convention; ``depth`` is NaN, unlabeled keypoints are
    ``NaN`` in ``keypoints`` replaced by 0 (check ``labeled``). ``visible`` also
    requires the keypoint to lie inside the crop. ``.records[i].extra`` keeps
    format-specific fields (e.g. WFLW's attribute flags).
    """

    def __init__(self, records: list, meta: KeypointMeta, *, image_size: int = 128, margin: float = 0.25,
                 name: str = "real", info: Optional[dict] = None, source=None):
        if not records:
            split, rule = (info or {}).get("split"), (info or {}).get("split_rule")
            hint = "; give a separate test set (open_dataset(..., test=PATH), --test-dataset)" if split == "test" else ""
            raise DatasetFormatError(source if source is not None else name, "no samples" + (
                f" in the {split!r} split" if split else "") + (f" ({rule})" if rule else "") + hint)
        k = meta.num_keypoints
        for r in records:
            if r.keypoints.shape != (k, 2):
                raise ValueError(f"{r.image}: {r.keypoints.shape[0]} keypoints, but meta {meta.name!r} has {k}")
            if not np.isfinite(r.keypoints[r.labeled]).all():
                raise DatasetFormatError(r.extra.get("source", r.image), "a labelled keypoint is not finite")
        self.records = records
        self.meta = meta
        self.image_size = int(image_size)
        self.margin = float(margin)
        self.info = dict(info or {}, name=name)

    def __len__(self) -> int:
        return len(self.records)

    def load_image(self, i: int) -> Image.Image:
        """The RGB image of record ``i`` (:func:`kpfast.data.image_file.read_image`)."""
        return read_image(self.records[i].image)

    def labeled_counts(self) -> np.ndarray:
        """``[N]`` number of labelled keypoints of each sample (no image is read)."""
        return np.array([int(r.labeled.sum()) for r in self.records], dtype=np.int64)

    def __getitem__(self, i: int) -> dict:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for a dataset of {n} samples")
        i = int(i) % n
        r = self.records[i]
        img = self.load_image(i)
        cx, cy, side = crop_box(r.box, img.width, img.height, self.margin if r.box is not None else 0.0)
        s = self.image_size
        crop = crop_and_resize(img, cx, cy, side, s)
        kp = map_keypoints(np.nan_to_num(r.keypoints, nan=0.0), cx, cy, side, s)
        inside = (np.abs(kp) <= 1.0).all(axis=1)
        if r.box is not None:
            box = map_keypoints(np.asarray(r.box, float).reshape(2, 2), cx, cy, side, s).reshape(4)
        else:
            box = map_keypoints(np.array([[0.0, 0.0], [img.width - 1.0, img.height - 1.0]]), cx, cy, side, s).reshape(4)
        image = torch.from_numpy(np.asarray(crop, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()
        return {
            "image": image,
            "keypoints": torch.from_numpy(np.where(r.labeled[:, None], kp, 0.0).astype(np.float32)),
            "visible": torch.from_numpy(r.visible & r.labeled & inside),
            "labeled": torch.from_numpy(r.labeled.copy()),
            "depth": torch.full((self.meta.num_keypoints,), float("nan")),
            "bbox": torch.from_numpy(box.astype(np.float32)),
            "index": i,
        }

    def images(self, indices=None) -> torch.Tensor:
        idx = range(len(self)) if indices is None else indices
        return torch.stack([self[int(i)]["image"] for i in idx])


def find_image(base: Path, stem_path: Path) -> Optional[Path]:
    """The image file next to ``stem_path`` with any known extension."""
    for ext in IMAGE_EXTS + tuple(e.upper() for e in IMAGE_EXTS):
        p = stem_path.with_suffix(ext)
        if p.is_file():
            return p
    return None


def limit(records: list, size: Optional[int]) -> list:
    return records if size is None else records[:size]
