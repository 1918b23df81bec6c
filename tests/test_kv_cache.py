"""Quantized KV cache: attention against a float64 fake-quant reference, memory, store=False numerics, the
calibration file's validation and attaching it to the tiny model."""

import io

import pytest
import torch
import torch.nn.functional as F
from infinity.kv_cache import KVCache, LayerKVCache

from deepcompressor.calib.kv import asymmetric_qparams, dequantize_asymmetric, quantize_asymmetric
from deepcompressor.kernels.kv_attention import HAS_TRITON
from deepcompressor.nn.kv_cache import (
    CALIB_FORMAT,
    KVCalibrationError,
    KVQuantParams,
    KVRecorder,
    QuantizedLayerKVCache,
    attach_kv_qparams,
    detach_kv_qparams,
    kv_model_identity,
    load_kv_calibration,
)

HEADS, DIM = 2, 32
SCALES = [1, 4, 16, 20]  # tokens per scale; the last one is never stored


def make_params(bits: int, depth: int = 1, seed: int = 0) -> tuple[KVQuantParams, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    k_center = 0.3 * torch.randn(depth, HEADS, DIM, generator=g)
    v_center = torch.randn(depth, HEADS, DIM, generator=g)
    width = 0.2 + torch.rand(depth, 2, HEADS, DIM, generator=g)
    centers = torch.stack((k_center, v_center), dim=1)
    scale, zero = asymmetric_qparams(centers - width, centers + width, bits)
    return KVQuantParams("uint8" if bits == 8 else "uint4", scale, zero), centers, width


def scale_inputs(batch: int, length: int, centers: torch.Tensor, width: torch.Tensor, seed: int):
    g = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(batch, HEADS, length, DIM, generator=g), dim=-1) * 10
    k = centers[0, 0][None, :, None] + 0.6 * width[0, 0][None, :, None] * torch.randn(batch, HEADS, length, DIM,
                                                                                      generator=g)  # fmt: skip
    v = centers[0, 1][None, :, None] + 0.6 * width[0, 1][None, :, None] * torch.randn(batch, HEADS, length, DIM,
                                                                                      generator=g)  # fmt: skip
    return q, k, v


def fake_quant(x, params: KVQuantParams, which: int):
    scale = params.scale[0, which][:, None, :].double()
    zero = params.zero[0, which][:, None, :].double()
    codes = quantize_asymmetric(x.double(), scale, zero, params.bits)
    return dequantize_asymmetric(codes, scale, zero, torch.float64)


def run_schedule(cache, params, centers, width, batch=2, last_store=False, reserve=None):
    if reserve is not None:
        cache.capacity = reserve
    outputs, keys, values = [], [], []
    for si, length in enumerate(SCALES):
        q, k, v = scale_inputs(batch, length, centers, width, seed=si)
        store = si < len(SCALES) - 1 or last_store
        outputs.append(cache.attend(q, k, v, store=store))
        keys.append(k)
        values.append(v)
    return outputs, keys, values


def reference_outputs(params, centers, width, current="quantized", batch=2):
    refs, keys, values = [], [], []
    for si, length in enumerate(SCALES):
        q, k, v = scale_inputs(batch, length, centers, width, seed=si)
        kq, vq = fake_quant(k, params, 0), fake_quant(v, params, 1)
        own_k, own_v = (kq, vq) if current == "quantized" else (k.double(), v.double())
        all_k = torch.cat(keys + [own_k], dim=2)
        all_v = torch.cat(values + [own_v], dim=2)
        refs.append(F.scaled_dot_product_attention(q.double(), all_k, all_v, scale=1.0))
        keys.append(kq)
        values.append(vq)
    return refs


BACKENDS = ["torch"] + (["triton"] if HAS_TRITON else [])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("current", ["quantized", "full"])
def test_cache_attention_equals_fake_quant_reference(backend, bits, current):
    params, centers, width = make_params(bits)
    cache = QuantizedLayerKVCache(params, 0, current=current, backend=backend)
    outputs, _, _ = run_schedule(cache, params, centers, width)
    refs = reference_outputs(params, centers, width, current)
    tolerance = 1e-5 if backend == "torch" else 2e-3  # float32 vs float16 tensor-core operands
    for out, ref in zip(outputs, refs):
        assert out.dtype == torch.float32
        assert (out.double() - ref).norm() / ref.norm() < tolerance
    assert cache.length == sum(SCALES[:-1])


UNSTORED_CASES = [("torch", 8), ("torch", 4)] + ([("triton", 4)] if HAS_TRITON else [])


@pytest.mark.parametrize("backend,bits", UNSTORED_CASES)
def test_unstored_last_scale_has_the_numerics_of_a_stored_one(backend, bits):
    params, centers, width = make_params(bits)
    stored_total, all_total = sum(SCALES[:-1]), sum(SCALES)
    configurations = [("stored", stored_total, True), ("temporary tail", stored_total, False)]
    if backend == "torch":
        configurations += [("room in the buffer", all_total, False), ("grown buffer", None, False)]
    results = {}
    for name, reserve, last_store in configurations:
        cache = QuantizedLayerKVCache(params, 0, backend=backend)
        results[name] = run_schedule(cache, params, centers, width, last_store=last_store, reserve=reserve)[0][-1]
        assert cache.length == (all_total if last_store else stored_total)
    first = results["stored"]
    # Same codes, same function; the kernel's tiling over one or two key segments only reorders float16 sums.
    tolerance = 1e-6 if backend == "torch" else 2e-3
    for name, out in results.items():
        assert (out - first).norm() / first.norm() < tolerance, name


@pytest.mark.parametrize("bits,ratio", [(8, 2), (4, 4)])
def test_memory_is_halved_or_quartered_against_bf16(bits, ratio):
    params, centers, width = make_params(bits)
    plain = LayerKVCache(capacity=sum(SCALES[:-1]))
    quant = QuantizedLayerKVCache(params, 0, capacity=sum(SCALES[:-1]))
    for si, length in enumerate(SCALES):
        q, k, v = scale_inputs(2, length, centers, width, seed=si)
        store = si < len(SCALES) - 1
        plain.attend(q.bfloat16(), k.bfloat16(), v.bfloat16(), store=store)
        quant.attend(q, k, v, store=store)
    expected_plain = 2 * 2 * HEADS * sum(SCALES[:-1]) * DIM * 2  # K and V, batch 2, bf16
    assert plain.nbytes() == expected_plain
    assert quant.nbytes() * ratio == expected_plain
    assert quant.codes[0].dtype == torch.uint8 and quant.codes[0].shape[-1] == DIM * bits // 8
    container = KVCache([quant])
    assert container.nbytes() == quant.nbytes()
    container.reset()
    assert quant.nbytes() == 0 and quant.prefix is None


def test_prefix_set_prefix_rewind_and_shape_errors():
    params, centers, width = make_params(8)
    cache = QuantizedLayerKVCache(params, 0)
    _, keys, values = run_schedule(cache, params, centers, width)
    k_prefix, v_prefix = cache.prefix
    assert torch.allclose(k_prefix.double(), fake_quant(torch.cat(keys[:-1], 2), params, 0), atol=1e-6)
    assert torch.allclose(v_prefix.double(), fake_quant(torch.cat(values[:-1], 2), params, 1), atol=1e-6)
    replay = QuantizedLayerKVCache(params, 0)
    replay.set_prefix(torch.cat(keys[:-1], 2), torch.cat(values[:-1], 2))
    assert torch.equal(replay.codes[0], cache.codes[0]) and torch.equal(replay.codes[1], cache.codes[1])
    buffer = cache._k
    cache.rewind()
    assert cache.length == 0 and cache._k is buffer and cache.prefix is None
    q, k, v = scale_inputs(3, 2, centers, width, seed=9)
    cache.attend(q[:2], k[:2], v[:2], store=True)
    with pytest.raises(ValueError, match="batch"):
        cache.attend(q, k, v, store=True)
    with pytest.raises(ValueError, match="expected k and v"):
        cache.attend(q, k[..., :16], v[..., :16], store=True)


# ------------------------------------------------------------------------------------------------ with the model


@pytest.fixture(scope="module")
def tiny():
    from infinity.pipeline import load_pipeline

    return load_pipeline("tiny", device="cpu")


def empty_qparams(depth: int, heads: int, dim: int) -> dict:
    return {key: torch.zeros(depth, 2, heads, dim) for key in ("scale", "zero", "lo", "hi", "mse")}


def calibration_for(model) -> dict:
    """A calibration of the model's identity with all-zero quantizers (tests fill in what they need)."""
    identity = kv_model_identity(model)
    depth, heads, dim = identity["depth"], identity["num_heads"], identity["head_dim"]
    return {
        "format": CALIB_FORMAT,
        "model": identity,
        "default_dtype": "uint8",
        "current": "quantized",
        "qparams": {dtype: empty_qparams(depth, heads, dim) for dtype in ("uint8", "uint4")},
        "settings": {},
        "stats": {},
    }


def fill_minmax(data: dict, recorder: KVRecorder, heads: int, dim: int) -> dict:
    for index, which, rows in recorder.blocks():
        lo = rows.amin(dim=0).view(heads, dim)
        hi = rows.amax(dim=0).view(heads, dim)
        for dtype, bits in (("uint8", 8), ("uint4", 4)):
            scale, zero = asymmetric_qparams(lo, hi, bits)
            entry = data["qparams"][dtype]
            entry["scale"][index, which], entry["zero"][index, which] = scale, zero
            entry["lo"][index, which], entry["hi"][index, which] = lo, hi
    return data


def save(data, path):
    torch.save(data, path)
    return path


def test_attached_cache_generates_close_to_full_precision_and_detaches(tiny, tmp_path):
    model = tiny.transformer
    original = model.kv_cache_factory
    with KVRecorder(model, 2048) as recorder:
        reference = tiny.generate(["a red bicycle"], seed=3, return_logits=True)
    identity = kv_model_identity(model)
    data = fill_minmax(calibration_for(model), recorder, identity["num_heads"], identity["head_dim"])
    path = save(data, tmp_path / "calib.pt")
    errors = {}
    for dtype in ("uint8", "uint4"):
        attach_kv_qparams(model, path, dtype)
        assert model.kv_cache_factory is not original
        out = tiny.generate(["a red bicycle"], seed=3, return_logits=True)
        assert 0 < out.sample.kv_cache_bytes
        # Scale 0 reads one quantized token: its logits differ from full precision, and more at 4 bits.
        diffs = [(a - b).norm() / b.norm() for a, b in zip(out.sample.logits[:1], reference.sample.logits[:1])]
        errors[dtype] = max(diffs).item()
        assert detach_kv_qparams(model)
        assert model.kv_cache_factory is original
    assert 0 < errors["uint8"] < errors["uint4"]
    assert errors["uint8"] < 0.05
    assert not detach_kv_qparams(model)


def test_calibration_for_another_model_is_refused(tiny, tmp_path):
    model = tiny.transformer
    data = calibration_for(model)
    data["qparams"]["uint8"]["scale"].fill_(0.01)
    data["qparams"]["uint4"]["scale"].fill_(0.1)
    other_arch = {
        **data,
        "model": {**data["model"], "arch": "2b", "depth": 32, "num_heads": 16, "head_dim": 128, "embed_dim": 2048},
        "qparams": {"uint8": empty_qparams(32, 16, 128)},
    }
    other_arch["qparams"]["uint8"]["scale"].fill_(0.01)
    with pytest.raises(KVCalibrationError, match="Infinity-2b.*cannot be used with Infinity-tiny"):
        attach_kv_qparams(model, save(other_arch, tmp_path / "other_arch.pt"))
    other_weights = {**data, "model": {**data["model"], "kv_fingerprint": "0" * 64}}
    with pytest.raises(KVCalibrationError, match="other Infinity-tiny .*weights"):
        attach_kv_qparams(model, save(other_weights, tmp_path / "other_weights.pt"))
    attach_kv_qparams(model, tmp_path / "other_weights.pt", check_weights=False)
    assert detach_kv_qparams(model)
    with pytest.raises(KVCalibrationError, match="no uint4|holds no"):
        only8 = {**data, "qparams": {"uint8": data["qparams"]["uint8"]}}
        attach_kv_qparams(model, save(only8, tmp_path / "only8.pt"), "uint4")


def _corruptions(data):
    def with_entry(key, value):
        bad = {**data, "qparams": {**data["qparams"], "uint8": {**data["qparams"]["uint8"], key: value}}}
        return bad

    shape = data["qparams"]["uint8"]["scale"].shape
    nan_scale = torch.ones(shape)
    nan_scale[0, 0, 0, 0] = float("nan")
    return [
        ({**data, "format": "something-else"}, "format"),
        ({k: v for k, v in data.items() if k != "qparams"}, "qparams"),
        ({**data, "model": {k: v for k, v in data["model"].items() if k != "depth"}}, "model.depth"),
        (with_entry("scale", torch.ones(shape[0] + 1, *shape[1:])), "qparams.uint8.scale"),
        (with_entry("scale", nan_scale), "non-finite"),
        (with_entry("scale", -torch.ones(shape)), "non-positive"),
        (with_entry("zero", torch.full(shape, 0.5)), "integer"),
        (with_entry("mse", torch.ones(shape, dtype=torch.float64)), "qparams.uint8.mse"),
        ({**data, "default_dtype": "uint2"}, "default_dtype"),
        ([1, 2, 3], "top level"),
    ]


def test_corrupt_calibration_files_are_refused(tiny, tmp_path):
    data = calibration_for(tiny.transformer)
    for entry in data["qparams"].values():
        entry["scale"].fill_(0.05)
    good = save(data, tmp_path / "good.pt")
    assert load_kv_calibration(good)["format"] == CALIB_FORMAT
    for i, (bad, message) in enumerate(_corruptions(data)):
        with pytest.raises(KVCalibrationError, match=message):
            load_kv_calibration(save(bad, tmp_path / f"bad{i}.pt"))
    raw = good.read_bytes()
    (tmp_path / "truncated.pt").write_bytes(raw[: len(raw) // 2])
    (tmp_path / "garbage.pt").write_bytes(b"not a torch file at all")
    for name in ("truncated.pt", "garbage.pt"):
        with pytest.raises(KVCalibrationError, match=f"{name}: cannot be read"):
            load_kv_calibration(tmp_path / name)
    with pytest.raises(KVCalibrationError, match="not found"):
        load_kv_calibration(tmp_path / "missing.pt")
    # Arbitrary pickled objects are not loaded (weights_only).
    buffer = io.BytesIO()
    torch.save({"format": CALIB_FORMAT, "payload": io.StringIO("x")}, buffer)
    (tmp_path / "pickled.pt").write_bytes(buffer.getvalue())
    with pytest.raises(KVCalibrationError, match="cannot be read"):
        load_kv_calibration(tmp_path / "pickled.pt")


def test_recorder_samples_every_block_at_the_same_positions(tiny):
    from infinity.schedules import get_scale_schedule, tokens_per_scale

    model = tiny.transformer
    original = model.kv_cache_factory
    with KVRecorder(model, 300, seed=5) as recorder:
        tiny.generate(["a small boat"], seed=1)
    assert model.kv_cache_factory is original
    sizes = tokens_per_scale(get_scale_schedule(tiny.arch.default_pn))
    assert recorder.num_seen == 2 * sum(sizes)  # both CFG rows, every scale (the unstored last one too)
    blocks = list(recorder.blocks())
    assert len(blocks) == 2 * tiny.arch.depth
    assert all(rows.shape == (300, tiny.arch.embed_dim) for _, _, rows in blocks)
    assert len({tuple(r.indices.tolist()) for r in recorder.keys + recorder.values}) == 1
    # Keys are cos-normalised per head (unit norm), exactly as the cache receives them.
    keys = blocks[0][2].view(300, tiny.arch.num_heads, -1)
    assert torch.allclose(keys.norm(dim=-1), torch.ones(300, tiny.arch.num_heads), atol=1e-4)
    with KVRecorder(model, 300, seed=5, stored_only=True) as stored:
        tiny.generate(["a small boat"], seed=1)
    assert stored.num_seen == 2 * sum(sizes[:-1])
