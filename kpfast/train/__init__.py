"""``kpfast.train``: the few-shot, geometry-aware training method end to end.

Callable as a function and runnable as a module::

    import kpfast
    metrics = kpfast.train("demo", out="runs/demo")          # kpfast.train(config, **overrides)

    python -m kpfast.train --preset demo --out runs/demo
    torchrun --nproc_per_node 2 -m kpfast.train --preset paper --out runs/paper

Pieces: :class:`TrainConfig` and :data:`PRESETS` (config), :class:`Trainer`
(the loop), :class:`NonFiniteLossError`; the objective is in
:mod:`kpfast.train.objective`, checkpoint files in :mod:`kpfast.checkpoint`, the
NaN guard in :mod:`kpfast.train.guard`, run folders in :mod:`kpfast.train.run_folder`.
"""

import sys as _sys
import types as _types

from ..config import ABLATIONS, METHODS, PRESETS, TrainConfig
from .loop import NonFiniteLossError, Trainer, build_model, train

__all__ = ["train", "TrainConfig", "PRESETS", "METHODS", "ABLATIONS", "Trainer", "NonFiniteLossError", "build_model"]


class _CallableModule(_types.ModuleType):
    """Makes ``kpfast.train(...)`` call :func:`train` while ``kpfast.train`` stays this package."""

    def __call__(self, config=None, **overrides):
        return train(config, **overrides)


_sys.modules[__name__].__class__ = _CallableModule
