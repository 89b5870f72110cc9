"""Drawing keypoints and skeletons onto images (PIL), and image grids.

Keypoints are in the kpfast convention (normalized ``[-1, 1]``, pixel centres at the
ends). Visible keypoints are drawn as filled dots with a dark outline; occluded
(labeled but not visible) ones as hollow rings; unlabeled ones are skipped.
"""

from __future__ import annotations

import colorsys
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw

from .coords import normalized_to_pixels

__all__ = ["to_pil", "draw_keypoints", "image_grid", "keypoint_colors"]


def to_pil(image) -> Image.Image:
    """``[3, H, W]`` float tensor/array in [0, 1] (or ``[H, W, 3]`` uint8) -> PIL RGB image."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    a = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if a.ndim != 3:
        raise ValueError(f"image must be [3, H, W] or [H, W, 3], got shape {a.shape}")
    if a.shape[0] == 3 and a.shape[-1] != 3:
        a = a.transpose(1, 2, 0)
    if a.dtype != np.uint8:
        a = (np.clip(a, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    return Image.fromarray(np.ascontiguousarray(a), "RGB")


def keypoint_colors(k: int) -> list[tuple[int, int, int]]:
    """``k`` distinct, saturated colours (evenly spaced hues)."""
    return [tuple(int(255 * c) for c in colorsys.hsv_to_rgb(i / max(k, 1), 0.85, 1.0)) for i in range(k)]


def draw_keypoints(image, keypoints, *, edges: Optional[Sequence] = None, visible=None, labeled=None,
                   scale: int = 1, radius: float = 2.0, colors=None, edge_color=(255, 255, 255),
                   line_width: int = 1) -> Image.Image:
    """Draw keypoints and skeleton on an image.

    Args:
        image: ``[3, H, W]`` float in [0, 1] (tensor or array), ``[H, W, 3]`` uint8, or a PIL image.
        keypoints: ``[K, 2]`` normalized ``(x, y)``.
        edges: ``[(i, j), ...]`` or ``[E, 2]`` tensor; drawn as lines (dashed look: thinner
            and darker when either end is occluded).
        visible: ``[K]`` bool; ``False`` draws a hollow ring (default: all visible).
        labeled: ``[K]`` bool; unlabeled keypoints and their edges are skipped.
        scale: integer upscaling before drawing (nearest neighbour), for legible small images.
        colors: per-keypoint RGB tuples (default: :func:`keypoint_colors`).

    Returns:
        A new PIL image of size ``(W * scale, H * scale)``.

    Example:
        >>> import torch
        >>> im = draw_keypoints(torch.zeros(3, 32, 32), torch.tensor([[0.0, 0.0], [0.5, -0.5]]),
        ...                     edges=[(0, 1)], visible=torch.tensor([True, False]), scale=2)
        >>> im.size
        (64, 64)
    """
    pil = to_pil(image)
    w, h = pil.size
    if scale != 1:
        pil = pil.resize((w * scale, h * scale), Image.NEAREST)
    kp = keypoints.detach().cpu().double() if isinstance(keypoints, torch.Tensor) else torch.as_tensor(
        np.asarray(keypoints, dtype=np.float64))
    if kp.ndim != 2 or kp.shape[1] != 2:
        raise ValueError(f"keypoints must be [K, 2], got shape {tuple(kp.shape)}")
    k = kp.shape[0]
    vis = np.ones(k, bool) if visible is None else np.asarray(torch.as_tensor(visible).cpu(), dtype=bool)
    lab = np.ones(k, bool) if labeled is None else np.asarray(torch.as_tensor(labeled).cpu(), dtype=bool)
    if vis.shape != (k,) or lab.shape != (k,):
        raise ValueError(f"visible/labeled must have shape [{k}], got {vis.shape} and {lab.shape}")
    px = normalized_to_pixels(kp, (h, w)).numpy()
    px = (px + 0.5) * scale - 0.5  # pixel centres of the upscaled image
    colors = keypoint_colors(k) if colors is None else colors
    d = ImageDraw.Draw(pil)
    if edges is not None:
        e = edges.tolist() if isinstance(edges, torch.Tensor) else list(edges)
        for a, b in e:
            if not (lab[a] and lab[b]):
                continue
            both = vis[a] and vis[b]
            col = tuple(edge_color) if both else tuple(int(c * 0.55) for c in edge_color)
            d.line([tuple(px[a]), tuple(px[b])], fill=col, width=line_width if both else max(1, line_width - 1) or 1)
    r = radius
    for i in range(k):
        if not lab[i]:
            continue
        x, y = px[i]
        if vis[i]:
            d.ellipse((x - r, y - r, x + r, y + r), fill=colors[i], outline=(0, 0, 0))
        else:
            d.ellipse((x - r, y - r, x + r, y + r), outline=colors[i], width=max(1, int(r / 2)))
    return pil


def image_grid(images: Sequence[Image.Image], cols: int, pad: int = 2, fill=(255, 255, 255)) -> Image.Image:
    """Tile PIL images (all the same size) into a grid with ``cols`` columns."""
    if not images:
        raise ValueError("image_grid needs at least one image")
    w, h = images[0].size
    rows = (len(images) + cols - 1) // cols
    out = Image.new("RGB", (cols * w + (cols + 1) * pad, rows * h + (rows + 1) * pad), fill)
    for i, im in enumerate(images):
        r, c = divmod(i, cols)
        out.paste(im, (pad + c * (w + pad), pad + r * (h + pad)))
    return out
