import itertools
import zlib

import pytest
import torch
from test_quant_reference import code_range, ref_fake_quant

from deepcompressor.config.schema import QuantizerConfig
from deepcompressor.quant import (
    QuantTensor,
    fake_quantize,
    pack_int4,
    quantization_params,
    quantize,
    unpack_int4,
)

FORMATS = ("sint4", "uint4", "sint8", "uint8")
GROUPS = (0, -1, 32)


def _cfg(dtype, group_size, symmetric, scale_dtype="float32"):
    return QuantizerConfig(dtype=dtype, group_size=group_size, symmetric=symmetric, scale_dtype=scale_dtype)


@pytest.mark.parametrize("dtype,group_size,symmetric", itertools.product(FORMATS, GROUPS, (True, False)))
@pytest.mark.parametrize("scale_dtype", ("float32", "float16", "bfloat16"))
def test_fake_and_real_match_float64_reference(dtype, group_size, symmetric, scale_dtype):
    gen = torch.Generator().manual_seed(zlib.crc32(f"{dtype}{group_size}{symmetric}{scale_dtype}".encode()))
    x = torch.randn(2, 3, 128, generator=gen, dtype=torch.float64) * torch.rand(128, generator=gen, dtype=torch.float64)
    cfg = _cfg(dtype, group_size, symmetric, scale_dtype)
    ref, ref_codes, ref_scales, ref_zeros = ref_fake_quant(x, dtype, group_size, symmetric, scale_dtype)

    fake = fake_quantize(x, cfg)
    assert fake.dtype == torch.float64 and fake.shape == x.shape
    assert torch.equal(fake, ref)

    qt = quantize(x, cfg)
    qmin, qmax = code_range(dtype)
    assert qt.codes.dtype == (torch.int8 if dtype.startswith("s") else torch.uint8)
    assert torch.equal(qt.codes.double(), ref_codes)
    assert int(qt.codes.min()) >= qmin and int(qt.codes.max()) <= qmax
    assert qt.scale.dtype == getattr(torch, scale_dtype)
    assert qt.scale.double().flatten().tolist() == ref_scales
    if dtype.startswith("s") and symmetric:
        assert qt.zero is None
    else:
        assert qt.zero.double().flatten().tolist() == ref_zeros
    assert torch.equal(qt.dequantize(torch.float64), fake)


@pytest.mark.parametrize("dtype,group_size,symmetric", itertools.product(FORMATS, GROUPS, (True, False)))
@pytest.mark.parametrize("xdtype", (torch.float32, torch.bfloat16))
def test_fake_equals_real_bit_for_bit_in_low_precision(dtype, group_size, symmetric, xdtype):
    x = (torch.randn(4, 96, generator=torch.Generator().manual_seed(1)) * 3).to(xdtype)
    cfg = _cfg(dtype, group_size, symmetric, "float16")
    fake = fake_quantize(x, cfg)
    real = quantize(x, cfg)
    assert fake.dtype == xdtype
    assert torch.equal(fake, real.dequantize(xdtype))
    packed = real.pack() if dtype.endswith("4") else real
    assert torch.equal(packed.dequantize(xdtype), fake)


@pytest.mark.parametrize("dtype,symmetric", itertools.product(FORMATS, (True, False)))
def test_rounding_error_within_half_step(dtype, symmetric):
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    qt = quantize(x, _cfg(dtype, 16, symmetric, "float64"))
    step = qt.scale.repeat_interleave(16, dim=1)
    assert bool(((qt.dequantize(torch.float64) - x).abs() <= step / 2 + 1e-12).all())


@pytest.mark.parametrize("dtype,symmetric", itertools.product(FORMATS, (True, False)))
@pytest.mark.parametrize("scale_dtype", ("float16", "bfloat16"))
def test_all_zero_and_constant_groups(dtype, symmetric, scale_dtype):
    x = torch.zeros(3, 64)
    x[1] = 0.75
    x[2, :32] = -2.5
    cfg = _cfg(dtype, 32, symmetric, scale_dtype)
    qt = quantize(x, cfg)
    assert bool(torch.isfinite(qt.scale.float()).all()) and bool((qt.scale.float() > 0).all())
    dq = qt.dequantize()
    assert torch.equal(dq[0], torch.zeros(64))
    assert torch.equal(dq[2, 32:], torch.zeros(32))
    tol = 2.0 ** -7 if scale_dtype == "bfloat16" else 2.0 ** -10
    torch.testing.assert_close(dq[1], torch.full((64,), 0.75), rtol=tol, atol=0)
    torch.testing.assert_close(dq[2, :32], torch.full((32,), -2.5), rtol=tol, atol=0)
    assert torch.equal(fake_quantize(x, cfg), dq)


@pytest.mark.parametrize("bad", (float("nan"), float("inf"), -float("inf")))
def test_non_finite_input_raises(bad):
    x = torch.randn(2, 64)
    x[1, 5] = bad
    with pytest.raises(ValueError, match="blocks.3.ffn.fc2.*NaN or Inf"):
        fake_quantize(x, _cfg("sint4", 64, True), name="blocks.3.ffn.fc2")
    with pytest.raises(ValueError, match="NaN or Inf"):
        quantize(x, _cfg("uint8", -1, False))


def test_invalid_configs_raise():
    x = torch.randn(2, 96)
    with pytest.raises(ValueError, match="group_size=64 does not divide the input dimension 96"):
        quantize(x, _cfg("sint4", 64, True))
    with pytest.raises(ValueError, match="unknown integer format 'int3'"):
        quantize(x, _cfg("int3", 32, True))
    with pytest.raises(ValueError, match="unknown scale dtype"):
        quantize(x, _cfg("sint4", 32, True, "float8"))
    with pytest.raises(ValueError, match="disabled"):
        quantize(x, _cfg(None, 32, True))


@pytest.mark.parametrize("dtype,symmetric", itertools.product(FORMATS, (True, False)))
def test_static_parameters_reproduce_dynamic_quantization(dtype, symmetric):
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(3))
    cfg = _cfg(dtype, 16, symmetric, "float16")
    scale, zero = quantization_params(x, cfg)
    assert torch.equal(fake_quantize(x, cfg, scale=scale, zero=zero), fake_quantize(x, cfg))
    # Static activation form: one [1, G] range shared by all rows.
    shared_scale, shared_zero = scale[:1], None if zero is None else zero[:1]
    qt = quantize(x, cfg, scale=shared_scale, zero=shared_zero)
    ref, _, _, _ = ref_fake_quant(x[:1].double(), dtype, 16, symmetric, "float16")
    assert torch.equal(qt.dequantize()[0].double(), ref[0])
    with pytest.raises(ValueError, match="does not fit"):
        quantize(x, cfg, scale=scale[:, :2], zero=None if zero is None else zero[:, :2])


def test_static_parameter_errors():
    x = torch.randn(4, 32)
    with pytest.raises(ValueError, match="needs a zero point"):
        quantize(x, _cfg("uint4", 0, False), scale=torch.ones(1, 1))
    with pytest.raises(ValueError, match="takes no zero point"):
        quantize(x, _cfg("sint4", 0, True), scale=torch.ones(1, 1), zero=torch.zeros(1, 1))


def test_clip_ratio_matches_reference():
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    clip = torch.rand(4, 2, generator=torch.Generator().manual_seed(5), dtype=torch.float64) * 0.3 + 0.7
    for symmetric in (True, False):
        ref, _, _, _ = ref_fake_quant(x, "sint4", 32, symmetric, "float32", clip=clip)
        assert torch.equal(fake_quantize(x, _cfg("sint4", 32, symmetric), clip_ratio=clip), ref)


@pytest.mark.parametrize("signed", (True, False))
def test_int4_pack_round_trip_and_nibble_order(signed):
    lo, hi = (-8, 7) if signed else (0, 15)
    codes = torch.randint(lo, hi + 1, (3, 5, 18), generator=torch.Generator().manual_seed(6))
    codes = codes.to(torch.int8 if signed else torch.uint8)
    packed = pack_int4(codes, signed)
    assert packed.dtype == torch.uint8 and packed.shape == (3, 5, 9)
    assert torch.equal(unpack_int4(packed, signed), codes)
    # Element 2i in the low nibble, 2i + 1 in the high nibble, two's complement for signed codes.
    pair = torch.tensor([-1, -8] if signed else [1, 2], dtype=codes.dtype)
    assert pack_int4(pair, signed).tolist() == ([0x8F] if signed else [0x21])


def test_pack_errors():
    with pytest.raises(ValueError, match="must be even"):
        pack_int4(torch.zeros(4, 7, dtype=torch.int8), True)
    with pytest.raises(ValueError, match="outside the 4-bit range"):
        pack_int4(torch.tensor([0, 9], dtype=torch.int8), True)
    with pytest.raises(TypeError, match="int8 or uint8"):
        pack_int4(torch.zeros(4, dtype=torch.int32), True)
    qt = quantize(torch.randn(2, 8), _cfg("sint8", -1, True))
    with pytest.raises(ValueError, match="only 4-bit formats"):
        qt.pack()
    odd = quantize(torch.randn(2, 7), _cfg("uint4", -1, False))
    with pytest.raises(ValueError, match="must be even"):
        odd.pack()


@pytest.mark.parametrize("dtype,symmetric", (("sint4", True), ("uint4", False), ("uint8", True)))
def test_quant_tensor_state_round_trip(dtype, symmetric):
    qt = quantize(torch.randn(6, 64), _cfg(dtype, 32, symmetric, "float16"))
    if dtype.endswith("4"):
        qt = qt.pack()
    state, meta = qt.state_dict("w."), qt.metadata()
    back = QuantTensor.from_state(state, meta, prefix="w.")
    assert torch.equal(back.dequantize(), qt.dequantize())
    broken = dict(state)
    broken["w.scale"] = state["w.scale"][:, :1]
    with pytest.raises(ValueError, match="layer.fc: scale shape"):
        QuantTensor.from_state(broken, meta, prefix="w.", name="layer.fc")
    with pytest.raises(ValueError, match="missing entry"):
        QuantTensor.from_state({}, meta, prefix="w.")


def test_exact_ties_round_half_to_even():
    # Scales of exactly 1 make x / scale land on .5 ties.
    x = torch.tensor([[7.0, -2.5, 1.5, 0.5, -0.5, 3.5, -7.0, 0.0]])
    qt = quantize(x, _cfg("sint4", -1, True))
    assert qt.scale.tolist() == [[1.0]]
    assert qt.codes.tolist() == [[7, -2, 2, 0, 0, 4, -7, 0]]
    y = torch.tensor([[15.0, 2.5, 3.5, 0.0, 10.5]])
    qt = quantize(y, _cfg("uint4", -1, False))
    assert qt.scale.tolist() == [[1.0]] and qt.zero.tolist() == [[0]]
    assert qt.codes.tolist() == [[15, 2, 4, 0, 10]]
