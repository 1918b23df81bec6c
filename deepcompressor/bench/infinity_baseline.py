"""Full-precision latency and memory baseline of the Infinity text-to-image pipeline.

Random-initialised weights of the real sizes (no files needed): a flan-t5-xl-sized T5 encoder, the transformer
(blocks in bf16 on GPU) and the VAE. One prompt, CFG (default 3), 1024x1024 for 2B/8B. Per stage (text encoding,
transformer loop = text projections + all scales + sampling, VAE decode) the median of ``--repeats`` timed runs
after ``--warmup`` runs (CUDA-synchronised), and the peak of ``torch.cuda.max_memory_allocated`` over the timed
runs with all three models resident. Prints a table (with the upstream reference on H100 for 2B/8B) and writes
JSON with ``--json``.

    python -m deepcompressor.bench.infinity_baseline --arch 2b --json runs/bench/2b.json
    python -m deepcompressor.bench.infinity_baseline --arch 8b --compile --json runs/bench/8b_compile.json
    python -m deepcompressor.bench.infinity_baseline --arch tiny --device cpu        # CPU smoke run
"""

from __future__ import annotations

import argparse
import logging
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

from ..utils.device import synchronize
from .report import finish

logger = logging.getLogger("deepcompressor.bench.infinity_baseline")

# Upstream FoundationVision/Infinity on one H100, 1024x1024, bf16, CFG 3, one prompt.
UPSTREAM_H100 = {
    "2b": {"total": 0.96, "transformer": 0.80, "peak_gib": 15.4},
    "8b": {"total": 1.58, "transformer": 1.44, "peak_gib": 36.7},
}
STAGES = ("text_encoder", "transformer", "vae_decode", "total")
DEFAULT_PROMPT = "A photo of a red fox sitting in fresh snow, golden hour light, highly detailed"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="infinity_baseline", description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="2b", choices=("2b", "8b", "tiny"))
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    parser.add_argument("--dtype", default="auto", help="Block/VAE dtype: auto (bf16 on GPU), bfloat16, float32")
    parser.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="torch.compile the blocks' elementwise glue (compilation happens in the warm-up)",
    )
    parser.add_argument(
        "--cuda-graphs",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Replay per-scale CUDA graphs of the transformer (GPU only)",
    )
    parser.add_argument(
        "--sdpa",
        default="auto",
        choices=("auto", "flash", "cudnn", "efficient"),
        help="Restrict scaled_dot_product_attention to one backend",
    )
    parser.add_argument(
        "--verify",
        action="store_true",
        help="Before timing, compare the eager float path with the configured fast path",
    )
    parser.add_argument(
        "--compile-vae",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="torch.compile the VAE decoder (default: as --compile; compilation happens in the warm-up)",
    )
    parser.add_argument(
        "--kv-reserve-last",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="Preallocate KV-cache room for the last scale (more memory, no concatenation)",
    )
    parser.add_argument(
        "--triton",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Fused Triton kernel for bias + cos-normalisation + RoPE of q/k (GPU)",
    )
    parser.add_argument("--pn", default=None, help="Resolution preset (default: 1M for 2b/8b, 0.06M for tiny)")
    parser.add_argument("--cfg", type=float, default=3.0)
    parser.add_argument("--tau", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=900)
    parser.add_argument("--top-p", type=float, default=0.97)
    parser.add_argument("--seed", type=int, default=0, help="Sampling seed (weights always use seed 0)")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", dest="json_path", default=None, help="Write the results here (JSON)")
    parser.add_argument("--profile", default=None, help="Profile one extra generation; write the kernel table here")
    return parser.parse_args(argv)




def _peak_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def run(args: argparse.Namespace) -> dict:
    from infinity.checkpoints import resolve_device, resolve_dtype
    from infinity.kernels import set_triton_enabled
    from infinity.model import enable_compile
    from infinity.pipeline import load_pipeline
    from infinity.schedules import get_scale_schedule, tokens_per_scale

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    start = time.perf_counter()
    pipe = load_pipeline(args.arch, random_init=True, seed=0, device=device, dtype=dtype)
    synchronize(device)
    build_seconds = time.perf_counter() - start
    pn = args.pn or pipe.arch.default_pn
    schedule = get_scale_schedule(pn, 1.0)
    resident_gib = torch.cuda.memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    enable_compile(args.compile)
    set_triton_enabled(args.triton)
    pipe.kv_reserve_last = args.kv_reserve_last
    if args.compile_vae is None:
        args.compile_vae = args.compile
    if args.compile_vae:
        pipe.vae.decoder = torch.compile(pipe.vae.decoder)
    graphs = bool(args.cuda_graphs and device.type == "cuda")

    def generate(cuda_graphs: bool = graphs, return_logits: bool = False):
        with _sdpa_backend(args.sdpa):
            return pipe.generate(
                [args.prompt],
                seed=args.seed,
                cfg=args.cfg,
                tau=args.tau,
                top_k=args.top_k,
                top_p=args.top_p,
                pn=pn,
                cuda_graphs=cuda_graphs,
                return_logits=return_logits,
            )

    verification = _verify(generate, graphs, args.compile) if args.verify else None

    warmup_seconds = []
    for _ in range(args.warmup):
        start = time.perf_counter()
        generate()
        warmup_seconds.append(time.perf_counter() - start)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    runs = []
    for i in range(args.repeats):
        result = generate()
        runs.append(dict(result.timings))
        logger.info("run %d: %s", i, {k: round(v, 4) for k, v in result.timings.items()})
    peak = _peak_gib(device)
    if args.profile:
        _profile(generate, device, args.profile)
    median = {stage: statistics.median(r[stage] for r in runs) for stage in STAGES}
    image_hw = tuple(result.images.shape[1:3])
    return {
        "arch": args.arch,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "dtype": str(dtype).removeprefix("torch."),
        "compile": bool(args.compile),
        "cuda_graphs": graphs,
        "triton": bool(args.triton),
        "kv_reserve_last": bool(args.kv_reserve_last),
        "compile_vae": bool(args.compile_vae),
        "sdpa": args.sdpa,
        "verification": verification,
        "pn": pn,
        "image_hw": image_hw,
        "tokens": sum(tokens_per_scale(schedule)),
        "cfg": args.cfg,
        "tau": args.tau,
        "build_seconds": build_seconds,
        "warmup_seconds": warmup_seconds,
        "runs": runs,
        "median_seconds": median,
        "peak_memory_gib": peak,
        "peak_memory_kind": "cuda max_memory_allocated" if device.type == "cuda" else "peak RSS",
        "resident_after_load_gib": resident_gib,
        "kv_cache_gib": result.sample.kv_cache_bytes / 2**30,
        "upstream_h100": UPSTREAM_H100.get(args.arch),
    }


def _sdpa_backend(name: str):
    import contextlib

    from torch.nn.attention import SDPBackend, sdpa_kernel

    backends = {
        "flash": SDPBackend.FLASH_ATTENTION,
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
    }
    return contextlib.nullcontext() if name == "auto" else sdpa_kernel([backends[name]])


def _verify(generate, graphs: bool, compiled: bool) -> dict:
    """Same seed through two paths that must agree: with CUDA graphs, graph replay against the same kernels run
    eagerly (expected identical); otherwise the compiled glue against plain eager (rounding-level differences)."""
    from infinity.model import enable_compile

    if graphs:
        ref = generate(cuda_graphs=False, return_logits=True).sample
        generate(cuda_graphs=True)  # captures
        fast = generate(cuda_graphs=True, return_logits=True).sample
        what = "cuda graphs vs eager"
    else:
        enable_compile(False)
        ref = generate(cuda_graphs=False, return_logits=True).sample
        enable_compile(compiled)
        fast = generate(cuda_graphs=False, return_logits=True).sample
        what = f"compile={compiled} vs eager"
    diffs = [(a.float() - b.float()).abs().max().item() for a, b in zip(ref.logits, fast.logits)]
    flips = [int((a != b).sum()) for a, b in zip(ref.bits, fast.bits)]
    total = int(sum(b.numel() for b in ref.bits))
    logger.info("verify %s: logits diff %s, bit mismatches %s", what, [f"{d:.2e}" for d in diffs], flips)
    return {
        "compared": what,
        "max_abs_logit_diff_per_scale": diffs,
        "bit_mismatches_per_scale": flips,
        "total_bits": total,
    }


def _profile(generate, device: torch.device, path: str) -> None:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        generate()
        synchronize(device)
    sort_by = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    table = prof.key_averages().table(sort_by=sort_by, row_limit=60, max_name_column_width=90)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(table)
    logger.info("profile written to %s", path)


def format_table(res: dict) -> str:
    ref = res["upstream_h100"] or {}
    lines = [
        (
            f"Infinity-{res['arch']} {res['image_hw'][0]}x{res['image_hw'][1]} ({res['tokens']} tokens), "
            f"{res['device']}, {res['dtype']}, compile={res['compile']}, graphs={res['cuda_graphs']}, "
            f"triton={res['triton']}, kv_reserve_last={res['kv_reserve_last']}, compile_vae={res['compile_vae']}, "
            f"sdpa={res['sdpa']}, cfg {res['cfg']}, median of {len(res['runs'])}"
        ),
        f"{'stage':<14} {'seconds':>9} {'upstream':>9} {'ratio':>7}",
    ]
    for stage in STAGES:
        ours = res["median_seconds"][stage]
        up = ref.get(stage)
        up_s = f"{up:9.3f}" if up else f"{'-':>9}"
        ratio = f"{ours / up:7.2f}" if up else f"{'-':>7}"
        lines.append(f"{stage:<14} {ours:9.3f} {up_s} {ratio}")
    up_mem = ref.get("peak_gib")
    mem_ratio = f" (upstream {up_mem:.1f} GiB, ratio {res['peak_memory_gib'] / up_mem:.2f})" if up_mem else ""
    lines.append(f"peak memory ({res['peak_memory_kind']}): {res['peak_memory_gib']:.2f} GiB{mem_ratio}")
    if res["verification"]:
        v = res["verification"]
        lines.append(
            f"verify ({v['compared']}): max |dlogit| {max(v['max_abs_logit_diff_per_scale']):.3g}, "
            f"bit mismatches {sum(v['bit_mismatches_per_scale'])} of {v['total_bits']}"
        )
    lines.append(
        f"KV cache: {res['kv_cache_gib']:.2f} GiB; build {res['build_seconds']:.1f} s; "
        f"warm-up {', '.join(f'{s:.1f}' for s in res['warmup_seconds'])} s"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args = parse_args(argv)
    res = run(args)
    return finish(format_table(res), res, args.json_path)


if __name__ == "__main__":
    sys.exit(main())
