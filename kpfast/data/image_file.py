"""Reading one image file as RGB, with an error that names the file for anything unreadable.

Every image kpfast reads from disk (real-format datasets, ``python -m kpfast.predict``)
goes through :func:`read_image`, so a truncated PNG, a non-image named ``.jpg``, an
empty file, a folder named ``x.png`` or a decompression bomb all give the same
:class:`ImageFileError` naming the path and the reason, never a bare PIL traceback.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, UnidentifiedImageError

__all__ = ["ImageFileError", "read_image"]


class ImageFileError(ValueError):
    """An image file cannot be read; the message names the file and why."""

    def __init__(self, path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


def read_image(path: Union[str, os.PathLike]) -> Image.Image:
    """The image at ``path`` as a fully decoded RGB ``PIL.Image``.

    Grey, palette and alpha images are converted to RGB (alpha dropped); 16-bit and
    32-bit integer grey images (``I;16``, ``I``) are scaled from 0-65535 to 0-255
    (PIL's own conversion clips them, turning most of a 16-bit image white). The pixels
    are read here, so a truncated file fails here and not later.

    Raises:
        ImageFileError: the path is missing or a folder, or the file is empty, not an
            image PIL can decode, truncated or damaged, or larger than PIL's
            decompression-bomb limit (``PIL.Image.MAX_IMAGE_PIXELS``).
    """
    path = Path(path)
    if path.is_dir():
        raise ImageFileError(path, "is a folder, not an image file")
    if not path.exists():
        raise ImageFileError(path, "image file not found")
    if path.stat().st_size == 0:
        raise ImageFileError(path, "empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            # beyond the warning limit PIL only warns; the hard limit (2x) raises below
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                im.load()
                return _to_rgb(im)
    except Image.DecompressionBombError as e:
        raise ImageFileError(path, f"too many pixels to decode safely ({e})") from None
    except UnidentifiedImageError:
        raise ImageFileError(path, "not an image file that PIL can decode") from None
    except PermissionError:
        raise ImageFileError(path, "cannot be opened: permission denied") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise ImageFileError(path, f"truncated or damaged image ({e})") from None


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode in ("I", "I;16", "I;16L", "I;16B", "I;16N"):
        a = np.asarray(im, dtype=np.float64) / 257.0
        return Image.fromarray(np.clip(np.round(a), 0, 255).astype(np.uint8), "L").convert("RGB")
    return im.convert("RGB")
