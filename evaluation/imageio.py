"""PNG files of the quality benchmark: uint8 RGB ``[H, W, 3]`` arrays, written atomically."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from deepcompressor.utils.files import write_png  # the one PNG writer, re-exported for the benchmark

__all__ = ["read_png", "write_png"]


def read_png(path: str | Path) -> np.ndarray:
    """A PNG (any mode) as ``[H, W, 3]`` uint8 RGB."""
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))
