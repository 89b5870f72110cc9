"""Benchmark case: where the time of one training step goes, phase by phase.

One real training step of a preset (``Trainer.train_step``: data, transforms and
masks, every network, every loss, backward, optimizer), timed phase by phase
without changing the step: forward phases from module hooks on the detector, the
edge map, the UNet and the perceptual network; backward phases from gradient
hooks on the tensors at their boundaries (the engine runs backward in reverse
creation order, so each network's backward is one contiguous stretch between
the gradient of its output and the gradient of its input); the optimizer and the
batch fetch from wrappers. Phases:

- ``data``: reading and stacking the batch;
- ``transforms+masks``, ``losses`` (forward): what the objective does outside the networks;
- ``detector``, ``edge map``, ``unet``, ``perceptual`` (forward);
- ``backward: perceptual+L1``, ``backward: unet``, ``backward: edge map``,
  ``backward: soft-argmax+geometry``, ``backward: detector``, ``backward: other``;
- ``optimizer``.

Cases: the demo preset (64 px, 8 + 10 images) and the paper preset (128 px,
16 + 10 images), on procedural faces, with the diagnostics off (as in a run's
non-logging steps).
"""

from __future__ import annotations

import time

import torch

from common import Breakdown

PHASES = ("data", "transforms+masks", "detector", "edge map", "unet", "perceptual", "losses",
          "backward: perceptual+L1", "backward: unet", "backward: edge map", "backward: soft-argmax+geometry",
          "backward: detector", "backward: other", "optimizer")


class StepClock:
    """Hooks that time the phases of ``trainer.train_step`` (see the module docstring)."""

    def __init__(self, trainer):
        self.trainer = trainer
        self.t: dict[str, float] = {}
        cuda = trainer.device.type == "cuda"
        self.now = (lambda: (torch.cuda.synchronize(), time.perf_counter())[1]) if cuda else time.perf_counter
        model, perceptual = trainer.model, trainer.objective.perceptual
        self.handles = []
        self._hook_module("detector", model.detector, backward_at=model.detector.head)
        if model.edge_map is not None:
            self._hook_module("edge map", model.edge_map)
            self._hook_module("unet", model.unet)
        if perceptual is not None:
            self._hook_module("perceptual", perceptual.features)

    def _first(self, key: str) -> None:
        self.t.setdefault(key, self.now())

    def _last(self, key: str) -> None:
        self.t[key] = self.now()

    def _hook_module(self, name: str, module, backward_at=None):
        def pre(mod, args):
            self._first(f"{name}:fwd0")

        def post(mod, args, out):
            self._last(f"{name}:fwd1")
            tensors = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
            for a in tensors:
                a.register_hook(lambda g: self._last(f"{name}:bwd1"))
            outs = out if isinstance(out, (list, tuple)) else [out] if isinstance(out, torch.Tensor) else []
            for o in outs:
                if isinstance(o, torch.Tensor) and o.requires_grad:
                    o.register_hook(lambda g: self._first(f"{name}:bwd0"))

        self.handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
        def head(mod, args, out):
            if out.requires_grad:
                out.register_hook(lambda g: self._first(f"{name}:bwd0"))

        if backward_at is not None:  # the detector's backward starts at its head's output gradient
            self.handles.append(backward_at.register_forward_hook(head))

    def span(self, name: str, kind: str) -> float:
        a, b = self.t.get(f"{name}:{kind}0"), self.t.get(f"{name}:{kind}1")
        return (b - a) if a is not None and b is not None else 0.0

    def step(self, step: int) -> dict[str, float]:
        """Run ``trainer.train_step(step)`` and return seconds per phase."""
        tr = self.trainer
        self.t = {}
        fetch, backward, opt_step = tr.next_batch, torch.Tensor.backward, tr.optimizer.step
        marks = {}

        def timed_fetch():
            t0 = self.now()
            out = fetch()
            marks["data"] = self.now() - t0
            marks["forward0"] = self.now()
            return out

        def timed_backward(tensor, *a, **k):
            marks["forward1"] = marks["backward0"] = self.now()
            backward(tensor, *a, **k)
            marks["backward1"] = self.now()

        def timed_opt(*a, **k):
            t0 = self.now()
            out = opt_step(*a, **k)
            marks["optimizer"] = self.now() - t0
            return out

        tr.next_batch, tr.optimizer.step = timed_fetch, timed_opt
        torch.Tensor.backward = timed_backward
        try:
            tr.train_step(step)
        finally:
            tr.next_batch, tr.optimizer.step = fetch, opt_step
            torch.Tensor.backward = backward
        self.t.setdefault("detector:bwd1", marks["backward1"])  # images need no gradient: it ends the backward
        nets = {n: self.span(n, "fwd") for n in ("detector", "edge map", "unet", "perceptual")}
        first_net = min((self.t[f"{n}:fwd0"] for n in nets if f"{n}:fwd0" in self.t), default=marks["forward1"])
        out = {"data": marks["data"], "transforms+masks": first_net - marks["forward0"], **nets,
               "losses": marks["forward1"] - marks["forward0"] - (first_net - marks["forward0"]) - sum(nets.values())}
        bwd = {"backward: perceptual+L1": self.span("perceptual", "bwd"), "backward: unet": self.span("unet", "bwd"),
               "backward: edge map": self.span("edge map", "bwd"), "backward: detector": self.span("detector", "bwd")}
        end_edge = self.t.get("edge map:bwd1") or self.t.get("unet:bwd1") or marks["backward0"]
        start_det = self.t.get("detector:bwd0", end_edge)
        bwd["backward: soft-argmax+geometry"] = max(0.0, start_det - end_edge)
        bwd["backward: other"] = marks["backward1"] - marks["backward0"] - sum(bwd.values())
        return {**out, **bwd, "optimizer": marks["optimizer"]}


def _case(preset: str, name: str) -> Breakdown:
    def make(device):
        from kpfast.train import TrainConfig, Trainer

        cfg = TrainConfig.from_preset(preset, out=None, progress=False, diagnostics_every=0, train_size=256,
                                      test_size=16, device=device.type, iterations=10_000)
        trainer = Trainer(cfg)
        clock = StepClock(trainer)
        counter = iter(range(10 ** 9))
        # past the random-partner warm-up and the start of the 2D ramp, as most of a run
        offset = trainer.cfg.random_partner_iterations + 1

        def measure():
            return clock.step(offset + next(counter))

        return measure

    return Breakdown(op="train_step", name=name, config={"preset": preset}, make=make, phases=PHASES)


def cases(device: torch.device, quick: bool) -> list:
    if quick:
        return [_case("tiny", "tiny preset step, by phase")]
    return [_case("demo", "demo preset step, by phase"), _case("paper", "paper preset step, by phase")]
