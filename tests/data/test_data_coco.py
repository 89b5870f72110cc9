"""COCO-style keypoint files: every category sharing the keypoints, a category choice, and the
AP-10K and Animal-Pose layouts (fixtures written here in each layout)."""

import json

import numpy as np
import pytest

from _data_fixtures import AP10K_NAMES, AP10K_SKELETON, ap10k_categories, coco_json, write_image
from kpfast.data import open_dataset
from kpfast.data.formats import DatasetFormatError, detect_format


def _ap10k(root):
    """AP-10K's layout: annotations/ap10k-{train,val,test}-split1.json, images under data/."""
    (root / "annotations").mkdir(parents=True)
    split_files = {"train": [f"{i:012d}.jpg" for i in range(1, 7)], "val": ["000000000007.jpg"],
                   "test": ["000000000008.jpg", "000000000009.jpg"]}
    first = 1
    for split, files in split_files.items():
        for f in files:
            write_image(root / "data" / f, seed=int(f[:-4]))
        data = coco_json(files, ap10k_categories(), first_id=first)
        (root / "annotations" / f"ap10k-{split}-split1.json").write_text(json.dumps(data))
        first += len(files)
    return split_files


def test_ap10k_layout_reads_every_species_sharing_the_skeleton(tmp_path):
    files = _ap10k(tmp_path)
    assert detect_format(tmp_path) == "coco"
    train, test = open_dataset(str(tmp_path), "train", image_size=16), open_dataset(str(tmp_path), "test", image_size=16)
    assert [r.key for r in train.records] == files["train"] and [r.key for r in test.records] == files["test"]
    assert all(r.image.parent == tmp_path / "data" for r in train.records + test.records)
    assert train.info["categories"] == ["antelope", "jaguar"]
    assert sorted({r.extra["category"] for r in train.records}) == ["antelope", "jaguar"]
    assert train.meta.keypoint_names == AP10K_NAMES and train.meta.edges == [(a - 1, b - 1) for a, b in AP10K_SKELETON]
    flip = train.meta.flip_perm
    assert flip[0] == 1 and flip[5] == 8 and flip[2] == 2  # left_eye <-> right_eye, shoulders swap, nose stays
    assert "ap10k-test-split1.json" in test.info["split_rule"]
    jaguars = open_dataset(str(tmp_path), "train", image_size=16, category="jaguar")
    assert {r.extra["category"] for r in jaguars.records} == {"jaguar"} and len(jaguars) == 3
    assert len(open_dataset(str(tmp_path), "train", image_size=16, category="jaguar, antelope")) == 6
    with pytest.raises(DatasetFormatError, match=r"ap10k-train-split1\.json: category \['zebra'\] not found; "
                                                 r"the keypoint categories are \['antelope', 'jaguar'\]"):
        open_dataset(str(tmp_path), "train", category="zebra")
    with pytest.raises(ValueError, match="applies to COCO-format data, not to 'folder' data"):
        open_dataset(f"folder:{tmp_path}", category="jaguar")


def test_categories_with_different_keypoints_need_a_choice(tmp_path):
    cats = ap10k_categories(("antelope",)) + [{"id": 9, "name": "bird", "keypoints": ["beak", "tail"],
                                               "skeleton": [[1, 2]]}]
    files = [f"{i}.jpg" for i in range(4)]
    for i, f in enumerate(files):
        write_image(tmp_path / f, seed=i)
    (tmp_path / "mixed.json").write_text(json.dumps(coco_json(files, cats)))
    with pytest.raises(DatasetFormatError, match=r"mixed\.json: the categories have different keypoints "
                                                 r"\(antelope \(17 keypoints\); bird \(2 keypoints\)\)"):
        open_dataset(f"coco:{tmp_path / 'mixed.json'}", "all")
    birds = open_dataset(f"coco:{tmp_path / 'mixed.json'}", "all", category="bird", image_size=16)
    assert birds.meta.keypoint_names == ["beak", "tail"] and birds.meta.edges == [(0, 1)] and len(birds) == 2


def test_animal_pose_mmpose_layout(tmp_path):
    """MMPose's Animal-Pose: annotations/animalpose_{train,val,trainval,test}.json, file names relative to the root."""
    (tmp_path / "annotations").mkdir()
    names = {"train": ["VOC2012/JPEGImages/2007_000063.jpg"], "trainval": ["VOC2012/JPEGImages/2007_000063.jpg",
             "VOC2012/JPEGImages/2007_000175.jpg"], "val": ["VOC2012/JPEGImages/2007_000175.jpg"],
             "test": ["animalpose_image_part2/dog/do1.jpeg"]}
    cats = ap10k_categories(("dog", "cat"))
    for split, files in names.items():
        for f in files:
            write_image(tmp_path / f, seed=len(f))
        (tmp_path / "annotations" / f"animalpose_{split}.json").write_text(json.dumps(coco_json(files, cats)))
    train, test = open_dataset(str(tmp_path), "train", image_size=16), open_dataset(str(tmp_path), "test", image_size=16)
    assert [r.key for r in train.records] == names["train"] and [r.key for r in test.records] == names["test"]
    assert test.records[0].image == tmp_path / names["test"][0]


def test_animal_pose_original_keypoints_json(tmp_path):
    """The original release: images as {"id": file}, [[x, y, v], ...] keypoints, [x0, y0, x1, y1] boxes,
    0-based skeleton; images under images/."""
    names = [f"n{i}" for i in range(20)]
    files = {str(i): f"2007_{i:06d}.jpg" for i in range(1, 21)}
    for iid, f in files.items():
        write_image(tmp_path / "images" / f, 40, 30, seed=int(iid))
    rng = np.random.default_rng(0)
    anns = []
    for iid in files:
        pts = [[round(float(rng.uniform(5, 35)), 1), round(float(rng.uniform(5, 25)), 1), int(j % 4 != 0)]
               for j in range(20)]
        anns.append({"image_id": int(iid), "bbox": [3, 2, 37, 28], "keypoints": pts, "num_keypoints": 15,
                     "category_id": 1 + int(iid) % 2})
    cats = [{"supercategory": "animal", "id": c, "name": n, "keypoints": names, "skeleton": [[0, 1], [1, 19]]}
            for c, n in ((1, "dog"), (2, "cat"))]
    (tmp_path / "keypoints.json").write_text(json.dumps({"images": files, "annotations": anns, "categories": cats}))
    assert detect_format(tmp_path) == "coco"
    every = open_dataset(str(tmp_path), "all", image_size=16)
    assert len(every) == 20 and every.meta.edges == [(0, 1), (1, 19)]
    r = every.records[0]
    pts = np.array(anns[0]["keypoints"], dtype=float)
    assert r.image == tmp_path / "images" / files["1"] and np.allclose(r.box, [3, 2, 37, 28])
    assert np.array_equal(r.labeled, pts[:, 2] == 1) and np.array_equal(r.visible, r.labeled)
    assert np.allclose(r.keypoints[r.labeled], pts[pts[:, 2] == 1, :2])
    train, test = open_dataset(str(tmp_path), "train"), open_dataset(str(tmp_path), "test")
    assert len(train) + len(test) == 20 and len(test) > 0 and "SHA-256" in test.info["split_rule"]

