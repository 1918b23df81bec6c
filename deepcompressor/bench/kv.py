"""KV-cache quantization benchmark: quality of the quantizers, calibration time, cache bytes, kernel speed.

    python -m deepcompressor.bench.kv --json runs/bench/kv.json                 # GPU: every section, full sizes
    python -m deepcompressor.bench.kv --small --device cpu --json /tmp/kv.json   # CPU smoke run

Sections (``--sections``):

* ``quality``: per-channel MSE (absolute and relative to the channel variance; in-sample on the calibration data and
  on several held-out generations, variance pooled over them), share of held-out values outside the static clipping
  ranges, and attention-output relative error of min-max, symmetric, per-token, KIVI-style,
  one-percentile-per-layer and our search, at 8 and 4 bits, on the real cached K/V of the tiny default model
  (``--calib-prompts`` calibration generations, 12 as the calibration app; ``--held-out-prompts`` held-out ones;
  ``--synthetic`` or no ``infinity``: skewed synthetic K/V, labelled so) — ``bench.kv_quality``;
* ``calib_time``: the search over 8B-sized K/V (40 blocks x K/V x 28 heads x 128 channels, ``--tokens`` samples
  each; ``--small``: 2 blocks x 4 heads, 2048 samples);
* ``memory``: KV bytes of 2B and 8B at 1024x1024 (bf16 / INT8 / INT4, with and without the last scale stored)
  from the schedule, and measured on real cache objects on the device (``--small``: 2 blocks, scaled to depth);
* ``kernel`` (CUDA only): INT8/INT4 attention over the quantized cache vs bf16 SDPA at the 8B and 2B last-scale
  shapes, per backend (``fused`` kernel; ``workspace``: dequantization pass + SDPA, apart and together, and its
  bytes; the ``auto`` choice measured afresh) with the ratios to SDPA (``--quick``: shorter timing windows;
  ``--sweep``: launch configurations of the fused kernel instead).

    python -m deepcompressor.bench.kv --sections kernel --quick --json runs/bench/kv_kernel.json
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import torch

from . import kv_perf, kv_quality
from .cli import add_list_argument
from .report import finish

SECTIONS = ("quality", "calib_time", "memory", "kernel")
logger = logging.getLogger("deepcompressor.bench.kv")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench.kv", description=__doc__.split("\n\n")[0])
    add_list_argument(parser, "--sections", choices=SECTIONS, default=list(SECTIONS), help="sections to run")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    parser.add_argument("--small", action="store_true", help="CPU-sized calibration-time and memory sections")
    parser.add_argument("--synthetic", action="store_true", help="quality on synthetic K/V instead of the tiny model")
    parser.add_argument("--calib-prompts", type=int, default=12,
                        help="calibration prompts of the quality section (qdiff 0..n-1; the calibration app's "
                        "collect.num_prompts is 12)")  # fmt: skip
    parser.add_argument("--held-out-prompts", type=int, default=4,
                        help="held-out prompts of the quality section (qdiff from 512, seeds 1234 + i)")  # fmt: skip
    parser.add_argument("--config", nargs="+", default=None, metavar="YAML",
                        help="quality on this model (config chain, e.g. configs/models/infinity-8b.yaml) instead of "
                        "the tiny default")  # fmt: skip
    parser.add_argument("--tokens", type=int, default=10240, help="samples per channel of the calib_time section")
    parser.add_argument("--sweep", action="store_true", help="kernel section: time launch configurations instead")
    parser.add_argument("--quick", action="store_true", help="kernel section: shorter timing windows")
    parser.add_argument("--json", type=Path, default=None, help="write every number here")
    args = parser.parse_args(argv)
    if args.calib_prompts < 1 or args.held_out_prompts < 1:
        parser.error("--calib-prompts and --held-out-prompts must be >= 1")
    return args


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def quality_section(args, device: torch.device) -> dict:
    data = None
    if not args.synthetic:
        try:
            data = kv_quality.real_kv_data(args.calib_prompts, device=str(device), config_files=args.config,
                                           num_held_out=args.held_out_prompts)  # fmt: skip
        except ImportError as error:
            logger.warning("infinity is not importable (%s): using synthetic K/V", error)
    if data is None:
        data = kv_quality.synthetic_kv_data(num_held_out=args.held_out_prompts)
    start = time.perf_counter()
    results = kv_quality.evaluate_methods(data, device=device)
    return {"data": data.source, "seconds": time.perf_counter() - start, "results": results}


def calib_time_section(args, device: torch.device) -> dict:
    if args.small:
        return kv_perf.calibration_time(2, 4, 128, 2048, device)
    depth, width, heads = kv_perf.MODEL_SHAPES["8b"]
    return kv_perf.calibration_time(depth, heads, width // heads, args.tokens, device)


def memory_section(args, device: torch.device) -> dict:
    out = {}
    for model in ("2b", "8b"):
        out[model] = {
            "schedule": kv_perf.schedule_bytes(model),
            "measured": kv_perf.measured_bytes(model, device, depth=2 if args.small else None),
        }
    return out


def kernel_section(args, device: torch.device) -> dict:
    if device.type != "cuda":
        return {"skipped": "the kernel timing needs a CUDA device"}
    if args.sweep:
        return {"sweep": kv_perf.kernel_sweep("8b", device)}
    return {model: kv_perf.kernel_timing(model, device, quick=args.quick) for model in ("8b", "2b")}


def _gib(n) -> str:
    return "-" if n is None else f"{n / 2**30:.3f}"


def _share(x) -> str:
    return "-" if x is None else f"{100 * x:.2f}%"


def format_tables(report: dict) -> str:
    lines = []
    if "quality" in report:
        q = report["quality"]
        lines += [
            (
                f"## Quantizer quality ({q['data']}): MSE / channel variance (mean over channels) in-sample on the "
                "calibration data (fit) and on all held-out generations (variance pooled over them); share of "
                "held-out values outside the static clipping range (- : dynamic per token); attention-output "
                "relative error over every self-attention of the held-out generations (current scale read "
                "quantized / in full precision; last scale only)"
            ),
            "",
            (
                "| method | bits | K fit (in-sample) | V fit (in-sample) | K held-out | V held-out | K outside | "
                "V outside | attn err | attn err (current full) | attn err (last scale) |"
            ),
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for method, per_bits in q["results"].items():
            for bits, r in per_bits.items():
                cells = [f"{c:.2e}" for c in (r["fit_k_rel_mse"], r["fit_v_rel_mse"], r["k_rel_mse"], r["v_rel_mse"])]
                cells += [_share(r["k_outside"]), _share(r["v_outside"])]
                cells += [f"{c:.2e}" for c in (r["attn_rel_err"], r["attn_rel_err_current_full"],
                                               r["attn_rel_err_last"])]  # fmt: skip
                lines.append(f"| {method} | {bits} | " + " | ".join(cells) + " |")
        lines.append("")
    if "calib_time" in report:
        c = report["calib_time"]
        s = c["shape"]
        lines += [(f"## Calibration search time ({s['depth']} blocks x K/V x {s['heads']} heads x {s['head_dim']} = "
                  f"{s['channels']} channels, {s['tokens']} samples each, {c['device']})"), "",
                  "| format | seconds |", "|---|---|"]  # fmt: skip
        lines += [f"| {fmt} | {sec:.2f} |" for fmt, sec in c["seconds"].items()]
        lines.append("")
    if "memory" in report:
        lines += ["## KV-cache GiB at 1024x1024, CFG batch 2 (schedule / measured nbytes / measured allocated)", "",
                  "| model | format | last scale stored | schedule | nbytes | allocated |", "|---|---|---|---|---|---|"]  # fmt: skip
        for model, m in report["memory"].items():
            for key, value in m["measured"]["bytes"].items():
                fmt, which = key.split("/")
                lines.append(f"| {model} | {fmt} | {'yes' if which == 'with_last' else 'no'} | "
                             f"{_gib(m['schedule']['bytes'][key])} | {_gib(value['nbytes'])} | "
                             f"{_gib(value['allocated'])} |")  # fmt: skip
            if m["measured"]["depth_measured"] != m["measured"]["depth_model"]:
                lines.append(f"| {model} | (measured on {m['measured']['depth_measured']} blocks, scaled) | | | | |")
        lines.append("")
    if "kernel" in report:
        k = report["kernel"]
        if "skipped" in k:
            lines += [f"## Kernel: skipped ({k['skipped']})", ""]
        elif "sweep" in k:
            lines += ["## Kernel launch sweep, 8B last scale (ms)", ""] + [
                f"- {c}: {ms}" for c, ms in k["sweep"].items()
            ]
        else:
            lines += ["## Last-scale attention of one block (ms, median)", "",
                      ("| model | bf16 SDPA | INT8 fused | INT4 fused | INT8 dequant+SDPA | INT4 dequant+SDPA | "
                      "INT8 err vs fake-quant | quantize one K (INT8) |"), "|---|---|---|---|---|---|---|---|"]  # fmt: skip
            for model, r in k.items():
                lines.append(f"| {model} | {r['sdpa_bf16']['ms']:.3f} | {r['int8']['ms']:.3f} | {r['int4']['ms']:.3f} | "
                             f"{r['int8']['dequant_plus_sdpa_ms']:.3f} | {r['int4']['dequant_plus_sdpa_ms']:.3f} | "
                             f"{r['int8']['rel_err_vs_fake_quant_fp32']:.2e} | "
                             f"{r['int8']['quantize_kv_ms_per_tensor']:.3f} |")  # fmt: skip
            lines.append("")
            lines += ["## Backends of the quantized-KV attention vs bf16 SDPA (ms, median; ratio = time / SDPA)", "",
                      ("| model | format | bf16 SDPA | fused | workspace | dequant part | SDPA part | auto choice | "
                       "fused ratio | workspace ratio | auto ratio (paired) | workspace MiB |"),
                      "|---|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
            for model, r in k.items():
                for fmt in ("int8", "int4"):
                    f = r[fmt]
                    ws, auto, ratio = f["workspace"], f["auto"], f["ratio_vs_sdpa"]
                    lines.append(f"| {model} | {fmt} | {r['sdpa_bf16']['ms']:.3f} | {f['ms']:.3f} | {ws['ms']:.3f} | "
                                 f"{ws['dequant_ms']:.3f} | {ws['sdpa_ms']:.3f} | {auto['backend']} "
                                 f"({auto['ms']:.3f}) | {ratio['fused']:.2f} | {ratio['workspace']:.2f} | "
                                 f"{ratio['auto']:.2f} ({f['ratio_vs_sdpa_paired']['auto']:.3f}) | "
                                 f"{ws['bytes'] / 2**20:.0f} |")  # fmt: skip
            lines.append("")
            lines += [("## One block's last-scale attend(store=False), cache operations included (ms; cat: no room "
                       "reserved for the last scale, the sampler's default; reserved: kv_reserve_last)"), "",
                      ("| model | mode | bf16 cache | INT8 fused | INT8 workspace | INT8 auto | INT4 fused | "
                       "INT4 workspace | INT4 auto | INT8 auto / bf16 (paired) | INT4 auto / bf16 (paired) |"),
                      "|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
            for model, r in k.items():
                a = r.get("layer_attend")
                if not a:
                    continue
                for mode in ("cat", "reserved"):
                    cells = [f"{a['bf16'][mode]:.3f}"]
                    cells += [f"{a[fmt][b][mode]:.3f}" for fmt in ("int8", "int4") for b in ("fused", "workspace",
                                                                                             "auto")]  # fmt: skip
                    cells += [f"{a[fmt]['ratio_vs_bf16'][mode]:.2f} ({a[fmt]['ratio_vs_bf16_paired'][mode]:.3f})"
                              for fmt in ("int8", "int4")]  # fmt: skip
                    lines.append(f"| {model} | {mode} | " + " | ".join(cells) + " |")
            lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    device = _device(args.device)
    report = {"device": str(device), "small": args.small}
    if device.type == "cuda":
        report["gpu"] = torch.cuda.get_device_name(device)
    sections = {"quality": quality_section, "calib_time": calib_time_section, "memory": memory_section,
                "kernel": kernel_section}  # fmt: skip
    for name in args.sections:
        logger.info("section %s", name)
        start = time.perf_counter()
        report[name] = sections[name](args, device)
        logger.info("section %s done in %.1f s", name, time.perf_counter() - start)
    return finish(format_tables(report), report, args.json)


if __name__ == "__main__":
    sys.exit(main())
