"""Procedural articulated quadruped (dog / big-cat like) with 20 joints.

Object frame: x forward (towards the head), y down, z to the animal's left. The
body is three ellipsoids (chest, belly, hips); neck, legs (two segments each) and
tail (two segments) are ellipsoids stretched between joints; head with snout,
ears and eyes. Joints sit inside the limbs: a joint is visible when the first
surface on its camera ray is no nearer than the limb's own thickness, so legs
hide each other and the far side of the body hides its legs. Pose: a random gait
phase per leg, neck and head turn, tail wag; seen from any direction (yaw
0-360 deg), camera elevation -10..35 deg.
"""

from __future__ import annotations

import numpy as np

from ..meta import KeypointMeta, flip_perm_from_names
from ..skeletons import chain
from .scene import (Material, Scene, ellipsoid, frame_from_axis, place_object, rot_x, rot_y, rot_z,
                    sample_background, sample_light, sample_occluders, segment, unit)

NAMES = ["nose", "left_eye", "right_eye", "left_ear", "right_ear", "withers", "tail_base", "tail_tip",
         "left_front_shoulder", "left_front_knee", "left_front_paw",
         "right_front_shoulder", "right_front_knee", "right_front_paw",
         "left_back_hip", "left_back_knee", "left_back_paw",
         "right_back_hip", "right_back_knee", "right_back_paw"]
_I = {n: i for i, n in enumerate(NAMES)}


def _meta() -> KeypointMeta:
    e = []
    for a, b in [("nose", "left_eye"), ("nose", "right_eye"), ("left_eye", "left_ear"), ("right_eye", "right_ear"),
                 ("left_ear", "withers"), ("right_ear", "withers"), ("withers", "tail_base"), ("tail_base", "tail_tip"),
                 ("withers", "left_front_shoulder"), ("withers", "right_front_shoulder"),
                 ("tail_base", "left_back_hip"), ("tail_base", "right_back_hip")]:
        e.append((_I[a], _I[b]))
    for side in ("left", "right"):
        e += chain([_I[f"{side}_front_shoulder"], _I[f"{side}_front_knee"], _I[f"{side}_front_paw"]])
        e += chain([_I[f"{side}_back_hip"], _I[f"{side}_back_knee"], _I[f"{side}_back_paw"]])
    parts = {"head": [_I[n] for n in ("nose", "left_eye", "right_eye", "left_ear", "right_ear")],
             "torso": [_I[n] for n in ("withers", "tail_base", "left_front_shoulder", "right_front_shoulder",
                                       "left_back_hip", "right_back_hip")]}
    for side in ("left", "right"):
        parts[f"{side}_front_leg"] = [_I[f"{side}_front_{j}"] for j in ("shoulder", "knee", "paw")]
        parts[f"{side}_back_leg"] = [_I[f"{side}_back_{j}"] for j in ("hip", "knee", "paw")]
    return KeypointMeta(name="procedural-animal", keypoint_names=NAMES, edges=e, parts=parts,
                        flip_perm=flip_perm_from_names(NAMES), normalizer=None)


META = _meta()
OBJECT_RADIUS = 1.25


def _fur(rng):
    palettes = [(0.45, 0.30, 0.18), (0.75, 0.55, 0.30), (0.15, 0.12, 0.10), (0.85, 0.82, 0.75), (0.55, 0.55, 0.55),
                (0.85, 0.50, 0.15)]
    base = np.clip(np.array(palettes[rng.integers(0, len(palettes))]) * rng.uniform(0.8, 1.15) + rng.normal(0, 0.04, 3), 0, 1)
    style = rng.integers(0, 3)  # 0 plain, 1 stripes, 2 patches
    second = np.clip(base * rng.uniform(0.2, 0.6), 0, 1) if style else base * 0.9
    if style == 1:
        mat = Material.random(rng, base, second, freq=(3, 7), strength=1.0, specular=0.05, n_waves=1)
        mat.wave_dirs[0] = unit([1.0, rng.uniform(-0.3, 0.3), 0.0])
    else:
        mat = Material.random(rng, base, second, freq=(0.8, 2.5), strength=1.0 if style else 0.3, specular=0.05)
    return mat, base


def make_scene(rng: np.random.Generator) -> Scene:
    """One random quadruped scene (object + two occluder slots)."""
    fur, base = _fur(rng)
    dark = Material(color1=np.array([0.05, 0.04, 0.04]), specular=0.6)
    L = rng.uniform(0.85, 1.15)  # body length
    Hb = rng.uniform(0.85, 1.15)  # body girth
    legl = rng.uniform(0.85, 1.2)
    prims = []
    chest = ellipsoid([0.45 * L, -0.02, 0], [0.38 * L, 0.36 * Hb, 0.31 * Hb], fur)
    belly = ellipsoid([0.0, 0.0, 0], [0.7 * L, 0.3 * Hb, 0.28 * Hb], fur)
    hips = ellipsoid([-0.5 * L, -0.03, 0], [0.33 * L, 0.33 * Hb, 0.29 * Hb], fur)
    prims += [chest, belly, hips]
    kp = np.zeros((20, 3))
    tol = np.full(20, 0.05)
    kp[_I["withers"]] = chest.point([0.2, -1.0, 0.0]) + np.array([0, 0.02, 0])
    kp[_I["tail_base"]] = hips.surface_point([-0.9, -0.45, 0.0])

    # neck and head
    up, turn = rng.uniform(0.15, 1.0), rng.uniform(-0.7, 0.7)
    neck_a = np.array([0.6 * L, -0.15 * Hb, 0.0])
    ndir = np.array([np.cos(up) * np.cos(turn), -np.sin(up), np.cos(up) * np.sin(turn)])
    neck_b = neck_a + 0.42 * ndir
    prims.append(segment(neck_a, neck_b, [0.15 * Hb, 0.14 * Hb], fur))
    hdir = unit(np.array([np.cos(turn), 0.0, np.sin(turn)]) + np.array([0, rng.uniform(0.1, 0.9), 0]))
    hR = frame_from_axis(hdir, up_hint=(0, 0, 1))
    if hR[:, 1][1] < 0:  # keep the head's local y pointing down
        hR = hR @ np.diag([1.0, -1.0, -1.0])
    head_c = neck_b + 0.06 * hdir
    head = ellipsoid(head_c, [0.2, 0.16, 0.15], fur, R=hR)
    snout_len = rng.uniform(0.12, 0.22)
    snout = ellipsoid(head_c + hdir * (0.14 + snout_len * 0.6), [snout_len, 0.085, 0.09], fur, R=hR)
    prims += [head, snout]
    kp[_I["nose"]] = snout.surface_point([1.0, 0.0, 0.0])
    tol[_I["nose"]] = 0.03
    ear_len = rng.uniform(0.08, 0.16)
    for side, sz in (("left", 1), ("right", -1)):
        root = head.surface_point([-0.2, -0.8, 0.55 * sz])
        tip_dir = unit(hR @ np.array([-0.2, -1.0, 0.35 * sz]))
        prims.append(segment(root, root + tip_dir * ear_len * 2, [0.06, 0.02], fur, overshoot=1.0))
        kp[_I[f"{side}_ear"]] = root + tip_dir * ear_len * 2
        tol[_I[f"{side}_ear"]] = 0.04
    for side, sz in (("left", 1), ("right", -1)):
        c = head.surface_point([0.55, -0.35, 0.62 * sz])
        prims.append(ellipsoid(c, [0.035, 0.035, 0.035], dark))
        kp[_I[f"{side}_eye"]] = c + (c - head_c) / np.linalg.norm(c - head_c) * 0.02
        tol[_I[f"{side}_eye"]] = 0.03

    # legs: gait phase per leg
    gait = rng.uniform(0, 2 * np.pi)
    amp = rng.uniform(0.0, 0.7)
    for end, sx, joint in (("front", 0.42 * L, "shoulder"), ("back", -0.52 * L, "hip")):
        for side, sz in (("left", 1), ("right", -1)):
            phase = gait + (0 if side == "left" else np.pi) + (0 if end == "front" else np.pi / 2)
            th1 = amp * np.sin(phase) + rng.uniform(-0.15, 0.15)
            bend = rng.uniform(0.05, 0.8) * (1 if end == "front" else -1)
            top = np.array([sx, 0.05, 0.17 * sz * Hb])
            l1, l2 = 0.36 * legl, 0.36 * legl
            abd = rng.uniform(-0.1, 0.15) * sz
            knee = top + l1 * np.array([np.sin(th1), np.cos(th1) * np.cos(abd), np.sin(abd)])
            th2 = th1 - bend
            paw = knee + l2 * np.array([np.sin(th2), np.cos(th2), 0.0])
            t1, t2 = 0.1 * Hb, 0.065 * Hb
            prims.append(segment(top, knee, t1, fur, up_hint=(1, 0, 0)))
            prims.append(segment(knee, paw, t2, fur, up_hint=(1, 0, 0)))
            kp[_I[f"{side}_{end}_{joint}"]] = top
            kp[_I[f"{side}_{end}_knee"]] = knee
            kp[_I[f"{side}_{end}_paw"]] = paw
            tol[_I[f"{side}_{end}_{joint}"]] = 0.2 * Hb
            tol[_I[f"{side}_{end}_knee"]] = 1.3 * t1
            tol[_I[f"{side}_{end}_paw"]] = 1.4 * t2

    # tail
    tb = kp[_I["tail_base"]]
    a1, a2 = rng.uniform(-0.6, 1.2), rng.uniform(-0.8, 0.8)
    tl = rng.uniform(0.25, 0.45)
    mid = tb + tl * unit([-np.cos(a1), -np.sin(a1) * 0.8 + 0.3, np.sin(a2) * 0.5])
    tip = mid + tl * unit([-np.cos(a1 + a2), -np.sin(a1 + a2) * 0.8 + 0.4, np.sin(a2)])
    prims.append(segment(tb, mid, 0.055, fur))
    prims.append(segment(mid, tip, 0.045, fur, overshoot=1.05))
    kp[_I["tail_tip"]] = tip
    tol[_I["tail_tip"]] = 0.07
    tol[_I["tail_base"]] = 0.08
    object_slots = len(prims)

    # centre the object, random pose
    centre = (kp.min(axis=0) + kp.max(axis=0)) / 2
    yaw, elev, roll = rng.uniform(0, 2 * np.pi), np.deg2rad(rng.uniform(-10, 35)), np.deg2rad(rng.uniform(-10, 10))
    R = rot_z(roll) @ rot_x(elev) @ rot_y(yaw)
    f, t = place_object(rng, OBJECT_RADIUS, fill=(0.75, 1.0), shift=0.08)
    t = t - R @ centre
    prims = [p.transformed(R, t) for p in prims]
    kp_cam = kp @ R.T + t
    prims += sample_occluders(rng, f, t[2], OBJECT_RADIUS)
    return Scene(primitives=prims, object_slots=object_slots, keypoints=kp_cam, keypoint_tol=tol, focal=f,
                 object_depth=float((R @ centre + t)[2]), light=sample_light(rng), background=sample_background(rng))
