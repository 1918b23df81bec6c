"""CUDA correctness check of the KV-cache kernels at real sizes (the CPU tests run them under the interpreter).

    python -m deepcompressor.bench.kv_gpu_check [--json PATH]

* ``quantize_kv`` (Triton) gives exactly the codes of the PyTorch quantizer (bf16 input, 8 and 4 bits);
* ``quantized_kv_attention`` against float64 attention over the dequantized codes, for the 8B last-scale shape
  (B 2, H 28, 4096 queries, 10521 keys) and odd small shapes, every tail kind; fresh random inputs, poisoned
  outputs (NaN) must be overwritten;
* a ``QuantizedLayerKVCache`` on CUDA through the 1M schedule (13 scales, last one not stored) against the same
  cache with the PyTorch backend.

Exits 1 if any check fails.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from ..calib.kv import asymmetric_qparams
from ..kernels import kv_attention as kva

TOLERANCE = 5e-3  # float16 operands with float32 accumulation, bf16 output


def _inputs(batch, heads, queries, keys, dim, device, seed):
    gen = torch.Generator(device=device).manual_seed(seed)
    q = F.normalize(torch.randn(batch, heads, queries, dim, generator=gen, device=device), dim=-1) * 30
    offset = torch.randn(heads, 1, dim, generator=gen, device=device)
    k = F.normalize(torch.randn(batch, heads, keys, dim, generator=gen, device=device) + offset, dim=-1)
    v = torch.randn(batch, heads, keys, dim, generator=gen, device=device) * 2 + offset
    return q.bfloat16(), k.bfloat16(), v.bfloat16()


def _qparams(x, bits, shrink):
    lo, hi = x.float().amin(dim=(0, 2)) * shrink, x.float().amax(dim=(0, 2)) * shrink
    return asymmetric_qparams(lo, hi, bits)


def check_attention(batch, heads, queries, keys, dim, bits, tail, device, seed) -> dict:
    q, k, v = _inputs(batch, heads, queries, keys, dim, device, seed)
    ks, kz = _qparams(k, bits, 0.95)
    vs, vz = _qparams(v, bits, 0.95)
    kc, vc = kva.quantize_kv(k, ks, kz, bits), kva.quantize_kv(v, vs, vz, bits)
    codes_equal = torch.equal(kc, kva.quantize_kv(k, ks, kz, bits, backend="torch"))
    k_ref = kva.dequantize_kv(kc, ks, kz, bits, torch.float64)
    v_ref = kva.dequantize_kv(vc, vs, vz, bits, torch.float64)
    split = keys - max(1, keys // 3) if tail != "none" else keys
    extra = {}
    if tail == "codes":
        extra = {"k_tail": kc[:, :, split:].contiguous(), "v_tail": vc[:, :, split:].contiguous(), "tail_codes": True}
    elif tail == "full":
        extra = {"k_tail": k[:, :, split:].contiguous(), "v_tail": v[:, :, split:].contiguous(), "tail_codes": False}
        k_ref[:, :, split:] = k[:, :, split:].double()
        v_ref[:, :, split:] = v[:, :, split:].double()
    # Poison the cache past the used tokens and let the kernel allocate its output (checked for NaN below).
    k_buf = torch.full((batch, heads, keys + 64, kc.shape[-1]), 0xFF, dtype=torch.uint8, device=device)
    v_buf = torch.full_like(k_buf, 0xFF)
    k_buf[:, :, :split], v_buf[:, :, :split] = kc[:, :, :split], vc[:, :, :split]
    out = kva.quantized_kv_attention(q, k_buf, v_buf, split, ks, kz, vs, vz, bits, **extra)
    torch.cuda.synchronize(device)
    ref = F.scaled_dot_product_attention(q.double(), k_ref, v_ref, scale=1.0)
    rel = ((out.double() - ref).norm() / ref.norm()).item()
    finite = bool(torch.isfinite(out).all())
    return {
        "shape": [batch, heads, queries, keys, dim],
        "bits": bits,
        "tail": tail,
        "rel_err": rel,
        "codes_equal": codes_equal,
        "finite": finite,
        "ok": codes_equal and finite and rel < TOLERANCE,
    }


def check_cache(bits: int, device: torch.device) -> dict:
    from infinity.schedules import get_scale_schedule, tokens_per_scale

    from ..nn.kv_cache import KVQuantParams, QuantizedLayerKVCache

    heads, dim = 28, 128
    sizes = tokens_per_scale(get_scale_schedule("1M"))
    gen = torch.Generator().manual_seed(bits)
    center = torch.randn(1, 2, heads, dim, generator=gen) * 0.3
    width = 0.3 + torch.rand(1, 2, heads, dim, generator=gen)
    scale, zero = asymmetric_qparams(center - width, center + width, bits)
    params = KVQuantParams("uint8" if bits == 8 else "uint4", scale, zero)
    fused = QuantizedLayerKVCache(params, 0, capacity=sum(sizes[:-1]), backend="auto")
    plain = QuantizedLayerKVCache(params, 0, capacity=sum(sizes[:-1]), backend="torch")
    worst = 0.0
    for si, size in enumerate(sizes):
        q, k, v = _inputs(2, heads, size, size, dim, device, seed=100 + si)
        store = si < len(sizes) - 1
        a = fused.attend(q, k, v, store=store)
        b = plain.attend(q, k, v, store=store)
        worst = max(worst, ((a.double() - b.double()).norm() / b.double().norm()).item())
    same_codes = torch.equal(fused.codes[0], plain.codes[0]) and torch.equal(fused.codes[1], plain.codes[1])
    return {"bits": bits, "worst_rel_err": worst, "same_codes": same_codes, "nbytes": fused.nbytes(),
            "ok": same_codes and worst < TOLERANCE}  # fmt: skip


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="bench.kv_gpu_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("kv_gpu_check: no CUDA device", file=sys.stderr)
        return 1
    device = torch.device("cuda")
    results = {"attention": [], "cache": []}
    shapes = [(2, 28, 4096, 10521, 128), (2, 16, 1024, 2521, 128), (1, 3, 1, 1, 64), (2, 5, 37, 70, 64),
              (1, 2, 129, 65, 16)]  # fmt: skip
    for shape in shapes:
        for bits in (8, 4):
            for tail in ("none", "codes", "full"):
                if shape[3] == 1 and tail != "none":
                    continue
                r = check_attention(*shape, bits, tail, device, seed=len(results["attention"]))
                results["attention"].append(r)
                print(f"attention {shape} int{bits} tail={tail}: rel err {r['rel_err']:.2e} "
                      f"codes_equal={r['codes_equal']} finite={r['finite']} {'OK' if r['ok'] else 'FAIL'}")  # fmt: skip
    for bits in (8, 4):
        r = check_cache(bits, device)
        results["cache"].append(r)
        print(f"cache int{bits} over the 1M schedule: worst rel err {r['worst_rel_err']:.2e} "
              f"same_codes={r['same_codes']} {'OK' if r['ok'] else 'FAIL'}")  # fmt: skip
    ok = all(r["ok"] for group in results.values() for r in group)
    results["ok"] = ok
    if args.json:
        from ..utils.files import write_json

        write_json(args.json, results)
    print("ALL OK" if ok else "FAILURES")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
