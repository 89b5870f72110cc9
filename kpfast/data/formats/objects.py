"""Object formats: CUB-200-2011 birds, COCO keypoints JSON, and a plain folder for users' own labels.

CUB-200-2011 (root folder)::

    images.txt              <image_id> <relative path under images/>
    bounding_boxes.txt      <image_id> <x> <y> <width> <height>
    train_test_split.txt    <image_id> <1 = train, 0 = test>
    parts/part_locs.txt     <image_id> <part_id 1..15> <x> <y> <visible 0/1>

CUB only places visible parts, so ``labeled = visible``.

COCO keypoints (a ``person_keypoints_*.json`` file, or a folder whose
``annotations/`` holds ``*keypoints*train*.json`` / ``*keypoints*val*.json``): one
sample per non-crowd annotation with at least one labeled keypoint;
``keypoints = [x1, y1, v1, ...]`` with ``v`` 0 = not labeled, 1 = labeled but not
visible, 2 = visible; ``bbox = [x, y, w, h]``; names and skeleton (1-based) from the
file's category. Coordinates are used as given (pixel positions). Images are looked
up next to the JSON, in ``images/``, and in ``../<split>`` (``val2017``) / ``../images``.

Folder (users' own few-shot labels)::

    my_data/
      keypoints.json     {"name", "keypoint_names", "edges", "parts", "flip_pairs" or "flip_perm",
                          "normalizer", optional "coordinates": "pixel_center" (default) | "pixel_corner"}
      labels.csv         image,<name>_x,<name>_y[,<name>_visible]...[,x0,y0,x1,y1]   (or labels.json)
      *.jpg|*.png ...    every image in the folder tree is a sample, labeled or not
      test/ (optional)   images under test/ form the 'test' split

``labels.json`` is ``{"<image>": {"keypoints": [[x, y, v] or null, ...], "bbox": [x0, y0, x1, y1]}}``.
Empty CSV cells / ``null`` mean "not labeled"; ``_visible`` defaults to 1. Without a
box the whole image (padded to a square) is used. Splits: ``train`` (all images
outside ``test/``), ``test``, ``labeled`` (only labeled images outside ``test/``),
``all``.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Optional

import numpy as np

from ..meta import KeypointMeta, flip_perm_from_names
from ..skeletons import CUB_PARTS, COCO_KEYPOINTS, coco17_meta, cub15_meta
from .common import IMAGE_EXTS, DatasetFormatError, Record, RealKeypointDataset, limit, parse_floats, read_lines


def _table(path: Path, ncols: int, what: str) -> dict:
    out = {}
    for ln, line in enumerate(read_lines(path, what), start=1):
        tok = line.split()
        if not tok:
            continue
        if len(tok) < ncols:
            raise DatasetFormatError(path, f"expected {ncols} fields, found {len(tok)}", ln)
        out[tok[0]] = (tok[1:], ln)
    return out


def cub_dataset(path: Path, split: str = "train", *, image_size: int = 128, size: Optional[int] = None,
                margin: float = 0.25) -> RealKeypointDataset:
    """CUB-200-2011 from its root folder."""
    if split not in ("train", "test", "all"):
        raise ValueError(f"CUB splits are 'train', 'test' and 'all', got {split!r}")
    images = _table(path / "images.txt", 2, "CUB images.txt")
    boxes = _table(path / "bounding_boxes.txt", 5, "CUB bounding_boxes.txt")
    splits = _table(path / "train_test_split.txt", 2, "CUB train_test_split.txt")
    locs_path = path / "parts" / "part_locs.txt"
    kp = {i: np.full((15, 2), np.nan) for i in images}
    vis = {i: np.zeros(15, bool) for i in images}
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
        if v > 0:
            kp[iid][pid] = (x, y)
            vis[iid][pid] = True
    records = []
    for iid, (rest, ln) in images.items():
        if iid not in splits:
            raise DatasetFormatError(path / "train_test_split.txt", f"image id {iid} (images.txt line {ln}) missing")
        is_train = splits[iid][0][0] == "1"
        if split != "all" and is_train != (split == "train"):
            continue
        if iid not in boxes:
            raise DatasetFormatError(path / "bounding_boxes.txt", f"image id {iid} (images.txt line {ln}) missing")
        bx, by, bw, bh = parse_floats(boxes[iid][0][:4], path / "bounding_boxes.txt", boxes[iid][1], "box")
        records.append(Record(image=path / "images" / rest[0], keypoints=kp[iid], visible=vis[iid].copy(),
                              labeled=vis[iid].copy(), box=np.array([bx, by, bx + bw, by + bh]),
                              extra={"image_id": iid}))
    meta = cub15_meta()
    assert meta.keypoint_names == CUB_PARTS
    return RealKeypointDataset(limit(records, size), meta, image_size=image_size, margin=margin, name="cub",
                               info={"root": str(path), "split": split})


def _load_json(path: Path, what: str):
    if not path.is_file():
        raise DatasetFormatError(path, f"{what} not found")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DatasetFormatError(path, f"invalid JSON: {e.msg}", e.lineno) from None


def _coco_file(path: Path, split: str) -> Path:
    if path.is_file():
        return path
    cands = sorted((path / "annotations").glob("*.json")) + sorted(path.glob("*.json"))
    key = {"train": ("train",), "test": ("val", "test"), "val": ("val",)}.get(split, (split,))
    for c in cands:
        if "keypoints" in c.name and any(k in c.stem for k in key):
            return c
    raise DatasetFormatError(path / "annotations", f"no COCO keypoints JSON for split {split!r} "
                                                   f"(looked for *keypoints*{key[0]}*.json)")


def coco_dataset(path: Path, split: str = "train", *, image_size: int = 128, size: Optional[int] = None,
                 margin: float = 0.25, min_keypoints: int = 1, category: Optional[str] = None) -> RealKeypointDataset:
    """COCO keypoints JSON (file or dataset folder)."""
    jf = _coco_file(path, split)
    data = _load_json(jf, "COCO annotation file")
    for key in ("images", "annotations", "categories"):
        if key not in data:
            raise DatasetFormatError(jf, f"missing top-level key {key!r}")
    cats = [c for c in data["categories"] if c.get("keypoints")]
    if category is not None:
        cats = [c for c in cats if c.get("name") == category]
    if not cats:
        raise DatasetFormatError(jf, "no category with 'keypoints'" + (f" named {category!r}" if category else ""))
    cat = cats[0]
    names = [str(n) for n in cat["keypoints"]]
    k = len(names)
    edges = [(int(a) - 1, int(b) - 1) for a, b in cat.get("skeleton", [])]
    if names == COCO_KEYPOINTS:
        base = coco17_meta()
        meta = KeypointMeta(name="coco", keypoint_names=names, edges=edges or base.edges, parts=base.parts,
                            flip_perm=base.flip_perm, normalizer=None)
    else:
        meta = KeypointMeta(name=f"coco-{cat.get('name', 'custom')}", keypoint_names=names, edges=edges,
                            flip_perm=flip_perm_from_names(names), normalizer=None)
    images = {}
    for i, im in enumerate(data["images"]):
        if "id" not in im or "file_name" not in im:
            raise DatasetFormatError(jf, f"images[{i}] lacks 'id' or 'file_name'")
        images[im["id"]] = im["file_name"]
    base_dir = _coco_image_dir(jf, [images[a["image_id"]] for a in data["annotations"][:1] if a.get("image_id") in images])
    records = []
    for i, a in enumerate(data["annotations"]):
        if a.get("category_id") != cat["id"] or a.get("iscrowd", 0):
            continue
        try:
            kv = np.asarray(a["keypoints"], dtype=np.float64)
            bx, by, bw, bh = (float(v) for v in a["bbox"])
            fname = images[a["image_id"]]
        except KeyError as e:
            raise DatasetFormatError(jf, f"annotations[{i}] (id {a.get('id')}): missing or unknown {e}") from None
        except (TypeError, ValueError):
            raise DatasetFormatError(jf, f"annotations[{i}] (id {a.get('id')}): malformed keypoints or bbox") from None
        if kv.shape != (3 * k,):
            raise DatasetFormatError(jf, f"annotations[{i}] (id {a.get('id')}): {kv.size} keypoint values, expected {3 * k}")
        kv = kv.reshape(k, 3)
        lab = kv[:, 2] > 0
        if lab.sum() < min_keypoints:
            continue
        records.append(Record(image=base_dir / fname, keypoints=np.where(lab[:, None], kv[:, :2], np.nan),
                              visible=kv[:, 2] == 2, labeled=lab, box=np.array([bx, by, bx + bw, by + bh]),
                              extra={"annotation_id": a.get("id"), "image_id": a["image_id"]}))
    return RealKeypointDataset(limit(records, size), meta, image_size=image_size, margin=margin, name="coco",
                               info={"annotation": str(jf), "images": str(base_dir)})


def _coco_image_dir(jf: Path, sample_files: list) -> Path:
    d = jf.parent
    tail = jf.stem.split("_")[-1]
    cands = [d, d / "images", d.parent / tail, d.parent / "images" / tail, d.parent / "images", d.parent]
    if not sample_files:
        return d
    for c in cands:
        if (c / sample_files[0]).is_file():
            return c
    raise DatasetFormatError(jf, f"image {sample_files[0]!r} not found in any of {[str(c) for c in cands]}")


def folder_dataset(path: Path, split: str = "train", *, image_size: int = 128, size: Optional[int] = None,
                   margin: float = 0.25) -> RealKeypointDataset:
    """A folder of images with ``keypoints.json`` and ``labels.csv`` / ``labels.json``."""
    if split not in ("train", "test", "labeled", "all"):
        raise ValueError(f"folder splits are 'train', 'test', 'labeled' and 'all', got {split!r}")
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
        is_test = rel.split("/")[0].lower() == "test"
        if split in ("train", "labeled") and is_test or split == "test" and not is_test:
            continue
        if rel in labels:
            kp, vis, lab, box, _ = labels[rel]
        else:
            kp, vis, lab, box = np.full((k, 2), np.nan), np.zeros(k, bool), np.zeros(k, bool), None
        if split == "labeled" and not lab.any():
            continue
        records.append(Record(image=p, keypoints=kp, visible=vis, labeled=lab, box=box, extra={"file": rel}))
    if not records:
        raise DatasetFormatError(path, f"no images in the {split!r} split")
    return RealKeypointDataset(limit(records, size), meta, image_size=image_size, margin=margin, name="folder",
                               info={"root": str(path), "split": split, "labeled_images": len(labels)})


def _folder_labels(path: Path, meta: KeypointMeta, shift: float) -> dict:
    """image -> (keypoints, visible, labeled, box, (file, line))."""
    k = meta.num_keypoints
    csv_path, json_path = path / "labels.csv", path / "labels.json"
    out = {}
    if csv_path.is_file():
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
                kp = np.full((k, 2), np.nan)
                vis = np.zeros(k, bool)
                for j, n in enumerate(meta.keypoint_names):
                    xs, ys = row[col[f"{n}_x"]].strip(), row[col[f"{n}_y"]].strip()
                    if not xs and not ys:
                        continue
                    kp[j] = parse_floats([xs, ys], csv_path, ln, f"keypoint {n!r}")
                    vcol = col.get(f"{n}_visible")
                    vis[j] = True if vcol is None or not row[vcol].strip() else float(row[vcol]) > 0
                box = None
                if has_box and row[col["x0"]].strip():
                    box = np.asarray(parse_floats([row[col[c]] for c in ("x0", "y0", "x1", "y1")], csv_path, ln, "box")) - shift
                lab = ~np.isnan(kp[:, 0])
                out[row[col["image"]].strip()] = (kp - shift, vis & lab, lab, box, (csv_path, ln))
    elif json_path.is_file():
        data = _load_json(json_path, "labels.json")
        if not isinstance(data, dict):
            raise DatasetFormatError(json_path, "must map image names to {'keypoints': [...], 'bbox': [...]}")
        for name, entry in data.items():
            pts = entry.get("keypoints") if isinstance(entry, dict) else None
            if not isinstance(pts, list) or len(pts) != k:
                raise DatasetFormatError(json_path, f"entry {name!r}: 'keypoints' must be a list of {k} [x, y, v] or null")
            kp = np.full((k, 2), np.nan)
            vis = np.zeros(k, bool)
            for j, p in enumerate(pts):
                if p is None:
                    continue
                if not isinstance(p, (list, tuple)) or len(p) not in (2, 3):
                    raise DatasetFormatError(json_path, f"entry {name!r}: keypoint {j} must be [x, y] or [x, y, v]")
                kp[j] = (float(p[0]), float(p[1]))
                vis[j] = len(p) == 2 or float(p[2]) > 0
            box = entry.get("bbox")
            box = None if box is None else np.asarray(box, dtype=np.float64) - shift
            lab = ~np.isnan(kp[:, 0])
            out[name] = (kp - shift, vis & lab, lab, box, (json_path, None))
    else:
        raise DatasetFormatError(csv_path, "no labels: expected labels.csv or labels.json in the folder")
    return out
