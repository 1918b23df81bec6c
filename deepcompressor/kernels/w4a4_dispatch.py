"""The W4A4 linear forward and the choice of its backend.

Backends (``W4A4Linear(backend=...)``):

- ``int`` (alias ``triton``): ``kernels.w4a4``, exact int32 products per group of 64: the bit-exact model of INT4
  tensor-core hardware (Jetson Orin, Ampere, Ada). Any dtype.
- ``fused``: at most 16 rows, the whole layer in one kernel (each program fake-quantizes the slice of x it reads).
  16-bit activations on CUDA. Never chosen by ``auto``: an H200 measured it at 2-15x the time of ``gemv``.
- ``gemv``: ``kernels.w4a4_mixed`` for few tokens (at most 128 rows): activations fake-quantized by one kernel, then
  one split-K kernel that dequantizes the weights in registers. 16-bit activations on CUDA.
- ``tiled``: the same two kernels with row tiles (any row count): the weights read as 4-bit codes and dequantized
  in registers, no workspace. 16-bit activations on CUDA.
- ``dequant``: activations fake-quantized into ``[xq | down]`` (``down`` inside the activation kernel, or with the
  config ``{"lowrank": "separate"}`` by its own kernel), the layer's weights dequantized into a reusable workspace
  ``[W | L1]``, one cuBLAS GEMM with the bias. 16-bit activations on CUDA.
- ``torch``: the PyTorch path of ``kernels.w4a4`` (CPU).
- ``auto``: on CUDA with 16-bit activations, the fastest of ``gemv`` / ``tiled`` / ``dequant`` for this GPU, shape
  and dtype, measured once and cached on disk (``w4a4_dispatch.json`` under ``$VAR_COMPRESSOR_CACHE``, default
  ``~/.cache/var-compressor``); float32 activations take ``int``; CPU tensors ``torch``. While a CUDA graph is being
  captured nothing is timed: an unmeasured shape takes the rule ``gemv`` up to 64 rows, else ``dequant``.
  ``VAR_COMPRESSOR_W4A4_TUNE=0`` always takes that rule.

``gemv`` and ``dequant`` compute ``FakeQuantLinear``'s operands exactly and differ from it by summation order; ``int``
differs from it by float32 rounding. Nunchaku's INT4 kernels need INT4 tensor cores (sm_80 to sm_89, sm_120), which
Hopper lacks; ``nunchaku_status()`` reports whether an installed ``nunchaku`` exposes them.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import logging
import os
from pathlib import Path

import torch

from ..quant.formats import QuantSpec
from .choice_cache import ChoiceCache
from .triton_utils import HAS_TRITON
from .w4a4 import int_launch_config, quantize_activations, w4a4_matmul
from .w4a4_layout import GROUP
from .w4a4_mixed import (
    FUSED_MAX_ROWS,
    GEMV_MAX_ROWS,
    GemvConfig,
    default_gemv_config,
    dequantize_weight_triton,
    fake_quant_activations_triton,
    gemv_workspace,
    lowrank_down_triton,
    split_plan,
    tiled_gemm_configs,
    w4a4_fused_gemv_triton,
    w4a4_gemv_triton,
    w4a4_mixed_gemm_triton,
)

__all__ = [
    "BACKENDS",
    "LinearOperands",
    "choose_backend",
    "dispatch_cache_path",
    "linear_forward",
    "nunchaku_status",
    "resident_workspace_bytes",
    "resolve_backend",
]

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "int", "triton", "fused", "gemv", "tiled", "dequant", "torch")
_ALIASES = {"triton": "int"}
MIXED = ("fused", "gemv", "tiled", "dequant")
RULE_GEMV_ROWS = 64
TILED_MAX_ROWS = 1024  # measured on an H200: above, the cuBLAS path wins every shape by 2-4x


class LinearOperands:
    """What one W4A4 layer multiplies with, in the activations' dtype (built by ``W4A4Linear`` per call)."""

    __slots__ = ("bias", "l1t", "l2t", "name", "smooth", "spec", "static_scale", "static_zero", "w_packed",
                 "w_scale", "w_signed", "w_zero")

    def __init__(self, *, spec, w_packed, w_scale, w_zero, w_signed, smooth=None, l1t=None, l2t=None, bias=None,
                 static_scale=None, static_zero=None, name="w4a4"):
        self.spec, self.w_packed, self.w_scale, self.w_zero, self.w_signed = spec, w_packed, w_scale, w_zero, w_signed
        self.smooth, self.l1t, self.l2t, self.bias = smooth, l1t, l2t, bias
        self.static_scale, self.static_zero, self.name = static_scale, static_zero, name

    @property
    def shape(self) -> tuple[int, int]:
        return self.w_packed.shape[0], 2 * self.w_packed.shape[1]


# ------------------------------------------------------------------------------------------------ workspaces


class _WeightWorkspace:
    """One 16-bit buffer per (device, dtype) that the ``dequant`` backend dequantizes each layer into. It only
    grows; an outgrown buffer stays alive because captured CUDA graphs may still write it."""

    def __init__(self) -> None:
        self.buffers: dict = {}
        self._retired: list = []

    def get(self, device: torch.device, dtype: torch.dtype, numel: int) -> torch.Tensor:
        key = (device.type, device.index, dtype)
        buf = self.buffers.get(key)
        if buf is None or buf.numel() < numel:
            if buf is not None:
                self._retired.append(buf)
            buf = self.buffers[key] = torch.empty(numel, dtype=dtype, device=device)
        return buf

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.buffers.values(), *self._retired))


weight_workspace = _WeightWorkspace()


def resident_workspace_bytes() -> int:
    """Bytes held between calls by the mixed backends' shared workspaces (all devices)."""
    return weight_workspace.nbytes() + gemv_workspace.nbytes()


# ------------------------------------------------------------------------------------------------ backends


def _check_mixed(x2d: torch.Tensor, name: str, backend: str) -> None:
    if not HAS_TRITON:
        raise RuntimeError(f"{name}: the {backend} W4A4 backend needs triton")
    if x2d.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(f"{name}: the {backend} W4A4 backend needs CUDA tensors or TRITON_INTERPRET=1")
    if x2d.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"{name}: the {backend} W4A4 backend takes 16-bit activations, got {x2d.dtype}")


def _padded_rank(ops: LinearOperands) -> int:
    return 0 if ops.l1t is None else ops.l1t.shape[0]


def forward_dequant(x2d: torch.Tensor, ops: LinearOperands, config: dict | None = None) -> torch.Tensor:
    """``[xq | down] @ [W | L1]^T + bias`` with one cuBLAS GEMM (weights dequantized into the shared workspace).
    ``config["lowrank"]``: ``"fused"`` (default) computes ``down`` inside the activation kernel, ``"separate"`` in
    its own kernel (``lowrank_down_triton``), which wins at many rows."""
    _check_mixed(x2d, ops.name, "dequant")
    m, k = x2d.shape
    n = ops.w_packed.shape[0]
    rank = _padded_rank(ops)
    a = torch.empty(m, k + rank, dtype=x2d.dtype, device=x2d.device)
    separate = rank > 0 and (config or {}).get("lowrank") == "separate"
    partial = fake_quant_activations_triton(x2d, ops.spec, a, smooth=ops.smooth, l2t=None if separate else ops.l2t,
                                            static_scale=ops.static_scale, static_zero=ops.static_zero)
    if separate:
        lowrank_down_triton(x2d, ops.l2t, a[:, k:], smooth=ops.smooth)
    elif partial is not None:
        a[:, k:] = partial.sum(0)
    ws = weight_workspace.get(x2d.device, x2d.dtype, n * (k + rank)).view(-1)[: n * (k + rank)].view(n, k + rank)
    dequantize_weight_triton(ops.w_packed, ops.w_scale, ops.w_zero, ops.w_signed, ws, l1t=ops.l1t)
    return torch.nn.functional.linear(a, ws, ops.bias)


def forward_gemv(x2d: torch.Tensor, ops: LinearOperands, config: GemvConfig | None = None) -> torch.Tensor:
    """Few rows: the activation kernel (split along K like the GEMV) and the split-K GEMV."""
    _check_mixed(x2d, ops.name, "gemv")
    m, k = x2d.shape
    n = ops.w_packed.shape[0]
    if m > GEMV_MAX_ROWS:
        raise ValueError(f"{ops.name}: the gemv W4A4 backend takes at most {GEMV_MAX_ROWS} rows, got {m}")
    if config is None:
        config = default_gemv_config(m, n, k, _sm_count(x2d.device))
    gps, _ = split_plan(k // GROUP, config.splits)
    xq = torch.empty(m, k, dtype=x2d.dtype, device=x2d.device)
    partial = fake_quant_activations_triton(
        x2d, ops.spec, xq, smooth=ops.smooth, l2t=ops.l2t, static_scale=ops.static_scale,
        static_zero=ops.static_zero, groups_per_chunk=gps)
    return w4a4_gemv_triton(xq, partial, ops.w_packed, ops.w_scale, ops.w_zero, ops.w_signed, l1t=ops.l1t,
                            bias=ops.bias, config=config, groups_per_split=gps)


def forward_fused(x2d: torch.Tensor, ops: LinearOperands, config: GemvConfig | None = None) -> torch.Tensor:
    """At most 16 rows: the whole layer in one launch."""
    _check_mixed(x2d, ops.name, "fused")
    m, k = x2d.shape
    if m > FUSED_MAX_ROWS:
        raise ValueError(f"{ops.name}: the fused W4A4 backend takes at most {FUSED_MAX_ROWS} rows, got {m}")
    config = config or default_gemv_config(m, ops.shape[0], k, _sm_count(x2d.device))
    return w4a4_fused_gemv_triton(x2d, ops.spec, ops.w_packed, ops.w_scale, ops.w_zero, ops.w_signed,
                                  smooth=ops.smooth, l2t=ops.l2t, l1t=ops.l1t, bias=ops.bias,
                                  static_scale=ops.static_scale, static_zero=ops.static_zero, config=config)


def forward_tiled(x2d: torch.Tensor, ops: LinearOperands, config: GemvConfig | None = None) -> torch.Tensor:
    """Any row count: the activation kernel (split along K to fill the GPU), the row-tiled mixed-input GEMM."""
    _check_mixed(x2d, ops.name, "tiled")
    m, k = x2d.shape
    config = config or tiled_gemm_configs()[0]
    groups = k // GROUP
    xq = torch.empty(m, k, dtype=x2d.dtype, device=x2d.device)
    partial = fake_quant_activations_triton(x2d, ops.spec, xq, smooth=ops.smooth, l2t=ops.l2t,
                                            static_scale=ops.static_scale, static_zero=ops.static_zero)
    if partial is not None and partial.shape[0] > 1:
        partial = partial.sum(0, keepdim=True)
    return w4a4_mixed_gemm_triton(xq, partial, ops.w_packed, ops.w_scale, ops.w_zero, ops.w_signed, l1t=ops.l1t,
                                  bias=ops.bias, config=GemvConfig(config.block_n, 1, config.num_warps,
                                                                   config.block_m, config.num_stages),
                                  groups_per_split=groups)


def forward_exact(x2d: torch.Tensor, ops: LinearOperands, backend: str, cpu_weight=None) -> torch.Tensor:
    """The integer (``int``) or PyTorch (``torch``) path of ``kernels.w4a4``."""
    kernel_backend = "triton" if backend == "int" else "torch"
    launch = {}
    if kernel_backend == "triton" and x2d.device.type == "cuda":
        launch = {"block_m": 32}  # fixed launch configurations: no autotuning at the first call
    act = quantize_activations(x2d, ops.spec, backend=kernel_backend, smooth=ops.smooth, l2t=ops.l2t,
                               static_scale=ops.static_scale, static_zero=ops.static_zero, name=ops.name, **launch)
    # The PyTorch path keeps its dequantized weight on CPU only (tests, the tiny model); never a GPU copy.
    keep = cpu_weight is not None and kernel_backend == "torch" and x2d.device.type == "cpu"
    extra = {"weight": cpu_weight()} if keep else {}
    if launch:
        extra = {"config": int_launch_config(x2d.shape[0]), "variant": "ab"}
    return w4a4_matmul(act, ops.w_packed, ops.w_scale, ops.w_zero, ops.w_signed, backend=kernel_backend,
                       l1t=ops.l1t, bias=ops.bias, out_dtype=x2d.dtype, **extra)


@functools.cache
def _cuda_properties(index: int):
    return torch.cuda.get_device_properties(index)


def _device_properties(device: torch.device):
    # Read on every eager layer call (dispatch key, split plans): looked up once per device.
    return _cuda_properties(device.index if device.index is not None else torch.cuda.current_device())


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return _device_properties(device).multi_processor_count
    return 132


# ------------------------------------------------------------------------------------------------ choice


def resolve_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"W4A4 backend must be one of {BACKENDS}, got {backend!r}")
    return _ALIASES.get(backend, backend)


def dispatch_cache_path() -> Path:
    return choices.path


# Measured choices: in memory, and on disk across processes (``dispatch_cache_path``).
choices = ChoiceCache("w4a4_dispatch.json", "var-compressor.w4a4_dispatch/1", "W4A4 dispatch")


def _bucket(m: int) -> int:
    bucket = 1
    while bucket < m:
        bucket *= 2
    return bucket


def _key(x2d: torch.Tensor, ops: LinearOperands) -> str:
    n, k = ops.shape
    name = _device_properties(x2d.device).name if x2d.device.type == "cuda" else "cpu"
    spec: QuantSpec = ops.spec
    flags = (f"r{_padded_rank(ops)}-z{int(ops.w_zero is not None)}-s{int(ops.smooth is not None)}"
             f"-st{int(ops.static_scale is not None)}-{spec.fmt.name}{'' if spec.symmetric else 'a'}")
    return f"{name}|M{_bucket(x2d.shape[0])}|N{n}|K{k}|{str(x2d.dtype).removeprefix('torch.')}|{flags}"


def _rule(m: int) -> dict:
    return {"backend": "gemv" if m <= RULE_GEMV_ROWS else "dequant", "source": "rule"}


def _candidates(m: int, n: int, k: int, device: torch.device) -> list[dict]:
    # ``fused`` is not among them: it re-quantizes the activations in every output tile, which an H200 measured at
    # 2-15x the time of the two-kernel ``gemv`` (2026-12-04).
    out = []
    if m <= GEMV_MAX_ROWS:
        seen = set()
        for block_n in (None, 64, 128):
            cfg = default_gemv_config(m, n, k, _sm_count(device), block_n=block_n)
            # also a quarter of the K ranges, each a pipelined loop of several steps: fewer programs, fewer
            # partial tiles to sum, loads of the next step in flight during the current one
            for variant in (cfg, GemvConfig(cfg.block_n, max(1, cfg.splits // 4), cfg.num_warps, 0, 4)):
                if variant not in seen:
                    seen.add(variant)
                    out.append({"backend": "gemv", "config": variant.as_dict()})
    elif m <= TILED_MAX_ROWS:
        out.append({"backend": "tiled", "config": tiled_gemm_configs()[0].as_dict()})
    out.append({"backend": "dequant"})
    if m > GEMV_MAX_ROWS:
        out.append({"backend": "dequant", "config": {"lowrank": "separate"}})
    return out


def _run_choice(choice: dict, x2d: torch.Tensor, ops: LinearOperands) -> torch.Tensor:
    if choice["backend"] == "dequant":
        return forward_dequant(x2d, ops, choice.get("config"))
    cfg = choice.get("config")
    cfg = None if cfg is None else GemvConfig(**cfg)
    if choice["backend"] == "fused":
        return forward_fused(x2d, ops, cfg)
    if choice["backend"] == "gemv":
        return forward_gemv(x2d, ops, cfg)
    if choice["backend"] == "tiled":
        return forward_tiled(x2d, ops, cfg)
    return forward_dequant(x2d, ops)


def choose_backend(x2d: torch.Tensor, ops: LinearOperands) -> dict:
    """The mixed backend (and launch configuration) for this GPU, shape and dtype: cached, else measured."""
    key = _key(x2d, ops)
    choice = choices.get(key)
    if choice is not None:
        return choice
    m = x2d.shape[0]
    capturing = x2d.device.type == "cuda" and torch.cuda.is_current_stream_capturing()
    if os.environ.get("VAR_COMPRESSOR_W4A4_TUNE", "1") == "0" or capturing:
        return _rule(m)
    from .timing import graph_time_ms

    candidates = _candidates(m, *ops.shape, x2d.device)
    if len(candidates) == 1:
        choice = {**candidates[0], "source": "only candidate"}
        choices.put(key, choice)
        return choice
    timings = []
    for candidate in candidates:
        try:
            # Timed inside a CUDA graph, as the sampler replays it: host launch gaps would favour fewer kernels.
            ms = graph_time_ms([lambda c=candidate: _run_choice(c, x2d, ops)], x2d.device, replays=3,
                               target_calls=20)
        except Exception as error:  # noqa: BLE001 - a configuration the compiler rejects must not stop the others
            logger.warning("W4A4 %s: candidate %s failed: %s", key, candidate, error)
            continue
        timings.append((ms, candidate))
    if not timings:
        logger.warning("W4A4 %s: no candidate ran; using the cuBLAS path", key)
        return {"backend": "dequant", "source": "fallback"}
    ms, best = min(timings, key=lambda t: t[0])
    choice = {**best, "ms": ms, "source": "measured",
              "timings": [{"ms": t, **c} for t, c in timings]}
    choices.put(key, choice)
    logger.info("W4A4 %s: %s (%.1f us)", key, best, ms * 1e3)
    return choice


def linear_forward(x2d: torch.Tensor, ops: LinearOperands, backend: str, cpu_weight=None) -> torch.Tensor:
    """``y [M, N]`` in x's dtype (see the module docstring for ``backend``)."""
    backend = resolve_backend(backend)
    if backend == "auto":
        if x2d.device.type != "cuda" or not HAS_TRITON:
            backend = "torch"
        elif x2d.dtype == torch.float32:
            backend = "int"
        else:
            return _run_choice(choose_backend(x2d, ops), x2d, ops)
    if backend == "fused":
        return forward_fused(x2d, ops)
    if backend == "gemv":
        return forward_gemv(x2d, ops)
    if backend == "tiled":
        return forward_tiled(x2d, ops)
    if backend == "dequant":
        return forward_dequant(x2d, ops)
    return forward_exact(x2d, ops, backend, cpu_weight)


def weight_only_forward(xs: torch.Tensor, ops: LinearOperands) -> torch.Tensor:
    """16-bit inputs (``quant.ipts.skips``) on CUDA: the weight dequantized into the workspace, one cuBLAS GEMM."""
    n, k = ops.shape
    ws = weight_workspace.get(xs.device, xs.dtype, n * k).view(-1)[: n * k].view(n, k)
    dequantize_weight_triton(ops.w_packed, ops.w_scale, ops.w_zero, ops.w_signed, ws)
    y = torch.nn.functional.linear(xs, ws, ops.bias)
    if ops.l1t is not None:
        y = y + (xs @ ops.l2t) @ ops.l1t
    return y


def nunchaku_status() -> str:
    """Whether Nunchaku's SVDQuant kernels could serve as a backend here (a sentence)."""
    if importlib.util.find_spec("nunchaku") is None:
        return "nunchaku is not installed"
    try:
        ops = importlib.import_module("nunchaku.ops.gemm")
    except Exception as error:  # noqa: BLE001 - an unrelated package of that name, or a broken install
        return f"an installed 'nunchaku' has no SVDQuant kernels ({type(error).__name__}: {error})"
    if not hasattr(ops, "svdq_gemm_w4a4_cuda"):
        return "the installed nunchaku exposes no svdq_gemm_w4a4_cuda"
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        if (major, minor) == (9, 0) or major == 10:
            return f"nunchaku's INT4 kernels do not run on sm_{major}{minor} (no INT4 tensor cores)"
    return "nunchaku exposes SVDQuant kernels, but its packed layout is not wired to W4A4Linear"

