"""Atomic writes (temp file in the same folder, then ``os.replace``), safe loads and hashing of run files."""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import pickle
import tempfile
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "json_ready",
    "load_pt",
    "save_pt",
    "sha256_file",
    "sha256_json",
    "to_cpu",
    "write_bytes_atomic",
    "write_json",
    "write_text",
]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp creates 0600; a finished file gets the mode open() would give it under the process umask.
        os.fchmod(descriptor, 0o666 & ~_umask())
        with os.fdopen(descriptor, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temp_name, path)
    finally:
        if os.path.exists(temp_name):
            os.unlink(temp_name)
    return path


def write_png(path: str | os.PathLike, image) -> Path:
    """``[H, W, 3]`` uint8 RGB (numpy array or torch tensor) -> PNG, written atomically (a killed run leaves no
    half-written image for a re-run to reuse)."""
    import numpy as np
    from PIL import Image

    array = image.cpu().numpy() if hasattr(image, "cpu") else np.asarray(image)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"{path}: expected a [H, W, 3] uint8 RGB image, got {array.dtype} {tuple(array.shape)}")
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array), mode="RGB").save(buffer, format="PNG")
    return write_bytes_atomic(path, buffer.getvalue())


def write_text(path: str | os.PathLike, text: str) -> Path:
    return write_bytes_atomic(path, text.encode("utf-8"))


def json_ready(value: Any) -> Any:
    """Plain JSON data: non-finite floats become None, tuples lists, tensor/numpy scalars Python numbers."""
    if isinstance(value, dict):
        return {str(k): json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 0) == 0:
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_json(path: str | os.PathLike, data: Any) -> Path:
    return write_text(path, json.dumps(json_ready(data), indent=1, allow_nan=False) + "\n")


def save_pt(path: str | os.PathLike, obj: Any) -> Path:
    """``torch.save`` atomically (serialised in memory first: a killed run never leaves a half-written file)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return write_bytes_atomic(path, buffer.getvalue())


def load_pt(path: str | os.PathLike, map_location: str | torch.device = "cpu", *, mmap: bool = False) -> Any:
    """``torch.load`` with ``weights_only=True``; errors name the file. ``mmap``: the tensors are backed by a private
    (copy-on-write) memory map of the file, i.e. by the page cache, instead of being read into process memory."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found")
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except (RuntimeError, EOFError, OSError, ValueError, TypeError, pickle.UnpicklingError) as error:
        reason = " ".join(str(error).split())[:160]  # one line: torch's messages span several
        raise ValueError(f"{path}: cannot be read as a torch file ({reason})") from None


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while block := stream.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def sha256_json(data: Any) -> str:
    """Hash of JSON-serialisable data, independent of dict insertion order."""
    text = json.dumps(json_ready(data), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def to_cpu(obj: Any) -> Any:
    """Tensors of nested dicts / lists moved to the CPU (other values as they are)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [to_cpu(v) for v in obj]
    return obj
