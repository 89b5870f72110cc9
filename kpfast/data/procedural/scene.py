"""Scene description of one procedural sample (numpy, float64, per sample).

A scene is a fixed list of primitive *slots* (same order and kinds for every sample
of a category, so a batch can be ray-cast slot by slot), each an ellipsoid or a box
in camera space, plus the 3D keypoints, lighting and background parameters.

Camera: pinhole at the origin looking down +Z, image x to the right and y down.
A camera-space point ``(X, Y, Z)`` projects to normalized image coordinates
``(f X / Z, f Y / Z)`` (``f`` = focal length in normalized units), which is exactly
the ``align_corners=True`` keypoint convention, so the ray through normalized image
point ``(x, y)`` is ``t * (x / f, y / f, 1)`` with ``t`` = camera-space depth ``Z``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np

ELLIPSOID, BOX = 0, 1

# number of triangle-wave terms of the procedural textures
N_WAVES = 2


def rot_x(a: float) -> np.ndarray:
    c, s = np.cos(a), np.sin(a)
    return np.array([[1, 0, 0], [0, c, -s], [0, s, c]], dtype=np.float64)


def rot_y(a: float) -> np.ndarray:
    c, s = np.cos(a), np.sin(a)
    return np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]], dtype=np.float64)


def rot_z(a: float) -> np.ndarray:
    c, s = np.cos(a), np.sin(a)
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]], dtype=np.float64)


def frame_from_axis(axis: np.ndarray, up_hint=(0.0, 0.0, 1.0)) -> np.ndarray:
    """Rotation whose first column is ``axis`` (normalized); the others complete a
    right-handed frame, the second as close to ``up_hint`` x axis as possible."""
    a = np.asarray(axis, dtype=np.float64)
    a = a / max(np.linalg.norm(a), 1e-12)
    h = np.asarray(up_hint, dtype=np.float64)
    if abs(float(a @ h)) > 0.95:
        h = np.array([0.0, 1.0, 0.0]) if abs(a[1]) < 0.9 else np.array([1.0, 0.0, 0.0])
    b = np.cross(h, a)
    b /= np.linalg.norm(b)
    c = np.cross(a, b)
    return np.stack([a, b, c], axis=1)


def unit(v) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64)
    return v / np.linalg.norm(v)


@dataclass
class Material:
    """Albedo ``color1`` blended towards ``color2`` by a sum of triangle waves of the
    primitive's local coordinates; ``specular`` scales a Blinn-Phong highlight."""

    color1: np.ndarray
    color2: Optional[np.ndarray] = None
    wave_dirs: np.ndarray = field(default_factory=lambda: np.zeros((N_WAVES, 3)))
    wave_freq: np.ndarray = field(default_factory=lambda: np.zeros(N_WAVES))
    wave_phase: np.ndarray = field(default_factory=lambda: np.zeros(N_WAVES))
    wave_weight: np.ndarray = field(default_factory=lambda: np.zeros(N_WAVES))
    specular: float = 0.0

    @staticmethod
    def random(rng: np.random.Generator, color1, color2=None, *, freq=(1.0, 6.0), strength=1.0, specular=0.0,
               n_waves: int = N_WAVES) -> "Material":
        dirs = rng.normal(size=(N_WAVES, 3))
        dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
        f = rng.uniform(freq[0], freq[1], size=N_WAVES)
        w = rng.uniform(0.2, 1.0, size=N_WAVES) * strength
        w[n_waves:] = 0.0
        return Material(color1=np.asarray(color1, float), color2=None if color2 is None else np.asarray(color2, float),
                        wave_dirs=dirs, wave_freq=f, wave_phase=rng.uniform(0, 1, size=N_WAVES),
                        wave_weight=w, specular=float(specular))


@dataclass
class Primitive:
    """An ellipsoid (``size`` = radii) or box (``size`` = half extents) in camera
    space, rotated by ``R`` (columns = the primitive's local axes) about ``center``."""

    kind: int
    R: np.ndarray
    center: np.ndarray
    size: np.ndarray
    material: Material
    active: bool = True

    def point(self, local) -> np.ndarray:
        """Camera-space point at local coordinates (in units of ``size``): for an
        ellipsoid a unit vector gives a surface point."""
        return self.center + self.R @ (np.asarray(local, float) * self.size)

    def surface_point(self, direction) -> np.ndarray:
        """Ellipsoid surface point in local direction ``direction`` (normalized here)."""
        return self.point(unit(direction))

    def transformed(self, R: np.ndarray, t: np.ndarray) -> "Primitive":
        return Primitive(self.kind, R @ self.R, R @ self.center + t, self.size.copy(), self.material, self.active)


def ellipsoid(center, radii, material: Material, R=None) -> Primitive:
    return Primitive(ELLIPSOID, np.eye(3) if R is None else np.asarray(R, float), np.asarray(center, float),
                     np.asarray(radii, float), material)


def box(center, half, material: Material, R=None) -> Primitive:
    return Primitive(BOX, np.eye(3) if R is None else np.asarray(R, float), np.asarray(center, float),
                     np.asarray(half, float), material)


def segment(a, b, thickness, material: Material, overshoot: float = 1.15, up_hint=(0.0, 0.0, 1.0)) -> Primitive:
    """Elongated ellipsoid from 3D point ``a`` to ``b`` (a limb); ``thickness`` is
    a radius or a pair of radii across the limb."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    length = np.linalg.norm(b - a)
    th = np.broadcast_to(np.asarray(thickness, float), (2,))
    return ellipsoid((a + b) / 2, [max(length / 2 * overshoot, th[0]), th[0], th[1]], material,
                     R=frame_from_axis(b - a, up_hint))


@dataclass
class Light:
    direction: np.ndarray  # unit vector from the surface towards the light (camera space)
    ambient: float
    diffuse: float
    tint: np.ndarray  # [3] light colour


@dataclass
class Background:
    """Low-frequency colour noise (``grid`` [3, g, g] upsampled), a grating and flat
    shapes (ellipses / rectangles) with random colours, plus sensor noise."""

    grid: np.ndarray
    grating_dir: np.ndarray
    grating_freq: float
    grating_amp: float
    shapes: np.ndarray  # [n_shapes, 10]: active, kind, cx, cy, rx, ry, angle, r, g, b
    noise_sigma: float
    noise_seed: int


@dataclass
class Scene:
    """Everything the renderer needs for one sample."""

    primitives: list  # list[Primitive], slot order fixed per category
    object_slots: int  # the first ``object_slots`` primitives are the object, the rest occluders
    keypoints: np.ndarray  # [K, 3] camera space
    keypoint_tol: np.ndarray  # [K] visibility depth tolerance (camera units)
    focal: float
    object_depth: float  # Z of the object's origin
    light: Light
    background: Background


def sample_light(rng: np.random.Generator) -> Light:
    """Random light from the camera's hemisphere (up to ~70 deg off axis)."""
    theta = rng.uniform(0, 2 * np.pi)
    off = rng.uniform(0.1, 1.2)
    d = unit([np.sin(off) * np.cos(theta), np.sin(off) * np.sin(theta) - 0.3, -np.cos(off)])
    tint = np.clip(1.0 + rng.normal(0, 0.08, size=3), 0.8, 1.2)
    return Light(direction=d, ambient=rng.uniform(0.2, 0.45), diffuse=rng.uniform(0.6, 1.0), tint=tint)


def sample_background(rng: np.random.Generator, n_shapes: int = 8, grid: int = 5) -> Background:
    """Textured clutter: smooth colour field, a grating, random flat shapes, noise."""
    base = rng.uniform(0.1, 0.9, size=3)
    g = np.clip(base[:, None, None] + rng.normal(0, 0.22, size=(3, grid, grid)), 0, 1)
    shapes = np.zeros((n_shapes, 10))
    for i in range(n_shapes):
        shapes[i] = [rng.uniform() < 0.7, rng.integers(0, 2), rng.uniform(-1.1, 1.1), rng.uniform(-1.1, 1.1),
                     rng.uniform(0.05, 0.5), rng.uniform(0.05, 0.5), rng.uniform(0, np.pi), *rng.uniform(0, 1, size=3)]
    ang = rng.uniform(0, np.pi)
    return Background(grid=g, grating_dir=np.array([np.cos(ang), np.sin(ang)]), grating_freq=rng.uniform(2, 12),
                      grating_amp=rng.uniform(0, 0.15), shapes=shapes, noise_sigma=rng.uniform(0.0, 0.03),
                      noise_seed=int(rng.integers(0, 2**30)))


def sample_occluders(rng: np.random.Generator, focal: float, object_depth: float, object_radius: float,
                     p: float = 0.35) -> list:
    """Two occluder slots (an ellipsoid, a box), each active with probability ``p``,
    floating between the camera and the object, over the object's image region."""
    out = []
    for kind in (ELLIPSOID, BOX):
        z = object_depth * rng.uniform(0.55, 0.8)
        # image position near the object, so it covers part of it
        ix, iy = rng.uniform(-0.7, 0.7, size=2)
        c = np.array([ix * z / focal, iy * z / focal, z])
        s = object_radius * (z / object_depth) * rng.uniform(0.12, 0.45, size=3)
        R = rot_z(rng.uniform(0, np.pi)) @ rot_x(rng.uniform(0, np.pi)) @ rot_y(rng.uniform(0, np.pi))
        col1, col2 = rng.uniform(0, 1, size=3), rng.uniform(0, 1, size=3)
        mat = Material.random(rng, col1, col2, freq=(1, 4), strength=rng.uniform(0, 1), specular=rng.uniform(0, 0.3))
        prim = Primitive(kind, R, c, s, mat, active=bool(rng.uniform() < p))
        out.append(prim)
    return out


def place_object(rng: np.random.Generator, object_radius: float, *, fill=(0.55, 0.8), shift: float = 0.12,
                 fov_deg=(28.0, 55.0)) -> tuple[float, np.ndarray]:
    """Random focal length and object origin so the object's radius spans ``fill``
    of the half image and its centre lies within ``shift`` of the image centre."""
    fov = np.deg2rad(rng.uniform(*fov_deg))
    f = 1.0 / np.tan(fov / 2)
    z = f * object_radius / rng.uniform(*fill)
    ix, iy = rng.uniform(-shift, shift, size=2)
    return f, np.array([ix * z / f, iy * z / f, z])
