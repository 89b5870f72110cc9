"""Evaluation: NME, PCK@0.1 and per-keypoint errors on a labelled test set.

Conventions (all in the normalized ``[-1, 1]`` coordinates of square images, so
ratios equal pixel ratios):

- **NME** (%): per image, the mean Euclidean error over its *labelled* keypoints
  (``labeled``: annotated, occluded or not, as WFLW/300-W count every landmark)
  divided by the normalizer: the distance between the two ground-truth keypoints
  ``meta.normalizer`` (outer eye corners for faces), or, when the meta has none,
  the longer side of the ground-truth box. The dataset NME is the mean over images.
- **PCK@0.1** (%): the share of *visible* ground-truth keypoints (``visible``; CUB
  and COCO-style protocols score visible parts only) whose error is within
  ``0.1 x`` the longer side of the ground-truth box, pooled over all images.
- **Per keypoint**: the NME and PCK restricted to each keypoint, with counts.

Images whose normalizer is degenerate (below ``1e-6``) are skipped for NME.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from .data import KeypointMeta, collate_samples


def normalizer_distance(keypoints: Tensor, bbox: Tensor, meta: KeypointMeta) -> Tensor:
    """``[B]`` NME normalizer: ground-truth ``meta.normalizer`` distance, or the box's longer side."""
    if meta.normalizer is not None:
        a, b = meta.normalizer
        return (keypoints[:, a] - keypoints[:, b]).norm(dim=-1)
    return box_size(bbox)


def box_size(bbox: Tensor) -> Tensor:
    """``[B]`` longer side of ``bbox [B, 4]`` ``(x0, y0, x1, y1)``."""
    return (bbox[:, 2:] - bbox[:, :2]).abs().max(dim=-1).values


class MetricAccumulator:
    """Accumulates errors batch by batch; :meth:`result` gives the metrics dict.

    Example:
        >>> from kpfast.data import KeypointMeta
        >>> meta = KeypointMeta("toy", ["a", "b"], normalizer=(0, 1))
        >>> acc = MetricAccumulator(meta)
        >>> gt = torch.tensor([[[-0.5, 0.0], [0.5, 0.0]]])
        >>> acc.add(gt + torch.tensor([0.1, 0.0]), gt, torch.ones(1, 2, dtype=torch.bool),
        ...         torch.ones(1, 2, dtype=torch.bool), torch.tensor([[-1.0, -1.0, 1.0, 1.0]]))
        >>> r = acc.result()
        >>> round(r["nme"], 4), r["pck@0.1"]
        (10.0, 100.0)
    """

    def __init__(self, meta: KeypointMeta, pck_threshold: float = 0.1):
        self.meta, self.threshold = meta, pck_threshold
        K = meta.num_keypoints
        self.image_nme: list[Tensor] = []
        self.kp_nme_sum = torch.zeros(K, dtype=torch.float64)
        self.kp_nme_count = torch.zeros(K, dtype=torch.float64)
        self.kp_hit = torch.zeros(K, dtype=torch.float64)
        self.kp_vis = torch.zeros(K, dtype=torch.float64)

    def add(self, pred: Tensor, gt: Tensor, labeled: Tensor, visible: Tensor, bbox: Tensor) -> None:
        """One batch: ``pred, gt [B, K, 2]``, ``labeled, visible [B, K]`` bool, ``bbox [B, 4]``."""
        pred, gt, bbox = pred.detach().double().cpu(), gt.double().cpu(), bbox.double().cpu()
        labeled, visible = labeled.cpu().bool(), visible.cpu().bool() & labeled.cpu().bool()
        err = (pred - gt).norm(dim=-1)  # [B, K]
        norm = normalizer_distance(gt, bbox, self.meta)
        ok = (norm > 1e-6) & labeled.any(-1)
        rel = err / norm.clamp_min(1e-6)[:, None]
        m = labeled & ok[:, None]
        per_image = (rel * m).sum(-1) / m.sum(-1).clamp_min(1)
        self.image_nme.append(per_image[ok])
        self.kp_nme_sum += (rel * m).sum(0)
        self.kp_nme_count += m.sum(0)
        hit = err <= self.threshold * box_size(bbox)[:, None]
        self.kp_hit += (hit & visible).sum(0)
        self.kp_vis += visible.sum(0)

    def result(self) -> dict:
        """``{"nme", "pck@0.1", "images", "per_keypoint": {name: {"nme", "pck", "labeled", "visible"}}}``
        (percentages; None where nothing was counted)."""
        nmes = torch.cat(self.image_nme) if self.image_nme else torch.zeros(0, dtype=torch.float64)
        pct = lambda a, b: None if b == 0 else float(100.0 * a / b)  # noqa: E731
        per = {}
        for k, name in enumerate(self.meta.keypoint_names):
            per[name] = {"nme": pct(self.kp_nme_sum[k], self.kp_nme_count[k]),
                         "pck": pct(self.kp_hit[k], self.kp_vis[k]),
                         "labeled": int(self.kp_nme_count[k]), "visible": int(self.kp_vis[k])}
        key = f"pck@{self.threshold:g}"
        return {"nme": float(100.0 * nmes.mean()) if len(nmes) else None,
                key: pct(self.kp_hit.sum(), self.kp_vis.sum()), "images": int(len(nmes)), "per_keypoint": per}


@torch.no_grad()
def evaluate(predict: Callable[[Tensor], Tensor], dataset, *, meta: Optional[KeypointMeta] = None,
             batch_size: int = 64, device: torch.device | str = "cpu", pck_threshold: float = 0.1) -> dict:
    """Metrics of ``predict`` on ``dataset`` (see the module docstring).

    Args:
        predict: ``images [B, 3, S, S]`` on ``device`` -> keypoints ``[B, K, 2]`` (normalized).
        dataset: a kpfast dataset (items with ``image``, ``keypoints``, ``labeled``,
            ``visible``, ``bbox``).
        meta: defaults to ``dataset.meta``.

    Returns:
        the dict of :meth:`MetricAccumulator.result`.
    """
    meta = meta or dataset.meta
    acc = MetricAccumulator(meta, pck_threshold)
    for start in range(0, len(dataset), batch_size):
        b = collate_samples([dataset[i] for i in range(start, min(len(dataset), start + batch_size))])
        pred = predict(b["image"].to(device))
        acc.add(pred, b["keypoints"], b["labeled"], b["visible"], b["bbox"])
    return acc.result()
