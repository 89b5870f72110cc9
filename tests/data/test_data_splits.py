"""Held-out test splits: a source's own test set, an explicit one, or the hashed split of one source;
never a training image in the test split."""

import hashlib
import json

import pytest

import kpfast
from _data_fixtures import (ap10k_categories, coco_json, write_folder, write_image, write_pts_folder,
                            write_wflw_list)
from kpfast.data import open_dataset
from kpfast.data.formats import TEST_FRACTION, DatasetFormatError, hashed_split
from kpfast.train import TrainConfig


def test_hashed_split_is_the_documented_rule():
    for key in ["a.png", "test/b.jpg", "0--Parade/img_3.jpg", "ünïcode/ç.png"]:
        h = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big")
        assert hashed_split(key) == ("test" if h < TEST_FRACTION * 2**64 else "train")
    share = sum(hashed_split(f"img_{i}.png") == "test" for i in range(2000)) / 2000
    assert abs(share - TEST_FRACTION) < 0.03


def _one_source(kind, root, n=30):
    """A source with no test set of its own, in each format; returns its spec."""
    if kind == "folder":
        names = [f"img_{i}.png" for i in range(n)]
        write_folder(root, names, {nm: [(8, 20), (24, 20), (16, 10)] for nm in names})
        return f"folder:{root}"
    if kind == "wflw-file":
        return f"wflw:{write_wflw_list(root, n)}"
    if kind == "300w-flat":
        write_pts_folder(root, n)
        return f"300w:{root}"
    files = [f"{i:06d}.jpg" for i in range(n)]
    for i, f in enumerate(files):
        write_image(root / "images" / f, seed=i)
    (root / "keypoints.json").write_text(json.dumps(coco_json(files, ap10k_categories(), per_image=2)))
    return f"coco:{root / 'keypoints.json'}"


@pytest.mark.parametrize("kind", ["folder", "wflw-file", "300w-flat", "coco-file"])
def test_one_source_is_split_by_image_path_never_overlapping(tmp_path, kind):
    spec = _one_source(kind, tmp_path / kind)
    train, test, every = (open_dataset(spec, s, image_size=16) for s in ("train", "test", "all"))
    keys = lambda ds: [r.key for r in ds.records]  # noqa: E731
    assert not set(keys(train)) & set(keys(test)), "a training image is in the test split"
    assert sorted(keys(train) + keys(test)) == sorted(keys(every))
    assert all(hashed_split(k) == "test" for k in keys(test)) and all(hashed_split(k) == "train" for k in keys(train))
    assert 0 < len(set(keys(test))) < len(set(keys(every)))
    assert "SHA-256" in train.info["split_rule"] and train.info["split_rule"] == test.info["split_rule"]


def test_hashed_split_is_stable_when_images_are_added(tmp_path):
    names = [f"img_{i}.png" for i in range(20)]
    write_folder(tmp_path, names, {n: [(8, 20), None, (16, 10)] for n in names})
    before = {r.key for r in open_dataset(str(tmp_path), "test", image_size=16).records}
    more = [f"new_{i}.png" for i in range(20)]
    write_folder(tmp_path, names + more, {n: [(8, 20), None, (16, 10)] for n in names + more})
    after = {r.key for r in open_dataset(str(tmp_path), "test", image_size=16).records}
    assert before and after & set(names) == before


def test_an_explicit_test_set_is_used_whole_and_the_source_is_not_held_out(tmp_path):
    spec = _one_source("folder", tmp_path / "a", n=12)
    other = write_folder(tmp_path / "b", ["x.png", "y.png"], {"x.png": [(8, 20), (24, 20), (16, 10)]})
    train = open_dataset(spec, "train", image_size=16, test=str(other))
    test = open_dataset(spec, "test", image_size=16, test=f"folder:{other}")
    assert len(train) == 12 and sorted(r.key for r in test.records) == ["x.png", "y.png"]
    assert "given separately" in train.info["split_rule"]
    with pytest.raises(FileNotFoundError, match="test 'nowhere' does not exist"):
        open_dataset(spec, "test", test="nowhere")
    with pytest.raises(ValueError, match="apply to real data"):
        open_dataset("face", "test", test=str(other))


def test_an_empty_test_split_says_how_to_give_one(tmp_path):
    names = [n for n in (f"img_{i}.png" for i in range(40)) if hashed_split(n) == "train"][:3]
    write_folder(tmp_path, names, {n: [(8, 20), (24, 20), (16, 10)] for n in names})
    with pytest.raises(DatasetFormatError, match=r"no samples in the 'test' split .*--test-dataset"):
        open_dataset(str(tmp_path), "test", image_size=16)


def test_test_dataset_and_category_reach_the_command_line():
    from kpfast.train.cli import command_line, config_from_args, parser

    cfg = config_from_args(parser().parse_args(["--preset", "tiny", "--out", "runs/x", "--dataset", "coco:a.json",
                                                "--test-dataset", "coco:b.json", "--category", "jaguar"]))
    assert (cfg.dataset, cfg.test_dataset, cfg.category) == ("coco:a.json", "coco:b.json", "jaguar")
    assert "--test-dataset coco:b.json --category jaguar" in command_line(cfg.to_dict())


def _tiny(tmp_path, dataset, run="run", **kw):
    return TrainConfig.from_preset("tiny", dataset=dataset, out=str(tmp_path / run), iterations=1, shots=2,
                                   batch_unlabeled=2, train_size=None, test_size=None, **kw)


def test_training_reports_the_test_split_and_never_tests_on_training_images(tmp_path):
    spec = _one_source("folder", tmp_path / "paws", n=30)
    metrics = kpfast.train.run(_tiny(tmp_path, spec))
    assert "SHA-256" in metrics["test_split"] and metrics["test_split"] in (tmp_path / "run/metrics.json").read_text()
    every = open_dataset(spec, "all", image_size=32)
    n_test = sum(hashed_split(r.key) == "test" for r in every.records)
    assert (metrics["train_images"], metrics["test_images"]) == (30 - n_test, n_test)
    # the same images given as the test set: refused, not measured
    with pytest.raises(ValueError, match=r"the test split shares 30 image\(s\) with the training split"):
        kpfast.train.run(_tiny(tmp_path, spec, run="run-same-images", test_dataset=spec))


def test_a_test_split_without_labels_is_refused(tmp_path):
    spec = _one_source("folder", tmp_path / "paws", n=12)
    other = write_folder(tmp_path / "other", ["p.png", "test/q.png"], {"p.png": [(8, 20), None, None]})
    with pytest.raises(ValueError, match=r"the test split \(1 images; .*\) has no labelled keypoint"):
        kpfast.train.run(_tiny(tmp_path, spec, test_dataset=f"folder:{other}"))
