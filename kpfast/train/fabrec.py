"""``--method 3fabrec``: few-shot keypoints by reconstruction (Browatzki & Wallraven, CVPR 2020).

One run, three stages on one step counter (:class:`Schedule`):

1. **autoencoder** (steps ``[0, fabrec_ae_iterations)``): encoder and generator reconstruct the
   unlabelled images (``batch_unlabeled`` per step and process) through a ``fabrec_z_dim`` code,
   with the pixel L1 loss ``rec``, the structural loss ``cs``, the encoding feature loss ``enc``
   (the encoder against a latent discriminator that tells its codes from normal samples) and the
   adversarial feature loss ``adv`` (encoder and generator against an image discriminator that
   tells reconstructions from images), Adam (0, 0.999) at ``fabrec_ae_lr``; after each update the
   two discriminators take one step of their own (``disc_z``, ``disc_x``) with their own Adam.
   At the end of the stage the autoencoder is written to ``autoencoder.pt``: a later run reuses it
   with ``fabrec_autoencoder`` and starts at step ``fabrec_ae_iterations``.
2. **transfer** (until ``iterations - fabrec_finetune_iterations``): the autoencoder frozen (its
   normalization statistics too), the interleaved transfer layers and the heatmap head learn the
   L2 heatmap loss ``heatmap`` on the labelled images (``labeled_batch`` per step), each augmented
   with a random rotation, translation, scale and flip (the paper's ranges at ``fabrec_augment``),
   Adam (0, 0.999) at ``fabrec_itl_lr``.
3. **finetune** (the last ``fabrec_finetune_iterations`` steps; ``--without finetune``: stage 2
   continues): the encoder's weights train too, at ``fabrec_ae_lr``, the transfer layers at a tenth
   of ``fabrec_itl_lr``, Adam's ``beta1`` back at 0.9; the generator stays frozen.

``--without adv`` drops the image discriminator and ``adv``; ``--without struct`` drops ``cs``.
Each stage has its own optimizer, all of them in the checkpoint (:class:`StageOptimizers`), so a
run resumes bit for bit in any stage and across their boundaries. Under ``torchrun`` the gradients
are averaged by hand after each backward pass (the stages train different parts of one model, so
DistributedDataParallel's fixed set of parameters does not fit) and the normalization statistics
follow rank 0's. Random draws: the prior codes from their own stream (``prior``), the
augmentations from ``transforms``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor, nn

from ..checkpoint import AUTOENCODER_NAME, FORMAT_VERSION, CheckpointError, load_checkpoint, save_checkpoint_file
from ..config import TrainConfig
from ..data import KeypointMeta
from ..data.transforms import TransformRanges, sample_transform
from ..losses.fabrec import (discriminator_loss, gaussian_heatmaps, generator_loss, heatmap_loss, pixel_l1_loss,
                             structural_loss)
from ..models.fabrec import FabRecModel, fabrec_model_from_config
from .data import Batch, fetch
from .diagnostics import Diagnostics
from .guard import all_finite
from .hooks import Hook
from .loop import Trainer
from .results import Checkpointer
from .objective import TermRecord
from .streams import STEP_STREAMS, RandomStreams

__all__ = ["FabRecTrainer", "FabRecObjective", "FabRecTerms", "FabRecOutputs", "Schedule", "StageOptimizers",
           "load_autoencoder", "PAPER_AUGMENTATION"]

AUTOENCODER, TRANSFER, FINETUNE = 1, 2, 3
STAGE_NAMES = {AUTOENCODER: "autoencoder", TRANSFER: "transfer", FINETUNE: "finetune"}
ARCHITECTURE_FIELDS = ("image_size", "norm", "fabrec_z_dim", "fabrec_encoder_widths", "fabrec_generator_widths")
"""The config fields an autoencoder file must share with the run that reuses it."""
PAPER_AUGMENTATION = TransformRanges(rotation_deg=30.0, translation=0.04, scale=0.05, flip_prob=0.5,
                                     brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0)
"""The paper's stage-2 augmentation (rotation +-30 deg, translation +-4 %, flip p = 0.5; kpfast's
scale range is one-sided: zoom out by up to 5 %); applied at strength ``fabrec_augment``."""


@dataclass(frozen=True)
class Schedule:
    """Which stage each step of a run trains (see the module docstring).

    Example:
        >>> s = Schedule(ae_end=3, finetune_start=5, iterations=6, finetune=True)
        >>> [s.stage(i) for i in range(6)]
        [1, 1, 1, 2, 2, 3]
    """

    ae_end: int
    finetune_start: int
    iterations: int
    finetune: bool

    @classmethod
    def from_config(cls, cfg: TrainConfig) -> "Schedule":
        return cls(ae_end=cfg.fabrec_ae_iterations, finetune_start=cfg.iterations - cfg.fabrec_finetune_iterations,
                   iterations=cfg.iterations, finetune=cfg.uses("finetune"))

    def stage(self, step: int) -> int:
        """The stage of (0-based) ``step``: 1, 2 or 3."""
        if step < self.ae_end:
            return AUTOENCODER
        return FINETUNE if self.finetune and step >= self.finetune_start else TRANSFER

    def describe(self, loaded: bool) -> str:
        """What the run's steps do, for its first lines.

        Example:
            >>> Schedule(ae_end=2, finetune_start=3, iterations=4, finetune=True).describe(loaded=False)
            'kpfast train: 3fabrec stages: steps 1-2 train the autoencoder, step 3 the transfer layers, step 4 fine-tunes the encoder with them'
        """
        def steps(first, last):
            return f"step {first}" if first == last else f"steps {first}-{last}"

        end = self.finetune_start if self.finetune else self.iterations
        parts = []
        if self.ae_end:
            parts.append(steps(1, self.ae_end) + (" read from the autoencoder file" if loaded else " train the autoencoder"))
        parts.append(steps(self.ae_end + 1, end) + " the transfer layers")
        if end < self.iterations:
            parts.append(steps(end + 1, self.iterations) + (" fine-tunes" if end + 1 == self.iterations else " fine-tune")
                         + " the encoder with them")
        return "kpfast train: 3fabrec stages: " + ", ".join(parts)


@dataclass
class FabRecTerms(TermRecord):
    """The unweighted loss terms of one 3fabrec step; a term the step does not train is None."""

    rec: Optional[Tensor] = None
    cs: Optional[Tensor] = None
    enc: Optional[Tensor] = None
    adv: Optional[Tensor] = None
    heatmap: Optional[Tensor] = None



@dataclass
class FabRecOutputs:
    """What a step computed: its stage, the images it saw (augmented in stages 2-3) ``[B, 3, S, S]``,
    their codes ``[B, z_dim]``, the reconstructions (stage 1) and the heatmaps (stages 2-3)."""

    stage: int
    images: Tensor
    codes: Tensor
    reconstruction: Optional[Tensor] = None
    heatmaps: Optional[Tensor] = None


class FabRecObjective:
    """The loss terms of a 3fabrec step: called as ``(model, batch, step, streams)`` ->
    ``(FabRecTerms, FabRecOutputs)`` like :class:`~kpfast.train.objective.Objective`, with
    ``weights``, ``total`` and :meth:`discriminator_terms` for the discriminators' own step."""

    def __init__(self, cfg: TrainConfig, meta: KeypointMeta):
        self.cfg, self.meta = cfg, meta
        self.schedule = Schedule.from_config(cfg)
        self.weights = {"rec": cfg.fabrec_w_rec, "cs": cfg.fabrec_w_cs, "enc": cfg.fabrec_w_enc,
                        "adv": cfg.fabrec_w_adv, "heatmap": 1.0}
        self.active = {"cs": cfg.uses("struct"), "adv": cfg.uses("adv")}

    def total(self, terms: FabRecTerms) -> Tensor:
        return sum(self.weights[k] * v for k, v in terms.as_dict().items())

    def __call__(self, model: FabRecModel, batch: Batch, step: int,
                 streams: RandomStreams) -> tuple[FabRecTerms, FabRecOutputs]:
        stage = self.schedule.stage(step)
        if stage == AUTOENCODER:
            return self.autoencoder_terms(model, batch.images)
        return self.heatmap_terms(model, batch, stage, streams)

    def autoencoder_terms(self, model: FabRecModel, images: Tensor) -> tuple[FabRecTerms, FabRecOutputs]:
        """Stage 1: ``rec``, ``cs``, ``enc``, ``adv`` of the reconstructions of ``images``."""
        det = model.detector
        codes = det.encoder(images)
        recon = det.generator(codes)
        terms = FabRecTerms(rec=pixel_l1_loss(recon, images), enc=generator_loss(model.latent_discriminator(codes)))
        if self.active["cs"]:
            terms.cs = structural_loss(recon, images)
        if self.active["adv"]:
            terms.adv = generator_loss(model.image_discriminator(recon))
        return terms, FabRecOutputs(AUTOENCODER, images, codes, reconstruction=recon)

    def heatmap_terms(self, model: FabRecModel, batch: Batch, stage: int,
                      streams: RandomStreams) -> tuple[FabRecTerms, FabRecOutputs]:
        """Stages 2-3: ``heatmap`` on the augmented labelled images (labelled keypoints that stay inside)."""
        images, keypoints, mask = batch.images, batch.labeled_keypoints, batch.labeled_mask
        if self.cfg.fabrec_augment > 0:
            T = sample_transform(images.shape[0], self.cfg.fabrec_augment, size=tuple(images.shape[-2:]),
                                 generator=streams["transforms"], ranges=PAPER_AUGMENTATION, device=images.device)
            images = T.warp_images(images)
            keypoints, inside = T.apply_keypoints(keypoints, self.meta.flip_perm)
            mask = mask & inside
        det = model.detector
        with torch.set_grad_enabled(stage == FINETUNE and torch.is_grad_enabled()):
            codes = det.encoder(images)
        heat = det.heatmaps(codes)
        side = heat.shape[-1]
        target = gaussian_heatmaps(keypoints, side, self.cfg.fabrec_sigma * side)
        return FabRecTerms(heatmap=heatmap_loss(heat, target, mask)), FabRecOutputs(stage, images, codes, heatmaps=heat)

    def discriminator_terms(self, model: FabRecModel, outputs: FabRecOutputs, streams: RandomStreams) -> dict:
        """The discriminators' losses on a stage-1 step's (detached) codes and reconstructions:
        ``disc_z`` (prior samples from the ``prior`` stream vs codes) and ``disc_x`` (images vs
        reconstructions; with the adversarial loss only)."""
        codes = outputs.codes.detach()
        prior = torch.randn(codes.shape, generator=streams["prior"]).to(codes)
        d_z = model.latent_discriminator
        out = {"disc_z": discriminator_loss(d_z(prior), d_z(codes))}
        if self.active["adv"]:
            d_x = model.image_discriminator
            out["disc_x"] = discriminator_loss(d_x(outputs.images), d_x(outputs.reconstruction.detach()))
        return out


class StageOptimizers:
    """The Adam optimizers of a 3fabrec run by name (``autoencoder``, ``discriminators``, ``transfer``,
    ``finetune``), saved and restored as one (``state_dict`` maps each name to its optimizer's);
    ``state`` merges their per-parameter states (what the NaN guard inspects)."""

    def __init__(self, optimizers: dict[str, torch.optim.Optimizer]):
        self.optimizers = optimizers

    def __getitem__(self, name: str) -> torch.optim.Optimizer:
        return self.optimizers[name]

    @property
    def state(self) -> dict:
        merged = {}
        for o in self.optimizers.values():
            merged.update(o.state)
        return merged

    @property
    def param_groups(self) -> list[dict]:
        return [g for o in self.optimizers.values() for g in o.param_groups]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.optimizers.values():
            o.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {name: o.state_dict() for name, o in self.optimizers.items()}

    def load_state_dict(self, state: dict) -> None:
        if set(state) != set(self.optimizers):
            raise KeyError(f"the optimizers are {sorted(self.optimizers)}, the state holds {sorted(state)}")
        for name, o in self.optimizers.items():
            o.load_state_dict(state[name])


def _prefixed(state: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def load_autoencoder(path: str | Path, cfg: TrainConfig) -> tuple[dict, dict, Path]:
    """``(encoder state, generator state, file)`` of a stage-1 autoencoder for a run of ``cfg``.

    ``path``: a 3fabrec run folder (its ``autoencoder.pt``) or the file. Read with
    :func:`kpfast.checkpoint.load_checkpoint` (tensors and plain values only: no code runs; checksum
    verified).

    Raises:
        FileNotFoundError: no such file.
        kpfast.checkpoint.CheckpointError: not an autoencoder file, damaged, or its networks differ
            from ``cfg``'s (the differing fields are named).
    """
    path = Path(path)
    if path.is_dir():
        path = path / AUTOENCODER_NAME
    if not path.is_file():
        raise FileNotFoundError(f"fabrec_autoencoder: no 3fabrec autoencoder at {str(path)!r} (a 3fabrec run writes "
                                f"{AUTOENCODER_NAME} into its folder when its stage 1 ends)")
    ckpt = load_checkpoint(path, map_location="cpu")
    if ckpt["kind"] != "autoencoder":
        raise CheckpointError(f"{path}: a {ckpt['kind']} file, not a 3fabrec autoencoder ({AUTOENCODER_NAME})")
    theirs, ours = TrainConfig.from_dict(ckpt["config"]).to_dict(), cfg.to_dict()
    differ = [f"{k}: {theirs[k]!r} here {ours[k]!r}" for k in ARCHITECTURE_FIELDS if theirs[k] != ours[k]]
    if differ:
        raise CheckpointError(f"{path}: its autoencoder does not fit this run's networks ({'; '.join(differ)})")
    return _prefixed(ckpt["model"], "encoder."), _prefixed(ckpt["model"], "generator."), path


class AutoencoderFile(Hook):
    """Writes ``autoencoder.pt`` (rank 0) when the run's stage 1 ends: the encoder and generator, its
    config, the data's meta and the step, for :func:`load_autoencoder`."""

    def __init__(self, trainer: "FabRecTrainer"):
        self.trainer = trainer

    def after_step(self, step: int, scalars: dict[str, float]) -> None:
        tr = self.trainer
        if step != tr.schedule.ae_end or tr.out is None:
            return
        tr.guard.check_state(f"at the end of stage 1 (step {step}), so {AUTOENCODER_NAME} was not written")
        if tr.world.is_main:
            state = {k: v for k, v in tr.model.detector.state_dict().items() if k.startswith(("encoder.", "generator."))}
            save_checkpoint_file({"format": "kpfast", "version": FORMAT_VERSION, "kind": "autoencoder", "step": step,
                                  "config": tr.cfg.to_dict(), "meta": tr.meta.to_dict(), "model": state},
                                 tr.out / AUTOENCODER_NAME)
        tr.world.barrier()


class FabRecTrainer(Trainer):
    """The :class:`~kpfast.train.Trainer` of ``--method 3fabrec`` (see the module docstring)."""

    stream_names = (*STEP_STREAMS, "prior")

    # -- the method's parts ------------------------------------------------------
    def build_networks(self) -> None:
        cfg = self.cfg
        model = fabrec_model_from_config(cfg, self.meta)
        self.model = (model.to(memory_format=torch.channels_last) if cfg.channels_last else model).to(self.device)
        self.perceptual = None
        self.autoencoder_file: Optional[Path] = None
        if cfg.fabrec_autoencoder is not None and self.resume_checkpoint is None:
            encoder, generator, self.autoencoder_file = load_autoencoder(cfg.fabrec_autoencoder, cfg)
            self.model.detector.encoder.load_state_dict(encoder)
            self.model.detector.generator.load_state_dict(generator)

    def build_objective(self) -> None:
        self.objective = FabRecObjective(self.cfg, self.meta)
        self.schedule = self.objective.schedule
        self.discriminator_scalars: dict[str, float] = {}
        self.outputs: Optional[FabRecOutputs] = None
        if self.world.is_main:
            print(self.schedule.describe(loaded=self.cfg.fabrec_autoencoder is not None)
                  + (f" ({self.autoencoder_file})" if self.autoencoder_file else ""), flush=True)

    def build_optimizer(self) -> StageOptimizers:
        cfg, det = self.cfg, self.model.detector
        autoencoder = [*det.encoder.parameters(), *det.generator.parameters()]
        transfer = [*det.itls.parameters(), *det.head.parameters()]
        discriminators = [p for d in self.model.discriminators for p in d.parameters()]
        return StageOptimizers({
            "autoencoder": torch.optim.Adam(autoencoder, lr=cfg.fabrec_ae_lr, betas=(0.0, 0.999)),
            "discriminators": torch.optim.Adam(discriminators, lr=cfg.fabrec_ae_lr, betas=(0.0, 0.999)),
            "transfer": torch.optim.Adam(transfer, lr=cfg.fabrec_itl_lr, betas=(0.0, 0.999)),
            "finetune": torch.optim.Adam([{"params": list(det.encoder.parameters()), "lr": cfg.fabrec_ae_lr},
                                          {"params": transfer, "lr": cfg.fabrec_itl_lr / 10}], betas=(0.9, 0.999)),
        })

    def initial_step(self) -> int:
        """``fabrec_ae_iterations`` when the autoencoder comes from a file (stage 1 is done), else 0."""
        return self.schedule.ae_end if self.autoencoder_file is not None else 0

    def wrap_distributed(self) -> nn.Module:
        return self.model  # gradients are averaged in update()

    def detect(self, images: Tensor) -> Tensor:
        return self.model.detector(images).keypoints

    def draw_pictures(self, folder: Path, prefix: str = "", n: int = 16) -> None:
        """``predictions.png`` (test images; colour = heatmap peak height; ground truth beside) and
        ``reconstructions.png`` (image | reconstruction | predicted heatmaps | heatmaps over the image)."""
        from .. import viz
        from ..ops import backend
        from ..data import collate_samples

        det = self.model.detector
        self.model.eval()
        b = collate_samples([self.data.test[i] for i in range(min(n, len(self.data.test)))])
        images = b["image"].to(self.device)
        with torch.no_grad(), backend.use_backend(self.backend):
            codes = det.encoder(images)
            recon = det.generator(codes)
            heat = det.heatmaps(codes)
            out = det.read_keypoints(heat)
        viz.save(viz.prediction_sheet(images.cpu(), out.keypoints.cpu(), self.meta,
                                      certainty=torch.sigmoid(out.uncertainty).cpu(), ground_truth=b["keypoints"],
                                      cols=4), folder / f"{prefix}predictions.png")
        viz.save(viz.reconstruction_heatmap_sheet(images.cpu(), recon.cpu(), heat.cpu()),
                 folder / f"{prefix}reconstructions.png")

    def default_hooks(self) -> list[Hook]:
        """The base hooks without the keypoint diagnostics (3fabrec has one keypoint term), with
        :class:`AutoencoderFile` just before the checkpointer (a checkpoint past stage 1 implies the file)."""
        hooks = [h for h in super().default_hooks() if not isinstance(h, Diagnostics)]
        at = next(i for i, h in enumerate(hooks) if isinstance(h, Checkpointer))
        return hooks[:at] + [AutoencoderFile(self)] + hooks[at:]

    # -- a step ------------------------------------------------------------------
    def apply_stage(self, stage: int) -> None:
        """Which networks train in ``stage`` (``requires_grad``) and in which mode: the frozen ones in
        eval mode (their normalization statistics stay put; the encoder's also while it is
        fine-tuned on the few labelled images); the discriminators train in their own step only."""
        det = self.model.detector
        training = {AUTOENCODER: (det.encoder, det.generator), TRANSFER: (det.itls, det.head),
                    FINETUNE: (det.encoder, det.itls, det.head)}[stage]
        self.model.eval()
        self.model.requires_grad_(False)
        for m in training:
            m.requires_grad_(True)
            if not (stage == FINETUNE and m is det.encoder):
                m.train()
        if stage == AUTOENCODER:
            for d in self.model.discriminators:
                d.train()

    def next_batch(self) -> Batch:
        """Stage 1: ``batch_unlabeled`` unlabelled images; stages 2-3: the next labelled images."""
        if self.schedule.stage(self.step) == AUTOENCODER:
            images = fetch(self.data.train, self.unlabeled.next(), self.device)["image"]
            K = self.meta.num_keypoints
            return Batch(images=images, labeled_keypoints=images.new_zeros(0, K, 2),
                         labeled_mask=torch.zeros(0, K, dtype=torch.bool, device=self.device))
        lab = fetch(self.data.train, self.labeled.next(), self.device)
        return Batch(images=lab["image"], labeled_keypoints=lab["keypoints"], labeled_mask=lab["labeled"])

    def compute_losses(self, batch: Batch, step: int) -> tuple[FabRecTerms, FabRecOutputs]:
        self.apply_stage(self.schedule.stage(step))
        self.step_random_state = self.streams.state_dict()
        terms, self.outputs = self.objective(self.model, batch, step, self.streams)
        return terms, self.outputs

    def update(self, step: int) -> None:
        """The stage's optimizer step (gradients averaged over the processes first), then in stage 1
        the discriminators' step; under torchrun rank 0's normalization statistics everywhere."""
        stage = self.schedule.stage(step)
        optimizer = self.optimizer[STAGE_NAMES[stage]]
        params = [p for g in optimizer.param_groups for p in g["params"]]
        self.world.average_gradients(params)
        optimizer.step()
        self.discriminator_scalars = self.update_discriminators(step) if stage == AUTOENCODER else {}
        self.world.broadcast_buffers(self.model)

    def update_discriminators(self, step: int) -> dict[str, float]:
        """One step of the discriminators on the stage-1 step's outputs; stops the run (NaN guard) if a
        loss or gradient is not finite. Returns their losses for the log."""
        optimizer = self.optimizer["discriminators"]
        params = [p for g in optimizer.param_groups for p in g["params"]]
        for p in params:
            p.requires_grad_(True)
        terms = self.objective.discriminator_terms(self.model, self.outputs, self.streams)
        values = {k: float(v.detach()) for k, v in terms.items()}
        if not self.world.all_true(all(math.isfinite(v) for v in values.values())):
            self.guard.stop(f"non-finite discriminator loss at step {step + 1}: {values}")
        optimizer.zero_grad(set_to_none=True)
        sum(terms.values()).backward()
        if not self.world.all_true(all_finite([p.grad for p in params])):
            self.guard.stop(f"the discriminators' gradient is not finite at step {step + 1} (losses {values}; "
                            f"fabrec_ae_lr={self.cfg.fabrec_ae_lr!r})")
        self.world.average_gradients(params)
        optimizer.step()
        for p in params:
            p.requires_grad_(False)
        return values

    def log_row(self, step: int, terms: FabRecTerms, total: Tensor) -> dict[str, float]:
        """Each loss term, the discriminators' losses (stage 1), the total, the stage and its learning rate."""
        stage = self.schedule.stage(step)
        scalars = {k: float(v.detach()) for k, v in terms.as_dict().items()}
        scalars.update(self.discriminator_scalars)
        scalars["total"] = float(total.detach())
        scalars["stage"] = float(stage)
        scalars["lr"] = self.optimizer[STAGE_NAMES[stage]].param_groups[-1]["lr"]
        return scalars
