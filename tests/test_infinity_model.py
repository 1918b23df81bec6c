"""Transformer of Infinity: golden teacher-forced forward, manifests, RoPE, schedules, attention building blocks."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from infinity.arch import ARCHS, get_arch
from infinity.checkpoints import build_meta_model, random_transformer
from infinity.kv_cache import KVCache, LayerKVCache
from infinity.model import Infinity, TextContext, block_causal_mask
from infinity.rope import apply_rope, rope_angles, rope_table
from infinity.schedules import (
    PN_NUM_SCALES,
    TEMPLATES,
    full_schedule,
    get_scale_schedule,
    image_size,
    nearest_template,
    scale_starts,
    template_of_schedule,
    tokens_per_scale,
)

DATA = Path(__file__).parent / "data" / "infinity"
GOLDEN = DATA / "golden"


def load_golden_model(variant: str) -> Infinity:
    model = Infinity(f"tiny_{variant}")
    model.load_state_dict(torch.load(GOLDEN / f"tiny_{variant}_state_dict.pt", weights_only=True), strict=True)
    return model.eval()


def golden_inputs(variant: str) -> dict:
    inputs = torch.load(GOLDEN / f"tiny_{variant}_inputs.pt", weights_only=True)
    inputs["schedule"] = [tuple(int(v) for v in row) for row in inputs["scale_schedule"].tolist()]
    inputs["lens_list"] = [int(n) for n in inputs["lens"].tolist()]
    return inputs


# ------------------------------------------------------------------------------------------------ golden forward


@pytest.mark.parametrize("variant", ["p0", "p1"])
def test_teacher_forced_forward_matches_golden(variant):
    model = load_golden_model(variant)
    inputs = golden_inputs(variant)
    ref = torch.load(GOLDEN / f"tiny_{variant}_forward.pt", weights_only=True)
    captured = {}

    def keep(name):
        return lambda module, args, out: captured.__setitem__(name, out)

    model.text_norm.register_forward_hook(keep("text_norm_out"))
    model.text_proj_for_sos.register_forward_hook(keep("cond_BD"))
    model.text_proj_for_ca.register_forward_hook(keep("ca_kv_proj"))
    model.shared_ada_lin.register_forward_hook(keep("shared_ada_lin_out"))
    model.head_nm.register_forward_hook(keep("head_nm_out"))
    for i, block in enumerate(model.blocks()):
        block.register_forward_hook(keep(f"block{i}_out"))
    with torch.no_grad():
        captured["logits"] = model(
            inputs["kv_compact"], inputs["lens_list"], inputs["x_BLC_wo_prefix"], inputs["schedule"]
        )
    cos, sin = rope_table(model.arch.head_dim, inputs["schedule"])
    captured["rope_cos_sin"] = torch.stack((cos, sin))
    assert set(ref) <= set(captured)
    for key, expected in ref.items():
        got = captured[key].reshape(expected.shape)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5, msg=lambda m, k=key: f"{k}: {m}")
    torch.testing.assert_close(captured["rope_cos_sin"], ref["rope_cos_sin"], atol=0, rtol=0)


# ------------------------------------------------------------------------------------------------ manifests


@pytest.mark.parametrize("name", ["2b", "8b"])
def test_meta_model_state_dict_equals_manifest(name):
    manifest = json.loads((DATA / f"manifest_infinity_{name}.json").read_text())
    model = build_meta_model(name)
    params = {n for n, _ in model.named_parameters()}
    buffers = {n for n, _ in model.named_buffers()}
    mine = [
        (n, list(t.shape), "parameter" if n in params else "buffer" if n in buffers else "?")
        for n, t in model.state_dict().items()
    ]
    ref = [(e["name"], e["shape"], e["kind"]) for e in manifest["state_dict"]]
    assert mine == ref
    assert sum(p.numel() for p in model.parameters()) == manifest["num_parameters"]
    assert sum(b.numel() for b in model.buffers()) == manifest["num_buffer_elements"]
    assert model.arch.d_vae == manifest["d_vae"] and model.arch.head_out == manifest["V_head_out"]
    cfg = manifest["config"]
    arch = get_arch(name)
    assert (arch.depth, arch.embed_dim, arch.num_heads, arch.block_chunks) == (
        cfg["depth"],
        cfg["embed_dim"],
        cfg["num_heads"],
        cfg["block_chunks"],
    )
    assert arch.patchify == bool(cfg["apply_spatial_patchify"])
    assert len(model.blocks()) == arch.depth
    names = model.block_names()
    assert names[arch.blocks_per_chunk] == "block_chunks.1.module.0"
    assert all(model.get_submodule(n) is b for n, b in zip(names, model.blocks()))


def test_linears_are_swappable_by_name():
    model = random_transformer("tiny_p0", seed=0, device="cpu")
    name = "block_chunks.1.module.0.ffn.fc2"
    calls = []
    original = model.get_submodule(name)

    class Recorder(torch.nn.Module):
        def forward(self, x):
            calls.append(x.shape)
            return original(x)

    model.set_submodule(name, Recorder())
    inputs = golden_inputs("p0")
    with torch.no_grad():
        model(inputs["kv_compact"], inputs["lens_list"], inputs["x_BLC_wo_prefix"], inputs["schedule"])
    assert calls == [torch.Size([2, 57, 256])]


# ------------------------------------------------------------------------------------------------ schedules


def test_schedules_follow_the_templates():
    square = get_scale_schedule("1M", 1.0)
    assert [h for _, h, _ in square] == [1, 2, 4, 6, 8, 12, 16, 20, 24, 32, 40, 48, 64]
    assert sum(tokens_per_scale(square)) == 10521
    assert scale_starts(square)[-1] == 10521 - 4096
    assert image_size(square, 16, False) == (1024, 1024)
    assert image_size(square, 8, True) == (1024, 1024)
    assert sum(tokens_per_scale(get_scale_schedule("0.25M", 1.0))) == 2521
    for pn, n in PN_NUM_SCALES.items():
        for ratio in TEMPLATES:
            sched = get_scale_schedule(pn, ratio)
            assert len(sched) == n and sched == full_schedule(ratio)[:n]
    for ratio, grids in TEMPLATES.items():
        assert len(grids) == 13
        h, w = grids[-1]
        assert abs(h / w - ratio) < 0.02, ratio
    assert TEMPLATES[0.5] == [(w, h) for h, w in TEMPLATES[2.0]]
    assert nearest_template(1.9) == 2.0 and nearest_template(0.7) == 0.666 and nearest_template(1.0) == 1.0
    assert template_of_schedule(square[:4]) == 1.0
    with pytest.raises(ValueError, match="prefix"):
        template_of_schedule([(1, 1, 1), (1, 3, 5)])
    with pytest.raises(ValueError, match="pn"):
        get_scale_schedule("2M")


# ------------------------------------------------------------------------------------------------ RoPE


def test_rope_positions_and_prefix_consistency():
    schedule = full_schedule(1.0)
    angles = rope_angles(16, schedule)
    freqs = 1.0 / 10000 ** (torch.arange(0, 8, 2, dtype=torch.float64) / 8)
    start = scale_starts(schedule)[3]  # the 6x6 scale
    rows = [round(angles[start + 6 * i, 0].item() / freqs[0].item()) for i in range(6)]
    cols = [round(angles[start + j, 4].item() / freqs[0].item()) for j in range(6)]
    assert rows == [0, 11, 21, 32, 43, 53] and cols == rows
    last = angles[scale_starts(schedule)[-1] :]
    assert torch.equal(last[:, 0].view(64, 64)[:, 0] / freqs[0].float(), torch.arange(64).float())
    # Any prefix of a template uses the same table entries as the full schedule.
    for ratio in (1.0, 1.5, 0.4):
        full = rope_angles(32, full_schedule(ratio), ratio)
        prefix = get_scale_schedule("0.25M", ratio)
        assert torch.equal(rope_angles(32, prefix, ratio), full[: sum(tokens_per_scale(prefix))])
    # Half-integer products round half to even: 1.25 template, 20x16 scale, rows i * 70/20 = 3.5 i.
    tall = full_schedule(1.25)
    a = rope_angles(16, tall, 1.25)
    s = scale_starts(tall)[6]
    rows = [round(a[s + 16 * i, 0].item()) for i in range(4)]
    assert rows == [0, 4, 7, 10]


def test_apply_rope_matches_complex_rotation():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 10, 16, generator=gen)
    theta = torch.rand(10, 8, generator=gen, dtype=torch.float64) * 6
    out = apply_rope(x, theta.cos().float(), theta.sin().float())
    ref = torch.view_as_real(
        torch.view_as_complex(x.double().view(2, 3, 10, 8, 2).contiguous()) * torch.polar(torch.ones_like(theta), theta)
    ).flatten(-2)
    torch.testing.assert_close(out.double(), ref, atol=1e-6, rtol=1e-6)


# ------------------------------------------------------------------------------------------------ attention pieces


def reference_cross_attention(q, k, v, lens):
    """Per-sample loop in float64: q [bs, H, L, c], packed k/v [N, H, c]."""
    outs, start = [], 0
    for b, n in enumerate(lens):
        kb = k[start : start + n].transpose(0, 1).double()
        vb = v[start : start + n].transpose(0, 1).double()
        att = (q[b].double() @ kb.transpose(-1, -2) / math.sqrt(q.shape[-1])).softmax(-1)
        outs.append(att @ vb)
        start += n
    return torch.stack(outs)


def test_cross_attention_batched_equals_per_sample_loop():
    torch.manual_seed(0)
    model = random_transformer("tiny_p0", seed=1, device="cpu", std=0.2)
    block = model.blocks()[0]
    lens = [3, 7, 1, 5]
    ca_kv = torch.randn(sum(lens), 64)
    ctx = TextContext.build(ca_kv, lens)
    x = torch.randn(4, 9, 64)
    with torch.no_grad():
        got = block.ca(x, ctx)
        q = block.ca.mat_q(x).view(4, 9, 4, 16).transpose(1, 2)
        kv = block.ca.mat_kv(ca_kv) + torch.cat((block.ca.zero_k_bias, block.ca.v_bias))
        k, v = kv.view(-1, 2, 4, 16).unbind(1)
        ref = reference_cross_attention(q, k, v, lens).transpose(1, 2).flatten(2)
        ref = block.ca.proj(ref.float())
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    ctx_equal = TextContext.build(ca_kv[:12], [6, 6])
    assert ctx_equal.key_mask is None
    with pytest.raises(ValueError, match="sum"):
        TextContext.build(ca_kv, [3, 3])


def test_layer_kv_cache_attend_store_and_growth():
    gen = torch.Generator().manual_seed(0)
    cache = LayerKVCache(capacity=0)
    ks, vs = [], []
    for n in (1, 4, 9):
        q, k, v = (torch.randn(2, 3, n, 8, generator=gen) for _ in range(3))
        out = cache.attend(q, k, v, store=True)
        ks.append(k)
        vs.append(v)
        K, V = torch.cat(ks, 2).double(), torch.cat(vs, 2).double()
        ref = (q.double() @ K.transpose(-1, -2)).softmax(-1) @ V
        torch.testing.assert_close(out.double(), ref, atol=1e-6, rtol=1e-6)
    assert cache.length == 14 and cache.nbytes() >= 2 * 2 * 3 * 14 * 8 * 4
    q, k, v = (torch.randn(2, 3, 16, 8, generator=gen) for _ in range(3))
    out = cache.attend(q, k, v, store=False)
    K, V = torch.cat(ks + [k], 2).double(), torch.cat(vs + [v], 2).double()
    torch.testing.assert_close(out.double(), (q.double() @ K.transpose(-1, -2)).softmax(-1) @ V, atol=1e-6, rtol=1e-6)
    assert cache.length == 14, "store=False must not store"
    pk, pv = cache.prefix
    assert torch.equal(pk, torch.cat(ks, 2)) and torch.equal(pv, torch.cat(vs, 2))
    reserved = KVCache([LayerKVCache()])
    reserved.reserve(100)
    reserved.layers[0].attend(q, k, v, store=True)
    assert reserved.nbytes() == 2 * 2 * 3 * 100 * 8 * 4
    reserved.reset()
    assert reserved.nbytes() == 0 and reserved.layers[0].prefix is None


def test_block_replay_with_prefilled_cache_equals_masked_forward():
    """A block called standalone per scale with a cache pre-filled by earlier scales equals its block-causal
    full-sequence output (the calibration replay contract)."""
    model = random_transformer("tiny_p1", seed=3, device="cpu", std=0.1)
    block = model.blocks()[1]
    schedule = [(1, 1, 1), (1, 2, 2), (1, 4, 4)]
    sizes, starts = tokens_per_scale(schedule), scale_starts(schedule)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, sum(sizes), 64, generator=gen)
    gss = torch.randn(2, 1, 6, 64, generator=gen) * 0.1
    ctx = TextContext.build(torch.randn(7, 64, generator=gen), [3, 4])
    cos, sin = rope_table(16, schedule)
    with torch.no_grad():
        full = block(x, gss, ctx, (cos, sin), None, False, block_causal_mask(schedule))
        cache = LayerKVCache()
        for si, (s, n) in enumerate(zip(starts, sizes)):
            part = block(x[:, s : s + n], gss, ctx, (cos[s : s + n], sin[s : s + n]), cache, si < 2)
            torch.testing.assert_close(part, full[:, s : s + n], atol=1e-5, rtol=1e-5)
        # Replay of the last scale alone with a cache rebuilt from the captured prefix.
        prefix = cache.prefix
        replay = LayerKVCache()
        replay.set_prefix(*prefix)
        s, n = starts[2], sizes[2]
        again = block(x[:, s:], gss, ctx, (cos[s:], sin[s:]), replay, False)
    torch.testing.assert_close(again, full[:, s:], atol=1e-5, rtol=1e-5)


def test_bfloat16_blocks_stay_close_to_float32():
    fp32 = random_transformer("tiny_p0", seed=5, device="cpu", dtype="float32", std=0.05)
    bf16 = build_meta_model("tiny_p0")
    bf16.load_state_dict(fp32.state_dict(), assign=True)
    for block in bf16.blocks():
        block.to(torch.bfloat16)
    inputs = golden_inputs("p0")
    with torch.no_grad():
        a = fp32(inputs["kv_compact"], inputs["lens_list"], inputs["x_BLC_wo_prefix"], inputs["schedule"])
        b = bf16(inputs["kv_compact"], inputs["lens_list"], inputs["x_BLC_wo_prefix"], inputs["schedule"])
    assert b.dtype == torch.float32
    assert bf16.blocks()[0].sa.mat_qkv.weight.dtype == torch.bfloat16
    err = (a - b).abs().max().item()
    assert 0 < err < 3e-2 * a.abs().max().item()


def test_arch_presets_are_consistent():
    for arch in ARCHS.values():
        assert arch.depth % arch.block_chunks == 0
        assert arch.head_out == 2 * arch.d_vae
    assert get_arch("2b").pool_heads == 16 and get_arch("8b").pool_head_dim == 224
    assert get_arch("8b").mlp_hidden == 14336 and get_arch("2b").mlp_hidden == 8192
    with pytest.raises(ValueError, match="unknown"):
        get_arch("3b")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fused_qkv_kernel_matches_torch_reference(dtype):
    """The Triton kernel (run by the Triton interpreter on the CPU here) against the torch glue it replaces."""
    from infinity.kernels import cos_attn_qkv_triton
    from infinity.model import _cos_attn_qkv

    gen = torch.Generator().manual_seed(0)
    bs, length, heads, c = 2, 6, 3, 32
    qkv = torch.randn(bs, length, 3 * heads * c, generator=gen).to(dtype)
    bias = torch.randn(3 * heads * c, generator=gen).to(dtype)
    scale = torch.stack((torch.rand(heads, 1, generator=gen) * 20, torch.ones(heads, 1)))
    angles = torch.rand(length, c // 2, generator=gen, dtype=torch.float64) * 6
    cos, sin = angles.cos().float(), angles.sin().float()
    got = cos_attn_qkv_triton(qkv, bias, scale, cos, sin, heads)
    ref = _cos_attn_qkv(qkv, bias, scale, cos, sin, heads)
    tol = 1e-6 if dtype == torch.float32 else 2e-3
    for g, r, name in zip(got, ref, "qkv"):
        assert g.shape == (bs, heads, length, c) and g.is_contiguous(), name
        torch.testing.assert_close(g.float(), r.float(), atol=tol * 20, rtol=tol, msg=name)


def test_kv_cache_reserved_room_serves_the_last_scale():
    gen = torch.Generator().manual_seed(1)
    plain, roomy = LayerKVCache(), LayerKVCache(capacity=12)
    for n in (1, 4):
        q, k, v = (torch.randn(1, 2, n, 8, generator=gen) for _ in range(3))
        plain.attend(q, k, v, store=True)
        roomy.attend(q, k, v, store=True)
    q, k, v = (torch.randn(1, 2, 7, 8, generator=gen) for _ in range(3))
    torch.testing.assert_close(roomy.attend(q, k, v, store=False), plain.attend(q, k, v, store=False))
    assert roomy.length == 5 and roomy.nbytes() == 2 * 2 * 12 * 8 * 4
