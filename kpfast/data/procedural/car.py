"""Procedural rigid car with 14 keypoints and self-occlusion.

Object frame: x forward, y down (ground at y = 0), z to the car's left. Lower body
and cabin are boxes (glossy paint, dark glass), wheels are flattened ellipsoids,
head/tail lights small ellipsoids. Keypoints: the four wheel centres (outer hub),
head and tail lights, the four roof corners, front and rear plate. Shape varies
(sedan / hatchback / van proportions, wheel size); seen from any direction,
camera elevation 0..35 deg.
"""

from __future__ import annotations

import numpy as np

from ..meta import KeypointMeta, flip_perm_from_names
from ..skeletons import loop
from .scene import (Material, Scene, box, ellipsoid, place_object, rot_x, rot_y, rot_z, sample_background,
                    sample_light, sample_occluders)

NAMES = ["front_left_wheel", "front_right_wheel", "rear_left_wheel", "rear_right_wheel",
         "left_headlight", "right_headlight", "left_taillight", "right_taillight",
         "front_left_roof", "front_right_roof", "rear_left_roof", "rear_right_roof",
         "front_plate", "rear_plate"]
_I = {n: i for i, n in enumerate(NAMES)}


def _meta() -> KeypointMeta:
    pairs = [("front_left_wheel", "rear_left_wheel"), ("front_right_wheel", "rear_right_wheel"),
             ("front_left_wheel", "front_right_wheel"), ("rear_left_wheel", "rear_right_wheel"),
             ("left_headlight", "front_plate"), ("right_headlight", "front_plate"),
             ("left_taillight", "rear_plate"), ("right_taillight", "rear_plate"),
             ("left_headlight", "front_left_wheel"), ("right_headlight", "front_right_wheel"),
             ("left_taillight", "rear_left_wheel"), ("right_taillight", "rear_right_wheel"),
             ("left_headlight", "front_left_roof"), ("right_headlight", "front_right_roof"),
             ("left_taillight", "rear_left_roof"), ("right_taillight", "rear_right_roof")]
    edges = [(_I[a], _I[b]) for a, b in pairs]
    edges += loop([_I["front_left_roof"], _I["front_right_roof"], _I["rear_right_roof"], _I["rear_left_roof"]])
    parts = {"wheels": [0, 1, 2, 3], "front": [4, 5, 12, 0, 1], "rear": [6, 7, 13, 2, 3], "roof": [8, 9, 10, 11]}
    return KeypointMeta(name="procedural-car", keypoint_names=NAMES, edges=edges, parts=parts,
                        flip_perm=flip_perm_from_names(NAMES), normalizer=None)


META = _meta()
OBJECT_RADIUS = 1.2


def make_scene(rng: np.random.Generator) -> Scene:
    """One random car scene (object + two occluder slots)."""
    paint = np.clip(rng.uniform(0, 1, 3) ** rng.uniform(0.5, 2.0), 0.03, 1)
    body_mat = Material.random(rng, paint, np.clip(paint * 0.8, 0, 1), freq=(0.5, 1.5), strength=0.3,
                               specular=rng.uniform(0.3, 0.8))
    glass = Material(color1=np.array([0.12, 0.15, 0.2]) * rng.uniform(0.6, 1.6), specular=0.9)
    tyre = Material.random(rng, np.array([0.06, 0.06, 0.06]), np.array([0.5, 0.5, 0.52]), freq=(2.5, 2.5),
                           strength=1.0, specular=0.1, n_waves=1)
    tyre.wave_dirs[0] = np.array([0.0, 0.0, 1.0])  # a bright hub ring on the side
    head_mat = Material(color1=np.array([1.0, 0.97, 0.85]), specular=0.8)
    tail_mat = Material(color1=np.array([0.8, 0.05, 0.05]), specular=0.6)
    plate_mat = Material(color1=np.array([0.9, 0.9, 0.85]))

    L = rng.uniform(0.85, 1.1)  # half length
    W = rng.uniform(0.4, 0.5)  # half width
    wr = rng.uniform(0.17, 0.24)  # wheel radius
    clear = rng.uniform(0.05, 0.12)
    body_h = rng.uniform(0.15, 0.22)  # half height of the lower body
    body_y = -(wr + clear + body_h * 0.4)
    cab_h = rng.uniform(0.13, 0.22)
    cab_len = rng.uniform(0.45, 0.8) * L
    cab_x = rng.uniform(-0.25, 0.05) * L
    cab_w = W * rng.uniform(0.78, 0.92)
    body = box([0, body_y, 0], [L, body_h, W], body_mat)
    cab_y = body_y - body_h - cab_h
    cabin = box([cab_x, cab_y, 0], [cab_len, cab_h, cab_w], glass)
    roof = box([cab_x, cab_y - cab_h - 0.012, 0], [cab_len * 0.93, 0.015, cab_w * 0.95], body_mat)
    prims = [body, cabin, roof]
    kp = np.zeros((14, 3))
    tol = np.full(14, 0.03)
    wx = L * rng.uniform(0.58, 0.7)
    for fb, sx in (("front", 1), ("rear", -1)):
        for side, sz in (("left", 1), ("right", -1)):
            c = np.array([sx * wx, -wr, sz * (W - 0.06)])
            prims.append(ellipsoid(c, [wr, wr, 0.1], tyre))
            kp[_I[f"{fb}_{side}_wheel"]] = c + np.array([0, 0, sz * 0.1])
    for side, sz in (("left", 1), ("right", -1)):
        c = np.array([L, body_y - body_h * 0.35, sz * W * 0.68])
        prims.append(ellipsoid(c, [0.04, 0.05, 0.1], head_mat))
        kp[_I[f"{side}_headlight"]] = c + np.array([0.04, 0, 0])
        c = np.array([-L, body_y - body_h * 0.35, sz * W * 0.72])
        prims.append(ellipsoid(c, [0.04, 0.05, 0.09], tail_mat))
        kp[_I[f"{side}_taillight"]] = c + np.array([-0.04, 0, 0])
        for fb, sx in (("front", 1), ("rear", -1)):
            kp[_I[f"{fb}_{side}_roof"]] = roof.point([sx, -1.0, sz])
    for name, sx in (("front_plate", 1), ("rear_plate", -1)):
        c = np.array([sx * L, body_y + body_h * 0.35, 0])
        prims.append(box(c, [0.012, 0.045, 0.14], plate_mat))
        kp[_I[name]] = c + np.array([sx * 0.012, 0, 0])
    object_slots = len(prims)

    centre = np.array([0.0, (cab_y - cab_h) / 2, 0.0])
    yaw, elev, roll = rng.uniform(0, 2 * np.pi), np.deg2rad(rng.uniform(0, 35)), np.deg2rad(rng.uniform(-5, 5))
    R = rot_z(roll) @ rot_x(elev) @ rot_y(yaw)
    f, t = place_object(rng, OBJECT_RADIUS * L, fill=(0.75, 0.95), shift=0.08)
    t = t - R @ centre
    prims = [p.transformed(R, t) for p in prims]
    kp_cam = kp @ R.T + t
    zc = float((R @ centre + t)[2])
    prims += sample_occluders(rng, f, zc, OBJECT_RADIUS)
    return Scene(primitives=prims, object_slots=object_slots, keypoints=kp_cam, keypoint_tol=tol, focal=f,
                 object_depth=zc, light=sample_light(rng), background=sample_background(rng))
