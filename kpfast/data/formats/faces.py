"""Face formats: WFLW (98 points) and 300-W / iBUG ``.pts`` folders (68 points).

WFLW: ``WFLW_annotations/list_98pt_rect_attr_train_test/list_98pt_rect_attr_{train,test}.txt``,
one face per line: 196 coordinates ``x0 y0 ... x97 y97``, the box ``x_min y_min
x_max y_max``, six 0/1 attribute flags (pose, expression, illumination, make-up,
occlusion, blur) and the image path relative to ``WFLW_images/``. Coordinates are
used as 0-based pixel positions. All points labeled and visible (WFLW has no
per-point occlusion flag; the attributes are kept in ``record.extra``). From the root
folder, ``train``/``test`` are WFLW's own lists; one list file given alone has no
test set of its own and is split by image path
(:func:`~kpfast.data.formats.common.split_without_test_set`).

300-W / iBUG: image files with a ``.pts`` beside them::

    version: 1
    n_points:  68
    {
    x y          (68 lines, 1-based pixel coordinates: 1 is subtracted)
    }

The box is the landmarks' bounding box. Splits: ``test`` = files under a folder
named ``testset``/``test*`` or ``ibug`` (300-W's common/challenging test sets),
``train`` = the rest, ``all`` = everything. A tree (or one file) with no such
folder, or with nothing outside one, has no test set of its own and is split by
image path (:func:`~kpfast.data.formats.common.split_without_test_set`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

from ..skeletons import face68_meta, wflw98_meta
from .common import (DatasetFormatError, Record, RealKeypointDataset, check_box, check_split, find_image, limit,
                     parse_floats, read_lines, split_without_test_set)

WFLW_ATTRIBUTES = ("pose", "expression", "illumination", "make_up", "occlusion", "blur")


def _wflw_annotation(path: Path, split: str) -> Path:
    name = f"list_98pt_rect_attr_{split}.txt"
    for cand in (path / "WFLW_annotations" / "list_98pt_rect_attr_train_test" / name,
                 path / "list_98pt_rect_attr_train_test" / name, path / name):
        if cand.is_file():
            return cand
    found = sorted(path.rglob(name))
    if found:
        return found[0]
    raise DatasetFormatError(path / "WFLW_annotations" / "list_98pt_rect_attr_train_test" / name,
                             "WFLW annotation list not found")


def _wflw_image_root(ann: Path, root: Path) -> Path:
    for cand in (root / "WFLW_images", ann.parent.parent.parent / "WFLW_images", ann.parent.parent / "WFLW_images",
                 ann.parent / "WFLW_images", root):
        if cand.is_dir():
            return cand
    return root


def _wflw_records(ann: Path, images: Path) -> list:
    records = []
    for ln, line in enumerate(read_lines(ann, "WFLW annotation list"), start=1):
        tok = line.split()
        if not tok:
            continue
        if len(tok) != 207:
            raise DatasetFormatError(ann, f"expected 207 fields (196 coordinates, 4 box, 6 attributes, image path), "
                                          f"found {len(tok)}", ln)
        vals = parse_floats(tok[:206], ann, ln, "coordinates")
        kp = np.asarray(vals[:196], dtype=np.float64).reshape(98, 2)
        box = check_box(vals[196:200], ann, "box", ln)
        attrs = dict(zip(WFLW_ATTRIBUTES, (int(v) for v in vals[200:206])))
        records.append(Record(image=images / tok[206], keypoints=kp, visible=np.ones(98, bool),
                              labeled=np.ones(98, bool), box=box, extra={"attributes": attrs, "source": f"{ann}:{ln}"},
                              key=tok[206]))
    if not records:
        raise DatasetFormatError(ann, "no faces: the annotation list is empty")
    return records


def wflw_dataset(path: Path, split: str = "train", *, image_size: int = 128, size: Optional[int] = None,
                 margin: float = 0.25, hash_split: bool = True) -> RealKeypointDataset:
    """WFLW from its root folder (or one annotation list file)."""
    check_split(split, ("train", "test", "all"), "WFLW")
    if path.is_file():
        records, rule = split_without_test_set(_wflw_records(path, _wflw_image_root(path, path.parent)), split, path,
                                               hash_split=hash_split)
        anns = [path]
    else:
        anns = [_wflw_annotation(path, s) for s in (("train", "test") if split == "all" else (split,))]
        records = [r for ann in anns for r in _wflw_records(ann, _wflw_image_root(ann, path))]
        rule = "WFLW's own train and test annotation lists"
    return RealKeypointDataset(limit(records, size), wflw98_meta(), image_size=image_size, margin=margin, name="wflw",
                               info={"annotation": ", ".join(map(str, anns)), "split": split, "split_rule": rule},
                               source=anns[0])


def read_pts(path: Path) -> np.ndarray:
    """The points of an iBUG ``.pts`` file as 0-based pixel coordinates ``[N, 2]``."""
    lines = read_lines(path, ".pts landmark file")
    n = None
    start = None
    for ln, line in enumerate(lines, start=1):
        s = line.strip()
        if s.startswith("n_points"):
            try:
                n = int(s.split(":", 1)[1])
            except (IndexError, ValueError):
                raise DatasetFormatError(path, f"malformed header {s!r}, expected 'n_points: N'", ln) from None
        elif s == "{":
            start = ln
            break
    if n is None or start is None:
        raise DatasetFormatError(path, "missing 'n_points:' header or '{' line", len(lines) or None)
    pts = []
    for ln in range(start + 1, start + 1 + n):
        if ln > len(lines):
            raise DatasetFormatError(path, f"file ends after {len(pts)} of {n} points", ln - 1)
        tok = lines[ln - 1].split()
        if len(tok) != 2:
            raise DatasetFormatError(path, f"expected 'x y', found {lines[ln - 1].strip()!r}", ln)
        pts.append(parse_floats(tok, path, ln, "point"))
    end = start + 1 + n
    if end > len(lines) or lines[end - 1].strip() != "}":
        raise DatasetFormatError(path, "expected '}' after the points", min(end, len(lines)))
    return np.asarray(pts, dtype=np.float64) - 1.0  # 1-based (Matlab) -> 0-based


def _is_test(p: Path, root: Path) -> bool:
    parts = [q.lower() for q in p.relative_to(root).parts[:-1]]
    return any(q.startswith("test") or q == "ibug" for q in parts)


def ibug_dataset(path: Path, split: str = "train", *, image_size: int = 128, size: Optional[int] = None,
                 margin: float = 0.25, hash_split: bool = True) -> RealKeypointDataset:
    """A folder tree of images with iBUG ``.pts`` files (300-W), 68 points."""
    check_split(split, ("train", "test", "all"), "300-W")
    root = path if path.is_dir() else path.parent
    files = [path] if path.is_file() else sorted(path.rglob("*.pts"))
    if not files:
        raise DatasetFormatError(path, "no .pts files found")
    records = []
    for f in files:
        pts = read_pts(f)
        if pts.shape[0] != 68:
            raise DatasetFormatError(f, f"has {pts.shape[0]} points; the 300-W reader expects 68", 2)
        img = find_image(f.parent, f)
        if img is None:
            raise DatasetFormatError(f, "no image with the same name next to it")
        box = np.concatenate([pts.min(axis=0), pts.max(axis=0)])
        records.append(Record(image=img, keypoints=pts, visible=np.ones(68, bool), labeled=np.ones(68, bool), box=box,
                              extra={"source": str(f), "test": _is_test(f, root)},
                              key=img.relative_to(root).as_posix()))
    tags = {r.extra["test"] for r in records}
    if split == "all" or tags != {True, False}:
        records, rule = split_without_test_set(records, split, path, hash_split=hash_split)
    else:
        records = [r for r in records if r.extra["test"] == (split == "test")]
        rule = "300-W's folders: test = files under folders named test* or ibug, train = the rest"
    return RealKeypointDataset(limit(records, size), face68_meta(), image_size=image_size, margin=margin, name="300w",
                               info={"root": str(path), "split": split, "split_rule": rule}, source=path)
