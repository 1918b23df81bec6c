"""Backends of the quantized-KV attention: the dequantization kernel (bit-exact against ``dequantize_kv``), the
``workspace`` backend against ``reference_kv_attention``, the shared workspace (reused, grown only when needed,
never during CUDA-graph capture), and the choice logic (names, ``auto``, the cache of measured choices)."""

import json

import pytest
import torch
import torch.nn.functional as F

from deepcompressor.calib.kv import asymmetric_qparams, quantize_asymmetric
from deepcompressor.kernels import kv_attention as kva
from deepcompressor.nn.kv_cache import KVQuantParams, QuantizedKVCacheFactory, QuantizedLayerKVCache
from deepcompressor.quant import pack_int4

pytestmark = pytest.mark.skipif(not kva.HAS_TRITON, reason="triton is not installed")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def random_kv(batch, heads, length, dim, seed):
    g = torch.Generator().manual_seed(seed)
    k = F.normalize(torch.randn(batch, heads, length, dim, generator=g) + 2 * torch.randn(heads, 1, dim, generator=g),
                    dim=-1)  # fmt: skip
    v = torch.randn(batch, heads, length, dim, generator=g) * (0.5 + torch.rand(heads, 1, dim, generator=g))
    return k, v + torch.randn(heads, 1, dim, generator=g)


def qparams_of(x, bits, shrink=0.9):
    return asymmetric_qparams(x.amin(dim=(0, 2)) * shrink, x.amax(dim=(0, 2)) * shrink, bits)


def codes_of(x, scale, zero, bits):
    codes = quantize_asymmetric(x, scale[:, None, :], zero[:, None, :], bits)
    return pack_int4(codes, signed=False) if bits == 4 else codes


def operands(bits, tail, batch=2, heads=3, cached=45, new=19, dim=32, seed=0):
    """Cache codes in a larger buffer holding garbage past ``cached``, and the tail of the given kind."""
    k, v = random_kv(batch, heads, cached + new, dim, seed)
    ks, kz = qparams_of(k, bits)
    vs, vz = qparams_of(v, bits)
    kc, vc = codes_of(k, ks, kz, bits), codes_of(v, vs, vz, bits)
    g = torch.Generator().manual_seed(seed + 100)
    k_buf = torch.randint(0, 256, (batch, heads, cached + new + 13, kc.shape[-1]), dtype=torch.uint8, generator=g)
    v_buf = torch.randint(0, 256, k_buf.shape, dtype=torch.uint8, generator=g)
    extra = {}
    if tail == "none":
        k_buf[:, :, : cached + new], v_buf[:, :, : cached + new] = kc, vc
        num_cached = cached + new
    else:
        k_buf[:, :, :cached], v_buf[:, :, :cached] = kc[:, :, :cached], vc[:, :, :cached]
        num_cached = cached
        if tail == "codes":
            extra = {"k_tail": kc[:, :, cached:].contiguous(), "v_tail": vc[:, :, cached:].contiguous(),
                     "tail_codes": True}  # fmt: skip
        else:
            extra = {"k_tail": k[:, :, cached:].contiguous(), "v_tail": v[:, :, cached:].contiguous(),
                     "tail_codes": False}  # fmt: skip
    return (k_buf, v_buf, num_cached, ks, kz, vs, vz, bits), extra


def expected_kv(args, extra, dtype):
    k_buf, v_buf, num_cached, ks, kz, vs, vz, bits = args
    keys = [kva.dequantize_kv(k_buf[:, :, :num_cached], ks, kz, bits, dtype)]
    values = [kva.dequantize_kv(v_buf[:, :, :num_cached], vs, vz, bits, dtype)]
    if extra.get("tail_codes"):
        keys.append(kva.dequantize_kv(extra["k_tail"], ks, kz, bits, dtype))
        values.append(kva.dequantize_kv(extra["v_tail"], vs, vz, bits, dtype))
    elif extra:
        keys.append(extra["k_tail"].to(dtype))
        values.append(extra["v_tail"].to(dtype))
    return torch.cat(keys, dim=2), torch.cat(values, dim=2)


def queries(batch, heads, num, dim, dtype, seed=7):
    g = torch.Generator().manual_seed(seed)
    return (F.normalize(torch.randn(batch, heads, num, dim, generator=g), dim=-1) * 15).to(dtype)


# ------------------------------------------------------------------------------------------------ dequantization


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("tail", ["none", "codes", "full"])
def test_dequant_kernel_is_bit_exact_against_dequantize_kv(bits, tail):
    args, extra = operands(bits, tail)
    for dtype in DTYPES:
        expected = expected_kv(args, extra, dtype)
        got = kva.dequantize_kv_segments(*args, **extra, dtype=dtype, backend="triton")
        plain = kva.dequantize_kv_segments(*args, **extra, dtype=dtype, backend="torch")
        for g, p, e in zip(got, plain, expected):
            assert g.dtype == dtype and g.shape == e.shape
            assert torch.equal(g, e), dtype
            assert torch.equal(p, e), dtype


@pytest.mark.parametrize("bits", [8, 4])
def test_dequant_kernel_writes_only_its_rows_of_a_strided_view(bits):
    # Odd lengths, a bf16 full-precision tail rounded into float16, destination a strided slice of a larger buffer.
    args, extra = operands(bits, "full", batch=1, heads=2, cached=7, new=3, dim=16, seed=3)
    extra = {**extra, "k_tail": extra["k_tail"].bfloat16(), "v_tail": extra["v_tail"].bfloat16()}
    big = torch.full((2, 1, 2, 17, 16), float("nan"), dtype=torch.float16)
    out_k, out_v = big[0, :, :, 2:12], big[1, :, :, 2:12]
    kva.dequantize_kv_segments(*args, **extra, out_k=out_k, out_v=out_v, backend="triton")
    expected = expected_kv(args, extra, torch.float16)
    assert torch.equal(out_k, expected[0]) and torch.equal(out_v, expected[1])
    assert big[:, :, :, :2].isnan().all() and big[:, :, :, 12:].isnan().all()


def test_dequant_refuses_bad_operands():
    args, extra = operands(8, "codes", batch=1, heads=2, cached=5, new=3, dim=16)
    with pytest.raises(ValueError, match="out_k"):
        kva.dequantize_kv_segments(*args, **extra, out_k=torch.empty(1, 2, 7, 16), out_v=torch.empty(1, 2, 7, 16))
    with pytest.raises(ValueError, match="uint8"):
        kva.dequantize_kv_segments(*args, k_tail=extra["k_tail"].float(), v_tail=extra["v_tail"].float(),
                                   tail_codes=True)  # fmt: skip


# ------------------------------------------------------------------------------------------------ workspace backend


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("tail", ["none", "codes", "full"])
def test_workspace_backend_matches_reference(bits, tail):
    args, extra = operands(bits, tail)
    k_buf = args[0]
    for dtype, tolerance in ((torch.float32, 1e-5), (torch.bfloat16, 1e-2)):
        q = queries(k_buf.shape[0], k_buf.shape[1], 21, 32, dtype)
        workspace = kva.KVWorkspace()
        got = kva.workspace_kv_attention(q, *args, **extra, workspace=workspace)
        ref = kva.reference_kv_attention(q, *args, **extra)
        assert got.dtype == dtype and got.shape == q.shape
        assert (got.double() - ref.double()).norm() / ref.double().norm() < tolerance
        # The workspace holds exactly the values attention saw.
        expected = expected_kv(args, extra, dtype)
        keys, values = workspace.kv(q.device, dtype, *q.shape[:2], expected[0].shape[2], 32)
        assert torch.equal(keys, expected[0]) and torch.equal(values, expected[1])
    # float64 against float64 attention over the dequantized values.
    q = queries(k_buf.shape[0], k_buf.shape[1], 5, 32, torch.float64)
    keys, values = expected_kv(args, extra, torch.float64)
    got = kva.workspace_kv_attention(q, *args, **extra, workspace=kva.KVWorkspace())
    assert torch.allclose(got, F.scaled_dot_product_attention(q, keys, values, scale=1.0), rtol=1e-10, atol=1e-12)


def test_workspace_is_shared_reused_and_grown_only_when_needed():
    workspace = kva.KVWorkspace()
    args, _ = operands(8, "none", batch=2, heads=2, cached=30, new=10, dim=16)
    k_buf, v_buf, num_cached = args[:3]
    q = queries(2, 2, 6, 16, torch.float32)
    kva.workspace_kv_attention(q, k_buf, v_buf, 20, *args[3:], workspace=workspace)
    assert workspace.allocations == 1
    first = workspace.buffers[("cpu", None, torch.float32)]
    assert workspace.nbytes() == 2 * 2 * 2 * 20 * 16 * 4
    # Shorter and equal calls (other layers, later calls) reuse the same memory.
    for length in (20, 5, 13, 20):
        kva.workspace_kv_attention(q, k_buf, v_buf, length, *args[3:], workspace=workspace)
        assert workspace.buffers[("cpu", None, torch.float32)].data_ptr() == first.data_ptr()
    assert workspace.allocations == 1
    # A longer call grows it once, to exactly what it needs (one layer's K/V).
    kva.workspace_kv_attention(q, k_buf, v_buf, num_cached, *args[3:], workspace=workspace)
    assert workspace.allocations == 2 and workspace.nbytes() == 2 * 2 * 2 * num_cached * 16 * 4
    kva.workspace_kv_attention(q, k_buf, v_buf, 35, *args[3:], workspace=workspace)
    assert workspace.allocations == 2
    # Every layer of a cache shares it.
    params = KVQuantParams("uint8", torch.stack((args[3], args[5]))[None].expand(3, 2, 2, 16).contiguous(),
                           torch.stack((args[4], args[6]))[None].expand(3, 2, 2, 16).contiguous())  # fmt: skip
    layers = [QuantizedLayerKVCache(params, i, backend="workspace", workspace=workspace) for i in range(3)]
    k, v = random_kv(2, 2, 12, 16, seed=5)
    for layer in layers:
        layer.attend(q, k, v, store=True)
    assert workspace.allocations == 2 and len(workspace.buffers) == 1
    assert all(layer.workspace is workspace for layer in layers)
    assert QuantizedLayerKVCache(params, 0).workspace is kva.kv_workspace


def test_workspace_never_grows_during_capture(monkeypatch):
    workspace = kva.KVWorkspace()
    args, extra = operands(8, "codes", batch=1, heads=2, cached=20, new=6, dim=16)
    q = queries(1, 2, 4, 16, torch.float32)
    assert workspace.reserve_kv(q.device, torch.float32, 1, 2, 10, 16)
    monkeypatch.setattr(kva, "_capturing", lambda device: True)
    assert workspace.kv(q.device, torch.float32, 1, 2, 26, 16) is None
    assert workspace.allocations == 1
    with pytest.raises(RuntimeError, match="CUDA graph"):
        kva.workspace_kv_attention(q, *args, **extra, workspace=workspace)
    # The dispatcher falls back to the fused kernel (no allocation), and uses the workspace when it fits.
    out = kva.kv_attention(q, *args, **extra, backend="workspace", workspace=workspace)
    assert torch.allclose(out, kva.quantized_kv_attention(q, *args, **extra))
    small = kva.kv_attention(q, args[0], args[1], 8, *args[3:], backend="workspace", workspace=workspace)
    assert torch.allclose(small, kva.reference_kv_attention(q, args[0], args[1], 8, *args[3:]), rtol=1e-5, atol=1e-6)
    assert workspace.allocations == 1
    # A buffer used by a captured graph stays alive when a larger one replaces it later.
    monkeypatch.setattr(kva, "_capturing", lambda device: False)
    before = workspace.nbytes()
    assert workspace.reserve_kv(q.device, torch.float32, 1, 2, 40, 16)
    assert workspace.nbytes() == before + 2 * 2 * 40 * 16 * 4


# ------------------------------------------------------------------------------------------------ the choice


def test_backend_names():
    assert kva.ATTENTION_BACKENDS == ("auto", "fused", "workspace", "torch")
    assert kva.resolve_attention_backend("triton") == "fused"
    for name in kva.ATTENTION_BACKENDS:
        assert kva.resolve_attention_backend(name) == name
    with pytest.raises(ValueError, match="auto, fused, workspace, torch"):
        kva.resolve_attention_backend("flash")
    params = KVQuantParams("uint8", torch.ones(1, 2, 2, 16), torch.zeros(1, 2, 2, 16))
    with pytest.raises(ValueError, match="auto, fused, workspace, torch"):
        QuantizedLayerKVCache(params, 0, backend="cudnn")
    with pytest.raises(ValueError, match="auto, fused, workspace, torch"):
        QuantizedKVCacheFactory(params, backend="bogus")
    with pytest.raises(ValueError, match="auto, fused, workspace, torch"):
        kva.kv_attention(torch.ones(1, 2, 1, 16), *operands(8, "none", 1, 2, 4, 0, 16)[0], backend="sdpa")


@pytest.mark.parametrize("backend", ["fused", "workspace", "torch", "auto", "triton"])
def test_explicit_backends_compute_the_same_attention(backend):
    args, extra = operands(4, "full", batch=1, heads=2, cached=33, new=9, dim=32)
    q = queries(1, 2, 17, 32, torch.float32)
    ref = kva.reference_kv_attention(q, *args, **extra)
    out = kva.kv_attention(q, *args, **extra, backend=backend, workspace=kva.KVWorkspace())
    tolerance = 2e-3 if kva.resolve_attention_backend(backend) == "fused" else 1e-5  # float16 tensor-core operands
    assert (out - ref).norm() / ref.norm() < tolerance


def test_auto_on_cpu_is_the_torch_path_without_measuring(monkeypatch):
    monkeypatch.setattr(kva, "_time_candidates", lambda *a, **k: pytest.fail("measured on the CPU"))
    args, extra = operands(8, "codes", batch=1, heads=2, cached=10, new=3, dim=16)
    q = queries(1, 2, 4, 16, torch.float32)
    assert kva.choose_attention_backend(q, *args, **extra) == {"backend": "torch", "source": "not CUDA"}
    assert torch.equal(kva.kv_attention(q, *args, **extra), kva.reference_kv_attention(q, *args, **extra))


def test_choices_are_measured_once_cached_in_memory_and_on_disk(monkeypatch, tmp_path):
    monkeypatch.setenv("VAR_COMPRESSOR_CACHE", str(tmp_path))
    monkeypatch.delenv("VAR_COMPRESSOR_KV_TUNE", raising=False)
    monkeypatch.setattr(kva, "attention_choices", kva.attention_choice_cache())
    calls = []

    def measure():
        calls.append(1)
        return {"fused": 2.0, "workspace": 1.5}

    def rule():
        return {"backend": "fused", "source": "rule"}

    # While capturing nothing is measured or stored.
    assert kva.cached_or_measured("gpu|a", measure, rule, capturing=True) == rule()
    monkeypatch.setenv("VAR_COMPRESSOR_KV_TUNE", "0")
    assert kva.cached_or_measured("gpu|a", measure, rule, capturing=False) == rule()
    monkeypatch.delenv("VAR_COMPRESSOR_KV_TUNE")
    assert calls == []
    choice = kva.cached_or_measured("gpu|a", measure, rule, capturing=False)
    assert choice["backend"] == "workspace" and choice["source"] == "measured" and choice["ms"] == 1.5
    assert kva.cached_or_measured("gpu|a", measure, rule, capturing=False) == choice
    assert kva.cached_or_measured("gpu|a", measure, rule, capturing=True) == choice  # cached: used during capture
    assert calls == [1]
    data = json.loads((tmp_path / "kv_attention_dispatch.json").read_text())
    assert data["choices"]["gpu|a"]["backend"] == "workspace"
    # A new process (empty memory) reads the disk; remeasure replaces the entry.
    kva.attention_choices.clear_memory()
    assert kva.cached_or_measured("gpu|a", measure, rule, capturing=False)["backend"] == "workspace"
    assert calls == [1]
    faster_fused = kva.cached_or_measured("gpu|a", lambda: {"fused": 1.0, "workspace": 1.5}, rule, False,
                                          remeasure=True)  # fmt: skip
    assert faster_fused["backend"] == "fused"
    assert kva.attention_choices.get("gpu|a")["backend"] == "fused"

    # A failed measurement takes the rule and stores nothing.
    def broken():
        raise RuntimeError("compiler says no")

    assert kva.cached_or_measured("gpu|b", broken, rule, capturing=False) == rule()
    assert kva.attention_choices.get("gpu|b") is None


# ------------------------------------------------------------------------------------------------ in the cache


@pytest.mark.parametrize("current", ["quantized", "full"])
def test_cache_with_workspace_backend_equals_torch_backend(current):
    g = torch.Generator().manual_seed(1)
    center = 0.3 * torch.randn(1, 2, 2, 32, generator=g)
    width = 0.2 + torch.rand(1, 2, 2, 32, generator=g)
    scale, zero = asymmetric_qparams(center - width, center + width, 4)
    params = KVQuantParams("uint4", scale, zero)
    workspace = kva.KVWorkspace()
    ws = QuantizedLayerKVCache(params, 0, capacity=21, current=current, backend="workspace", workspace=workspace)
    plain = QuantizedLayerKVCache(params, 0, capacity=21, current=current, backend="torch")
    for si, length in enumerate([1, 4, 16, 20]):
        q = queries(2, 2, length, 32, torch.float32, seed=si)
        k, v = random_kv(2, 2, length, 32, seed=si)
        store = si < 3
        a, b = ws.attend(q, k, v, store=store), plain.attend(q, k, v, store=store)
        assert (a - b).norm() / b.norm() < 1e-5
    assert torch.equal(ws.codes[0], plain.codes[0])
    assert workspace.nbytes() == 2 * 2 * 2 * 41 * 32 * 4  # one layer's K/V at the longest call (float32 here)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_capture_replays_workspace_and_auto_backends():  # pragma: no cover - GPU only
    device = torch.device("cuda")
    sizes = [1, 4, 16, 64, 256, 1024]
    g = torch.Generator().manual_seed(0)
    center, width = 0.3 * torch.randn(2, 2, 4, 128, generator=g), 0.3 + torch.rand(2, 2, 4, 128, generator=g)
    params = KVQuantParams("uint8", *asymmetric_qparams(center - width, center + width, 8))
    inputs = [[torch.randn(2, 4, n, 128, generator=g).to(device, torch.bfloat16) for _ in range(3)] for n in sizes]
    for backend in ("workspace", "auto"):
        kva.kv_workspace.release()
        layers = [QuantizedLayerKVCache(params, i, capacity=sum(sizes[:-1]), backend=backend) for i in range(2)]

        def step(si, layers=layers):
            return [layer.attend(*inputs[si], store=si < len(sizes) - 1) for layer in layers]

        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            eager = [[o.clone() for o in step(si)] for si in range(len(sizes))]
        torch.cuda.current_stream(device).wait_stream(stream)
        for layer in layers:
            layer.rewind()
        allocations = kva.kv_workspace.allocations
        graphs, outputs, pool = [], [], torch.cuda.graph_pool_handle()
        for si in range(len(sizes)):
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                outputs.append(step(si))
            graphs.append(graph)
        assert kva.kv_workspace.allocations == allocations  # nothing allocated during capture
        for graph in graphs:
            graph.replay()
        torch.cuda.synchronize(device)
        for si in range(len(sizes)):
            for a, b in zip(outputs[si], eager[si]):
                assert (a.float() - b.float()).norm() / b.float().norm() < 1e-2, (backend, si)
