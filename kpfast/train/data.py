"""The data side of a run: datasets, the few-shot labelled set, resumable batch streams, the batch record."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from ..data import KeypointMeta, collate_samples, open_dataset
from ..data.few_shot import labeled_counts, select_few_shot
from ..models.features import resolve_extractor
from ..config import TrainConfig
from .distributed import World
from .streams import stream_seed


@dataclass
class TrainingData:
    """Datasets and the labelled subset of a run.

    ``train`` (all of it is the unlabelled pool; the labelled images are in it too,
    as in the paper), ``test``, ``meta``, ``labeled`` (indices into ``train``),
    ``selection`` (how they were chosen) and ``test_split`` (how the test split was
    made: the dataset's own, a separate test set, or the hashed split of one source).
    """

    train: torch.utils.data.Dataset
    test: torch.utils.data.Dataset
    meta: KeypointMeta
    labeled: list[int]
    selection: str
    test_split: str


def open_training_data(cfg: TrainConfig, world: World) -> TrainingData:
    """Open (generate and cache, for procedural data) train and test splits and pick the labelled images.

    Rank 0 generates the data and selects the few-shot examples first; the other
    ranks then read the cache and receive the selection.
    """
    def open_split(split: str, size):
        return open_dataset(cfg.dataset, split, image_size=cfg.image_size, size=size, seed=cfg.data_seed,
                            cache_dir=cfg.cache_dir, progress=cfg.progress and world.is_main, test=cfg.test_dataset,
                            category=cfg.category)

    selection = None
    if world.is_main:
        train, test = open_split("train", cfg.train_size), open_split("test", cfg.test_size)
        check_test_split(train, test)
        selection = select_labeled(train, cfg, progress=cfg.progress)
    world.barrier()
    if not world.is_main:
        train, test = open_split("train", cfg.train_size), open_split("test", cfg.test_size)
    labeled, how = world.broadcast(selection)
    return TrainingData(train=train, test=test, meta=train.meta, labeled=labeled, selection=how,
                        test_split=test.info.get("split_rule", "the dataset's own test split"))


def _image_files(dataset) -> set:
    return {os.path.normpath(os.path.abspath(r.image)) for r in getattr(dataset, "records", ())}


def check_test_split(train, test) -> None:
    """Refuse a test split that shares an image file with the training split, or that has
    no labelled keypoint to measure (``ValueError`` naming the overlap / the split)."""
    both = _image_files(train) & _image_files(test)
    if both:
        raise ValueError(f"the test split shares {len(both)} image(s) with the training split (e.g. {min(both)}): "
                         f"the test metrics would be measured on training images; give a test set with no training "
                         f"image in it (test_dataset / --test-dataset)")
    if not (labeled_counts(test) > 0).any():
        raise ValueError(f"the test split ({len(test)} images; {test.info.get('split_rule', 'its own')}) has no "
                         f"labelled keypoint, so there is nothing to evaluate; give a labelled test set "
                         f"(test_dataset / --test-dataset)")


def select_labeled(train, cfg: TrainConfig, *, progress: bool = False) -> tuple[list[int], str]:
    """``(indices, description)``: k-means selection (paper Sec. 3.6) or random (``--without kmeans``),
    among the training images that carry at least one labelled keypoint."""
    counts = labeled_counts(train)
    candidates = np.flatnonzero(counts > 0).tolist()
    if cfg.shots > len(candidates):
        raise ValueError(f"shots={cfg.shots} but only {len(candidates)} of the {len(train)} training images of "
                         f"{cfg.dataset!r} have labelled keypoints: label more images or lower shots (--shots)")
    every = len(candidates) == len(train)
    among = "" if every else f" among the {len(candidates)} labelled images"
    if cfg.uses("kmeans"):
        features, description = resolve_extractor(cfg.few_shot_features)
        idx = select_few_shot(train, cfg.shots, features=features, seed=stream_seed(cfg.seed, "selection"),
                              progress=progress, candidates=None if every else candidates)
        return [int(i) for i in idx], f"k-means over {description}{among}"
    g = torch.Generator().manual_seed(stream_seed(cfg.seed, "selection"))
    perm = torch.randperm(len(candidates), generator=g)[:cfg.shots].tolist()
    return [candidates[i] for i in perm], f"random (seed {cfg.seed}){among}"


class BatchStream:
    """An endless stream of index batches over ``indices``, reshuffled every epoch.

    With ``world_size > 1`` each rank draws from its own disjoint shard of every
    epoch's permutation (``DistributedSampler``'s split: ``perm[rank::world_size]``,
    the permutation truncated to a multiple of the world size). The permutation of
    epoch ``e`` is a pure function of ``(seed, e)``, so the stream's whole state is
    ``(epoch, position)``: :meth:`state_dict` / :meth:`load_state_dict` resume it exactly.

    Example:
        >>> s = BatchStream(range(5), 2, seed=0)
        >>> batches = [s.next() for _ in range(5)]
        >>> sorted(batches[0] + batches[1] + batches[2][:1]) == [0, 1, 2, 3, 4]
        True
    """

    def __init__(self, indices: Sequence[int], batch_size: int, *, seed: int, rank: int = 0, world_size: int = 1):
        self.indices = torch.as_tensor(list(indices), dtype=torch.int64)
        if len(self.indices) < world_size:
            raise ValueError(f"{len(self.indices)} images cannot be shared among {world_size} processes")
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.epoch, self.position = 0, 0
        self._shard = self._make_shard()

    def _make_shard(self) -> torch.Tensor:
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch) % 2 ** 63)
        perm = self.indices[torch.randperm(len(self.indices), generator=g)]
        usable = len(perm) - len(perm) % self.world_size
        return perm[:usable][self.rank::self.world_size]

    def next(self) -> list[int]:
        """The next ``batch_size`` indices (crossing into the next epoch when needed)."""
        out = []
        while len(out) < self.batch_size:
            if self.position >= len(self._shard):
                self.epoch, self.position = self.epoch + 1, 0
                self._shard = self._make_shard()
            take = min(self.batch_size - len(out), len(self._shard) - self.position)
            out += self._shard[self.position:self.position + take].tolist()
            self.position += take
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._shard = self._make_shard()


def fetch(dataset, indices: Sequence[int], device: torch.device) -> dict:
    """Stack the samples ``indices`` of ``dataset`` into a batch dict on ``device``."""
    batch = collate_samples([dataset[int(i)] for i in indices])
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


@dataclass
class Truth:
    """Every image's annotation in a :class:`Batch`, read only by the diagnostics, never by a loss.

    Attributes:
        keypoints: ``[B, K, 2]``.
        labeled: ``[B, K]`` bool: the keypoint carries a label.
        depth: ``[B, K]`` true depth (NaN where unknown: real data).
        unlabeled: ``[B]`` bool: the image came from the unlabelled stream.
    """

    keypoints: Tensor
    labeled: Tensor
    depth: Tensor
    unlabeled: Tensor


@dataclass
class Batch:
    """One training step's images: ``U`` unlabelled images followed by the ``L`` labelled ones.

    Attributes:
        images: ``[U + L, 3, S, S]`` in ``[0, 1]``.
        labeled_keypoints: ``[L, K, 2]``: the labels of the last ``L`` images.
        labeled_mask: ``[L, K]`` bool: which of them are labelled.
        truth: the annotation of all ``U + L`` images, for the diagnostics (None: not known).
    """

    images: Tensor
    labeled_keypoints: Tensor
    labeled_mask: Tensor
    truth: Optional[Truth] = None


def training_batch(dataset, unlabeled: Sequence[int], labeled: Sequence[int], device: torch.device) -> Batch:
    """The :class:`Batch` of the images ``unlabeled`` (may be empty) and ``labeled`` of ``dataset``."""
    lab = fetch(dataset, labeled, device)
    parts = [fetch(dataset, unlabeled, device), lab] if len(unlabeled) else [lab]
    cat = lambda key: torch.cat([p[key] for p in parts])  # noqa: E731
    first_labeled = len(unlabeled)
    truth = Truth(keypoints=cat("keypoints"), labeled=cat("labeled"), depth=cat("depth"),
                  unlabeled=torch.arange(first_labeled + len(labeled), device=device) < first_labeled)
    return Batch(images=cat("image"), labeled_keypoints=lab["keypoints"], labeled_mask=lab["labeled"], truth=truth)
