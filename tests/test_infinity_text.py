"""infinity.text: packing, CFG batch, tiny T5 + shipped tokenizer, local from_pretrained, flan-t5-xl layout."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from infinity.text import (
    ASSETS_DIR,
    TextBatch,
    TextEncoder,
    cfg_text_batch,
    load_tiny_tokenizer,
    pack_features,
    tiny_t5_config,
)

DATA = Path(__file__).parent / "data" / "infinity"
REPO = Path(__file__).resolve().parent.parent
PROMPTS = ["A cat sitting in front of a flat screen TV.", "three people riding on the backs of elephants"]


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="module")
def tiny() -> TextEncoder:
    return TextEncoder.tiny(seed=0)


def _batch(lens: list[int], c: int = 4, seed: int = 0) -> TextBatch:
    kv = torch.randn(sum(lens), c, generator=torch.Generator().manual_seed(seed))
    cu = torch.tensor([0] + [sum(lens[: i + 1]) for i in range(len(lens))], dtype=torch.int32)
    return TextBatch(kv, lens, cu, max(lens))


# ----------------------------------------------------------------------------------------------- packing, CFG batch


def test_pack_features_keeps_real_rows_only():
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(3, 7, 5, generator=g, dtype=torch.float64)
    lens = [3, 7, 1]
    mask = torch.tensor([[1] * n + [0] * (7 - n) for n in lens])
    tb = pack_features(feats, mask)
    assert tb.kv_compact.dtype == torch.float32 and tb.kv_compact.shape == (11, 5)
    assert tb.lens == lens and tb.max_seqlen == 7
    assert tb.cu_seqlens.dtype == torch.int32 and tb.cu_seqlens.tolist() == [0, 3, 10, 11]
    for b, n in enumerate(lens):
        assert torch.equal(tb.prompt(b), feats[b, :n].float())
        assert torch.equal(tb.kv_compact[tb.cu_seqlens[b] : tb.cu_seqlens[b + 1]], feats[b, :n].float())
    kv, lens_t, cu, mx = tb.as_tuple()
    assert kv is tb.kv_compact and lens_t == lens and cu is tb.cu_seqlens and mx == 7
    bad = mask.clone()
    bad[0, 5] = 1
    with pytest.raises(ValueError, match="right-padded"):
        pack_features(feats, bad)


def test_text_batch_validation():
    kv = torch.zeros(5, 4)
    with pytest.raises(ValueError, match="int32"):
        TextBatch(kv, [2, 3], torch.tensor([0, 2, 5]), 3)
    with pytest.raises(ValueError, match="sum"):
        TextBatch(kv, [2, 2], torch.tensor([0, 2, 4], dtype=torch.int32), 2)
    with pytest.raises(ValueError, match="max_seqlen"):
        TextBatch(kv, [2, 3], torch.tensor([0, 2, 5], dtype=torch.int32), 2)
    with pytest.raises(ValueError, match="at least one token"):
        TextBatch(torch.zeros(3, 4), [0, 3], torch.tensor([0, 0, 3], dtype=torch.int32), 3)


def test_cfg_batch_uses_learned_rows_with_same_lengths():
    cond = _batch([5, 9, 2])
    uncond = torch.randn(16, 4, generator=torch.Generator().manual_seed(1))
    tb = cfg_text_batch(cond, uncond)
    assert tb.lens == [5, 9, 2, 5, 9, 2] and tb.max_seqlen == 9 and tb.batch_size == 6
    # §2.2: cu_seqlens = cat(cu, cu[1:] + cu[-1]).
    cu = cond.cu_seqlens
    assert torch.equal(tb.cu_seqlens, torch.cat([cu, cu[1:] + cu[-1]]))
    assert tb.cu_seqlens.tolist() == [0, 5, 14, 16, 21, 30, 32]
    for b, n in enumerate(cond.lens):
        assert torch.equal(tb.prompt(b), cond.prompt(b))
        assert torch.equal(tb.prompt(3 + b), uncond[:n])
    with pytest.raises(ValueError, match="only 8 rows"):
        cfg_text_batch(cond, uncond[:8])
    with pytest.raises(ValueError, match="cfg_uncond must be"):
        cfg_text_batch(cond, torch.zeros(16, 3))


def test_cfg_batch_with_negative_prompts():
    cond = _batch([5, 9])
    neg = _batch([3, 12], seed=2)
    tb = cfg_text_batch(cond, torch.zeros(4, 4), negative=neg)
    assert tb.lens == [5, 9, 3, 12] and tb.max_seqlen == 12
    assert tb.cu_seqlens.tolist() == [0, 5, 14, 17, 29]
    assert torch.equal(tb.prompt(2), neg.prompt(0)) and torch.equal(tb.prompt(3), neg.prompt(1))
    one = _batch([4], seed=3)
    tb = cfg_text_batch(cond, torch.zeros(4, 4), negative=one)
    assert tb.lens == [5, 9, 4, 4] and torch.equal(tb.prompt(3), one.prompt(0))
    with pytest.raises(ValueError, match="3 negative prompts for 2"):
        cfg_text_batch(cond, torch.zeros(4, 4), negative=_batch([1, 1, 1]))


# ------------------------------------------------------------------------------------------ tokenizer and tiny T5


def test_shipped_tokenizer_is_t5_like_and_packaged():
    tok = load_tiny_tokenizer(max_length=32)
    assert len(tok) == 1000
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    ids = tok(PROMPTS[0], padding="max_length", max_length=32, truncation=True)
    n = sum(ids["attention_mask"])
    assert ids["input_ids"][n - 1] == 1 and set(ids["input_ids"][n:]) == {0}
    assert tok.convert_ids_to_tokens(ids["input_ids"][:3]) == ["▁A", "▁cat", "▁sit"]
    # Package data is `assets/*` (no sub-folders): the model file must sit directly in assets/.
    assert 'infinity = ["assets/*"]' in (REPO / "pyproject.toml").read_text()
    assert (ASSETS_DIR / "spiece.model").is_file()


def test_tokenizer_asset_rebuilds_bit_identically():
    import sentencepiece
    from infinity.tools import build_tiny_tokenizer as builder

    record = json.loads((ASSETS_DIR / builder.PROVENANCE_NAME).read_text())
    captions = builder.read_captions(REPO / "deepcompressor" / "data" / "prompts" / "qdiff.yaml")
    assert len(captions) == record["num_captions"]
    a = builder.train_model(captions)
    assert a == builder.train_model(captions)
    if sentencepiece.__version__ != record["sentencepiece_version"]:
        pytest.skip(f"asset built with sentencepiece {record['sentencepiece_version']}, have {sentencepiece.__version__}")
    assert a == (ASSETS_DIR / "spiece.model").read_bytes()


def test_tiny_encoder_end_to_end(tiny):
    tb = tiny.encode(PROMPTS)
    ids, mask = tiny.tokenize(PROMPTS)
    lens = mask.sum(1).tolist()
    assert ids.shape == (2, 64) and tiny.out_dim == 256
    assert tb.lens == lens and tb.max_seqlen == max(lens) and lens[0] != lens[1]
    assert tb.cu_seqlens.tolist() == [0, lens[0], lens[0] + lens[1]]
    assert tb.kv_compact.shape == (sum(lens), 256) and tb.kv_compact.dtype == torch.float32
    assert torch.isfinite(tb.kv_compact).all()
    # Features are the encoder's last hidden state (after the final RMS norm) on the real rows.
    with torch.no_grad():
        full = tiny.model(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(tb.prompt(1), full[1, : lens[1]], atol=0, rtol=0)


def test_padding_never_leaks(tiny):
    together = tiny.encode(PROMPTS + ["a dog"])
    for b, p in enumerate(PROMPTS):
        alone = tiny.encode([p])
        torch.testing.assert_close(alone.kv_compact, together.prompt(b), atol=1e-5, rtol=1e-5)
        # And equal to running T5 on the real tokens only, with no padding at all.
        ids, mask = tiny.tokenize([p])
        n = int(mask.sum())
        with torch.no_grad():
            bare = tiny.model(input_ids=ids[:, :n]).last_hidden_state[0]
        torch.testing.assert_close(alone.kv_compact, bare, atol=1e-5, rtol=1e-5)


def test_tiny_encoder_is_seeded_and_leaves_global_rng(tiny):
    state = torch.get_rng_state()
    again = TextEncoder.tiny(seed=0)
    other = TextEncoder.tiny(seed=1, d_model=128, max_length=16)
    assert torch.equal(torch.get_rng_state(), state)
    sa, sb = tiny.model.state_dict(), again.model.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert torch.equal(tiny.encode(PROMPTS).kv_compact, again.encode(PROMPTS).kv_compact)
    tb = other.encode(["x " * 40])
    assert other.out_dim == 128 and tb.kv_compact.shape == (16, 128) and tb.lens == [16]  # truncated, </s> kept
    ids, _ = other.tokenize(["x " * 40])
    assert ids[0, -1].item() == 1
    with pytest.raises(TypeError):
        tiny.encode("a single string")
    with pytest.raises(ValueError, match="empty"):
        tiny.encode([])


def test_chunked_encoding_matches(tiny):
    prompts = [f"a photo of {n} red apples on a table" for n in range(5)]
    whole = tiny.encode(prompts)
    small = TextEncoder(tiny.model, tiny.tokenizer, max_length=tiny.max_length, chunk_size=2).encode(prompts)
    assert small.lens == whole.lens and torch.equal(small.cu_seqlens, whole.cu_seqlens)
    torch.testing.assert_close(small.kv_compact, whole.kv_compact, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------- local folders, flan-t5-xl


def test_from_pretrained_local_folder(tmp_path, tiny):
    folder = tmp_path / "flan-t5-tiny"
    tiny.save_pretrained(folder)
    loaded = TextEncoder.from_pretrained(folder, device="cpu", max_length=64)
    assert loaded.dtype == torch.float32 and loaded.out_dim == 256
    a, b = tiny.encode(PROMPTS), loaded.encode(PROMPTS)
    assert a.lens == b.lens
    torch.testing.assert_close(a.kv_compact, b.kv_compact, atol=0, rtol=0)
    half = TextEncoder.from_pretrained(folder, dtype=torch.bfloat16, max_length=64)
    assert half.dtype == torch.bfloat16 and half.encode(PROMPTS).kv_compact.dtype == torch.float32


def test_from_pretrained_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found: .*missing-t5"):
        TextEncoder.from_pretrained(tmp_path / "missing-t5")
    folder = tmp_path / "partial"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"lacks: weights .*; tokenizer"):
        TextEncoder.from_pretrained(folder)


def test_flan_t5_xl_layout_from_manifest():
    from transformers import T5Config, T5EncoderModel

    m = json.loads((DATA / "manifest_t5_flan_t5_xl_encoder.json").read_text())
    with torch.device("meta"):
        model = T5EncoderModel(T5Config(**m["config"]))
    got = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    want = [(e["name"], tuple(e["shape"])) for e in m["state_dict"]]
    assert set(got) - set(want) == set() and set(want) - set(got) == set()
    assert sum(p.numel() for p in model.parameters()) == m["num_parameters"]
    assert model.config.d_model == m["output_dim"] == 2048
    # The tiny encoder has the same module layout (gated-GELU FFN, relative bias in block 0 only).
    with torch.device("meta"):
        small = T5EncoderModel(tiny_t5_config(d_model=256, num_layers=24))
    assert [k for k, _ in small.state_dict().items()] == [k for k, _ in got]
