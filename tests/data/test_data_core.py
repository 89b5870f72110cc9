"""kpfast.data: coordinate convention and KeypointMeta validation."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kpfast.data import KeypointMeta, flip_perm_from_names, flip_perm_from_pairs, normalized_to_pixels, pixel_grid, pixels_to_normalized
from kpfast.data.skeletons import coco17_meta, cub15_meta, face68_meta, wflw98_meta


@pytest.mark.parametrize("h,w", [(5, 7), (128, 128), (2, 3)])
def test_pixel_round_trip_and_ends(h, w):
    gen = torch.Generator().manual_seed(h * 100 + w)
    xy = torch.rand(10, 2, generator=gen, dtype=torch.float64) * torch.tensor([w - 1, h - 1], dtype=torch.float64)
    n = pixels_to_normalized(xy, (h, w))
    assert torch.allclose(normalized_to_pixels(n, (h, w)), xy, atol=1e-12)
    ends = pixels_to_normalized(torch.tensor([[0.0, 0.0], [w - 1.0, h - 1.0]]), (h, w))
    assert torch.equal(ends, torch.tensor([[-1.0, -1.0], [1.0, 1.0]]))
    # numpy path agrees
    assert np.allclose(pixels_to_normalized(xy.numpy(), (h, w)), n.numpy())


def test_convention_matches_grid_sample_align_corners():
    gen = torch.Generator().manual_seed(0)
    img = torch.rand(1, 1, 9, 13, generator=gen)
    i, j = 4, 7
    xy = pixels_to_normalized(torch.tensor([[float(j), float(i)]]), (9, 13))
    v = F.grid_sample(img, xy.view(1, 1, 1, 2), align_corners=True)
    assert torch.allclose(v.view(()), img[0, 0, i, j])
    g = pixel_grid((9, 13))
    assert torch.allclose(g[i, j], xy[0])


def test_coords_bad_input():
    with pytest.raises(ValueError, match="last dimension of 2"):
        pixels_to_normalized(torch.zeros(3, 3), 10)
    with pytest.raises(ValueError, match="at least 2"):
        pixels_to_normalized(torch.zeros(3, 2), 1)
    with pytest.raises(TypeError):
        pixels_to_normalized([[1.0, 2.0]], 10)


@pytest.mark.parametrize("make", [face68_meta, wflw98_meta, cub15_meta, coco17_meta])
def test_builtin_metas_valid_and_round_trip(make):
    meta = make()
    assert KeypointMeta.from_config(meta.to_dict()) == meta
    perm = meta.flip_perm
    assert [perm[perm[i]] for i in range(len(perm))] == list(range(len(perm)))
    # a side-named keypoint flips onto its mirror name
    for i, name in enumerate(meta.keypoint_names):
        if "left" in name:
            assert meta.keypoint_names[perm[i]] == name.replace("left", "right")
    # parts cover only valid indices; masks have the right shape
    assert meta.part_mask(include_whole=True).shape == (len(meta.parts) + 1, meta.num_keypoints)
    assert meta.edge_tensor().shape == (len(meta.edges), 2)


def test_face_metas_known_facts():
    f68, w98 = face68_meta(), wflw98_meta()
    assert f68.normalizer == (36, 45) and w98.normalizer == (60, 72)
    assert f68.flip_perm[36] == 45 and f68.flip_perm[8] == 8 and f68.flip_perm[48] == 54
    assert w98.flip_perm[60] == 72 and w98.flip_perm[96] == 97 and w98.flip_perm[16] == 16
    assert set(f68.parts) == {"left_eye", "right_eye", "left_brow", "right_brow", "nose", "mouth", "contour"}
    # the parts partition the 68 points
    assert sorted(sum(f68.parts.values(), [])) == list(range(68))
    assert cub15_meta().flip_perm[6] == 10 and coco17_meta().flip_perm[15] == 16


def test_meta_errors_say_what_is_wrong():
    names = ["a", "b", "c"]
    with pytest.raises(ValueError, match="outside"):
        KeypointMeta("t", names, edges=[(0, 3)])
    with pytest.raises(ValueError, match="involution"):
        KeypointMeta("t", names, flip_perm=[1, 2, 0])
    with pytest.raises(ValueError, match="not a permutation"):
        KeypointMeta("t", names, flip_perm=[0, 0, 2])
    with pytest.raises(ValueError, match="one per keypoint"):
        KeypointMeta("t", names, flip_perm=[0, 1])
    with pytest.raises(ValueError, match="duplicate"):
        KeypointMeta("t", ["a", "a"])
    with pytest.raises(ValueError, match="normalizer"):
        KeypointMeta("t", names, normalizer=(1, 1))
    with pytest.raises(ValueError, match=r"parts\['p'\]"):
        KeypointMeta("t", names, parts={"p": [0, 5]})
    with pytest.raises(ValueError, match="itself"):
        KeypointMeta("t", names, edges=[(1, 1)])
    with pytest.raises(ValueError, match="not in keypoint_names"):
        KeypointMeta.from_config({"keypoint_names": names, "edges": [["a", "zz"]]})
    with pytest.raises(ValueError, match="unknown keys"):
        KeypointMeta.from_config({"keypoint_names": names, "skeleton": []})


def test_from_config_by_name_and_pairs(tmp_path):
    cfg = {"name": "hand", "keypoint_names": ["wrist", "thumb_L", "thumb_R", "index"],
           "edges": [["wrist", "thumb_L"], [0, 2]], "parts": {"thumbs": ["thumb_L", "thumb_R"]},
           "flip_pairs": [["thumb_L", "thumb_R"]], "normalizer": ["wrist", "index"]}
    p = tmp_path / "kp.json"
    import json

    p.write_text(json.dumps(cfg))
    m = KeypointMeta.from_config(p)
    assert m.flip_perm == [0, 2, 1, 3] and m.edges == [(0, 1), (0, 2)] and m.parts == {"thumbs": [1, 2]}
    assert m.normalizer == (0, 3)
    assert flip_perm_from_names(["thumb_L", "thumb_R", "x"]) == [1, 0, 2]
    assert flip_perm_from_names(["LeftHand", "RightHand"]) == [1, 0]
    with pytest.raises(ValueError, match="more than one"):
        flip_perm_from_pairs(3, [(0, 1), (1, 2)])
    bad = tmp_path / "bad.json"
    bad.write_text('{"keypoint_names": [\n  "a",\n}')
    with pytest.raises(ValueError, match="line 3"):
        KeypointMeta.from_config(bad)


def test_a_one_pixel_side_sits_at_minus_one_on_every_backend():
    """The documented convention (README, ``help(kpfast.soft_argmax)``): a side of 1 pixel is at -1,
    where kornia 0.9's ``spatial_expectation2d`` puts it at 0; longer sides follow -1 + 2j/(n-1)."""
    import kpfast
    from _util import kernel_backends, run

    gen = torch.Generator().manual_seed(7)
    for backend in kernel_backends() + ["reference"]:
        row = torch.randn(2, 3, 1, 6, generator=gen, dtype=torch.float64)
        col = torch.randn(2, 3, 5, 1, generator=gen, dtype=torch.float64)
        kp_row, _ = run(backend, kpfast.soft_argmax, row)
        kp_col, _ = run(backend, kpfast.soft_argmax, col)
        minus_one = torch.full((2, 3), -1.0, dtype=torch.float64)
        torch.testing.assert_close(kp_row[..., 1], minus_one, rtol=0, atol=1e-12, msg=backend)
        torch.testing.assert_close(kp_col[..., 0], minus_one, rtol=0, atol=1e-12, msg=backend)
        w = torch.softmax(row.reshape(2, 3, 6), -1)
        torch.testing.assert_close(kp_row[..., 0], w @ torch.linspace(-1, 1, 6, dtype=torch.float64))
