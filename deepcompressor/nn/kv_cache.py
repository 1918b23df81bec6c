"""Statically quantized KV cache for Infinity, its calibration file, and the recorder that collects its data.

``QuantizedLayerKVCache`` implements ``infinity.kv_cache.LayerKVCache``'s interface (``attend``, ``reset``,
``rewind``, ``nbytes``, ``prefix``, ``set_prefix``, ``capacity``). New keys/values are quantized when written,
with the static per-(head, channel) scales and zero points of the calibration file, and held as ``uint8`` codes
(INT8) or two 4-bit codes per byte (INT4) in a buffer preallocated for the schedule (``KVCache.reserve``), so the
cache really takes 1/2 (INT8) or 1/4 (INT4) of the bf16 bytes. Attention reads the codes through
``deepcompressor.kernels.kv_attention.kv_attention`` with the cache's ``backend``: ``fused`` (Triton kernel, tiles
dequantized in registers), ``workspace`` (one Triton pass dequantizes the layer into a 16-bit workspace shared by
all layers and caches, then ``scaled_dot_product_attention``), ``torch`` (plain PyTorch), or ``auto`` (default: on
CUDA the faster of ``fused`` and ``workspace``, measured once per GPU / shape bucket / dtype outside CUDA-graph
capture and cached; elsewhere ``torch``). Memory: the codes plus, for ``workspace``/``auto`` on CUDA, at most one
layer's 16-bit K/V (the shared workspace, preallocated for the reserved tokens at the first store).

What the current scale's queries see of the current scale's own keys/values (``current``):

* ``"quantized"`` (default, what a real quantized cache does): the new k/v are quantized first and attention runs
  over codes only. The last scale is not stored (``store=False``), but its k/v are quantized all the same, into
  the buffer's free room past the stored tokens if there is any, else into a temporary tail, so its numerics are
  exactly those of a stored scale. Calibration therefore covers every scale, the last one included.
* ``"full"``: the current scale's k/v take part in full precision (only earlier scales are read quantized); they
  are quantized for storage only. Calibration then only needs the stored scales.

Calibration file (``torch.save`` of plain dicts and tensors, loaded with ``weights_only=True``)::

    {"format": "var-compressor-kv-calib/1",
     "model": {"arch", "depth", "num_heads", "head_dim", "embed_dim", "kv_fingerprint", ...},
     "default_dtype": "uint8",
     "current": "quantized",
     "qparams": {"uint8": {"scale", "zero", "lo", "hi", "mse": float32 [depth, 2, H, c]}, "uint4": {...}},
     "settings": {...}, "stats": {...}}

index 1 of the ``2`` axis: 0 = K, 1 = V. ``kv_fingerprint`` hashes the parameters that decide the cached K/V
and that weight quantization leaves untouched (``pos_start``, ``lvl_embed``, every block's cos-attention scale),
so one calibration serves the full-precision and the W4A4 model of one checkpoint but is refused for another.
"""

from __future__ import annotations

import hashlib
import logging
import pickle
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..calib.kv import KV_DTYPE_BITS, bits_of
from ..kernels.kv_attention import (
    KVWorkspace,
    codes_width,
    dequantize_kv,
    kv_attention,
    kv_workspace,
    quantize_kv,
    resolve_attention_backend,
)

__all__ = [
    "CALIB_FORMAT",
    "CURRENT_MODES",
    "KVCalibrationError",
    "KVQuantParams",
    "KVRecorder",
    "QuantizedKVCacheFactory",
    "QuantizedLayerKVCache",
    "RecordingLayerKVCache",
    "attach_kv_from_config",
    "attach_kv_qparams",
    "detach_kv_qparams",
    "kv_model_fingerprint",
    "kv_model_identity",
    "load_kv_calibration",
    "validate_kv_calibration",
]

logger = logging.getLogger(__name__)

CALIB_FORMAT = "var-compressor-kv-calib/1"
CURRENT_MODES = ("quantized", "full")
_QPARAM_KEYS = ("scale", "zero", "lo", "hi", "mse")
_IDENTITY_KEYS = ("arch", "depth", "num_heads", "head_dim", "embed_dim")
_PREVIOUS_FACTORY = "_kv_quant_previous_factory"


class KVCalibrationError(ValueError):
    """A KV calibration file that is unreadable, malformed, or made for another model."""


# ------------------------------------------------------------------------------------------------ identity


def kv_model_fingerprint(model) -> str:
    """sha256 of ``pos_start``, ``lvl_embed.weight`` and every block's ``sa.scale_mul_1H11`` rounded to bfloat16
    (independent of the dtype the model runs in, untouched by weight quantization)."""
    tensors = [("pos_start", model.pos_start), ("lvl_embed.weight", model.lvl_embed.weight)]
    tensors += [(f"{name}.sa.scale_mul_1H11", block.sa.scale_mul_1H11)
                for name, block in zip(model.block_names(), model.blocks())]  # fmt: skip
    digest = hashlib.sha256()
    for name, tensor in tensors:
        values = tensor.detach().reshape(-1).to(torch.bfloat16).view(torch.int16).cpu().numpy()
        digest.update(f"{name}:{tuple(tensor.shape)};".encode())
        digest.update(np.ascontiguousarray(values).tobytes())
    return digest.hexdigest()


def kv_model_identity(model) -> dict:
    """Architecture and fingerprint that a calibration file must match."""
    arch = model.arch
    return {
        "arch": arch.name,
        "depth": int(arch.depth),
        "num_heads": int(arch.num_heads),
        "head_dim": int(arch.head_dim),
        "embed_dim": int(arch.embed_dim),
        "kv_fingerprint": kv_model_fingerprint(model),
    }


# ------------------------------------------------------------------------------------------------ parameters


@dataclass
class KVQuantParams:
    """Static quantizers of every block's K and V: ``scale``/``zero`` ``[depth, 2, H, c]`` float32 (index 0 = K)."""

    dtype: str
    scale: torch.Tensor
    zero: torch.Tensor
    _per_device: dict = field(default_factory=dict, repr=False)

    @property
    def bits(self) -> int:
        return bits_of(self.dtype)

    @property
    def depth(self) -> int:
        return self.scale.shape[0]

    @property
    def num_heads(self) -> int:
        return self.scale.shape[2]

    @property
    def head_dim(self) -> int:
        return self.scale.shape[3]

    def layer(self, index: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(k_scale, k_zero, v_scale, v_zero)`` ``[H, c]`` of block ``index`` on ``device`` (moved once)."""
        key = str(device)
        if key not in self._per_device:
            scale = self.scale.to(device=device, dtype=torch.float32)
            zero = self.zero.to(device=device, dtype=torch.float32)
            self._per_device[key] = [
                (scale[i, 0].contiguous(), zero[i, 0].contiguous(), scale[i, 1].contiguous(), zero[i, 1].contiguous())
                for i in range(self.depth)
            ]
        return self._per_device[key][index]


# ------------------------------------------------------------------------------------------------ the cache


class QuantizedLayerKVCache:
    """KV cache of one block holding static-quantized codes (see the module docstring).

    Args:
        params: The model's quantizers; ``index``: this block's position.
        capacity: Tokens to preallocate on the first store (``KVCache.reserve`` sets it for the schedule); the
            buffer grows if a store does not fit.
        current: ``quantized`` or ``full`` (how the current scale's own k/v are read).
        backend: attention backend, ``auto`` (default), ``fused`` (alias ``triton``), ``workspace`` or ``torch``
            (``kernels.kv_attention.ATTENTION_BACKENDS``); new k/v are quantized by the Triton kernel except with
            ``torch`` (and with ``auto`` off CUDA).
        workspace: The dequantization workspace of the ``workspace`` backend (default: the process-wide
            ``kv_workspace`` that every layer and cache shares).
    """

    def __init__(
        self,
        params: KVQuantParams,
        index: int,
        capacity: int = 0,
        current: str = "quantized",
        backend: str = "auto",
        workspace: KVWorkspace | None = None,
    ) -> None:
        if current not in CURRENT_MODES:
            raise ValueError(f"current must be one of {CURRENT_MODES}, got {current!r}")
        self.params = params
        self.index = index
        self.bits = params.bits
        self.capacity = capacity
        self.current = current
        self.backend = resolve_attention_backend(backend)
        # quantize_kv's backend: the Triton kernel with every Triton attention backend, PyTorch with torch.
        self._quant_backend = {"auto": "auto", "torch": "torch"}.get(self.backend, "triton")
        self.workspace = kv_workspace if workspace is None else workspace
        self._k: torch.Tensor | None = None  # [B, H, capacity, c or c/2] uint8
        self._v: torch.Tensor | None = None
        self._dtype: torch.dtype | None = None  # dtype of the keys written (dequantized prefix is returned in it)
        self.length = 0

    # -------------------------------------------------------------- interface

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, store: bool) -> torch.Tensor:
        self._check(k, v)
        start, new = self.length, k.shape[2]
        if store:
            self._reserve(k, start + new)
            self._write(k, v, start)
            self.length = start + new
            if self.current == "quantized":
                return self._attention(q, start + new)
            return self._attention(q, start, k, v, tail_codes=False)
        if self.current == "full":
            return self._attention(q, start, k, v, tail_codes=False)
        if self._k is not None and start + new <= self._k.shape[2]:
            # Room past the stored tokens: quantize there without advancing (same numerics as storing).
            self._write(k, v, start)
            return self._attention(q, start + new)
        k_codes, v_codes = self._quantize(k, v)
        return self._attention(q, start, k_codes, v_codes, tail_codes=True)

    def reset(self) -> None:
        self._k = self._v = None
        self.length = 0

    def rewind(self) -> None:
        """Forget the content, keep the buffers (their addresses stay valid for replayed CUDA graphs)."""
        self.length = 0

    def nbytes(self) -> int:
        """Bytes of the code buffers held (the per-channel quantizers are shared by all generations)."""
        if self._k is None:
            return 0
        return self._k.numel() * self._k.element_size() + self._v.numel() * self._v.element_size()

    @property
    def prefix(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The cached ``(K, V)`` ``[B, H, length, c]`` dequantized into the dtype they were written in (a copy)."""
        if self._k is None or self.length == 0:
            return None
        k_scale, k_zero, v_scale, v_zero = self.params.layer(self.index, self._k.device)
        keys = dequantize_kv(self._k[:, :, : self.length], k_scale, k_zero, self.bits, self._dtype)
        values = dequantize_kv(self._v[:, :, : self.length], v_scale, v_zero, self.bits, self._dtype)
        return keys, values

    @property
    def codes(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Views of the stored codes ``[B, H, length, c or c/2]`` (uint8)."""
        if self._k is None or self.length == 0:
            return None
        return self._k[:, :, : self.length], self._v[:, :, : self.length]

    def set_prefix(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Replace the content with the quantized ``k``/``v`` ``[B, H, L, c]`` (replay of a captured prefix)."""
        self.reset()
        self._check(k, v)
        self._reserve(k, k.shape[2])
        self._write(k, v, 0)
        self.length = k.shape[2]

    # -------------------------------------------------------------- internals

    def _check(self, k: torch.Tensor, v: torch.Tensor) -> None:
        expected = (self.params.num_heads, self.params.head_dim)
        if k.dim() != 4 or (k.shape[1], k.shape[3]) != expected or v.shape != k.shape:
            raise ValueError(
                f"quantized KV cache of block {self.index}: expected k and v [B, {expected[0]}, L, {expected[1]}], "
                f"got {tuple(k.shape)} and {tuple(v.shape)}"
            )
        if self._k is not None and k.shape[0] != self._k.shape[0]:
            raise ValueError(
                f"quantized KV cache of block {self.index} holds batch {self._k.shape[0]}, got keys of batch "
                f"{k.shape[0]}"
            )

    def _reserve(self, k: torch.Tensor, needed: int) -> None:
        if self._k is not None and needed <= self._k.shape[2]:
            return
        batch, heads, _, head_dim = k.shape
        size = max(needed, self.capacity) if self._k is None else max(needed, 2 * self._k.shape[2])
        width = codes_width(head_dim, self.bits)
        grown_k = torch.empty(batch, heads, size, width, dtype=torch.uint8, device=k.device)
        grown_v = torch.empty_like(grown_k)
        if self.length:
            grown_k[:, :, : self.length] = self._k[:, :, : self.length]
            grown_v[:, :, : self.length] = self._v[:, :, : self.length]
        self._k, self._v = grown_k, grown_v
        self._dtype = k.dtype
        if self.backend in ("auto", "workspace") and k.device.type == "cuda":
            # Room in the shared workspace for the reserved tokens, allocated now (before any CUDA-graph capture)
            # rather than at a later attention call; a longer call (an unstored last scale) grows it once.
            self.workspace.reserve_kv(k.device, k.dtype, batch, heads, size, head_dim)

    def _write(self, k: torch.Tensor, v: torch.Tensor, start: int) -> None:
        k_scale, k_zero, v_scale, v_zero = self.params.layer(self.index, k.device)
        end = start + k.shape[2]
        quantize_kv(k, k_scale, k_zero, self.bits, out=self._k[:, :, start:end], backend=self._quant_backend)
        quantize_kv(v, v_scale, v_zero, self.bits, out=self._v[:, :, start:end], backend=self._quant_backend)
        self._dtype = k.dtype

    def _quantize(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k_scale, k_zero, v_scale, v_zero = self.params.layer(self.index, k.device)
        return (
            quantize_kv(k, k_scale, k_zero, self.bits, backend=self._quant_backend),
            quantize_kv(v, v_scale, v_zero, self.bits, backend=self._quant_backend),
        )

    def _attention(self, q, num_cached, k_tail=None, v_tail=None, tail_codes=True) -> torch.Tensor:
        qparams = self.params.layer(self.index, q.device)
        if self._k is None:  # nothing stored yet: the tail alone (current="full", first scale not stored)
            empty = torch.empty(q.shape[0], q.shape[1], 0, codes_width(q.shape[3], self.bits), dtype=torch.uint8,
                                device=q.device)  # fmt: skip
            k_codes = v_codes = empty
        else:
            k_codes, v_codes = self._k, self._v
        if k_tail is not None and not tail_codes:
            k_tail, v_tail = k_tail.contiguous(), v_tail.contiguous()
        return kv_attention(q, k_codes, v_codes, num_cached, *qparams, self.bits, k_tail, v_tail, tail_codes,
                            backend=self.backend, workspace=self.workspace)  # fmt: skip


class QuantizedKVCacheFactory:
    """``model.kv_cache_factory`` building a ``KVCache`` of :class:`QuantizedLayerKVCache` per block."""

    def __init__(self, params: KVQuantParams, current: str = "quantized", backend: str = "auto") -> None:
        if current not in CURRENT_MODES:
            raise ValueError(f"current must be one of {CURRENT_MODES}, got {current!r}")
        self.params = params
        self.current = current
        self.backend = resolve_attention_backend(backend)

    def __call__(self, model):
        from infinity.kv_cache import KVCache

        depth = len(model.blocks())
        if depth != self.params.depth:
            raise KVCalibrationError(f"KV quantizers are for {self.params.depth} blocks, the model has {depth}")
        return KVCache(
            [QuantizedLayerKVCache(self.params, i, 0, self.current, self.backend) for i in range(self.params.depth)]
        )


# ------------------------------------------------------------------------------------------------ calibration file


def _fail(path, message: str):
    raise KVCalibrationError(f"{path}: {message}")


def validate_kv_calibration(data, path: str | Path = "<memory>") -> dict:
    """Check the structure of a calibration dict (format, identity, dtypes, shapes, finite positive scales,
    integer zero points); raises :class:`KVCalibrationError` naming the file and key."""
    if not isinstance(data, dict):
        _fail(path, f"not a KV calibration file (top level is {type(data).__name__})")
    if data.get("format") != CALIB_FORMAT:
        _fail(path, f"format is {data.get('format')!r}, expected {CALIB_FORMAT!r}")
    model = data.get("model")
    if not isinstance(model, dict):
        _fail(path, "missing section 'model'")
    for key in _IDENTITY_KEYS + ("kv_fingerprint",):
        if key not in model:
            _fail(path, f"model.{key} is missing")
    qparams = data.get("qparams")
    if not isinstance(qparams, dict) or not qparams:
        _fail(path, "missing section 'qparams'")
    if data.get("default_dtype") not in qparams:
        _fail(path, f"default_dtype {data.get('default_dtype')!r} has no entry in qparams ({sorted(qparams)})")
    if data.get("current") not in CURRENT_MODES:
        _fail(path, f"current is {data.get('current')!r}, expected one of {CURRENT_MODES}")
    shape = (int(model["depth"]), 2, int(model["num_heads"]), int(model["head_dim"]))
    for dtype, entry in qparams.items():
        if dtype not in KV_DTYPE_BITS:
            _fail(path, f"qparams.{dtype}: unknown KV dtype (expected one of {sorted(KV_DTYPE_BITS)})")
        if not isinstance(entry, dict):
            _fail(path, f"qparams.{dtype} is not a mapping")
        for key in _QPARAM_KEYS:
            t = entry.get(key)
            if not isinstance(t, torch.Tensor):
                _fail(path, f"qparams.{dtype}.{key} is missing or not a tensor")
            if tuple(t.shape) != shape or t.dtype != torch.float32:
                _fail(path, f"qparams.{dtype}.{key} is {t.dtype} {tuple(t.shape)}, expected float32 {shape}")
            if not torch.isfinite(t).all():
                _fail(path, f"qparams.{dtype}.{key} has non-finite values")
        if not (entry["scale"] > 0).all():
            _fail(path, f"qparams.{dtype}.scale has non-positive values")
        if not torch.equal(entry["zero"], entry["zero"].round()):
            _fail(path, f"qparams.{dtype}.zero is not integer-valued")
    return data


def load_kv_calibration(path: str | Path) -> dict:
    """Read and validate a calibration file (``weights_only`` load; errors name the file)."""
    path = Path(path)
    if not path.is_file():
        raise KVCalibrationError(f"{path}: KV calibration file not found (run calibrate_cache_quantization first)")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, ValueError, TypeError, pickle.UnpicklingError) as error:
        reason = " ".join(str(error).split())[:160]  # one line: torch's messages span several
        raise KVCalibrationError(f"{path}: cannot be read as a KV calibration file ({reason})") from None
    return validate_kv_calibration(data, path)


def check_kv_identity(data: dict, model, path: str | Path = "<memory>", check_weights: bool = True) -> None:
    """Refuse a calibration made for another model (architecture, shapes, and the K/V-relevant weights)."""
    expected = data["model"]
    actual = kv_model_identity(model)

    def describe(identity):
        return (f"Infinity-{identity['arch']} (depth {identity['depth']}, {identity['num_heads']} heads x "
                f"{identity['head_dim']}, width {identity['embed_dim']})")  # fmt: skip

    if any(expected[key] != actual[key] for key in _IDENTITY_KEYS):
        _fail(path, f"KV scales calibrated for {describe(expected)} cannot be used with {describe(actual)}")
    if check_weights and expected["kv_fingerprint"] != actual["kv_fingerprint"]:
        _fail(path, f"KV scales calibrated for other {describe(expected)} weights (fingerprint "
                    f"{str(expected['kv_fingerprint'])[:12]}, this model's {actual['kv_fingerprint'][:12]})")  # fmt: skip


def attach_kv_qparams(
    model,
    path: str | Path,
    dtype: str | None = None,
    *,
    current: str | None = None,
    backend: str = "auto",
    check_weights: bool = True,
) -> KVQuantParams:
    """Load a calibration file and make ``model`` generate with the quantized cache.

    Args:
        model: The Infinity transformer.
        path: Calibration file of ``calibrate_cache_quantization``.
        dtype: ``uint8`` or ``uint4`` (default: the file's ``default_dtype``).
        current: Override of how the current scale reads its own k/v (default: the mode calibrated for).
        backend: Attention backend: ``auto`` (default: measured choice of ``fused`` / ``workspace`` on CUDA,
            ``torch`` elsewhere), ``fused`` (alias ``triton``), ``workspace`` or ``torch``.
        check_weights: Compare the K/V-relevant weights' fingerprint (architecture and shapes are always checked).
    """
    data = load_kv_calibration(path)
    check_kv_identity(data, model, path, check_weights)
    dtype = dtype or data["default_dtype"]
    if dtype not in data["qparams"]:
        _fail(path, f"holds no {dtype} quantizers (it has {sorted(data['qparams'])})")
    entry = data["qparams"][dtype]
    params = KVQuantParams(dtype, entry["scale"], entry["zero"])
    previous = getattr(model, _PREVIOUS_FACTORY, None)
    if previous is None:
        setattr(model, _PREVIOUS_FACTORY, model.kv_cache_factory)
    model.kv_cache_factory = QuantizedKVCacheFactory(params, current or data["current"], backend)
    logger.info("KV cache quantized to %s with %s (current scale read %s)", dtype, path, current or data["current"])
    return params


def detach_kv_qparams(model) -> bool:
    """Restore the cache factory that ``attach_kv_qparams`` replaced; False if none was attached."""
    previous = getattr(model, _PREVIOUS_FACTORY, None)
    if previous is None:
        return False
    model.kv_cache_factory = previous
    delattr(model, _PREVIOUS_FACTORY)
    return True


def attach_kv_from_config(model, kv_cfg) -> KVQuantParams | None:
    """``attach_kv_qparams(model, kv.calib_path, kv.dtype)`` when ``kv.enabled`` (the ``kv`` config section)."""
    if not kv_cfg.enabled:
        return None
    return attach_kv_qparams(model, kv_cfg.calib_path, kv_cfg.dtype)


# ------------------------------------------------------------------------------------------------ recording


class RecordingLayerKVCache:
    """Wraps one block's layer cache: reports the k/v of every ``attend`` call (only of the stored ones when
    ``stored_only``: what the cache actually holds), then delegates everything to the wrapped cache."""

    __slots__ = ("_inner", "_record", "_stored_only")

    def __init__(self, inner, record, stored_only: bool = True) -> None:
        object.__setattr__(self, "_inner", inner)
        object.__setattr__(self, "_record", record)
        object.__setattr__(self, "_stored_only", stored_only)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, store: bool) -> torch.Tensor:
        if store or not self._stored_only:
            self._record(k, v)
        return self._inner.attend(q, k, v, store=store)

    def __getattr__(self, name: str):
        return getattr(self._inner, name)

    def __setattr__(self, name: str, value) -> None:
        setattr(self._inner, name, value)


class KVRecorder:
    """Context manager collecting a deterministic uniform sample of the cached K and V of every block.

    Every row is one cached token of one CFG row: ``[H * c]`` channels of K or V exactly as ``attend`` receives
    them (cos-normalised and rotated keys, values; the blocks' dtype). Each (block, K/V) keeps at most
    ``max_tokens`` rows in a ``TokenReservoir`` on the CPU; one seed for all of them, so every block samples the
    same token positions. ``stored_only`` skips the k/v of ``store=False`` calls (the last scale).
    """

    def __init__(self, model, max_tokens: int, seed: int = 0, stored_only: bool = False) -> None:
        from ..calib.token_sample import TokenReservoir

        self.model = model
        self.depth = len(model.blocks())
        self.stored_only = stored_only
        self.keys = [TokenReservoir(max_tokens, seed) for _ in range(self.depth)]
        self.values = [TokenReservoir(max_tokens, seed) for _ in range(self.depth)]
        self.calls = 0
        self._inner_factory = None

    def __enter__(self):
        self._inner_factory = self.model.kv_cache_factory
        self.model.kv_cache_factory = self._factory
        return self

    def __exit__(self, *exc) -> None:
        self.model.kv_cache_factory = self._inner_factory

    def _factory(self, model):
        cache = self._inner_factory(model)
        if len(cache.layers) != self.depth:
            raise ValueError(f"KV cache has {len(cache.layers)} layers, the model {self.depth} blocks")
        cache.layers = [RecordingLayerKVCache(layer, self._recorder(i), self.stored_only)
                        for i, layer in enumerate(cache.layers)]  # fmt: skip
        return cache

    def _recorder(self, index: int):
        def record(k: torch.Tensor, v: torch.Tensor) -> None:
            self.calls += 1
            self.keys[index].update(_token_rows(k))
            self.values[index].update(_token_rows(v))

        return record

    @property
    def num_seen(self) -> int:
        return self.keys[0].seen

    @property
    def num_sampled(self) -> int:
        return self.keys[0].num_rows

    def blocks(self) -> Iterable[tuple[int, int, torch.Tensor]]:
        """``(block, 0 for K / 1 for V, rows [N, H * c])`` in calibration-file order. Rows are in the sample's
        (pseudo-random, seed-determined) order, the same for every block."""
        if self.keys[0].num_rows == 0:
            raise ValueError("KVRecorder: nothing was recorded (did the model generate inside the context?)")
        for index in range(self.depth):
            for which, reservoir in ((0, self.keys[index]), (1, self.values[index])):
                yield index, which, reservoir.rows


def _token_rows(kv: torch.Tensor) -> torch.Tensor:
    """``[B, H, L, c]`` -> ``[B * L, H * c]`` (one row per cached token)."""
    batch, heads, length, dim = kv.shape
    return kv.detach().permute(0, 2, 1, 3).reshape(batch * length, heads * dim)
