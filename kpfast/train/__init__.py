"""``kpfast.train``: the few-shot, geometry-aware training method end to end.

From Python and from the command line::

    import kpfast
    metrics = kpfast.train.run("demo", out="runs/demo")          # run(config, **overrides)

    python -m kpfast.train --preset demo --out runs/demo
    torchrun --nproc_per_node 2 -m kpfast.train --preset paper --out runs/paper

Pieces: :class:`TrainConfig` and :data:`PRESETS` (:mod:`kpfast.config`), :class:`Trainer`
(the loop: :mod:`kpfast.train.loop`), :class:`NonFiniteLossError`. A step's records are
:class:`~kpfast.train.data.Batch`, :class:`~kpfast.models.ModelOutputs` and
:class:`~kpfast.train.objective.LossTerms` (the objective, :mod:`kpfast.train.objective`);
everything around the steps is a hook (:mod:`kpfast.train.hooks`): the NaN guard
(:mod:`~kpfast.train.guard`), diagnostics (:mod:`~kpfast.train.diagnostics`), the log
(:mod:`~kpfast.train.run_log`), the time estimate (:mod:`~kpfast.train.announce`),
checkpoints, pictures and the evaluation (:mod:`~kpfast.train.results`). Checkpoint files
are :mod:`kpfast.checkpoint`, run folders :mod:`kpfast.train.run_folder`.
"""

from ..config import ABLATIONS, METHODS, PRESETS, TrainConfig
from .loop import NonFiniteLossError, Trainer, build_model, run

__all__ = ["run", "TrainConfig", "PRESETS", "METHODS", "ABLATIONS", "Trainer", "NonFiniteLossError", "build_model"]
