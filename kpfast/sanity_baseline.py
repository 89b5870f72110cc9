"""How hard is a procedural category? A tiny supervised baseline on n labelled images.

``python -m kpfast.sanity_baseline --category face --shots 10`` trains a small CNN
with a soft-argmax head on the first ``shots`` training images (all keypoints
supervised, L1) and reports the NME of :mod:`kpfast.evaluate` (% of the normalizer
distance, or of the box's longer side when the category has none) on the test images
and on the training images, beside the mean training shape's.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from .data import open_dataset
from .data.coords import pixel_grid
from .evaluate import evaluate, shape_baselines


class TinyRegressor(nn.Module):
    def __init__(self, k: int, width: int = 32):
        super().__init__()
        c = width
        self.body = nn.Sequential(
            nn.Conv2d(3, c, 3, padding=1), nn.ReLU(), nn.Conv2d(c, c, 3, padding=1, stride=2), nn.ReLU(),
            nn.Conv2d(c, 2 * c, 3, padding=1), nn.ReLU(), nn.Conv2d(2 * c, 2 * c, 3, padding=1, stride=2), nn.ReLU(),
            nn.Conv2d(2 * c, 2 * c, 3, padding=2, dilation=2), nn.ReLU(), nn.Conv2d(2 * c, k, 1))

    def forward(self, x):
        h = self.body(x)
        b, k, hh, ww = h.shape
        w = h.flatten(2).softmax(-1).view(b, k, hh, ww)
        g = pixel_grid((hh, ww), dtype=h.dtype, device=h.device)
        return torch.stack([(w * g[..., 0]).sum((-1, -2)), (w * g[..., 1]).sum((-1, -2))], -1)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--category", default="face")
    ap.add_argument("--shots", type=int, default=10)
    ap.add_argument("--test-size", type=int, default=300)
    ap.add_argument("--iters", type=int, default=1500)
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache-dir", default=None)
    args = ap.parse_args(argv)
    torch.manual_seed(args.seed)
    tr = open_dataset(args.category, "train", size=max(args.shots, 10), image_size=args.image_size,
                      cache_dir=args.cache_dir, seed=args.seed)
    te = open_dataset(args.category, "test", size=args.test_size, image_size=args.image_size, cache_dir=args.cache_dir,
                      seed=args.seed)
    shots = list(range(args.shots))
    a = {k: torch.stack([tr[i][k] for i in shots]) for k in ("image", "keypoints")}
    net = TinyRegressor(tr.meta.num_keypoints)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    t0 = time.time()
    for it in range(args.iters):
        loss = F.l1_loss(net(a["image"]), a["keypoints"])
        opt.zero_grad()
        loss.backward()
        opt.step()
    train_nme = evaluate(net, torch.utils.data.Subset(tr, shots), meta=tr.meta)["nme"]
    test_nme = evaluate(net, te)["nme"]
    mean_nme = shape_baselines(tr, shots, te)["mean_shape"]["nme"]
    print(f"{args.category}: {args.shots} labelled images, {args.iters} iterations ({time.time() - t0:.0f} s): "
          f"train NME {train_nme:.1f} %, test NME {test_nme:.1f} % (mean-shape baseline {mean_nme:.1f} %)")


if __name__ == "__main__":
    main()
