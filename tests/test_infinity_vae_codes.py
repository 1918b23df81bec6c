"""infinity.codes: bits -> codes, interpolation, pixel (un)shuffle and the sampler's code accumulation."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from infinity.codes import (
    accumulate_scale,
    bits_to_code_map,
    bits_to_codes,
    interpolate_codes,
    pixel_shuffle_2x,
    pixel_unshuffle_2x,
    summed_codes_from_bits,
    token_bits_to_vae_bits,
    vae_scale_schedule,
)

GOLDEN = Path(__file__).parent / "data" / "infinity" / "golden"


def _load(name: str) -> dict[str, torch.Tensor]:
    return torch.load(GOLDEN / name, map_location="cpu", weights_only=True)


# ------------------------------------------------------------------------------------------- float64 references


def _ref_resize_axis(n_in: int, n_out: int) -> torch.Tensor:
    """Interpolation matrix [n_out, n_in] of linear resizing with half-pixel centres (align_corners=False)."""
    m = torch.zeros(n_out, n_in, dtype=torch.float64)
    for o in range(n_out):
        src = max((o + 0.5) * n_in / n_out - 0.5, 0.0)
        i0 = min(math.floor(src), n_in - 1)
        i1 = min(i0 + 1, n_in - 1)
        lam = src - i0
        m[o, i0] += 1 - lam
        m[o, i1] += lam
    return m


def _ref_resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    mh = _ref_resize_axis(x.shape[2], size[0])
    mw = _ref_resize_axis(x.shape[3], size[1])
    return torch.einsum("oh,bchw,pw->bcop", mh, x.double(), mw)


def _ref_shuffle(x: torch.Tensor) -> torch.Tensor:
    b, c4, h, w = x.shape
    out = torch.empty(b, c4 // 4, 2 * h, 2 * w, dtype=x.dtype)
    for ch in range(c4):
        c, i, j = ch // 4, (ch % 4) // 2, ch % 2
        for y in range(h):
            for xx in range(w):
                out[:, c, 2 * y + i, 2 * xx + j] = x[:, ch, y, xx]
    return out


# ------------------------------------------------------------------------------------------------------- unit tests


@pytest.mark.parametrize("d", [1, 6, 14, 32])
def test_bits_to_codes_values_and_norm(d):
    g = torch.Generator().manual_seed(d)
    bits = torch.randint(0, 2, (3, 5, d), generator=g)
    codes = bits_to_codes(bits)
    ref = (2 * bits.double() - 1) / math.sqrt(d)
    assert codes.dtype == torch.float32 and codes.shape == bits.shape
    torch.testing.assert_close(codes.double(), ref, atol=1e-7, rtol=0)
    torch.testing.assert_close(codes.double().norm(dim=-1), torch.ones(3, 5, dtype=torch.float64), atol=1e-6, rtol=0)
    assert torch.equal(codes > 0, bits.bool())


def test_bits_to_code_map_layout():
    bits = torch.randint(0, 2, (2, 1, 3, 4, 6), generator=torch.Generator().manual_seed(0))
    m = bits_to_code_map(bits)
    assert m.shape == (2, 6, 3, 4)
    torch.testing.assert_close(m, bits_to_codes(bits[:, 0]).permute(0, 3, 1, 2), atol=0, rtol=0)
    with pytest.raises(ValueError, match="singleton T axis"):
        bits_to_code_map(torch.zeros(2, 2, 3, 4, 6))
    with pytest.raises(ValueError, match=r"\[B, H, W, d\]"):
        bits_to_code_map(torch.zeros(3, 4, 6))


@pytest.mark.parametrize("src,dst", [((1, 1), (6, 6)), ((2, 2), (6, 6)), ((4, 4), (6, 6)), ((3, 5), (7, 4)),
                                     ((12, 12), (4, 4)), ((12, 12), (8, 8)), ((6, 6), (2, 2)), ((5, 5), (5, 5))])
def test_interpolate_codes_matches_float64_bilinear_half_pixel(src, dst):
    x = torch.randn(2, 3, *src, generator=torch.Generator().manual_seed(sum(src) + 7 * sum(dst)))
    out = interpolate_codes(x, dst)
    assert out.shape == (2, 3, *dst)
    torch.testing.assert_close(out.double(), _ref_resize(x, dst), atol=1e-6, rtol=0)


def test_interpolate_codes_same_size_is_identity():
    x = torch.randn(2, 4, 5, 5)
    assert torch.equal(interpolate_codes(x, (5, 5)), x)


def test_pixel_shuffle_matches_channel_rule_and_torch():
    x = torch.randn(2, 24, 3, 5, generator=torch.Generator().manual_seed(3))
    out = pixel_shuffle_2x(x)
    assert torch.equal(out, _ref_shuffle(x))
    assert torch.equal(out, F.pixel_shuffle(x, 2))
    assert torch.equal(pixel_unshuffle_2x(out), x)
    y = torch.randn(1, 6, 8, 4)
    assert torch.equal(pixel_shuffle_2x(pixel_unshuffle_2x(y)), y)
    with pytest.raises(ValueError):
        pixel_shuffle_2x(torch.zeros(1, 6, 2, 2))
    with pytest.raises(ValueError):
        pixel_unshuffle_2x(torch.zeros(1, 6, 3, 2))


def test_token_bits_to_vae_bits_bit_positions():
    d = 6
    b, h, w = 2, 3, 2
    tok = torch.randint(0, 2, (b, h, w, 4 * d), generator=torch.Generator().manual_seed(5))
    vae = token_bits_to_vae_bits(tok, patchify=True)
    assert vae.shape == (b, 2 * h, 2 * w, d)
    for k in range(4 * d):
        i, j = (k % 4) // 2, k % 2
        assert torch.equal(vae[:, i::2, j::2, k // 4], tok[..., k])
    assert token_bits_to_vae_bits(tok, patchify=False) is tok


def test_vae_scale_schedule():
    sched = [(1, 1, 1), (1, 2, 3)]
    assert vae_scale_schedule(sched, False) == [(1, 1, 1), (1, 2, 3)]
    assert vae_scale_schedule(sched, True) == [(1, 2, 2), (1, 4, 6)]
    with pytest.raises(ValueError):
        vae_scale_schedule([(1, 2)], True)


def test_accumulate_scale_against_float64_recurrence():
    sched = [(1, 1, 1), (1, 2, 2), (1, 3, 3), (1, 5, 5)]
    g = torch.Generator().manual_seed(11)
    d = 5
    bits = [torch.randint(0, 2, (2, h, w, d), generator=g) for _, h, w in sched]
    summed = None
    ref_summed = torch.zeros(2, d, 5, 5, dtype=torch.float64)
    for si, bt in enumerate(bits):
        code = (2 * bt.double() - 1).permute(0, 3, 1, 2) / math.sqrt(d)
        summed, nxt = accumulate_scale(summed, bits_to_code_map(bt), si, sched, patchify=False)
        ref_summed = ref_summed + _ref_resize(code, (5, 5))
        torch.testing.assert_close(summed.double(), ref_summed, atol=1e-6, rtol=0)
        if si + 1 < len(sched):
            h, w = sched[si + 1][1:]
            ref_next = _ref_resize(ref_summed, (h, w)).reshape(2, d, h * w).transpose(1, 2)
            torch.testing.assert_close(nxt.double(), ref_next, atol=1e-6, rtol=0)
        else:
            assert nxt is None
    torch.testing.assert_close(summed_codes_from_bits(bits, sched), summed, atol=0, rtol=0)
    with pytest.raises(ValueError, match="grid"):
        accumulate_scale(None, bits_to_code_map(bits[1]), 0, sched, patchify=False)
    with pytest.raises(ValueError, match="outside"):
        accumulate_scale(None, bits_to_code_map(bits[0]), 4, sched, patchify=False)
    with pytest.raises(ValueError, match="3 bit tensors"):
        summed_codes_from_bits(bits[:3], sched)


# ----------------------------------------------------------------------------------------------------- golden files


def test_golden_vae_decode_summed_codes():
    gold = _load("tiny_vae_decode.pt")
    sched = gold["scale_schedule"].tolist()
    summed = summed_codes_from_bits([gold[f"bits_si{k}"] for k in range(len(sched))], sched)
    torch.testing.assert_close(summed, gold["summed_codes"][:, :, 0], atol=1e-6, rtol=0)


@pytest.mark.parametrize("variant,patchify", [("p0", False), ("p1", True)])
def test_golden_ar_next_inputs_and_summed_codes(variant, patchify):
    gold = _load(f"tiny_{variant}_ar_greedy.pt")
    sched = _load(f"tiny_{variant}_inputs.pt")["scale_schedule"].tolist()
    vsched = vae_scale_schedule(sched, patchify)
    summed = None
    for si, (_, h, w) in enumerate(sched):
        vae_bits = gold[f"bits_si{si}"][:, 0]
        assert tuple(vae_bits.shape[1:3]) == tuple(vsched[si][1:])
        # The sampler works from token bits: rebuild them (inverse shuffle) and go through the public path.
        token_bits = pixel_unshuffle_2x(vae_bits.permute(0, 3, 1, 2)).permute(0, 2, 3, 1) if patchify else vae_bits
        assert token_bits.shape == (2, h, w, 24 if patchify else 6)
        assert torch.equal(token_bits_to_vae_bits(token_bits, patchify), vae_bits)
        summed, nxt = accumulate_scale(summed, bits_to_code_map(token_bits_to_vae_bits(token_bits, patchify)), si,
                                       vsched, patchify)
        if si + 1 < len(sched):
            torch.testing.assert_close(nxt, gold[f"next_input_si{si + 1}"], atol=1e-6, rtol=0)
    torch.testing.assert_close(summed, gold["summed_codes"], atol=1e-6, rtol=0)
    # The teacher-forcing input of the golden forward is the concatenation of these next-scale inputs.
    x_blc = _load(f"tiny_{variant}_inputs.pt")["x_BLC_wo_prefix"]
    torch.testing.assert_close(x_blc, torch.cat([gold[f"next_input_si{k}"] for k in (1, 2, 3)], dim=1), atol=0, rtol=0)
