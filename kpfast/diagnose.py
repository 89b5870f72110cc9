"""Mechanism checks: does each self-supervised term of the method do what it is for, on this data?

``python -m kpfast.diagnose --preset demo`` (a few minutes on 2 CPU cores) trains
nothing of the detector; it asks each term the question the method rests on,
with the ground truth the built-in data provides (or the annotations of a real
dataset's training split), and prints one PASS/FAIL line per check:

1. ``recon_uses_edge_map``: the reconstruction UNet of the config, trained for
   ``--steps`` steps with the edge map of the *true* keypoints, must reconstruct
   held-out masked images clearly better (``--margin``, default 5 % lower loss) than
   the same UNet trained with an all-zero map and with the map of another image's
   keypoints (shuffled). Otherwise the edge map carries no information the UNet
   can use, and reconstruction cannot teach the detector anything.
2. ``recon_gradient``: with that UNet, the gradient of the reconstruction loss at
   perturbed true keypoints must point back toward the truth (mean cosine between
   the descent direction and ``truth - keypoints`` at least :data:`MIN_COSINE` at every
   noise level of :data:`NOISE`).
3. ``geo2d_gradient``: the same for the 2D equivariance loss, with an oracle
   detector that returns the (perturbed) truth on the original and on the
   transformed image.
4. ``geo3d_gradient``: the same for the 3D part loss on the true ``(x, y, depth)``
   of a batch (procedural data only: real data has no depth), partners chosen by
   minimization as after the warm-up.

Each check reports its number; ``--json PATH`` writes them all. The fast checks
(2D, 3D) also run in the test suite.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from typing import Callable, Optional

import torch
from torch import Tensor

from .data import collate_samples, open_dataset
from .data.transforms import sample_transform
from .losses import build_perceptual_loss, equivariance_loss, part_geometry_loss, reconstruction_loss
from .models import EdgeMap, ReconstructionUNet, patch_mask, patch_size_for

NOISE = (0.02, 0.05, 0.1)
"""Perturbations of the true keypoints (std, normalized units; 0.05 is 1.6 px at 64 px)."""

MIN_COSINE = 0.2
"""A gradient check passes when the descent direction's cosine with the way back to the truth is at
least this, at every noise level: a clear pull toward the truth (a direction unrelated to it has a
cosine of about ``1 / sqrt(K * D)``, 0.05 for 68 keypoints in 3D)."""


@dataclass
class Check:
    """One mechanism check: its value, the bar it must clear, and what was measured."""

    name: str
    value: float
    threshold: float
    passed: bool
    detail: dict

    def line(self) -> str:
        return f"{'PASS' if self.passed else 'FAIL'}  {self.name:22s} {self.value:8.4f} (needs {self.threshold:g})"


def descent_alignment(loss_fn: Callable[[Tensor], Tensor], truth: Tensor, noise: float,
                      generator: torch.Generator, known: Optional[Tensor] = None) -> float:
    """Cosine between ``-grad loss_fn(x)`` and ``truth - x`` at ``x = truth + noise * N(0, 1)``.

    ``truth [B, K, D]``; ``known [B, K]`` restricts both vectors to some keypoints. 1: the
    loss pulls every perturbed keypoint straight back; 0: its pull is unrelated to the truth.

    Example:
        >>> t = torch.zeros(2, 3, 2)
        >>> round(descent_alignment(lambda x: (x - t).pow(2).sum(), t, 0.1, torch.Generator().manual_seed(0)), 6)
        1.0
    """
    x = (truth + noise * torch.randn(truth.shape, generator=generator, dtype=truth.dtype)).requires_grad_()
    (g,) = torch.autograd.grad(loss_fn(x), x)
    m = torch.ones(truth.shape[:2], dtype=torch.bool) if known is None else known
    toward, descent = (truth - x.detach())[m], -g[m]
    den = float(toward.norm() * descent.norm())
    return float((toward * descent).sum()) / den if den > 0 else 0.0


def _alignments(loss_fn, truth, generator, known=None) -> dict:
    return {f"noise {n:g}": descent_alignment(loss_fn, truth, n, generator, known) for n in NOISE}


def _batch(dataset, indices) -> dict:
    return collate_samples([dataset[int(i)] for i in indices])


def geo2d_check(dataset, *, batch: int = 16, strength: float = 1.0, min_cosine: float = MIN_COSINE,
                seed: int = 0) -> Check:
    """Check 3 (see the module docstring)."""
    g = torch.Generator().manual_seed(seed)
    b = _batch(dataset, torch.randperm(len(dataset), generator=g)[:batch])
    truth = b["keypoints"].double()
    T = sample_transform(len(truth), strength, size=tuple(b["image"].shape[-2:]), generator=g)
    flip = dataset.meta.flip_perm
    on_transformed, inside = T.apply_keypoints(truth, flip)

    def loss(k):
        target, ok = T.apply_keypoints(k, flip)
        return equivariance_loss(on_transformed, target, inside & ok)

    detail = _alignments(loss, truth, g, b["labeled"])
    value = min(detail.values())
    return Check("geo2d_gradient", value, min_cosine, value >= min_cosine, detail)


def geo3d_check(dataset, parts: Tensor, part_weights: Tensor, *, batch: int = 16, min_cosine: float = MIN_COSINE,
                seed: int = 0) -> Check:
    """Check 4 (see the module docstring); NaN (and not passed) without true depth."""
    g = torch.Generator().manual_seed(seed)
    b = _batch(dataset, torch.randperm(len(dataset), generator=g)[:batch])
    points = torch.cat([b["keypoints"], b["depth"][..., None]], -1).double()
    if not torch.isfinite(points).all():
        return Check("geo3d_gradient", math.nan, min_cosine, False, {"skipped": "the dataset has no true depth"})

    def loss(x):
        return part_geometry_loss(x, parts, part_weights.double(), random_partners=False)

    detail = _alignments(loss, points, g)
    value = min(detail.values())
    return Check("geo3d_gradient", value, min_cosine, value >= min_cosine, detail)


def recon_checks(train, test, cfg, *, steps: int, margin: float = 0.05, min_cosine: float = MIN_COSINE,
                 progress: bool = True, seed: int = 0) -> list[Check]:
    """Checks 1 and 2 (see the module docstring) for the reconstruction of ``cfg`` (a TrainConfig)."""
    S = cfg.image_size
    patch = patch_size_for(S, cfg.mask_grid)
    perceptual = build_perceptual_loss(cfg.perceptual)
    edges = train.meta.edges
    B = cfg.batch_unlabeled + cfg.labeled_batch
    gt = torch.Generator().manual_seed(seed + 1)
    test_b = _batch(test, torch.randperm(len(test), generator=gt)[:min(len(test), 128)])
    test_masked, _ = patch_mask(test_b["image"], patch, cfg.mask_ratio, generator=gt)

    def edge_input(variant, edge_map, keypoints):
        if variant == "zero":
            return torch.zeros(len(keypoints), 1, S, S)
        k = keypoints.roll(1, 0) if variant == "shuffled" else keypoints
        return edge_map(k).unsqueeze(1)

    results, trained = {}, None
    for variant in ("true", "zero", "shuffled"):
        torch.manual_seed(seed)
        unet, edge_map = ReconstructionUNet(cfg.unet_widths, norm=cfg.norm), EdgeMap(edges, S)
        opt = torch.optim.Adam([{"params": unet.parameters()},
                                {"params": edge_map.parameters(), "lr": cfg.lr * cfg.edge_lr_scale}],
                               lr=cfg.lr, betas=cfg.betas)
        g = torch.Generator().manual_seed(seed + 2)
        t0 = time.perf_counter()
        for step in range(steps):
            b = _batch(train, torch.randint(len(train), (B,), generator=g))
            masked, _ = patch_mask(b["image"], patch, cfg.mask_ratio, generator=g)
            rec = unet(torch.cat([edge_input(variant, edge_map, b["keypoints"]), masked], 1))
            loss, _ = reconstruction_loss(rec, b["image"], perceptual)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if progress and (step + 1) % max(1, steps // 5) == 0:
                print(f"kpfast diagnose: reconstruction with the {variant} edge map, step {step + 1}/{steps}, "
                      f"loss {loss.item():.4f} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
        unet.eval()
        with torch.no_grad():
            rec = unet(torch.cat([edge_input(variant, edge_map, test_b["keypoints"]), test_masked], 1))
            loss, parts = reconstruction_loss(rec, test_b["image"], perceptual)
        results[variant] = {"loss": loss.item(), **{k: float(v) for k, v in parts.items()}}
        if variant != "zero":
            results[variant]["alpha"] = float(edge_map.alpha.detach())
        if variant == "true":
            trained = (unet, edge_map)
    best_other = min(results["zero"]["loss"], results["shuffled"]["loss"])
    gain = 1 - results["true"]["loss"] / best_other
    checks = [Check("recon_uses_edge_map", gain, margin, gain >= margin, results)]

    unet, edge_map = trained
    for p in (*unet.parameters(), *edge_map.parameters()):
        p.requires_grad_(False)

    def loss(k):
        rec = unet(torch.cat([edge_map(k.float()).unsqueeze(1), test_masked], 1))
        return reconstruction_loss(rec, test_b["image"], perceptual)[0]

    detail = _alignments(loss, test_b["keypoints"].double(), torch.Generator().manual_seed(seed + 3),
                         test_b["labeled"])
    value = min(detail.values())
    checks.append(Check("recon_gradient", value, min_cosine, value >= min_cosine, detail))
    return checks


CHECKS = ("geo2d", "geo3d", "recon")


def run(cfg, *, steps: int = 300, progress: bool = True, only=CHECKS) -> list[Check]:
    """The checks ``only`` (default all) for a :class:`kpfast.train.TrainConfig`'s dataset, sizes and
    networks."""
    def split(name, size):
        return open_dataset(cfg.dataset, name, image_size=cfg.image_size, size=size, seed=cfg.data_seed,
                            cache_dir=cfg.cache_dir, progress=progress)

    train, test = split("train", cfg.train_size), split("test", cfg.test_size)
    meta = train.meta
    parts = meta.part_mask(include_whole=True)
    part_weights = torch.tensor([1.0] * len(meta.parts) + [cfg.whole_object_weight if meta.parts else 1.0])
    checks = [geo2d_check(train)] if "geo2d" in only else []
    if "geo3d" in only:
        checks.append(geo3d_check(train, parts, part_weights))
    if meta.edges and "recon" in only:
        checks += recon_checks(train, test, cfg, steps=steps, progress=progress)
    return checks


def main(argv=None) -> int:
    from .config import PRESETS, TrainConfig

    p = argparse.ArgumentParser(prog="python -m kpfast.diagnose", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="demo")
    p.add_argument("--dataset", default=None, help="face, animal, car or a real-format path (default: the preset's)")
    p.add_argument("--steps", type=int, default=300, help="reconstruction training steps per variant")
    p.add_argument("--json", default=None, help="write the checks to this JSON file")
    p.add_argument("--only", action="append", choices=CHECKS, help="run only these checks (repeatable)")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a TrainConfig field, as in python -m kpfast.train")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    from .train.cli import parse_settings

    overrides = parse_settings(args.set)
    if args.dataset:
        overrides["dataset"] = args.dataset
    cfg = TrainConfig.from_preset(args.preset, **overrides)
    checks = run(cfg, steps=args.steps, progress=not args.no_progress, only=tuple(args.only or CHECKS))
    for c in checks:
        print(c.line())
        for k, v in c.detail.items():
            print(f"      {k}: {v}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"command": " ".join(["python -m kpfast.diagnose", *(argv if argv is not None else sys.argv[1:])]),
                       "preset": args.preset, "dataset": cfg.dataset, "steps": args.steps, "set": args.set,
                       "torch": torch.__version__, "checks": [asdict(c) for c in checks]}, f, indent=1)
    return 0 if all(c.passed for c in checks if not math.isnan(c.value)) else 1


if __name__ == "__main__":
    sys.exit(main())
