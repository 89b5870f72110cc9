"""The NaN guard: nothing non-finite reaches the weights or a checkpoint.

Three checks, each stopping the run with :class:`NonFiniteLossError` (on every rank,
naming the last good checkpoint); :class:`NaNGuard` makes them, the first two as a
hook inside every step, the third for the checkpoint hook:

- the loss terms of a step, before its backward pass (names the term and its value);
- the gradients and parameters after the backward pass, before the optimizer step:
  a finite loss can still have a NaN gradient (a setting that makes a derivative
  overflow). The step is then replayed (same batch, same random draws) term by
  term to name the first term whose gradient is not finite, with the settings it
  depends on;
- the parameters and optimizer state before a checkpoint is written.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Iterable, Optional

import torch
from torch import nn

from .hooks import Hook
from .streams import RandomStreams

if TYPE_CHECKING:
    from .data import Batch
    from .loop import Trainer
    from .objective import LossTerms

TERM_SETTINGS = {
    "few_shot": ("w_few_shot",),
    "recon": ("w_recon", "mask_ratio", "perceptual", "unet_widths"),
    "geo2d": ("w_geo2d", "ramp_iterations"),
    "geo3d": ("w_geo3d", "depth_scale", "whole_object_weight", "random_partner_iterations"),
    "smooth": ("w_smooth",),
    "heatmap": ("w_heatmap", "heatmap_sigma"),
    "sc": ("w_sc", "sc_channels"),
    "te": ("w_te", "heatmap_sigma"),
    "ti": ("w_ti", "sc_channels"),
}
"""The config fields each loss term depends on (besides the networks and the data), named when it goes non-finite."""


class NonFiniteLossError(RuntimeError):
    """A loss term, gradient, parameter or optimizer state became NaN or infinite; the run stopped
    before it reached the weights or a checkpoint (the last good checkpoint is kept)."""


def all_finite(tensors: Iterable[Optional[torch.Tensor]]) -> bool:
    """True iff every given tensor (None entries skipped) holds only finite values.

    Tested through their total 2-norm (one fused reduction and one host sync; about 10x
    faster than ``isfinite`` per tensor on CPU), which is NaN or infinite iff a value is
    (or the norm itself exceeds the float range, about 3e38 in float32).
    """
    ts = [t.detach() for t in tensors if t is not None and t.is_floating_point()]
    return bool(torch.isfinite(torch.nn.utils.get_total_norm(ts))) if ts else True


def first_non_finite(named: Iterable[tuple[str, Optional[torch.Tensor]]]) -> Optional[str]:
    """The name of the first tensor with a NaN or infinite value, or None."""
    for name, t in named:
        if t is not None and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return name
    return None


def explain_state(model: nn.Module, optimizer: torch.optim.Optimizer, cfg) -> Optional[str]:
    """What is not finite among the parameters and the optimizer state (None: all finite)."""
    bad = first_non_finite(model.named_parameters())
    if bad is not None:
        return f"parameter '{bad}' is not finite"
    names = {id(p): n for n, p in model.named_parameters()}
    bad = first_non_finite((f"{key} of parameter '{names.get(id(p), '?')}'", v)
                           for p, state in optimizer.state.items() for key, v in state.items()
                           if isinstance(v, torch.Tensor))
    if bad is not None:
        weights = ", ".join(f"w_{t}={getattr(cfg, 'w_' + t)!r}" for t in TERM_SETTINGS)
        return (f"the optimizer's {bad} is not finite (a gradient overflowed inside the optimizer, e.g. when "
                f"squared: check the loss weights {weights} and lr={cfg.lr!r})")
    return None


def settings_of(term: str, cfg) -> str:
    return ", ".join(f"{name}={getattr(cfg, name)!r}" for name in TERM_SETTINGS.get(term, ()))


def blame_term(terms: dict, weights: dict, model: nn.Module) -> Optional[tuple[str, str]]:
    """``(term, first parameter)`` for the first term (in ``terms`` order) whose weighted
    gradient is not finite in some parameter, or None if every term's gradient is finite.

    ``terms``: the unweighted scalar loss terms of a forward pass through ``model`` (its
    graph is kept between terms).
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    for term, value in terms.items():
        grads = torch.autograd.grad(weights[term] * value, [p for _, p in named], retain_graph=True,
                                    allow_unused=True)
        bad = first_non_finite((n, g) for (n, _), g in zip(named, grads))
        if bad is not None:
            return term, bad
    return None


def explain_update(step: int, model: nn.Module, cfg, replay) -> str:
    """Why the update of (0-based) ``step`` is not finite: a parameter that already was, or
    the first term whose gradient is not (``replay()`` recomputes ``(terms, weights)`` of the
    step on ``model``; called only once the check failed)."""
    bad_param = first_non_finite(model.named_parameters())
    if bad_param is not None:
        return (f"parameter '{bad_param}' is not finite before step {step + 1} (an earlier update overflowed; "
                f"lr={cfg.lr!r})")
    with torch.enable_grad():
        terms, weights = replay()
        found = blame_term(terms, weights, model)
    if found is None:
        return (f"the gradient at step {step + 1} is not finite, but no single loss term's is when the step is "
                "replayed (their sum overflowed, or the step is not reproducible)")
    term, param = found
    return (f"the gradient of loss term '{term}' is not finite at step {step + 1} (first in parameter '{param}'), "
            f"though its value {float(terms[term].detach()):.6g} is; check its settings: {settings_of(term, cfg)}")


class NaNGuard(Hook):
    """The guard of a run (see the module docstring): a hook on the loss terms (``after_loss``)
    and the gradients (``after_backward``), and :meth:`check_state` before a checkpoint."""

    def __init__(self, trainer: Trainer):
        self.trainer = trainer

    def after_loss(self, step: int, batch: Batch, terms: LossTerms, outputs) -> None:
        """Stop if a loss term is NaN or infinite (before the backward pass)."""
        bad = {k: float(v.detach()) for k, v in terms.as_dict().items() if not math.isfinite(float(v.detach()))}
        if self.trainer.world.all_true(not bad):
            return
        names = ", ".join(f"'{k}' = {v}" for k, v in bad.items()) or "a term on another process"
        self.stop(f"non-finite loss at step {step + 1}: {names}")

    def after_backward(self, step: int, batch: Batch) -> None:
        """Stop unless every gradient and parameter is finite (before the optimizer step), naming the
        first term whose gradient is not: the step is replayed from ``batch`` and the random streams'
        state it started from (:meth:`Trainer.compute_losses <kpfast.train.loop.Trainer.compute_losses>`)."""
        tr = self.trainer
        params = list(tr.model.parameters())
        if tr.world.all_true(all_finite([p.grad for p in params] + params)):
            return

        def replay():
            streams = RandomStreams(tr.cfg.seed, tr.world.rank, tr.stream_names)
            streams.load_state_dict(tr.step_random_state)
            return tr.objective(tr.model, batch, step, streams)[0].as_dict(), tr.objective.weights

        self.stop(explain_update(step, tr.model, tr.cfg, replay))

    def check_state(self, when: str) -> None:
        """Stop if a parameter or optimizer state is not finite; ``when`` ends the message."""
        tr = self.trainer
        problem = explain_state(tr.model, tr.optimizer, tr.cfg)
        if not tr.world.all_true(problem is None):
            self.stop(f"{problem or 'a parameter on another process is not finite'} {when}")

    def stop(self, reason: str) -> None:
        """Raise :class:`NonFiniteLossError`: ``reason``, and where the last good checkpoint is."""
        path = self.trainer.checkpoint_path()
        where = f"the last good checkpoint is {path}" if path is not None and path.exists() else \
            "no checkpoint was written yet"
        raise NonFiniteLossError(f"{reason}; training stopped, {where}")
