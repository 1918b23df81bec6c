"""T5 text conditioning of Infinity (ARCHITECTURE §2.1, §2.2): encoder wrapper, varlen packing, CFG batch.

`TextEncoder.encode(prompts)` tokenises each prompt to `max_length` tokens (T5 padding/truncation, final `</s>`
counted as real), runs the T5 encoder, and keeps only the real rows of `last_hidden_state` (float32), concatenated
over the batch: padding never reaches the model. Two sources of weights:

* `TextEncoder.from_pretrained(folder)`: a local google/flan-t5-xl folder (never downloads);
* `TextEncoder.tiny(seed)`: a small seeded-random T5 encoder with the SentencePiece model shipped in
  `infinity/assets/` (rebuild it with `python -m infinity.tools.build_tiny_tokenizer`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = [
    "ASSETS_DIR",
    "TextBatch",
    "TextEncoder",
    "cfg_text_batch",
    "load_tiny_tokenizer",
    "pack_features",
    "tiny_t5_config",
]

logger = logging.getLogger(__name__)

ASSETS_DIR = Path(__file__).resolve().parent / "assets"
T5_MAX_LENGTH = 512

_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
_TOKENIZER_FILES = ("spiece.model", "tokenizer.json")


# ----------------------------------------------------------------------------------------------------------------
# Packed text batch


@dataclass
class TextBatch:
    """Packed ("varlen") text features of B prompts.

    kv_compact: `[N, Ct5]` float32, rows of prompt b are `cu_seqlens[b] : cu_seqlens[b+1]`.
    lens: real token count per prompt (python ints, `</s>` included).
    cu_seqlens: int32 `[B+1]`, `[0, len_0, len_0+len_1, ...]`.
    max_seqlen: `max(lens)`.
    """

    kv_compact: torch.Tensor
    lens: list[int]
    cu_seqlens: torch.Tensor
    max_seqlen: int

    def __post_init__(self) -> None:
        self.lens = [int(n) for n in self.lens]
        self.max_seqlen = int(self.max_seqlen)
        if self.kv_compact.dim() != 2:
            raise ValueError(f"TextBatch: kv_compact must be [N, C], got {tuple(self.kv_compact.shape)}")
        if not self.lens or min(self.lens) < 1:
            raise ValueError(f"TextBatch: every prompt needs at least one token, lens={self.lens}")
        if self.cu_seqlens.dtype != torch.int32 or tuple(self.cu_seqlens.shape) != (len(self.lens) + 1,):
            raise ValueError(
                f"TextBatch: cu_seqlens must be int32 [B+1={len(self.lens) + 1}], got {self.cu_seqlens.dtype} "
                f"{tuple(self.cu_seqlens.shape)}"
            )
        if sum(self.lens) != self.kv_compact.shape[0]:
            raise ValueError(f"TextBatch: sum(lens)={sum(self.lens)} != kv_compact rows {self.kv_compact.shape[0]}")
        if self.max_seqlen != max(self.lens):
            raise ValueError(f"TextBatch: max_seqlen={self.max_seqlen} != max(lens)={max(self.lens)}")

    @property
    def batch_size(self) -> int:
        return len(self.lens)

    @property
    def channels(self) -> int:
        return int(self.kv_compact.shape[1])

    def as_tuple(self) -> tuple[torch.Tensor, list[int], torch.Tensor, int]:
        """`(kv_compact, lens, cu_seqlens_k, max_seqlen_k)`, the upstream calling convention."""
        return self.kv_compact, list(self.lens), self.cu_seqlens, self.max_seqlen

    def to(self, device: torch.device | str) -> TextBatch:
        return TextBatch(self.kv_compact.to(device), list(self.lens), self.cu_seqlens.to(device), self.max_seqlen)

    def prompt(self, b: int) -> torch.Tensor:
        """Rows of prompt b, `[lens[b], Ct5]`."""
        start = int(sum(self.lens[:b]))
        return self.kv_compact[start : start + self.lens[b]]


def _cu_seqlens(lens: Sequence[int], device: torch.device | str | None = None) -> torch.Tensor:
    cu = [0]
    for n in lens:
        cu.append(cu[-1] + int(n))
    return torch.tensor(cu, dtype=torch.int32, device=device)


def pack_features(features: torch.Tensor, attention_mask: torch.Tensor) -> TextBatch:
    """Padded features `[B, L, C]` + right-padding mask `[B, L]` -> `TextBatch` (float32, first len_b rows kept)."""
    if features.dim() != 3 or attention_mask.shape != features.shape[:2]:
        raise ValueError(
            f"pack_features: features [B, L, C] and mask [B, L] expected, got {tuple(features.shape)} and "
            f"{tuple(attention_mask.shape)}"
        )
    mask = attention_mask.bool()
    lens = mask.sum(dim=1)
    # The mask must be a prefix of ones (T5 pads on the right); otherwise "first len_b rows" would be wrong.
    prefix = torch.arange(mask.shape[1], device=mask.device).unsqueeze(0) < lens.unsqueeze(1)
    if not torch.equal(prefix, mask):
        raise ValueError("pack_features: attention mask is not right-padded (ones then zeros) in every row")
    lens_list = [int(n) for n in lens.tolist()]
    kv = torch.cat([features[b, :n] for b, n in enumerate(lens_list)], dim=0).float()
    return TextBatch(kv, lens_list, _cu_seqlens(lens_list, kv.device), max(lens_list))


def cfg_text_batch(cond: TextBatch, cfg_uncond: torch.Tensor, negative: TextBatch | None = None) -> TextBatch:
    """Classifier-free-guidance batch of 2B prompts (§2.2): rows 0..B-1 conditional, B..2B-1 unconditional.

    Without `negative`, the unconditional text of prompt b is `cfg_uncond[:len_b]` (the learned
    `[text_maxlen, Ct5]` parameter, same lengths as the conditional prompt). With `negative` (B prompts, or one
    prompt used for every row) its features are appended instead. `cu_seqlens` continues from the conditional half.
    """
    kv = cond.kv_compact
    if cfg_uncond.dim() != 2 or cfg_uncond.shape[1] != cond.channels:
        raise ValueError(
            f"cfg_text_batch: cfg_uncond must be [text_maxlen, {cond.channels}], got {tuple(cfg_uncond.shape)}"
        )
    if negative is None:
        if cond.max_seqlen > cfg_uncond.shape[0]:
            raise ValueError(
                f"cfg_text_batch: a prompt has {cond.max_seqlen} tokens but cfg_uncond has only "
                f"{cfg_uncond.shape[0]} rows (text_maxlen); encode with max_length <= {cfg_uncond.shape[0]}"
            )
        uncond = cfg_uncond.detach().to(device=kv.device, dtype=kv.dtype)
        kv_uncond = torch.cat([uncond[:n] for n in cond.lens], dim=0)
        lens_uncond = list(cond.lens)
    else:
        if negative.channels != cond.channels:
            raise ValueError(f"cfg_text_batch: negative prompts have {negative.channels} channels, not {cond.channels}")
        if negative.batch_size == 1 and cond.batch_size > 1:
            kv_uncond = negative.kv_compact.repeat(cond.batch_size, 1)
            lens_uncond = negative.lens * cond.batch_size
        elif negative.batch_size == cond.batch_size:
            kv_uncond, lens_uncond = negative.kv_compact, list(negative.lens)
        else:
            raise ValueError(
                f"cfg_text_batch: {negative.batch_size} negative prompts for {cond.batch_size} prompts (need 1 or B)"
            )
        kv_uncond = kv_uncond.to(device=kv.device, dtype=kv.dtype)
    lens = list(cond.lens) + lens_uncond
    cu_uncond = _cu_seqlens(lens_uncond, cond.cu_seqlens.device)
    cu = torch.cat([cond.cu_seqlens, cu_uncond[1:] + cond.cu_seqlens[-1]])
    return TextBatch(torch.cat([kv, kv_uncond], dim=0), lens, cu, max(lens))


# ----------------------------------------------------------------------------------------------------------------
# Encoder


def _dtype_kwargs(dtype: torch.dtype) -> dict:
    """`from_pretrained` takes `dtype` in recent transformers and `torch_dtype` before 4.56."""
    import transformers

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}


def tiny_t5_config(d_model: int = 256, vocab_size: int = 1000, num_layers: int = 2, num_heads: int = 4):
    """Small flan-T5-style encoder config (gated-GELU FFN of width 2.5·d_model, RMS norm eps 1e-6, no dropout)."""
    from transformers import T5Config

    if d_model % num_heads != 0:
        raise ValueError(f"tiny_t5_config: d_model {d_model} is not divisible by num_heads {num_heads}")
    return T5Config(
        vocab_size=vocab_size,
        d_model=d_model,
        d_kv=d_model // num_heads,
        d_ff=int(d_model * 5 // 2),
        num_layers=num_layers,
        num_heads=num_heads,
        relative_attention_num_buckets=32,
        relative_attention_max_distance=128,
        dropout_rate=0.0,
        layer_norm_epsilon=1e-6,
        feed_forward_proj="gated-gelu",
        is_encoder_decoder=False,
        use_cache=False,
        tie_word_embeddings=False,
        pad_token_id=0,
        eos_token_id=1,
    )


def _seeded_t5_init(model: torch.nn.Module, seed: int) -> None:
    """Overwrite every parameter from a CPU generator (T5-like scales), so weights depend only on the seed."""
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    cfg = model.config
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layer_norm.weight"):
                value = torch.ones(p.shape)
            elif name.endswith("embed_tokens.weight") or name == "shared.weight":
                value = torch.randn(p.shape, generator=gen)
            elif name.endswith("relative_attention_bias.weight"):
                value = torch.randn(p.shape, generator=gen) * cfg.d_model**-0.5
            else:
                # Linear [out, in]: 1/sqrt(fan_in); queries also carry 1/sqrt(d_kv) since T5 scores are unscaled.
                std = p.shape[1] ** -0.5 * (cfg.d_kv**-0.5 if name.endswith("SelfAttention.q.weight") else 1.0)
                value = torch.randn(p.shape, generator=gen) * std
            p.copy_(value.to(p.dtype))


def _check_t5_folder(folder: Path) -> None:
    if not folder.is_dir():
        raise FileNotFoundError(f"T5 text encoder folder not found: {folder} (expected a local google/flan-t5-xl copy)")
    problems = []
    if not (folder / "config.json").is_file():
        problems.append("config.json")
    if not any((folder / f).is_file() for f in _WEIGHT_FILES):
        problems.append("weights (one of " + ", ".join(_WEIGHT_FILES) + ")")
    if not any((folder / f).is_file() for f in _TOKENIZER_FILES):
        problems.append("tokenizer (one of " + ", ".join(_TOKENIZER_FILES) + ")")
    if problems:
        raise FileNotFoundError(f"T5 text encoder folder {folder} lacks: " + "; ".join(problems))


class TextEncoder:
    """T5 encoder + tokenizer producing packed float32 features (`TextBatch`)."""

    def __init__(self, model: torch.nn.Module, tokenizer, max_length: int = T5_MAX_LENGTH, chunk_size: int = 16):
        if max_length < 1:
            raise ValueError(f"TextEncoder: max_length must be positive, got {max_length}")
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.max_length = int(max_length)
        self.chunk_size = int(chunk_size)

    # -- constructors -------------------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        folder: str | os.PathLike,
        device: torch.device | str = "cpu",
        dtype: torch.dtype | None = None,
        max_length: int = T5_MAX_LENGTH,
    ) -> TextEncoder:
        """Local flan-t5-xl folder (config, weights, tokenizer); never touches the network.

        dtype defaults to float16 on CUDA (as the released pipeline) and float32 elsewhere.
        """
        from transformers import AutoTokenizer, T5EncoderModel

        folder = Path(folder).expanduser()
        _check_t5_folder(folder)
        device = torch.device(device)
        if dtype is None:
            dtype = torch.float16 if device.type == "cuda" else torch.float32
        logger.info("loading T5 encoder from %s (%s, %s)", folder, device, dtype)
        tokenizer = AutoTokenizer.from_pretrained(
            folder, legacy=True, local_files_only=True, model_max_length=max_length
        )
        model = T5EncoderModel.from_pretrained(folder, local_files_only=True, **_dtype_kwargs(dtype))
        return cls(model.to(device), tokenizer, max_length=max_length)

    @classmethod
    def tiny(
        cls,
        seed: int = 0,
        d_model: int = 256,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        max_length: int = 64,
        num_layers: int = 2,
        num_heads: int = 4,
    ) -> TextEncoder:
        """Seeded random T5 encoder (output width `d_model`) with the shipped tiny SentencePiece tokenizer.

        `max_length` bounds the tokens per prompt; keep it <= the transformer's `text_maxlen` (rows of
        `cfg_uncond`). Same seed -> same weights on every device.
        """
        from transformers import T5EncoderModel

        tokenizer = load_tiny_tokenizer(max_length)
        config = tiny_t5_config(d_model=d_model, vocab_size=len(tokenizer), num_layers=num_layers, num_heads=num_heads)
        with torch.random.fork_rng(devices=[]):  # transformers' own init must not disturb the caller's RNG
            model = T5EncoderModel(config)
        _seeded_t5_init(model, seed)
        return cls(model.to(device=device, dtype=dtype), tokenizer, max_length=max_length)

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        """Write model + tokenizer in the layout `from_pretrained` reads."""
        self.model.save_pretrained(folder)
        self.tokenizer.save_pretrained(folder)

    # -- properties ---------------------------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def out_dim(self) -> int:
        """Feature width Ct5 (= d_model)."""
        return int(self.model.config.d_model)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> TextEncoder:
        self.model.to(device=device, dtype=dtype)
        return self

    # -- encoding -----------------------------------------------------------------------------------------------

    def tokenize(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """`input_ids`, `attention_mask` `[B, max_length]` (padding='max_length', truncation, final `</s>`)."""
        if isinstance(prompts, str):
            raise TypeError("TextEncoder: pass a list of prompts, not a single string")
        if not prompts:
            raise ValueError("TextEncoder: empty prompt list")
        tok = self.tokenizer(
            list(prompts), padding="max_length", max_length=self.max_length, truncation=True, return_tensors="pt"
        )
        return tok["input_ids"], tok["attention_mask"]

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> TextBatch:
        """Prompts -> packed features on the encoder's device (processed in chunks of `chunk_size` prompts)."""
        ids, mask = self.tokenize(prompts)
        device = self.device
        batches = []
        for start in range(0, ids.shape[0], self.chunk_size):
            i = ids[start : start + self.chunk_size].to(device)
            m = mask[start : start + self.chunk_size].to(device)
            hidden = self.model(input_ids=i, attention_mask=m).last_hidden_state
            batches.append(pack_features(hidden, m))
        if len(batches) == 1:
            return batches[0]
        lens = [n for b in batches for n in b.lens]
        kv = torch.cat([b.kv_compact for b in batches], dim=0)
        return TextBatch(kv, lens, _cu_seqlens(lens, kv.device), max(lens))

    def __call__(self, prompts: Sequence[str]) -> TextBatch:
        return self.encode(prompts)


def load_tiny_tokenizer(max_length: int = 64):
    """The shipped SentencePiece tokenizer (T5 ids: <pad> 0, </s> 1, <unk> 2; no sentinel tokens)."""
    from transformers import T5Tokenizer

    if not (ASSETS_DIR / "spiece.model").is_file():
        raise FileNotFoundError(
            f"tiny tokenizer asset missing: {ASSETS_DIR / 'spiece.model'} "
            "(rebuild with `python -m infinity.tools.build_tiny_tokenizer`)"
        )
    return T5Tokenizer.from_pretrained(
        ASSETS_DIR, legacy=True, extra_ids=0, local_files_only=True, model_max_length=max_length
    )
