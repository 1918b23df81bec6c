"""KV-cached CFG sampler: bit-exact agreement with the golden runs, top-k/top-p semantics, cache contract."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from infinity.kv_cache import KVCache, LayerKVCache
from infinity.model import Infinity
from infinity.sampler import filter_top_k_top_p_, sample, sample_bits
from infinity.vae import VAE_CONFIGS, image_to_uint8_bgr, load_vae

GOLDEN = Path(__file__).parent / "data" / "infinity" / "golden"
SETTINGS = {"greedy": {"top_k": 1, "top_p": 0.0, "seed": 0}, "sampled": {"top_k": 900, "top_p": 0.97, "seed": 1}}


@pytest.fixture(scope="module")
def golden_vae():
    return load_vae(GOLDEN / "tiny_vae_state_dict.pt", VAE_CONFIGS["tiny_golden"], strict_encoder=False)


def golden_model(variant: str) -> Infinity:
    model = Infinity(f"tiny_{variant}")
    model.load_state_dict(torch.load(GOLDEN / f"tiny_{variant}_state_dict.pt", weights_only=True), strict=True)
    return model.eval()


def golden_inputs(variant: str):
    inputs = torch.load(GOLDEN / f"tiny_{variant}_inputs.pt", weights_only=True)
    schedule = [tuple(int(v) for v in row) for row in inputs["scale_schedule"].tolist()]
    return inputs["kv_compact"], [int(n) for n in inputs["lens"].tolist()], schedule


@pytest.mark.parametrize("variant", ["p0", "p1"])
@pytest.mark.parametrize("kind", ["greedy", "sampled"])
def test_sampler_matches_golden_bit_exactly(variant, kind, golden_vae):
    model = golden_model(variant)
    kv_compact, lens, schedule = golden_inputs(variant)
    ref = torch.load(GOLDEN / f"tiny_{variant}_ar_{kind}.pt", weights_only=True)
    out = sample(model, kv_compact, lens, schedule, cfg=3.0, tau=0.5, return_logits=True, **SETTINGS[kind])
    for k in range(len(schedule)):
        torch.testing.assert_close(out.logits[k], ref[f"logits_si{k}"], atol=1e-5, rtol=1e-5)
        assert torch.equal(out.bits[k], ref[f"bits_si{k}"][:, 0]), f"scale {k}: sampled bits differ"
        if k:
            torch.testing.assert_close(out.next_inputs[k - 1], ref[f"next_input_si{k}"], atol=1e-6, rtol=0)
    torch.testing.assert_close(out.summed_codes, ref["summed_codes"], atol=1e-6, rtol=0)
    with torch.no_grad():
        image = golden_vae.decode(out.summed_codes)
    torch.testing.assert_close(image, ref["image_float"], atol=1e-4, rtol=0)
    uint8 = image_to_uint8_bgr(image)
    assert (uint8.int() - ref["image_uint8_bgr"].int()).abs().max() <= 1


def test_teacher_forced_logits_equal_sampler_conditional_logits():
    model = golden_model("p1")
    kv_compact, lens, schedule = golden_inputs("p1")
    out = sample(model, kv_compact, lens, schedule, cfg=3.0, tau=0.5, top_k=900, top_p=0.97, seed=7, return_logits=True)
    with torch.no_grad():
        forced = model(kv_compact, lens, torch.cat(out.next_inputs, dim=1), schedule)
    torch.testing.assert_close(torch.cat([lg[:2] for lg in out.logits], dim=1), forced, atol=1e-5, rtol=1e-5)


def test_without_cfg_only_conditional_rows_exist():
    model = golden_model("p0")
    kv_compact, lens, schedule = golden_inputs("p0")
    out = sample(model, kv_compact, lens, schedule, cfg=1.0, tau=1.0, top_k=1, top_p=0.0, seed=0, return_logits=True)
    assert out.logits[0].shape[0] == 2
    # One scale with cfg 1 inside a guided run uses the conditional rows only: greedy bits follow their argmax.
    mixed = sample(
        model,
        kv_compact,
        lens,
        schedule,
        cfg=[3.0, 1.0, 3.0, 3.0],
        tau=1.0,
        top_k=1,
        top_p=0.0,
        seed=0,
        return_logits=True,
    )
    assert mixed.logits[1].shape[0] == 4
    expected = mixed.logits[1][:2].view(2, 4, 6, 2).argmax(-1).view(2, 2, 2, 6)
    assert torch.equal(mixed.bits[1], expected)
    with pytest.raises(ValueError, match="cfg"):
        sample(model, kv_compact, lens, schedule, cfg=[3.0, 3.0])


def reference_filter(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Row-by-row python reference of the top-k / top-p rules of the spec."""
    out = logits.clone()
    for row in out.view(-1, out.shape[-1]):
        values = row.tolist()
        if top_k > 0:
            kth = sorted(values, reverse=True)[min(top_k, len(values)) - 1]
            for i, v in enumerate(values):
                if v < kth:
                    row[i] = float("-inf")
        if top_p > 0:
            order = sorted(range(len(values)), key=lambda i: row[i].item())
            probs = torch.softmax(row[order], 0)
            cumulative = torch.cumsum(probs, 0)
            for pos, i in enumerate(order[:-1]):
                if cumulative[pos].item() <= torch.tensor(1 - top_p, dtype=torch.float32).item():
                    row[i] = float("-inf")
    return out


@pytest.mark.parametrize("top_k,top_p", [(1, 0.0), (2, 0.0), (900, 0.97), (0, 0.5), (3, 0.8), (2, 0.97)])
def test_top_k_top_p_filter_matches_reference(top_k, top_p):
    gen = torch.Generator().manual_seed(top_k)
    logits = torch.randn(3, 40, 4, generator=gen) * 3
    logits[0, 0] = torch.tensor([1.0, 1.0, 0.0, -1.0])  # exact tie kept by top-k
    got = filter_top_k_top_p_(logits.clone(), top_k, top_p)
    assert torch.equal(got, reference_filter(logits, top_k, top_p))


def test_two_class_top_p_removes_minority_at_threshold():
    # p(minority) = 0.03 exactly in float32 terms is removed, slightly above is kept.
    lo = torch.log(torch.tensor(0.03 / 0.97))
    logits = torch.tensor([[[lo.item(), 0.0], [lo.item() + 1e-3, 0.0]]])
    filtered = filter_top_k_top_p_(logits.clone(), 900, 0.97)
    assert filtered[0, 0, 0] == float("-inf") and torch.isfinite(filtered[0, 1]).all()


def test_sample_bits_uses_one_multinomial_call_on_the_generator():
    gen_a = torch.Generator().manual_seed(11)
    logits = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(0))
    bits = sample_bits(logits.clone(), 900, 0.97, gen_a)
    gen_b = torch.Generator().manual_seed(11)
    probs = filter_top_k_top_p_(logits.clone().view(2, 20, 2), 900, 0.97).softmax(-1)
    ref = torch.multinomial(probs.view(-1, 2), 1, replacement=True, generator=gen_b).view(2, 5, 4)
    assert torch.equal(bits, ref)
    assert torch.equal(gen_a.get_state(), gen_b.get_state())


class RecordingCache(KVCache):
    def __init__(self, n):
        super().__init__([RecordingLayer() for _ in range(n)])
        self.resets = 0

    def reset(self):
        self.resets += 1
        super().reset()


class RecordingLayer(LayerKVCache):
    def __init__(self):
        super().__init__()
        self.stores = []

    def attend(self, q, k, v, *, store):
        self.stores.append((q.shape[2], store))
        return super().attend(q, k, v, store=store)


def test_sampler_honours_the_kv_cache_factory_contract():
    model = golden_model("p0")
    kv_compact, lens, schedule = golden_inputs("p0")
    made = []

    def factory(m):
        made.append(RecordingCache(len(m.blocks())))
        return made[-1]

    model.kv_cache_factory = factory
    ref = torch.load(GOLDEN / "tiny_p0_ar_sampled.pt", weights_only=True)
    out = sample(model, kv_compact, lens, schedule, cfg=3.0, tau=0.5, **SETTINGS["sampled"])
    assert len(made) == 1 and made[0].resets == 1
    for layer in made[0].layers:
        assert layer.stores == [(1, True), (4, True), (16, True), (36, False)]
        assert layer.length == 0
    assert out.kv_cache_bytes == len(model.blocks()) * 2 * 4 * 4 * 21 * 16 * 4
    assert torch.equal(out.bits[3], ref["bits_si3"][:, 0])


def test_fused_kernel_path_with_in_place_cache_writes_matches_torch_path():
    """The GPU path (fused q/k/v kernel writing k/v straight into the KV-cache slots, with and without room for the
    last scale), run on the CPU by the Triton interpreter, equals the reference torch path."""
    from infinity.kernels import set_triton_enabled

    model = golden_model("p0")
    kv_compact, lens, schedule = golden_inputs("p0")
    kv_compact, lens, schedule = kv_compact[: lens[0]], lens[:1], schedule[:2]
    settings = dict(cfg=3.0, tau=0.5, return_logits=True, **SETTINGS["sampled"])
    ref = sample(model, kv_compact, lens, schedule, **settings)
    set_triton_enabled(True, on_cpu=True)
    try:
        outs = [sample(model, kv_compact, lens, schedule, kv_reserve_last=r, **settings) for r in (False, True)]
    finally:
        set_triton_enabled(True, on_cpu=False)
    for out in outs:
        for k in range(len(schedule)):
            torch.testing.assert_close(out.logits[k], ref.logits[k], atol=1e-5, rtol=1e-5)
            assert torch.equal(out.bits[k], ref.bits[k])
    per_token = len(model.blocks()) * 2 * 2 * 4 * 16 * 4
    assert [o.kv_cache_bytes for o in outs] == [1 * per_token, 5 * per_token]
