"""Where the GPU memory of a quantized generation goes: the live allocations at the peak and after a generation,
grouped by the line of this project's code that made them.

    python -m deepcompressor.bench.memory_breakdown configs/models/infinity-2b.yaml configs/svdquant/int4.yaml \
        configs/edge/memory.yaml --pipeline-random-init --kv-synthetic --kv-dtypes uint4 --json runs/bench/mem.json

It takes ``infinity_w4a4_test``'s flags, builds the W4A4 pipeline the same way (``--base-path`` artifacts or
synthesized layers; the first of ``--kv-dtypes``), records the CUDA caching allocator's history from the start,
runs ``--warmup`` generations (compilation, kernel choices, graph capture) and one more, and reports, for the whole
run and for that last generation alone, the moment of the most allocated bytes and what was alive then. CUDA only.
"""

from __future__ import annotations

import sys
from collections import defaultdict
from pathlib import Path

import torch

from .report import finish

__all__ = ["allocation_site", "main", "peak_breakdown"]

_OWN_CODE = ("deepcompressor", "infinity")


def allocation_site(frames: list[dict]) -> str:
    """The innermost frame in this project's code (``file:line function``), else the innermost frame."""
    for frame in frames:
        name = frame.get("filename", "")
        if any(f"/{part}/" in name for part in _OWN_CODE):
            short = name[name.rfind("/", 0, name.rfind("/")) + 1:]
            return f"{short}:{frame.get('line')} {frame.get('name')}"
    if frames:
        return f"{frames[0].get('filename', '?')}:{frames[0].get('line')} {frames[0].get('name')}"
    return "<allocated before recording>"


def peak_breakdown(events: list[dict], start: int = 0, top: int = 25) -> dict:
    """Replay allocator trace events (``action`` ``alloc`` / ``free_completed``, ``addr``, ``size``, ``frames``):
    the largest live total from event ``start`` on (allocations made before ``start`` count as alive) and the
    live bytes at that moment grouped by ``allocation_site``, largest first."""
    live: dict[int, tuple[int, str]] = {}
    total = peak = 0
    peak_live: dict[int, tuple[int, str]] = {}
    for index, event in enumerate(events):
        action = event.get("action")
        if action == "alloc":
            live[event["addr"]] = (event["size"], allocation_site(event.get("frames", [])))
            total += event["size"]
        elif action == "free_completed" and event["addr"] in live:
            total -= live.pop(event["addr"])[0]
        if index >= start and total > peak:
            peak, peak_live = total, dict(live)
    sites: dict[str, int] = defaultdict(int)
    for size, site in peak_live.values():
        sites[site] += size
    ranked = sorted(sites.items(), key=lambda item: -item[1])
    return {"peak_gib": peak / 2**30, "sites": [{"site": s, "gib": b / 2**30} for s, b in ranked[:top]],
            "other_gib": sum(b for _, b in ranked[top:]) / 2**30}


def _format(title: str, breakdown: dict) -> str:
    lines = [f"{title}: {breakdown['peak_gib']:.3f} GiB allocated at the peak"]
    lines += [f"  {row['gib']:8.3f}  {row['site']}" for row in breakdown["sites"]]
    lines.append(f"  {breakdown['other_gib']:8.3f}  (the rest)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from ..config import parse_cli
    from ..config.seed_flags import translate_seed_flags
    from . import w4a4_pipeline as wp

    argv = translate_seed_flags(sys.argv[1:] if argv is None else list(argv), value_flags=wp.SEED_VALUE_FLAGS,
                                bool_flags=wp.SEED_BOOL_FLAGS)
    cfg, args = parse_cli("memory_breakdown", argv, add_arguments=wp.add_arguments, description=__doc__.split("\n\n")[0])
    if not torch.cuda.is_available():
        print("memory_breakdown: needs a CUDA device", file=sys.stderr)
        return 2
    from infinity.model import enable_compile
    from infinity.pipeline import pipeline_from_config

    kv_dtypes = wp._check_inputs(cfg, args)
    device = torch.device("cuda")
    torch.cuda.memory._record_memory_history(max_entries=2_000_000)
    if args.artifacts:
        model, _ = wp._load_quantized(cfg, args, device)
        pipe = pipeline_from_config(cfg.pipeline, transformer=model)
    else:
        pipe = pipeline_from_config(cfg.pipeline)
        wp._synthesize(pipe, cfg, args)
    enable_compile(args.compile)
    import tempfile

    with tempfile.TemporaryDirectory() as workdir:
        if kv_dtypes:
            wp._attach_kv(pipe.transformer, cfg, args, kv_dtypes[0], Path(workdir))
        p = cfg.pipeline

        def generate():
            return pipe.generate([args.prompt], seed=args.seed, cfg=p.cfg, tau=p.tau, top_k=p.top_k, top_p=p.top_p,
                                 pn=p.pn, h_div_w=p.h_div_w, cuda_graphs=args.cuda_graphs)

        for _ in range(max(args.warmup, 1)):
            generate()
        torch.cuda.synchronize()
        before = len(torch.cuda.memory._snapshot()["device_traces"][device.index or 0])
        generate()
        torch.cuda.synchronize()
    events = torch.cuda.memory._snapshot()["device_traces"][device.index or 0]
    torch.cuda.memory._record_memory_history(enabled=None)
    res = {"arch": p.arch, "kv_dtype": kv_dtypes[0] if kv_dtypes else None,
           "memory_options": {k: getattr(p, k) for k in ("release_text_encoder", "vae_tiled", "nonblock_dtype")},
           "whole_run": peak_breakdown(events), "last_generation": peak_breakdown(events, start=before),
           "max_memory_allocated_gib": torch.cuda.max_memory_allocated() / 2**30,
           "memory_allocated_gib": torch.cuda.memory_allocated() / 2**30, "trace_events": len(events)}
    table = "\n".join((_format("whole run", res["whole_run"]), _format("last generation", res["last_generation"])))
    return finish(table, res, args.json_path)


if __name__ == "__main__":
    sys.exit(main())
