"""Triton KV-cache kernels (run by the interpreter on the CPU) against float64 plain-PyTorch references."""

import pytest
import torch
import torch.nn.functional as F

from deepcompressor.calib.kv import asymmetric_qparams, dequantize_asymmetric, quantize_asymmetric
from deepcompressor.kernels import kv_attention as kva
from deepcompressor.quant import pack_int4

pytestmark = pytest.mark.skipif(not kva.HAS_TRITON, reason="triton is not installed")


def random_kv(batch, heads, length, dim, seed):
    g = torch.Generator().manual_seed(seed)
    # Keys: unit-norm per head with per-channel offsets (skewed channels); values: offset, unequal scales.
    k = F.normalize(torch.randn(batch, heads, length, dim, generator=g) + 2 * torch.randn(heads, 1, dim, generator=g),
                    dim=-1)  # fmt: skip
    v = torch.randn(batch, heads, length, dim, generator=g) * (0.5 + torch.rand(heads, 1, dim, generator=g))
    v = v + torch.randn(heads, 1, dim, generator=g)
    return k, v


def qparams_of(x, bits, shrink=1.0):
    lo = x.amin(dim=(0, 2)) * shrink
    hi = x.amax(dim=(0, 2)) * shrink
    return asymmetric_qparams(lo, hi, bits)


def reference_codes(x, scale, zero, bits):
    codes = quantize_asymmetric(x, scale[:, None, :], zero[:, None, :], bits)
    return pack_int4(codes, signed=False) if bits == 4 else codes


def fake_quant(x, scale, zero, bits):
    codes = quantize_asymmetric(x, scale[:, None, :], zero[:, None, :], bits)
    return dequantize_asymmetric(codes.double(), scale[:, None, :].double(), zero[:, None, :].double(), torch.float64)


@pytest.mark.parametrize("bits", [8, 4])
def test_quantize_kernel_matches_torch_codes_and_writes_only_its_slice(bits):
    x, _ = random_kv(2, 3, 45, 32, seed=1)
    x = x * 1.3  # some values fall outside the range and must clamp
    scale, zero = qparams_of(x / 1.3, bits)
    expected = reference_codes(x, scale, zero, bits)
    width = 32 if bits == 8 else 16
    buffer = torch.full((2, 3, 80, width), 0xAB, dtype=torch.uint8)
    out = kva.quantize_kv(x, scale, zero, bits, out=buffer[:, :, 20:65], backend="triton")
    assert torch.equal(out, expected)
    assert (buffer[:, :, :20] == 0xAB).all() and (buffer[:, :, 65:] == 0xAB).all()
    # Ties round half to even like torch.round.
    ties = (torch.arange(-40, 40, dtype=torch.float32) * 0.5).view(1, 1, 80, 1).expand(1, 1, 80, 32).contiguous()
    ones, zeros = torch.ones(1, 32), torch.full((1, 32), 7.0)
    assert torch.equal(kva.quantize_kv(ties, ones, zeros, bits, backend="triton"),
                       kva.quantize_kv(ties, ones, zeros, bits, backend="torch"))  # fmt: skip


CASES = [(bits, tail) for bits in (8, 4) for tail in ("none", "codes", "full")]


@pytest.mark.parametrize("bits,tail", CASES)
def test_attention_kernel_matches_float64_fake_quant_reference(bits, tail):
    batch, heads, queries, dim, cached, new = 2, 2, 37, 32, 70, 21
    k, v = random_kv(batch, heads, cached + new, dim, seed=bits)
    g = torch.Generator().manual_seed(7)
    q = F.normalize(torch.randn(batch, heads, queries, dim, generator=g), dim=-1) * 15  # cos-attention logits
    ks, kz = qparams_of(k, bits, 0.9)  # clipped: the kernel must reproduce clamping exactly
    vs, vz = qparams_of(v, bits, 0.9)
    kc, vc = reference_codes(k, ks, kz, bits), reference_codes(v, vs, vz, bits)
    # The cache buffer holds garbage past num_cached: it must be ignored.
    width = kc.shape[-1]
    k_buf = torch.randint(0, 256, (batch, heads, cached + 50, width), dtype=torch.uint8, generator=g)
    v_buf = torch.randint(0, 256, (batch, heads, cached + 50, width), dtype=torch.uint8, generator=g)
    k_ref = fake_quant(k, ks, kz, bits)
    v_ref = fake_quant(v, vs, vz, bits)
    if tail == "none":
        k_buf[:, :, : cached + new], v_buf[:, :, : cached + new] = kc, vc
        num_cached, extra = cached + new, {}
    else:
        k_buf[:, :, :cached], v_buf[:, :, :cached] = kc[:, :, :cached], vc[:, :, :cached]
        num_cached = cached
        if tail == "codes":
            extra = {
                "k_tail": kc[:, :, cached:].contiguous(),
                "v_tail": vc[:, :, cached:].contiguous(),
                "tail_codes": True,
            }
        else:
            extra = {
                "k_tail": k[:, :, cached:].contiguous(),
                "v_tail": v[:, :, cached:].contiguous(),
                "tail_codes": False,
            }
            k_ref[:, :, cached:] = k[:, :, cached:].double()
            v_ref[:, :, cached:] = v[:, :, cached:].double()
    out = kva.quantized_kv_attention(q, k_buf, v_buf, num_cached, ks, kz, vs, vz, bits, **extra)
    ref = F.scaled_dot_product_attention(q.double(), k_ref, v_ref, scale=1.0)
    assert out.dtype == q.dtype and torch.isfinite(out).all()
    rel = (out.double() - ref).norm() / ref.norm()
    assert rel < 2e-3  # float16 operands, float32 accumulation
    # The plain path computes the same function.
    plain = kva.reference_kv_attention(q.double(), k_buf, v_buf, num_cached, ks, kz, vs, vz, bits,
                                       **{n: (t.double() if isinstance(t, torch.Tensor) and t.is_floating_point()
                                              else t) for n, t in extra.items()})  # fmt: skip
    assert torch.allclose(plain, ref, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("bits", [8, 4])
def test_attention_kernel_bfloat16_queries_and_softmax_scale(bits):
    batch, heads, queries, dim, keys = 1, 3, 20, 16, 90
    k, v = random_kv(batch, heads, keys, dim, seed=11)
    q = torch.randn(batch, heads, queries, dim, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    ks, kz = qparams_of(k, bits)
    vs, vz = qparams_of(v, bits)
    kc, vc = reference_codes(k, ks, kz, bits), reference_codes(v, vs, vz, bits)
    out = kva.quantized_kv_attention(q, kc, vc, keys, ks, kz, vs, vz, bits, sm_scale=0.25)
    ref = F.scaled_dot_product_attention(q.double(), fake_quant(k, ks, kz, bits), fake_quant(v, vs, vz, bits),
                                         scale=0.25)  # fmt: skip
    assert out.dtype == torch.bfloat16
    assert (out.double() - ref).norm() / ref.norm() < 1e-2  # bfloat16 output rounding


def test_kernel_refuses_bad_shapes():
    q = torch.randn(1, 2, 4, 32)
    codes = torch.zeros(1, 2, 8, 32, dtype=torch.uint8)
    qp = torch.ones(2, 32)
    with pytest.raises(ValueError, match="k_codes"):
        kva.quantized_kv_attention(q, codes[..., :16], codes, 8, qp, qp, qp, qp, 8)
    with pytest.raises(ValueError, match="num_cached"):
        kva.quantized_kv_attention(q, codes, codes, 9, qp, qp, qp, qp, 8)
    with pytest.raises(ValueError, match="empty"):
        kva.quantized_kv_attention(q, codes, codes, 0, qp, qp, qp, qp, 8)
    with pytest.raises(ValueError, match="k_scale"):
        kva.quantized_kv_attention(q, codes, codes, 8, torch.ones(3, 32), qp, qp, qp, 8)
