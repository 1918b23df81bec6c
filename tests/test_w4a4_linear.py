"""W4A4Linear against FakeQuantLinear (the reference semantics) and float64, model conversion and synthesis."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from deepcompressor.config.schema import ActivationQuantConfig, QuantConfig, WeightQuantConfig
from deepcompressor.nn.fake_linear import FakeQuantLinear
from deepcompressor.nn.w4a4_linear import W4A4Linear, convert_to_w4a4, synthesize_w4a4, w4a4_layers
from deepcompressor.quant import quantize

pytest.importorskip("triton")

WGTS = WeightQuantConfig(dtype="sint4", group_size=64)
IPTS = ActivationQuantConfig(dtype="sint4", group_size=64)


def _fake(k=128, n=48, rank=5, smooth=True, bias=True, wgts=WGTS, ipts=IPTS, static=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen)
    s = torch.rand(k, generator=gen) + 0.5 if smooth else None
    l1 = torch.randn(n, rank, generator=gen) * 0.1 if rank else None
    l2 = torch.randn(rank, k, generator=gen) * 0.1 if rank else None
    residual = w * (s if smooth else 1) - (l1 @ l2 if rank else 0)
    input_scale = input_zero = None
    if static:
        ipts = dataclasses.replace(ipts, static=True)
        input_scale = torch.full((1, k // 64), 0.5, dtype=torch.float16)
    return FakeQuantLinear(k, n, qweight=quantize(residual, wgts), bias=torch.randn(n, generator=gen) if bias else None,
                           smooth_scale=s, lowrank_l1=l1, lowrank_l2=l2, wgts=wgts, ipts=ipts,
                           input_scale=input_scale, input_zero=input_zero, name="blk.fc")


def _x(shape, seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 3


VARIANTS = {
    "svdquant": {},
    "no_branch_no_smooth_no_bias": {"rank": 0, "smooth": False, "bias": False},
    "rank_20_padded_to_32": {"rank": 20},
    "asymmetric_uint4": {"wgts": dataclasses.replace(WGTS, dtype="uint4", symmetric=False),
                         "ipts": dataclasses.replace(IPTS, dtype="uint4", symmetric=False)},
    "static_inputs": {"static": True},
    "weight_only": {"ipts": None},
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_matches_fake_quant_in_float32(variant):
    fake = _fake(**VARIANTS[variant])
    x = _x((2, 19, 128))
    ref = fake(x)
    for backend in ("torch", "triton"):
        if backend == "triton" and variant not in ("svdquant", "asymmetric_uint4", "static_inputs"):
            continue  # the interpreter is slow; the other variants exercise the same kernels' flags
        y = W4A4Linear.from_fake(fake, backend=backend)(x)
        assert y.shape == ref.shape and y.dtype == torch.float32
        rel = ((y - ref).norm() / ref.norm()).item()
        assert rel < 2e-6, (backend, rel)


def test_bfloat16_is_closer_to_float64_than_the_fake_quant_reference():
    """In bf16 the fake-quant reference rounds its dequantized operands to bf16; the integer path does not."""
    fake = _fake()
    x = _x((40, 128)).bfloat16()
    real = W4A4Linear.from_fake(fake, backend="triton")
    y = real(x)
    # float64 evaluation of the same quantized operands (codes and scales taken from the torch path).
    from deepcompressor.kernels.w4a4 import quantize_activations_torch

    act = quantize_activations_torch(x, real.ispec, smooth=fake.smooth_scale.bfloat16(),
                                     l2t=real.lowrank_l2t.bfloat16())
    a64 = (act.codes.double().reshape(40, 2, 64) * act.scales.double().t().unsqueeze(-1)).reshape(40, 128)
    ref = a64 @ fake.qweight.dequantize(torch.float64).t() + act.down.double() @ real.lowrank_l1t.bfloat16().double()
    ref = ref + fake.bias.bfloat16().double()
    err_real = ((y.double() - ref).norm() / ref.norm()).item()
    err_fake = ((fake(x).double() - ref).norm() / ref.norm()).item()
    assert err_real < 2**-8
    assert err_real < err_fake


def test_holds_packed_weights_and_the_same_quantized_weight():
    fake = _fake(k=192, n=40, rank=8)
    real = W4A4Linear.from_fake(fake)
    assert real.weight_packed.dtype == torch.uint8 and real.weight_packed.shape == (40, 96)
    back, orig = real.qweight, fake.qweight
    assert torch.equal(back.codes, orig.codes) and torch.equal(back.scale, orig.scale)
    assert back.zero is None and orig.zero is None
    assert real.lowrank_l1t.shape == (16, 40) and real.lowrank_l2t.shape == (192, 16)
    assert torch.equal(real.lowrank_l1t[:8], fake.lowrank_l1.t()) and not real.lowrank_l1t[8:].any()
    codes_bytes = 40 * 192 // 2
    assert real.nbytes() < codes_bytes + 40 * 192 // 64 * 2 + 2 * 16 * (40 + 192) * 4 + 4 * (40 + 192)


def test_from_fake_refuses_what_the_real_path_cannot_run():
    fake = _fake()
    fake.lowrank = False
    with pytest.raises(ValueError, match="blk.fc: smooth/lowrank switches differ"):
        W4A4Linear.from_fake(fake)
    with pytest.raises(ValueError, match="4-bit weights in groups of 64"):
        W4A4Linear.from_fake(_fake(wgts=dataclasses.replace(WGTS, dtype="sint8", group_size=-1)))
    with pytest.raises(ValueError, match="4-bit activations in groups of 64"):
        W4A4Linear.from_fake(_fake(ipts=dataclasses.replace(IPTS, group_size=128)))
    unquantized = FakeQuantLinear(128, 8, weight=torch.randn(8, 128), ipts=IPTS, name="blk.proj")
    with pytest.raises(ValueError, match="blk.proj: the W4A4 path needs quantized weights"):
        W4A4Linear.from_fake(unquantized)
    with pytest.raises(ValueError, match="input has 64 channels"):
        W4A4Linear.from_fake(_fake())(torch.randn(3, 64))


class _TwoLayers(nn.Module):
    def __init__(self, a, b):
        super().__init__()
        self.a, self.b = a, b

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def test_convert_to_w4a4_swaps_every_fake_layer():
    model = _TwoLayers(_fake(k=128, n=64, seed=1), _fake(k=64, n=24, seed=2))
    x = _x((7, 128))
    ref = model(x)
    names = convert_to_w4a4(model, backend="torch")
    assert names == ["a", "b"] and set(w4a4_layers(model)) == {"a", "b"}
    assert ((model(x) - ref).norm() / ref.norm()).item() < 1e-5
    with pytest.raises(ValueError, match="no FakeQuantLinear"):
        convert_to_w4a4(model)


def test_synthesized_layers_reconstruct_the_float_weights():
    from infinity.tiny import build_tiny_transformer

    model = build_tiny_transformer(0, "cpu", torch.float32)
    block = "block_chunks.0.module.0"
    floats = {name: m.weight.detach().clone() for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    qcfg = QuantConfig(wgts=WGTS, ipts=IPTS)
    qcfg.smooth.enabled = qcfg.low_rank.enabled = True
    qcfg.low_rank.rank = 8
    names = synthesize_w4a4(model, qcfg, seed=3, backend="torch")
    assert len(names) == 7 * model.arch.depth and f"{block}.ffn.fc1" in names
    assert isinstance(model.get_submodule("head"), nn.Linear)  # skipped kind stays float
    kv = model.get_submodule(f"{block}.ca.mat_kv")
    assert kv.ispec is None and kv.smooth_scale is None  # inputs skipped: weight-only, nothing to smooth
    for name in (f"{block}.sa.mat_qkv", f"{block}.ffn.fc2"):
        layer = model.get_submodule(name)
        assert layer.smooth_scale is not None and layer.rank == 8
        qt = layer.qweight
        w_main = qt.dequantize(torch.float64)
        l1 = layer.lowrank_l1t.double()[:8].t()
        l2 = layer.lowrank_l2t.double()[:, :8].t()
        target = floats[name].double() * layer.smooth_scale.double()
        step = qt.scale.double().repeat_interleave(64, dim=1)
        # W * s = W_main + L1 L2 up to half a quantization step (and the 16-bit rounding of the factors).
        assert (l1 @ l2).abs().max() > step.min()
        assert ((w_main + l1 @ l2 - target).abs() / step).max() <= 0.51
