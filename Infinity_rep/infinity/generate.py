"""Generate images from text with an Infinity pipeline described by a config chain.

    python -m infinity.generate configs/models/infinity-tiny.yaml --prompt "a red fox in the snow" --seed 0 \
        --out out.png

Prints the time of each stage and the peak memory (CUDA ``max_memory_allocated`` on GPU, peak RSS on CPU).
With several ``--prompt`` the images are written as ``out_0.png``, ``out_1.png``, ...
"""

from __future__ import annotations

import argparse
import logging
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

from .pipeline import pipeline_from_config

__all__ = ["main", "save_png"]

logger = logging.getLogger("infinity.generate")


def save_png(image: torch.Tensor, path: str | os.PathLike) -> None:
    """Write ``[H, W, 3]`` uint8 RGB as PNG atomically (temp file in the same folder, then rename)."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        mask = os.umask(0)
        os.umask(mask)
        os.fchmod(fd, 0o666 & ~mask)  # mkstemp creates 0600; the image gets the mode open() would give it
        with os.fdopen(fd, "wb") as f:
            Image.fromarray(image.cpu().numpy(), mode="RGB").save(f, format="PNG")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prompt", action="append", required=True, help="Text prompt (repeat for a batch).")
    parser.add_argument("--seed", type=int, default=0, help="Sampling seed. Default: 0.")
    parser.add_argument("--out", default="out.png", help="Output PNG path. Default: out.png.")


def _peak_memory(device: torch.device) -> tuple[str, float]:
    if device.type == "cuda":
        return "CUDA max_memory_allocated", torch.cuda.max_memory_allocated(device) / 2**30
    return "peak RSS", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def main(argv: list[str] | None = None) -> int:
    from deepcompressor.config import parse_cli

    cfg, args = parse_cli(
        "infinity.generate", argv, add_arguments=_add_arguments, description="Generate images with Infinity."
    )
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    p = cfg.pipeline
    start = time.perf_counter()
    pipe = pipeline_from_config(p)
    load_seconds = time.perf_counter() - start
    if pipe.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(pipe.device)
    result = pipe.generate(
        args.prompt, seed=args.seed, cfg=p.cfg, tau=p.tau, top_k=p.top_k, top_p=p.top_p, pn=p.pn, h_div_w=p.h_div_w
    )
    out = Path(args.out)
    paths = (
        [out]
        if len(args.prompt) == 1
        else [out.with_name(f"{out.stem}_{i}{out.suffix}") for i in range(len(args.prompt))]
    )
    for image, path in zip(result.images, paths):
        save_png(image, path)
        logger.info("wrote %s (%dx%d)", path, image.shape[1], image.shape[0])
    what, peak = _peak_memory(pipe.device)
    rows = [("load", load_seconds)] + [(k, v) for k, v in result.timings.items()]
    print(f"Infinity-{p.arch} on {pipe.device}, {len(args.prompt)} prompt(s), pn {p.pn}, cfg {p.cfg}, tau {p.tau}")
    print(f"{'stage':<14} {'seconds':>9}")
    for name, seconds in rows:
        print(f"{name:<14} {seconds:>9.3f}")
    print(f"{what}: {peak:.2f} GiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
