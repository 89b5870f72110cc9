"""Inference: kpfast.load(...).predict(...) and ``python -m kpfast.predict``."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

import kpfast
from kpfast.inference import KeypointPredictor
from kpfast.predict import main as predict_main
from kpfast.train import TrainConfig


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    kpfast.train.run(TrainConfig.from_preset("tiny", out=str(out), iterations=2,
                                         cache_dir=str(tmp_path_factory.mktemp("cache"))))
    return out


class _FixedDetector(torch.nn.Module):
    """Always 'detects' the corners of the model input: (-1, -1) and (1, 1)."""

    def __init__(self):
        super().__init__()
        self.p = torch.nn.Parameter(torch.zeros(()))

    def forward(self, images):
        from kpfast.models import Detections

        B = images.shape[0]
        kp = torch.tensor([[-1.0, -1.0], [1.0, 1.0]]).expand(B, 2, 2)
        z = torch.zeros(B, 2)
        return Detections(keypoints=kp, uncertainty=z, depth=z, heatmaps=z, uncertainty_maps=z)


def test_keypoints_come_back_in_each_input_images_pixels():
    meta = kpfast.data.KeypointMeta("toy", ["a", "b"])
    predictor = KeypointPredictor(_FixedDetector(), meta, image_size=32)
    images = [torch.rand(3, 32, 32), torch.rand(3, 64, 96), np.zeros((20, 10, 3), np.uint8)]
    pred = predictor.predict(images)
    assert pred.sizes == [(32, 32), (64, 96), (20, 10)]
    # model pixel centre 0 / 31 of a 32-wide input, mapped through an align_corners=False resize
    for b, (h, w) in enumerate(pred.sizes):
        want = torch.tensor([[0.5 * w / 32 - 0.5, 0.5 * h / 32 - 0.5],
                             [31.5 * w / 32 - 0.5, 31.5 * h / 32 - 0.5]])
        torch.testing.assert_close(pred.keypoints[b], want)
    assert torch.allclose(pred.confidence, torch.full((3, 2), 0.5))


def test_load_round_trip_matches_the_trained_detector(run_dir):
    from kpfast.data import open_dataset

    predictor = kpfast.load(run_dir)
    cfg = TrainConfig.from_dict(json.loads((run_dir / "metrics.json").read_text())["config"])
    ds = open_dataset("face", "test", size=4, image_size=cfg.image_size, cache_dir=cfg.cache_dir, progress=False)
    images = torch.stack([ds[i]["image"] for i in range(4)])
    pred = predictor.predict(images)
    assert pred.keypoints.shape == (4, 68, 2) and pred.depth.shape == (4, 68) and pred.uncertainty.shape == (4, 68)
    with torch.no_grad():
        det = predictor.detector(images)
    want = (det.keypoints + 1) / 2 * (cfg.image_size - 1)
    torch.testing.assert_close(pred.keypoints, want, atol=1e-4, rtol=0)
    # uint8 input of the same images, and the training checkpoint, give the same answer
    as_uint8 = (images * 255).round().to(torch.uint8)
    torch.testing.assert_close(predictor.predict(as_uint8).keypoints, pred.keypoints, atol=0.05, rtol=0)
    from_training = kpfast.load(run_dir / "checkpoint.pt").predict(images)
    torch.testing.assert_close(from_training.keypoints, pred.keypoints)


def test_a_bigger_image_gives_the_keypoints_scaled_up(run_dir):
    predictor = kpfast.load(run_dir)
    S = predictor.image_size
    small = torch.rand(3, S, S)
    big = torch.nn.functional.interpolate(small[None], scale_factor=4, mode="nearest")[0]
    a, b = predictor.predict(small).keypoints[0], predictor.predict(Image.fromarray(
        (big.permute(1, 2, 0).numpy() * 255).astype(np.uint8))).keypoints[0]
    # a 4x nearest upscale shrinks back (antialiased) to nearly the same image
    torch.testing.assert_close(b, (a + 0.5) * 4 - 0.5, atol=4 * 0.6, rtol=0)


def test_predict_cli_writes_annotated_images_and_json(run_dir, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name, size in (("a.png", (40, 30)), ("b.jpg", (64, 64))):
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(folder / name)
    (folder / "notes.txt").write_text("not an image")
    assert predict_main([str(run_dir), str(folder), "--out", str(tmp_path / "out")]) == 0
    result = json.loads((tmp_path / "out" / "predictions.json").read_text())
    assert set(result) == {"a.png", "b.jpg"}
    assert result["a.png"]["size"] == [40, 30] and len(result["a.png"]["keypoints"]) == 68
    kp = result["a.png"]["keypoints"]["contour_00"]
    assert set(kp) == {"x", "y", "confidence", "depth"}
    assert Image.open(tmp_path / "out" / "a.png").size == (30, 40)
    assert predict_main([str(run_dir), str(tmp_path / "missing"), "--out", str(tmp_path / "o2")]) == 2


def test_load_rejects_what_is_not_a_kpfast_checkpoint(tmp_path):
    torch.save({"weights": 1}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a kpfast checkpoint"):
        kpfast.load(tmp_path / "other.pt")
    with pytest.raises(FileNotFoundError, match="no kpfast checkpoint"):
        kpfast.load(tmp_path / "nothing-here")


def test_images_a_few_pixels_high_keep_their_layout():
    meta = kpfast.data.KeypointMeta("toy", ["a", "b"])
    predictor = KeypointPredictor(_FixedDetector(), meta, image_size=32)
    rng = np.random.default_rng(0)
    pil = Image.fromarray(rng.integers(0, 255, (3, 50, 3), dtype=np.uint8))  # 3 rows, 50 columns
    images = [pil, np.zeros((4, 50, 3), np.uint8), torch.rand(3, 4, 50), torch.rand(50, 60, 3),
              np.zeros((3, 50, 60), np.uint8), np.zeros((3, 50), np.uint8)]
    pred = predictor.predict(images)
    assert pred.sizes == [(3, 50), (4, 50), (4, 50), (50, 60), (50, 60), (3, 50)]
    for b, (h, w) in enumerate(pred.sizes):  # the corners of the model input land inside each image
        assert (pred.keypoints[b, :, 0] > -0.5).all() and (pred.keypoints[b, :, 0] < w - 0.5).all()
        assert (pred.keypoints[b, :, 1] > -0.5).all() and (pred.keypoints[b, :, 1] < h - 0.5).all()
    with pytest.raises(ValueError, match=r"with C in 1, 3, 4, or \[H, W\], got shape \(5, 6, 7\)"):
        predictor.predict(np.zeros((5, 6, 7), np.uint8))


def test_predict_folder_keeps_every_output_and_reports_unreadable_files(run_dir, tmp_path, monkeypatch):
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(1)
    good = {"a.png": (40, 30), "a.jpg": (30, 40), "a_jpg.png": (20, 20), "thin.png": (3, 50)}
    for name, size in good.items():
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(folder / name)
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "whole.png")
    (folder / "truncated.png").write_bytes((tmp_path / "whole.png").read_bytes()[:300])
    (folder / "notes.png").write_text("not an image")
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "dir.png").mkdir()
    Image.fromarray(np.zeros((120, 120, 3), np.uint8)).save(folder / "bomb.png")
    Image.fromarray(np.zeros((1, 9, 3), np.uint8)).save(folder / "line.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 5000)  # bomb.png's 14400 pixels exceed twice the limit

    out = tmp_path / "out"
    assert predict_main([str(run_dir), str(folder), "--out", str(out), "--batch-size", "3"]) == 1
    result = json.loads((out / "predictions.json").read_text())
    assert sorted(result) == sorted(p.name for p in folder.iterdir())
    errors = {name: r["error"] for name, r in result.items() if "error" in r}
    assert sorted(errors) == ["bomb.png", "dir.png", "empty.jpg", "line.png", "notes.png", "truncated.png"]
    assert "truncated" in errors["truncated.png"] and "folder" in errors["dir.png"] and "empty" in errors["empty.jpg"]
    assert "too many pixels" in errors["bomb.png"] and "not an image" in errors["notes.png"]
    outputs = {name: r["output"] for name, r in result.items() if "error" not in r}
    assert outputs == {"a.jpg": "a_jpg.png", "a.png": "a_png.png", "a_jpg.png": "a_jpg_2.png", "thin.png": "thin.png"}
    for name, (h, w) in good.items():
        assert result[name]["size"] == [h, w] and Image.open(out / outputs[name]).size == (w, h)
    assert predict_main([str(run_dir), str(folder), "--out", str(folder)]) == 2
