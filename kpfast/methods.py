"""The training methods kpfast trains side by side: one registry, read by the config, the trainer and inference.

A method is a :class:`Method` entry in :data:`METHODS`: its name (``--method``),
the components ``--without`` may switch off, the trainer class that trains it
(a :class:`kpfast.train.Trainer` subclass, named as ``"module:Class"`` and
imported only when a run starts, so ``import kpfast`` stays light), and the
network inference rebuilds from its ``model.pt`` (``"module:function"``, called
with the run's config and keypoint meta, returning a module that maps images
``[B, 3, S, S]`` in ``[0, 1]`` to :class:`kpfast.models.Detections`).

Adding a method: a trainer subclass (override ``build_networks``,
``build_objective``, ``build_optimizer``, ``detect``, ``inference_state`` and
``draw_pictures`` as needed), an inference builder if its network is not the
keypoint detector, and one :class:`Method` line here.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any

DETECTOR_INFERENCE = "kpfast.models.detector:detector_from_config"


@dataclass(frozen=True)
class Method:
    """One ``--method`` (see the module docstring)."""

    name: str
    description: str
    components: tuple = ()
    """What it trains beyond the few-shot loss (``TrainConfig.uses`` answers from it)."""
    ablations: tuple = ("kmeans",)
    """The components ``--without`` may switch off (``kmeans``: random few-shot examples)."""
    trainer: str = "kpfast.train.loop:Trainer"
    inference: str = DETECTOR_INFERENCE
    unlabeled: bool = True
    """Whether the method trains on unlabelled images (the supervised baseline does not)."""
    presets: dict = field(default_factory=dict)
    """Its own fields' values at a preset's scale: ``{preset: {field: value}}``, applied by
    ``TrainConfig.from_preset`` over the preset (and under the caller's overrides)."""


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("full", "the paper: few-shot L1 + reconstruction through the uncertainty-weighted skeleton edge map + "
                   "2D equivariance + 3D part geometry (+ face smoothness on faces)",
           components=("recon", "geo2d", "geo3d", "uncertainty", "smooth"),
           ablations=("recon", "geo2d", "geo3d", "uncertainty", "kmeans")),
    Method("supervised", "the few-shot L1 loss on the labelled images only, same detector and schedule",
           unlabeled=False),
    Method("autolink-few", "AutoLink's all-pairs learned-weight graph + reconstruction + the few-shot L1 loss",
           components=("recon",)),
    Method("moskvyak", "Moskvyak et al. (ICLR 2021): heatmap regression + semantic consistency (sc) of keypoint "
                       "representations, transformation equivariance (te) of heatmaps, invariance (ti) of representations",
           components=("sc", "te", "ti"), ablations=("sc", "te", "ti", "kmeans"),
           trainer="kpfast.train.moskvyak:MoskvyakTrainer", inference="kpfast.models.moskvyak:detector_from_config"),
    Method("adaptation", "Sanchez & Tzimiropoulos (NeurIPS 2019): a detector trained with full supervision on a "
                         "source adapted to the target without labels (per-layer projections learned by image "
                         "reconstruction through a Gaussian landmark bottleneck), then a linear regressor from the "
                         "discovered landmarks to the keypoints, fitted on the labelled images",
           trainer="kpfast.train.adaptation:AdaptationTrainer",
           inference="kpfast.models.adaptation:adapted_detector_from_config"),
    Method("3fabrec", "3FabRec: an adversarial autoencoder trained on the unlabelled images, then interleaved "
                      "transfer layers in its frozen generator predict heatmaps (+ encoder fine-tuning)",
           components=("adv", "struct", "finetune"), ablations=("adv", "struct", "finetune", "kmeans"),
           trainer="kpfast.train.fabrec:FabRecTrainer", inference="kpfast.models.fabrec:fabrec_detector_from_config",
           presets={"demo": dict(fabrec_ae_iterations=800, fabrec_finetune_iterations=100, fabrec_ae_lr=5e-4,
                                 fabrec_sigma=0.15, fabrec_encoder_widths=(16, 32, 64, 128),
                                 fabrec_generator_widths=(128, 64, 32, 16), fabrec_discriminator_widths=(16, 32, 64, 128)),
                    "tiny": dict(fabrec_ae_iterations=2, fabrec_finetune_iterations=1, fabrec_z_dim=8,
                                 fabrec_encoder_widths=(8, 16), fabrec_generator_widths=(16, 8, 8),
                                 fabrec_discriminator_widths=(8, 16))}),
)}


ABLATIONS: tuple = tuple(dict.fromkeys(a for m in METHODS.values() for a in m.ablations))
"""Every component some method can switch off, in registry order."""


def method(name: str) -> Method:
    """The registry entry of ``name``; ``ValueError`` naming the choices otherwise."""
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"method must be one of {tuple(METHODS)}, got {name!r}") from None


def resolve(path: str) -> Any:
    """``"package.module:attribute"`` -> the attribute (imported now)."""
    module, _, attribute = path.partition(":")
    return getattr(importlib.import_module(module), attribute)
