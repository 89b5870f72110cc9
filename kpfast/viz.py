"""Pictures of a run: predictions with skeleton and uncertainty, edge maps, reconstructions, heatmaps,
discovered landmarks.

Drawing is :mod:`kpfast.data.draw`; this module only lays the pictures out.
Keypoint colours encode the predicted certainty ``sigmoid(v)`` (the edge map's
intensity): green = certain, red = uncertain.
"""

from __future__ import annotations

from typing import Optional

import torch
from PIL import Image
from torch import Tensor

from .data import KeypointMeta
from .data.draw import draw_keypoints, image_grid, to_pil


def certainty_colors(certainty: Tensor) -> list[tuple[int, int, int]]:
    """RGB per keypoint from ``certainty [K]`` in [0, 1]: red (0) -> yellow -> green (1).

    Example:
        >>> import torch
        >>> certainty_colors(torch.tensor([0.0, 1.0]))
        [(255, 0, 0), (0, 255, 0)]
    """
    c = certainty.detach().float().clamp(0, 1).cpu()
    r = (2 * (1 - c)).clamp(0, 1)
    g = (2 * c).clamp(0, 1)
    return [(int(round(255 * float(a))), int(round(255 * float(b))), 0) for a, b in zip(r, g)]


def _scale_for(size: int) -> int:
    return max(1, 192 // size)


def prediction_sheet(images: Tensor, keypoints: Tensor, meta: KeypointMeta, *, certainty: Optional[Tensor] = None,
                     ground_truth: Optional[Tensor] = None, cols: int = 8) -> Image.Image:
    """Predicted keypoints and skeleton on each image (and the ground truth beside it if given).

    ``images [B, 3, S, S]`` in [0, 1], ``keypoints [B, K, 2]`` normalized, ``certainty [B, K]``
    in [0, 1] (colours, see :func:`certainty_colors`), ``ground_truth [B, K, 2]``.
    """
    scale = _scale_for(images.shape[-1])
    tiles = []
    for i in range(images.shape[0]):
        colors = certainty_colors(certainty[i]) if certainty is not None else None
        tiles.append(draw_keypoints(images[i], keypoints[i], edges=meta.edges, scale=scale, colors=colors,
                                    radius=max(1.5, scale)))
        if ground_truth is not None:
            tiles.append(draw_keypoints(images[i], ground_truth[i], edges=meta.edges, scale=scale,
                                        radius=max(1.5, scale)))
    return image_grid(tiles, cols=cols * (2 if ground_truth is not None else 1) if len(tiles) > cols else len(tiles))


def _gray(m: Tensor) -> Tensor:
    """``[H, W]`` map -> ``[3, H, W]`` scaled to its max."""
    m = m.detach().float().cpu()
    return (m / m.max().clamp_min(1e-8)).expand(3, *m.shape)


def reconstruction_sheet(images: Tensor, masked: Tensor, edge_maps: Tensor, reconstructions: Tensor,
                         *, rows: int = 8) -> Image.Image:
    """One row per image: original | masked input | edge map (scaled to its max) | reconstruction."""
    scale = _scale_for(images.shape[-1])
    tiles = []
    for i in range(min(rows, images.shape[0])):
        for im in (images[i], masked[i], _gray(edge_maps[i, 0]), reconstructions[i]):
            p = to_pil(im)
            tiles.append(p.resize((p.width * scale, p.height * scale), Image.NEAREST))
    return image_grid(tiles, cols=4)


def edge_map_sheet(edge_maps: Tensor, *, cols: int = 8) -> Image.Image:
    """The edge maps alone (each scaled to its max)."""
    scale = _scale_for(edge_maps.shape[-1])
    tiles = []
    for m in edge_maps[:, 0]:
        p = to_pil(_gray(m))
        tiles.append(p.resize((p.width * scale, p.height * scale), Image.NEAREST))
    return image_grid(tiles, cols=min(cols, len(tiles)))


def heatmap_sheet(images: Tensor, heatmaps: Tensor, truth: Optional[Tensor] = None, *, rows: int = 8) -> Image.Image:
    """One row per image: the image | its heatmaps | the ground-truth heatmaps (if given).

    ``images [B, 3, S, S]`` in [0, 1], ``heatmaps``/``truth [B, K, h, w]``: the maximum over the
    keypoints, clipped to [0, 1] (unit-peak Gaussian targets), upsampled to the image and drawn
    in red over its grey version.
    """
    import torch.nn.functional as F

    scale = _scale_for(images.shape[-1])
    size = tuple(images.shape[-2:])

    def overlay(image: Tensor, maps: Tensor) -> Tensor:
        heat = F.interpolate(maps.detach().float().amax(0, keepdim=True)[None].clamp(0, 1), size=size,
                             mode="bilinear", align_corners=True)[0]
        grey = image.float().mean(0, keepdim=True).expand(3, -1, -1) * 0.6
        red = heat.new_tensor([1.0, 0.15, 0.0]).view(3, 1, 1)
        return grey * (1 - heat) + red * heat

    tiles = []
    for i in range(min(rows, images.shape[0])):
        columns = [images[i].float(), overlay(images[i], heatmaps[i])]
        if truth is not None:
            columns.append(overlay(images[i], truth[i]))
        for im in columns:
            p = to_pil(im.cpu())
            tiles.append(p.resize((p.width * scale, p.height * scale), Image.NEAREST))
    return image_grid(tiles, cols=3 if truth is not None else 2)


def landmark_sheet(images: Tensor, landmarks: Tensor, *, cols: int = 8) -> Image.Image:
    """Discovered landmarks ``[B, K, 2]`` on ``images [B, 3, S, S]``, one fixed colour per landmark
    (:func:`kpfast.data.draw.keypoint_colors`), no skeleton."""
    from .data.draw import keypoint_colors

    scale = _scale_for(images.shape[-1])
    colors = keypoint_colors(landmarks.shape[1])
    tiles = [draw_keypoints(images[i], landmarks[i], scale=scale, colors=colors, radius=max(1.5, scale))
             for i in range(images.shape[0])]
    return image_grid(tiles, cols=min(cols, len(tiles)))


def heatmap_overlay(image: Tensor, heatmaps: Tensor) -> Tensor:
    """``image [3, S, S]`` darkened, with the maximum over keypoints of ``heatmaps [K, h, w]`` (clamped
    to [0, 1], resized to ``S``) in red and yellow on top: ``[3, S, S]`` in [0, 1]."""
    import torch.nn.functional as F

    heat = heatmaps.detach().float().cpu().clamp(0, 1).amax(0, keepdim=True)[None]
    heat = F.interpolate(heat, size=tuple(image.shape[-2:]), mode="bilinear", align_corners=True)[0, 0]
    color = torch.stack([heat.sqrt(), heat, torch.zeros_like(heat)])  # red where faint, yellow at the peaks
    return (0.45 * image.detach().float().cpu() + color).clamp(0, 1)


def reconstruction_heatmap_sheet(images: Tensor, reconstructions: Tensor, heatmaps: Tensor,
                                 *, rows: int = 8) -> Image.Image:
    """One row per image: original | reconstruction | predicted heatmaps (their maximum over keypoints,
    grey, clamped to [0, 1]) | the heatmaps over the image (:func:`heatmap_overlay`).

    ``images, reconstructions [B, 3, S, S]`` in [0, 1]; ``heatmaps [B, K, h, w]``."""
    import torch.nn.functional as F

    scale = _scale_for(images.shape[-1])
    tiles = []
    for i in range(min(rows, images.shape[0])):
        heat = heatmaps[i].detach().float().cpu().clamp(0, 1).amax(0)[None, None]
        heat = F.interpolate(heat, size=tuple(images.shape[-2:]), mode="nearest")[0, 0]
        for im in (images[i], reconstructions[i], heat.expand(3, *heat.shape), heatmap_overlay(images[i], heatmaps[i])):
            p = to_pil(im)
            tiles.append(p.resize((p.width * scale, p.height * scale), Image.NEAREST))
    return image_grid(tiles, cols=4)


def save(picture: Image.Image, path) -> None:
    """Write a PNG (creating the directory)."""
    from pathlib import Path

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    picture.save(path)


__all__ = ["certainty_colors", "prediction_sheet", "reconstruction_sheet", "edge_map_sheet", "heatmap_sheet",
           "landmark_sheet", "heatmap_overlay", "reconstruction_heatmap_sheet", "save"]
