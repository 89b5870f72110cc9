"""Training configuration: one dataclass, named presets, validation with clear errors.

Methods (``method``):

- ``"full"``: the paper: few-shot L1 + reconstruction (skeleton edge map with
  uncertainty, 90 % patch masking, L1 + perceptual) + 2D equivariance + 3D part
  geometry (+ the face smoothness penalty on faces);
- ``"supervised"``: the few-shot L1 loss only, same detector and schedule;
- ``"autolink-few"``: AutoLink's all-pairs learned-weight graph + reconstruction
  + few-shot L1 (no geometry, no uncertainty).

Ablations (``without``, any subset): ``recon``, ``geo2d``, ``geo3d``,
``uncertainty`` (``full`` only) and ``kmeans`` (random few-shot examples instead
of the k-means selection; any method).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Mapping, Optional

METHODS = ("full", "supervised", "autolink-few")
# fields that change where and how a run reports, not what it computes (a resumed run or a
# rerun may change them)
RUN_FIELDS = frozenset({"resume", "progress", "out", "checkpoint_every", "log_every", "image_every", "eval_batch",
                        "device", "cache_dir", "preset"})
ABLATIONS = ("recon", "geo2d", "geo3d", "uncertainty", "kmeans")
OPS = ("fused", "reference")
LR_SCHEDULES = ("constant", "cosine")


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
    length; None = ``iterations``), ``mask_ratio``, ``depth_scale``.

    Networks: ``detector_widths``, ``detector_up_widths``, ``unet_widths``, ``norm``,
    ``channels_last`` (NHWC convolutions: about 30 % faster on CPU, same results up
    to rounding).

    Run: ``seed``, ``device`` (``"auto"``, ``"cpu"``, ``"cuda"``), ``out``,
    ``checkpoint_every``, ``log_every``, ``image_every`` (PNG snapshots; 0 = only
    at the end), ``eval_batch``, ``progress``, ``resume``.
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
    depth_scale: float = 20.0
    # networks
    detector_widths: tuple = (64, 128, 256, 512)
    detector_up_widths: tuple = (256, 256)
    unet_widths: tuple = (32, 64, 128, 256)
    norm: str = "batch"
    channels_last: bool = True
    # run
    seed: int = 0
    device: str = "auto"
    out: Optional[str] = None
    checkpoint_every: int = 500
    log_every: int = 10
    image_every: int = 0
    eval_batch: int = 64
    progress: bool = True
    resume: bool = False
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
    def ramp_length(self) -> int:
        return self.ramp_iterations if self.ramp_iterations is not None else self.iterations

    def uses(self, component: str) -> bool:
        """Whether the run trains with ``component`` (``recon``, ``geo2d``, ``geo3d``,
        ``uncertainty``, ``smooth``, ``kmeans``)."""
        if component == "kmeans":
            return "kmeans" not in self.without
        if self.method == "supervised":
            return False
        if self.method == "autolink-few":
            return component == "recon"
        if component == "smooth":
            return self.w_smooth > 0
        return component not in self.without

    @property
    def method_label(self) -> str:
        """``"full"``, ``"full without geo3d, kmeans"``, ..."""
        return self.method + (f" without {', '.join(self.without)}" if self.without else "")

    # -- construction ----------------------------------------------------------
    def __post_init__(self):
        if isinstance(self.without, str):
            self.without = (self.without,)
        self.without = tuple(sorted(set(self.without), key=lambda w: (ABLATIONS + (w,)).index(w)))
        for name in ("betas", "detector_widths", "detector_up_widths", "unet_widths"):
            setattr(self, name, tuple(getattr(self, name)))
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the field for any inconsistent setting."""
        def bad(msg):
            raise ValueError(f"TrainConfig: {msg}")

        if self.method not in METHODS:
            bad(f"method must be one of {METHODS}, got {self.method!r}")
        unknown = [w for w in self.without if w not in ABLATIONS]
        if unknown:
            bad(f"without: unknown component(s) {unknown}; choose from {ABLATIONS}")
        not_full = [w for w in self.without if w != "kmeans"]
        if self.method != "full" and not_full:
            bad(f"without {not_full} only applies to method 'full' (method {self.method!r} does not use them)")
        if self.ops not in OPS:
            bad(f"ops must be one of {OPS}, got {self.ops!r}")
        if not isinstance(self.shots, int) or self.shots < 1:
            bad(f"shots must be a positive int, got {self.shots!r}")
        if not isinstance(self.iterations, int) or self.iterations < 1:
            bad(f"iterations must be a positive int, got {self.iterations!r}")
        if self.batch_unlabeled < 0 or self.labeled_batch < 1:
            bad(f"batch_unlabeled must be >= 0 and batch_labeled >= 1, got {self.batch_unlabeled}, {self.batch_labeled}")
        if self.labeled_batch > self.shots:
            bad(f"batch_labeled {self.labeled_batch} exceeds shots {self.shots}")
        levels = max(len(self.detector_widths), len(self.unet_widths) - 1)
        if self.image_size % 8 or self.image_size % 2 ** levels:
            bad(f"image_size {self.image_size} must be divisible by 8 (the 8x8 mask grid) and by 2**{levels} "
                f"(the network depth)")
        if len(self.detector_up_widths) > len(self.detector_widths):
            bad("detector_up_widths cannot have more blocks than detector_widths (heatmaps larger than the image)")
        if not 0 <= self.mask_ratio <= 1:
            bad(f"mask_ratio must be in [0, 1], got {self.mask_ratio}")
        if self.lr_schedule not in LR_SCHEDULES:
            bad(f"lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}")
        if self.norm not in ("batch", "group", "none"):
            bad(f"norm must be 'batch', 'group' or 'none', got {self.norm!r}")
        if self.checkpoint_every < 1 or self.log_every < 1 or self.image_every < 0:
            bad("checkpoint_every and log_every must be >= 1, image_every >= 0")
        if self.lr <= 0 or len(self.betas) != 2:
            bad(f"lr must be > 0 and betas a pair, got lr={self.lr}, betas={self.betas}")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            bad(f"device must be 'auto', 'cpu' or 'cuda[:N]', got {self.device!r}")
        if self.preset is not None and self.preset not in PRESETS:
            bad(f"preset must be one of {sorted(PRESETS)}, got {self.preset!r}")

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
        """A preset (see :data:`PRESETS`) with ``overrides`` applied.

        Example:
            >>> cfg = TrainConfig.from_preset("paper", shots=5)
            >>> cfg.image_size, cfg.iterations, cfg.labeled_batch
            (128, 20000, 5)
        """
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides, "preset": name})


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
