"""Mixed-input W4A4 kernels (Triton under the interpreter) against deepcompressor.quant, float64 and
FakeQuantLinear; the backend choice and its disk cache."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from deepcompressor.config.schema import ActivationQuantConfig, WeightQuantConfig
from deepcompressor.kernels import w4a4_dispatch as dispatch
from deepcompressor.kernels.w4a4_layout import pack_weight
from deepcompressor.kernels.w4a4_mixed import (
    GemvConfig,
    default_gemv_config,
    dequantize_weight_torch,
    dequantize_weight_triton,
    fake_quant_activations_torch,
    fake_quant_activations_triton,
    gemv_workspace,
    split_plan,
    w4a4_gemv_triton,
)
from deepcompressor.nn.fake_linear import FakeQuantLinear
from deepcompressor.nn.w4a4_linear import W4A4Linear
from deepcompressor.quant import quantize

pytest.importorskip("triton")

from test_w4a4_kernels import _act_spec

_spec = _act_spec  # the activation quantizer of the kernel tests


def _x(m, k, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen) * torch.logspace(-1, 1, k)[torch.randperm(k, generator=gen)]
    x[:, 3] *= 20
    x[min(2, m - 1)] = 0  # an all-zero token
    return x.to(dtype)


def _weight(n, k, wfmt="sint4", wsym=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen) * torch.rand(n, 1, generator=gen)
    qt = quantize(w, WeightQuantConfig(dtype=wfmt, group_size=64, symmetric=wsym))
    zero = None if qt.zero is None else qt.zero.t().to(torch.int8).contiguous()
    return qt, pack_weight(qt.codes, qt.format.signed), qt.scale.t().contiguous(), zero


ACT_CASES = [
    # (format, symmetric, static, dtype, smoothing, rank, groups per chunk)
    ("sint4", True, False, torch.bfloat16, True, 16, None),
    ("uint4", False, False, torch.bfloat16, False, 32, 2),
    ("sint4", True, True, torch.float16, True, 16, 1),
    ("uint4", True, False, torch.float16, False, 0, None),
]


@pytest.mark.parametrize("fmt,symmetric,static,dtype,smooth,rank,gpc", ACT_CASES)
def test_fake_quant_activations_equal_the_quantizer(fmt, symmetric, static, dtype, smooth, rank, gpc):
    m, k = 21, 320
    spec = _spec(fmt, symmetric, static)
    x = _x(m, k, dtype, seed=1)
    gen = torch.Generator().manual_seed(2)
    s = (torch.rand(k, generator=gen) + 0.5).to(dtype) if smooth else None
    l2t = (torch.randn(k, rank, generator=gen) * 0.1).to(dtype) if rank else None
    static_scale = static_zero = None
    if static:
        static_scale = (torch.rand(k // 64, generator=gen) + 0.05).to(torch.float16).float()
    out = torch.full((m, k + (rank if gpc is None else 0)), float("nan"), dtype=dtype)
    partial = fake_quant_activations_triton(x, spec, out, smooth=s, l2t=l2t, static_scale=static_scale,
                                            static_zero=static_zero, groups_per_chunk=gpc or 5)
    xq_ref, down_ref = fake_quant_activations_torch(x, spec, smooth=s, l2t=l2t, static_scale=static_scale,
                                                    static_zero=static_zero)
    assert torch.equal(out[:, :k], xq_ref)  # bit for bit: the operand FakeQuantLinear multiplies
    if rank:
        down = out[:, k:].float() if gpc is None else partial.sum(0)
        if gpc is not None:
            assert partial.shape == (-(-(k // 64) // gpc), m, rank)
        xs = (x / s if smooth else x).double()
        ref = xs @ l2t.double()
        tol = 2**-8 if gpc is None else 1e-5  # rounded to the 16-bit dtype, or float32 partial sums
        assert torch.allclose(down.double(), ref, rtol=tol, atol=tol * ref.abs().max().item())
        assert torch.allclose(down.double(), down_ref.double(), rtol=tol, atol=tol * ref.abs().max().item())
    else:
        assert partial is None


@pytest.mark.parametrize("wfmt,wsym", [("sint4", True), ("uint4", False)])
def test_dequantize_weight_equals_the_quantized_weight(wfmt, wsym):
    n, k, rank = 37, 192, 16
    qt, packed, scale, zero = _weight(n, k, wfmt, wsym)
    l1t = torch.randn(rank, n).bfloat16()
    out = torch.full((n + 3, k + rank), float("nan"), dtype=torch.bfloat16)
    dequantize_weight_triton(packed, scale, zero, qt.format.signed, out, l1t=l1t, block_n=16, groups_per_program=2)
    assert (k // 64) % 2 == 1  # the last program's second group is past K
    assert torch.equal(out[:n, :k], qt.dequantize(torch.bfloat16))  # FakeQuantLinear.main_weight(bfloat16)
    assert torch.equal(out[:n, :k], dequantize_weight_torch(packed, scale, zero, qt.format.signed, torch.bfloat16))
    assert torch.equal(out[:n, k:], l1t.t())
    assert out[n:].isnan().all()  # rows past N untouched


GEMV_CASES = [
    # (M, N, K, weights, lowrank, bias, config)
    (1, 40, 320, ("sint4", True), True, True, GemvConfig(16, 3)),
    (7, 48, 192, ("uint4", False), True, False, GemvConfig(32, 1)),
    (20, 33, 256, ("sint4", True), False, True, GemvConfig(16, 4)),
]


@pytest.mark.parametrize("m,n,k,wq,lowrank,with_bias,config", GEMV_CASES)
def test_gemv_matches_float64_of_its_operands_and_is_deterministic(m, n, k, wq, lowrank, with_bias, config):
    dtype, rank = torch.bfloat16, 16
    spec = _spec()
    x = _x(m, k, dtype, seed=3)
    gen = torch.Generator().manual_seed(4)
    l2t = (torch.randn(k, rank, generator=gen) * 0.1).to(dtype) if lowrank else None
    l1t = (torch.randn(rank, n, generator=gen) * 0.1).to(dtype) if lowrank else None
    bias = torch.randn(n, generator=gen).to(dtype) if with_bias else None
    qt, packed, scale, zero = _weight(n, k, *wq, seed=5)
    gps, _ = split_plan(k // 64, config.splits)
    xq = torch.empty(m, k, dtype=dtype)
    partial = fake_quant_activations_triton(x, spec, xq, l2t=l2t, groups_per_chunk=gps)
    ys = [w4a4_gemv_triton(xq, partial, packed, scale, zero, qt.format.signed, l1t=l1t, bias=bias, config=config,
                           groups_per_split=gps) for _ in range(2)]
    ref = xq.double() @ qt.dequantize(torch.bfloat16).double().t()
    if lowrank:
        ref = ref + (x.double() @ l2t.double()) @ l1t.double()
    if with_bias:
        ref = ref + bias.double()
    assert ys[0].dtype == dtype and ys[0].shape == (m, n)
    assert torch.allclose(ys[0].double(), ref, rtol=2**-8, atol=2**-8 * ref.abs().max().item())
    assert torch.equal(ys[0], ys[1])  # fixed reduction order, counters reset by the kernel
    if config.splits > 1:
        assert int(gemv_workspace.counters[("cpu", None)].abs().sum()) == 0


def _fake(n=48, k=192, rank=20, wgts=None, ipts=None, static=False):
    gen = torch.Generator().manual_seed(7)
    wgts = wgts or WeightQuantConfig(dtype="sint4", group_size=64)
    ipts = ipts or ActivationQuantConfig(dtype="sint4", group_size=64)
    w = torch.randn(n, k, generator=gen)
    s = torch.rand(k, generator=gen) + 0.5
    l1 = torch.randn(n, rank, generator=gen) * 0.1
    l2 = torch.randn(rank, k, generator=gen) * 0.1
    input_scale = None
    if static:
        ipts = dataclasses.replace(ipts, static=True)
        input_scale = torch.full((1, k // 64), 0.5, dtype=torch.float16)
    return FakeQuantLinear(k, n, qweight=quantize(w * s - l1 @ l2, wgts), bias=torch.randn(n, generator=gen),
                           smooth_scale=s, lowrank_l1=l1, lowrank_l2=l2, wgts=wgts, ipts=ipts,
                           input_scale=input_scale, name="blk.fc")


LAYER_CASES = {
    "svdquant": {},
    "asymmetric": {"wgts": WeightQuantConfig(dtype="uint4", group_size=64, symmetric=False),
                   "ipts": ActivationQuantConfig(dtype="uint4", group_size=64, symmetric=False)},
    "static_inputs": {"static": True},
}


@pytest.mark.parametrize("case", list(LAYER_CASES))
@pytest.mark.parametrize("backend", ["fused", "gemv", "tiled", "dequant"])
def test_mixed_backends_compute_fake_quant_linear_in_bfloat16(case, backend):
    fake = _fake(**LAYER_CASES[case]).to(torch.bfloat16)
    real = W4A4Linear.from_fake(fake, backend=backend)
    x = (torch.randn(3, 5, 192, generator=torch.Generator().manual_seed(8)) * 3).bfloat16()
    y = real(x)
    ref = fake(x)
    # float64 of FakeQuantLinear's own bfloat16 operands: both round the same products, in a different order.
    xs = x.reshape(-1, 192) / fake.smooth_scale.bfloat16()
    xq = FakeQuantLinear.forward.__globals__["fake_quantize"](xs, fake.ipts, scale=fake.input_scale, check=False)
    exact = (xq.double() @ fake.main_weight(torch.bfloat16).double().t()
             + (xs.double() @ fake.lowrank_l2.bfloat16().double().t()) @ fake.lowrank_l1.bfloat16().double().t()
             + fake.bias.bfloat16().double()).reshape(y.shape)
    scale = exact.abs().max().item()
    assert y.shape == ref.shape and y.dtype == torch.bfloat16
    assert (y.double() - exact).abs().max().item() <= 2**-7 * scale
    assert (y.double() - ref.double()).abs().max().item() <= 2**-6 * scale
    # Rounded once instead of three times: at least as close to the exact value as the reference.
    assert (y.double() - exact).norm() <= (ref.double() - exact).norm() * 1.05


def test_gemv_refuses_too_many_rows_and_float32():
    real = W4A4Linear.from_fake(_fake().to(torch.bfloat16), backend="gemv")
    with pytest.raises(ValueError, match="at most 128 rows"):
        real(torch.randn(129, 192).bfloat16())
    real32 = W4A4Linear.from_fake(_fake(), backend="gemv")
    with pytest.raises(ValueError, match="16-bit activations"):
        real32(torch.randn(4, 192))


# ------------------------------------------------------------------------------------------------ choice


def _ops():
    real = W4A4Linear.from_fake(_fake().to(torch.bfloat16), backend="auto")
    return real, dispatch.LinearOperands(spec=real.ispec, w_packed=real.weight_packed, w_scale=real.weight_scale,
                                         w_zero=real.weight_zero, w_signed=True, l1t=real.lowrank_l1t,
                                         l2t=real.lowrank_l2t, name="blk.fc")


def test_auto_takes_the_pytorch_path_on_cpu_and_aliases_resolve():
    real, _ = _ops()
    assert real.backend == "auto"
    assert W4A4Linear.from_fake(_fake(), backend="triton").backend == "int"
    with pytest.raises(ValueError, match="backend must be one of"):
        W4A4Linear.from_fake(_fake(), backend="cuda")
    x = torch.randn(4, 192).bfloat16()
    torch_path = W4A4Linear.from_fake(_fake().to(torch.bfloat16), backend="torch")
    assert torch.equal(real(x), torch_path(x))


def test_rule_without_measurement(monkeypatch, tmp_path):
    monkeypatch.setenv("VAR_COMPRESSOR_CACHE", str(tmp_path))
    monkeypatch.setenv("VAR_COMPRESSOR_W4A4_TUNE", "0")
    dispatch.choices.clear_memory()
    _, ops = _ops()
    assert dispatch.choose_backend(torch.randn(64, 192).bfloat16(), ops)["backend"] == "gemv"
    assert dispatch.choose_backend(torch.randn(65, 192).bfloat16(), ops)["backend"] == "dequant"
    assert not (tmp_path / "w4a4_dispatch.json").exists()  # rules are not cached


def test_measured_choice_is_cached_on_disk_and_reused(monkeypatch, tmp_path):
    monkeypatch.setenv("VAR_COMPRESSOR_CACHE", str(tmp_path))
    monkeypatch.delenv("VAR_COMPRESSOR_W4A4_TUNE", raising=False)
    dispatch.choices.clear_memory()
    _, ops = _ops()
    timed = []

    def fake_timing(calls, device, **_):
        calls[0]()
        timed.append(1)
        return 0.5 if len(timed) == 1 else 0.1  # the first candidate is slower: the last faster one wins

    from deepcompressor.kernels import timing

    monkeypatch.setattr(timing, "graph_time_ms", fake_timing)
    x = torch.randn(8, 192).bfloat16()
    choice = dispatch.choose_backend(x, ops)
    assert choice["source"] == "measured" and len(choice["timings"]) == len(timed) >= 2
    assert choice["ms"] == 0.1
    data = json.loads((tmp_path / "w4a4_dispatch.json").read_text())
    (key, stored), = data["choices"].items()
    assert "|M8|N48|K192|bfloat16|" in key and stored["backend"] == choice["backend"]
    # A new process (empty memory) reads the file instead of measuring again.
    dispatch.choices.clear_memory()
    timed.clear()
    assert dispatch.choose_backend(x, ops)["backend"] == choice["backend"] and not timed
    # M = 5 shares the power-of-two bucket of 8.
    assert dispatch.choose_backend(torch.randn(5, 192).bfloat16(), ops) == stored and not timed


def test_row_tiled_kernel_with_several_row_tiles_and_splits():
    from deepcompressor.kernels.w4a4_mixed import w4a4_mixed_gemm_triton

    m, n, k, rank = 37, 40, 256, 16
    x = _x(m, k, torch.bfloat16, seed=9)
    l2t = (torch.randn(k, rank) * 0.1).bfloat16()
    l1t = (torch.randn(rank, n) * 0.1).bfloat16()
    qt, packed, scale, zero = _weight(n, k, "uint4", False, seed=10)
    xq = torch.empty(m, k, dtype=torch.bfloat16)
    partial = fake_quant_activations_triton(x, _spec(), xq, l2t=l2t, groups_per_chunk=2)
    y = w4a4_mixed_gemm_triton(xq, partial, packed, scale, zero, False, l1t=l1t,
                               config=GemvConfig(16, 2, block_m=16), groups_per_split=2)
    ref = xq.double() @ qt.dequantize(torch.bfloat16).double().t() + (x.double() @ l2t.double()) @ l1t.double()
    assert torch.allclose(y.double(), ref, rtol=2**-8, atol=2**-8 * ref.abs().max().item())
    assert int(gemv_workspace.counters[("cpu", None)].abs().sum()) == 0


def test_default_gemv_config_fills_the_gpu():
    for m, n, k in ((2, 2048, 2048), (64, 14336, 3584), (32, 3584, 14336)):
        cfg = default_gemv_config(m, n, k, sm_count=132)
        programs = -(-n // cfg.block_n) * cfg.splits
        assert programs >= 132 or cfg.splits == k // 64
        assert cfg.block_n in (64, 128, 256)


@pytest.mark.parametrize("m,splits", [(1, 3), (16, 2)])
def test_fused_gemv_equals_the_two_kernel_path_and_float64(m, splits):
    from deepcompressor.kernels.w4a4_mixed import w4a4_fused_gemv_triton

    fake = _fake(n=40, k=320, rank=20).to(torch.bfloat16)
    real = W4A4Linear.from_fake(fake, backend="gemv")
    x = (torch.randn(m, 320, generator=torch.Generator().manual_seed(11)) * 3).bfloat16()
    ops = real.operands(x.dtype)
    config = GemvConfig(16, splits)
    fused = [w4a4_fused_gemv_triton(x, ops.spec, ops.w_packed, ops.w_scale, ops.w_zero, True, smooth=ops.smooth,
                                    l2t=ops.l2t, l1t=ops.l1t, bias=ops.bias, config=config) for _ in range(2)]
    two_kernels = dispatch.forward_gemv(x, ops, config)
    scale = two_kernels.double().abs().max().item()
    assert torch.equal(fused[0], fused[1])
    assert (fused[0].double() - two_kernels.double()).abs().max().item() <= 2**-7 * scale
    with pytest.raises(ValueError, match="at most 16 rows"):
        dispatch.forward_fused(torch.randn(17, 320).bfloat16(), ops)


@pytest.mark.parametrize("smooth", [True, False])
def test_lowrank_down_kernel_equals_float64_of_the_smoothed_inputs(smooth):
    from deepcompressor.kernels.w4a4_mixed import lowrank_down_triton

    gen = torch.Generator().manual_seed(3)
    x = _x(37, 320, torch.bfloat16, seed=4)
    s = (torch.rand(320, generator=gen) + 0.3).bfloat16() if smooth else None
    l2t = (torch.randn(320, 32, generator=gen) * 0.1).bfloat16()
    wide = torch.full((37, 320 + 32), float("nan"), dtype=torch.bfloat16)
    out = lowrank_down_triton(x, l2t, wide[:, 320:], smooth=s)
    xs = x / s if smooth else x  # PyTorch's bfloat16 division: the operand FakeQuantLinear multiplies
    exact = xs.double() @ l2t.double()
    assert out.data_ptr() == wide[:, 320:].data_ptr() and not wide[:, 320:].isnan().any()
    # float32 accumulation, one rounding to bfloat16: within one bfloat16 ulp of the exact product
    assert ((out.double() - exact).abs() <= exact.abs() * 2**-8 + 1e-6).all()
    with pytest.raises(ValueError, match="row-major"):
        lowrank_down_triton(x, l2t, torch.empty(36, 32, dtype=torch.bfloat16))


@pytest.mark.parametrize("case", ["svdquant", "static_inputs"])
def test_dequant_backend_with_separate_down_projection_equals_the_fused_one(case):
    fake = _fake(**LAYER_CASES[case]).to(torch.bfloat16)
    real = W4A4Linear.from_fake(fake, backend="dequant")
    x = (torch.randn(70, 192, generator=torch.Generator().manual_seed(9)) * 3).bfloat16()
    ops = real.operands(torch.bfloat16)
    fused = dispatch.forward_dequant(x, ops)
    separate = dispatch.forward_dequant(x, ops, {"lowrank": "separate"})
    # The same operands (xq bit for bit, down rounded once in both): equal up to the order of float32 sums.
    scale = fused.double().abs().max().item()
    assert (separate.double() - fused.double()).abs().max().item() <= 2**-8 * scale
    ref = fake(x)
    assert (separate.double() - ref.double()).abs().max().item() <= 2**-6 * scale


def test_candidates_per_row_count():
    device = torch.device("cpu")
    few = dispatch._candidates(16, 2048, 2048, device)
    many = dispatch._candidates(4096, 2048, 2048, device)
    assert {c["backend"] for c in few} == {"gemv", "dequant"}  # fused is never timed: 10-300x slower on an H200
    assert [c.get("config") for c in many] == [None, {"lowrank": "separate"}]
    mid = dispatch._candidates(512, 2048, 2048, device)
    assert [c["backend"] for c in mid] == ["tiled", "dequant", "dequant"]
