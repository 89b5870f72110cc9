"""Reading ``torch.save`` files without running code from them.

``torch.load(weights_only=False)`` unpickles arbitrary Python objects, and unpickling
can call any function the file names (a downloaded checkpoint could run a shell
command). Every file kpfast reads (models, training checkpoints, perceptual and
few-shot backbones) goes through :func:`load_tensor_file`, which only accepts
tensors and plain containers (dict, list, tuple, str, int, float, bool, None), the
``weights_only=True`` subset, and turns every failure into a :class:`LoadError`
that names the file and says what is wrong with it.
"""

from __future__ import annotations

import os
import pickle
import re
from pathlib import Path
from typing import Any, Optional, Union

import torch


class LoadError(ValueError):
    """A file kpfast was asked to read is unsafe, damaged or not what it should be (the message names it)."""


def load_tensor_file(path: Union[str, os.PathLike], *, what: str = "file", hint: str = "",
                     map_location: Optional[Union[str, torch.device]] = "cpu") -> Any:
    """``torch.load(path, weights_only=True)`` with errors that name ``path``.

    Args:
        path: the file.
        what: what the file should be, for messages (``"kpfast checkpoint"``, ...).
        hint: what to do instead, appended to the message when the file holds Python objects.
        map_location: as in :func:`torch.load`.

    Raises:
        FileNotFoundError: ``path`` is not a file.
        LoadError: the file holds Python objects beyond tensors and plain containers
            (refused: loading them could run code), or cannot be read (truncated,
            damaged, not written by ``torch.save``).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {str(path)!r} does not exist")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
        culprit = f"it references the Python object '{found.group(1)}'" if found else str(e).splitlines()[-1][:200]
        raise LoadError(f"{path}: refused to load this {what}: it holds Python objects, not only tensors and plain "
                        f"containers ({culprit}), and unpickling them can run arbitrary code" + (f"; {hint}" if hint else "")
                        ) from None
    except Exception as e:  # noqa: BLE001 - zip, pickle and allocation errors of a damaged file all land here
        raise LoadError(f"{path}: cannot read this {what}: the file is truncated, damaged or was not written by "
                        f"torch.save ({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else 'no detail'})"
                        ) from e
