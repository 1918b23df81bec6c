"""Benchmarks. Each prints a table and writes JSON (``--json``); GPU results are recorded in ``docs/results/``.

Entry points (``python -m deepcompressor.bench.<name>``):

| module | what it measures |
|---|---|
| ``infinity_baseline`` | the full-precision pipeline (T5, transformer, VAE) with random weights: latency, peak memory |
| ``w4a4`` | one ``W4A4Linear`` against bf16 at every 2B/8B shape and row count, per backend; a generation's linears |
| ``w4a4_gpu`` | on a GPU: the W4A4 correctness checks, the ``w4a4`` sweep, and ``infinity_w4a4_test`` for 2B / 8B |
| ``w4a4_pipeline`` | end to end (``infinity_w4a4_test.py``): bf16, W4A4, W4A4 + INT8 / INT4 KV; memory, Jetson module |
| ``memory_breakdown`` | what is alive at a quantized generation's peak, by the line of code that allocated it |
| ``kv`` | the KV cache: quantizer quality, calibration time, cache bytes, attention kernels (``--sections``) |
| ``kv_gpu_check`` | on a GPU: the KV kernels against float64 and PyTorch at real sizes |
| ``layers`` | the quantization methods on synthetic layers with Infinity-like outliers: error, calibration time |
| ``ptq`` | wall time and peak memory of ``ptq_infinity`` on random weights |
| ``ptq_ablation`` | ``ptq_infinity`` once per method (naive, SmoothQuant, SVDQuant, 16-bit), ranked by fidelity |

Libraries used by them: ``edge_report`` (Jetson modules, chart), ``kv_perf`` / ``kv_quality`` (sections of ``kv``),
``layers_synthetic`` (the synthetic layers of ``layers``).
"""
