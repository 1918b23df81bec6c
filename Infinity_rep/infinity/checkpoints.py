"""Building the transformer from released files (or from seeded random weights) without initialising it twice.

The model is constructed on the meta device and every tensor is materialised exactly once, directly in its final
dtype and device: from the checkpoint (read shard by shard, memory-mapped where the format allows it) or from a
seeded random generator on the target device. Loading is strict: missing, unexpected and mis-shaped tensors raise
:class:`CheckpointError` naming them. Accepted deviations from the module's state dict (docs/infinity_architecture.md §1.1):
the bookkeeping entries ``lvl_1L``, ``attn_bias_for_masking``, ``Infinity_visible_kvlen``,
``Infinity_invisible_qlen`` are ignored; the constant ``*.zero_k_bias`` buffers may be absent (zeros);
``cfg_uncond`` with a different number of rows is truncated, or its missing tail keeps the fresh initialisation.

Precision: the blocks (``block_chunks.*``) get the block dtype (``auto``: bfloat16 on CUDA, float32 on CPU);
everything else (text projections, embeddings, head) stays float32.
"""

from __future__ import annotations

import json
import logging
import math
import os
import pickle
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from .arch import InfinityArch, get_arch
from .model import Infinity

__all__ = [
    "IGNORED_KEYS",
    "CheckpointError",
    "build_meta_model",
    "fresh_cfg_uncond",
    "load_transformer",
    "random_transformer",
    "read_state_dict_shards",
    "resolve_device",
    "resolve_dtype",
    "set_tensor",
    "tensor_dtype",
    "unwrap_state_dict",
]

logger = logging.getLogger(__name__)

IGNORED_KEYS = frozenset({"lvl_1L", "attn_bias_for_masking", "Infinity_visible_kvlen", "Infinity_invisible_qlen"})
OPTIONAL_SUFFIX = "zero_k_bias"
WRAPPER_KEYS = ("trainer", "gpt_fsdp", "state_dict", "model", "module")
STRIPPED_PREFIXES = ("module.", "_orig_mod.")
INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
SINGLE_FILES = ("model.safetensors", "pytorch_model.bin")
DTYPES = {
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "float32": torch.float32,
    "fp32": torch.float32,
}


class CheckpointError(ValueError):
    """A checkpoint that does not match the architecture (names the file and the offending tensors)."""


# ------------------------------------------------------------------------------------------------ dtype / device


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype = "auto", device: str | torch.device = "cpu") -> torch.dtype:
    """Block dtype: ``auto`` is bfloat16 on CUDA and float32 elsewhere."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; known: auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def tensor_dtype(name: str, block_dtype: torch.dtype) -> torch.dtype:
    return block_dtype if name.startswith("block_chunks.") else torch.float32


# ------------------------------------------------------------------------------------------------ construction


def build_meta_model(arch: str | InfinityArch) -> Infinity:
    """The module tree with every parameter and buffer on the meta device (no memory, no initialisation)."""
    with torch.device("meta"):
        model = Infinity(get_arch(arch))
    return model.eval()


def set_tensor(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    """Materialise parameter/buffer ``name`` with ``tensor`` (replaces a meta placeholder; no copy)."""
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    if attr in module._parameters:
        module._parameters[attr] = nn.Parameter(tensor, requires_grad=False)
    elif attr in module._buffers:
        module._buffers[attr] = tensor
    else:
        raise KeyError(f"{name} is neither a parameter nor a buffer of the model")


def _meta_entries(model: nn.Module) -> dict[str, torch.Tensor]:
    return dict(model.state_dict(keep_vars=True))


def fresh_cfg_uncond(rows: int, text_channels: int) -> torch.Tensor:
    """The upstream initialisation of the unconditional text rows (used for rows a checkpoint lacks)."""
    generator = torch.Generator(device="cpu").manual_seed(0)
    out = torch.empty(rows, text_channels)
    nn.init.trunc_normal_(out, std=1.2, a=-2.0, b=2.0, generator=generator)
    return out / math.sqrt(text_channels)


# ------------------------------------------------------------------------------------------------ reading files


def unwrap_state_dict(obj, source: str) -> dict[str, torch.Tensor]:
    """Find the transformer's state dict inside a loaded checkpoint object (training wrappers are unwrapped)."""
    trail = []
    while True:
        if not isinstance(obj, dict):
            raise CheckpointError(f"{source}: expected a dict of tensors, found {type(obj).__name__}")
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            break
        key = next((k for k in WRAPPER_KEYS if isinstance(obj.get(k), dict)), None)
        if key is None:
            keys = ", ".join(map(repr, list(obj)[:12]))
            raise CheckpointError(
                f"{source}: not a transformer state dict (top-level keys: {keys}); expected tensor entries or a "
                f"wrapper holding them under one of {', '.join(WRAPPER_KEYS)}"
            )
        trail.append(key)
        obj = obj[key]
    if trail:
        logger.info("%s: using the state dict under %s", source, "/".join(trail))
    for prefix in STRIPPED_PREFIXES:
        if all(k.startswith(prefix) for k in obj):
            logger.info("%s: stripping the %r prefix of every key", source, prefix)
            obj = {k[len(prefix) :]: v for k, v in obj.items()}
    return obj


def _torch_load(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as err:
        if "mmap" not in str(err) and "zip" not in str(err):
            raise CheckpointError(f"{path}: cannot be read as a torch checkpoint: {err}") from err
        logger.info("%s: legacy (non-zip) format, loading without mmap", path)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"{path}: contains non-tensor objects that weights_only loading refuses; save only the state dict: {err}"
        ) from err
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, pickle.UnpicklingError) as err:
        raise CheckpointError(f"{path}: cannot be read as a torch checkpoint: {err}") from err


def _read_file(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    return unwrap_state_dict(_torch_load(path), str(path))


def _shard_files(path: Path) -> list[Path]:
    if path.is_file() and path.name.endswith(".index.json"):
        index_path = path
    elif path.is_dir():
        index_path = next((path / f for f in INDEX_FILES if (path / f).is_file()), None)
        if index_path is None:
            single = next((path / f for f in SINGLE_FILES if (path / f).is_file()), None)
            if single is None:
                raise CheckpointError(f"{path}: folder holds none of {', '.join(INDEX_FILES + SINGLE_FILES)}")
            return [single]
    elif path.is_file():
        return [path]
    else:
        raise CheckpointError(f"{path}: no such file or folder")
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise CheckpointError(f"{index_path}: not a sharded-checkpoint index (needs a 'weight_map'): {err}") from err
    shards = sorted(set(weight_map.values()))
    missing = [s for s in shards if not (index_path.parent / s).is_file()]
    if missing:
        raise CheckpointError(f"{index_path}: shard files missing: {', '.join(missing)}")
    return [index_path.parent / s for s in shards]


def read_state_dict_shards(path: str | os.PathLike) -> Iterator[tuple[Path, dict[str, torch.Tensor]]]:
    """Yield ``(file, tensors)`` one shard at a time (a single file is one shard)."""
    for shard in _shard_files(Path(path)):
        yield shard, _read_file(shard)


# ------------------------------------------------------------------------------------------------ loading


def _describe(kind: str, names: list[str]) -> str:
    shown = ", ".join(names[:10]) + (f", ... ({len(names)} in all)" if len(names) > 10 else "")
    return f"{kind}: {shown}"


def _to_target(tensor: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    if device.type != "cpu":
        return tensor.to(device).to(dtype)
    return tensor.to(dtype)


def load_transformer(
    path: str | os.PathLike,
    arch: str | InfinityArch,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype = "auto",
) -> Infinity:
    """Load a released transformer: the 2B single ``.pth`` or the 8B sharded folder (or its index file)."""
    arch = get_arch(arch)
    device = resolve_device(device)
    block_dtype = resolve_dtype(dtype, device)
    model = build_meta_model(arch)
    expected = _meta_entries(model)
    loaded: set[str] = set()
    unexpected, mismatched, nonfinite = [], [], []
    for shard, tensors in read_state_dict_shards(path):
        logger.info("reading %s (%d tensors)", shard, len(tensors))
        for name in list(tensors):
            tensor = tensors.pop(name)
            if name in IGNORED_KEYS or name.rpartition(".")[2] in IGNORED_KEYS:
                continue
            ref = expected.get(name)
            if ref is None:
                unexpected.append(f"{name} (in {shard.name})")
                continue
            if name == "cfg_uncond" and tensor.dim() == 2 and tensor.shape[1] == ref.shape[1]:
                tensor = _adapt_cfg_uncond(tensor, arch, shard)
            if tuple(tensor.shape) != tuple(ref.shape):
                mismatched.append(f"{name} (checkpoint {tuple(tensor.shape)}, model {tuple(ref.shape)})")
                continue
            if not tensor.is_floating_point():
                mismatched.append(f"{name} (dtype {tensor.dtype}, expected a floating-point tensor)")
                continue
            value = _to_target(tensor, device, tensor_dtype(name, block_dtype))
            if not bool(torch.isfinite(value).all()):  # would surface much later as NaN bits, naming nothing
                nonfinite.append(f"{name} (in {shard.name})")
            set_tensor(model, name, value)
            loaded.add(name)
        del tensors
    missing = []
    for name, ref in expected.items():
        if name in loaded:
            continue
        if name.endswith(OPTIONAL_SUFFIX):
            set_tensor(model, name, torch.zeros(ref.shape, device=device, dtype=tensor_dtype(name, block_dtype)))
        else:
            missing.append(name)
    problems = [
        _describe(kind, names)
        for kind, names in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", mismatched))
        if names
    ]
    if problems:
        raise CheckpointError(f"{path}: does not match the Infinity-{arch.name} architecture; " + "; ".join(problems))
    if nonfinite:
        raise CheckpointError(f"{path}: " + _describe("NaN or Inf values in", nonfinite))
    logger.info("loaded Infinity-%s from %s (blocks in %s on %s)", arch.name, path, block_dtype, device)
    return model


def _adapt_cfg_uncond(tensor: torch.Tensor, arch: InfinityArch, source: Path) -> torch.Tensor:
    rows = arch.text_maxlen
    if tensor.shape[0] == rows:
        return tensor
    logger.warning("%s: cfg_uncond has %d rows, the model %d; adapting", source, tensor.shape[0], rows)
    if tensor.shape[0] > rows:
        return tensor[:rows]
    fresh = fresh_cfg_uncond(rows, arch.text_channels)
    fresh[: tensor.shape[0]] = tensor.float()
    return fresh


# ------------------------------------------------------------------------------------------------ random weights


def _random_value(name: str, shape, generator: torch.Generator, device, dtype, std: float) -> torch.Tensor:
    out = torch.empty(shape, device=device, dtype=dtype)
    if name.endswith(OPTIONAL_SUFFIX):
        return out.zero_()
    out.normal_(0.0, std, generator=generator)
    if name.endswith(("norm.weight", "ca_norm.weight")):
        out.add_(1.0)
    elif name.endswith("scale_mul_1H11"):
        out.add_(math.log(4.0))
    return out


def random_transformer(
    arch: str | InfinityArch,
    seed: int = 0,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype = "auto",
    std: float = 0.02,
) -> Infinity:
    """Seeded random weights (N(0, std), norms around 1, cos-attention scales around ln 4), created directly on
    the target device in the target dtype; deterministic for a given seed and device type."""
    arch = get_arch(arch)
    device = resolve_device(device)
    block_dtype = resolve_dtype(dtype, device)
    model = build_meta_model(arch)
    generator = torch.Generator(device=device).manual_seed(int(seed))
    for name, ref in _meta_entries(model).items():
        set_tensor(model, name, _random_value(name, ref.shape, generator, device, tensor_dtype(name, block_dtype), std))
    return model
