"""``open_dataset``: the one entry point the trainer calls."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

__all__ = ["open_dataset", "FORMATS"]

# real-data format prefixes accepted in ``spec`` ("wflw:/data/WFLW")
FORMATS = ("wflw", "300w", "cub", "coco", "folder")
_ALIASES = {"ibug": "300w", "pts": "300w", "300-w": "300w", "cub200": "cub", "custom": "folder"}


def open_dataset(spec: str, split: str = "train", *, image_size: int = 128, size: Optional[int] = None,
                 seed: int = 0, cache_dir: Optional[str | os.PathLike] = None, progress: bool = True,
                 test: Optional[str | os.PathLike] = None, category=None):
    """Open a keypoint dataset by name or path.

    Args:
        spec: one of
            - a built-in procedural category: ``"face"``, ``"animal"``, ``"car"``
              (generated on first use and cached on disk);
            - a path to real data, whose format is detected from the files it holds;
            - ``"FORMAT:PATH"`` to name the format explicitly, FORMAT one of
              ``wflw``, ``300w`` (alias ``ibug``, ``pts``), ``cub``, ``coco``, ``folder``.
        split: ``"train"`` or ``"test"`` (procedural data also has ``"val"``; real
            formats accept ``"all"``; user folders also have ``"labeled"``). Real data
            with a test set of its own (WFLW's lists, CUB's split file, 300-W's test
            folders, COCO train/val files, a folder's ``test/``) uses it; one file or
            folder without one is split by image path: a fixed 20 % of its images (the
            SHA-256 of each image's relative path decides) is ``"test"``, the rest
            ``"train"``. ``dataset.info["split_rule"]`` says which rule applied.
        image_size: side ``S`` of the square images the samples carry.
        size: number of samples: for procedural data the split's size (defaults:
            train 5000, test 500, val 500); for real data the first ``size`` samples
            of the split (``None`` = all).
        seed: procedural data's seed (same seed -> bit-identical samples).
        cache_dir: where generated data is cached (default ``$KPFAST_CACHE`` or
            ``~/.cache/kpfast``); unused by real formats.
        progress: show a tqdm progress bar while generating.
        test: real data only: the test set, a path or ``"FORMAT:PATH"`` like ``spec``.
            ``split="test"`` then opens ``test`` (its own test split if it has one,
            else all of it), and ``"train"`` opens ``spec`` without holding anything
            out (its own train split if it has one, else all of it).
        category: COCO-format data only: the category names to read (``"antelope"``,
            ``"antelope,jaguar"`` or a list); by default every category that has the
            file's keypoints.

    Returns:
        A ``torch.utils.data.Dataset`` whose items are dicts ``image [3,S,S]``,
        ``keypoints [K,2]`` (normalized, ``align_corners=True``), ``visible [K]``,
        ``labeled [K]``, ``depth [K]``, ``bbox [4]``, ``index``; with ``.meta``
        (a :class:`~kpfast.data.meta.KeypointMeta`) and ``.info``.

    Example:
        >>> ds = open_dataset("face", "test", size=4, image_size=32, cache_dir="/tmp/kpfast-doc", progress=False)
        >>> len(ds), ds.meta.num_keypoints, ds[0]["image"].shape
        (4, 68, torch.Size([3, 32, 32]))
    """
    if not isinstance(spec, (str, os.PathLike)):
        raise TypeError(f"spec must be a category name or a path, got {type(spec).__name__}")
    spec = os.fspath(spec)
    if not isinstance(image_size, int) or image_size < 8:
        raise ValueError(f"image_size must be an int >= 8, got {image_size!r}")
    if size is not None and (not isinstance(size, int) or size < 1):
        raise ValueError(f"size must be a positive int or None, got {size!r}")

    from .procedural.generate import CATEGORIES, procedural_dataset

    if spec in CATEGORIES:
        if test is not None or category is not None:
            raise ValueError(f"test= and category= apply to real data; the procedural {spec!r} data has its own "
                             f"test split and one category")
        return procedural_dataset(spec, split, image_size=image_size, size=size, seed=seed, cache_dir=cache_dir,
                                  progress=progress)
    from .formats import open_format

    fmt, path = _real_source(spec, "spec", CATEGORIES)
    if test is not None:
        test_fmt, test_path = _real_source(os.fspath(test), "test", CATEGORIES)
        if split == "test":
            fmt, path = test_fmt, test_path
    return open_format(path, fmt, split=split, image_size=image_size, size=size, hash_split=test is None,
                       category=category)


def _real_source(spec: str, arg: str, categories) -> tuple[Optional[str], Path]:
    """``(format or None, existing path)`` of ``"PATH"`` / ``"FORMAT:PATH"``."""
    fmt, path = None, spec
    head, sep, tail = spec.partition(":")
    if sep and (head.lower() in FORMATS or head.lower() in _ALIASES):
        fmt = _ALIASES.get(head.lower(), head.lower())
        path = tail
    p = Path(path).expanduser()
    if not p.exists():
        hint = f"; built-in categories are {sorted(categories)}" if fmt is None and arg == "spec" else ""
        raise FileNotFoundError(f"open_dataset: {arg} {spec!r} is neither a built-in category nor an existing "
                                f"path{hint}" if arg == "spec" else f"open_dataset: {arg} {spec!r} does not exist")
    return fmt, p
