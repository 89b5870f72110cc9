"""``KeypointMeta``: what a dataset's keypoints mean (names, skeleton, parts, flips).

A dataset's ``.meta`` tells the trainer everything it needs beyond the samples:

- ``keypoint_names``: one name per keypoint, ``K`` in all;
- ``edges``: the skeleton, pairs ``(i, j)`` of keypoint indices (drawn by the
  edge-map renderer and the drawing helpers);
- ``parts``: user-defined parts for the 3D geometric loss, name -> keypoint
  indices (the trainer adds the whole object itself, do not list it);
- ``flip_perm``: after a horizontal flip of the image, keypoint ``k`` of the flipped
  sample is keypoint ``flip_perm[k]`` of the original (left <-> right); an
  involution (applying it twice is the identity);
- ``normalizer``: two keypoint indices whose distance normalizes NME (outer eye
  corners for faces), or ``None`` for PCK-style bounding-box normalization.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

__all__ = ["KeypointMeta", "flip_perm_from_names", "flip_perm_from_pairs"]


def _as_int(v: Any, what: str) -> int:
    if isinstance(v, bool) or not isinstance(v, (int,)) and not (hasattr(v, "__index__")):
        raise TypeError(f"{what} must be an int, got {v!r} ({type(v).__name__})")
    return int(v)


def _index_pair(pair: Any, what: str, k: int) -> tuple[int, int]:
    """``pair`` as two distinct keypoint indices in ``[0, k)``; a ``ValueError``/``TypeError`` starting with ``what``."""
    try:
        a, b = pair
    except (TypeError, ValueError):
        raise ValueError(f"{what} = {pair!r} is not a pair (i, j) of keypoint indices") from None
    a, b = _as_int(a, f"{what}[0]"), _as_int(b, f"{what}[1]")
    for v in (a, b):
        if not 0 <= v < k:
            raise ValueError(f"{what} = ({a}, {b}) has index {v} outside [0, {k}) (K = {k} keypoints)")
    if a == b:
        raise ValueError(f"{what} = ({a}, {b}) pairs keypoint {a} with itself")
    return a, b


@dataclass
class KeypointMeta:
    """Semantics of a keypoint set; validated on construction.

    Example:
        >>> meta = KeypointMeta(
        ...     name="toy", keypoint_names=["left_eye", "right_eye", "nose"],
        ...     edges=[(0, 2), (1, 2)], parts={"eyes": [0, 1]},
        ...     flip_perm=[1, 0, 2], normalizer=(0, 1))
        >>> meta.num_keypoints
        3
        >>> KeypointMeta.from_config(meta.to_dict()) == meta
        True
    """

    name: str
    keypoint_names: list[str]
    edges: list[tuple[int, int]] = field(default_factory=list)
    parts: dict[str, list[int]] = field(default_factory=dict)
    flip_perm: Optional[list[int]] = None
    normalizer: Optional[tuple[int, int]] = None

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"meta.name must be a non-empty string, got {self.name!r}")
        if isinstance(self.keypoint_names, str) or not isinstance(self.keypoint_names, Sequence):
            raise TypeError(f"meta {self.name!r}: keypoint_names must be a list of strings, got {type(self.keypoint_names).__name__}")
        self.keypoint_names = [str(n) for n in self.keypoint_names]
        k = len(self.keypoint_names)
        if k == 0:
            raise ValueError(f"meta {self.name!r}: keypoint_names is empty; a dataset needs at least one keypoint")
        dup = sorted({n for n in self.keypoint_names if self.keypoint_names.count(n) > 1})
        if dup:
            raise ValueError(f"meta {self.name!r}: duplicate keypoint names {dup}")

        self.edges = [_index_pair(e, f"meta {self.name!r}: edges[{e_i}]", k) for e_i, e in enumerate(self.edges)]

        if not isinstance(self.parts, Mapping):
            raise TypeError(f"meta {self.name!r}: parts must be a dict name -> list of indices, got {type(self.parts).__name__}")
        parts = {}
        for pname, idx in self.parts.items():
            if isinstance(idx, (str, bytes)) or not isinstance(idx, Sequence):
                raise TypeError(f"meta {self.name!r}: parts[{pname!r}] must be a list of keypoint indices, got {idx!r}")
            ids = [_as_int(v, f"meta {self.name!r}: parts[{pname!r}] entry") for v in idx]
            if not ids:
                raise ValueError(f"meta {self.name!r}: parts[{pname!r}] is empty")
            bad = [v for v in ids if not 0 <= v < k]
            if bad:
                raise ValueError(f"meta {self.name!r}: parts[{pname!r}] has indices {bad} outside [0, {k})")
            if len(set(ids)) != len(ids):
                raise ValueError(f"meta {self.name!r}: parts[{pname!r}] lists an index twice: {ids}")
            parts[str(pname)] = ids
        self.parts = parts

        if self.flip_perm is None:
            self.flip_perm = list(range(k))
        perm = [_as_int(v, f"meta {self.name!r}: flip_perm entry") for v in self.flip_perm]
        if len(perm) != k:
            raise ValueError(f"meta {self.name!r}: flip_perm has {len(perm)} entries, expected one per keypoint (K = {k})")
        if sorted(perm) != list(range(k)):
            missing = sorted(set(range(k)) - set(perm))
            raise ValueError(f"meta {self.name!r}: flip_perm is not a permutation of 0..{k - 1} (missing {missing})")
        for i, j in enumerate(perm):
            if perm[j] != i:
                raise ValueError(
                    f"meta {self.name!r}: flip_perm is not an involution: flip_perm[{i}] = {j} but flip_perm[{j}] = {perm[j]} "
                    f"(a left/right swap must map {j} back to {i})")
        self.flip_perm = perm

        if self.normalizer is not None:
            self.normalizer = _index_pair(self.normalizer, f"meta {self.name!r}: normalizer", k)

    @property
    def num_keypoints(self) -> int:
        """``K``, the number of keypoints."""
        return len(self.keypoint_names)

    def edge_tensor(self):
        """The skeleton as an int64 tensor ``[E, 2]`` (what ``kpfast.edge_map`` takes)."""
        import torch

        return torch.tensor(self.edges, dtype=torch.int64).reshape(-1, 2)

    def part_mask(self, include_whole: bool = False):
        """Parts as a boolean mask ``[P, K]`` (``part_alignment``'s format), in ``parts`` order;
        ``include_whole`` appends the whole object as a last row."""
        import torch

        rows = [[k in set(ids) for k in range(self.num_keypoints)] for ids in self.parts.values()]
        if include_whole:
            rows.append([True] * self.num_keypoints)
        return torch.tensor(rows, dtype=torch.bool).reshape(-1, self.num_keypoints)

    def to_dict(self) -> dict:
        """A JSON-serializable dict; :meth:`from_config` reads it back."""
        return {
            "name": self.name,
            "keypoint_names": list(self.keypoint_names),
            "edges": [list(e) for e in self.edges],
            "parts": {k: list(v) for k, v in self.parts.items()},
            "flip_perm": list(self.flip_perm),
            "normalizer": list(self.normalizer) if self.normalizer is not None else None,
        }

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | str | Path) -> "KeypointMeta":
        """Build a meta from a dict (or a JSON file path).

        Keys: ``name`` (default ``"custom"``), ``keypoint_names`` (required), ``edges``,
        ``parts``, ``normalizer``, and the flip either as ``flip_perm`` (a full
        permutation) or ``flip_pairs`` (list of ``[i, j]`` swaps, everything else maps
        to itself). Keypoints may be referred to by index or by name in ``edges``,
        ``parts``, ``flip_pairs`` and ``normalizer``. Without either flip key the
        permutation is derived from the names (``left``/``right``, ``l_``/``r_``).

        Example:
            >>> m = KeypointMeta.from_config({"keypoint_names": ["l_eye", "r_eye", "nose"],
            ...                               "edges": [["l_eye", "nose"], ["r_eye", "nose"]],
            ...                               "normalizer": ["l_eye", "r_eye"]})
            >>> m.flip_perm, m.edges, m.normalizer
            ([1, 0, 2], [(0, 2), (1, 2)], (0, 1))
        """
        source = "config"
        if isinstance(config, (str, Path)):
            source = str(config)
            try:
                config = json.loads(Path(config).read_text())
            except FileNotFoundError:
                raise FileNotFoundError(f"keypoint config {source} does not exist") from None
            except json.JSONDecodeError as e:
                raise ValueError(f"keypoint config {source}: invalid JSON at line {e.lineno}: {e.msg}") from None
        if not isinstance(config, Mapping):
            raise TypeError(f"keypoint config must be a dict, got {type(config).__name__}")
        unknown = set(config) - {"name", "keypoint_names", "edges", "parts", "flip_perm", "flip_pairs", "normalizer"}
        if unknown:
            raise ValueError(f"{source}: unknown keys {sorted(unknown)} (allowed: name, keypoint_names, edges, parts, flip_perm, flip_pairs, normalizer)")
        if "keypoint_names" not in config:
            raise ValueError(f"{source}: 'keypoint_names' is required")
        names = [str(n) for n in config["keypoint_names"]]
        index = {n: i for i, n in enumerate(names)}

        def ref(v, where):
            if isinstance(v, str):
                if v not in index:
                    raise ValueError(f"{source}: {where} names keypoint {v!r}, which is not in keypoint_names")
                return index[v]
            return v

        edges = [(ref(a, "edges"), ref(b, "edges")) for a, b in config.get("edges", [])]
        parts = {p: [ref(v, f"parts[{p!r}]") for v in ids] for p, ids in config.get("parts", {}).items()}
        normalizer = config.get("normalizer")
        if normalizer is not None:
            normalizer = tuple(ref(v, "normalizer") for v in normalizer)
        if "flip_perm" in config and "flip_pairs" in config:
            raise ValueError(f"{source}: give either flip_perm or flip_pairs, not both")
        if "flip_perm" in config:
            flip = [ref(v, "flip_perm") for v in config["flip_perm"]]
        elif "flip_pairs" in config:
            flip = flip_perm_from_pairs(len(names), [(ref(a, "flip_pairs"), ref(b, "flip_pairs")) for a, b in config["flip_pairs"]])
        else:
            flip = flip_perm_from_names(names)
        return cls(name=str(config.get("name", "custom")), keypoint_names=names, edges=edges, parts=parts,
                   flip_perm=flip, normalizer=normalizer)


def flip_perm_from_pairs(k: int, pairs: Sequence[tuple[int, int]]) -> list[int]:
    """Permutation of ``range(k)`` that swaps each pair and fixes everything else.

    Example:
        >>> flip_perm_from_pairs(4, [(0, 3)])
        [3, 1, 2, 0]
    """
    perm = list(range(k))
    seen: set[int] = set()
    for a, b in pairs:
        a, b = int(a), int(b)
        for v in (a, b):
            if not 0 <= v < k:
                raise ValueError(f"flip pair ({a}, {b}) has index {v} outside [0, {k})")
            if v in seen:
                raise ValueError(f"keypoint {v} appears in more than one flip pair")
            seen.add(v)
        perm[a], perm[b] = b, a
    return perm


_LR = [(r"left", "right"), (r"Left", "Right"), (r"LEFT", "RIGHT")]


def _swap_side(name: str) -> str:
    for l, r in _LR:
        if l in name:
            return name.replace(l, r)
        if r in name:
            return name.replace(r, l)
    m = re.match(r"^([lLrR])([_\-. ])(.*)$", name)
    if m:
        side = {"l": "r", "r": "l", "L": "R", "R": "L"}[m.group(1)]
        return side + m.group(2) + m.group(3)
    m = re.match(r"^(.*)([_\-. ])([lLrR])$", name)
    if m:
        side = {"l": "r", "r": "l", "L": "R", "R": "L"}[m.group(3)]
        return m.group(1) + m.group(2) + side
    return name


def flip_perm_from_names(names: Sequence[str]) -> list[int]:
    """Left/right permutation from keypoint names: ``left_eye`` <-> ``right_eye``,
    ``l_knee`` <-> ``r_knee``, ``wing_L`` <-> ``wing_R``; names without a side (or
    whose mirror name is absent) map to themselves.

    Example:
        >>> flip_perm_from_names(["nose", "left_eye", "right_eye", "l_ear", "r_ear"])
        [0, 2, 1, 4, 3]
    """
    index = {n: i for i, n in enumerate(names)}
    perm = []
    for i, n in enumerate(names):
        j = index.get(_swap_side(n), i)
        perm.append(j)
    # a one-sided match (a -> b but b -> c) cannot happen with the symmetric swap above,
    # but guard anyway so the result is always an involution
    for i, j in enumerate(perm):
        if perm[j] != i:
            perm[i] = i
    return perm
