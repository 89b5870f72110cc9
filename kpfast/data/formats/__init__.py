"""Readers of real keypoint datasets: WFLW, 300-W/iBUG ``.pts``, CUB-200-2011, COCO, user folders.

Each returns a :class:`~kpfast.data.formats.common.RealKeypointDataset` with the
format's built-in skeleton, parts and flip permutation. :func:`open_format` detects
the format from the files at a path (or takes it by name); the readers' modules
document the exact file layouts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from .common import DatasetFormatError, RealKeypointDataset, crop_and_resize, map_keypoints
from .faces import ibug_dataset, read_pts, wflw_dataset
from .objects import coco_dataset, cub_dataset, folder_dataset

__all__ = ["open_format", "detect_format", "DatasetFormatError", "RealKeypointDataset", "wflw_dataset", "ibug_dataset",
           "cub_dataset", "coco_dataset", "folder_dataset", "read_pts", "crop_and_resize", "map_keypoints"]

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
        if any(path.glob("annotations/*keypoints*.json")) or any(path.glob("*keypoints*.json")):
            return "coco"
        if next(path.rglob("*.pts"), None) is not None:
            return "300w"
    raise ValueError(
        f"cannot tell the dataset format of {path}: expected a WFLW root (WFLW_annotations/), a CUB root (images.txt, "
        f"parts/part_locs.txt), a COCO keypoints JSON (or a folder with annotations/*keypoints*.json), a folder of "
        f"images with .pts files (300-W), or a folder with keypoints.json + labels.csv/labels.json; or name the format "
        f"as 'wflw:PATH', '300w:PATH', 'cub:PATH', 'coco:PATH', 'folder:PATH'")


def open_format(path, fmt: Optional[str] = None, *, split: str = "train", image_size: int = 128,
                size: Optional[int] = None, margin: float = 0.25) -> RealKeypointDataset:
    """Open real data at ``path`` in format ``fmt`` (detected when None)."""
    path = Path(path).expanduser()
    fmt = detect_format(path) if fmt is None else fmt
    if fmt not in READERS:
        raise ValueError(f"unknown format {fmt!r}; choose one of {sorted(READERS)}")
    return READERS[fmt](path, split, image_size=image_size, size=size, margin=margin)
