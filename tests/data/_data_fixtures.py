"""Small datasets written by the tests in each format's own layout (no third-party data)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

PAWS = {"name": "paws", "keypoint_names": ["left_paw", "right_paw", "nose"],
        "edges": [["left_paw", "nose"], ["right_paw", "nose"]], "flip_pairs": [["left_paw", "right_paw"]]}

# AP-10K's 17 keypoints (the names and skeleton below are written for these tests)
AP10K_NAMES = ["left_eye", "right_eye", "nose", "neck", "root_of_tail", "left_shoulder", "left_elbow",
               "left_front_paw", "right_shoulder", "right_elbow", "right_front_paw", "left_hip", "left_knee",
               "left_back_paw", "right_hip", "right_knee", "right_back_paw"]
AP10K_SKELETON = [[1, 2], [1, 3], [2, 3], [3, 4], [4, 5], [4, 6], [6, 7], [7, 8], [4, 9], [9, 10], [10, 11],
                  [5, 12], [12, 13], [13, 14], [5, 15], [15, 16], [16, 17]]


def write_image(path, w=32, h=32, seed=0, colour=None):
    """A noisy image (around ``colour`` when given, RGB 0-255) saved at ``path`` (format from the suffix)."""
    rng = np.random.default_rng(seed)
    base = np.array(colour if colour is not None else (30, 30, 30), dtype=np.float64)
    a = base + rng.uniform(-25, 25, size=(h, w, 3))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)).save(path)


def write_folder(root, images, labels, *, meta=PAWS, size=(32, 32)):
    """A users' folder: ``images`` relative names, ``labels`` {name: [(x, y) or None] * 3}; returns root."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    (root / "keypoints.json").write_text(json.dumps(meta))
    for i, name in enumerate(images):
        write_image(root / name, *size, seed=i)
    names = meta["keypoint_names"]
    rows = ["image," + ",".join(f"{n}_x,{n}_y" for n in names)]
    for name, pts in labels.items():
        rows.append(name + "," + ",".join("," if p is None else f"{p[0]},{p[1]}" for p in pts))
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    return root


def wflw_line(name, seed):
    rng = np.random.default_rng(seed)
    kp = np.column_stack([rng.uniform(8, 24, 98), rng.uniform(8, 24, 98)])
    box = [kp[:, 0].min(), kp[:, 1].min(), kp[:, 0].max(), kp[:, 1].max()]
    return " ".join(f"{v:.3f}" for v in kp.reshape(-1)) + " " + " ".join(f"{v:.3f}" for v in box) + " 0 0 0 0 0 0 " + name


def write_wflw_list(root, n, *, start=0):
    """One WFLW list file (``list_98pt_rect_attr_train.txt``) with ``n`` faces and its images; returns the file."""
    root = Path(root)
    ann = root / "WFLW_annotations" / "list_98pt_rect_attr_train_test" / "list_98pt_rect_attr_train.txt"
    ann.parent.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(start, start + n):
        name = f"0--Parade/img_{i}.jpg"
        write_image(root / "WFLW_images" / name, seed=i)
        lines.append(wflw_line(name, i))
    ann.write_text("\n".join(lines) + "\n")
    return ann


def write_pts(path, pts):
    Path(path).write_text("version: 1\nn_points:  %d\n{\n%s\n}\n" % (len(pts), "\n".join(f"{x} {y}" for x, y in pts)))


def write_pts_folder(root, n):
    """A flat folder of ``n`` images with 68-point ``.pts`` beside them (no test folder)."""
    root = Path(root)
    for i in range(n):
        write_image(root / f"face_{i}.png", seed=i)
        rng = np.random.default_rng(i)
        write_pts(root / f"face_{i}.pts", np.column_stack([rng.uniform(8, 24, 68), rng.uniform(8, 24, 68)]))
    return root


def coco_keypoints(k, seed, flags=None):
    rng = np.random.default_rng(seed)
    out = []
    for j in range(k):
        out += [round(float(rng.uniform(6, 26)), 2), round(float(rng.uniform(6, 26)), 2),
                2 if flags is None else flags[j]]
    return out


def coco_json(image_files, categories, *, per_image=1, first_id=1):
    """A COCO keypoints dict: ``per_image`` annotations on each image, categories in turn."""
    images, anns = [], []
    for i, f in enumerate(image_files):
        images.append({"id": first_id + i, "file_name": f, "width": 32, "height": 32})
        for a in range(per_image):
            cat = categories[(i + a) % len(categories)]
            anns.append({"id": len(anns) + 1, "image_id": first_id + i, "category_id": cat["id"], "iscrowd": 0,
                         "keypoints": coco_keypoints(len(cat["keypoints"]), 100 * i + a), "bbox": [4, 4, 24, 24]})
    return {"images": images, "annotations": anns, "categories": categories}


def ap10k_categories(names=("antelope", "jaguar")):
    return [{"id": i + 1, "name": n, "supercategory": "animal", "keypoints": AP10K_NAMES, "skeleton": AP10K_SKELETON}
            for i, n in enumerate(names)]
