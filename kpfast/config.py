"""Training configuration: one dataclass, named presets, validation with clear errors.

Methods (``method``) and the components each can switch off (``without``) are
the registry :data:`kpfast.methods.METHODS`: ``"full"`` (the paper; ablations
``recon``, ``geo2d``, ``geo3d``, ``uncertainty``), ``"supervised"`` (few-shot L1
only), ``"autolink-few"`` (AutoLink's all-pairs graph + reconstruction + few-shot
L1), ``"adaptation"`` (a supervised source detector adapted to the target without
labels, then a linear regressor); every method takes ``kmeans`` (random few-shot examples instead of the
k-means selection).

The config lives outside :mod:`kpfast.train`: every checkpoint records the config of
its run, and inference (:func:`kpfast.load`) reads it back to rebuild the detector.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
import re
from dataclasses import dataclass
from typing import Any, Mapping, Optional

from .methods import ABLATIONS, METHODS as METHOD_REGISTRY

METHODS = tuple(METHOD_REGISTRY)
# fields that change where and how a run reports, not what it computes (a resumed run or a
# rerun may change them)
RUN_FIELDS = frozenset({"resume", "overwrite", "progress", "out", "checkpoint_every", "log_every", "image_every",
                        "eval_batch", "device", "cache_dir", "preset", "diagnostics_every"})
OPS = ("fused", "reference")
LR_SCHEDULES = ("constant", "cosine")
NORMS = ("batch", "group", "none")
HEATMAP_READOUTS = ("argmax", "soft_argmax")
ADAPT_MODES = ("projection", "finetune", "scratch")


@dataclass
class TrainConfig:
    """Everything a training run depends on (defaults = the paper's settings).

    Data: ``dataset`` (``"face"``, ``"animal"``, ``"car"`` or a real-format path, see
    :func:`kpfast.data.open_dataset`), ``shots`` labelled images, ``image_size``,
    ``train_size``/``test_size`` (procedural split sizes or caps on real data; None =
    the dataset's default), ``data_seed``, ``cache_dir``, ``few_shot_features``
    (k-means features: ``"auto"``, ``"imagenet"``, ``"handcrafted"`` or a path),
    ``test_dataset`` (real data: a separate test set, else the dataset's own or its
    hashed split) and ``category`` (COCO-format data: which categories to read).

    Method: ``method``, ``without``, ``ops`` (``"fused"`` kernels or the plain-PyTorch
    ``"reference"``), ``perceptual`` (``"imagenet"``, ``"none"`` or a local checkpoint).

    Optimization: ``iterations``, ``batch_unlabeled`` (per process), ``batch_labeled``
    (None = ``min(16, shots)``), ``lr``, ``lr_schedule`` (``"constant"``, the paper's,
    or ``"cosine"``: cosine decay from ``lr`` to 0 over ``iterations``, for short
    runs), ``betas``, loss weights ``w_*``,
    ``whole_object_weight`` (the whole object's weight in the 3D loss, user parts
    weigh 1), ``random_partner_iterations``, ``ramp_iterations`` (2D transform ramp
    length; None = ``iterations``), ``mask_ratio`` (share of the ``mask_grid`` x ``mask_grid``
    patches masked), ``depth_scale``, ``edge_lr_scale`` (learning-rate multiplier of the
    edge map's thickness and strength parameters).

    Moskvyak et al. (``method="moskvyak"``, :mod:`kpfast.train.moskvyak`): the weights of its terms
    ``w_heatmap`` (supervised heatmap MSE), ``w_sc`` (semantic consistency), ``w_te``
    (transformation equivariance), ``w_ti`` (transformation invariance), the paper's
    (1e3, 0.5, 1e2, 1e2); ``heatmap_sigma`` (standard deviation of the ground-truth Gaussians,
    in heatmap pixels), ``sc_channels`` (length of a keypoint representation; the paper's 64)
    and ``heatmap_readout`` (how keypoints are read from the heatmaps for evaluation and
    inference: ``"argmax"`` with a quarter-pixel refinement, or ``"soft_argmax"``).

    Networks: ``detector_widths``, ``detector_up_widths``, ``unet_widths``, ``norm``,
    ``channels_last`` (NHWC convolutions: about 30 % faster on CPU, same results up
    to rounding).

    Unsupervised adaptation (``method="adaptation"``, :mod:`kpfast.train.adaptation`):
    ``source`` (the core detector: a dataset to train it on with all its labels, e.g.
    ``"face"``, or a kpfast run folder / ``model.pt`` of a trained detector; None for
    ``adapt="scratch"``), ``adapt`` (``"projection"``: the paper, frozen core weights
    with a learned projection per convolution; ``"finetune"``: every weight trained;
    ``"scratch"``: no source, every weight from random initialization),
    ``source_iterations`` (steps of the source detector's training; None =
    ``iterations``), ``source_seed`` (its seed and data seed), ``adapt_landmarks``
    (landmarks to discover), ``adapt_landmark_beta`` (the bottleneck's soft-argmax
    inverse temperature), ``adapt_landmark_sigma`` (the Gaussians' sigma in pixels of
    the generator's bottleneck grid), ``adapt_generator_widths`` (full resolution, then
    one stride-2 level each; the paper's by default: the demo grids set a quarter of
    them) and ``adapt_generator_blocks`` (residual blocks at the bottleneck).
    3FabRec (``method="3fabrec"`` only; see :mod:`kpfast.train.fabrec`): the stages split
    ``iterations``: ``fabrec_ae_iterations`` steps of the autoencoder (stage 1), then the
    interleaved transfer layers (stage 2), then ``fabrec_finetune_iterations`` steps of encoder
    fine-tuning (stage 3; with ``without=("finetune",)`` stage 2 continues through them);
    ``fabrec_autoencoder`` (a run folder or its ``autoencoder.pt``: reuse that stage-1
    autoencoder, the run starts at step ``fabrec_ae_iterations``), ``fabrec_ae_lr`` (stage 1, and
    the encoder in stage 3), ``fabrec_itl_lr`` (stage 2; a tenth of it in stage 3),
    ``fabrec_z_dim`` (code length), ``fabrec_encoder_widths``, ``fabrec_generator_widths``,
    ``fabrec_discriminator_widths`` (the image discriminator), loss weights ``fabrec_w_rec``
    (pixel L1 in 8-bit grey levels), ``fabrec_w_cs`` (structural), ``fabrec_w_enc`` (encoding
    feature), ``fabrec_w_adv`` (adversarial feature), ``fabrec_sigma`` (target heatmaps'
    standard deviation as a fraction of their side), ``fabrec_beta`` (soft-argmax inverse
    temperature on the heatmaps), ``fabrec_augment`` (strength in [0, 1] of the paper's stage-2
    augmentation of the labelled images: rotation, translation, scale, flip).

    Run: ``seed``, ``device`` (``"auto"``, ``"cpu"``, ``"cuda"``), ``out`` (the run
    folder), ``checkpoint_every``, ``log_every``, ``diagnostics_every`` (per-term gradient
    diagnostics, see :mod:`kpfast.train.diagnostics`; None = ``log_every``, 0 = off),
    ``image_every`` (PNG snapshots; 0 = only at the end), ``eval_batch``, ``progress``, ``resume`` (continue the run in
    ``out``), ``overwrite`` (replace the run ``out`` holds).

    Every field is checked on construction (type, finite, in range: see
    :data:`INT_RANGES` and :data:`FLOAT_RANGES`), and so are combinations of fields; a
    bad value raises ``ValueError`` naming the field.
    """

    # data
    dataset: str = "face"
    shots: int = 10
    image_size: int = 128
    train_size: Optional[int] = None
    test_size: Optional[int] = None
    data_seed: int = 0
    cache_dir: Optional[str] = None
    few_shot_features: str = "auto"
    test_dataset: Optional[str] = None
    category: Optional[str] = None
    # method
    method: str = "full"
    without: tuple = ()
    ops: str = "fused"
    perceptual: str = "imagenet"
    # optimization
    iterations: int = 20000
    batch_unlabeled: int = 16
    batch_labeled: Optional[int] = None
    lr: float = 1e-4
    lr_schedule: str = "constant"
    betas: tuple = (0.9, 0.99)
    w_few_shot: float = 1.0
    w_recon: float = 1.0
    w_geo2d: float = 1.0
    w_geo3d: float = 0.1
    w_smooth: float = 0.02
    whole_object_weight: float = 0.1
    random_partner_iterations: int = 200
    ramp_iterations: Optional[int] = None
    mask_ratio: float = 0.9
    mask_grid: int = 16
    depth_scale: float = 20.0
    edge_lr_scale: float = 1.0
    # Moskvyak et al. (method "moskvyak")
    w_heatmap: float = 1e3
    w_sc: float = 0.5
    w_te: float = 1e2
    w_ti: float = 1e2
    heatmap_sigma: float = 1.0
    sc_channels: int = 64
    heatmap_readout: str = "argmax"
    # networks
    detector_widths: tuple = (64, 128, 256, 512)
    detector_up_widths: tuple = (256, 256)
    unet_widths: tuple = (32, 64, 128, 256)
    norm: str = "batch"
    channels_last: bool = True
    # unsupervised adaptation (method "adaptation")
    source: Optional[str] = None
    adapt: str = "projection"
    source_iterations: Optional[int] = None
    source_seed: int = 0
    adapt_landmarks: int = 10
    adapt_landmark_beta: float = 10.0
    adapt_landmark_sigma: float = math.sqrt(0.5)
    adapt_generator_widths: tuple = (64, 128, 256)
    adapt_generator_blocks: int = 6
    # 3fabrec (paper: Adam (0, 0.999) at 2e-5 for the autoencoder, 1e-3 for the ITLs, code 99-D,
    # lambda_rec ~ 1, lambda_cs ~ 60, lambda_enc = lambda_adv = 1, sigma 7 px on 128 px heatmaps)
    fabrec_ae_iterations: int = 14000
    fabrec_finetune_iterations: int = 2000
    fabrec_autoencoder: Optional[str] = None
    fabrec_ae_lr: float = 2e-5
    fabrec_itl_lr: float = 1e-3
    fabrec_z_dim: int = 99
    fabrec_encoder_widths: tuple = (64, 128, 256, 512)
    fabrec_generator_widths: tuple = (512, 256, 128, 64, 32)
    fabrec_discriminator_widths: tuple = (64, 128, 256, 512)
    fabrec_w_rec: float = 1.0
    fabrec_w_cs: float = 60.0
    fabrec_w_enc: float = 1.0
    fabrec_w_adv: float = 1.0
    fabrec_sigma: float = 7 / 128
    fabrec_beta: float = 20.0
    fabrec_augment: float = 1.0
    # run
    seed: int = 0
    device: str = "auto"
    out: Optional[str] = None
    checkpoint_every: int = 500
    log_every: int = 10
    diagnostics_every: Optional[int] = None
    image_every: int = 0
    eval_batch: int = 64
    progress: bool = True
    resume: bool = False
    overwrite: bool = False
    preset: Optional[str] = None

    # -- derived ---------------------------------------------------------------
    @property
    def labeled_batch(self) -> int:
        """Labelled images per step: ``batch_labeled`` or ``min(16, shots)``."""
        return self.batch_labeled if self.batch_labeled is not None else min(16, self.shots)

    def lr_at(self, step: int) -> float:
        """The learning rate of (0-based) ``step`` under ``lr_schedule``.

        Example:
            >>> cfg = TrainConfig(lr=1e-3, lr_schedule="cosine", iterations=100)
            >>> cfg.lr_at(0), round(cfg.lr_at(50), 6), cfg.lr_at(100)
            (0.001, 0.0005, 0.0)
        """
        if self.lr_schedule == "cosine":
            return self.lr * 0.5 * (1 + math.cos(math.pi * min(step, self.iterations) / self.iterations))
        return self.lr

    @property
    def diagnostics_interval(self) -> int:
        """Steps between diagnostics rows (:mod:`kpfast.train.diagnostics`): ``diagnostics_every``,
        ``log_every`` when None, never when 0."""
        return self.log_every if self.diagnostics_every is None else self.diagnostics_every

    @property
    def ramp_length(self) -> int:
        return self.ramp_iterations if self.ramp_iterations is not None else self.iterations

    def uses(self, component: str) -> bool:
        """Whether the run trains with ``component`` (one of its method's components in
        :data:`kpfast.methods.METHODS`, e.g. ``recon``, ``geo2d``, ``smooth``; or ``kmeans``)
        and has not switched it off."""
        if component == "kmeans":
            return "kmeans" not in self.without
        if component not in METHOD_REGISTRY[self.method].components or component in self.without:
            return False
        return component != "smooth" or self.w_smooth > 0

    @property
    def method_label(self) -> str:
        """``"full"``, ``"full without geo3d, kmeans"``, ..."""
        return self.method + (f" without {', '.join(self.without)}" if self.without else "")

    # -- construction ----------------------------------------------------------
    def __post_init__(self):
        if isinstance(self.without, str):
            self.without = (self.without,)
        for name in ("without", *WIDTH_FIELDS_MIN_LENGTH):
            value = getattr(self, name)
            if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
                raise ValueError(f"TrainConfig: {name} must be a sequence, got {value!r}")
            setattr(self, name, tuple(value))
        self.without = tuple(sorted(set(self.without), key=lambda w: (ABLATIONS + (w,)).index(w)))
        self.betas = tuple(self.betas) if not isinstance(self.betas, (str, bytes)) and hasattr(self.betas, "__iter__") \
            else self.betas
        for name in ("dataset", "cache_dir", "out", "perceptual", "few_shot_features", "source", "fabrec_autoencoder"):
            if isinstance(getattr(self, name), os.PathLike):
                setattr(self, name, os.fspath(getattr(self, name)))
        self.validate()
        # plain Python numbers (numpy scalars, ints given for floats) so the config reads back from JSON equal
        for name in INT_RANGES:
            if getattr(self, name) is not None:
                setattr(self, name, int(getattr(self, name)))
        for name in FLOAT_RANGES:
            setattr(self, name, float(getattr(self, name)))
        self.betas = tuple(float(b) for b in self.betas)

    def validate(self) -> None:
        """Raise ``ValueError`` naming the field for any missing, mistyped, non-finite or
        out-of-range value and any inconsistent combination."""
        def bad(msg):
            raise ValueError(f"TrainConfig: {msg}")

        def is_int(v):
            return isinstance(v, numbers.Integral) and not isinstance(v, bool)

        def is_number(v):
            return isinstance(v, numbers.Real) and not isinstance(v, bool)

        for name, (low, high) in INT_RANGES.items():
            v = getattr(self, name)
            if v is None and name in OPTIONAL_FIELDS:
                continue
            if not is_int(v) or v < low or (high is not None and v > high):
                within = f">= {low}" if high is None else f"in [{low}, {high}]"
                bad(f"{name} must be an integer {within}{' or None' if name in OPTIONAL_FIELDS else ''}, got {v!r}")
        for name, (low, high, low_open) in FLOAT_RANGES.items():
            v = getattr(self, name)
            if not is_number(v) or not math.isfinite(v) or v < low or (low_open and v == low) or v > high:
                within = (f"> {low:g}" if low_open else f">= {low:g}") + (f" and <= {high:g}" if math.isfinite(high) else "")
                bad(f"{name} must be a finite number {within}, got {v!r}")
        for name in ("dataset", "perceptual", "few_shot_features", "device", "cache_dir", "out", "source", "fabrec_autoencoder"):
            v = getattr(self, name)
            if v is None and name in OPTIONAL_FIELDS:
                continue
            if not isinstance(v, str) or not v.strip():
                bad(f"{name} must be a non-empty string{' or None' if name in OPTIONAL_FIELDS else ''}, got {v!r}")
        for name in ("channels_last", "progress", "resume", "overwrite"):
            if not isinstance(getattr(self, name), bool):
                bad(f"{name} must be True or False, got {getattr(self, name)!r}")
        for name, min_length in WIDTH_FIELDS_MIN_LENGTH.items():
            v = getattr(self, name)
            if len(v) < min_length or not all(is_int(w) and w >= 1 for w in v):
                what = {0: "a list of", 1: "a non-empty list of", 2: "a list of at least 2"}[min_length]
                bad(f"{name} must be {what} positive integers (channels per block), got {v!r}")
        if len(self.betas) != 2 or not all(is_number(b) and math.isfinite(b) and 0 <= b < 1 for b in self.betas):
            bad(f"betas must be a pair of numbers in [0, 1), got {self.betas!r}")

        if self.method not in METHODS:
            bad(f"method must be one of {METHODS}, got {self.method!r}")
        unknown = [w for w in self.without if w not in ABLATIONS]
        if unknown:
            bad(f"without: unknown component(s) {unknown}; choose from {ABLATIONS}")
        own = METHOD_REGISTRY[self.method].ablations
        for w in self.without:
            if w not in own:
                owners = " or ".join(f"method {m!r}" for m, spec in METHOD_REGISTRY.items() if w in spec.ablations)
                bad(f"without {w!r} only applies to {owners} (method {self.method!r} can switch off {list(own)})")
        if self.ops not in OPS:
            bad(f"ops must be one of {OPS}, got {self.ops!r}")
        if self.lr_schedule not in LR_SCHEDULES:
            bad(f"lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}")
        if self.norm not in NORMS:
            bad(f"norm must be one of {NORMS}, got {self.norm!r}")
        if self.heatmap_readout not in HEATMAP_READOUTS:
            bad(f"heatmap_readout must be one of {HEATMAP_READOUTS}, got {self.heatmap_readout!r}")
        if self.device not in ("auto", "cpu", "cuda") and not re.fullmatch(r"cuda:\d+", self.device):
            bad(f"device must be 'auto', 'cpu' or 'cuda[:N]', got {self.device!r}")
        if self.adapt not in ADAPT_MODES:
            bad(f"adapt must be one of {ADAPT_MODES}, got {self.adapt!r}")
        if self.method == "adaptation":
            if self.adapt == "scratch" and self.source is not None:
                bad(f"adapt 'scratch' trains without a source detector: leave source unset (got {self.source!r})")
            if self.adapt != "scratch" and self.source is None:
                bad(f"method 'adaptation' with adapt {self.adapt!r} needs source (--source): a dataset to train the "
                    "core detector on with all its labels (e.g. face), or a kpfast run folder or model.pt")
            if self.batch_unlabeled < 1:
                bad("method 'adaptation' trains on unlabelled images only: batch_unlabeled must be >= 1, got 0")
        elif self.source is not None:
            bad(f"source only applies to method 'adaptation' (method {self.method!r})")
        if self.preset is not None and self.preset not in PRESETS:
            bad(f"preset must be one of {sorted(PRESETS)}, got {self.preset!r}")

        if self.resume and self.out is None:
            bad("resume needs out: the run folder to continue")
        if self.resume and self.overwrite:
            bad("resume (continue the run in out) and overwrite (replace it) exclude each other")
        if self.labeled_batch > self.shots:
            bad(f"batch_labeled {self.labeled_batch} exceeds shots {self.shots}")
        levels = max(len(self.detector_widths), len(self.unet_widths) - 1)
        if self.image_size % 2 ** levels:
            bad(f"image_size {self.image_size} must be divisible by 2**{levels} (the network depth)")
        if len(self.detector_up_widths) > len(self.detector_widths):
            bad("detector_up_widths cannot have more blocks than detector_widths (heatmaps larger than the image)")
        if self.method == "adaptation" and self.image_size % 2 ** (len(self.adapt_generator_widths) - 1):
            bad(f"image_size {self.image_size} must be divisible by 2**{len(self.adapt_generator_widths) - 1} "
                f"(adapt_generator_widths has {len(self.adapt_generator_widths)} levels)")
        if self.image_size % self.mask_grid:
            bad(f"image_size {self.image_size} must be divisible by mask_grid {self.mask_grid} (the patch grid)")
        if self.diagnostics_every is not None and self.diagnostics_every % self.log_every:
            bad(f"diagnostics_every must be 0 (off) or a multiple of log_every ({self.log_every}), "
                f"got {self.diagnostics_every}")
        if self.method == "3fabrec":
            self._validate_fabrec(bad)

    def _validate_fabrec(self, bad) -> None:
        stages = self.fabrec_ae_iterations + self.fabrec_finetune_iterations
        if stages >= self.iterations:
            bad(f"fabrec_ae_iterations ({self.fabrec_ae_iterations}) + fabrec_finetune_iterations "
                f"({self.fabrec_finetune_iterations}) must leave at least one of the {self.iterations} iterations "
                "to the transfer layers (stage 2)")
        for name in ("fabrec_encoder_widths", "fabrec_generator_widths", "fabrec_discriminator_widths"):
            blocks = len(getattr(self, name))
            if self.image_size % 2 ** blocks:
                bad(f"image_size {self.image_size} must be divisible by 2**{blocks} (the {blocks} blocks of {name})")
        if self.fabrec_ae_iterations and not self.batch_unlabeled:
            bad("batch_unlabeled must be at least 1: 3fabrec's stage 1 trains on unlabelled images")
        if self.uses("struct") and self.image_size < 11:
            bad(f"image_size {self.image_size} is smaller than the structural loss's 11x11 window "
                "(use --without struct)")

    def replace(self, **changes) -> "TrainConfig":
        """A copy with some fields changed (validated)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        """JSON-serializable dict; :meth:`from_dict` reads it back."""
        d = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"TrainConfig: unknown field(s) {sorted(unknown)}")
        return cls(**dict(d))

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "TrainConfig":
        """A preset (see :data:`PRESETS`), then the method's own values at that preset
        (:attr:`kpfast.methods.Method.presets`), then ``overrides``.

        Example:
            >>> cfg = TrainConfig.from_preset("paper", shots=5)
            >>> cfg.image_size, cfg.iterations, cfg.labeled_batch
            (128, 20000, 5)
        """
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
        chosen = overrides.get("method", PRESETS[name].get("method", cls.method))
        own = METHOD_REGISTRY[chosen].presets.get(name, {}) if chosen in METHOD_REGISTRY else {}
        return cls(**{**PRESETS[name], **own, **overrides, "preset": name})


def run_differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """What makes two config dicts different runs: ``["lr: 0.003 -> 0.0005", ...]`` over the
    fields outside :data:`RUN_FIELDS` (missing fields read as their defaults).

    Example:
        >>> a = TrainConfig.from_preset("tiny").to_dict()
        >>> run_differences(a, {**a, "lr": 5e-4, "progress": True})
        ['lr: 0.0001 -> 0.0005']
    """
    old, new = TrainConfig.from_dict(old).to_dict(), TrainConfig.from_dict(new).to_dict()
    return [f"{k}: {old[k]!r} -> {new[k]!r}" for k in new if k not in RUN_FIELDS and old[k] != new[k]]


INT_RANGES: dict[str, tuple[int, Optional[int]]] = {
    # field: (smallest, largest or None); seeds stay below 2**31 (numpy seeds must be < 2**32)
    "shots": (1, None), "image_size": (8, None), "train_size": (1, None), "test_size": (1, None),
    "data_seed": (0, 2**31 - 1), "iterations": (1, None), "batch_unlabeled": (0, None), "batch_labeled": (1, None),
    "random_partner_iterations": (0, None), "ramp_iterations": (0, None), "seed": (0, 2**31 - 1),
    "checkpoint_every": (1, None), "log_every": (1, None), "image_every": (0, None), "eval_batch": (1, None),
    "mask_grid": (1, None), "diagnostics_every": (0, None), "sc_channels": (1, None),
    "source_iterations": (1, None),
    "source_seed": (0, 2**31 - 1), "adapt_landmarks": (1, None), "adapt_generator_blocks": (1, None),
    "fabrec_ae_iterations": (0, None), "fabrec_finetune_iterations": (0, None), "fabrec_z_dim": (1, None),
}
FLOAT_RANGES: dict[str, tuple[float, float, bool]] = {
    # field: (low, high, low excluded); every value must be finite
    "lr": (0.0, math.inf, True), "w_few_shot": (0.0, math.inf, False), "w_recon": (0.0, math.inf, False),
    "w_geo2d": (0.0, math.inf, False), "w_geo3d": (0.0, math.inf, False), "w_smooth": (0.0, math.inf, False),
    "whole_object_weight": (0.0, math.inf, False), "mask_ratio": (0.0, 1.0, False),
    "depth_scale": (0.0, math.inf, True), "edge_lr_scale": (0.0, math.inf, True),
    "w_heatmap": (0.0, math.inf, False), "w_sc": (0.0, math.inf, False), "w_te": (0.0, math.inf, False),
    "w_ti": (0.0, math.inf, False), "heatmap_sigma": (0.0, math.inf, True),
    "adapt_landmark_beta": (0.0, math.inf, True), "adapt_landmark_sigma": (0.0, math.inf, True),
    "fabrec_ae_lr": (0.0, math.inf, True), "fabrec_itl_lr": (0.0, math.inf, True),
    "fabrec_w_rec": (0.0, math.inf, False), "fabrec_w_cs": (0.0, math.inf, False),
    "fabrec_w_enc": (0.0, math.inf, False), "fabrec_w_adv": (0.0, math.inf, False),
    "fabrec_sigma": (0.0, 1.0, True), "fabrec_beta": (0.0, math.inf, True), "fabrec_augment": (0.0, 1.0, False),
}
OPTIONAL_FIELDS = frozenset({"train_size", "test_size", "batch_labeled", "ramp_iterations", "cache_dir", "out",
                             "preset", "diagnostics_every", "source", "source_iterations", "fabrec_autoencoder"})
WIDTH_FIELDS_MIN_LENGTH = {"detector_widths": 1, "detector_up_widths": 0, "unet_widths": 2, "adapt_generator_widths": 2,
                           "fabrec_encoder_widths": 1, "fabrec_generator_widths": 2, "fabrec_discriminator_widths": 1}
"""Channel-list fields and the fewest blocks each takes."""


PRESETS: dict[str, dict] = {
    # the paper's settings (Supplement A): 128 px, Adam 1e-4 (0.9, 0.99), 16 + min(16, n), 20k iterations
    "paper": dict(),
    # the README's main job: 10-shot on the procedural face, < 10 min on 2 CPU cores, data and evaluation included
    "demo": dict(image_size=64, train_size=2000, test_size=300, iterations=1100, lr=3e-3,
                 batch_unlabeled=8, ramp_iterations=550, detector_widths=(32, 64, 128), detector_up_widths=(64,),
                 unet_widths=(8, 16, 32, 64), random_partner_iterations=100, checkpoint_every=250, log_every=10),
    # a few seconds: tests and smoke runs
    "tiny": dict(image_size=32, train_size=64, test_size=16, iterations=4, batch_unlabeled=4, shots=4,
                 detector_widths=(8, 16), detector_up_widths=(8,), unet_widths=(8, 16), perceptual="none",
                 few_shot_features="handcrafted", checkpoint_every=2, log_every=1, eval_batch=16, progress=False),
}
"""Named starting points; every field can still be overridden."""
