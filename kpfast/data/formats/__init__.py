"""Readers of real keypoint datasets: WFLW, 300-W/iBUG ``.pts``, CUB-200-2011, COCO-style JSON
(COCO, AP-10K, Animal-Pose), user folders.

Each returns a :class:`~kpfast.data.formats.common.RealKeypointDataset` with the
format's built-in skeleton, parts and flip permutation. :func:`open_format` detects
the format from the files at a path (or takes it by name); the readers' modules
document the exact file layouts. A source without a test set of its own is split by
image path (:func:`~kpfast.data.formats.common.split_without_test_set`); the
dataset's ``info["split_rule"]`` says which rule made its split.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from .common import (TEST_FRACTION, DatasetFormatError, RealKeypointDataset, crop_and_resize, hashed_split,
                     map_keypoints)
from .faces import ibug_dataset, read_pts, wflw_dataset
from .objects import coco_dataset, cub_dataset, folder_dataset

__all__ = ["open_format", "detect_format", "DatasetFormatError", "RealKeypointDataset", "wflw_dataset", "ibug_dataset",
           "cub_dataset", "coco_dataset", "folder_dataset", "read_pts", "crop_and_resize", "map_keypoints",
           "hashed_split", "TEST_FRACTION"]

READERS = {"wflw": wflw_dataset, "300w": ibug_dataset, "cub": cub_dataset, "coco": coco_dataset, "folder": folder_dataset}


def detect_format(path: Path) -> str:
    """The format of the data at ``path`` (see the module docstring); ``ValueError`` if unknown."""
    path = Path(path)
    if path.is_file():
        if path.suffix == ".txt" and "98pt" in path.name:
            return "wflw"
        if path.suffix == ".pts":
            return "300w"
        if path.suffix == ".json":
            return "coco"
    elif path.is_dir():
        if (path / "keypoints.json").is_file() and ((path / "labels.csv").is_file() or (path / "labels.json").is_file()):
            return "folder"
        if (path / "images.txt").is_file() and (path / "parts" / "part_locs.txt").is_file():
            return "cub"
        if (path / "WFLW_annotations").is_dir() or any(path.glob("**/list_98pt_rect_attr_*.txt")):
            return "wflw"
        if any(path.glob("annotations/*.json")) or any(path.glob("*keypoints*.json")):
            return "coco"
        if next(path.rglob("*.pts"), None) is not None:
            return "300w"
    raise ValueError(
        f"cannot tell the dataset format of {path}: expected a WFLW root (WFLW_annotations/), a CUB root (images.txt, "
        f"parts/part_locs.txt), a COCO-style keypoints JSON (or a folder with annotations/*.json), a folder of "
        f"images with .pts files (300-W), or a folder with keypoints.json + labels.csv/labels.json; or name the format "
        f"as 'wflw:PATH', '300w:PATH', 'cub:PATH', 'coco:PATH', 'folder:PATH'")


def open_format(path, fmt: Optional[str] = None, *, split: str = "train", image_size: int = 128,
                size: Optional[int] = None, margin: float = 0.25, hash_split: bool = True,
                category=None) -> RealKeypointDataset:
    """Open real data at ``path`` in format ``fmt`` (detected when None).

    ``hash_split=False``: a source without a test set of its own serves ``split`` whole
    (the other split comes from elsewhere) instead of being split by image path.
    ``category``: COCO-format only, the categories to read (see :mod:`.objects`).
    """
    path = Path(path).expanduser()
    fmt = detect_format(path) if fmt is None else fmt
    if fmt not in READERS:
        raise ValueError(f"unknown format {fmt!r}; choose one of {sorted(READERS)}")
    kw = {}
    if category is not None:
        if fmt != "coco":
            raise ValueError(f"category={category!r} applies to COCO-format data, not to {fmt!r} data at {path}")
        kw["category"] = category
    return READERS[fmt](path, split, image_size=image_size, size=size, margin=margin, hash_split=hash_split, **kw)
