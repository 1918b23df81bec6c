import pytest
import torch
from test_quant_reference import code_range, ref_fake_quant

from deepcompressor.calib.gptq import accumulate_hessian, gptq_quantize, hessian_from_inputs
from deepcompressor.config.schema import GPTQConfig, QuantizerConfig
from deepcompressor.quant import fake_quantize, quantization_params


def _layer(out=12, n=64, tokens=200, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    mixing = torch.randn(n, n, generator=gen, dtype=dtype) / n**0.5 + torch.eye(n, dtype=dtype)
    x = torch.randn(tokens, n, generator=gen, dtype=dtype) @ mixing  # correlated channels
    w = torch.randn(out, n, generator=gen, dtype=dtype) / n**0.5
    return w, x


def _ref_params(block, name, symmetric):
    """Per-row scale and zero of ``block [out, k]`` from the loop reference."""
    _, _, scales, zeros = ref_fake_quant(block, name, -1, symmetric, "float32")
    return torch.tensor(scales, dtype=torch.float64), torch.tensor(zeros, dtype=torch.float64)


def ref_gptq(w, hessian, name, group_size, symmetric, damp, act_order):
    """Textbook unblocked GPTQ in float64: explicit inverse Hessian, eliminated one column at a time."""
    W = w.double().clone()
    H = hessian.double().clone()
    n = W.shape[1]
    dead = H.diagonal() == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    order = torch.argsort(H.diagonal(), descending=True).tolist() if act_order else list(range(n))
    H += damp * H.diagonal().mean() * torch.eye(n, dtype=torch.float64)
    Hinv = torch.linalg.inv(H)
    k = n if group_size == -1 else group_size
    params = {}
    if act_order:  # static groups from the initial weight
        for g in range(n // k):
            params[g] = _ref_params(W[:, g * k:(g + 1) * k], name, symmetric)
    qmin, qmax = code_range(name)
    codes = torch.zeros_like(W)
    for pos, j in enumerate(order):
        g = j // k
        if g not in params:
            params[g] = _ref_params(W[:, g * k:(g + 1) * k], name, symmetric)
        scale, zero = params[g]
        c = (torch.round(W[:, j] / scale) + zero).clamp(qmin, qmax)
        q = (c - zero) * scale
        codes[:, j] = c
        err = (W[:, j] - q) / Hinv[j, j]
        rest = order[pos + 1:]
        W[:, rest] -= err.unsqueeze(1) * Hinv[j, rest].unsqueeze(0)
        Hinv = Hinv - torch.outer(Hinv[:, j], Hinv[j, :]) / Hinv[j, j]
    return codes


@pytest.mark.parametrize("name,group_size,symmetric", (("sint4", 16, True), ("uint4", 16, False),
                                                       ("sint4", -1, True), ("uint8", 32, False)))
@pytest.mark.parametrize("act_order", (False, True))
def test_gptq_equals_textbook_reference(name, group_size, symmetric, act_order):
    w, x = _layer()
    H = hessian_from_inputs(x).double()
    cfg = QuantizerConfig(dtype=name, group_size=group_size, symmetric=symmetric, scale_dtype="float32")
    gcfg = GPTQConfig(enabled=True, damp=0.01, block_size=24, act_order=act_order)  # blocks cut groups: 24 -> 32
    qt = gptq_quantize(w, H, cfg, gcfg)
    ref = ref_gptq(w, H, name, group_size, symmetric, 0.01, act_order)
    assert torch.equal(qt.codes.double(), ref)


def test_gptq_beats_rtn_with_the_same_scales():
    w, x = _layer(out=32, n=128, tokens=400, seed=1, dtype=torch.float32)
    cfg = QuantizerConfig(dtype="sint4", group_size=32, symmetric=True, scale_dtype="float16")
    scale, zero = quantization_params(w, cfg)
    qt = gptq_quantize(w, hessian_from_inputs(x), cfg, GPTQConfig(enabled=True, block_size=64), scale=scale,
                       zero=zero)
    assert torch.equal(qt.scale, scale)
    rtn = float((x @ (fake_quantize(w, cfg) - w).T).square().sum())
    gptq = float((x @ (qt.dequantize() - w).T).square().sum())
    assert gptq < 0.8 * rtn


def test_gptq_output_is_a_consistent_quant_tensor():
    w, x = _layer(dtype=torch.float32)
    cfg = QuantizerConfig(dtype="uint4", group_size=16, symmetric=False, scale_dtype="bfloat16")
    qt = gptq_quantize(w, hessian_from_inputs(x), cfg, GPTQConfig(enabled=True, act_order=True))
    assert qt.codes.dtype == torch.uint8 and qt.scale.dtype == torch.bfloat16 and qt.zero.shape == (12, 4)
    # Codes are what the quantizer gives for the dequantized weight with the stored parameters.
    again = fake_quantize(qt.dequantize(), cfg, scale=qt.scale, zero=qt.zero)
    assert torch.equal(again, qt.dequantize())
    assert torch.equal(qt.pack().dequantize(), qt.dequantize())


def test_dead_columns_and_hessian_accumulation():
    w, x = _layer(dtype=torch.float32)
    x[:, 5] = 0
    batched, count = accumulate_hessian(None, 0, x[:70])
    batched, count = accumulate_hessian(batched, count, x[70:])
    torch.testing.assert_close(batched, hessian_from_inputs(x), rtol=1e-5, atol=1e-5)
    assert count == 200
    qt = gptq_quantize(w, batched, QuantizerConfig(dtype="sint4", group_size=16), GPTQConfig(enabled=True))
    assert bool((qt.dequantize()[:, 5] == 0).all())


def test_gptq_errors():
    w, x = _layer(dtype=torch.float32)
    H = hessian_from_inputs(x)
    cfg = QuantizerConfig(dtype="sint4", group_size=16)
    with pytest.raises(ValueError, match="fc1: weight .* and Hessian"):
        gptq_quantize(w, H[:10, :10], cfg, GPTQConfig(), name="fc1")
    H[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        gptq_quantize(w, H, cfg, GPTQConfig())
