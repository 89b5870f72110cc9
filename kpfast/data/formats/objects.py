"""Object formats: CUB-200-2011 birds, COCO-style keypoint JSON (COCO, AP-10K, Animal-Pose), users' folders.

CUB-200-2011 (root folder)::

    images.txt              <image_id> <relative path under images/>
    bounding_boxes.txt      <image_id> <x> <y> <width> <height>
    train_test_split.txt    <image_id> <1 = train, 0 = test>
    parts/part_locs.txt     <image_id> <part_id 1..15> <x> <y> <visible 0/1>

CUB only places visible parts, so ``labeled = visible``. Every image needs its lines
in every file.

COCO keypoints: a JSON file, or a dataset folder whose ``annotations/`` (or root)
holds the JSON files. In a folder, files named ``*keypoints*`` are preferred when there
are any (COCO's ``person_keypoints_{train,val}2017.json`` beside ``instances_*``);
a ``train`` file (a name part starting with ``train``, not ``trainval``) and a ``test``
file (a part starting with ``test``, else ``val``) make the official split, the first of
each in sorted order (AP-10K: ``ap10k-{train,test}-split1.json``; MMPose's Animal-Pose:
``animalpose_{train,test}.json``). A single file has no test set of its own and is split
by image path (:func:`~kpfast.data.formats.common.split_without_test_set`). One sample per
non-crowd annotation with at least one labeled keypoint; ``keypoints = [x1, y1, v1, ...]``
with ``v`` 0 = not labeled, 1 = labeled but not visible, 2 = visible;
``bbox = [x, y, w, h]``. Coordinates are used as given (pixel positions).

Categories: every category with the file's keypoint list is read (AP-10K's 54 species
share one; the skeleton is the union of theirs); ``category="a,b"`` keeps only the
named ones. A file whose categories have different keypoint lists needs ``category``.
Skeleton indices are 1-based (COCO), or 0-based when a 0 appears. Images are looked
up next to the JSON, in ``images/``, ``data/`` (AP-10K), ``../<split>`` (``val2017``),
``../images``, ``../data`` and the dataset root (MMPose's Animal-Pose).

The original Animal-Pose release (``keypoints.json``: ``"images"`` a dict
``{"<id>": "<file name>"}``, ``keypoints`` a list of ``[x, y, v]`` with ``v`` 1 =
labeled and visible, 0 = not labeled, ``bbox = [x0, y0, x1, y1]``) is read by the same
reader; its images are looked up in the same places.

Folder (users' own few-shot labels)::

    my_data/
      keypoints.json     {"name", "keypoint_names", "edges", "parts", "flip_pairs" or "flip_perm",
                          "normalizer", optional "coordinates": "pixel_center" (default) | "pixel_corner"}
      labels.csv         image,<name>_x,<name>_y[,<name>_visible]...[,x0,y0,x1,y1]   (or labels.json)
      *.jpg|*.png ...    every image in the folder tree is a sample, labeled or not
      test/ (optional)   images under test/ form the 'test' split

``labels.json`` is ``{"<image>": {"keypoints": [[x, y, v] or null, ...], "bbox": [x0, y0, x1, y1]}}``.
Empty CSV cells / ``null`` mean "not labeled"; ``_visible`` defaults to 1 (any number,
> 0 = visible). Without a box the whole image (padded to a square) is used. Splits:
``train`` (all images outside ``test/``), ``test``, ``labeled`` (only labeled images of
the train split), ``all``. Without a ``test/`` folder the images are split by path
(:func:`~kpfast.data.formats.common.split_without_test_set`).

Every number is checked when the dataset is opened: a non-numeric or non-finite value,
a visibility that is not a number, or a box that is not 4 finite numbers with
``x0 <= x1, y0 <= y1`` is a :class:`~kpfast.data.formats.common.DatasetFormatError`
naming the file and the line (or the JSON path).
"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np

from ..meta import KeypointMeta, flip_perm_from_names
from ..skeletons import CUB_PARTS, COCO_KEYPOINTS, coco17_meta, cub15_meta
from .common import (IMAGE_EXTS, DatasetFormatError, Record, RealKeypointDataset, check_box, check_split, json_number,
                     limit, parse_floats, read_lines, split_without_test_set)


def _table(path: Path, ncols: int, what: str) -> dict:
    out = {}
    for ln, line in enumerate(read_lines(path, what), start=1):
        tok = line.split()
        if not tok:
            continue
        if len(tok) < ncols:
            raise DatasetFormatError(path, f"expected {ncols} fields, found {len(tok)}", ln)
        if tok[0] in out:
            raise DatasetFormatError(path, f"image id {tok[0]} appears twice (first on line {out[tok[0]][1]})", ln)
        out[tok[0]] = (tok[1:], ln)
    if not out:
        raise DatasetFormatError(path, f"{what} is empty")
    return out


def cub_dataset(path: Path, split: str = "train", *, image_size: int = 128, size: Optional[int] = None,
                margin: float = 0.25, hash_split: bool = True) -> RealKeypointDataset:
    """CUB-200-2011 from its root folder (its own train/test split; ``hash_split`` is unused)."""
    check_split(split, ("train", "test", "all"), "CUB")
    images = _table(path / "images.txt", 2, "CUB images.txt")
    boxes = _table(path / "bounding_boxes.txt", 5, "CUB bounding_boxes.txt")
    split_path = path / "train_test_split.txt"
    splits = _table(split_path, 2, "CUB train_test_split.txt")
    locs_path = path / "parts" / "part_locs.txt"
    kp = {i: np.full((15, 2), np.nan) for i in images}
    vis = {i: np.zeros(15, bool) for i in images}
    seen: dict = {}
    for ln, line in enumerate(read_lines(locs_path, "CUB part_locs.txt"), start=1):
        tok = line.split()
        if not tok:
            continue
        if len(tok) != 5:
            raise DatasetFormatError(locs_path, f"expected '<image_id> <part_id> <x> <y> <visible>', found {line!r}", ln)
        iid = tok[0]
        if iid not in kp:
            raise DatasetFormatError(locs_path, f"image id {iid} is not in images.txt", ln)
        x, y, v = parse_floats(tok[2:], locs_path, ln, "part location")
        try:
            pid = int(tok[1]) - 1
        except ValueError:
            raise DatasetFormatError(locs_path, f"part id {tok[1]!r} is not an integer", ln) from None
        if not 0 <= pid < 15:
            raise DatasetFormatError(locs_path, f"part id {pid + 1} outside 1..15", ln)
        if v not in (0.0, 1.0):
            raise DatasetFormatError(locs_path, f"visible must be 0 or 1, got {tok[4]!r}", ln)
        if (iid, pid) in seen:
            raise DatasetFormatError(locs_path, f"image {iid} part {pid + 1} appears twice (first on line "
                                                f"{seen[iid, pid]})", ln)
        seen[iid, pid] = ln
        if v > 0:
            kp[iid][pid] = (x, y)
            vis[iid][pid] = True
    if not seen:
        raise DatasetFormatError(locs_path, "no part locations: the file is empty")
    records = []
    for iid, (rest, ln) in images.items():
        if iid not in splits:
            raise DatasetFormatError(split_path, f"image id {iid} (images.txt line {ln}) missing")
        flag, sln = splits[iid][0][0], splits[iid][1]
        if flag not in ("0", "1"):
            raise DatasetFormatError(split_path, f"expected 1 (train) or 0 (test), got {flag!r}", sln)
        if not any((iid, pid) in seen for pid in range(15)):
            raise DatasetFormatError(locs_path, f"image id {iid} (images.txt line {ln}) has no part lines")
        if split != "all" and (flag == "1") != (split == "train"):
            continue
        if iid not in boxes:
            raise DatasetFormatError(path / "bounding_boxes.txt", f"image id {iid} (images.txt line {ln}) missing")
        bln = boxes[iid][1]
        bx, by, bw, bh = parse_floats(boxes[iid][0][:4], path / "bounding_boxes.txt", bln, "box")
        box = check_box([bx, by, bx + bw, by + bh], path / "bounding_boxes.txt", "box (x, y, width, height)", bln)
        records.append(Record(image=path / "images" / rest[0], keypoints=kp[iid], visible=vis[iid].copy(),
                              labeled=vis[iid].copy(), box=box, extra={"image_id": iid}, key=rest[0]))
    meta = cub15_meta()
    assert meta.keypoint_names == CUB_PARTS
    return RealKeypointDataset(limit(records, size), meta, image_size=image_size, margin=margin, name="cub",
                               info={"root": str(path), "split": split,
                                     "split_rule": "CUB's own train_test_split.txt"}, source=split_path)


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON (write numbers, or null for a missing value)")


def _load_json(path: Path, what: str):
    if not path.is_file():
        raise DatasetFormatError(path, f"{what} not found")
    try:
        return json.loads(path.read_text(encoding="utf-8"), parse_constant=_reject_constant)
    except json.JSONDecodeError as e:
        raise DatasetFormatError(path, f"invalid JSON: {e.msg}", e.lineno) from None
    except ValueError as e:
        raise DatasetFormatError(path, str(e)) from None


def _name_parts(p: Path) -> list:
    return [t for t in re.split(r"[^a-z0-9]+", p.stem.lower()) if t]


def _coco_files(path: Path, split: str) -> tuple[list, bool]:
    """``(annotation files for split, official)``: the file itself, or the train/test files of a folder."""
    if path.is_file():
        return [path], False
    cands = sorted((path / "annotations").glob("*.json")) + sorted(path.glob("*.json"))
    named = [c for c in cands if "keypoint" in c.name.lower()]
    cands = named or cands
    train = [c for c in cands if any(t.startswith("train") and not t.startswith("trainval") for t in _name_parts(c))]
    test = [c for c in cands if any(t.startswith("test") for t in _name_parts(c))] or \
        [c for c in cands if any(t.startswith("val") for t in _name_parts(c))]
    if train and test:
        return {"train": train[:1], "test": test[:1], "all": [train[0], test[0]]}[split], True
    if len(cands) == 1:
        return cands, False
    where = path / "annotations"
    if not cands:
        raise DatasetFormatError(where, "no COCO keypoints JSON (looked for annotations/*.json and *.json)")
    raise DatasetFormatError(where, f"cannot tell the train and test files among {[c.name for c in cands]}; name "
                                    f"the one to read as 'coco:FILE' (and a test file with test=... / --test-dataset)")


def _categories(data: dict, jf: Path, category) -> list:
    """The keypoint categories to read (see the module docstring)."""
    cats = data["categories"]
    if not isinstance(cats, list):
        raise DatasetFormatError(jf, "'categories' must be a list")
    kp_cats = []
    for i, c in enumerate(cats):
        if not isinstance(c, dict) or "id" not in c:
            raise DatasetFormatError(jf, f"categories[{i}] must be an object with an 'id'")
        if c.get("keypoints"):
            if not isinstance(c["keypoints"], list) or not all(isinstance(n, str) for n in c["keypoints"]):
                raise DatasetFormatError(jf, f"categories[{i}].keypoints must be a list of names")
            kp_cats.append(c)
    if not kp_cats:
        raise DatasetFormatError(jf, "no category with 'keypoints'")
    label = lambda c: str(c.get("name", c["id"]))  # noqa: E731
    if category is not None:
        wanted = [n.strip() for n in category.split(",")] if isinstance(category, str) else [str(n) for n in category]
        unknown = [n for n in wanted if n not in {label(c) for c in kp_cats}]
        if unknown:
            raise DatasetFormatError(jf, f"category {unknown} not found; the keypoint categories are "
                                         f"{[label(c) for c in kp_cats]}")
        kp_cats = [c for c in kp_cats if label(c) in wanted]
    groups: dict = {}
    for c in kp_cats:
        groups.setdefault(tuple(c["keypoints"]), []).append(label(c))
    if len(groups) > 1:
        desc = "; ".join(f"{', '.join(v)} ({len(k)} keypoints)" for k, v in groups.items())
        raise DatasetFormatError(jf, f"the categories have different keypoints ({desc}); choose one kind with "
                                     f"category='NAME[,NAME...]' (--category)")
    return kp_cats


def _skeleton(cats: list, k: int, jf: Path) -> list:
    raw = []
    for c in cats:
        sk = c.get("skeleton") or []
        if not isinstance(sk, list) or not all(isinstance(e, (list, tuple)) and len(e) == 2 and
                                               all(isinstance(v, int) and not isinstance(v, bool) for v in e)
                                               for e in sk):
            raise DatasetFormatError(jf, f"category {c.get('name', c['id'])!r}: 'skeleton' must be a list of "
                                         f"[i, j] integer pairs")
        raw += [tuple(e) for e in sk]
    base = 0 if any(v == 0 for e in raw for v in e) else 1
    edges = []
    for a, b in raw:
        e = (a - base, b - base)
        if not (0 <= e[0] < k and 0 <= e[1] < k):
            raise DatasetFormatError(jf, f"skeleton edge [{a}, {b}] is outside the {k} keypoints "
                                         f"({base}-based indices)")
        if e not in edges:
            edges.append(e)
    return edges


def _flat_numbers(values, k: int, jf: Path, where: str, nested: bool) -> np.ndarray:
    """``[k, 3]`` from ``[x1, y1, v1, ...]`` (or ``[[x, y, v], ...]`` when ``nested``), every entry a finite number."""
    if nested:
        if not isinstance(values, list) or len(values) != k or \
                not all(isinstance(p, list) and len(p) == 3 for p in values):
            raise DatasetFormatError(jf, f"{where}: expected {k} [x, y, v] triples")
        flat = [v for p in values for v in p]
    else:
        if not isinstance(values, list) or len(values) != 3 * k:
            n = len(values) if isinstance(values, list) else type(values).__name__
            raise DatasetFormatError(jf, f"{where}: {n} keypoint values, expected {3 * k}")
        flat = values
    if not all(type(v) is int or type(v) is float for v in flat):
        j = next(j for j, v in enumerate(flat) if not (type(v) is int or type(v) is float))
        at = f"{where}[{j // 3}][{j % 3}]" if nested else f"{where}[{j}]"
        json_number(flat[j], jf, at, "a keypoint value")
    arr = np.asarray(flat, dtype=np.float64).reshape(k, 3)
    if not np.isfinite(arr).all():
        raise DatasetFormatError(jf, f"{where}: a keypoint value is not finite")
    return arr


def _coco_records(jf: Path, category, min_keypoints: int) -> tuple[list, KeypointMeta, Path]:
    data = _load_json(jf, "COCO annotation file")
    if not isinstance(data, dict):
        raise DatasetFormatError(jf, "must hold a JSON object with 'images', 'annotations', 'categories'")
    for key in ("images", "annotations", "categories"):
        if key not in data:
            raise DatasetFormatError(jf, f"missing top-level key {key!r}")
    cats = _categories(data, jf, category)
    names = [str(n) for n in cats[0]["keypoints"]]
    k = len(names)
    edges = _skeleton(cats, k, jf)
    if names == COCO_KEYPOINTS:
        base = coco17_meta()
        meta = KeypointMeta(name="coco", keypoint_names=names, edges=edges or base.edges, parts=base.parts,
                            flip_perm=base.flip_perm, normalizer=None)
    else:
        label = str(cats[0].get("name", "custom")) if len(cats) == 1 else f"{len(cats)}-categories"
        meta = KeypointMeta(name=f"coco-{label}", keypoint_names=names, edges=edges,
                            flip_perm=flip_perm_from_names(names), normalizer=None)
    animal_pose = isinstance(data["images"], dict)  # the original Animal-Pose release
    images = {}
    if animal_pose:
        for iid, fname in data["images"].items():
            if not isinstance(fname, str):
                raise DatasetFormatError(jf, f"images[{iid!r}] must be a file name")
            images[str(iid)] = fname
    else:
        if not isinstance(data["images"], list):
            raise DatasetFormatError(jf, "'images' must be a list")
        for i, im in enumerate(data["images"]):
            if not isinstance(im, dict) or "id" not in im or "file_name" not in im:
                raise DatasetFormatError(jf, f"images[{i}] lacks 'id' or 'file_name'")
            images[im["id"]] = im["file_name"]
    if not isinstance(data["annotations"], list):
        raise DatasetFormatError(jf, "'annotations' must be a list")
    cat_name = {c["id"]: str(c.get("name", c["id"])) for c in cats}
    records = []
    for i, a in enumerate(data["annotations"]):
        where = f"annotations[{i}]"
        if not isinstance(a, dict):
            raise DatasetFormatError(jf, f"{where} must be an object")
        if a.get("category_id") not in cat_name or a.get("iscrowd", 0):
            continue
        for key in ("keypoints", "bbox", "image_id"):
            if key not in a:
                raise DatasetFormatError(jf, f"{where} (id {a.get('id')}): missing {key!r}")
        iid = str(a["image_id"]) if animal_pose else a["image_id"]
        if iid not in images:
            raise DatasetFormatError(jf, f"{where}.image_id: {a['image_id']!r} is not in 'images'")
        kv = _flat_numbers(a["keypoints"], k, jf, f"{where}.keypoints", nested=animal_pose)
        bb = a["bbox"]
        if not isinstance(bb, list) or len(bb) != 4:
            raise DatasetFormatError(jf, f"{where}.bbox: a box needs 4 numbers, got {bb!r}")
        bx, by, bw, bh = (json_number(v, jf, f"{where}.bbox[{j}]", "a box value") for j, v in enumerate(bb))
        box = check_box([bx, by, bw, bh] if animal_pose else [bx, by, bx + bw, by + bh], jf, f"{where}.bbox")
        flags = kv[:, 2]
        allowed = (0.0, 1.0) if animal_pose else (0.0, 1.0, 2.0)
        bad = ~np.isin(flags, allowed)
        if bad.any():
            j = int(np.flatnonzero(bad)[0])
            raise DatasetFormatError(jf, f"{where}.keypoints: visibility of keypoint {j} ({names[j]!r}) is "
                                         f"{flags[j]:g}, expected one of {[int(v) for v in allowed]}")
        lab = flags > 0
        if lab.sum() < min_keypoints:
            continue
        visible = lab if animal_pose else flags == 2
        fname = images[iid]
        records.append(Record(image=Path(fname), keypoints=np.where(lab[:, None], kv[:, :2], np.nan), visible=visible,
                              labeled=lab, box=box, key=fname,
                              extra={"annotation_id": a.get("id"), "image_id": a["image_id"],
                                     "category": cat_name[a["category_id"]], "source": f"{jf}: {where}"}))
    if not records:
        raise DatasetFormatError(jf, f"no annotation with labelled keypoints for the categories "
                                     f"{sorted(cat_name.values())}")
    base_dir = _coco_image_dir(jf, records[0].key)
    for r in records:
        r.image = base_dir / r.key
    return records, meta, base_dir


def coco_dataset(path: Path, split: str = "train", *, image_size: int = 128, size: Optional[int] = None,
                 margin: float = 0.25, min_keypoints: int = 1, category: Union[str, Sequence[str], None] = None,
                 hash_split: bool = True) -> RealKeypointDataset:
    """COCO-style keypoints JSON (file or dataset folder; COCO, AP-10K, Animal-Pose); see the module docstring."""
    check_split(split, ("train", "test", "all"), "COCO")
    files, official = _coco_files(path, split)
    records, meta, base_dir = _coco_records(files[0], category, min_keypoints)
    for jf in files[1:]:
        more, meta2, _ = _coco_records(jf, category, min_keypoints)
        if meta2.keypoint_names != meta.keypoint_names:
            raise DatasetFormatError(jf, f"its keypoints differ from those of {files[0]}")
        records += more
    if official:
        rule = f"the dataset's own annotation files ({', '.join(f.name for f in files)})"
    else:
        records, rule = split_without_test_set(records, split, files[0], hash_split=hash_split)
    return RealKeypointDataset(limit(records, size), meta, image_size=image_size, margin=margin, name="coco",
                               info={"annotation": ", ".join(map(str, files)), "images": str(base_dir), "split": split,
                                     "split_rule": rule, "categories": sorted({r.extra["category"] for r in records})},
                               source=files[0])


def _coco_image_dir(jf: Path, sample: str) -> Path:
    d = jf.parent
    tail = jf.stem.split("_")[-1]
    cands = [d, d / "images", d / "data", d.parent / tail, d.parent / "images" / tail, d.parent / "images",
             d.parent / "data", d.parent]
    for c in cands:
        if (c / sample).is_file():
            return c
    raise DatasetFormatError(jf, f"image {sample!r} not found in any of {[str(c) for c in cands]}")


def folder_dataset(path: Path, split: str = "train", *, image_size: int = 128, size: Optional[int] = None,
                   margin: float = 0.25, hash_split: bool = True) -> RealKeypointDataset:
    """A folder of images with ``keypoints.json`` and ``labels.csv`` / ``labels.json``."""
    check_split(split, ("train", "test", "labeled", "all"), "folder")
    cfg_path = path / "keypoints.json"
    cfg = _load_json(cfg_path, "keypoint config (keypoints.json)")
    if not isinstance(cfg, dict):
        raise DatasetFormatError(cfg_path, "must hold a JSON object")
    coords = cfg.pop("coordinates", "pixel_center")
    if coords not in ("pixel_center", "pixel_corner"):
        raise DatasetFormatError(cfg_path, f"'coordinates' must be 'pixel_center' or 'pixel_corner', got {coords!r}")
    try:
        meta = KeypointMeta.from_config(cfg)
    except (ValueError, TypeError) as e:
        raise DatasetFormatError(cfg_path, str(e)) from None
    shift = 0.5 if coords == "pixel_corner" else 0.0
    labels = _folder_labels(path, meta, shift)
    k = meta.num_keypoints
    files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_EXTS and p.is_file())
    known = {p.relative_to(path).as_posix() for p in files}
    for name, (_, _, _, _, where) in labels.items():
        if name not in known:
            raise DatasetFormatError(where[0], f"labels refer to image {name!r}, which is not in {path}", where[1])
    records = []
    for p in files:
        rel = p.relative_to(path).as_posix()
        if rel in labels:
            kp, vis, lab, box, _ = labels[rel]
        else:
            kp, vis, lab, box = np.full((k, 2), np.nan), np.zeros(k, bool), np.zeros(k, bool), None
        records.append(Record(image=p, keypoints=kp, visible=vis, labeled=lab, box=box, key=rel,
                              extra={"file": rel, "test": rel.split("/")[0].lower() == "test"}))
    side = "train" if split == "labeled" else split
    if any(r.extra["test"] for r in records):
        rule = "the folder's own test/ subfolder"
        if side != "all":
            records = [r for r in records if r.extra["test"] == (side == "test")]
    else:
        records, rule = split_without_test_set(records, side, path, hash_split=hash_split)
    if split == "labeled":
        records = [r for r in records if r.labeled.any()]
    return RealKeypointDataset(limit(records, size), meta, image_size=image_size, margin=margin, name="folder",
                               info={"root": str(path), "split": split, "split_rule": rule,
                                     "labeled_images": len(labels)}, source=path)


def _folder_labels(path: Path, meta: KeypointMeta, shift: float) -> dict:
    """image -> (keypoints, visible, labeled, box, (file, line))."""
    csv_path, json_path = path / "labels.csv", path / "labels.json"
    if csv_path.is_file():
        out = _csv_labels(csv_path, meta, shift)
        src = csv_path
    elif json_path.is_file():
        out = _json_labels(json_path, meta, shift)
        src = json_path
    else:
        raise DatasetFormatError(csv_path, "no labels: expected labels.csv or labels.json in the folder")
    if not any(lab.any() for _, _, lab, _, _ in out.values()):
        raise DatasetFormatError(src, "holds no labelled keypoint (every image is unlabelled)")
    return out


def _csv_labels(csv_path: Path, meta: KeypointMeta, shift: float) -> dict:
    k = meta.num_keypoints
    out: dict = {}
    with open(csv_path, newline="", encoding="utf-8") as fh:
        reader = csv.reader(fh)
        try:
            header = [h.strip() for h in next(reader)]
        except StopIteration:
            raise DatasetFormatError(csv_path, "empty file, expected a header line", 1) from None
        col = {h: i for i, h in enumerate(header)}
        if "image" not in col:
            raise DatasetFormatError(csv_path, "header lacks the 'image' column", 1)
        missing = [f"{n}_{a}" for n in meta.keypoint_names for a in "xy" if f"{n}_{a}" not in col]
        if missing:
            raise DatasetFormatError(csv_path, f"header lacks columns {missing[:4]}{' ...' if len(missing) > 4 else ''}", 1)
        has_box = all(c in col for c in ("x0", "y0", "x1", "y1"))
        for ln, row in enumerate(reader, start=2):
            if not row or not any(c.strip() for c in row):
                continue
            if len(row) != len(header):
                raise DatasetFormatError(csv_path, f"{len(row)} fields, header has {len(header)}", ln)
            image = row[col["image"]].strip()
            if not image:
                raise DatasetFormatError(csv_path, "empty 'image' cell", ln)
            if image in out:
                raise DatasetFormatError(csv_path, f"image {image!r} is labelled twice (first on line "
                                                   f"{out[image][4][1]})", ln)
            kp = np.full((k, 2), np.nan)
            vis = np.zeros(k, bool)
            for j, n in enumerate(meta.keypoint_names):
                xs, ys = row[col[f"{n}_x"]].strip(), row[col[f"{n}_y"]].strip()
                if not xs and not ys:
                    continue
                kp[j] = parse_floats([xs, ys], csv_path, ln, f"keypoint {n!r}")
                vcol = col.get(f"{n}_visible")
                vs = row[vcol].strip() if vcol is not None else ""
                vis[j] = not vs or parse_floats([vs], csv_path, ln, f"{n}_visible")[0] > 0
            box = None
            if has_box and any(row[col[c]].strip() for c in ("x0", "y0", "x1", "y1")):
                vals = parse_floats([row[col[c]].strip() for c in ("x0", "y0", "x1", "y1")], csv_path, ln, "box")
                box = check_box(vals, csv_path, "box", ln) - shift
            lab = ~np.isnan(kp[:, 0])
            out[image] = (kp - shift, vis & lab, lab, box, (csv_path, ln))
    return out


def _json_labels(json_path: Path, meta: KeypointMeta, shift: float) -> dict:
    k = meta.num_keypoints
    data = _load_json(json_path, "labels.json")
    if not isinstance(data, dict):
        raise DatasetFormatError(json_path, "must map image names to {'keypoints': [...], 'bbox': [...]}")
    out: dict = {}
    for name, entry in data.items():
        at = f"[{json.dumps(name)}]"
        pts = entry.get("keypoints") if isinstance(entry, dict) else None
        if not isinstance(pts, list) or len(pts) != k:
            raise DatasetFormatError(json_path, f"{at}: 'keypoints' must be a list of {k} [x, y, v] or null")
        kp = np.full((k, 2), np.nan)
        vis = np.zeros(k, bool)
        for j, p in enumerate(pts):
            if p is None:
                continue
            if not isinstance(p, list) or len(p) not in (2, 3):
                raise DatasetFormatError(json_path, f"{at}.keypoints[{j}]: must be [x, y] or [x, y, v], got {p!r}")
            kp[j] = [json_number(v, json_path, f"{at}.keypoints[{j}][{c}]", "a coordinate") for c, v in enumerate(p[:2])]
            vis[j] = len(p) == 2 or json_number(p[2], json_path, f"{at}.keypoints[{j}][2]", "the visibility") > 0
        box = entry.get("bbox")
        if box is not None:
            if not isinstance(box, list) or len(box) != 4:
                raise DatasetFormatError(json_path, f"{at}.bbox: a box needs 4 numbers (x0, y0, x1, y1), got {box!r}")
            box = check_box([json_number(v, json_path, f"{at}.bbox[{c}]", "a box value") for c, v in enumerate(box)],
                            json_path, f"{at}.bbox") - shift
        lab = ~np.isnan(kp[:, 0])
        out[name] = (kp - shift, vis & lab, lab, box, (json_path, None))
    return out
