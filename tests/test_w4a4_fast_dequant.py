"""The GPU's packed-register dequantization of 4-bit weights (``triton_utils.dequant_nibbles_*``): its arithmetic
emulated exactly on the CPU (every code, every float16 scale bit pattern class) against ``round16(q * s)``, when it
is chosen, and the kernels that use it assembled for sm_90 and sm_80 by the installed triton's ptxas."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
import torch

from deepcompressor.kernels.triton_utils import DEQUANT_BF16, DEQUANT_F16, DEQUANT_REFERENCE, fast_dequant_mode

triton = pytest.importorskip("triton")


def _scales(count: int = 20000, seed: int = 0) -> torch.Tensor:
    """float16 scales over the whole normal range, every mantissa pattern class."""
    gen = torch.Generator().manual_seed(seed)
    bits = torch.randint(0x0400, 0x7BFF, (count,), generator=gen, dtype=torch.int32).to(torch.int16)
    s = bits.view(torch.float16)
    return torch.cat([s, torch.tensor([6.1035e-05, 1.0, 65504.0, 0.0999, 3.14], dtype=torch.float16)])


def _bf16_fma(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """``fma.rn.bf16x2``: the exact a * b + c (float64 holds it: at most 8 + 8 significant bits and one addend
    of the same scale) rounded once to bfloat16."""
    return (a.double() * b.double() + c.double()).to(torch.bfloat16)


def test_bf16_split_scale_gives_the_correctly_rounded_product():
    s = _scales()
    codes = torch.arange(-8, 8, dtype=torch.float64)
    s32 = s.float()
    s_hi = s32.to(torch.bfloat16)
    s_lo = (s32 - s_hi.float()).to(torch.bfloat16)
    assert torch.equal(s_lo.double() + s_hi.double(), s32.double()), "s = s_hi + s_lo exactly"
    q = codes[:, None].expand(-1, s.numel())
    # the magic-number step: 0x4300 | (code ^ 8) is 136 + code, and fma(t, 1, -136) is the code, exactly
    nibble = (q.long() & 15)
    t = (0x4300 | (nibble ^ 8)).to(torch.int16).view(torch.bfloat16)
    q_bf16 = _bf16_fma(t, torch.ones_like(t), torch.full_like(t, -136.0))
    assert torch.equal(q_bf16.double(), q)
    p = _bf16_fma(q_bf16, s_lo[None, :].expand_as(q_bf16), torch.zeros_like(q_bf16))
    assert torch.equal(p.double(), q * s_lo.double()[None, :]), "q * s_lo is exact in bfloat16"
    w = _bf16_fma(q_bf16, s_hi[None, :].expand_as(q_bf16), p)
    expected = (q.float() * s32[None, :]).to(torch.bfloat16)  # FakeQuantLinear: float32 product, rounded once
    assert torch.equal(w, expected)


def test_f16_magic_and_product_match_float16_rounding():
    s = _scales(seed=1)
    q = torch.arange(-8, 8, dtype=torch.float64)[:, None].expand(-1, s.numel())
    t = (0x6400 | ((q.long() & 15) ^ 8)).to(torch.int16).view(torch.float16)
    q16 = (t.double() - 1032.0).to(torch.float16)
    assert torch.equal(q16.double(), q)
    w = (q16.double() * s.double()[None, :]).to(torch.float16)
    assert torch.equal(w, (q.float() * s.float()[None, :]).to(torch.float16))


def test_fast_mode_only_where_it_is_exact():
    bf16, f16, f32 = torch.bfloat16, torch.float16, torch.float32
    assert fast_dequant_mode(bf16, f16, True, False, False) == DEQUANT_BF16
    assert fast_dequant_mode(bf16, bf16, True, False, False) == DEQUANT_BF16
    assert fast_dequant_mode(f16, f16, True, False, False) == DEQUANT_F16
    for args in [(bf16, f32, True, False, False), (f16, bf16, True, False, False), (bf16, f16, False, False, False),
                 (bf16, f16, True, True, False), (bf16, f16, True, False, True), (f32, f16, True, False, False)]:
        assert fast_dequant_mode(*args) == DEQUANT_REFERENCE, args


@pytest.mark.parametrize("arch", [90, 80])
def test_fast_paths_assemble_for_the_gpu(arch):
    # A process without TRITON_INTERPRET: kernels are compiled (not interpreted), for a GPU this machine lacks.
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(root), str(root / "Infinity_rep"), env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, str(root / "tests" / "triton_target.py"), str(arch)], env=env,
                          capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    counts = json.loads(done.stdout.strip().splitlines()[-1])
    for name in ("dequant_weight", "mixed_gemm"):
        assert counts[f"{name}/{DEQUANT_BF16}"]["fma.rn.bf16x2"] > 0
        assert counts[f"{name}/{DEQUANT_F16}"]["fma.rn.f16x2"] > 0
    assert counts["act_chunk"]["cvt.rni"] > 0  # hardware rounding, not the interpreter's arithmetic


def _round_f32(value) -> np.float32:
    """A rational rounded to the nearest float32, ties to even (exactly, without double rounding)."""
    f = np.float32(float(value))
    best = None
    for cand in (np.nextafter(f, np.float32(-np.inf)), f, np.nextafter(f, np.float32(np.inf))):
        err = abs(Fraction(float(cand)) - value)
        even = (int(np.array(cand).view(np.uint32)) & 1) == 0
        if best is None or err < best[0] or (err == best[0] and even):
            best = (err, cand)
    return best[1]


def _fma(a, b, c) -> np.float32:
    return _round_f32(Fraction(float(a)) * Fraction(float(b)) + Fraction(float(c)))


def test_reciprocal_division_is_correctly_rounded():
    # div_by on a GPU: q = x * r, e = fma(-q, d, x), fma(e, r, q) with r = 1 / d rounded; equal to x / d rounded
    # (numpy's float32 division is IEEE) for activations, smoothing factors and float16 scales.
    gen = np.random.default_rng(0)
    xs = (gen.standard_normal(3000) * 10.0 ** gen.uniform(-6, 4, 3000)).astype(np.float32)
    xs[:20] = 0.0
    ds = np.concatenate([10.0 ** gen.uniform(-4, 4, 1500), gen.uniform(6.1e-5, 1.0, 1500)]).astype(np.float32)
    ds[:10] = np.float32(7.0)
    for x, d in zip(xs, ds, strict=True):
        r = np.float32(1.0) / d
        q = np.float32(x * r)
        e = _fma(-q, d, x)
        assert _fma(e, r, q) == np.float32(x / d), (x, d)
