"""Inference: :func:`load` a trained model and predict keypoints on new images.

Example (after ``python -m kpfast.train --preset demo --out runs/demo``; the
README's training example runs the same calls on a tiny model)::

    import kpfast
    predictor = kpfast.load("runs/demo")
    out = predictor.predict(PIL.Image.open("face.jpg"))
    out.keypoints[0]          # [K, 2] (x, y) in the input image's pixels
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .checkpoint import CheckpointError, load_checkpoint, resolve_checkpoint_path
from .config import TrainConfig
from .data import KeypointMeta
from .methods import DETECTOR_INFERENCE, method, resolve

ImageInput = Union[Tensor, np.ndarray, "PIL.Image.Image", Sequence]  # noqa: F821


@dataclass
class Prediction:
    """Keypoints of ``B`` images, in each input image's own pixel coordinates.

    Attributes:
        keypoints: ``[B, K, 2]`` ``(x, y)`` pixels; ``(0, 0)`` is the centre of the
            top-left pixel, ``(W - 1, H - 1)`` the centre of the bottom-right one.
        uncertainty: ``[B, K]`` uncertainty logits ``v`` read out of the uncertainty maps.
        confidence: ``[B, K]`` ``sigmoid(v)`` in [0, 1] (the intensity the edge map
            draws a keypoint's edges with; 1 = certain).
        depth: ``[B, K]`` relative depth in ``(-1, 1)`` (``tanh`` of the depth readout;
            up to the scale and offset the 3D loss leaves free).
        sizes: ``[(H, W), ...]`` of the inputs.
    """

    keypoints: Tensor
    uncertainty: Tensor
    confidence: Tensor
    depth: Tensor
    sizes: list

    def to_json(self, names: Sequence[str]) -> list[dict]:
        """One dict per image: ``{"size": [H, W], "keypoints": {name: {"x", "y", "confidence", "depth"}}}``."""
        out = []
        for b, (h, w) in enumerate(self.sizes):
            kps = {}
            for k, name in enumerate(names):
                kps[name] = {"x": float(self.keypoints[b, k, 0]), "y": float(self.keypoints[b, k, 1]),
                             "confidence": float(self.confidence[b, k]), "depth": float(self.depth[b, k])}
            out.append({"size": [int(h), int(w)], "keypoints": kps})
        return out


def _to_tensor(image) -> Tensor:
    """One image -> float ``[3, H, W]`` in [0, 1].

    Layouts: a tensor is channels-first ``[C, H, W]``, a numpy array (and a PIL image)
    channels-last ``[H, W, C]``, ``C`` in 1 (grey), 3 (RGB), 4 (RGBA: alpha dropped),
    or ``[H, W]`` grey. Only when the type's own layout cannot hold the shape is the
    other one taken (a tensor ``[H, W, 3]`` with ``H`` not 1, 3 or 4; an array
    ``[3, H, W]`` with ``W`` not 1, 3 or 4), so a 3-pixel-high PIL image is read as
    3 rows, never as 3 channels.
    """
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover
        Image = None
    if Image is not None and isinstance(image, Image.Image):
        image = np.array(image.convert("RGB"))
    if isinstance(image, np.ndarray):
        t, channels_last = torch.as_tensor(image), True
    elif isinstance(image, Tensor):
        t, channels_last = image, False
    else:
        raise TypeError(f"images must be tensors, numpy arrays or PIL images, got {type(image).__name__}")
    if t.dim() == 2:
        t = t.unsqueeze(0)
    elif t.dim() == 3:
        first, last = t.shape[0] in (1, 3, 4), t.shape[-1] in (1, 3, 4)
        if not (first or last):
            raise ValueError(f"an image must be [C, H, W] (tensor) or [H, W, C] (array) with C in 1, 3, 4, "
                             f"or [H, W], got shape {tuple(t.shape)}")
        if channels_last and last or not channels_last and not first:
            t = t.permute(2, 0, 1)
    else:
        raise ValueError(f"an image must be [3, H, W], [H, W, 3] or [H, W], got shape {tuple(t.shape)}")
    if t.shape[0] == 4:
        t = t[:3]
    if t.shape[0] == 1:
        t = t.expand(3, -1, -1)
    if t.dtype == torch.uint8:
        return t.float() / 255.0
    if not t.is_floating_point():
        raise TypeError(f"images must be uint8 (0-255) or float (0-1), got {t.dtype}")
    return t.float()


class KeypointPredictor:
    """A trained detector with its keypoint definitions, ready for new images.

    Args:
        detector: a :class:`kpfast.models.KeypointDetector`.
        meta: the keypoints' :class:`KeypointMeta` (names, skeleton).
        image_size: the side the detector was trained at; inputs are resized to it.
        info: what the checkpoint says about the run (config, step).
    """

    def __init__(self, detector, meta: KeypointMeta, image_size: int, info: dict | None = None):
        self.detector = detector.eval()
        self.meta = meta
        self.image_size = int(image_size)
        self.info = info or {}

    @property
    def device(self) -> torch.device:
        return next(self.detector.parameters()).device

    def to(self, device) -> "KeypointPredictor":
        self.detector.to(device)
        return self

    def _batch(self, images) -> tuple[Tensor, list]:
        if isinstance(images, Tensor) and images.dim() == 4:
            items = list(images)
        elif isinstance(images, (list, tuple)):
            items = list(images)
        else:
            items = [images]
        if not items:
            raise ValueError("predict needs at least one image")
        S = self.image_size
        resized, sizes = [], []
        for im in items:
            t = _to_tensor(im)
            sizes.append(tuple(t.shape[-2:]))
            if tuple(t.shape[-2:]) != (S, S):
                t = F.interpolate(t[None], size=(S, S), mode="bilinear", align_corners=False, antialias=True)[0]
            resized.append(t.clamp(0, 1))
        return torch.stack(resized).to(self.device), sizes

    @torch.no_grad()
    def predict(self, images: ImageInput, *, batch_size: int = 64) -> Prediction:
        """Keypoints, uncertainty and depth for ``images``.

        ``images``: a tensor ``[B, 3, H, W]`` (uint8 0-255 or float 0-1), one image
        (tensor ``[3, H, W]``, array ``[H, W, 3]``, PIL image; see :func:`_to_tensor`
        for the layouts) or a list of them of any sizes. Each image is resized to the
        model's size (antialiased bilinear, aspect ratio not kept) and the keypoints are
        mapped back to its own pixels.
        """
        x, sizes = self._batch(images)
        outs = [self.detector(x[i:i + batch_size]) for i in range(0, len(x), batch_size)]
        kp = torch.cat([o.keypoints for o in outs]).cpu().double()
        v = torch.cat([o.uncertainty for o in outs]).cpu().float()
        d = torch.cat([o.depth for o in outs]).cpu().float()
        S = self.image_size
        px = (kp + 1) / 2 * (S - 1)  # pixels of the S x S model input (align_corners convention)
        hw = torch.tensor(sizes, dtype=torch.float64)  # [B, 2] (H, W)
        wh = hw.flip(-1)[:, None, :]
        # resizing with align_corners=False maps input pixel centre p to (p + 0.5) * S / W - 0.5
        px = (px + 0.5) * wh / S - 0.5
        return Prediction(keypoints=px.float(), uncertainty=v, confidence=torch.sigmoid(v), depth=d, sizes=sizes)


def load(checkpoint: Union[str, os.PathLike], *, device: Union[str, torch.device] = "cpu") -> KeypointPredictor:
    """A :class:`KeypointPredictor` from a run directory, ``model.pt`` or ``checkpoint.pt``.

    The file is read with :func:`kpfast.checkpoint.load_checkpoint`: only tensors
    and plain values (loading never runs code from the file), checksum verified.

    Raises:
        FileNotFoundError: nothing at ``checkpoint``.
        kpfast.checkpoint.CheckpointError: (a ``ValueError``) the file is unsafe,
            damaged or not a kpfast model; the message names it.

    Example::

        predictor = load("runs/demo")
        predictor.predict(torch.rand(2, 3, 200, 150)).keypoints.shape   # torch.Size([2, 68, 2])
    """
    path = resolve_checkpoint_path(checkpoint)
    ckpt = load_checkpoint(path, map_location="cpu")  # safe: tensors and plain values only, checksum verified
    cfg = TrainConfig.from_dict(ckpt["config"])
    state = ckpt["model"]
    if ckpt.get("kind") == "autoencoder":
        raise CheckpointError(f"{path}: the stage-1 autoencoder of a 3fabrec run, not a keypoint model; load the "
                              "run's model.pt")
    if ckpt.get("kind") == "training":
        if method(cfg.method).inference != DETECTOR_INFERENCE:  # its training checkpoint holds more than a detector
            raise CheckpointError(f"{path}: a training checkpoint of method {cfg.method!r}; load the run's model.pt")
        state = {k[len("detector."):]: v for k, v in state.items() if k.startswith("detector.")}
    try:
        meta = KeypointMeta.from_config(ckpt["meta"])
        det = resolve(method(cfg.method).inference)(cfg, meta)
        det.load_state_dict(state)
    except (RuntimeError, ValueError, TypeError, KeyError) as e:
        raise CheckpointError(f"{path}: its keypoint meta or weights do not fit the {cfg.method} network its "
                              f"config describes ({type(e).__name__}: {e})") from None
    if cfg.channels_last:
        det = det.to(memory_format=torch.channels_last)
    info = {"config": ckpt["config"], "step": ckpt.get("step"), "kind": ckpt.get("kind")}
    return KeypointPredictor(det, meta, cfg.image_size, info).to(device)
