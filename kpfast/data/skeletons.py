"""Built-in keypoint definitions of the known datasets (names, skeletons, parts, flips).

- ``face68_meta()``: the 68-point iBUG / 300-W markup (also used by the procedural face);
- ``wflw98_meta()``: WFLW's 98 points;
- ``cub15_meta()``: CUB-200-2011's 15 bird parts;
- ``coco17_meta()``: COCO's 17 person keypoints.

Left/right in names is the *subject's* side (the subject's right eye appears on the
image's left in a frontal view), which is how the datasets number their points.
Face parts follow the paper (left/right eye, left/right brow, nose, mouth, contour);
the normalizer is the pair of outer eye corners.
"""

from __future__ import annotations

from .meta import KeypointMeta, flip_perm_from_pairs

__all__ = ["face68_meta", "wflw98_meta", "cub15_meta", "coco17_meta", "chain", "loop", "all_pairs"]


def chain(ids) -> list[tuple[int, int]]:
    """Edges along a polyline: ``chain([0, 1, 2]) == [(0, 1), (1, 2)]``."""
    ids = list(ids)
    return [(a, b) for a, b in zip(ids[:-1], ids[1:])]


def loop(ids) -> list[tuple[int, int]]:
    """Edges around a closed polygon: ``loop([0, 1, 2]) == [(0, 1), (1, 2), (2, 0)]``."""
    ids = list(ids)
    return chain(ids) + [(ids[-1], ids[0])]


def all_pairs(num_keypoints: int) -> list[tuple[int, int]]:
    """AutoLink's fully connected graph: every pair ``(i, j)`` with ``i < j``.

    Example:
        >>> all_pairs(3)
        [(0, 1), (0, 2), (1, 2)]
    """
    return [(i, j) for i in range(num_keypoints) for j in range(i + 1, num_keypoints)]


def _mirror_names(names: list, perm: list) -> list:
    """Name every ``left_*`` keypoint after the mirror image of its ``right_*`` partner."""
    out = list(names)
    for i, n in enumerate(names):
        if n.startswith("left_"):
            partner = names[perm[i]]
            assert partner.startswith("right_"), (i, n, partner)
            out[i] = "left_" + partner[len("right_"):]
    return out


def face68_meta(name: str = "300w") -> KeypointMeta:
    """The 68-point iBUG markup (300-W): contour 0-16, brows 17-26, nose 27-35,
    eyes 36-47, mouth 48-67; normalizer = outer eye corners (36, 45)."""
    names = ([f"contour_{i:02d}" for i in range(17)]
             + [f"right_brow_{i}" for i in range(5)] + [f"left_brow_{i}" for i in range(5)]
             + [f"nose_bridge_{i}" for i in range(4)] + [f"nose_base_{i}" for i in range(5)]
             + [f"right_eye_{i}" for i in range(6)] + [f"left_eye_{i}" for i in range(6)]
             + [f"mouth_outer_{i:02d}" for i in range(12)] + [f"mouth_inner_{i}" for i in range(8)])
    pairs = ([(i, 16 - i) for i in range(8)]
             + [(17, 26), (18, 25), (19, 24), (20, 23), (21, 22)]
             + [(31, 35), (32, 34)]
             + [(36, 45), (37, 44), (38, 43), (39, 42), (40, 47), (41, 46)]
             + [(48, 54), (49, 53), (50, 52), (55, 59), (56, 58)]
             + [(60, 64), (61, 63), (65, 67)])
    edges = (chain(range(0, 17)) + chain(range(17, 22)) + chain(range(22, 27))
             + chain(range(27, 31)) + chain(range(31, 36)) + [(30, 33)]
             + loop(range(36, 42)) + loop(range(42, 48)) + loop(range(48, 60)) + loop(range(60, 68)))
    parts = {
        "right_eye": list(range(36, 42)), "left_eye": list(range(42, 48)),
        "right_brow": list(range(17, 22)), "left_brow": list(range(22, 27)),
        "nose": list(range(27, 36)), "mouth": list(range(48, 68)), "contour": list(range(0, 17)),
    }
    perm = flip_perm_from_pairs(68, pairs)
    return KeypointMeta(name=name, keypoint_names=_mirror_names(names, perm), edges=edges, parts=parts,
                        flip_perm=perm, normalizer=(36, 45))


def wflw98_meta() -> KeypointMeta:
    """WFLW's 98 points: contour 0-32, brows 33-50, nose 51-59, eyes 60-75, mouth
    76-95, pupils 96-97; normalizer = outer eye corners (60, 72)."""
    names = ([f"contour_{i:02d}" for i in range(33)]
             + [f"right_brow_{i}" for i in range(9)] + [f"left_brow_{i}" for i in range(9)]
             + [f"nose_bridge_{i}" for i in range(4)] + [f"nose_base_{i}" for i in range(5)]
             + [f"right_eye_{i}" for i in range(8)] + [f"left_eye_{i}" for i in range(8)]
             + [f"mouth_outer_{i:02d}" for i in range(12)] + [f"mouth_inner_{i}" for i in range(8)]
             + ["right_pupil", "left_pupil"])
    pairs = ([(i, 32 - i) for i in range(16)]
             + [(33, 46), (34, 45), (35, 44), (36, 43), (37, 42), (38, 50), (39, 49), (40, 48), (41, 47)]
             + [(60, 72), (61, 71), (62, 70), (63, 69), (64, 68), (65, 75), (66, 74), (67, 73)]
             + [(55, 59), (56, 58)]
             + [(76, 82), (77, 81), (78, 80), (87, 83), (86, 84)]
             + [(88, 92), (89, 91), (95, 93), (96, 97)])
    edges = (chain(range(0, 33)) + loop(range(33, 42)) + loop(range(42, 51))
             + chain(range(51, 55)) + chain(range(55, 60)) + [(54, 57)]
             + loop(range(60, 68)) + loop(range(68, 76)) + loop(range(76, 88)) + loop(range(88, 96)))
    parts = {
        "right_eye": list(range(60, 68)) + [96], "left_eye": list(range(68, 76)) + [97],
        "right_brow": list(range(33, 42)), "left_brow": list(range(42, 51)),
        "nose": list(range(51, 60)), "mouth": list(range(76, 96)), "contour": list(range(0, 33)),
    }
    perm = flip_perm_from_pairs(98, pairs)
    return KeypointMeta(name="wflw", keypoint_names=_mirror_names(names, perm), edges=edges, parts=parts,
                        flip_perm=perm, normalizer=(60, 72))


CUB_PARTS = ["back", "beak", "belly", "breast", "crown", "forehead", "left_eye", "left_leg",
             "left_wing", "nape", "right_eye", "right_leg", "right_wing", "tail", "throat"]


def cub15_meta() -> KeypointMeta:
    """CUB-200-2011's 15 parts in ``parts/parts.txt`` order (ids 1..15 -> 0..14);
    PCK normalization (``normalizer=None``)."""
    n = {name: i for i, name in enumerate(CUB_PARTS)}
    e = lambda a, b: (n[a], n[b])  # noqa: E731
    edges = [e("beak", "forehead"), e("forehead", "crown"), e("crown", "nape"), e("nape", "back"),
             e("back", "tail"), e("beak", "throat"), e("throat", "breast"), e("breast", "belly"),
             e("belly", "tail"), e("forehead", "left_eye"), e("forehead", "right_eye"),
             e("back", "left_wing"), e("back", "right_wing"), e("belly", "left_leg"), e("belly", "right_leg")]
    parts = {
        "head": [n[p] for p in ("beak", "crown", "forehead", "left_eye", "right_eye", "nape", "throat")],
        "body": [n[p] for p in ("back", "breast", "belly", "tail")],
        "wings": [n[p] for p in ("left_wing", "right_wing", "back")],
        "legs": [n[p] for p in ("left_leg", "right_leg", "belly")],
    }
    pairs = [e("left_eye", "right_eye"), e("left_leg", "right_leg"), e("left_wing", "right_wing")]
    return KeypointMeta(name="cub", keypoint_names=list(CUB_PARTS), edges=edges, parts=parts,
                        flip_perm=flip_perm_from_pairs(15, pairs), normalizer=None)


COCO_KEYPOINTS = ["nose", "left_eye", "right_eye", "left_ear", "right_ear", "left_shoulder",
                  "right_shoulder", "left_elbow", "right_elbow", "left_wrist", "right_wrist",
                  "left_hip", "right_hip", "left_knee", "right_knee", "left_ankle", "right_ankle"]

# COCO's own skeleton (1-based in the annotation files), converted to 0-based.
COCO_SKELETON_1BASED = [[16, 14], [14, 12], [17, 15], [15, 13], [12, 13], [6, 12], [7, 13], [6, 7],
                        [6, 8], [7, 9], [8, 10], [9, 11], [2, 3], [1, 2], [1, 3], [2, 4], [3, 5],
                        [4, 6], [5, 7]]


def coco17_meta() -> KeypointMeta:
    """COCO's 17 person keypoints with COCO's skeleton; PCK normalization."""
    edges = [(a - 1, b - 1) for a, b in COCO_SKELETON_1BASED]
    parts = {
        "head": [0, 1, 2, 3, 4], "torso": [5, 6, 11, 12],
        "left_arm": [5, 7, 9], "right_arm": [6, 8, 10],
        "left_leg": [11, 13, 15], "right_leg": [12, 14, 16],
    }
    pairs = [(1, 2), (3, 4), (5, 6), (7, 8), (9, 10), (11, 12), (13, 14), (15, 16)]
    return KeypointMeta(name="coco", keypoint_names=list(COCO_KEYPOINTS), edges=edges, parts=parts,
                        flip_perm=flip_perm_from_pairs(17, pairs), normalizer=None)
