"""The one configuration schema of the tool.

Every app (ptq_infinity, calibrate_cache_quantization, activations_measurements, infinity.generate, ...)
parses the same tree, so one YAML chain drives them all. Sections follow DeepCompressor's names where users
know them: ``pipeline``, ``collect``, ``quant.{wgts,ipts,smooth,low_rank,calib_range,gptq}``, ``kv``,
``eval``, ``output``.

Conventions for fields:
- integer formats are strings: ``sint4``, ``uint4``, ``sint8``, ``uint8``; ``None`` keeps 16-bit;
- ``group_size`` is along the input (reduction) dimension: ``-1`` = one group per row (per output channel for
  weights, per token for activations), ``0`` = one group for the whole tensor, ``k > 0`` = groups of k;
- paths accept ``~`` and ``${ENV_VAR}``.

Validation lives here too: a field with a fixed set of values declares it with :func:`one_of` or
``metadata={"choices": ...}`` (the loader checks it and suggests the closest choice), and every section has a ``check()`` method that yields
``(dotted key relative to the section, message)`` for range and cross-field rules. The loader
(``deepcompressor.config.loader``) walks the tree, prefixes the keys and names the file that set each one.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "ARCHS",
    "INT_DTYPES",
    "KV_DTYPES",
    "LAYER_KINDS",
    "PATH_KEYS",
    "RESOLUTION_PRESETS",
    "ActivationQuantConfig",
    "CollectConfig",
    "EvalConfig",
    "GPTQConfig",
    "KVCacheConfig",
    "LowRankConfig",
    "MemoryConfig",
    "MixedPrecisionConfig",
    "OutputConfig",
    "PipelineConfig",
    "QuantConfig",
    "QuantizerConfig",
    "RangeCalibConfig",
    "RotationConfig",
    "RunConfig",
    "SmoothConfig",
    "WeightQuantConfig",
    "one_of",
]

INT_DTYPES = ("sint4", "uint4", "sint8", "uint8")
KV_DTYPES = ("uint8", "uint4")
ARCHS = ("2b", "8b", "tiny")
MODEL_DTYPES = ("auto", "bfloat16", "float16", "float32")
SCALE_DTYPES = ("float16", "bfloat16", "float32")
RESOLUTION_PRESETS = ("0.06M", "0.25M", "0.60M", "1M")
# The quality benchmark's metrics (evaluation.metrics.METRICS; the config does not import evaluation).
EVAL_METRICS = ("clip_iqa", "clip_score", "fid", "image_reward", "psnr", "ssim", "lpips")
# Kinds of the transformer's linear layers (names in ``deepcompressor.nn.layer_map``); ``deepcompressor.nn.layer_map`` maps module
# names to them and the skip lists below are checked against this tuple.
LAYER_KINDS = (
    "sa_qkv",
    "sa_out",
    "ca_q",
    "ca_kv",
    "ca_out",
    "ffn_up",
    "ffn_down",
    "embed",
    "adaln",
    "text_proj",
    "head",
)

Issues = Iterator[tuple[str, str]]

_DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:\d+)?")


def one_of(default: str | None, choices: tuple[str, ...]) -> Any:
    """A dataclass field whose value must be one of ``choices`` (``None`` too if the type is optional).

    List fields use ``field(default_factory=..., metadata={"choices": ...})``: every element is checked.
    """
    return field(default=default, metadata={"choices": tuple(choices)})


def _is_missing(path: str | None) -> bool:
    return path is None or path == ""


@dataclass
class PipelineConfig:
    """The model: architecture, where its files are, how it runs, and its sampling defaults.

    Args:
        name: Display name, used in output paths and manifests.
        arch: Architecture preset: ``2b``, ``8b`` or ``tiny`` (the embedded default).
        transformer_path: The 2B single ``.pth`` file or the 8B sharded folder.
        vae_path: The BSQ-VAE ``.pth`` file.
        text_encoder_path: A local flan-t5-xl folder (``local_files_only``).
        random_init: Build the architecture with seeded random weights and read no files.
        seed: Seed of the random weights when ``random_init`` (and of the tiny default).
        device: ``auto`` (cuda if available), ``cpu`` or ``cuda[:i]``.
        dtype: Dtype of the transformer blocks: ``auto`` (bf16 on GPU, fp32 on CPU), ``bfloat16``, ``float16``,
            ``float32``.
        pn: Resolution preset: ``0.06M``, ``0.25M``, ``0.60M``, ``1M`` (1024x1024 for 1:1).
        h_div_w: Aspect ratio (height / width); the nearest template is used.
        cfg: Classifier-free-guidance scale on logits.
        tau: Sampling temperature.
        top_k: Top-k on each bit's two logits (values >= 2 are a no-op).
        top_p: Top-p on each bit's two probabilities (0 disables).
        release_text_encoder: Free the text encoder once the prompts are encoded and load it again for prompts
            not seen (their features come from a cache of ``text_cache_size`` prompt lists). Saves the T5's ~2.3 GiB
            between generations on a device whose CPU and GPU share one memory; costs a reload per new prompt.
        text_cache_size: Prompt lists whose features ``release_text_encoder`` keeps (a few MiB each).
        vae_tiled: Decode in bands of ``vae_tile_rows`` rows (GroupNorm statistics still over the whole image): at
            1024x1024 in bfloat16 0.85 GiB at the peak instead of 2.4 GiB, about 1.4x the decode time.
        vae_tile_rows: Rows per band of the tiled decode.
        nonblock_dtype: Storage and compute dtype of the linears outside the blocks (text projections, shared
            AdaLN, head): ``float32`` as the reference, or ``bfloat16`` (0.29 GiB less at 8B).
    """

    name: str = "infinity-tiny"
    arch: str = one_of("tiny", ARCHS)
    transformer_path: str | None = None
    vae_path: str | None = None
    text_encoder_path: str | None = None
    random_init: bool = False
    seed: int = 0
    device: str = "auto"
    dtype: str = one_of("auto", MODEL_DTYPES)
    pn: str = one_of("1M", RESOLUTION_PRESETS)
    h_div_w: float = 1.0
    cfg: float = 3.0
    tau: float = 0.5
    top_k: int = 900
    top_p: float = 0.97
    release_text_encoder: bool = False
    text_cache_size: int = 16
    vae_tiled: bool = False
    vae_tile_rows: int = 64
    nonblock_dtype: str = one_of("float32", ("float32", "bfloat16", "float16"))

    def check(self) -> Issues:
        if self.vae_tile_rows < 1:
            yield "vae_tile_rows", f"must be >= 1, got {self.vae_tile_rows}"

        if self.text_cache_size < 0:
            yield "text_cache_size", f"must be >= 0, got {self.text_cache_size}"
        if not self.name:
            yield "name", "must not be empty"
        if not _DEVICE_PATTERN.fullmatch(self.device):
            yield "device", f"must be 'auto', 'cpu', 'cuda' or 'cuda:<index>', got {self.device!r}"
        if self.h_div_w <= 0:
            yield "h_div_w", f"must be > 0, got {self.h_div_w}"
        if self.cfg < 0:
            yield "cfg", f"must be >= 0, got {self.cfg}"
        if self.tau <= 0:
            yield "tau", f"must be > 0, got {self.tau}"
        if self.top_k < 0:
            yield "top_k", f"must be >= 0, got {self.top_k}"
        if not 0 <= self.top_p <= 1:
            yield "top_p", f"must be in [0, 1], got {self.top_p}"
        if self.arch in ("2b", "8b") and not self.random_init:
            for key in ("transformer_path", "vae_path", "text_encoder_path"):
                if _is_missing(getattr(self, key)):
                    yield key, (
                        f"is required when pipeline.arch is {self.arch!r} and pipeline.random_init is false "
                        "(set it in the model YAML, e.g. from an environment variable, or pass "
                        f"--pipeline-{key.replace('_', '-')})"
                    )


@dataclass
class CollectConfig:
    """Step-aware calibration data: generate with the full-precision model and capture every block's inputs.

    Args:
        prompts: A built-in prompt set name (``qdiff``) or a YAML file of ``id: caption`` entries.
        num_prompts: How many prompts (the first N, in file order) are used for calibration.
        num_scales: How many scales of the schedule are captured per prompt (``0`` = all of them).
        seed: Sampling seed of the calibration generations.
        cache_dir: Where captured activations are stored and reused across runs.
        selection: ``first``: the first ``num_prompts`` prompts; ``dgc`` (distribution-guided calibration): the
            ``num_prompts`` of the first ``candidates`` prompts whose block inputs together cover the candidates'
            activation distribution best (greedy, by the entropy of their histogram over the pool's quantile bins;
            ``ptq_infinity`` only).
        candidates: The DGC pool: the first ``candidates`` prompts (0: four times ``num_prompts``).
    """

    prompts: str = "qdiff"
    num_prompts: int = 12
    num_scales: int = 0
    seed: int = 0
    cache_dir: str = "runs/cache"
    selection: str = one_of("first", ("first", "dgc"))
    candidates: int = 0

    def pool_size(self) -> int:
        """Prompts the calibration reads from the start of the set (the DGC pool, or the prompts themselves)."""
        if self.selection != "dgc":
            return self.num_prompts
        return self.candidates if self.candidates > 0 else 4 * self.num_prompts

    def check(self) -> Issues:
        if not self.prompts:
            yield "prompts", "must not be empty"
        if self.num_prompts < 1:
            yield "num_prompts", f"must be >= 1, got {self.num_prompts}"
        if self.candidates < 0:
            yield "candidates", f"must be >= 0 (0: four times num_prompts), got {self.candidates}"
        elif self.selection == "dgc" and self.candidates and self.candidates < self.num_prompts:
            yield "candidates", f"the DGC pool ({self.candidates}) must hold at least num_prompts ({self.num_prompts})"
        if self.num_scales < 0:
            yield "num_scales", f"must be >= 0 (0 = all scales), got {self.num_scales}"
        if not self.cache_dir:
            yield "cache_dir", "must not be empty"


@dataclass
class QuantizerConfig:
    """An integer format applied group-wise along the input dimension.

    Args:
        dtype: ``sint4``, ``uint4``, ``sint8``, ``uint8``, or ``None`` to keep 16-bit.
        group_size: ``-1`` one group per row, ``0`` per tensor, ``k > 0`` groups of k input channels.
        symmetric: Symmetric (no zero point) or asymmetric (with zero point).
        scale_dtype: Dtype the scales are stored in (``float16``, ``bfloat16``, ``float32``).
    """

    dtype: str | None = one_of(None, INT_DTYPES)
    group_size: int = -1
    symmetric: bool = True
    scale_dtype: str = one_of("float16", SCALE_DTYPES)

    @property
    def enabled(self) -> bool:
        return self.dtype is not None

    def check(self) -> Issues:
        if self.group_size < -1:
            yield "group_size", f"must be -1 (per row), 0 (per tensor) or a positive group size, got {self.group_size}"


@dataclass
class WeightQuantConfig(QuantizerConfig):
    """Static weight quantization.

    Args:
        skips: Layer kinds whose weights stay 16-bit (see ``deepcompressor.nn.layer_map`` for the kinds).
    """

    skips: list[str] = field(
        default_factory=lambda: ["embed", "adaln", "text_proj", "head"], metadata={"choices": LAYER_KINDS}
    )


@dataclass
class ActivationQuantConfig(QuantizerConfig):
    """Input-activation quantization of the quantized linears.

    Args:
        static: Calibrated static ranges instead of dynamic per-group ranges computed at run time.
        skips: Layer kinds whose inputs stay 16-bit while their weights may be quantized (the cross-attention
            key/value projection reads the static text encoding).
    """

    static: bool = False
    skips: list[str] = field(default_factory=lambda: ["ca_kv"], metadata={"choices": LAYER_KINDS})


@dataclass
class SmoothConfig:
    """SmoothQuant: s = max|X|^alpha / max|W|^beta per input channel, searched on a grid.

    Args:
        enabled: Search and apply smoothing scales.
        num_grids: Grid steps: alpha takes the values i / num_grids, i = 0..num_grids (with beta = 1 - alpha),
            plus alpha = beta = 0 (no smoothing) as a candidate.
        search_beta: Search beta on the same grid as well (all (alpha, beta) pairs); otherwise beta = 1 - alpha.
        beta_zero: Also try (alpha, 0) for every grid alpha (s = max|X|^alpha, the weights left out): one more
            candidate per grid step, the cheap ones other SmoothQuant searches use.
        strategy: ``grid``: the search above; ``gps``: gain-projected scaling, the closed-form scale
            ``(||X_j||^2 / ||W_:j||^2)^(1/4)`` alone (no search); ``gps+grid``: the search with the GPS scale (and its
            powers 0.5-1.5) among the candidates (``deepcompressor.calib.smooth``).
        fold: Fold scales into the preceding norm / linear where the graph allows.
    """

    enabled: bool = False
    num_grids: int = 20
    search_beta: bool = False
    beta_zero: bool = False
    strategy: str = one_of("grid", ("grid", "gps", "gps+grid"))
    fold: bool = True

    def check(self) -> Issues:
        if self.num_grids < 1:
            yield "num_grids", f"must be >= 1, got {self.num_grids}"


@dataclass
class LowRankConfig:
    """SVDQuant low-rank branch: W = L1 L2 + Q(W - L1 L2), kept in 16-bit.

    Args:
        enabled: Add the branch.
        rank: Rank r of the branch.
        num_iters: Maximum refinement iterations (SVD of W - Q(.), re-quantize, keep the best).
        early_stop: Stop refining when the output error stops improving.
        svd: ``auto``, ``full`` or ``randomized``.
        dtype: Storage dtype of the factors L1, L2: ``bfloat16`` or ``float16``.
    """

    enabled: bool = False
    rank: int = 32
    num_iters: int = 10
    early_stop: bool = True
    svd: str = one_of("auto", ("auto", "full", "randomized"))
    dtype: str = one_of("bfloat16", ("bfloat16", "float16"))

    def check(self) -> Issues:
        if self.rank <= 0:
            yield "rank", f"must be > 0, got {self.rank}"
        if self.num_iters < 1:
            yield "num_iters", f"must be >= 1, got {self.num_iters}"


@dataclass
class RangeCalibConfig:
    """Search of a clipping ratio of the weight range on a grid.

    Args:
        enabled: Search the clipping ratio; otherwise use the full range.
        objective: ``weight`` (weight reconstruction error) or ``output`` (output error on calibration inputs).
        granularity: ``layer`` (one ratio per layer) or ``group`` (one ratio per quantization group).
        num_grids: Grid points between ``1 - max_shrink`` and 1.
        max_shrink: Largest fraction of the range that may be clipped.
    """

    enabled: bool = True
    objective: str = one_of("output", ("weight", "output"))
    granularity: str = one_of("group", ("layer", "group"))
    num_grids: int = 20
    max_shrink: float = 0.2

    def check(self) -> Issues:
        if self.num_grids < 1:
            yield "num_grids", f"must be >= 1, got {self.num_grids}"
        if not 0 <= self.max_shrink < 1:
            yield "max_shrink", f"must be in [0, 1), got {self.max_shrink}"


@dataclass
class GPTQConfig:
    """GPTQ for the weights.

    Args:
        enabled: Use GPTQ instead of round-to-nearest.
        damp: Dampening added to the Hessian diagonal, as a fraction of its mean.
        block_size: Columns processed per lazy-update block.
        act_order: Process columns in decreasing Hessian-diagonal order.
    """

    enabled: bool = False
    damp: float = 0.01
    block_size: int = 128
    act_order: bool = False

    def check(self) -> Issues:
        if self.damp < 0:
            yield "damp", f"must be >= 0, got {self.damp}"
        if self.block_size < 1:
            yield "block_size", f"must be >= 1, got {self.block_size}"


@dataclass
class RotationConfig:
    """Online Hadamard rotation of the quantized linears' inputs (``deepcompressor.quant.hadamard``).

    The input of each quantized linear is multiplied by a block-diagonal Hadamard matrix at run time and the weight
    by the same matrix offline, before smoothing, the low-rank branch and quantization: outlier channels spread over
    their block.

    Args:
        enabled: Rotate.
        block_size: Hadamard block (a power of two >= 2 dividing every quantized layer's inputs).
    """

    enabled: bool = False
    block_size: int = 64

    def check(self) -> Issues:
        if self.block_size < 2 or self.block_size & (self.block_size - 1):
            yield "block_size", f"must be a power of two >= 2, got {self.block_size}"


@dataclass
class MixedPrecisionConfig:
    """Mixed precision: the most sensitive block linears kept at a higher precision.

    Before calibration, every quantized block linear is quantized alone (round-to-nearest, the chain's formats) on
    its calibration inputs through the full-precision model, and its relative output error is its sensitivity.
    The most sensitive layers are kept at ``precision``, as many as ``keep`` or as fit ``max_extra_bytes_ratio``.

    Args:
        enabled: Measure the sensitivities and keep layers at ``precision``.
        keep: How many layers (the most sensitive first); 0 with a ratio: as many as the ratio allows.
        max_extra_bytes_ratio: Bound on the extra weight bytes of the kept layers, as a fraction of the quantized
            block linears' weight bytes at the chain's format (0: no bound).
        precision: ``sint8``: W8A8 (weights per output channel, inputs per token, the rest of the chain unchanged);
            ``bf16``: 16-bit, not quantized.
    """

    enabled: bool = False
    keep: int = 0
    max_extra_bytes_ratio: float = 0.0
    precision: str = one_of("sint8", ("sint8", "bf16"))

    def check(self) -> Issues:
        if self.keep < 0:
            yield "keep", f"must be >= 0, got {self.keep}"
        if self.max_extra_bytes_ratio < 0:
            yield "max_extra_bytes_ratio", f"must be >= 0, got {self.max_extra_bytes_ratio}"
        if self.enabled and self.keep == 0 and self.max_extra_bytes_ratio == 0:
            yield "keep", "mixed precision needs keep > 0 or max_extra_bytes_ratio > 0"


@dataclass
class QuantConfig:
    """Quantization of the transformer's linear layers.

    Args:
        num_samples: Calibration samples (prompt x scale) used per block (``0`` = all captured).
        max_tokens: Token budget per layer for the searches (rows are subsampled deterministically above it).
    """

    wgts: WeightQuantConfig = field(default_factory=WeightQuantConfig)
    ipts: ActivationQuantConfig = field(default_factory=ActivationQuantConfig)
    smooth: SmoothConfig = field(default_factory=SmoothConfig)
    low_rank: LowRankConfig = field(default_factory=LowRankConfig)
    calib_range: RangeCalibConfig = field(default_factory=RangeCalibConfig)
    gptq: GPTQConfig = field(default_factory=GPTQConfig)
    mixed_precision: MixedPrecisionConfig = field(default_factory=MixedPrecisionConfig)
    rotation: RotationConfig = field(default_factory=RotationConfig)
    num_samples: int = 0
    max_tokens: int = 8192

    def check(self) -> Issues:
        if self.num_samples < 0:
            yield "num_samples", f"must be >= 0 (0 = all captured samples), got {self.num_samples}"
        if self.max_tokens < 1:
            yield "max_tokens", f"must be >= 1, got {self.max_tokens}"
        # These methods only change how weights are quantized; without a weight format they would silently do
        # nothing, which is almost always a missing svdquant/int4.yaml (or similar) in the chain.
        for section in ("low_rank", "gptq"):
            if getattr(self, section).enabled and not self.wgts.enabled:
                yield f"{section}.enabled", "needs quantized weights, but quant.wgts.dtype is null"
        if self.smooth.enabled and not (self.wgts.enabled or self.ipts.enabled):
            yield "smooth.enabled", (
                "needs quantized weights or activations, but quant.wgts.dtype and quant.ipts.dtype are both null"
            )


@dataclass
class KVCacheConfig:
    """Static asymmetric per-channel KV-cache quantization.

    Args:
        enabled: Run inference with the quantized cache (needs ``calib_path``).
        dtype: ``uint8`` (INT8) or ``uint4`` (INT4, packed two per byte).
        calib_path: The calibration file written by ``calibrate_cache_quantization``.
        artifact_dir: Calibrate through the W4A4 model of this PTQ artifact directory (empty: full precision).
        num_grids: Points of the logarithmic percentile grid (0.99, 0.999, ..., 1 - 1e-6).
        golden_iters: Golden-section refinement iterations per clipping bound.
        max_tokens: Calibration tokens per (block, K/V): a deterministic uniform sample of every cached token of
            every calibration prompt (both CFG rows), the same token positions in every block.
        current: How the current scale's queries read the current scale's own keys/values: ``quantized`` (as a
            real quantized cache: written, then read back; every scale is calibrated) or ``full`` (full precision;
            only the stored scales are calibrated).
    """

    enabled: bool = False
    dtype: str = one_of("uint8", KV_DTYPES)
    calib_path: str = "runs/kv_scales/kv_quant_calib.pt"
    artifact_dir: str = ""
    num_grids: int = 5
    golden_iters: int = 20
    max_tokens: int = 10240
    current: str = one_of("quantized", ("quantized", "full"))

    def check(self) -> Issues:
        if self.enabled and not self.calib_path:
            yield "calib_path", "is required when kv.enabled is true"
        if self.num_grids < 1:
            yield "num_grids", f"must be >= 1, got {self.num_grids}"
        if self.golden_iters < 0:
            yield "golden_iters", f"must be >= 0, got {self.golden_iters}"
        if self.max_tokens < 2:
            yield "max_tokens", f"must be >= 2, got {self.max_tokens}"


@dataclass
class EvalConfig:
    """Held-out evaluation of a quantized model (diagnostics and the quality benchmark).

    Args:
        prompt_offset: Evaluation prompts start at this index of the prompt set (disjoint from calibration).
        num_prompts: Number of held-out prompts.
        seed: Sampling seed (the quality benchmark seeds sample ``i`` of a benchmark with ``seed + i``).
        num_tokens: Token budget of the activation/KV diagnostics.
        benchmarks: Quality benchmark prompt sets: ``MJHQ``, ``DCI``, or a YAML ``id: caption`` file; empty: the
            shipped smoke set.
        num_samples: Samples per benchmark (a seeded subset, stratified by MJHQ category); 0: all of them.
        gt_metrics: Metrics of the quality benchmark (``evaluation.metrics.METRICS``).
        ref_root: Folder of the reference (full-precision) run that paired metrics compare against.
        gen_root: Folder this run writes its images and results into.
        artifacts: PTQ artifact directory (``--base-path``) read when weight or activation quantization is on.
        enable_weight_quant: Fake-quantized weights (their inputs stay 16-bit unless ``enable_activation_quant``).
        enable_activation_quant: Fake-quantized layer inputs (16-bit weights unless ``enable_weight_quant``).
        enable_kv_quant: The quantized KV cache of ``kv.calib_path``.
        mjhq_root: MJHQ-30K folder (``meta_data.json`` and its category folders).
        dci_root: sDCI folder (its prompt file and images).
        inception_weights: Inception weights file for FID (torch-fidelity's ``pt_inception-2015-12-05`` file).
        clip_path: Local transformers CLIP folder for CLIP score and CLIP-IQA.
        lpips_weights: Local weights of the LPIPS network.
        image_reward_path: Local ImageReward checkpoint (needs the optional ``image-reward`` package).
        fid_cache: Folder of cached FID reference statistics (one file per benchmark and extractor).
    """

    prompt_offset: int = 512
    num_prompts: int = 4
    seed: int = 1234
    num_tokens: int = 12288
    benchmarks: list[str] = field(default_factory=list)
    num_samples: int = 0
    gt_metrics: list[str] = field(default_factory=lambda: list(EVAL_METRICS), metadata={"choices": EVAL_METRICS})
    ref_root: str = ""
    gen_root: str = ""
    artifacts: str = ""
    enable_weight_quant: bool = False
    enable_activation_quant: bool = False
    enable_kv_quant: bool = False
    mjhq_root: str = ""
    dci_root: str = ""
    inception_weights: str = ""
    clip_path: str = ""
    lpips_weights: str = ""
    image_reward_path: str = ""
    fid_cache: str = "runs/cache/fid"

    def check(self) -> Issues:
        if self.prompt_offset < 0:
            yield "prompt_offset", f"must be >= 0, got {self.prompt_offset}"
        if self.num_prompts < 1:
            yield "num_prompts", f"must be >= 1, got {self.num_prompts}"
        if self.num_tokens < 1:
            yield "num_tokens", f"must be >= 1, got {self.num_tokens}"
        if self.num_samples < 0:
            yield "num_samples", f"must be >= 0 (0: every sample), got {self.num_samples}"


@dataclass
class OutputConfig:
    """Where results go.

    Args:
        root: Root folder of all runs.
        dirname: Run folder name under ``root`` (empty: derived from the model name and the config files).
        resume: Continue an interrupted run with the same config from its last finished block.
    """

    root: str = "runs"
    dirname: str = ""
    resume: bool = True

    def check(self) -> Issues:
        if not self.root:
            yield "root", "must not be empty"
        if self.dirname.startswith(("/", "~")) or ".." in self.dirname.replace("\\", "/").split("/"):
            yield "dirname", f"must be a relative folder name under output.root, got {self.dirname!r}"


@dataclass
class MemoryConfig:
    """GPU memory of the calibration apps (``ptq_infinity``, ``calibrate_cache_quantization``).

    Offloading keeps the transformer's blocks in (pinned) host memory: calibration moves one block at a time to
    the GPU, the generations (capture, held-out references, fidelity, KV recording) keep the first blocks resident
    as the budget allows and stream the others; the text encoder and VAE are freed once the prompts are encoded;
    the captured activations stay in host memory when they do not fit next to the block. The artifacts are the
    same either way.

    Args:
        offload: ``auto``: on when the full-precision model would not fit ``gpu_budget_gib`` while it generates;
            ``on`` / ``off`` force it.
        gpu_budget_gib: GPU memory the run may use, in GiB (0: what the device has).
        resident_blocks: Blocks kept on the GPU during the generations when offloading (-1: as many as the budget
            allows).
    """

    offload: str = one_of("auto", ("auto", "on", "off"))
    gpu_budget_gib: float = 0.0
    resident_blocks: int = -1

    def check(self) -> Issues:
        if self.gpu_budget_gib < 0:
            yield "gpu_budget_gib", f"must be >= 0 (0: the device's memory), got {self.gpu_budget_gib}"
        if self.resident_blocks < -1:
            yield "resident_blocks", f"must be >= -1 (-1: from the budget), got {self.resident_blocks}"


@dataclass
class RunConfig:
    """The whole resolved configuration of one run."""

    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    collect: CollectConfig = field(default_factory=CollectConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    kv: KVCacheConfig = field(default_factory=KVCacheConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)

    def check(self) -> Issues:
        # Evaluating on calibration prompts would hide overfitting of the searched scales.
        if self.eval.prompt_offset < self.collect.pool_size():
            what = ("collect.num_prompts" if self.collect.selection != "dgc" else
                    "the DGC pool (collect.candidates, 0: four times collect.num_prompts)")
            yield "eval.prompt_offset", (
                f"evaluation prompts must not overlap the calibration prompts: prompt_offset {self.eval.prompt_offset}"
                f" < {what} {self.collect.pool_size()}"
            )


# Dotted keys whose values are filesystem paths: ``~`` and ``${ENV_VAR}`` are expanded in them.
PATH_KEYS = (
    "eval.ref_root",
    "eval.gen_root",
    "eval.artifacts",
    "eval.mjhq_root",
    "eval.dci_root",
    "eval.inception_weights",
    "eval.clip_path",
    "eval.lpips_weights",
    "eval.image_reward_path",
    "eval.fid_cache",
    "pipeline.transformer_path",
    "pipeline.vae_path",
    "pipeline.text_encoder_path",
    "collect.prompts",
    "collect.cache_dir",
    "kv.calib_path",
    "kv.artifact_dir",
    "output.root",
)
