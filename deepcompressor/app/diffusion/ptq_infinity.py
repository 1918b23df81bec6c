"""Post-training quantization of an Infinity model.

    python -m deepcompressor.app.diffusion.ptq_infinity configs/models/infinity-tiny.yaml \
        configs/collect/qdiff.yaml configs/svdquant/int4.yaml [flags] [--dump-config]
"""

from __future__ import annotations

import sys

from deepcompressor.config import parse_cli

PROG = "ptq_infinity"


def main(argv: list[str] | None = None) -> int:
    parse_cli(PROG, argv, description="Post-training quantization (SVDQuant W4A4) of Infinity.")
    print(f"{PROG}: the quantization pipeline is not available yet (configuration is valid)", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
