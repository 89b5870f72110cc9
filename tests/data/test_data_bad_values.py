"""Bad values in annotation files fail when the dataset is opened, with the file and line (or JSON path).

Each case writes a valid fixture in the format's own layout, breaks one value, and opens it.
"""

import json
import re

import pytest

from _data_fixtures import coco_json, ap10k_categories, write_folder, write_image, write_pts_folder, write_wflw_list
from kpfast.data import open_dataset
from kpfast.data.formats import DatasetFormatError


def _edit(path, old, new, count=1):
    text = path.read_text()
    assert old in text, f"{old!r} not in {path}"
    path.write_text(text.replace(old, new, count))


def _wflw(root, value_at=None, line=2):
    ann = write_wflw_list(root, 3)
    if value_at is not None:
        lines = ann.read_text().splitlines()
        tok = lines[line - 1].split()
        tok[value_at[0]] = value_at[1]
        lines[line - 1] = " ".join(tok)
        ann.write_text("\n".join(lines) + "\n")
    return f"wflw:{ann}", ann


def _cub(root):
    (root / "parts").mkdir(parents=True)
    for i in (1, 2):
        write_image(root / f"images/001.Albatross/{i}.jpg", seed=i)
    (root / "images.txt").write_text("1 001.Albatross/1.jpg\n2 001.Albatross/2.jpg\n")
    (root / "bounding_boxes.txt").write_text("1 2.0 3.0 20.0 20.0\n2 1.0 1.0 25.0 22.0\n")
    (root / "train_test_split.txt").write_text("1 1\n2 1\n")
    (root / "parts/part_locs.txt").write_text(
        "".join(f"{i} {p} {5.0 + p} {6.0 + p} {int(p % 4 != 0)}\n" for i in (1, 2) for p in range(1, 16)))
    return f"cub:{root}"


def _coco(root, **kw):
    files = [f"{i}.jpg" for i in range(3)]
    for i, f in enumerate(files):
        write_image(root / "images" / f, seed=i)
    data = coco_json(files, ap10k_categories(("antelope",)))
    path = root / "ap10k-train-split1.json"
    path.write_text(json.dumps(data, indent=1))
    return f"coco:{path}", path, data


def _folder(root):
    write_folder(root, ["a.png", "b.png", "test/c.png"], {"a.png": [(8, 20), (24, 20), (16, 10)],
                                                          "test/c.png": [(8, 20), None, (16, 10)]})
    return f"folder:{root}", root / "labels.csv"


def _folder_json(root, entry):
    spec, csv_path = _folder(root)
    csv_path.unlink()
    good = {"a.png": {"keypoints": [[8, 20, 1], [24, 20, 0], None], "bbox": [2, 2, 30, 30]},
            "test/c.png": {"keypoints": [[8, 20], None, [16, 10]]}}
    (root / "labels.json").write_text(json.dumps({**good, **entry}))
    return spec


def case_wflw_nan(root):
    spec, _ = _wflw(root, (7, "nan"))
    return spec, r"list_98pt_rect_attr_train\.txt, line 2: coordinates: 'nan' is not a finite number"


def case_wflw_inf_box(root):
    spec, _ = _wflw(root, (198, "inf"), line=3)
    return spec, r"list_98pt_rect_attr_train\.txt, line 3: coordinates: 'inf' is not a finite number"


def case_wflw_empty(root):
    spec, ann = _wflw(root)
    ann.write_text("\n")
    return spec, r"list_98pt_rect_attr_train\.txt: no faces: the annotation list is empty"


def case_pts_nan(root):
    write_pts_folder(root, 2)
    _edit(root / "face_1.pts", "\n{\n", "\n{\nnan 3.0\n")
    lines = (root / "face_1.pts").read_text().splitlines()
    del lines[4]  # keep 68 points
    (root / "face_1.pts").write_text("\n".join(lines) + "\n")
    return f"300w:{root}", r"face_1\.pts, line 4: point: 'nan' is not a finite number"


def case_cub_empty_parts(root):
    spec = _cub(root)
    (root / "parts/part_locs.txt").write_text("")
    return spec, r"part_locs\.txt: no part locations: the file is empty"


def case_cub_nan_part(root):
    spec = _cub(root)
    _edit(root / "parts/part_locs.txt", "2 3 8.0 9.0 1", "2 3 nan 9.0 1")
    return spec, r"part_locs\.txt, line 18: part location: 'nan' is not a finite number"


def case_cub_image_without_parts(root):
    spec = _cub(root)
    text = (root / "parts/part_locs.txt").read_text().splitlines()
    (root / "parts/part_locs.txt").write_text("\n".join(t for t in text if not t.startswith("2 ")) + "\n")
    return spec, r"part_locs\.txt: image id 2 \(images\.txt line 2\) has no part lines"


def case_cub_negative_box(root):
    spec = _cub(root)
    _edit(root / "bounding_boxes.txt", "2 1.0 1.0 25.0 22.0", "2 1.0 1.0 -25.0 22.0")
    return spec, r"bounding_boxes\.txt, line 2: box \(x, y, width, height\): box .* has x1 < x0"


def case_coco_string_value(root):
    spec, path, data = _coco(root)
    data["annotations"][1]["keypoints"][4] = "abc"
    path.write_text(json.dumps(data))
    return spec, r"ap10k-train-split1\.json: annotations\[1\]\.keypoints\[4\]: a keypoint value must be a number, got 'abc'"


def case_coco_null_value(root):
    spec, path, data = _coco(root)
    data["annotations"][0]["keypoints"][0] = None
    path.write_text(json.dumps(data))
    return spec, r"annotations\[0\]\.keypoints\[0\]: a keypoint value must be a number, got None"


def case_coco_nan_literal(root):
    spec, path, data = _coco(root)
    data["annotations"][0]["keypoints"][0] = 1234.5
    path.write_text(json.dumps(data).replace("1234.5", "NaN"))
    return spec, r"ap10k-train-split1\.json: NaN is not valid JSON"


def case_coco_bad_visibility(root):
    spec, path, data = _coco(root)
    data["annotations"][2]["keypoints"][5] = 3
    path.write_text(json.dumps(data))
    return spec, r"annotations\[2\]\.keypoints: visibility of keypoint 1 \('right_eye'\) is 3, expected one of \[0, 1, 2\]"


def case_coco_three_number_box(root):
    spec, path, data = _coco(root)
    data["annotations"][0]["bbox"] = [1, 2, 3]
    path.write_text(json.dumps(data))
    return spec, r"annotations\[0\]\.bbox: a box needs 4 numbers, got \[1, 2, 3\]"


def case_coco_no_annotations(root):
    spec, path, data = _coco(root)
    data["annotations"] = []
    path.write_text(json.dumps(data))
    return spec, r"ap10k-train-split1\.json: no annotation with labelled keypoints for the categories \['antelope'\]"


def case_folder_visibility_yes(root):
    spec, csv_path = _folder(root)
    csv_path.write_text("image,left_paw_x,left_paw_y,right_paw_x,right_paw_y,right_paw_visible,nose_x,nose_y\n"
                        "a.png,8,20,24,20,yes,16,10\n")
    return spec, r"labels\.csv, line 2: right_paw_visible: 'yes' is not a number"


def case_folder_csv_nan(root):
    spec, csv_path = _folder(root)
    _edit(csv_path, "a.png,8,20", "a.png,nan,20")
    return spec, r"labels\.csv, line 2: keypoint 'left_paw': 'nan' is not a finite number"


def case_folder_csv_twice(root):
    spec, csv_path = _folder(root)
    csv_path.write_text(csv_path.read_text() + "a.png,1,2,3,4,5,6\n")
    return spec, r"labels\.csv, line 4: image 'a\.png' is labelled twice \(first on line 2\)"


def case_folder_csv_only_header(root):
    spec, csv_path = _folder(root)
    csv_path.write_text(csv_path.read_text().splitlines()[0] + "\n")
    return spec, r"labels\.csv: holds no labelled keypoint"


def case_folder_csv_inverted_box(root):
    spec, csv_path = _folder(root)
    csv_path.write_text("image,left_paw_x,left_paw_y,right_paw_x,right_paw_y,nose_x,nose_y,x0,y0,x1,y1\n"
                        "a.png,8,20,24,20,16,10,30,2,2,30\n")
    return spec, r"labels\.csv, line 2: box: box \[30\.0, 2\.0, 2\.0, 30\.0\] has x1 < x0"


def case_folder_json_string(root):
    spec = _folder_json(root, {"b.png": {"keypoints": [["abc", 3], None, None]}})
    return spec, r"labels\.json: \[\"b\.png\"\]\.keypoints\[0\]\[0\]: a coordinate must be a number, got 'abc'"


def case_folder_json_three_number_box(root):
    spec = _folder_json(root, {"b.png": {"keypoints": [[1, 3], None, None], "bbox": [1, 2, 3]}})
    return spec, r"labels\.json: \[\"b\.png\"\]\.bbox: a box needs 4 numbers \(x0, y0, x1, y1\), got \[1, 2, 3\]"


def case_folder_json_bool_visibility(root):
    spec = _folder_json(root, {"b.png": {"keypoints": [[1, 3, "yes"], None, None]}})
    return spec, r"labels\.json: \[\"b\.png\"\]\.keypoints\[0\]\[2\]: the visibility must be a number, got 'yes'"


CASES = {name[5:]: fn for name, fn in globals().items() if name.startswith("case_")}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_values_fail_at_open_naming_the_file(tmp_path, case):
    spec, message = CASES[case](tmp_path / case)
    with pytest.raises(DatasetFormatError, match=message) as info:
        open_dataset(spec, "all", image_size=16)
    assert str(tmp_path / case) in str(info.value), "the message names the file"


def test_a_labelled_keypoint_cannot_be_non_finite_whatever_the_reader():
    import numpy as np

    from kpfast.data.formats.common import Record, RealKeypointDataset
    from kpfast.data.skeletons import face68_meta

    kp = np.zeros((68, 2))
    kp[3] = np.nan
    r = Record(image="x.png", keypoints=kp, visible=np.ones(68, bool), labeled=np.ones(68, bool),
               extra={"source": "made.txt:7"})
    with pytest.raises(DatasetFormatError, match=re.escape("made.txt:7: a labelled keypoint is not finite")):
        RealKeypointDataset([r], face68_meta())
