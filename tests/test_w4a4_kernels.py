"""W4A4 kernels (Triton under the interpreter, and the PyTorch path) against float64 references, and the weight
layout."""

from __future__ import annotations

import pytest
import torch

from deepcompressor.config.schema import ActivationQuantConfig, WeightQuantConfig
from deepcompressor.kernels.w4a4 import (
    quantize_activations,
    quantize_activations_torch,
    quantize_activations_triton,
    w4a4_matmul,
    w4a4_matmul_torch,
    w4a4_matmul_triton,
)
from deepcompressor.kernels.w4a4_layout import from_kernel_order, pack_weight, to_kernel_order, unpack_weight
from deepcompressor.quant import quantize, resolve_spec, unpack_int4

pytest.importorskip("triton")


def _act_spec(dtype="sint4", symmetric=True, static=False, scale_dtype="float16"):
    return resolve_spec(ActivationQuantConfig(dtype=dtype, group_size=64, symmetric=symmetric, static=static,
                                              scale_dtype=scale_dtype))


def _wgt_cfg(dtype="sint4", symmetric=True):
    return WeightQuantConfig(dtype=dtype, group_size=64, symmetric=symmetric)


def _activations(m, k, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    # Per-channel magnitudes spanning two decades, a few outlier channels, and one all-zero token.
    x = torch.randn(m, k, generator=gen) * torch.logspace(-1, 1, k)[torch.randperm(k, generator=gen)]
    x[:, 5] *= 20
    x[3] = 0
    return x.to(dtype)


# ------------------------------------------------------------------------------------------------ layout


@pytest.mark.parametrize("signed", [True, False])
def test_weight_layout_pairs_each_input_with_the_one_32_later(signed):
    n, k = 3, 192
    lo, hi = (-8, 7) if signed else (0, 15)
    codes = torch.randint(lo, hi + 1, (n, k), dtype=torch.int16).to(torch.int8 if signed else torch.uint8)
    packed = pack_weight(codes, signed)
    assert packed.shape == (n, k // 2) and packed.dtype == torch.uint8
    nibbles = packed.to(torch.int16)
    for g in range(k // 64):
        for j in range(32):
            byte = nibbles[:, 32 * g + j]
            low, high = byte & 0xF, byte >> 4
            expect_low = codes[:, 64 * g + j].to(torch.int16) & 0xF
            expect_high = codes[:, 64 * g + 32 + j].to(torch.int16) & 0xF
            assert torch.equal(low, expect_low) and torch.equal(high, expect_high)
    assert torch.equal(unpack_weight(packed, signed), codes)
    assert torch.equal(from_kernel_order(to_kernel_order(codes)), codes)
    # Same bytes as the generic packer applied to the reordered codes.
    assert torch.equal(unpack_int4(packed, signed), to_kernel_order(codes))


def test_layout_rejects_inputs_that_are_not_whole_groups():
    with pytest.raises(ValueError, match="not a multiple of the W4A4 group size 64"):
        pack_weight(torch.zeros(2, 96, dtype=torch.int8), True)


# ------------------------------------------------------------------------------------------------ activations


ACT_CASES = [
    # (format, symmetric, static, x dtype, scale dtype)
    ("sint4", True, False, torch.bfloat16, "float16"),
    ("uint4", False, False, torch.float32, "float16"),
    ("uint4", True, False, torch.float32, "bfloat16"),
    ("sint4", True, True, torch.float32, "float16"),
]


def _static_params(xs, spec):
    """Static symmetric parameters as calibrated: each group's range over all tokens."""
    absmax = xs.float().abs().amax(0).reshape(-1, 64).amax(1)
    return (absmax / spec.fmt.symmetric_qmax).to(spec.scale_dtype).float(), None


@pytest.mark.parametrize("fmt,symmetric,static,dtype,scale_dtype", ACT_CASES)
def test_activation_kernel_matches_the_quantizer_and_float64(fmt, symmetric, static, dtype, scale_dtype):
    m, k, rank = 37, 192, 16
    spec = _act_spec(fmt, symmetric, static, scale_dtype)
    x = _activations(m, k, dtype, seed=1)
    smooth = (torch.rand(k, generator=torch.Generator().manual_seed(2)) + 0.5).to(dtype)
    l2t = (torch.randn(k, rank, generator=torch.Generator().manual_seed(3)) * 0.1).to(dtype)
    static_scale = static_zero = None
    if static:
        static_scale, static_zero = _static_params(x / smooth, spec)
    kwargs = {"smooth": smooth, "l2t": l2t, "static_scale": static_scale, "static_zero": static_zero}
    got = quantize_activations_triton(x, spec, **kwargs)
    ref = quantize_activations_torch(x, spec, **kwargs)

    # Exactly the quantizer of deepcompressor.quant (codes centred on the zero point, scales as stored).
    assert torch.equal(got.codes, ref.codes)
    assert torch.equal(got.scales, ref.scales)
    # Independent float64 check: every reconstructed value is within half a step of x / s (or clipped at the
    # format's end for static ranges), and the codes use the format's range.
    xs = (x / smooth).double()
    recon = got.codes.double().reshape(m, k // 64, 64) * got.scales.double().t().unsqueeze(-1)
    err = (recon.reshape(m, k) - xs).abs()
    step = got.scales.double().t().repeat_interleave(64, dim=1)
    assert bool((err <= step / 2 * (1 + 1e-3)).all())
    assert int(got.codes.min()) >= -15 and int(got.codes.max()) <= 15
    assert torch.equal(got.codes[3], torch.zeros(k, dtype=torch.int8))
    # Low-rank down projection against float64, rounded once to x's dtype.
    down64 = xs.to(dtype).double() @ l2t.double()
    tol = 1e-5 if dtype == torch.float32 else 2**-7
    assert torch.allclose(got.down.double(), down64, rtol=tol, atol=tol * down64.abs().max().item())


def test_activation_kernel_rejects_bad_inputs():
    spec = _act_spec()
    with pytest.raises(ValueError, match="not a multiple of the W4A4 group size"):
        quantize_activations(torch.zeros(4, 100), spec, backend="torch")
    with pytest.raises(ValueError, match="4-bit activations in groups of 64"):
        quantize_activations(torch.zeros(4, 128), resolve_spec(ActivationQuantConfig(dtype="sint8", group_size=-1)))
    with pytest.raises(ValueError, match="low-rank L2"):
        quantize_activations(torch.zeros(4, 128), spec, l2t=torch.zeros(128, 16, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="power of two >= 16"):
        quantize_activations_triton(torch.zeros(4, 128), spec, l2t=torch.zeros(128, 24))
    with pytest.raises(ValueError, match="static scale"):
        quantize_activations(torch.zeros(4, 128), spec, static_scale=torch.ones(3))


# ------------------------------------------------------------------------------------------------ GEMM


GEMM_CASES = [
    # (weight format, weight symmetric, activation format, activation symmetric, dtype, low-rank, bias)
    ("sint4", True, "sint4", True, torch.bfloat16, True, True),
    ("uint4", False, "uint4", False, torch.float32, True, False),
    ("uint4", True, "sint4", False, torch.float32, False, True),
]


def _weights(n, k, cfg, seed):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen) * torch.rand(n, 1, generator=gen)
    qt = quantize(w, cfg)
    zero = None if qt.zero is None else qt.zero.t().to(torch.int8).contiguous()
    return qt, pack_weight(qt.codes, qt.format.signed), qt.scale.t().contiguous(), zero


@pytest.mark.parametrize("wfmt,wsym,afmt,asym,dtype,lowrank,with_bias", GEMM_CASES)
def test_gemm_kernel_matches_float64(wfmt, wsym, afmt, asym, dtype, lowrank, with_bias):
    m, n, k, rank = 37, 40, 192, 16  # neither M nor N a multiple of the tiles
    spec = _act_spec(afmt, asym)
    x = _activations(m, k, dtype, seed=4)
    gen = torch.Generator().manual_seed(5)
    l2t = (torch.randn(k, rank, generator=gen) * 0.1).to(dtype) if lowrank else None
    l1t = (torch.randn(rank, n, generator=gen) * 0.1).to(dtype) if lowrank else None
    bias = torch.randn(n, generator=gen).to(dtype) if with_bias else None
    act = quantize_activations_torch(x, spec, l2t=l2t)
    qt, packed, scale, zero = _weights(n, k, _wgt_cfg(wfmt, wsym), seed=6)

    got, got_swapped = (w4a4_matmul_triton(act, packed, scale, zero, qt.format.signed, l1t=l1t, bias=bias,
                                           out_dtype=dtype, variant=variant) for variant in ("ab", "swapped"))
    torch_path = w4a4_matmul_torch(act, packed, scale, zero, qt.format.signed, l1t=l1t, bias=bias, out_dtype=dtype)

    # float64: dequantized activations times dequantized weights, plus branch and bias.
    a64 = (act.codes.double().reshape(m, k // 64, 64) * act.scales.double().t().unsqueeze(-1)).reshape(m, k)
    ref = a64 @ qt.dequantize(torch.float64).t()
    if lowrank:
        ref = ref + act.down.double() @ l1t.double()
    if with_bias:
        ref = ref + bias.double()
    scale_ref = ref.abs().max().item()
    tol = 1e-6 if dtype == torch.float32 else 2**-8
    for y in (got, got_swapped, torch_path):
        assert y.dtype == dtype and y.shape == (m, n)
        assert torch.allclose(y.double(), ref, rtol=tol, atol=tol * scale_ref)
    assert (got.double() - torch_path.double()).abs().max().item() <= tol * scale_ref
    # The transposed kernel computes the same sums in the same group order.
    assert (got.double() - got_swapped.double()).abs().max().item() <= tol * scale_ref


def test_gemm_rejects_mismatched_weights():
    spec = _act_spec()
    act = quantize_activations_torch(torch.randn(4, 128), spec)
    _qt, packed, scale, zero = _weights(8, 128, _wgt_cfg(), seed=0)
    with pytest.raises(ValueError, match="packed weight"):
        w4a4_matmul(act, packed[:, :32], scale, zero, True)
    with pytest.raises(ValueError, match="weight scale"):
        w4a4_matmul(act, packed, scale.t(), zero, True)
    with pytest.raises(ValueError, match="variant must be one of"):
        w4a4_matmul(act, packed, scale, zero, True, backend="triton", variant="fast")
    with pytest.raises(ValueError, match="no down projection"):
        w4a4_matmul(act, packed, scale, zero, True, backend="triton", l1t=torch.zeros(16, 8))
