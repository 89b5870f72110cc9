"""Benchmark case: one training step of the paper preset, fused ops against the reference ops.

The step is what :class:`kpfast.train.objective.Objective` computes for the
paper's setting: 128x128 images, batch 16 unlabelled + 10 labelled, K = 68 (the
procedural face's iBUG markup and skeleton), every loss term of ``--method full``
(2D transforms at the mid-training strength, 3D partners by minimization, 90 %
patch masking, reconstruction with the perceptual backbone when installed). The
provider returns the weighted total loss, so "backward" is the step's backward
pass; the optimizer update (identical for both providers) is not included.

Providers: ``fused`` runs the ops on the default backend (C++ on CPU, Triton on
CUDA), ``reference`` under ``kpfast.use_backend("reference")`` (plain PyTorch).
``torch.compile`` of a whole step is not measured (recorded as skipped).
"""

from __future__ import annotations

import torch

import kpfast
from kpfast.data.skeletons import face68_meta
from kpfast.losses import build_perceptual_loss
from kpfast.train import TrainConfig, build_model
from kpfast.train.data import Batch
from kpfast.train.objective import Objective
from kpfast.train.streams import RandomStreams

from common import Case

COMPILE_SKIP = ("skipped: torch.compile of a whole training step is not benchmarked (data-dependent partner choice "
                "and per-step random transforms make it a graph-break-heavy target; the ops themselves are "
                "compiled and benchmarked in their own modules)")


def _perceptual_spec() -> str:
    from kpfast.models.features import efficientnet_available

    return "imagenet" if efficientnet_available() else "none"


def _case(cfg: TrainConfig, unlabeled: int, labeled: int, name: str) -> Case:
    meta = face68_meta("procedural-face")
    perceptual = _perceptual_spec() if cfg.perceptual != "none" else "none"
    K = meta.num_keypoints
    S = cfg.image_size

    def make_inputs(device):
        gen = torch.Generator().manual_seed(0)
        torch.manual_seed(0)
        model = build_model(cfg, meta).to(device)
        loss = build_perceptual_loss(perceptual)
        if loss is not None:
            loss.to(device)
        objective = Objective(cfg, meta, loss)
        images = torch.rand(unlabeled + labeled, 3, S, S, generator=gen)
        kp = torch.rand(labeled, K, 2, generator=gen) * 1.6 - 0.8
        batch = Batch(images=images.to(device), labeled_keypoints=kp.to(device),
                      labeled_mask=torch.ones(labeled, K, dtype=torch.bool, device=device))
        # parameters listed as inputs: their gradients are reset between repetitions and
        # they do not count as memory kept for backward
        params = {f"param{i}": p for i, p in enumerate(model.parameters())}
        return {"model": model, "objective": objective, "batch": batch, "streams": RandomStreams(1),
                **params}

    def step(x):
        terms, _ = x["objective"](x["model"], x["batch"], cfg.iterations // 2, x["streams"])
        return x["objective"].total(terms)

    def fused(x):
        with kpfast.use_backend("auto"):
            return step(x)

    def reference(x):
        with kpfast.use_backend("reference"):
            return step(x)

    return Case(
        op="train_step", name=name,
        config=dict(image_size=S, batch=f"{unlabeled}+{labeled}", K=K, E=len(meta.edges), method=cfg.method,
                    perceptual=perceptual, detector=list(cfg.detector_widths), unet=list(cfg.unet_widths)),
        make_inputs=make_inputs,
        providers={"reference": reference, "fused": fused, "torch.compile(step)": fused},
        skip={"torch.compile(step)": COMPILE_SKIP},
    )


def cases(device: torch.device, quick: bool) -> list[Case]:
    if quick:
        cfg = TrainConfig.from_preset("tiny")
        return [_case(cfg, 4, 4, "tiny 32x32 B=4+4 K=68")]
    paper = TrainConfig.from_preset("paper", shots=10)
    return [_case(paper, 16, 10, "paper 128x128 B=16+10 K=68")]
