"""Plain float64 reference quantizer (one group at a time, written from the format definitions), used by the quant
and calib tests, and its own hand-computed checks."""

import pytest
import torch

BITS = {"sint4": (4, True), "uint4": (4, False), "sint8": (8, True), "uint8": (8, False)}
SCALE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32,
                "float64": torch.float64}


def code_range(name):
    bits, signed = BITS[name]
    return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)


def stored(value, scale_dtype):
    """A positive scale as stored: clamped into the dtype's normal range, rounded to it, back to float64."""
    dtype = SCALE_DTYPES[scale_dtype]
    info = torch.finfo(dtype)
    return float(torch.tensor(value, dtype=torch.float64).clamp(info.tiny, info.max).to(dtype).double())


def ref_group(values, name, symmetric, scale_dtype, clip=1.0):
    """Quantize one group (1-D float64): returns codes, scale, zero, dequantized values."""
    bits, signed = BITS[name]
    qmin, qmax = code_range(name)
    values = values.double()
    if symmetric:
        scale = stored(float(values.abs().max()) * clip / (2 ** (bits - 1) - 1), scale_dtype)
        zero = 0.0 if signed else float(2 ** (bits - 1))
    else:
        lo = min(float(values.min()), 0.0) * clip
        hi = max(float(values.max()), 0.0) * clip
        scale = stored((hi - lo) / (qmax - qmin), scale_dtype)
        zero = min(max(float(torch.tensor(qmin - lo / scale, dtype=torch.float64).round()), qmin), qmax)
    codes = (torch.round(values / scale) + zero).clamp(qmin, qmax)
    return codes, scale, zero, (codes - zero) * scale


def ref_fake_quant(x, name, group_size, symmetric, scale_dtype, clip=None):
    """Fake quantization of ``x [..., n]`` by looping over the groups; ``clip [R, G]`` optional per-group ratios.

    Returns the dequantized tensor (float64), the codes, and the per-group scales / zeros as ``[R, G]`` lists.
    """
    rows = x.double().reshape(-1, x.shape[-1])
    n = rows.shape[1]
    out = torch.empty_like(rows)
    codes = torch.empty_like(rows)
    if group_size == 0:
        spans = [(None, slice(None))]
    else:
        k = n if group_size == -1 else group_size
        spans = [(r, slice(g * k, (g + 1) * k)) for r in range(rows.shape[0]) for g in range(n // k)]
    scales, zeros = [], []
    for i, (r, cols) in enumerate(spans):
        if r is None:
            values = rows.flatten()
        else:
            values = rows[r, cols]
        ratio = 1.0
        if clip is not None:
            flat_clip = clip.reshape(-1)
            ratio = float(flat_clip[0] if flat_clip.numel() == 1 else flat_clip[i])
        c, s, z, dq = ref_group(values, name, symmetric, scale_dtype, ratio)
        scales.append(s)
        zeros.append(z)
        if r is None:
            out = dq.reshape(rows.shape)
            codes = c.reshape(rows.shape)
        else:
            out[r, cols] = dq
            codes[r, cols] = c
    return out.reshape(x.shape), codes.reshape(x.shape), scales, zeros


def test_reference_hand_computed_sint4_rounds_half_to_even():
    x = torch.tensor([1.0, -0.5, 0.25, 0.0], dtype=torch.float64)
    dq, codes, scales, _ = ref_fake_quant(x, "sint4", 0, True, "float64")
    # scale 1/7: codes 7, -3.5 -> -4 (half to even), 1.75 -> 2, 0
    assert scales == [pytest.approx(1 / 7)]
    assert codes.tolist() == [7, -4, 2, 0]
    assert torch.allclose(dq, torch.tensor([1.0, -4 / 7, 2 / 7, 0.0], dtype=torch.float64))


def test_reference_hand_computed_uint4_asymmetric():
    x = torch.tensor([[-1.0, 2.0, 0.5]], dtype=torch.float64)
    dq, codes, scales, zeros = ref_fake_quant(x, "uint4", -1, False, "float64")
    # range [-1, 2] -> scale 3/15 = 0.2, zero round(0 + 1/0.2) = 5; 0.5 / 0.2 = 2.5 -> 2 (even) -> code 7
    assert scales == [pytest.approx(0.2)] and zeros == [5.0]
    assert codes.tolist() == [[0.0, 15.0, 7.0]]
    assert torch.allclose(dq, torch.tensor([[-1.0, 2.0, 0.4]], dtype=torch.float64))


def test_reference_symmetric_unsigned_is_signed_shifted_by_mid_code():
    x = torch.randn(3, 16, dtype=torch.float64)
    dq_s, codes_s, _, _ = ref_fake_quant(x, "sint8", -1, True, "float32")
    dq_u, codes_u, _, zeros = ref_fake_quant(x, "uint8", -1, True, "float32")
    assert set(zeros) == {128.0}
    assert torch.equal(codes_u, codes_s + 128) and torch.equal(dq_u, dq_s)
