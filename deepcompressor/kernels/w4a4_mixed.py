"""Mixed-input W4A4 kernels: the 4-bit operands are dequantized to the activations' 16-bit dtype and multiplied on
16-bit tensor cores.

Hopper has no INT4 tensor cores, and rescaling the int32 partial sums of every group of 64 inputs costs its CUDA
cores about twice the MMA time (``kernels.w4a4``, the exact integer model of INT4 hardware). Here every operand is
the value ``FakeQuantLinear`` multiplies in the same dtype:

    xq   = round16((q_a - z_a) * s_a)      per token and group of 64, from xs = round16(x / s)
    w    = round16((q_w - z_w) * s_w)      per output and group of 64
    down = xs @ L2^T                       float32 accumulation

so the result equals ``FakeQuantLinear`` up to summation order and the rounding of intermediate sums
(``FakeQuantLinear`` rounds the main product, the branch and their sum separately; these kernels round once).

- ``fake_quant_activations``: ``x [M, K]`` -> ``xq`` written into the first K columns of an operand ``[M, K + R]``
  and the branch down projection, either rounded into its last R columns (``chunks == 1``) or, with K split into
  ``chunks`` ranges of whole groups (few tokens: many programs), as float32 partial sums ``[chunks, M, R]``.
- ``dequantize_weight``: packed ``[N, K / 2]`` -> ``[N, K + R]`` 16-bit, ``L1`` in the last R columns, into a
  reusable workspace. With the first, one cuBLAS GEMM computes the main product and the branch (large M, where
  the dequantization costs a few percent of the GEMM).
- ``w4a4_mixed_gemm``: programs over (row tile, output tile, range of K), the weights read as 4-bit codes and
  dequantized in registers, the branch's up projection applied to each range's partial down projection; with more
  than one range, the last program of an output tile sums the partial tiles in a fixed order (deterministic),
  adds the bias and rounds once. ``w4a4_gemv`` is its few-token form (one row tile, split K): there the layer is
  bound by reading its weights, 4.25 bits instead of 16.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from ..quant.formats import QuantSpec
from ..quant.functional import fake_quantize
from .triton_utils import (
    HAS_TRITON,
    SCALE_KINDS,
    dequant_nibbles_bf16,
    dequant_nibbles_f16,
    dtype_kind,
    fast_dequant_mode,
    quantize_groups,
    round_to,
    smooth_divide,
    tl,
    triton,
    unpack_nibbles,
)
from .w4a4 import dequantized_weight
from .w4a4_layout import GROUP

__all__ = [
    "GemvConfig",
    "default_gemv_config",
    "dequantize_weight_torch",
    "dequantize_weight_triton",
    "fake_quant_activations_torch",
    "fake_quant_activations_triton",
    "gemv_workspace",
    "lowrank_down_triton",
    "split_plan",
    "tiled_gemm_configs",
    "w4a4_fused_gemv_triton",
    "w4a4_gemv_triton",
    "w4a4_mixed_gemm_triton",
]


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


# ------------------------------------------------------------------------------------------------ PyTorch references


def fake_quant_activations_torch(x2d: torch.Tensor, spec: QuantSpec, *, smooth: torch.Tensor | None = None,
                                 l2t: torch.Tensor | None = None, static_scale: torch.Tensor | None = None,
                                 static_zero: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(xq, down)`` with ``deepcompressor.quant``: ``xq`` in x's dtype, ``down = xs @ L2^T`` in float32."""
    xs = x2d / smooth.to(x2d.dtype) if smooth is not None else x2d
    scale = None if static_scale is None else static_scale.reshape(1, -1)
    zero = None if static_zero is None else static_zero.reshape(1, -1)
    xq = fake_quantize(xs, spec, scale=scale, zero=zero, check=False)
    down = None if l2t is None else xs.float() @ l2t.float()
    return xq, down


def dequantize_weight_torch(packed: torch.Tensor, w_scale: torch.Tensor, w_zero: torch.Tensor | None, signed: bool,
                            dtype: torch.dtype) -> torch.Tensor:
    """Kernel-layout weight -> ``[N, K]`` in ``dtype``: ``(q - z) * s`` in float32, rounded once."""
    return dequantized_weight(packed, w_scale, w_zero, signed).to(dtype)


# ------------------------------------------------------------------------------------------------ Triton

if HAS_TRITON:

    @triton.jit
    def _fake_quant_act_kernel(
        X, SMOOTH, L2T, STATIC_SCALE, STATIC_ZERO, XQ, DOWN,
        M, K, stride_xm, stride_qm, stride_dc, stride_dm, GPC: tl.constexpr, SUB: tl.constexpr,
        X_KIND: tl.constexpr, HAS_SMOOTH: tl.constexpr, HAS_LOWRANK: tl.constexpr, RANK: tl.constexpr,
        LR_IEEE: tl.constexpr, DOWN_ROUND: tl.constexpr,
        STATIC: tl.constexpr, SYMMETRIC: tl.constexpr, HAS_ZERO: tl.constexpr,
        QMIN: tl.constexpr, QMAX: tl.constexpr, QSYM: tl.constexpr, SYM_ZERO: tl.constexpr,
        SCALE_KIND: tl.constexpr, TINY: tl.constexpr, FMAX: tl.constexpr, BLOCK_M: tl.constexpr,
    ):  # fmt: skip
        # One program: BLOCK_M rows x GPC groups of 64, read SUB groups per load so that a whole tile is in flight
        # at once (a loop over single groups would wait out the memory latency group after group).
        pid_m = tl.program_id(0)
        chunk = tl.program_id(1)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        row_mask = rows < M
        rows64 = rows.to(tl.int64)
        ranks = tl.arange(0, RANK)
        down = tl.zeros((BLOCK_M, RANK), dtype=tl.float32)
        for sub in range(0, GPC, SUB):
            cols = (chunk * GPC + sub) * 64 + tl.arange(0, SUB * 64)
            in_k = cols < K
            mask = row_mask[:, None] & in_k[None, :]
            x = tl.load(X + rows64[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            if HAS_SMOOTH:
                s = tl.load(SMOOTH + cols, mask=in_k, other=1.0).to(tl.float32)
                x = round_to(tl.math.div_rn(x, s[None, :]), X_KIND)  # x / s rounded to x's dtype, as PyTorch does
            groups = chunk * GPC + sub + tl.arange(0, SUB)
            q, scale = quantize_groups(tl.reshape(x, (BLOCK_M, SUB, 64)), STATIC_SCALE, STATIC_ZERO, groups,
                                        groups < K // 64, STATIC, SYMMETRIC, HAS_ZERO, QMIN, QMAX, QSYM, SYM_ZERO,
                                        SCALE_KIND, TINY, FMAX)
            xq = tl.reshape(round_to(q * scale[:, :, None], X_KIND), (BLOCK_M, SUB * 64))  # exact, rounded once
            tl.store(XQ + rows64[:, None] * stride_qm + cols[None, :], xq.to(XQ.dtype.element_ty), mask=mask)
            if HAS_LOWRANK:
                l2 = tl.load(L2T + cols[:, None] * RANK + ranks[None, :], mask=in_k[:, None], other=0.0)
                xl = x.to(L2T.dtype.element_ty)
                if LR_IEEE:
                    down = tl.dot(xl.to(tl.float32), l2.to(tl.float32), down, input_precision="ieee")
                else:
                    down = tl.dot(xl, l2, down)
        if HAS_LOWRANK:
            _store_down(down, DOWN + chunk * stride_dc + rows64[:, None] * stride_dm + ranks[None, :], row_mask,
                        X_KIND, DOWN_ROUND)

    @triton.jit
    def _store_down(down, d_ptr, row_mask, X_KIND: tl.constexpr, DOWN_ROUND: tl.constexpr):
        # A chunk's down projection: rounded to x's dtype into the operand's last columns (one chunk), or float32
        # partial sums (several).
        if DOWN_ROUND:
            tl.store(d_ptr, round_to(down, X_KIND).to(d_ptr.dtype.element_ty), mask=row_mask[:, None])
        else:
            tl.store(d_ptr, down, mask=row_mask[:, None])

    @triton.jit
    def _act_chunk_kernel(
        X, SMOOTH, L2T, STATIC_SCALE, STATIC_ZERO, XQ, DOWN,
        M, K, stride_xm, stride_qm, stride_dc, stride_dm, GPC: tl.constexpr,
        X_KIND: tl.constexpr, HAS_SMOOTH: tl.constexpr, HAS_LOWRANK: tl.constexpr, RANK: tl.constexpr,
        LR_IEEE: tl.constexpr, DOWN_ROUND: tl.constexpr,
        STATIC: tl.constexpr, SYMMETRIC: tl.constexpr, HAS_ZERO: tl.constexpr,
        QMIN: tl.constexpr, QMAX: tl.constexpr, QSYM: tl.constexpr, SYM_ZERO: tl.constexpr,
        SCALE_KIND: tl.constexpr, TINY: tl.constexpr, FMAX: tl.constexpr, BLOCK_M: tl.constexpr,
    ):  # fmt: skip
        # One program: BLOCK_M rows x one chunk of GPC groups, no loop: the tile is loaded as [rows, groups, 64]
        # (the group reductions run along its last axis, no reshape before them) and everything after the load
        # depends on it alone, so the GPU keeps many programs' loads in flight.
        pid_m = tl.program_id(0)
        chunk = tl.program_id(1)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        row_mask = rows < M
        rows64 = rows.to(tl.int64)
        groups = chunk * GPC + tl.arange(0, GPC)
        g_mask = groups < K // 64
        c = tl.arange(0, 64)
        cols = groups[:, None] * 64 + c[None, :]  # [GPC, 64]
        mask = row_mask[:, None, None] & g_mask[None, :, None]
        x = tl.load(X + rows64[:, None, None] * stride_xm + cols[None, :, :], mask=mask, other=0.0).to(tl.float32)
        if HAS_SMOOTH:
            s = tl.load(SMOOTH + cols, mask=g_mask[:, None], other=1.0).to(tl.float32)
            x = smooth_divide(x, s[None, :, :], X_KIND)
        q, scale = quantize_groups(x, STATIC_SCALE, STATIC_ZERO, groups, g_mask, STATIC, SYMMETRIC, HAS_ZERO, QMIN,
                                    QMAX, QSYM, SYM_ZERO, SCALE_KIND, TINY, FMAX)
        xq = round_to(q * scale[:, :, None], X_KIND)
        tl.store(XQ + rows64[:, None, None] * stride_qm + cols[None, :, :], xq.to(XQ.dtype.element_ty), mask=mask)
        if HAS_LOWRANK:
            ranks = tl.arange(0, RANK)
            kk = chunk * GPC * 64 + tl.arange(0, GPC * 64)
            l2 = tl.load(L2T + kk[:, None] * RANK + ranks[None, :], mask=(kk < K)[:, None], other=0.0)
            x2 = tl.reshape(x, (BLOCK_M, GPC * 64))
            if LR_IEEE:
                down = tl.dot(x2, l2.to(tl.float32), input_precision="ieee")
            else:
                down = tl.dot(x2.to(L2T.dtype.element_ty), l2)
            _store_down(down, DOWN + chunk * stride_dc + rows64[:, None] * stride_dm + ranks[None, :], row_mask,
                        X_KIND, DOWN_ROUND)

    @triton.jit
    def _lowrank_down_kernel(
        X, SMOOTH, L2T, DOWN, M, K, stride_xm, stride_dm, X_KIND: tl.constexpr, HAS_SMOOTH: tl.constexpr,
        RANK: tl.constexpr, IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
    ):  # fmt: skip
        # down = round16(x / s) @ L2^T for BLOCK_M rows, K streamed in steps (pipelined loads, one float32
        # accumulator): the branch's down projection on its own, for many rows, where computing it inside the
        # activation kernel keeps too much alive at once.
        pid = tl.program_id(0)
        rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
        row_mask = rows < M
        rows64 = rows.to(tl.int64)
        ranks = tl.arange(0, RANK)
        acc = tl.zeros((BLOCK_M, RANK), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + tl.arange(0, BLOCK_K)
            k_mask = kk < K
            x = tl.load(X + rows64[:, None] * stride_xm + kk[None, :], mask=row_mask[:, None] & k_mask[None, :],
                        other=0.0)
            if HAS_SMOOTH:
                s = tl.load(SMOOTH + kk, mask=k_mask, other=1.0).to(tl.float32)
                x = smooth_divide(x.to(tl.float32), s[None, :], X_KIND)
            l2 = tl.load(L2T + kk[:, None] * RANK + ranks[None, :], mask=k_mask[:, None], other=0.0)
            if IEEE:
                acc = tl.dot(x.to(tl.float32), l2.to(tl.float32), acc, input_precision="ieee")
            else:
                acc = tl.dot(x.to(L2T.dtype.element_ty), l2, acc)
        tl.store(DOWN + rows64[:, None] * stride_dm + ranks[None, :],
                 round_to(acc, X_KIND).to(DOWN.dtype.element_ty), mask=row_mask[:, None])

    @triton.jit
    def _dequant_weight_kernel(
        B, B_SCALES, B_ZERO, L1T, OUT, N, K, stride_on, GPP: tl.constexpr,
        OUT_KIND: tl.constexpr, B_SIGNED: tl.constexpr, HAS_ZERO: tl.constexpr, HAS_LOWRANK: tl.constexpr,
        RANK: tl.constexpr, BLOCK_N: tl.constexpr, DEQ: tl.constexpr,
    ):  # fmt: skip
        # One program: BLOCK_N outputs x GPP groups, read with one load (packed bytes are contiguous per output).
        pid_n = tl.program_id(0)
        pid_g = tl.program_id(1)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = rn < N
        rn64 = rn.to(tl.int64)
        if DEQ == 0:
            c = tl.arange(0, GPP * 32)
            group = pid_g * GPP + c // 32
            ok = n_mask[:, None] & (group < K // 64)[None, :]
            packed = tl.load(B + rn64[:, None] * (K // 2) + (pid_g * GPP * 32 + c)[None, :], mask=ok, other=0)
            lo, hi = unpack_nibbles(packed, B_SIGNED)
            lo = lo.to(tl.float32)
            hi = hi.to(tl.float32)
            if HAS_ZERO:
                z = tl.load(B_ZERO + group[None, :] * N + rn[:, None], mask=ok, other=0).to(tl.float32)
                lo = lo - z
                hi = hi - z
            s = tl.load(B_SCALES + group[None, :] * N + rn[:, None], mask=ok, other=0.0).to(tl.float32)
            out = OUT + rn64[:, None] * stride_on + (group * 64 + c % 32)[None, :]
            tl.store(out, round_to(lo * s, OUT_KIND).to(OUT.dtype.element_ty), mask=ok)
            tl.store(out + 32, round_to(hi * s, OUT_KIND).to(OUT.dtype.element_ty), mask=ok)
        else:
            # GPU: one scale load per (output, group), four codes converted per register (dequant_nibbles_*).
            group = pid_g * GPP + tl.arange(0, GPP)
            c = tl.arange(0, 32)
            ok2 = n_mask[:, None] & (group < K // 64)[None, :]
            ok = ok2[:, :, None]
            packed = tl.load(B + rn64[:, None, None] * (K // 2) + (group * 32)[None, :, None] + c[None, None, :],
                             mask=ok, other=0)
            s = tl.load(B_SCALES + group[None, :] * N + rn[:, None], mask=ok2, other=0.0)
            s3 = tl.broadcast_to(s[:, :, None], (BLOCK_N, GPP, 32))
            if DEQ == 1:
                s32 = s3.to(tl.float32)
                s_hi = s32.to(tl.bfloat16)
                lo, hi = dequant_nibbles_bf16(packed, s_hi, (s32 - s_hi.to(tl.float32)).to(tl.bfloat16))
            else:
                lo, hi = dequant_nibbles_f16(packed, s3.to(tl.float16))
            out = OUT + rn64[:, None, None] * stride_on + (group * 64)[None, :, None] + c[None, None, :]
            tl.store(out, lo.to(OUT.dtype.element_ty), mask=ok)
            tl.store(out + 32, hi.to(OUT.dtype.element_ty), mask=ok)
        if HAS_LOWRANK:  # noqa: SIM102 - a compile-time switch around a run-time test
            if pid_g == 0:
                ranks = tl.arange(0, RANK)
                l1 = tl.load(L1T + ranks[None, :] * N + rn[:, None], mask=n_mask[:, None], other=0.0)
                tl.store(OUT + rn64[:, None] * stride_on + K + ranks[None, :], l1.to(OUT.dtype.element_ty),
                         mask=n_mask[:, None])

    @triton.jit
    def _dequant_weight_block(B, B_SCALES, B_ZERO, g0, g_end, K, N, rn, n_mask, GB: tl.constexpr, KIND: tl.constexpr,
                              B_SIGNED: tl.constexpr, HAS_ZERO: tl.constexpr, DTYPE: tl.constexpr,
                              DEQ: tl.constexpr):
        # Groups g0 .. g0+GB of the weight, dequantized in registers as two [32 GB, BLOCK_N] tiles: row c of the
        # low tile is input 64 (g0 + c // 32) + c % 32, which the packed byte g0 * 32 + c holds in its low nibble
        # (its high nibble holds the input 32 later, row c of the high tile), so one load brings the whole block.
        if DEQ == 0:
            c = tl.arange(0, GB * 32)
            group = g0 + c // 32
            w_mask = (group < g_end)[:, None] & n_mask[None, :]
            packed = tl.load(B + rn.to(tl.int64)[None, :] * (K // 2) + (g0 * 32 + c)[:, None], mask=w_mask,
                             other=0)
            lo, hi = unpack_nibbles(packed, B_SIGNED)
            lo = lo.to(tl.float32)
            hi = hi.to(tl.float32)
            if HAS_ZERO:
                z = tl.load(B_ZERO + group[:, None] * N + rn[None, :], mask=w_mask, other=0).to(tl.float32)
                lo = lo - z
                hi = hi - z
            s = tl.load(B_SCALES + group[:, None] * N + rn[None, :], mask=w_mask, other=0.0).to(tl.float32)
            w_lo = round_to(lo * s, KIND).to(DTYPE)
            w_hi = round_to(hi * s, KIND).to(DTYPE)
        else:
            # GPU: the scales read once per (group, output) and broadcast over the group's 32 bytes in registers
            # (not re-read per weight), the codes converted four bytes per register (dequant_nibbles_*).
            group = g0 + tl.arange(0, GB)
            g_mask = group < g_end
            c = tl.arange(0, 32)
            packed = tl.load(B + rn.to(tl.int64)[None, None, :] * (K // 2) + (group * 32)[:, None, None]
                             + c[None, :, None], mask=g_mask[:, None, None] & n_mask[None, None, :], other=0)
            s = tl.load(B_SCALES + group[:, None] * N + rn[None, :], mask=g_mask[:, None] & n_mask[None, :],
                        other=0.0)
            s3 = tl.broadcast_to(s[:, None, :], (GB, 32, s.shape[1]))
            if DEQ == 1:
                s32 = s3.to(tl.float32)
                s_hi = s32.to(tl.bfloat16)
                s_lo = (s32 - s_hi.to(tl.float32)).to(tl.bfloat16)
                lo3, hi3 = dequant_nibbles_bf16(packed, s_hi, s_lo)
            else:
                lo3, hi3 = dequant_nibbles_f16(packed, s3.to(tl.float16))
            w_lo = tl.reshape(lo3, (GB * 32, s.shape[1])).to(DTYPE)
            w_hi = tl.reshape(hi3, (GB * 32, s.shape[1])).to(DTYPE)
        return w_lo, w_hi

    @triton.jit
    def _dot_halves(acc, a_lo, a_hi, w_lo, w_hi, IEEE: tl.constexpr):
        if IEEE:
            acc = tl.dot(a_lo.to(tl.float32), w_lo.to(tl.float32), acc, input_precision="ieee")
            acc = tl.dot(a_hi.to(tl.float32), w_hi.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(a_lo, w_lo, acc)
            acc = tl.dot(a_hi, w_hi, acc)
        return acc

    @triton.jit
    def _mixed_block_product(acc, a_rows, B, B_SCALES, B_ZERO, g0, g_end, K, N, rn, m_mask, n_mask,
                             GB: tl.constexpr, Y_KIND: tl.constexpr, B_SIGNED: tl.constexpr, HAS_ZERO: tl.constexpr,
                             IEEE: tl.constexpr, A_DTYPE: tl.constexpr, DEQ: tl.constexpr):
        # acc += xq[:, groups g0 .. g0+GB) @ dequantized W[those groups, :]^T, the activation columns read in the
        # order of the weight tiles (_dequant_weight_block).
        c = tl.arange(0, GB * 32)
        group = g0 + c // 32
        k_lo = group * 64 + c % 32
        a_mask = m_mask[:, None] & (group < g_end)[None, :]
        a_lo = tl.load(a_rows + k_lo[None, :], mask=a_mask, other=0.0)
        a_hi = tl.load(a_rows + k_lo[None, :] + 32, mask=a_mask, other=0.0)
        w_lo, w_hi = _dequant_weight_block(B, B_SCALES, B_ZERO, g0, g_end, K, N, rn, n_mask, GB, Y_KIND, B_SIGNED,
                                           HAS_ZERO, A_DTYPE, DEQ)
        return _dot_halves(acc, a_lo, a_hi, w_lo, w_hi, IEEE)

    @triton.jit
    def _mixed_gemm_kernel(
        XQ, DOWNP, B, B_SCALES, B_ZERO, L1T, BIAS, Y, PART, COUNT,
        M, N, K, stride_xm, stride_dc, stride_ym, GPS, SPLITS,
        Y_KIND: tl.constexpr, B_SIGNED: tl.constexpr, HAS_ZERO: tl.constexpr, HAS_LOWRANK: tl.constexpr,
        RANK: tl.constexpr, IEEE: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr,
        GB: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DEQ: tl.constexpr,
    ):  # fmt: skip
        # Row tiles vary fastest, so the programs that share a weight tile run together and read it once from HBM.
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        split = tl.program_id(2)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        m_mask = rm < M
        rm64 = rm.to(tl.int64)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = rn < N
        a_rows = XQ + rm64[:, None] * stride_xm
        groups = K // 64
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        # GB groups per step: all of a split's range at once (few rows), or a K step of the pipelined loop.
        g_end = tl.minimum(split * GPS + GPS, groups)
        for g0 in range(split * GPS, g_end, GB):
            acc = _mixed_block_product(acc, a_rows, B, B_SCALES, B_ZERO, g0, g_end, K, N, rn, m_mask, n_mask, GB,
                                       Y_KIND, B_SIGNED, HAS_ZERO, IEEE, XQ.dtype.element_ty, DEQ)
        if HAS_LOWRANK:
            # The up projection is linear: each range adds (its partial down projection) @ L1^T.
            ranks = tl.arange(0, RANK)
            d = tl.load(DOWNP + split * stride_dc + rm64[:, None] * RANK + ranks[None, :], mask=m_mask[:, None],
                        other=0.0)
            l1 = tl.load(L1T + ranks[:, None] * N + rn[None, :], mask=n_mask[None, :], other=0.0).to(tl.float32)
            acc = tl.dot(d, l1, acc, input_precision="ieee")
        _split_epilogue(acc, Y, PART, COUNT, BIAS, rm64, rn, m_mask, n_mask, M, N, split,
                        pid_m * tl.num_programs(1) + pid_n, stride_ym, Y_KIND, SPLITS, HAS_BIAS, SPLIT)

    @triton.jit
    def _split_epilogue(acc, Y, PART, COUNT, BIAS, rm64, rn, m_mask, n_mask, M, N, split, tile_index, stride_ym,
                        Y_KIND: tl.constexpr, SPLITS, HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr):
        # One range of K: write the output tile. Several: store this range's partial tile; the program that
        # arrives last sums all of them in range order (deterministic), adds the bias and rounds once.
        out_mask = m_mask[:, None] & n_mask[None, :]
        y_ptr = Y + rm64[:, None] * stride_ym + rn[None, :]
        if SPLIT:
            tile = rm64[:, None] * N + rn[None, :]
            tl.store(PART + split * M * N + tile, acc, mask=out_mask)
            tl.debug_barrier()
            # acq_rel at GPU scope: the partial tiles stored before it are visible to the program that counts last.
            counter = COUNT + tile_index
            arrived = tl.atomic_add(counter, 1)
            if arrived == SPLITS - 1:
                total = tl.zeros(acc.shape, dtype=tl.float32)
                for t in range(SPLITS):  # run-time count: one compiled kernel for every split plan
                    total += tl.load(PART + t * M * N + tile, mask=out_mask, other=0.0, cache_modifier=".cg")
                if HAS_BIAS:
                    total += tl.load(BIAS + rn, mask=n_mask, other=0.0).to(tl.float32)[None, :]
                tl.store(y_ptr, round_to(total, Y_KIND).to(Y.dtype.element_ty), mask=out_mask)
                tl.atomic_xchg(counter, 0)  # ready for the next call
        else:
            if HAS_BIAS:
                acc += tl.load(BIAS + rn, mask=n_mask, other=0.0).to(tl.float32)[None, :]
            tl.store(y_ptr, round_to(acc, Y_KIND).to(Y.dtype.element_ty), mask=out_mask)

    @triton.jit
    def _fused_gemv_kernel(
        X, SMOOTH, L2T, STATIC_SCALE, STATIC_ZERO, B, B_SCALES, B_ZERO, L1T, BIAS, Y, PART, COUNT,
        M, N, K, stride_xm, stride_ym, GPS: tl.constexpr, SPLITS: tl.constexpr, GB: tl.constexpr,
        X_KIND: tl.constexpr, HAS_SMOOTH: tl.constexpr, HAS_LOWRANK: tl.constexpr, RANK: tl.constexpr,
        IEEE: tl.constexpr, STATIC: tl.constexpr, SYMMETRIC: tl.constexpr, HAS_ZERO_A: tl.constexpr,
        QMIN: tl.constexpr, QMAX: tl.constexpr, QSYM: tl.constexpr, SYM_ZERO: tl.constexpr,
        SCALE_KIND: tl.constexpr, TINY: tl.constexpr, FMAX: tl.constexpr,
        B_SIGNED: tl.constexpr, HAS_ZERO: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DEQ: tl.constexpr,
    ):  # fmt: skip
        # The whole layer in one launch for very few rows: each program fake-quantizes the slice of x it multiplies
        # (repeated by every output tile, which costs little at <= 16 rows and saves the activation kernel's launch),
        # computes that slice's down projection, and multiplies by the weights dequantized in registers.
        pid_n = tl.program_id(0)
        split = tl.program_id(1)
        rm = tl.arange(0, BLOCK_M)
        m_mask = rm < M
        rm64 = rm.to(tl.int64)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = rn < N
        groups = K // 64
        g_end = tl.minimum(split * GPS + GPS, groups)
        ranks = tl.arange(0, RANK)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        down = tl.zeros((BLOCK_M, RANK), dtype=tl.float32)
        for g0 in range(split * GPS, g_end, GB):
            cols = g0 * 64 + tl.arange(0, GB * 64)
            in_k = cols < g_end * 64
            x = tl.load(X + rm64[:, None] * stride_xm + cols[None, :], mask=m_mask[:, None] & in_k[None, :],
                        other=0.0).to(tl.float32)
            if HAS_SMOOTH:
                s = tl.load(SMOOTH + cols, mask=in_k, other=1.0).to(tl.float32)
                x = round_to(tl.math.div_rn(x, s[None, :]), X_KIND)
            if HAS_LOWRANK:
                l2 = tl.load(L2T + cols[:, None] * RANK + ranks[None, :], mask=in_k[:, None], other=0.0)
                if IEEE:
                    down = tl.dot(x, l2.to(tl.float32), down, input_precision="ieee")
                else:
                    down = tl.dot(x.to(L2T.dtype.element_ty), l2, down)
            group = g0 + tl.arange(0, GB)
            q, scale = quantize_groups(tl.reshape(x, (BLOCK_M, GB, 64)), STATIC_SCALE, STATIC_ZERO, group,
                                        group < groups, STATIC, SYMMETRIC, HAS_ZERO_A, QMIN, QMAX, QSYM, SYM_ZERO,
                                        SCALE_KIND, TINY, FMAX)
            xq = round_to(q * scale[:, :, None], X_KIND)  # [BLOCK_M, GB, 64]: FakeQuantLinear's operand
            # Each packed byte holds input j (low nibble) and input j + 32 (high nibble) of its group.
            halves = tl.permute(tl.reshape(xq, (BLOCK_M, GB, 2, 32)), (0, 1, 3, 2))
            a_lo, a_hi = tl.split(halves)
            a_lo = tl.reshape(a_lo, (BLOCK_M, GB * 32)).to(X.dtype.element_ty)
            a_hi = tl.reshape(a_hi, (BLOCK_M, GB * 32)).to(X.dtype.element_ty)
            w_lo, w_hi = _dequant_weight_block(B, B_SCALES, B_ZERO, g0, g_end, K, N, rn, n_mask, GB, X_KIND,
                                               B_SIGNED, HAS_ZERO, X.dtype.element_ty, DEQ)
            acc = _dot_halves(acc, a_lo, a_hi, w_lo, w_hi, IEEE)
        if HAS_LOWRANK:
            l1 = tl.load(L1T + ranks[:, None] * N + rn[None, :], mask=n_mask[None, :], other=0.0).to(tl.float32)
            acc = tl.dot(down, l1, acc, input_precision="ieee")
        _split_epilogue(acc, Y, PART, COUNT, BIAS, rm64, rn, m_mask, n_mask, M, N, split, pid_n, stride_ym, X_KIND,
                        SPLITS, HAS_BIAS, SPLIT)


def _dequant_mode(dtype: torch.dtype, w_scale: torch.Tensor, signed: bool, w_zero: torch.Tensor | None) -> int:
    return fast_dequant_mode(dtype, w_scale.dtype, signed, w_zero is not None, _interpreting())


def _quant_flags(spec: QuantSpec, static: bool) -> dict:
    fmt = spec.fmt
    info = torch.finfo(spec.scale_dtype)
    return {"STATIC": static, "SYMMETRIC": spec.symmetric, "HAS_ZERO": spec.has_zero, "QMIN": fmt.qmin,
            "QMAX": fmt.qmax, "QSYM": float(fmt.symmetric_qmax),
            "SYM_ZERO": float(fmt.symmetric_zero) if spec.symmetric else 0.0,
            "SCALE_KIND": SCALE_KINDS[spec.scale_dtype], "TINY": float(info.tiny), "FMAX": float(info.max)}


def fake_quant_activations_triton(x2d: torch.Tensor, spec: QuantSpec, out: torch.Tensor, *,
                                  smooth: torch.Tensor | None = None, l2t: torch.Tensor | None = None,
                                  static_scale: torch.Tensor | None = None, static_zero: torch.Tensor | None = None,
                                  groups_per_chunk: int = 4, block_m: int | None = None,
                                  variant: str | None = None) -> torch.Tensor | None:
    """Write ``xq`` into ``out[:, :K]``. With a branch, returns the down projection's float32 partial sums
    ``[chunks, M, R]`` over chunks of ``groups_per_chunk`` groups of 64 inputs (unrolled: keep it small), or None
    when K is a single chunk and ``out`` has the R extra columns, which then receive it rounded to x's dtype.
    Inputs are checked by the caller."""
    m, k = x2d.shape
    if x2d.stride(1) != 1:
        x2d = x2d.contiguous()
    groups = k // GROUP
    rank = l2t.shape[1] if l2t is not None else 16
    gpc = _pow2_at_least(min(int(groups_per_chunk), groups))  # a tile width, at most the groups rounded up
    chunks = triton.cdiv(groups, gpc)
    partial = None
    if l2t is None:
        down = out
    elif chunks == 1 and out.shape[1] == k + rank:
        down = out[:, k:]
    else:
        down = partial = torch.empty(chunks, m, rank, dtype=torch.float32, device=x2d.device)
    if block_m is None:
        block_m = 16 if _interpreting() or m <= 16 else 32
    dummy = out
    grid = (triton.cdiv(m, block_m), chunks)
    # One tile per program only while the tile is small: at 8+ groups of 64 it spills (an H200 measured a
    # 16-row, 32-group tile at 10x the looping kernel).
    if (variant or ACT_KERNEL) == "chunk" and gpc <= ACT_CHUNK_MAX_GROUPS:
        warps = 8 if block_m * gpc * 64 >= 8192 else 4
        _act_chunk_kernel[grid](
            x2d, smooth if smooth is not None else dummy, l2t if l2t is not None else dummy,
            static_scale if static_scale is not None else dummy, static_zero if static_zero is not None else dummy,
            out, down, m, k, x2d.stride(0), out.stride(0), m * rank, down.stride(0) if partial is None else rank, gpc,
            X_KIND=dtype_kind(x2d.dtype), HAS_SMOOTH=smooth is not None, HAS_LOWRANK=l2t is not None, RANK=rank,
            LR_IEEE=x2d.dtype == torch.float32 or _interpreting(), DOWN_ROUND=partial is None,
            **_quant_flags(spec, static_scale is not None), BLOCK_M=block_m, num_warps=warps,
        )
        return partial
    _fake_quant_act_kernel[grid](
        x2d, smooth if smooth is not None else dummy, l2t if l2t is not None else dummy,
        static_scale if static_scale is not None else dummy, static_zero if static_zero is not None else dummy,
        out, down, m, k, x2d.stride(0), out.stride(0), m * rank, down.stride(0) if partial is None else rank, gpc,
        min(gpc, ACT_GROUPS_PER_LOAD), X_KIND=dtype_kind(x2d.dtype), HAS_SMOOTH=smooth is not None,
        HAS_LOWRANK=l2t is not None, RANK=rank,
        LR_IEEE=x2d.dtype == torch.float32 or _interpreting(), DOWN_ROUND=partial is None,
        **_quant_flags(spec, static_scale is not None), BLOCK_M=block_m, num_warps=4,
    )
    return partial


# Activation kernel: "chunk" (one tile per program, no loop) or "loop" (_fake_quant_act_kernel).
ACT_KERNEL = os.environ.get("VAR_COMPRESSOR_W4A4_ACT", "chunk")
ACT_CHUNK_MAX_GROUPS = 4
def lowrank_down_triton(x2d: torch.Tensor, l2t: torch.Tensor, out: torch.Tensor, *,
                        smooth: torch.Tensor | None = None, block_m: int = 32, block_k: int = 128) -> torch.Tensor:
    """``out [M, R] = round16(x / s) @ L2^T`` (float32 accumulation, rounded once to ``out``'s dtype); ``out`` may
    be a column slice of a wider buffer (the ``[xq | down]`` operand)."""
    m, k = x2d.shape
    if x2d.stride(1) != 1:
        x2d = x2d.contiguous()
    rank = l2t.shape[1]
    if tuple(out.shape) != (m, rank) or out.stride(1) != 1:
        raise ValueError(f"lowrank_down: output {tuple(out.shape)} is not a row-major [{m}, {rank}] view")
    if _interpreting():
        block_m, block_k = 16, 64
    _lowrank_down_kernel[(triton.cdiv(m, block_m),)](
        x2d, smooth if smooth is not None else l2t, l2t, out, m, k, x2d.stride(0), out.stride(0),
        X_KIND=dtype_kind(x2d.dtype), HAS_SMOOTH=smooth is not None, RANK=rank,
        IEEE=x2d.dtype == torch.float32 or _interpreting(), BLOCK_M=block_m, BLOCK_K=block_k, num_warps=4,
        num_stages=4,
    )
    return out


MAX_SPLITS = 32
MAX_GROUPS_PER_SPLIT = 16
TILED_GROUPS_PER_STEP = 2  # K step of 128 in the row-tiled loop
ACT_GROUPS_PER_LOAD = 4  # activation tile [BLOCK_M, 256]
WEIGHT_TILE_ELEMENTS = 128 * 256  # dequantized weight tile per step (GB * 32 x BLOCK_N): bounds shared memory


def split_plan(groups: int, splits: int) -> tuple[int, int]:
    """``(groups per split, splits)`` for about ``splits`` ranges of K: a power of two of groups per range (the
    kernels unroll it, at most 16) and at most 32 ranges (the last program of a tile sums them, unrolled)."""
    gps = 1
    while gps < -(-groups // max(1, splits)) or -(-groups // gps) > MAX_SPLITS:
        gps *= 2
    gps = min(gps, MAX_GROUPS_PER_SPLIT) if -(-groups // min(gps, MAX_GROUPS_PER_SPLIT)) <= MAX_SPLITS else gps
    return gps, -(-groups // gps)


def dequantize_weight_triton(packed: torch.Tensor, w_scale: torch.Tensor, w_zero: torch.Tensor | None, signed: bool,
                             out: torch.Tensor, l1t: torch.Tensor | None = None, block_n: int = 64,
                             groups_per_program: int | None = None) -> torch.Tensor:
    """Dequantize into ``out[:, :K]`` (rows of stride ``out.stride(0)``) and copy ``L1`` (``l1t [R, N]``) into
    ``out[:, K:K + R]``; returns ``out``."""
    n, half_k = packed.shape
    k = 2 * half_k
    groups = k // GROUP
    rank = l1t.shape[0] if l1t is not None else 16
    if out.shape[0] < n or out.shape[1] < k + (rank if l1t is not None else 0) or out.stride(1) != 1:
        raise ValueError(f"dequantize_weight: output {tuple(out.shape)} too small for [{n}, {k}] + rank")
    if groups_per_program is None:
        groups_per_program = 4
    gpp = _pow2_at_least(min(int(groups_per_program), groups))  # one tile of gpp * 32 bytes per output
    grid = (triton.cdiv(n, block_n), triton.cdiv(groups, gpp))
    _dequant_weight_kernel[grid](
        packed.view(torch.int8), w_scale, w_zero if w_zero is not None else out, l1t if l1t is not None else out,
        out, n, k, out.stride(0), gpp, OUT_KIND=dtype_kind(out.dtype), B_SIGNED=signed, HAS_ZERO=w_zero is not None,
        HAS_LOWRANK=l1t is not None, RANK=rank, BLOCK_N=block_n,
        DEQ=_dequant_mode(out.dtype, w_scale, signed, w_zero), num_warps=4,
    )
    return out


@dataclass(frozen=True)
class GemvConfig:
    """Launch of ``w4a4_mixed_gemm``: tiles of ``block_m`` (0: the rows rounded up to a power of two >= 16) x
    ``block_n``, K split into about ``splits`` ranges."""

    block_n: int
    splits: int
    num_warps: int = 4
    block_m: int = 0
    num_stages: int = 2

    def as_dict(self) -> dict:
        return {"block_n": self.block_n, "splits": self.splits, "num_warps": self.num_warps,
                "block_m": self.block_m, "num_stages": self.num_stages}


def _pow2_at_least(n: int) -> int:
    p = 1
    while p < n:
        p *= 2
    return p


def _groups_per_step(groups_per_split: int, block_n: int, block_m: int = 16, stages: int = 2) -> int:
    """Groups per step of the mixed GEMM's loop: a whole split range when it is short (one load of each operand),
    bounded so that a step's shared memory stays within an H100/H200's: per pipeline stage the activation halves
    (``128 GB BLOCK_M`` bytes) and the packed weights (``32 GB BLOCK_N``), once the dequantized weight halves
    (``128 GB BLOCK_N``); else a K step of 128."""
    if groups_per_split > MAX_GROUPS_PER_SPLIT:
        return TILED_GROUPS_PER_STEP
    per_group = stages * (128 * block_m + 32 * block_n) + 128 * block_n
    fit = max(1, SHARED_MEMORY_BUDGET // per_group)
    bound = 1
    while bound * 2 <= min(fit, WEIGHT_TILE_ELEMENTS // (32 * block_n)):
        bound *= 2
    return max(1, min(_pow2_at_least(groups_per_split), bound))


SHARED_MEMORY_BUDGET = 200 * 1024


def _block_m(m: int) -> int:
    return max(16, _pow2_at_least(m))  # tensor-core products need at least 16 rows


GEMV_MAX_ROWS = 128


def default_gemv_config(m: int, n: int, k: int, sm_count: int = 132, block_n: int | None = None) -> GemvConfig:
    """Few rows: one row tile, wide enough output tiles that re-reading the activations from L2 stays below the
    weights' bytes (``2 M / BN``), and enough (tile, range) programs for about three per multiprocessor."""
    if block_n is None:
        block_n = 64 if m <= 16 else (128 if m <= 32 else 256)
    block_n = max(16, min(block_n, 1 << max(4, (n - 1).bit_length())))
    tiles = -(-n // block_n)
    groups = k // GROUP
    splits = max(1, min(groups, round(3 * sm_count / tiles)))
    warps = 8 if _block_m(m) * block_n >= 64 * 256 else 4
    return GemvConfig(block_n, splits, warps)


def tiled_gemm_configs() -> list[GemvConfig]:
    """Tile shapes for many rows (no split), timed against the cuBLAS path by the dispatcher."""
    return [GemvConfig(128, 1, 8, block_m=128, num_stages=3), GemvConfig(128, 1, 4, block_m=64, num_stages=4),
            GemvConfig(256, 1, 8, block_m=64, num_stages=3)]


class _GemvWorkspace:
    """Per-device float32 partial tiles and arrival counters of ``w4a4_gemv``. Counters are reset by the kernel
    itself; buffers only grow, and an outgrown one is kept alive because captured CUDA graphs may still use it."""

    def __init__(self) -> None:
        self.partials: dict = {}
        self.counters: dict = {}
        self._retired: list = []

    def get(self, device: torch.device, partial_numel: int, tiles: int) -> tuple[torch.Tensor, torch.Tensor]:
        key = (device.type, device.index)
        part = self.partials.get(key)
        if part is None or part.numel() < partial_numel:
            if part is not None:
                self._retired.append(part)
            part = self.partials[key] = torch.empty(max(partial_numel, 1 << 16), dtype=torch.float32, device=device)
        count = self.counters.get(key)
        if count is None or count.numel() < tiles:
            if count is not None:
                self._retired.append(count)
            count = self.counters[key] = torch.zeros(max(tiles, 1024), dtype=torch.int32, device=device)
        return part, count

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.partials.values(), *self.counters.values()))


gemv_workspace = _GemvWorkspace()


def w4a4_mixed_gemm_triton(xq: torch.Tensor, down_partial: torch.Tensor | None, w_packed: torch.Tensor,
                           w_scale: torch.Tensor, w_zero: torch.Tensor | None, w_signed: bool, *,
                           l1t: torch.Tensor | None = None, bias: torch.Tensor | None = None, config: GemvConfig,
                           groups_per_split: int) -> torch.Tensor:
    """``y [M, N]`` in xq's dtype from fake-quantized activations ``xq [M, K]`` and, with a branch, the down
    projection's float32 partial sums ``[splits, M, R]`` over the same K ranges (``groups_per_split`` groups each),
    the weights dequantized in registers."""
    m, k = xq.shape
    n = w_packed.shape[0]
    groups = k // GROUP
    splits = -(-groups // groups_per_split)
    block_m = config.block_m or _block_m(m)
    tiles_m, tiles_n = -(-m // block_m), -(-n // config.block_n)
    y = torch.empty(m, n, dtype=xq.dtype, device=xq.device)
    if splits > 1:
        part, count = gemv_workspace.get(xq.device, splits * m * n, tiles_m * tiles_n)
    else:
        part = count = y
    rank = l1t.shape[0] if l1t is not None else 16
    if l1t is not None and (down_partial is None or tuple(down_partial.shape) != (splits, m, rank)):
        got = None if down_partial is None else tuple(down_partial.shape)
        raise ValueError(f"w4a4_mixed_gemm: partial down projections {got}, expected ({splits}, {m}, {rank})")
    dummy = y
    _mixed_gemm_kernel[(tiles_m, tiles_n, splits)](
        xq, down_partial if down_partial is not None else dummy, w_packed.view(torch.int8), w_scale,
        w_zero if w_zero is not None else dummy, l1t if l1t is not None else dummy,
        bias if bias is not None else dummy, y, part, count, m, n, k, xq.stride(0), m * rank, y.stride(0),
        groups_per_split, splits, Y_KIND=dtype_kind(xq.dtype), B_SIGNED=w_signed, HAS_ZERO=w_zero is not None,
        HAS_LOWRANK=l1t is not None, RANK=rank, IEEE=_interpreting() or xq.dtype == torch.float32,
        HAS_BIAS=bias is not None, SPLIT=splits > 1,
        GB=_groups_per_step(groups_per_split, config.block_n, block_m, config.num_stages), BLOCK_M=block_m,
        BLOCK_N=config.block_n,
        DEQ=_dequant_mode(xq.dtype, w_scale, w_signed, w_zero),
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    return y


FUSED_MAX_ROWS = 16


def w4a4_fused_gemv_triton(x2d: torch.Tensor, spec: QuantSpec, w_packed: torch.Tensor, w_scale: torch.Tensor,
                           w_zero: torch.Tensor | None, w_signed: bool, *, smooth: torch.Tensor | None = None,
                           l2t: torch.Tensor | None = None, l1t: torch.Tensor | None = None,
                           bias: torch.Tensor | None = None, static_scale: torch.Tensor | None = None,
                           static_zero: torch.Tensor | None = None, config: GemvConfig) -> torch.Tensor:
    """The whole layer in one launch for at most 16 rows of 16-bit activations (``_fused_gemv_kernel``)."""
    m, k = x2d.shape
    n = w_packed.shape[0]
    if m > FUSED_MAX_ROWS:
        raise ValueError(f"w4a4_fused_gemv: at most {FUSED_MAX_ROWS} rows, got {m}")
    if x2d.stride(1) != 1:
        x2d = x2d.contiguous()
    gps, splits = split_plan(k // GROUP, config.splits)
    tiles = -(-n // config.block_n)
    y = torch.empty(m, n, dtype=x2d.dtype, device=x2d.device)
    part, count = gemv_workspace.get(x2d.device, splits * m * n, tiles) if splits > 1 else (y, y)
    rank = l2t.shape[1] if l2t is not None else 16
    dummy = y
    _fused_gemv_kernel[(tiles, splits)](
        x2d, smooth if smooth is not None else dummy, l2t if l2t is not None else dummy,
        static_scale if static_scale is not None else dummy, static_zero if static_zero is not None else dummy,
        w_packed.view(torch.int8), w_scale, w_zero if w_zero is not None else dummy,
        l1t if l1t is not None else dummy, bias if bias is not None else dummy, y, part, count,
        m, n, k, x2d.stride(0), y.stride(0), gps, splits, _groups_per_step(gps, config.block_n),
        X_KIND=dtype_kind(x2d.dtype), HAS_SMOOTH=smooth is not None, HAS_LOWRANK=l2t is not None, RANK=rank,
        IEEE=_interpreting() or x2d.dtype == torch.float32,
        **{("HAS_ZERO_A" if key == "HAS_ZERO" else key): value
           for key, value in _quant_flags(spec, static_scale is not None).items()},
        B_SIGNED=w_signed, HAS_ZERO=w_zero is not None, HAS_BIAS=bias is not None, SPLIT=splits > 1,
        BLOCK_M=16, BLOCK_N=config.block_n, DEQ=_dequant_mode(x2d.dtype, w_scale, w_signed, w_zero),
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    return y


def w4a4_gemv_triton(xq: torch.Tensor, down_partial: torch.Tensor | None, w_packed: torch.Tensor,
                     w_scale: torch.Tensor, w_zero: torch.Tensor | None, w_signed: bool, *,
                     l1t: torch.Tensor | None = None, bias: torch.Tensor | None = None, config: GemvConfig,
                     groups_per_split: int) -> torch.Tensor:
    """``w4a4_mixed_gemm`` with a single row tile (at most 128 rows): the few-token case."""
    if xq.shape[0] > GEMV_MAX_ROWS:
        raise ValueError(f"w4a4_gemv: at most {GEMV_MAX_ROWS} rows, got {xq.shape[0]}")
    return w4a4_mixed_gemm_triton(xq, down_partial, w_packed, w_scale, w_zero, w_signed, l1t=l1t, bias=bias,
                                  config=GemvConfig(config.block_n, config.splits, config.num_warps, 0,
                                                    config.num_stages), groups_per_split=groups_per_split)
