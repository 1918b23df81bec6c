"""Text-to-image pipeline: T5 text encoder -> Infinity transformer (KV-cached CFG sampler) -> BSQ-VAE decoder.

``load_pipeline`` builds the three parts for an architecture preset from released files or seeded random
weights; ``InfinityPipeline.generate`` returns uint8 RGB images with per-stage timings.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from .arch import InfinityArch, get_arch
from .checkpoints import load_transformer, random_transformer, resolve_device, resolve_dtype
from .model import Infinity
from .sampler import SampleResult, sample
from .schedules import get_scale_schedule

__all__ = [
    "FLAN_T5_XL_CONFIG",
    "GenerationResult",
    "InfinityPipeline",
    "images_to_uint8_rgb",
    "load_pipeline",
    "pipeline_from_config",
    "random_flan_t5_xl",
    "vae_config_for",
]

logger = logging.getLogger(__name__)

# Public google/flan-t5-xl encoder configuration (T5 v1.1 XL layout); output width 2048.
FLAN_T5_XL_CONFIG = {
    "vocab_size": 32128,
    "d_model": 2048,
    "d_kv": 64,
    "d_ff": 5120,
    "num_layers": 24,
    "num_heads": 32,
    "relative_attention_num_buckets": 32,
    "relative_attention_max_distance": 128,
    "layer_norm_epsilon": 1e-6,
    "feed_forward_proj": "gated-gelu",
}

_VAE_FOR_ARCH = {"2b": "d32", "8b": "d14_patchify", "tiny_p0": "tiny_golden", "tiny_p1": "tiny_golden"}


def vae_config_for(arch: InfinityArch):
    """The VAE architecture that goes with a transformer preset."""
    from .vae import VAE_CONFIGS

    if arch.name == "tiny":
        from .tiny import tiny_vae_config

        cfg = tiny_vae_config()
    elif arch.name in _VAE_FOR_ARCH:
        cfg = VAE_CONFIGS[_VAE_FOR_ARCH[arch.name]]
    else:
        raise ValueError(f"no VAE is known for architecture {arch.name!r}")
    if cfg.codebook_dim != arch.vae_bits or cfg.stride != arch.vae_stride:
        raise ValueError(f"VAE {cfg.name} (d={cfg.codebook_dim}, stride {cfg.stride}) does not fit arch {arch.name}")
    return cfg


def images_to_uint8_rgb(image: torch.Tensor) -> torch.Tensor:
    """Decoded ``[B, 3, H, W]`` in [-1, 1] -> ``[B, H, W, 3]`` uint8 RGB (``(x+1)/2*255`` truncated, as upstream)."""
    x = (image.float().clamp(-1.0, 1.0) + 1) / 2
    return (x.permute(0, 2, 3, 1) * 255).to(torch.uint8)


@dataclass
class GenerationResult:
    """Images ``[B, H, W, 3]`` uint8 RGB (on the CPU), the sampler output, seconds per stage."""

    images: torch.Tensor
    sample: SampleResult
    timings: dict[str, float] = field(default_factory=dict)


class InfinityPipeline:
    def __init__(
        self,
        transformer: Infinity,
        vae,
        text_encoder,
        arch: InfinityArch,
        cuda_graphs: bool = False,
        kv_reserve_last: bool = False,
        vae_tile_rows: int | None = None,
    ):
        self.transformer = transformer
        # None: the plain decode; rows per band of the tiled decode otherwise (BSQVAE.decode).
        self.vae_tile_rows = vae_tile_rows
        self.vae = vae
        self.text_encoder = text_encoder
        self.arch = arch
        self.cuda_graphs = cuda_graphs
        self.kv_reserve_last = kv_reserve_last

    @property
    def device(self) -> torch.device:
        return self.transformer.device

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @torch.no_grad()
    def generate(
        self,
        prompts: Sequence[str],
        seed: int | None = 0,
        cfg: float | Sequence[float] = 3.0,
        tau: float | Sequence[float] = 0.5,
        top_k: int = 900,
        top_p: float = 0.97,
        pn: str | None = None,
        h_div_w: float = 1.0,
        return_logits: bool = False,
        cuda_graphs: bool | None = None,
    ) -> GenerationResult:
        """Generate one image per prompt. ``pn`` defaults to the architecture's preset ('1M' for 2B/8B);
        ``cuda_graphs`` defaults to the pipeline's setting (replay of per-scale CUDA graphs on GPU)."""
        if isinstance(prompts, str):
            prompts = [prompts]
        schedule = get_scale_schedule(pn or self.arch.default_pn, h_div_w)
        timings = {}
        self._sync()
        start = time.perf_counter()
        text = self.text_encoder.encode(list(prompts))
        self._sync()
        timings["text_encoder"] = time.perf_counter() - start
        start = time.perf_counter()
        result = sample(
            self.transformer,
            text.kv_compact,
            text.lens,
            schedule,
            cfg=cfg,
            tau=tau,
            top_k=top_k,
            top_p=top_p,
            seed=seed,
            h_div_w=h_div_w,
            return_logits=return_logits,
            cuda_graphs=self.cuda_graphs if cuda_graphs is None else cuda_graphs,
            kv_reserve_last=self.kv_reserve_last,
        )
        self._sync()
        timings["transformer"] = time.perf_counter() - start
        start = time.perf_counter()
        tiled = self.vae_tile_rows is not None
        image = self.vae.decode(result.summed_codes, tiled=tiled, tile_rows=self.vae_tile_rows)
        images = images_to_uint8_rgb(image).cpu()
        self._sync()
        timings["vae_decode"] = time.perf_counter() - start
        timings["total"] = sum(timings.values())
        return GenerationResult(images, result, timings)


def random_flan_t5_xl(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float16, seed: int = 0):
    """A flan-t5-xl-sized T5 encoder with seeded random weights (for benchmarks without the real files), built on
    the meta device and initialised in place on ``device``; tokenised with the shipped tiny tokenizer."""
    from transformers import T5Config, T5EncoderModel

    from .text import T5_MAX_LENGTH, TextEncoder, load_tiny_tokenizer

    device = torch.device(device)
    config = T5Config(**FLAN_T5_XL_CONFIG, is_encoder_decoder=False, use_cache=False, dropout_rate=0.0)
    with torch.device("meta"):
        model = T5EncoderModel(config)
    # Cast while still on the meta device: materialising float32 first would need twice the final memory.
    model = model.to(dtype).to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(int(seed))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("layer_norm.weight"):
                param.fill_(1.0)
            elif param.dim() == 2 and "embed" not in name and name != "shared.weight":
                param.normal_(0.0, param.shape[1] ** -0.5, generator=gen)
            else:
                param.normal_(0.0, 1.0, generator=gen)
    return TextEncoder(model.eval(), load_tiny_tokenizer(T5_MAX_LENGTH), max_length=T5_MAX_LENGTH)


def load_pipeline(
    arch: str | InfinityArch = "tiny",
    transformer_path: str | None = None,
    vae_path: str | None = None,
    text_encoder_path: str | None = None,
    random_init: bool = False,
    seed: int = 0,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype = "auto",
    release_text_encoder: bool = False,
    text_cache_size: int = 16,
    nonblock_dtype: str | torch.dtype = "float32",
    transformer: Infinity | None = None,
    vae_tile_rows: int | None = None,
) -> InfinityPipeline:
    """Build the pipeline of a preset.

    ``tiny`` is the embedded default (:mod:`infinity.tiny`, weights from ``seed``; a given ``transformer_path``
    still overrides them). For ``2b``/``8b`` each part comes from its path, or, with ``random_init``, from seeded
    random weights (the text encoder then is a random flan-t5-xl-sized T5 unless ``text_encoder_path`` is given).
    Blocks and VAE run in ``dtype`` (``auto``: bfloat16 on CUDA, float32 on CPU); text projections and head in
    ``nonblock_dtype`` (:mod:`infinity.precision`); T5 in float16 on CUDA. ``release_text_encoder`` frees the T5
    between generations (:class:`infinity.text_cache.ReleasingTextEncoder`, ``text_cache_size`` prompt lists of
    features kept). ``vae_tile_rows`` decodes in bands of that many rows (``BSQVAE.decode(tiled=True)``). A given ``transformer`` (e.g. a quantized model built from its artifacts) is used as it is
    and no transformer file is read.
    """
    from .text import TextEncoder
    from .vae import load_vae, random_vae

    arch = get_arch(arch)
    device = resolve_device(device)
    block_dtype = resolve_dtype(dtype, device)
    vae_cfg = vae_config_for(arch)
    t5_dtype = torch.float16 if device.type == "cuda" else torch.float32
    logger.info("building Infinity-%s pipeline on %s (blocks %s)", arch.name, device, block_dtype)

    if transformer is not None:
        pass
    elif transformer_path:
        transformer = load_transformer(transformer_path, arch, device, block_dtype)
    elif arch.name == "tiny":
        from .tiny import build_tiny_transformer

        transformer = build_tiny_transformer(seed, device, block_dtype)
    elif random_init:
        transformer = random_transformer(arch, seed, device, block_dtype)
    else:
        raise ValueError(f"Infinity-{arch.name}: give transformer_path or set random_init")

    if vae_path:
        vae = load_vae(vae_path, vae_cfg, device=device, dtype=block_dtype, strict_encoder=False)
    elif random_init or arch.name == "tiny":
        vae = random_vae(vae_cfg, seed, device=device, dtype=block_dtype, with_encoder=False)
    else:
        raise ValueError(f"Infinity-{arch.name}: give vae_path or set random_init")

    if text_encoder_path:
        def load_text_encoder():
            return TextEncoder.from_pretrained(text_encoder_path, device=device, dtype=t5_dtype)
    elif arch.name == "tiny":
        from .tiny import build_tiny_text_encoder

        def load_text_encoder():
            return build_tiny_text_encoder(seed, device)
    elif random_init:
        def load_text_encoder():
            return random_flan_t5_xl(device, t5_dtype, seed)
    else:
        raise ValueError(f"Infinity-{arch.name}: give text_encoder_path or set random_init")
    if release_text_encoder:
        from .text_cache import ReleasingTextEncoder

        text_encoder = ReleasingTextEncoder(load_text_encoder, cache_size=text_cache_size)
    else:
        text_encoder = load_text_encoder()
    if text_encoder.out_dim != arch.text_channels:
        raise ValueError(f"text encoder width {text_encoder.out_dim} != transformer text_channels {arch.text_channels}")
    text_encoder.max_length = min(text_encoder.max_length, arch.text_maxlen)
    if nonblock_dtype not in ("float32", torch.float32):
        from .precision import cast_nonblock_linears

        cast_nonblock_linears(transformer, nonblock_dtype)
    return InfinityPipeline(transformer, vae, text_encoder, arch, vae_tile_rows=vae_tile_rows)


def pipeline_from_config(pipeline_cfg, transformer: Infinity | None = None) -> InfinityPipeline:
    """Build from a ``PipelineConfig`` (the ``pipeline`` section of the run config); see ``load_pipeline`` for a
    given ``transformer``."""
    return load_pipeline(
        arch=pipeline_cfg.arch,
        transformer_path=pipeline_cfg.transformer_path,
        vae_path=pipeline_cfg.vae_path,
        text_encoder_path=pipeline_cfg.text_encoder_path,
        random_init=pipeline_cfg.random_init,
        seed=pipeline_cfg.seed,
        device=pipeline_cfg.device,
        dtype=pipeline_cfg.dtype,
        release_text_encoder=pipeline_cfg.release_text_encoder,
        text_cache_size=pipeline_cfg.text_cache_size,
        nonblock_dtype=pipeline_cfg.nonblock_dtype,
        transformer=transformer,
        vae_tile_rows=pipeline_cfg.vae_tile_rows if pipeline_cfg.vae_tiled else None,
    )
