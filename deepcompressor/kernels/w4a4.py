"""The W4A4 SVDQuant linear as two kernels (Triton on CUDA), and a plain-PyTorch path with the same arithmetic.

    y = sum_g  (A_g . W_g) * sa_g * sw_g   +   (xs @ L2^T) @ L1^T   +   bias,       xs = x / s

1. ``quantize_activations``: one pass over ``x [M, K]``: divide by the smoothing scale ``s`` (rounded to x's dtype,
   as ``x / s`` is in PyTorch), quantize every (token, group of 64) to a 4-bit format with the arithmetic of
   ``deepcompressor.quant`` (dynamic ranges, or calibrated static ones) and, in the same pass, the low-rank down
   projection ``xs @ L2^T`` (float32 accumulation, rounded to x's dtype). Codes are stored zero-point-centred
   (``q - z``, in [-15, 15]) as int8 ``[M, K]``; scales as float32 ``[K / 64, M]`` (the value of the stored scale
   dtype).
2. ``w4a4_matmul``: per output tile, for every group ``g`` of 64 inputs, the int8 tensor-core product of the
   activation codes with the weight codes (4-bit, two per byte in the layout of ``kernels.w4a4_layout``, unpacked
   and zero-point-centred in registers) gives an exact int32 partial sum, which is scaled by
   ``activation scale x weight scale`` in float32 and accumulated. 4-bit values are exact in int8, so this is the
   fake-quantized reference computed exactly up to the float32 summation order. The epilogue adds the low-rank
   up projection ``down @ L1^T`` (tensor cores, float32 accumulation) and the bias, and rounds once to x's dtype.

The PyTorch path (CPU) reuses ``deepcompressor.quant.quantize`` for the activation codes and multiplies the
dequantized operands (``w4a4_matmul_torch``; 4-bit codes times 16-bit scales are exact in float32, so it differs from
the kernels by float32 rounding only).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch

from ..quant.core import num_groups
from ..quant.formats import QuantSpec
from ..quant.functional import quantize
from .triton_utils import (
    HAS_TRITON,
    SCALE_KINDS,
    dtype_kind,
    quantize_group,
    round_to,
    tl,
    triton,
    triton_backend,
    unpack_nibbles,
)
from .w4a4_layout import GROUP, check_group_multiple, unpack_weight

__all__ = [
    "BACKENDS",
    "GEMM_VARIANTS",
    "HAS_TRITON",
    "QuantizedActivations",
    "centred_weight_codes",
    "check_activation_spec",
    "check_weight_spec",
    "dequantized_weight",
    "int_launch_config",
    "padded_rank",
    "quantize_activations",
    "quantize_activations_torch",
    "quantize_activations_triton",
    "use_triton",
    "w4a4_matmul",
    "w4a4_matmul_torch",
    "w4a4_matmul_triton",
]

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "triton", "torch")


def use_triton(device: torch.device, backend: str = "auto") -> bool:
    """``auto``: Triton on CUDA; ``triton``: always (CPU tensors need ``TRITON_INTERPRET=1``); ``torch``: never."""
    if backend not in BACKENDS:
        raise ValueError(f"W4A4 backend must be one of {BACKENDS}, got {backend!r}")
    return triton_backend(device, backend, "W4A4")


def check_weight_spec(spec: QuantSpec, name: str) -> None:
    if spec.fmt.bits != 4 or spec.group_size != GROUP:
        raise ValueError(f"{name}: the W4A4 kernels take 4-bit weights in groups of {GROUP}, got {spec.fmt.name} "
                         f"with group_size {spec.group_size}")


def check_activation_spec(spec: QuantSpec, name: str) -> None:
    if spec.fmt.bits != 4 or spec.group_size != GROUP:
        raise ValueError(f"{name}: the W4A4 kernels take 4-bit activations in groups of {GROUP}, got "
                         f"{spec.fmt.name} with group_size {spec.group_size}")
    if spec.scale_dtype not in SCALE_KINDS:
        raise ValueError(f"{name}: unsupported activation scale dtype {spec.scale_dtype}")


@dataclass
class QuantizedActivations:
    """Output of ``quantize_activations``: centred int8 codes ``[M, K]``, float32 scales ``[K / 64, M]`` and the
    low-rank down projection ``[M, R]`` in x's dtype (None without a branch)."""

    codes: torch.Tensor
    scales: torch.Tensor
    down: torch.Tensor | None


def _check_inputs(x2d: torch.Tensor, smooth, l2t, static_scale, static_zero, spec: QuantSpec, name: str) -> None:
    if x2d.dim() != 2:
        raise ValueError(f"{name}: expected activations [M, K], got shape {tuple(x2d.shape)}")
    k = x2d.shape[1]
    check_group_multiple(k, name)
    check_activation_spec(spec, name)
    if smooth is not None and tuple(smooth.shape) != (k,):
        raise ValueError(f"{name}: smoothing scale of shape {tuple(smooth.shape)} for {k} inputs")
    if l2t is not None and (l2t.dim() != 2 or l2t.shape[0] != k or l2t.dtype != x2d.dtype):
        raise ValueError(f"{name}: low-rank L2^T {l2t.dtype} {tuple(l2t.shape)} for {x2d.dtype} inputs with {k} "
                         f"channels (expected {x2d.dtype} [{k}, R])")
    if static_scale is not None and tuple(static_scale.shape) != (k // GROUP,):
        raise ValueError(f"{name}: static scale of shape {tuple(static_scale.shape)}, expected ({k // GROUP},)")
    if static_scale is None and static_zero is not None:
        raise ValueError(f"{name}: a static zero point needs a static scale")
    if static_scale is not None and spec.has_zero != (static_zero is not None):
        raise ValueError(f"{name}: {spec.fmt.name} (symmetric={spec.symmetric}) "
                         f"{'needs' if spec.has_zero else 'takes no'} static zero point")


# ------------------------------------------------------------------------------------------------ PyTorch path


def quantize_activations_torch(x2d: torch.Tensor, spec: QuantSpec, *, smooth: torch.Tensor | None = None,
                               l2t: torch.Tensor | None = None, static_scale: torch.Tensor | None = None,
                               static_zero: torch.Tensor | None = None, name: str = "w4a4") -> QuantizedActivations:
    """``quantize_activations`` through ``deepcompressor.quant.quantize``.

    ``smooth [K]`` is used in x's dtype; ``l2t [K, R]`` is ``L2^T``; ``static_scale`` / ``static_zero`` ``[K / 64]``
    are calibrated parameters (float32 holding the stored values), None for dynamic ranges.
    """
    _check_inputs(x2d, smooth, l2t, static_scale, static_zero, spec, name)
    xs = x2d / smooth.to(x2d.dtype) if smooth is not None else x2d
    scale = None if static_scale is None else static_scale.reshape(1, -1)
    zero = None if static_zero is None else static_zero.reshape(1, -1)
    qt = quantize(xs, spec, scale=scale, zero=zero, name=name, check=False)
    groups = num_groups(x2d.shape[1], GROUP)
    codes = qt.codes.to(torch.int16).reshape(-1, groups, GROUP)
    if qt.zero is not None:
        codes = codes - qt.zero.to(torch.int16).expand(codes.shape[0], groups).unsqueeze(-1)
    scales = qt.scale.float().expand(x2d.shape[0], groups).t().contiguous()
    down = None if l2t is None else xs @ l2t
    return QuantizedActivations(codes.reshape(x2d.shape).to(torch.int8), scales, down)


def centred_weight_codes(packed: torch.Tensor, zero: torch.Tensor | None, signed: bool) -> torch.Tensor:
    """Kernel-layout packed weights (+ zero points ``[K / 64, N]``) -> centred int8 codes ``[N, K]``."""
    codes = unpack_weight(packed, signed).to(torch.int16)
    if zero is not None:
        n, k = codes.shape
        codes = (codes.reshape(n, k // GROUP, GROUP) - zero.t().to(torch.int16).unsqueeze(-1)).reshape(n, k)
    return codes.to(torch.int8)


def dequantized_weight(packed: torch.Tensor, w_scale: torch.Tensor, zero: torch.Tensor | None,
                       signed: bool) -> torch.Tensor:
    """Kernel-layout weight -> float32 ``[N, K]`` values ``(q - z) * s`` (callers may keep it between calls)."""
    w = centred_weight_codes(packed, zero, signed).float()
    n, k = w.shape
    return (w.reshape(n, k // GROUP, GROUP) * w_scale.t().float().unsqueeze(-1)).reshape(n, k)


def w4a4_matmul_torch(act: QuantizedActivations, w_packed: torch.Tensor, w_scale: torch.Tensor,
                      w_zero: torch.Tensor | None, w_signed: bool, *, l1t: torch.Tensor | None = None,
                      bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.float32,
                      weight: torch.Tensor | None = None) -> torch.Tensor:
    """``w4a4_matmul`` as one float32 product of the dequantized operands. A 4-bit code times a 16-bit scale is
    exact in float32, so this is the kernel's value up to float32 rounding (the kernel sums each group exactly in
    int32 first). ``weight`` is ``dequantized_weight(w_packed, w_scale, w_zero, w_signed)`` if the caller keeps
    it."""
    codes, scales = act.codes, act.scales
    m, k = codes.shape
    if weight is None:
        weight = dequantized_weight(w_packed, w_scale, w_zero, w_signed)
    a = (codes.float().reshape(m, k // GROUP, GROUP) * scales.t().unsqueeze(-1)).reshape(m, k)
    out = a @ weight.t()
    if l1t is not None:
        out += act.down.float() @ l1t.float()
    if bias is not None:
        out += bias.float()
    return out.to(out_dtype)


# ------------------------------------------------------------------------------------------------ Triton

if HAS_TRITON:

    @triton.jit
    def _act_quant_kernel(
        X, SMOOTH, L2T, STATIC_SCALE, STATIC_ZERO, CODES, SCALES, DOWN,
        M, K, stride_xm, m_bucket, X_KIND: tl.constexpr,
        HAS_SMOOTH: tl.constexpr, HAS_LOWRANK: tl.constexpr, RANK: tl.constexpr, LR_IEEE: tl.constexpr,
        STATIC: tl.constexpr, SYMMETRIC: tl.constexpr, HAS_ZERO: tl.constexpr,
        QMIN: tl.constexpr, QMAX: tl.constexpr, QSYM: tl.constexpr, SYM_ZERO: tl.constexpr,
        SCALE_KIND: tl.constexpr, TINY: tl.constexpr, FMAX: tl.constexpr, BLOCK_M: tl.constexpr,
    ):  # fmt: skip
        pid = tl.program_id(0)
        rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
        row_mask = rows < M
        cols = tl.arange(0, 64)
        rows64 = rows.to(tl.int64)
        x_rows = X + rows64[:, None] * stride_xm
        c_rows = CODES + rows64[:, None] * K
        ranks = tl.arange(0, RANK)
        down = tl.zeros((BLOCK_M, RANK), dtype=tl.float32)
        for g in range(K // 64):
            k0 = g * 64
            x = tl.load(x_rows + k0 + cols[None, :], mask=row_mask[:, None], other=0.0).to(tl.float32)
            if HAS_SMOOTH:
                s = tl.load(SMOOTH + k0 + cols).to(tl.float32)
                # x / s rounded to x's dtype, as PyTorch computes it
                x = round_to(tl.math.div_rn(x, s[None, :]), X_KIND)
            if HAS_LOWRANK:
                l2 = tl.load(L2T + (k0 + cols)[:, None] * RANK + ranks[None, :])
                xl = x.to(L2T.dtype.element_ty)
                if LR_IEEE:
                    down = tl.dot(xl.to(tl.float32), l2.to(tl.float32), down, input_precision="ieee")
                else:
                    down = tl.dot(xl, l2, down)
            q, scale = quantize_group(x, STATIC_SCALE, STATIC_ZERO, g, rows, STATIC, SYMMETRIC, HAS_ZERO, QMIN, QMAX,
                                      QSYM, SYM_ZERO, SCALE_KIND, TINY, FMAX)
            tl.store(c_rows + k0 + cols[None, :], q.to(tl.int8), mask=row_mask[:, None])
            tl.store(SCALES + g * M + rows, scale, mask=row_mask)
        if HAS_LOWRANK:
            d_ptr = DOWN + rows64[:, None] * RANK + ranks[None, :]
            tl.store(d_ptr, round_to(down, X_KIND).to(DOWN.dtype.element_ty), mask=row_mask[:, None])

    @triton.jit
    def _small_int_to_float(part):
        # Exact int32 -> float32 for |part| < 2**22 (a group's sum is at most 64 * 15 * 15) without the conversion
        # instruction, whose throughput is a fraction of the FMA pipe's: 1.5 * 2**23 + part has part in its low
        # mantissa bits.
        return (part + 0x4B400000).to(tl.float32, bitcast=True) - 12582912.0

    @triton.jit
    def _w4a4_gemm_kernel(
        A, A_SCALES, B, B_SCALES, B_ZERO, DOWN, L1T, BIAS, Y,
        M, N, K, stride_ym, m_bucket, Y_KIND: tl.constexpr,
        B_SIGNED: tl.constexpr, HAS_ZERO: tl.constexpr, HAS_LOWRANK: tl.constexpr, RANK: tl.constexpr,
        LR_IEEE: tl.constexpr, HAS_BIAS: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr,
    ):  # fmt: skip
        # m_bucket only keys the autotuner (token counts of one power-of-two bucket share a launch config).
        pid = tl.program_id(0)
        tiles_m = tl.cdiv(M, BLOCK_M)
        tiles_n = tl.cdiv(N, BLOCK_N)
        # Grouped tile order: GROUP_M row tiles sweep the column tiles together (weight tiles reused from L2).
        per_group = GROUP_M * tiles_n
        first_m = (pid // per_group) * GROUP_M
        size_m = tl.minimum(tiles_m - first_m, GROUP_M)
        pid_m = first_m + (pid % per_group) % size_m
        pid_n = (pid % per_group) // size_m
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        m_mask = rm < M
        n_mask = rn < N
        half = tl.arange(0, 32)
        a_ptr = A + rm.to(tl.int64)[:, None] * K + half[None, :]
        b_ptr = B + rn.to(tl.int64)[None, :] * (K // 2) + half[:, None]
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for g in range(K // 64):
            a_lo = tl.load(a_ptr + g * 64, mask=m_mask[:, None], other=0)
            a_hi = tl.load(a_ptr + g * 64 + 32, mask=m_mask[:, None], other=0)
            packed = tl.load(b_ptr + g * 32, mask=n_mask[None, :], other=0)  # int8 view, [32, BLOCK_N]
            w_lo, w_hi = unpack_nibbles(packed, B_SIGNED)
            if HAS_ZERO:
                z = tl.load(B_ZERO + g * N + rn, mask=n_mask, other=0)
                w_lo = (w_lo - z[None, :]).to(tl.int8)
                w_hi = (w_hi - z[None, :]).to(tl.int8)
            part = tl.dot(a_lo, w_lo, out_dtype=tl.int32)
            part = tl.dot(a_hi, w_hi, part, out_dtype=tl.int32)
            sa = tl.load(A_SCALES + g * M + rm, mask=m_mask, other=0.0)
            sb = tl.load(B_SCALES + g * N + rn, mask=n_mask, other=0.0).to(tl.float32)
            acc += _small_int_to_float(part) * (sa[:, None] * sb[None, :])
        if HAS_LOWRANK:
            ranks = tl.arange(0, RANK)
            d = tl.load(DOWN + rm.to(tl.int64)[:, None] * RANK + ranks[None, :], mask=m_mask[:, None], other=0.0)
            l1 = tl.load(L1T + ranks[:, None] * N + rn[None, :], mask=n_mask[None, :], other=0.0)
            if LR_IEEE:
                acc = tl.dot(d.to(tl.float32), l1.to(tl.float32), acc, input_precision="ieee")
            else:
                acc = tl.dot(d, l1, acc)
        if HAS_BIAS:
            acc += tl.load(BIAS + rn, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        y_ptr = Y + rm.to(tl.int64)[:, None] * stride_ym + rn[None, :]
        tl.store(y_ptr, round_to(acc, Y_KIND).to(Y.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])

    @triton.jit
    def _w4a4_gemm_swapped_kernel(
        A, A_SCALES, B, B_SCALES, B_ZERO, DOWN, L1T, BIAS, Y,
        M, N, K, stride_ym, m_bucket, Y_KIND: tl.constexpr,
        B_SIGNED: tl.constexpr, HAS_ZERO: tl.constexpr, HAS_LOWRANK: tl.constexpr, RANK: tl.constexpr,
        LR_IEEE: tl.constexpr, HAS_BIAS: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr,
    ):  # fmt: skip
        # Same result as _w4a4_gemm_kernel, computed transposed: Y^T tile = W tile @ X^T tile. The unpacked weights
        # are then the left operand, which Hopper's tensor cores may read from registers (the right one must come
        # from shared memory), and few tokens fill the narrow side of the product. GROUP_M groups weight tiles here.
        pid = tl.program_id(0)
        tiles_m = tl.cdiv(M, BLOCK_M)
        tiles_n = tl.cdiv(N, BLOCK_N)
        per_group = GROUP_M * tiles_m
        first_n = (pid // per_group) * GROUP_M
        size_n = tl.minimum(tiles_n - first_n, GROUP_M)
        pid_n = first_n + (pid % per_group) % size_n
        pid_m = (pid % per_group) // size_n
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        m_mask = rm < M
        n_mask = rn < N
        half = tl.arange(0, 32)
        b_ptr = B + rn.to(tl.int64)[:, None] * (K // 2) + half[None, :]
        a_ptr = A + rm.to(tl.int64)[None, :] * K + half[:, None]
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        for g in range(K // 64):
            packed = tl.load(b_ptr + g * 32, mask=n_mask[:, None], other=0)  # int8 view, [BLOCK_N, 32]
            w_lo, w_hi = unpack_nibbles(packed, B_SIGNED)
            if HAS_ZERO:
                z = tl.load(B_ZERO + g * N + rn, mask=n_mask, other=0)
                w_lo = (w_lo - z[:, None]).to(tl.int8)
                w_hi = (w_hi - z[:, None]).to(tl.int8)
            a_lo = tl.load(a_ptr + g * 64, mask=m_mask[None, :], other=0)  # [32, BLOCK_M]
            a_hi = tl.load(a_ptr + g * 64 + 32, mask=m_mask[None, :], other=0)
            part = tl.dot(w_lo, a_lo, out_dtype=tl.int32)
            part = tl.dot(w_hi, a_hi, part, out_dtype=tl.int32)
            sa = tl.load(A_SCALES + g * M + rm, mask=m_mask, other=0.0)
            sb = tl.load(B_SCALES + g * N + rn, mask=n_mask, other=0.0).to(tl.float32)
            acc += _small_int_to_float(part) * (sb[:, None] * sa[None, :])
        if HAS_LOWRANK:
            ranks = tl.arange(0, RANK)
            l1 = tl.load(L1T + ranks[None, :] * N + rn[:, None], mask=n_mask[:, None], other=0.0)  # [BLOCK_N, R]
            d = tl.load(DOWN + rm.to(tl.int64)[None, :] * RANK + ranks[:, None], mask=m_mask[None, :], other=0.0)
            if LR_IEEE:
                acc = tl.dot(l1.to(tl.float32), d.to(tl.float32), acc, input_precision="ieee")
            else:
                acc = tl.dot(l1, d, acc)
        if HAS_BIAS:
            acc += tl.load(BIAS + rn, mask=n_mask, other=0.0).to(tl.float32)[:, None]
        y_ptr = Y + rm.to(tl.int64)[None, :] * stride_ym + rn[:, None]
        tl.store(y_ptr, round_to(acc, Y_KIND).to(Y.dtype.element_ty), mask=n_mask[:, None] & m_mask[None, :])

    def _gemm_configs():
        configs = []
        for bm, bn, warps, stages in ((128, 128, 8, 3), (128, 128, 4, 4), (128, 256, 8, 3), (256, 128, 8, 3),
                                      (64, 128, 4, 4), (128, 64, 4, 4), (64, 256, 8, 3), (64, 64, 4, 4)):
            configs.append(triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "GROUP_M": 8}, num_warps=warps,
                                         num_stages=stages))
        return configs

    _act_quant_autotuned = triton.autotune(
        configs=[triton.Config({"BLOCK_M": bm}, num_warps=w) for bm, w in ((32, 4), (64, 4), (64, 8), (128, 8))],
        key=["m_bucket", "K", "HAS_LOWRANK", "HAS_SMOOTH"],
    )(_act_quant_kernel)

    def _swapped_configs():
        configs = []
        for bn, bm, warps, stages in ((128, 128, 8, 3), (128, 128, 4, 4), (256, 128, 8, 3), (128, 64, 4, 4),
                                      (128, 32, 4, 4), (64, 64, 4, 4), (128, 16, 4, 4), (64, 16, 4, 4)):
            configs.append(triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "GROUP_M": 8}, num_warps=warps,
                                         num_stages=stages))
        return configs

    _GEMM_KEY = ["m_bucket", "N", "K", "HAS_LOWRANK", "HAS_ZERO"]
    _w4a4_gemm_autotuned = triton.autotune(configs=_gemm_configs(), key=_GEMM_KEY)(_w4a4_gemm_kernel)
    _w4a4_gemm_swapped_autotuned = triton.autotune(configs=_swapped_configs(), key=_GEMM_KEY)(
        _w4a4_gemm_swapped_kernel)
    _GEMM_KERNELS = {"ab": (_w4a4_gemm_kernel, _w4a4_gemm_autotuned),
                     "swapped": (_w4a4_gemm_swapped_kernel, _w4a4_gemm_swapped_autotuned)}


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def padded_rank(rank: int) -> int:
    """The kernels' low-rank width for rank ``rank``: a power of two >= 16 (tensor-core products need at least
    16, ``tl.arange`` a power of two)."""
    padded = 16
    while padded < rank:
        padded *= 2
    return padded


def quantize_activations_triton(x2d: torch.Tensor, spec: QuantSpec, *, smooth: torch.Tensor | None = None,
                                l2t: torch.Tensor | None = None, static_scale: torch.Tensor | None = None,
                                static_zero: torch.Tensor | None = None, name: str = "w4a4",
                                block_m: int | None = None) -> QuantizedActivations:
    """The activation kernel (see the module docstring); ``l2t [K, R]`` must have a rank R that is a power of two
    >= 16 (``W4A4Linear`` pads its factors with zeros)."""
    _check_inputs(x2d, smooth, l2t, static_scale, static_zero, spec, name)
    if x2d.stride(1) != 1:
        x2d = x2d.contiguous()
    m, k = x2d.shape
    rank = 16
    if l2t is not None:
        rank = l2t.shape[1]
        if rank != padded_rank(rank):
            raise ValueError(f"{name}: the kernel's low-rank width must be a power of two >= 16, got {rank}")
        l2t = l2t.contiguous()
    device = x2d.device
    codes = torch.empty(m, k, dtype=torch.int8, device=device)
    scales = torch.empty(k // GROUP, m, dtype=torch.float32, device=device)
    down = torch.empty(m, rank, dtype=x2d.dtype, device=device) if l2t is not None else None
    fmt = spec.fmt
    info = torch.finfo(spec.scale_dtype)
    dummy = codes
    args = (x2d, smooth if smooth is not None else dummy, l2t if l2t is not None else dummy,
            static_scale if static_scale is not None else dummy, static_zero if static_zero is not None else dummy,
            codes, scales, down if down is not None else dummy, m, k, x2d.stride(0), _m_bucket(m),
            dtype_kind(x2d.dtype))
    flags = {
        "HAS_SMOOTH": smooth is not None, "HAS_LOWRANK": l2t is not None, "RANK": rank,
        "LR_IEEE": x2d.dtype == torch.float32 or _interpreting(), "STATIC": static_scale is not None,
        "SYMMETRIC": spec.symmetric, "HAS_ZERO": spec.has_zero, "QMIN": fmt.qmin, "QMAX": fmt.qmax,
        "QSYM": float(fmt.symmetric_qmax), "SYM_ZERO": float(fmt.symmetric_zero) if spec.symmetric else 0.0,
        "SCALE_KIND": SCALE_KINDS[spec.scale_dtype], "TINY": float(info.tiny), "FMAX": float(info.max),
    }
    if block_m is None and _interpreting():
        block_m = 16
    if block_m is None:
        _act_quant_autotuned[lambda meta: (triton.cdiv(m, meta["BLOCK_M"]),)](*args, **flags)
    else:
        _act_quant_kernel[(triton.cdiv(m, block_m),)](*args, **flags, BLOCK_M=block_m, num_warps=4)
    return QuantizedActivations(codes, scales, down)


def _m_bucket(m: int) -> int:
    bucket = 16
    while bucket < m:
        bucket *= 2
    return bucket


def int_launch_config(m: int) -> dict:
    """A launch configuration of the integer GEMM chosen from the row count alone (no autotuning: the tuned
    configurations differed from it by less than the integer path's distance to the mixed-input backends)."""
    block_m = 16 if m <= 16 else (64 if m <= 64 else 128)
    return {"BLOCK_M": block_m, "BLOCK_N": 128, "GROUP_M": 8, "num_warps": 4 if block_m < 128 else 8,
            "num_stages": 3}


GEMM_VARIANTS = ("auto", "ab", "swapped")
# (variant, launch key) -> the variant measured fastest for that key (filled by variant="auto" on CUDA).
_variant_choice: dict[tuple, str] = {}


def w4a4_matmul_triton(act: QuantizedActivations, w_packed: torch.Tensor, w_scale: torch.Tensor,
                       w_zero: torch.Tensor | None, w_signed: bool, *, l1t: torch.Tensor | None = None,
                       bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.float32,
                       variant: str = "auto", config: dict | None = None) -> torch.Tensor:
    """The GEMM kernel.

    ``variant``: ``ab`` (tiles of tokens x outputs), ``swapped`` (the transposed product: unpacked weights as the
    left operand) or ``auto`` (on CUDA, both are timed on the first call of each shape bucket and the faster one
    is kept; under the interpreter ``ab``). ``config`` (``BLOCK_M``, ``BLOCK_N``, ``GROUP_M``, ``num_warps``,
    ``num_stages``) skips the autotuner (always skipped under the interpreter, which uses small tiles).
    """
    if variant not in GEMM_VARIANTS:
        raise ValueError(f"w4a4_matmul: variant must be one of {GEMM_VARIANTS}, got {variant!r}")
    codes, scales = act.codes, act.scales
    m, k = codes.shape
    n = w_packed.shape[0]
    if l1t is not None and act.down is None:
        raise ValueError("w4a4_matmul: a low-rank L1 was given but the activations carry no down projection")
    rank = act.down.shape[1] if l1t is not None else 16
    if l1t is not None and tuple(l1t.shape) != (rank, n):
        raise ValueError(f"w4a4_matmul: L1^T of shape {tuple(l1t.shape)}, expected ({rank}, {n})")
    y = torch.empty(m, n, dtype=out_dtype, device=codes.device)
    dummy = y
    args = (codes, scales, w_packed.view(torch.int8), w_scale, w_zero if w_zero is not None else dummy,
            act.down if l1t is not None else dummy, l1t if l1t is not None else dummy,
            bias if bias is not None else dummy, y, m, n, k, y.stride(0), _m_bucket(m), dtype_kind(out_dtype))
    flags = {"B_SIGNED": w_signed, "HAS_ZERO": w_zero is not None, "HAS_LOWRANK": l1t is not None, "RANK": rank,
             "LR_IEEE": _interpreting() or (act.down is not None and act.down.dtype == torch.float32),
             "HAS_BIAS": bias is not None}
    if config is None and _interpreting():
        config = {"BLOCK_M": 16, "BLOCK_N": 16, "GROUP_M": 2, "num_warps": 1, "num_stages": 1}

    def launch(name: str) -> None:
        plain, tuned = _GEMM_KERNELS[name]
        if config is None:
            tuned[lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)](*args, **flags)
        else:
            grid = (triton.cdiv(m, config["BLOCK_M"]) * triton.cdiv(n, config["BLOCK_N"]),)
            plain[grid](*args, **flags, **config)

    if variant == "auto":
        variant = "ab" if _interpreting() or config is not None else _choose_variant(
            (_m_bucket(m), n, k, tuple(flags.items()), out_dtype, codes.device), launch)
    launch(variant)
    return y


def _choose_variant(key: tuple, launch) -> str:
    """Time both GEMM variants (each autotuned first) once per key; a variant that fails to build is skipped."""
    choice = _variant_choice.get(key)
    if choice is not None:
        return choice
    from triton.testing import do_bench

    timings = {}
    for name in ("ab", "swapped"):
        try:
            launch(name)
            timings[name] = do_bench(lambda name=name: launch(name), warmup=5, rep=20)
        except Exception as error:  # noqa: BLE001 - a variant the compiler rejects must not stop the other
            logger.warning("W4A4 GEMM variant %s failed for %s: %s", name, key[:3], error)
    if not timings:
        raise RuntimeError(f"no W4A4 GEMM variant could run for (M bucket, N, K) = {key[:3]}")
    choice = _variant_choice[key] = min(timings, key=timings.get)
    logger.info("W4A4 GEMM (M bucket, N, K) = %s: %s (%s)", key[:3], choice,
                ", ".join(f"{name} {ms * 1e3:.1f} us" for name, ms in timings.items()))
    return choice


# ------------------------------------------------------------------------------------------------ dispatch


def _check_weight(w_packed: torch.Tensor, w_scale: torch.Tensor, w_zero: torch.Tensor | None, k: int) -> None:
    n = w_packed.shape[0]
    if w_packed.dtype != torch.uint8 or tuple(w_packed.shape) != (n, k // 2):
        raise ValueError(f"w4a4_matmul: packed weight {w_packed.dtype} {tuple(w_packed.shape)}, expected uint8 "
                         f"[N, {k // 2}] for {k} inputs")
    if tuple(w_scale.shape) != (k // GROUP, n):
        raise ValueError(f"w4a4_matmul: weight scale of shape {tuple(w_scale.shape)}, expected ({k // GROUP}, {n})")
    if w_zero is not None and (tuple(w_zero.shape) != (k // GROUP, n) or w_zero.dtype != torch.int8):
        raise ValueError(f"w4a4_matmul: weight zero point {w_zero.dtype} {tuple(w_zero.shape)}, expected int8 "
                         f"({k // GROUP}, {n})")


def quantize_activations(x2d: torch.Tensor, spec: QuantSpec, *, backend: str = "auto", **kwargs
                         ) -> QuantizedActivations:
    """Dispatch to the Triton kernel or the PyTorch path (same results up to float32 rounding of the branch)."""
    if use_triton(x2d.device, backend):
        return quantize_activations_triton(x2d, spec, **kwargs)
    return quantize_activations_torch(x2d, spec, **kwargs)


def w4a4_matmul(act: QuantizedActivations, w_packed: torch.Tensor, w_scale: torch.Tensor,
                w_zero: torch.Tensor | None, w_signed: bool, *, backend: str = "auto", **kwargs) -> torch.Tensor:
    """``y [M, N]`` from quantized activations and a kernel-layout weight: ``w_packed`` uint8 ``[N, K / 2]``,
    ``w_scale [K / 64, N]`` (any float dtype), ``w_zero`` int8 ``[K / 64, N]`` or None; ``l1t [R, N]``, ``bias [N]``
    and ``out_dtype`` as keywords."""
    _check_weight(w_packed, w_scale, w_zero, act.codes.shape[1])
    if use_triton(act.codes.device, backend):
        kwargs.pop("weight", None)
        return w4a4_matmul_triton(act, w_packed, w_scale, w_zero, w_signed, **kwargs)
    kwargs.pop("config", None)
    return w4a4_matmul_torch(act, w_packed, w_scale, w_zero, w_signed, **kwargs)
