"""Infinity with the real W4A4 layers (and optionally a quantized KV cache) against the 16-bit baseline: per-stage
latency and peak GPU memory, as a table and JSON.

    python infinity_w4a4_test.py configs/models/infinity-8b.yaml configs/svdquant/int4.yaml --artifacts DIR \
        --kv-calib PATH --json runs/bench/w4a4_8b.json
    python infinity_w4a4_test.py configs/models/infinity-tiny.yaml configs/svdquant/int4.yaml --pipeline-device cpu

See ``deepcompressor.bench.w4a4_pipeline`` for the variants, flags and what is measured.
"""

import sys

from deepcompressor.bench.w4a4_pipeline import main

if __name__ == "__main__":
    sys.exit(main())
