"""One command for the GPU: correctness of the W4A4 kernels at the real layer shapes, the kernel micro-benchmark,
and the end-to-end latency / memory runs of Infinity-2B and -8B; every part writes JSON into ``--out``.

    python -m deepcompressor.bench.w4a4_gpu --out runs/bench/w4a4                  # check, kernels, 2b, 8b
    python -m deepcompressor.bench.w4a4_gpu --out runs/bench/w4a4 --parts check kernels
    python -m deepcompressor.bench.w4a4_gpu --out runs/bench/w4a4 --parts 8b --artifacts-8b DIR --kv-calib-8b PATH

``check`` (``check.json``), at every 2B/8B block-linear shape with 2 x 64 tokens and several formats:

- the activation kernel's codes and scales equal ``deepcompressor.quant.quantize`` exactly (float32 and bfloat16
  inputs, with smoothing);
- the GEMM kernel equals the float64 product of the dequantized operands (+ branch + bias) to float32 rounding;
- ``W4A4Linear`` equals ``FakeQuantLinear`` in float32 (relative error below 1e-5) and, in bfloat16, the float64
  evaluation of its own quantized operands to bfloat16 rounding.

End-to-end parts run ``infinity_w4a4_test`` (``deepcompressor.bench.w4a4_pipeline``) at 1024x1024 and CFG 3
with ``configs/edge/memory.yaml`` stacked (``--no-edge`` leaves it out), writing ``2b.json`` / ``8b.json``, the
images and the memory chart: random-initialised weights, with synthetic artifacts written from the same random model
first (``write_synthetic_artifacts``, into ``--work-dir`` or a temporary folder) so that the quantized model is
loaded from artifacts as a user's is; or the released weights (the model YAML's environment variables) with
``--artifacts-<arch>``. Synthetic per-channel KV scales (INT8 and INT4) unless a KV calibration file is given.
Exit code 1 if a check or a part fails.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import torch

from .cli import add_list_argument

logger = logging.getLogger("deepcompressor.bench.w4a4_gpu")

PARTS = ("check", "kernels", "2b", "8b")
CHECK_TOKENS = 128
FP32_TOL = 1e-5
BF16_TOL = 2**-7


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m deepcompressor.bench.w4a4_gpu", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/bench/w4a4", help="Folder of the JSON results")
    add_list_argument(parser, "--sections", "--parts", choices=PARTS, default=list(PARTS), dest="parts",
                      help="what to run")
    for arch in ("2b", "8b"):
        parser.add_argument(f"--artifacts-{arch}", default=None, help=f"PTQ artifacts of the {arch} model")
        parser.add_argument(f"--kv-calib-{arch}", default=None, help=f"KV calibration file of the {arch} model")
    parser.add_argument("--edge", action=argparse.BooleanOptionalAction, default=True,
                        help="Stack configs/edge/memory.yaml (T5 released, tiled VAE, bf16 non-block linears)")
    parser.add_argument("--work-dir", default=None,
                        help="Where the synthetic artifacts of random-weight runs are written (default: a temp dir)")
    parser.add_argument("--memory-breakdown", action="store_true",
                        help="End-to-end parts: what was alive at each variant's peak (infinity_w4a4_test flag)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    return parser.parse_args(argv)


# ------------------------------------------------------------------------------------------------ check


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def check_shape(n: int, k: int, wfmt: str, wsym: bool, afmt: str, asym: bool, device: torch.device, seed: int,
                tokens: int = CHECK_TOKENS) -> dict:
    """The checks of one ``[n, k]`` layer with ``tokens`` random tokens (see the module docstring)."""
    from ..config.schema import ActivationQuantConfig, WeightQuantConfig
    from ..kernels.w4a4 import quantize_activations_torch, quantize_activations_triton
    from ..nn.fake_linear import FakeQuantLinear
    from ..nn.w4a4_linear import W4A4Linear
    from ..quant import quantize

    gen = torch.Generator(device=device).manual_seed(seed)
    wgts = WeightQuantConfig(dtype=wfmt, group_size=64, symmetric=wsym)
    ipts = ActivationQuantConfig(dtype=afmt, group_size=64, symmetric=asym)
    rank = 32
    w = torch.randn(n, k, device=device, generator=gen) * k**-0.5
    s = torch.rand(k, device=device, generator=gen) + 0.5
    l1 = (torch.randn(n, rank, device=device, generator=gen) * 0.05).bfloat16()
    l2 = (torch.randn(rank, k, device=device, generator=gen) * 0.05).bfloat16()
    bias = torch.randn(n, device=device, generator=gen) * 0.1
    fake = FakeQuantLinear(k, n, qweight=quantize(w * s - l1.float() @ l2.float(), wgts), bias=bias,
                           smooth_scale=s, lowrank_l1=l1, lowrank_l2=l2, wgts=wgts, ipts=ipts, name=f"{n}x{k}")
    real = W4A4Linear.from_fake(fake, backend="triton")
    x = torch.randn(tokens, k, device=device, generator=gen) * (torch.rand(k, device=device, generator=gen) * 4)
    row = {"N": n, "K": k, "weights": f"{wfmt}{'' if wsym else ' asym'}", "inputs": f"{afmt}{'' if asym else ' asym'}"}
    ok = True
    for dtype in (torch.float32, torch.bfloat16):
        tag = str(dtype).removeprefix("torch.")
        xd = x.to(dtype)
        smooth, l2t = real._cast("smooth_scale", dtype), real._cast("lowrank_l2t", dtype)
        got = quantize_activations_triton(xd, real.ispec, smooth=smooth, l2t=l2t, block_m=32)
        ref = quantize_activations_torch(xd, real.ispec, smooth=smooth, l2t=l2t)
        codes_equal = float((got.codes == ref.codes).float().mean())
        scales_equal = float((got.scales == ref.scales).float().mean())
        y = real(xd)
        a64 = (ref.codes.double().reshape(tokens, k // 64, 64) * ref.scales.double().t().unsqueeze(-1))
        y64 = a64.reshape(tokens, k) @ fake.qweight.dequantize(torch.float64).t()
        y64 = y64 + ref.down.double() @ real._cast("lowrank_l1t", dtype).double() + bias.to(dtype).double()
        err64 = _rel(y, y64)
        err_fake = _rel(y, fake(xd))
        tol = FP32_TOL if dtype == torch.float32 else BF16_TOL
        passed = codes_equal == 1.0 and scales_equal == 1.0 and err64 < tol
        if dtype == torch.float32:
            passed = passed and err_fake < FP32_TOL
        row[tag] = {"codes_equal": codes_equal, "scales_equal": scales_equal, "rel_err_vs_float64": err64,
                    "rel_err_vs_fake_quant": err_fake, "passed": passed}
        ok = ok and passed
    row["mixed"] = _check_mixed(fake, real, x, tokens)
    ok = ok and all(r["passed"] for r in row["mixed"].values())
    row["passed"] = ok
    return row


def _check_mixed(fake, real, x: torch.Tensor, tokens: int) -> dict:
    """The mixed-input backends in bfloat16: their activation operand equals ``fake_quantize`` bit for bit, the
    layer equals the float64 product of ``FakeQuantLinear``'s own bfloat16 operands to bfloat16 rounding, and
    repeated calls give identical outputs (fixed reduction order)."""
    from ..kernels.w4a4_mixed import fake_quant_activations_torch, fake_quant_activations_triton
    from ..nn.w4a4_linear import W4A4Linear

    dtype = torch.bfloat16
    k = x.shape[1]
    xd = x.to(dtype)
    smooth, l2t = real._cast("smooth_scale", dtype), real._cast("lowrank_l2t", dtype)
    xq_ref, _ = fake_quant_activations_torch(xd, real.ispec, smooth=smooth, l2t=l2t)
    xs = xd / smooth
    exact = (xq_ref.double() @ fake.main_weight(dtype).double().t()
             + (xs.double() @ l2t.double()) @ real._cast("lowrank_l1t", dtype).double()
             + fake.bias.to(dtype).double())
    from ..kernels.w4a4_dispatch import forward_dequant

    out = {}
    for backend, rows in (("gemv", min(64, tokens)), ("tiled", tokens), ("dequant", tokens),
                          ("dequant_separate_lowrank", tokens)):
        layer = W4A4Linear.from_fake(fake, backend=backend.split("_")[0])
        if backend == "dequant_separate_lowrank":
            ops = layer.operands(dtype)
            call = lambda xr, ops=ops: forward_dequant(xr, ops, {"lowrank": "separate"})
        else:
            call = layer
        xq = torch.empty(xd.shape[0], k + l2t.shape[1], dtype=dtype, device=xd.device)
        fake_quant_activations_triton(xd, real.ispec, xq, smooth=smooth, l2t=l2t)
        y1, y2 = call(xd[:rows]), call(xd[:rows])
        err = _rel(y1, exact[:rows])
        xq_equal = bool(torch.equal(xq[:, :k], xq_ref))
        deterministic = bool(torch.equal(y1, y2))
        out[backend] = {"rows": rows, "xq_equal": xq_equal, "rel_err_vs_float64": err, "deterministic": deterministic,
                        "rel_err_vs_fake_quant": _rel(y1, fake(xd[:rows])),
                        "passed": xq_equal and deterministic and err < BF16_TOL}
    return out


def run_check(out: Path) -> bool:
    from ..utils.files import write_json
    from .w4a4 import layer_shapes

    device = torch.device("cuda")
    formats = [("sint4", True, "sint4", True), ("uint4", False, "uint4", False)]
    rows = []
    for arch in ("2b", "8b"):
        for i, (layer, n, k, _) in enumerate(layer_shapes(arch)):
            for j, fmt in enumerate(formats):
                if j and i:  # the asymmetric formats once per arch
                    continue
                row = check_shape(n, k, *fmt, device=device, seed=10 * i + j)
                row.update(arch=arch, layer=layer)
                rows.append(row)
                logger.info("check %s %s %s: %s", arch, layer, fmt, "ok" if row["passed"] else f"FAILED {row}")
                # rewritten after every shape: a run cut short keeps what it checked
                write_json(out / "check.json", {"device": torch.cuda.get_device_name(device), "complete": False,
                                                "passed": all(r["passed"] for r in rows), "rows": rows})
    passed = all(r["passed"] for r in rows)
    write_json(out / "check.json", {"device": torch.cuda.get_device_name(device), "complete": True, "passed": passed,
                                    "rows": rows})
    print(f"check: {'passed' if passed else 'FAILED'} ({sum(r['passed'] for r in rows)}/{len(rows)} shapes)")
    return passed


# ------------------------------------------------------------------------------------------------ parts


def _pipeline_argv(arch: str, args, out: Path, artifacts: str | None) -> list[str]:
    """The ``infinity_w4a4_test`` command of one end-to-end part: the model YAML, the edge memory recipe, and
    either the released files (environment variables of the model YAML) with ``--artifacts-<arch>``, or random
    weights with the synthetic artifacts written from the same random model."""
    argv = [f"configs/models/infinity-{arch}.yaml", "configs/svdquant/int4.yaml"]
    if args.edge:
        argv.append("configs/edge/memory.yaml")
    argv += ["--compile", "--warmup", str(args.warmup), "--repeats", str(args.repeats), "--json",
             str(out / f"{arch}.json"), "--base-path", artifacts]
    if not getattr(args, f"artifacts_{arch}"):
        argv.append("--pipeline-random-init")
    kv_calib = getattr(args, f"kv_calib_{arch}")
    argv += ["--kv-calib", kv_calib] if kv_calib else ["--kv-synthetic"]
    if args.memory_breakdown:
        argv.append("--memory-breakdown")
    return argv


def _synthetic_artifacts(arch: str, args, workdir: Path) -> str:
    """Write synthetic artifacts of the random-weight model (the same seed the benchmark builds) and free it."""
    from ..app.diffusion.synthetic_artifacts import write_synthetic_artifacts
    from ..config import load_config

    cfg = load_config([f"configs/models/infinity-{arch}.yaml", "configs/svdquant/int4.yaml"],
                      {"pipeline.random_init": True})
    directory = workdir / f"synthetic_{arch}"
    start = time.perf_counter()
    write_synthetic_artifacts(cfg, directory)
    logger.info("synthetic %s artifacts written in %.1f s", arch, time.perf_counter() - start)
    gc.collect()
    torch.cuda.empty_cache()
    return str(directory)


def main(argv: list[str] | None = None) -> int:
    from . import w4a4, w4a4_pipeline

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("w4a4_gpu: needs a CUDA device (use deepcompressor.bench.w4a4 --device cpu for a CPU smoke run)",
              file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    status = {}
    if "check" in args.parts:
        status["check"] = run_check(out)
    if "kernels" in args.parts:
        status["kernels"] = w4a4.main(["--json", str(out / "kernels.json")]) == 0
    for arch in ("2b", "8b"):
        if arch in args.parts:
            gc.collect()
            torch.cuda.empty_cache()
            with tempfile.TemporaryDirectory(dir=args.work_dir) as workdir:
                artifacts = getattr(args, f"artifacts_{arch}") or _synthetic_artifacts(arch, args, Path(workdir))
                status[arch] = w4a4_pipeline.main(_pipeline_argv(arch, args, out, artifacts)) == 0
    print(json.dumps(status))
    return 0 if all(status.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
