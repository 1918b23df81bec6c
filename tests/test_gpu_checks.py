"""The GPU correctness checks at the real 2B/8B shapes (``bench.w4a4_gpu --parts check``, ``bench.kv_gpu_check``)
as tests: on a GPU machine ``TRITON_INTERPRET=0 python3 -m pytest -q tests/test_gpu_checks.py`` (the test setup turns
the interpreter on unless it is set); skipped elsewhere, where the CPU tests run the same kernels under the
interpreter at small shapes."""

from __future__ import annotations

import os

import pytest
import torch

cuda = pytest.mark.skipif(not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
                          reason="needs CUDA (and TRITON_INTERPRET unset)")


@cuda
@pytest.mark.parametrize("arch", ["2b", "8b"])
def test_w4a4_layers_at_every_block_shape(arch):
    from deepcompressor.bench.w4a4 import layer_shapes
    from deepcompressor.bench.w4a4_gpu import check_shape

    for i, (layer, n, k, _) in enumerate(layer_shapes(arch)):
        row = check_shape(n, k, "sint4", True, "sint4", True, device=torch.device("cuda"), seed=i)
        assert row["passed"], (arch, layer, row)


@cuda
@pytest.mark.parametrize("bits", [8, 4])
def test_kv_attention_and_cache_at_the_8b_last_scale(bits):
    from deepcompressor.bench.kv_gpu_check import check_attention, check_cache

    device = torch.device("cuda")
    for tail in ("none", "codes", "full"):
        result = check_attention(2, 28, 4096, 10521, 128, bits, tail, device, seed=bits)
        assert result["ok"], result
    assert check_cache(bits, device)["ok"]
