"""Procedural keypoint benchmark: 3D objects ray-cast in torch with exact 2D/3D labels.

Categories: ``face`` (68 iBUG landmarks), ``animal`` (20-joint quadruped), ``car``
(14 keypoints). Use :func:`kpfast.data.open_dataset` (``open_dataset("face")``) or
:func:`procedural_dataset`. ``depth`` of a keypoint is ``(Z_k - Z_o) * f / Z_o``:
its camera depth relative to the object's origin ``Z_o``, scaled by the focal length
over ``Z_o`` so that one unit of depth is one unit of normalized image coordinates
at the object's distance (``(x, y, depth)`` is a near-isotropic 3D shape).
"""

from .generate import CATEGORIES, GENERATOR_VERSION, generate_arrays, procedural_dataset, render_samples

__all__ = ["CATEGORIES", "GENERATOR_VERSION", "generate_arrays", "procedural_dataset", "render_samples"]
