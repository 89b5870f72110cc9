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
- **Spread** (ratio): per image, the RMS distance of the predicted labelled keypoints
  from their centroid divided by the same for the ground truth, averaged over
  images. 1 for a detector that keeps the object's extent; keypoints collapsing
  onto the object's centre drive it toward 0 while the NME of a compact object
  can still look fine, so it is reported beside NME and PCK (a run whose spread
  falls below :data:`COLLAPSE_SPREAD` is flagged as collapsed).
- **Per keypoint**: the NME and PCK restricted to each keypoint, with counts.

:func:`shape_baselines` scores two predictors that see no image, to put the
numbers in scale: the mean labelled training shape, and that shape placed on each
test image by the similarity transform that fits it best to the truth (an oracle
placement: what a perfect detector of position, size and in-plane rotation
would score with a fixed shape).

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


COLLAPSE_SPREAD = 0.5
"""A test spread below this ratio marks the predictions as collapsed."""


def spread(keypoints: Tensor, mask: Tensor) -> Tensor:
    """``[B]`` RMS distance of the ``mask``-ed keypoints ``[B, K, 2]`` from their centroid."""
    m = mask.to(keypoints.dtype)[..., None]
    n = m.sum(1).clamp_min(1)
    centre = (keypoints * m).sum(1, keepdim=True) / n[:, None]
    return (((keypoints - centre) * m).pow(2).sum((1, 2)) / n[:, 0]).sqrt()


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
        self.spread_ratio: list[Tensor] = []

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
        true_spread = spread(gt, labeled)
        has = (labeled.sum(-1) >= 2) & (true_spread > 1e-6)
        self.spread_ratio.append((spread(pred, labeled) / true_spread.clamp_min(1e-6))[has])

    def result(self) -> dict:
        """``{"nme", "pck@0.1", "spread", "images", "per_keypoint": {name: {"nme", "pck", "labeled",
        "visible"}}}`` (percentages, spread a ratio; None where nothing was counted)."""
        nmes = torch.cat(self.image_nme) if self.image_nme else torch.zeros(0, dtype=torch.float64)
        pct = lambda a, b: None if b == 0 else float(100.0 * a / b)  # noqa: E731
        per = {}
        for k, name in enumerate(self.meta.keypoint_names):
            per[name] = {"nme": pct(self.kp_nme_sum[k], self.kp_nme_count[k]),
                         "pck": pct(self.kp_hit[k], self.kp_vis[k]),
                         "labeled": int(self.kp_nme_count[k]), "visible": int(self.kp_vis[k])}
        key = f"pck@{self.threshold:g}"
        ratios = torch.cat(self.spread_ratio) if self.spread_ratio else torch.zeros(0, dtype=torch.float64)
        return {"nme": float(100.0 * nmes.mean()) if len(nmes) else None,
                key: pct(self.kp_hit.sum(), self.kp_vis.sum()),
                "spread": float(ratios.mean()) if len(ratios) else None, "images": int(len(nmes)),
                "per_keypoint": per}


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


def _similarity_fit(shape: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """``shape [K, 2]`` carried onto each ``target [B, K, 2]`` by its least-squares similarity over
    the ``mask [B, K]`` keypoints (2D Umeyama, proper rotation) -> ``[B, K, 2]``."""
    out = []
    for t, m in zip(target, mask):
        if m.sum() < 2:
            out.append(shape.expand_as(t).clone())
            continue
        src, dst = shape[m], t[m]
        mu_s, mu_d = src.mean(0), dst.mean(0)
        a, b = src - mu_s, dst - mu_d
        cov = b.T @ a / len(a)
        u, sig, vt = torch.linalg.svd(cov)
        d = torch.ones(2, dtype=shape.dtype)
        d[1] = -1.0 if torch.det(u @ vt) < 0 else 1.0
        rot = u @ torch.diag(d) @ vt
        scale = (sig * d).sum() / a.pow(2).sum(-1).mean().clamp_min(1e-12)
        out.append((shape - mu_s) @ rot.T * scale + mu_d)
    return torch.stack(out)


@torch.no_grad()
def shape_baselines(train, labeled: list[int], test, *, meta: Optional[KeypointMeta] = None,
                    pck_threshold: float = 0.1) -> dict:
    """Metrics of two image-blind predictors (see the module docstring):
    ``{"mean_shape": ..., "fitted_mean_shape": ...}``, each a dict like :func:`evaluate`'s.

    The mean shape is the mean of the labelled keypoints of ``train[labeled]`` (per
    keypoint, over the images that label it; keypoints nobody labelled sit at the centre).
    """
    meta = meta or test.meta
    shots = collate_samples([train[i] for i in labeled])
    m = shots["labeled"].to(torch.float64)[..., None]
    mean = (shots["keypoints"].double() * m).sum(0) / m.sum(0).clamp_min(1)
    acc_mean, acc_fit = MetricAccumulator(meta, pck_threshold), MetricAccumulator(meta, pck_threshold)
    for start in range(0, len(test), 256):
        b = collate_samples([test[i] for i in range(start, min(len(test), start + 256))])
        gt = b["keypoints"].double()
        args = (gt, b["labeled"], b["visible"], b["bbox"])
        acc_mean.add(mean.expand_as(gt), *args)
        acc_fit.add(_similarity_fit(mean, gt, b["labeled"].bool()), *args)
    strip = lambda r: {k: v for k, v in r.items() if k != "per_keypoint"}  # noqa: E731
    return {"mean_shape": strip(acc_mean.result()), "fitted_mean_shape": strip(acc_fit.result())}
