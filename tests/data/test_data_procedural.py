"""Procedural benchmark: labels, determinism, caching."""

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from kpfast.data import open_dataset
from kpfast.data.procedural import generate as gen
from kpfast.data.procedural.raycast import pack_scenes, render
from kpfast.data.procedural.scene import (Material, Scene, box, ellipsoid, sample_background,
                                          sample_light)

from _util import fixed_seed

CATS = ["face", "animal", "car"]


def _toy_scene(rng, occluder_active=True):
    """A sphere at depth 5 with keypoints on its front, back and behind a box."""
    mat = Material(color1=np.array([0.8, 0.2, 0.2]))
    prims = [ellipsoid([0.0, 0.0, 5.0], [1.0, 1.0, 1.0], mat)]
    occ = box([0.5, 0.0, 3.0], [0.2, 0.2, 0.2], Material(color1=np.array([0.1, 0.9, 0.1])))
    occ.active = occluder_active
    prims.append(occ)
    kp = np.array([[0.0, 0.0, 4.0],  # front pole: visible
                   [0.0, 0.0, 6.0],  # back pole: hidden by the sphere itself
                   [0.0, -0.6, 4.2],  # front surface, off-axis: visible
                   [0.6, 0.0, 5.0 - np.sqrt(1 - 0.36)]])  # front surface behind the box
    bg = sample_background(rng)
    bg.noise_sigma = 0.0
    return Scene(primitives=prims, object_slots=1, keypoints=kp, keypoint_tol=np.full(4, 0.02), focal=2.0,
                 object_depth=5.0, light=sample_light(rng), background=bg)


def test_raycast_depth_visibility_and_projection():
    rng = np.random.default_rng(fixed_seed())
    packed = pack_scenes([_toy_scene(rng), _toy_scene(rng, occluder_active=False)])
    r = render(packed, 33)
    kp = r["keypoints"]
    # perspective projection f X / Z
    assert torch.allclose(kp[0, 3], torch.tensor([2.0 * 0.6 / (5.0 - 0.8), 0.0]), atol=1e-6)
    assert r["visible"][0].tolist() == [True, False, True, False]
    assert r["visible"][1].tolist() == [True, False, True, True]  # the box is switched off
    # depth normalization (Z - Z_o) f / Z_o
    assert torch.allclose(r["depth"][0, :2], torch.tensor([-1.0, 1.0]) * 2.0 / 5.0, atol=1e-6)
    # silhouette box of the sphere: tangent cone half-angle, f * tan = f * 1 / sqrt(24)
    half = float(2.0 / np.sqrt(24.0))
    assert torch.allclose(r["bbox"][1], torch.tensor([-half, -half, half, half]), atol=2.0 / 32 + 1e-6)
    # the centre pixel shows the sphere's colour (lit), not the background
    centre = r["image"][1, :, 16, 16]
    assert centre[0] > centre[1] and centre[0] > centre[2]


def test_face_samples_conventions(tmp_path):
    ds = open_dataset("face", "test", size=6, image_size=32, cache_dir=tmp_path, progress=False)
    assert len(ds) == 6 and ds.meta.num_keypoints == 68 and ds.meta.normalizer == (36, 45)
    s = ds[5]
    assert s["image"].dtype == torch.float32 and s["image"].shape == (3, 32, 32)
    assert 0 <= s["image"].min() and s["image"].max() <= 1
    assert s["keypoints"].shape == (68, 2) and s["keypoints"].dtype == torch.float32
    assert s["visible"].dtype == torch.bool and s["labeled"].all()
    assert s["depth"].shape == (68,) and torch.isfinite(s["depth"]).all()
    assert s["bbox"].shape == (4,) and s["index"] == 5
    x0, y0, x1, y1 = s["bbox"].tolist()
    assert -1 <= x0 < x1 <= 1 and -1 <= y0 < y1 <= 1
    allv = torch.stack([ds[i]["visible"] for i in range(6)])
    # faces turn up to 60 degrees: most landmarks visible, not all
    assert 0.4 < allv.float().mean() < 1.0
    # visible keypoints lie inside the image
    kps = torch.stack([ds[i]["keypoints"] for i in range(6)])
    assert (kps[allv].abs() <= 1).all()


@pytest.mark.parametrize("category", CATS)
def test_deterministic_across_batches_and_threads(category):
    idx = [3, 4, 5]
    a = gen.render_samples(category, "train", 7, idx, image_size=24)
    b = gen.render_samples(category, "train", 7, [4], image_size=24)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        c = gen.render_samples(category, "train", 7, [5, 3, 4], image_size=24)
    finally:
        torch.set_num_threads(old)
    for k in ("image", "keypoints", "visible", "depth", "bbox"):
        assert torch.equal(a[k][1], b[k][0]), k
        assert torch.equal(a[k][0], c[k][1]) and torch.equal(a[k][2], c[k][0]), k
    d = gen.render_samples(category, "train", 8, idx, image_size=24)
    e = gen.render_samples(category, "test", 7, idx, image_size=24)
    assert not torch.equal(a["image"], d["image"]) and not torch.equal(a["image"], e["image"])


def test_cache_hit_key_and_env(tmp_path, monkeypatch):
    ds1 = open_dataset("face", "train", size=3, image_size=24, seed=3, cache_dir=tmp_path, progress=False)
    assert ds1.info["cached"] is False
    ds2 = open_dataset("face", "train", size=3, image_size=24, seed=3, cache_dir=tmp_path, progress=False)
    assert ds2.info["cached"] is True
    assert np.array_equal(ds1.arrays["images"], ds2.arrays["images"])
    # every parameter is part of the key
    for kw in ({"seed": 4}, {"image_size": 26}, {"size": 2}):
        args = {"size": 3, "image_size": 24, "seed": 3} | kw
        assert open_dataset("face", "train", cache_dir=tmp_path, progress=False, **args).info["cached"] is False
    folders = [p for p in tmp_path.iterdir() if not p.name.startswith(".")]
    assert len(folders) == 4
    key = json.loads((folders[0] / "key.json").read_text())["params"]
    assert key["generator_version"] == gen.GENERATOR_VERSION and "meta" in key
    # KPFAST_CACHE is the default root
    env = tmp_path / "env"
    monkeypatch.setenv("KPFAST_CACHE", str(env))
    ds3 = open_dataset("face", "train", size=3, image_size=24, seed=3, progress=False)
    assert ds3.info["cache_folder"].startswith(str(env))
    assert np.array_equal(ds3.arrays["images"], ds1.arrays["images"])


def test_interrupted_generation_leaves_no_entry(tmp_path, monkeypatch):
    calls = {"n": 0}
    real = gen.render_samples

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("simulated interrupt")
        return real(*a, **k)

    monkeypatch.setattr(gen, "render_samples", flaky)
    with pytest.raises(KeyboardInterrupt):
        gen.procedural_dataset("face", "train", size=4, image_size=16, batch_size=2, workers=1, cache_dir=tmp_path,
                               progress=False)
    assert list(tmp_path.iterdir()) == []  # neither an entry nor a temporary folder
    monkeypatch.setattr(gen, "render_samples", real)
    ds = gen.procedural_dataset("face", "train", size=4, image_size=16, cache_dir=tmp_path, progress=False)
    assert ds.info["cached"] is False and len(ds) == 4


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="unknown split"):
        open_dataset("face", "dev", size=2, cache_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="built-in categories"):
        open_dataset("horse", cache_dir=tmp_path)
    with pytest.raises(ValueError, match="image_size"):
        open_dataset("face", image_size=4)
    with pytest.raises(ValueError, match="size"):
        open_dataset("face", size=0)


@pytest.mark.parametrize("category,k", [("animal", 20), ("car", 14)])
def test_other_categories(tmp_path, category, k):
    ds = open_dataset(category, "train", size=6, image_size=32, cache_dir=tmp_path, progress=False)
    assert ds.meta.num_keypoints == k and ds.meta.normalizer is None
    vis = torch.stack([ds[i]["visible"] for i in range(6)])
    # self-occlusion: some keypoints hidden, most images show several keypoints
    assert 0.2 < vis.float().mean() < 0.95
    flip = ds.meta.flip_perm
    assert flip != list(range(k)) and all(flip[flip[i]] == i for i in range(k))


def test_contact_sheet_and_draw(tmp_path):
    from kpfast.data.contact_sheet import main
    from kpfast.data.draw import draw_keypoints

    main(["--out", str(tmp_path), "--n", "2", "--cols", "2", "--image-size", "32", "--categories", "car"])
    from PIL import Image

    im = Image.open(tmp_path / "procedural_car.png")
    assert im.size[0] > 2 * 32 and im.mode == "RGB"
    black = torch.zeros(3, 16, 16)
    out = draw_keypoints(black, torch.tensor([[0.0, 0.0]]), radius=1.0)
    a = torch.tensor(__import__("numpy").array(out), dtype=torch.float32)
    assert a[7:9, 7:9].sum() > 0 and a[0:3, 0:3].sum() == 0  # drawn at the centre only


def _invert_images(folder):
    a = np.load(folder / "images.npy")
    np.save(folder / "images.npy", 255 - a)


def _random_bytes(folder):
    raw = bytearray((folder / "keypoints.npy").read_bytes())
    raw[-64:] = np.random.default_rng(0).integers(0, 256, 64, dtype=np.uint8).tobytes()
    (folder / "keypoints.npy").write_bytes(bytes(raw))


def _zero_labeled(folder):
    a = np.load(folder / "labeled.npy")
    np.save(folder / "labeled.npy", np.zeros_like(a))


def _no_digests(folder):  # what an entry of the previous cache format holds
    key = json.loads((folder / "key.json").read_text())
    del key["sha256"]
    (folder / "key.json").write_text(json.dumps(key))


@pytest.mark.parametrize("damage", [_invert_images, _random_bytes, _zero_labeled, _no_digests])
def test_a_damaged_cache_entry_warns_and_is_regenerated(tmp_path, damage):
    args = dict(size=3, image_size=16, cache_dir=tmp_path, progress=False)
    first = open_dataset("face", "train", **args)
    want = {k: np.array(v) for k, v in first.arrays.items()}
    folder = Path(first.info["cache_folder"])
    del first
    size_before = {p.name: p.stat().st_size for p in folder.glob("*.npy")}
    damage(folder)
    assert {p.name: p.stat().st_size for p in folder.glob("*.npy")} == size_before  # same-size damage
    with pytest.warns(UserWarning, match="is damaged .*regenerating it"):
        again = open_dataset("face", "train", **args)
    assert again.info["cached"] is False and again.info["cache_folder"] == str(folder)
    for k, v in want.items():
        assert np.array_equal(np.asarray(again.arrays[k]), v), k
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert open_dataset("face", "train", **args).info["cached"] is True
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
