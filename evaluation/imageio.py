"""PNG files of the quality benchmark: uint8 RGB ``[H, W, 3]`` arrays, written atomically."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from deepcompressor.utils.files import write_bytes_atomic

__all__ = ["read_png", "write_png"]


def write_png(path: str | Path, image) -> Path:
    """``[H, W, 3]`` uint8 RGB (numpy array or torch tensor) -> PNG, written atomically (a killed run leaves no
    half-written image for a re-run to reuse)."""
    from PIL import Image

    array = image.cpu().numpy() if hasattr(image, "cpu") else np.asarray(image)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"{path}: expected a [H, W, 3] uint8 RGB image, got {array.dtype} {tuple(array.shape)}")
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array), mode="RGB").save(buffer, format="PNG")
    return write_bytes_atomic(path, buffer.getvalue())


def read_png(path: str | Path) -> np.ndarray:
    """A PNG (any mode) as ``[H, W, 3]`` uint8 RGB."""
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))
