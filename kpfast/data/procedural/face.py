"""Procedural face: a soft, mostly rigid 3D head with the 68-point iBUG markup.

Built from ellipsoids in an object frame (x to the subject's left = image right in
a frontal view, y down, z away from the camera; the face looks towards -z):
cranium + lower face (the skin), neck, shoulders, hair, ears, eye whites, irises,
brows, nose ridge and tip, lips and the mouth interior. Expressions: mouth opening
(the lower lip and the jaw drop), brow raise, mouth width (smile), eye openness.
Landmarks are points on those surfaces (jaw contour: on the skin, just inside the
frontal silhouette), so their visibility comes from the same z-buffer as the
pixels. Pose: yaw up to +-60 deg, pitch +-25 deg, roll +-20 deg.
"""

from __future__ import annotations

import numpy as np

from ..skeletons import face68_meta
from .scene import (Material, Scene, ellipsoid, place_object, rot_x, rot_y, rot_z, sample_background,
                    sample_light, sample_occluders)

META = face68_meta("procedural-face")
OBJECT_RADIUS = 1.15
TOL = 0.035  # visibility tolerance (object units)


def _front_z(c, r, x, y):
    """Front (smallest z) surface of an axis-aligned ellipsoid at (x, y); +inf if outside."""
    q = 1.0 - ((x - c[0]) / r[0]) ** 2 - ((y - c[1]) / r[1]) ** 2
    return c[2] - r[2] * np.sqrt(q) if q >= 0 else np.inf


def _radial(c, r, o, d):
    """Distance from interior point ``o`` along unit 2D direction ``d`` to the ellipse (c, r) in xy."""
    ox, oy = (o[0] - c[0]) / r[0], (o[1] - c[1]) / r[1]
    dx, dy = d[0] / r[0], d[1] / r[1]
    a = dx * dx + dy * dy
    b = ox * dx + oy * dy
    cc = ox * ox + oy * oy - 1.0
    return (-b + np.sqrt(max(b * b - a * cc, 0.0))) / a


def _skin_color(rng):
    t = rng.uniform(0, 1)
    dark, light = np.array([0.36, 0.22, 0.15]), np.array([0.97, 0.80, 0.68])
    return np.clip(dark + (light - dark) * t + rng.normal(0, 0.03, size=3), 0, 1)


def make_scene(rng: np.random.Generator) -> Scene:
    """One random face scene (object + two occluder slots)."""
    W = rng.uniform(0.9, 1.08)  # head width
    H = rng.uniform(0.93, 1.07)  # head height
    jw = rng.uniform(0.82, 1.08)  # jaw width
    mouth_open = 0.0 if rng.uniform() < 0.45 else rng.uniform(0.02, 0.22)
    brow_raise = rng.uniform(0.0, 0.07)
    smile = rng.uniform(0.0, 1.0)
    eye_open = rng.uniform(0.55, 1.15)

    skin = _skin_color(rng)
    skin_mat = Material.random(rng, skin, np.clip(skin * rng.uniform(0.9, 0.98), 0, 1), freq=(3, 9),
                               strength=rng.uniform(0.1, 0.5), specular=rng.uniform(0.03, 0.15), n_waves=2)
    hair_col = np.clip(np.array([0.25, 0.17, 0.1]) * rng.uniform(0.2, 3.2) + rng.normal(0, 0.03, 3), 0, 1)
    hair_mat = Material.random(rng, hair_col, hair_col * 0.6, freq=(6, 14), strength=1.0, specular=0.1, n_waves=2)
    brow_mat = Material(color1=np.clip(hair_col * rng.uniform(0.5, 0.9), 0, 1))
    lip_col = np.clip(skin * np.array([0.95, 0.62, 0.62]) + np.array([0.08, 0.0, 0.02]), 0, 1)
    lip_mat = Material(color1=lip_col, specular=0.25)
    white_mat = Material(color1=np.array([0.93, 0.91, 0.88]) * rng.uniform(0.85, 1.0), specular=0.5)
    iris_col = [np.array([0.30, 0.18, 0.08]), np.array([0.25, 0.40, 0.60]), np.array([0.30, 0.42, 0.25]),
                np.array([0.12, 0.08, 0.05])][rng.integers(0, 4)]
    iris_mat = Material(color1=iris_col, specular=0.6)
    mouth_mat = Material(color1=np.array([0.35, 0.08, 0.08]) * rng.uniform(0.5, 1.0))
    cloth = rng.uniform(0, 1, 3)
    cloth_mat = Material.random(rng, cloth, rng.uniform(0, 1, 3), freq=(1, 5), strength=rng.uniform(0, 1))

    # skin: cranium and lower face (axis-aligned)
    cr_c, cr_r = np.array([0.0, -0.25, 0.15]), np.array([0.78 * W, 0.95 * H, 0.9])
    jaw_c = np.array([0.0, 0.25 * H + 0.35 * mouth_open, 0.05])
    jaw_r = np.array([0.62 * W * jw, 0.62 * H, 0.72])

    def skin_z(x, y):
        return min(_front_z(cr_c, cr_r, x, y), _front_z(jaw_c, jaw_r, x, y))

    prims = []
    prims.append(ellipsoid(cr_c, cr_r, skin_mat))
    prims.append(ellipsoid(jaw_c, jaw_r, skin_mat))
    prims.append(ellipsoid([0, 0.95, 0.4], [0.38 * W, 0.65, 0.38], skin_mat))  # neck
    prims.append(ellipsoid([0, 1.85, 0.55], [1.45 * W, 0.6, 0.65], cloth_mat))  # shoulders
    hair = ellipsoid([0, rng.uniform(-0.6, -0.38), rng.uniform(0.28, 0.45)],
                     [0.84 * W * rng.uniform(1.0, 1.08), 0.86 * H * rng.uniform(1.0, 1.1), 0.95], hair_mat)
    hair.active = bool(rng.uniform() < 0.88)
    prims.append(hair)
    for sx in (-1, 1):  # ears
        prims.append(ellipsoid([sx * 0.76 * W, -0.08, 0.22], [0.09, 0.2, 0.14], skin_mat, R=rot_y(sx * 0.5)))

    # eyes
    ex, ey = 0.3 * W * rng.uniform(0.93, 1.07), -0.17 + rng.uniform(-0.03, 0.03)
    er = np.array([0.125, 0.06 * eye_open, 0.06]) * rng.uniform(0.9, 1.1)
    eyes = []
    for sx in (-1, 1):
        z = skin_z(sx * ex, ey)
        eyes.append(ellipsoid([sx * ex, ey, z + 0.03], er, white_mat))
    prims.extend(eyes)
    gaze = rng.uniform(-1, 1, size=2)
    for e in eyes:
        front = e.center[2] - e.size[2]
        ir = min(0.05, er[1] * 0.95)
        prims.append(ellipsoid([e.center[0] + gaze[0] * 0.045, e.center[1] + gaze[1] * 0.01, front + 0.012],
                               [0.05, ir, 0.02], iris_mat))
    # brows
    brows = []
    by = ey - 0.15 - brow_raise
    for sx in (-1, 1):
        bx = sx * ex * 1.03
        z = skin_z(bx, by)
        brows.append(ellipsoid([bx, by, z + 0.01], [0.17, 0.032, 0.045], brow_mat,
                               R=rot_y(sx * 0.35) @ rot_z(sx * rng.uniform(0.05, 0.3))))
    prims.extend(brows)
    # nose
    nl = rng.uniform(0.9, 1.1)
    nw = rng.uniform(0.85, 1.2)
    ridge_c = np.array([0.0, -0.02 * nl, skin_z(0, -0.02) - 0.045])
    ridge = ellipsoid(ridge_c, [0.065 * nw, 0.24 * nl, 0.11], skin_mat, R=rot_x(-0.25))
    tip_y = 0.19 * nl
    tip = ellipsoid([0, tip_y, skin_z(0, tip_y) - 0.07], [0.15 * nw, 0.085, 0.12], skin_mat)
    prims += [ridge, tip]
    # mouth
    my = 0.45 * H
    mw = rng.uniform(0.85, 1.05) * (1 + 0.18 * smile)
    zm = skin_z(0, my + 0.03)
    upper = ellipsoid([0, my, zm - 0.015], [0.23 * mw, 0.045, 0.08], lip_mat)
    lower = ellipsoid([0, my + 0.085 + mouth_open, skin_z(0, my + 0.09 + mouth_open) - 0.01],
                      [0.2 * mw, 0.05, 0.08], lip_mat)
    inner = ellipsoid([0, my + 0.04 + mouth_open / 2, zm + 0.0], [0.2 * mw, 0.04 + mouth_open / 2, 0.045], mouth_mat)
    prims += [upper, lower, inner]
    object_slots = len(prims)

    # landmarks (object frame)
    kp = np.zeros((68, 3))
    # contour: just inside the frontal silhouette of the skin, from the right ear (image left) round the chin
    o = np.array([0.0, ey + 0.05])
    for i in range(17):
        phi = np.pi * i / 16
        d = np.array([-np.cos(phi), np.sin(phi)])
        # the union's silhouette: the cranium near the ears, the jaw at the chin; stay 6 % inside it
        rad = max(_radial(cr_c, cr_r, o, d), _radial(jaw_c, jaw_r, o, d))
        x, y = o + 0.94 * rad * d
        kp[i] = [x, y, skin_z(x, y)]
    for j, s in enumerate(np.linspace(-0.9, 0.9, 5)):
        kp[17 + j] = brows[0].surface_point([s, -0.5, -0.8])
        kp[22 + j] = brows[1].surface_point([s, -0.5, -0.8])
    for j, s in enumerate([-0.8, -0.4, 0.0]):
        kp[27 + j] = ridge.surface_point([0, s, -1])
    kp[30] = tip.surface_point([0, -0.1, -1])
    for j, s in enumerate([-0.95, -0.5, 0.0, 0.5, 0.95]):
        kp[31 + j] = tip.surface_point([s, 0.75 - 0.15 * abs(s), -0.45])
    el, er_ = eyes
    eye_dirs = [[-1, 0, -0.35], [-0.45, -0.8, -0.5], [0.45, -0.8, -0.5], [1, 0, -0.35], [0.45, 0.8, -0.5], [-0.45, 0.8, -0.5]]
    for j, d in enumerate(eye_dirs):
        kp[36 + j] = el.surface_point(d)
        kp[42 + j] = er_.surface_point(d)
    kp[48] = upper.surface_point([-1, 0.3, -0.25])
    for j, s in enumerate([-0.66, -0.33, 0.0, 0.33, 0.66]):
        kp[49 + j] = upper.surface_point([s, -0.75, -0.6])
    kp[54] = upper.surface_point([1, 0.3, -0.25])
    for j, s in enumerate([0.66, 0.33, 0.0, -0.33, -0.66]):
        kp[55 + j] = lower.surface_point([s, 0.75, -0.6])
    kp[60] = upper.surface_point([-0.85, 0.5, -0.3])
    for j, s in enumerate([-0.4, 0.0, 0.4]):
        kp[61 + j] = upper.surface_point([s, 0.7, -0.7])
    kp[64] = upper.surface_point([0.85, 0.5, -0.3])
    for j, s in enumerate([0.4, 0.0, -0.4]):
        kp[65 + j] = lower.surface_point([s, -0.7, -0.7])

    # pose and camera
    yaw, pitch, roll = np.deg2rad(rng.uniform(-60, 60)), np.deg2rad(rng.uniform(-25, 25)), np.deg2rad(rng.uniform(-20, 20))
    R = rot_z(roll) @ rot_x(pitch) @ rot_y(yaw)
    f, t = place_object(rng, OBJECT_RADIUS, fill=(0.8, 1.05), shift=0.1)
    prims = [p.transformed(R, t) for p in prims]
    kp_cam = kp @ R.T + t
    prims += sample_occluders(rng, f, t[2], OBJECT_RADIUS)
    return Scene(primitives=prims, object_slots=object_slots, keypoints=kp_cam, keypoint_tol=np.full(68, TOL),
                 focal=f, object_depth=float(t[2]), light=sample_light(rng), background=sample_background(rng))
