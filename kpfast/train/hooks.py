"""Hooks: everything a run does around its steps, each in one place.

:meth:`Trainer.train_step <kpfast.train.loop.Trainer.train_step>` is data -> losses ->
backward -> update; :meth:`Trainer.run <kpfast.train.loop.Trainer.run>` repeats it. The
rest happens in hooks, which the trainer calls in a fixed order at fixed points:

==================  =================================================================
``before_train``    once, before the first step (or the first step after a resume)
``after_loss``      inside a step, after the objective, before the backward pass (the
                    graph is intact; the step's random draws are done)
``after_backward``  inside a step, before the optimizer step (gradients in ``.grad``)
``after_step``      after the optimizer step, with the step's log row (a hook may add
                    scalars to it for the hooks after it)
``after_train``     once, after the last step
``close``           always, last, also when the run stops with an error
==================  =================================================================

A run's hooks, in order (:meth:`Trainer.default_hooks <kpfast.train.loop.Trainer.default_hooks>`):
:class:`~kpfast.train.guard.NaNGuard`, :class:`~kpfast.train.diagnostics.Diagnostics`,
:class:`~kpfast.train.run_log.RunLog`, :class:`~kpfast.train.announce.TimeEstimate`,
:class:`~kpfast.train.results.Checkpointer`, :class:`~kpfast.train.results.Pictures` and
:class:`~kpfast.train.results.Evaluation`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    from ..models import ModelOutputs
    from .data import Batch
    from .objective import LossTerms


class Hook:
    """Work done at the fixed points of a run (see the module docstring); override what you need."""

    def before_train(self) -> None:
        pass

    def after_loss(self, step: int, batch: Batch, terms: LossTerms, outputs: ModelOutputs) -> None:
        """``step``: the 0-based step being taken."""

    def after_backward(self, step: int, batch: Batch) -> None:
        """``step``: the 0-based step being taken."""

    def after_step(self, step: int, scalars: dict[str, float]) -> None:
        """``step``: the number of steps done (1-based); ``scalars``: the step's log row."""

    def after_train(self) -> None:
        pass

    def close(self) -> None:
        pass


class Hooks:
    """A run's hooks, called in order at each point (see the module docstring)."""

    def __init__(self, hooks: Sequence[Hook]):
        self.hooks = list(hooks)

    def before_train(self) -> None:
        for h in self.hooks:
            h.before_train()

    def after_loss(self, step: int, batch: Batch, terms: LossTerms, outputs: ModelOutputs) -> None:
        for h in self.hooks:
            h.after_loss(step, batch, terms, outputs)

    def after_backward(self, step: int, batch: Batch) -> None:
        for h in self.hooks:
            h.after_backward(step, batch)

    def after_step(self, step: int, scalars: dict[str, float]) -> None:
        for h in self.hooks:
            h.after_step(step, scalars)

    def after_train(self) -> None:
        for h in self.hooks:
            h.after_train()

    def close(self) -> None:
        for h in self.hooks:
            h.close()
