"""Generation, seeding and caching of the procedural benchmark.

Sample ``i`` of split ``s`` of category ``c`` with seed ``seed`` is a pure function
of ``(GENERATOR_VERSION, c, s, seed, i, image_size, supersample)``: its scene is drawn
from ``numpy.random.default_rng([seed, split_id, category_id, i])`` and rendered by
the batched ray caster, which is bitwise independent of the batch a sample is
rendered in and of the thread count. Train and test use different streams.
"""

from __future__ import annotations

import os
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch

from ..array_dataset import KeypointArrayDataset
from ..cache import cached_arrays
from ..meta import KeypointMeta
from . import animal, car, face
from .raycast import pack_scenes, render

# bump whenever a change alters any generated pixel or label
GENERATOR_VERSION = 2

SPLITS = {"train": 0, "test": 1, "val": 2}


@dataclass(frozen=True)
class Category:
    name: str
    make_scene: Callable
    meta: KeypointMeta
    default_sizes: dict
    description: str


CATEGORIES = {
    "face": Category("face", face.make_scene, face.META, {"train": 5000, "test": 500, "val": 500},
                     "3D head, 68 iBUG landmarks, yaw +-60 deg, expressions"),
    "animal": Category("animal", animal.make_scene, animal.META, {"train": 5000, "test": 500, "val": 500},
                       "articulated quadruped, 20 joints, any viewing direction"),
    "car": Category("car", car.make_scene, car.META, {"train": 5000, "test": 500, "val": 500},
                    "rigid car, 14 keypoints with self-occlusion"),
}


def _category(name: str) -> Category:
    if name not in CATEGORIES:
        raise ValueError(f"unknown procedural category {name!r}; choose one of {sorted(CATEGORIES)}")
    return CATEGORIES[name]


def _split_id(split: str) -> int:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {sorted(SPLITS)}")
    return SPLITS[split]


def sample_rng(category: str, split: str, seed: int, index: int) -> np.random.Generator:
    """The random stream of one sample."""
    cid = zlib.crc32(category.encode())
    return np.random.default_rng([int(seed), _split_id(split), cid, int(index)])


def make_scenes(category: str, split: str, seed: int, indices) -> list:
    """Scenes of the given sample indices (deterministic per index)."""
    cat = _category(category)
    return [cat.make_scene(sample_rng(category, split, seed, i)) for i in indices]


def render_samples(category: str, split: str, seed: int, indices, *, image_size: int = 128,
                   supersample: int = 1, device=None) -> dict:
    """Render the given sample indices as one batch; returns torch tensors
    ``image [B,3,S,S]`` float32, ``keypoints``, ``visible``, ``depth``, ``bbox``."""
    packed = pack_scenes(make_scenes(category, split, seed, indices))
    if device is not None:
        packed = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in packed.items()}
    with torch.no_grad():
        return render(packed, image_size, supersample=supersample)


def generate_arrays(category: str, split: str, size: int, *, image_size: int = 128, seed: int = 0,
                    batch_size: int = 16, supersample: int = 1, progress: bool = True,
                    workers: Optional[int] = None) -> dict:
    """Generate a whole split as numpy arrays (uint8 images and labels)."""
    if size < 1:
        raise ValueError(f"size must be a positive number of samples, got {size}")
    if image_size < 8:
        raise ValueError(f"image_size must be at least 8 pixels, got {image_size}")
    cat = _category(category)
    k = cat.meta.num_keypoints
    out = {
        "images": np.zeros((size, 3, image_size, image_size), np.uint8),
        "keypoints": np.zeros((size, k, 2), np.float32),
        "visible": np.zeros((size, k), bool),
        "labeled": np.ones((size, k), bool),
        "depth": np.zeros((size, k), np.float32),
        "bbox": np.zeros((size, 4), np.float32),
    }
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=size, desc=f"kpfast: generating {category}/{split}", unit="img")
    batches = [list(range(s, min(size, s + batch_size))) for s in range(0, size, batch_size)]

    def work(idx):
        r = render_samples(category, split, seed, idx, image_size=image_size, supersample=supersample)
        sl = slice(idx[0], idx[-1] + 1)
        out["images"][sl] = torch.floor(r["image"] * 255.0 + 0.5).to(torch.uint8).numpy()
        out["keypoints"][sl] = r["keypoints"].numpy()
        out["visible"][sl] = r["visible"].numpy()
        out["depth"][sl] = r["depth"].numpy()
        out["bbox"][sl] = r["bbox"].numpy()
        if bar is not None:
            bar.update(len(idx))

    # torch's own intra-op threads spin and fight each other on a small, busy machine;
    # rendering one batch per Python thread with single-threaded ops scales better.
    # Results do not depend on this (see the module docstring).
    n_workers = max(1, min(workers if workers is not None else (os.cpu_count() or 1), len(batches)))
    old_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        if n_workers == 1:
            for idx in batches:
                work(idx)
        else:
            with ThreadPoolExecutor(n_workers) as pool:
                for _ in pool.map(work, batches):
                    pass
    finally:
        torch.set_num_threads(old_threads)
        if bar is not None:
            bar.close()
    return out


def procedural_dataset(category: str, split: str = "train", *, image_size: int = 128, size: Optional[int] = None,
                       seed: int = 0, cache_dir=None, progress: bool = True, supersample: int = 1,
                       batch_size: int = 16, workers: Optional[int] = None) -> KeypointArrayDataset:
    """The procedural dataset of ``category`` (``"face"``, ``"animal"``, ``"car"``), generated
    on first use and cached (see :mod:`kpfast.data.cache`).

    Example:
        >>> ds = procedural_dataset("face", "test", size=4, image_size=32, cache_dir="/tmp/kpfast-doc", progress=False)
        >>> ds[0]["keypoints"].shape, ds.meta.normalizer
        (torch.Size([68, 2]), (36, 45))
    """
    cat = _category(category)
    _split_id(split)
    n = cat.default_sizes[split] if size is None else int(size)
    params = {"generator_version": GENERATOR_VERSION, "category": category, "split": split, "size": n,
              "image_size": int(image_size), "seed": int(seed), "supersample": int(supersample),
              "meta": cat.meta.to_dict()}
    t0 = time.perf_counter()
    arrays, folder, hit = cached_arrays(
        params,
        lambda: generate_arrays(category, split, n, image_size=image_size, seed=seed, batch_size=batch_size,
                                supersample=supersample, progress=progress, workers=workers),
        prefix=f"{category}-{split}-{n}-{image_size}px-seed{seed}", cache_dir=cache_dir)
    info = dict(params, cache_folder=str(folder), cached=hit, seconds=time.perf_counter() - t0,
                split_rule=f"procedural: the {split!r} split is rendered from its own random streams")
    return KeypointArrayDataset(arrays, cat.meta, info=info)
