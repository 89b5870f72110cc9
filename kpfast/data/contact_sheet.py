"""Contact sheets of the procedural categories: ``python -m kpfast.data.contact_sheet --out docs/images``.

Writes ``procedural_<category>.png`` per category: a grid of test-split samples with
keypoints (filled = visible, ring = occluded) and skeleton drawn.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from .draw import draw_keypoints, image_grid
from .procedural.generate import CATEGORIES, render_samples


def contact_sheet(category: str, *, n: int = 24, cols: int = 8, image_size: int = 128, scale: int = 2, seed: int = 0,
                  split: str = "test"):
    """A PIL image with ``n`` samples of ``category`` (rendered directly, not cached)."""
    meta = CATEGORIES[category].meta
    with torch.no_grad():
        r = render_samples(category, split, seed, list(range(n)), image_size=image_size)
    tiles = [draw_keypoints(r["image"][i], r["keypoints"][i], edges=meta.edges, visible=r["visible"][i],
                            scale=scale, radius=2.5) for i in range(n)]
    return image_grid(tiles, cols)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="docs/images", help="output folder")
    ap.add_argument("--n", type=int, default=24, help="samples per sheet")
    ap.add_argument("--cols", type=int, default=8)
    ap.add_argument("--image-size", type=int, default=128)
    ap.add_argument("--categories", nargs="*", default=sorted(CATEGORIES))
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for cat in args.categories:
        path = out / f"procedural_{cat}.png"
        contact_sheet(cat, n=args.n, cols=args.cols, image_size=args.image_size).save(path, optimize=True)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
