"""``kpfast.train``: the few-shot, geometry-aware training method end to end.

From Python and from the command line::

    import kpfast
    metrics = kpfast.train.run("demo", out="runs/demo")          # run(config, **overrides)

    python -m kpfast.train --preset demo --out runs/demo
    torchrun --nproc_per_node 2 -m kpfast.train --preset paper --out runs/paper

Pieces: :class:`TrainConfig` and :data:`PRESETS` (:mod:`kpfast.config`), :class:`Trainer`
(the loop), :class:`NonFiniteLossError`; the objective is in
:mod:`kpfast.train.objective`, checkpoint files in :mod:`kpfast.checkpoint`, the
NaN guard in :mod:`kpfast.train.guard`, run folders in :mod:`kpfast.train.run_folder`.
"""

from ..config import ABLATIONS, METHODS, PRESETS, TrainConfig
from .loop import NonFiniteLossError, Trainer, build_model, run

__all__ = ["run", "TrainConfig", "PRESETS", "METHODS", "ABLATIONS", "Trainer", "NonFiniteLossError", "build_model"]
