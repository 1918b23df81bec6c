"""Step-aware calibration data: what the transformer blocks see while the full-precision model generates.

For every calibration prompt the real KV-cached CFG sampler (``infinity.sampler.sample``, release sampling
settings of ``pipeline.*``, seed ``collect.seed + prompt index``, one prompt = one batch of its conditional and
unconditional rows) generates the image while a forward pre-hook on the first block records

* the first block's input ``x [rows, L_s, C]`` (float32 residual stream) at every captured scale,
* the text conditioning the blocks receive: the cross-attention memory ``ca_kv [N, C]`` with its ``lens`` and
  the shared AdaLN modulation ``gss [rows, 1, 6, C]``.

Everything else a block needs is recomputable: RoPE from the schedule, and the self-attention KV prefix by
replaying the block over the earlier scales (``calibrate_blocks``). ``collect.num_scales`` keeps the first N
scales (the generation stops there). The capture of one prompt is a :class:`PromptCapture`; at 8B it holds
``2 x 10521 x 3584`` float32 values (300 MB), stored on disk and loaded prompt by prompt.

Cache: ``collect.cache_dir/<key>/`` with ``key.json`` (what the key was computed from) and one
``prompt_XXXX.pt`` per prompt, each written atomically. The key covers the model identity (architecture, file
paths, seed, random init, block dtype, device type, fingerprints of the transformer and text-encoder weights),
the prompt texts, the sampling settings and, on the CPU, torch's thread count, so any change captures anew; a
file that does not validate is captured again.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch
import yaml
from torch import nn
from tqdm import tqdm

from ...utils.files import load_pt, save_pt, sha256_json, write_json

__all__ = [
    "CAPTURE_FORMAT",
    "CaptureError",
    "CaptureSettings",
    "PromptCapture",
    "PromptFileError",
    "capture_key_data",
    "capture_prompt",
    "check_capture_finite",
    "load_or_capture",
    "load_prompt_set",
    "model_identity",
    "parse_prompt_yaml",
    "weights_fingerprint",
]

logger = logging.getLogger(__name__)

CAPTURE_FORMAT = "var-compressor-capture/1"
_FINGERPRINT_SAMPLES = 1024


# ------------------------------------------------------------------------------------------------ prompts


class PromptFileError(ValueError):
    """A prompt set that cannot be used; the message names the config key, the file and the id."""


def parse_prompt_yaml(text: str, source: str, key: str = "collect.prompts") -> list[tuple[str, str]]:
    """``(id, caption)`` pairs of a YAML ``id: caption`` mapping, in file order, both kept as written: YAML would
    read an id like ``0512`` as the octal number 330, silently keep the last of two equal ids, and turn an empty
    caption into the prompt "None"."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as error:
        where = getattr(error, "problem_mark", None)
        line = f" (line {where.line + 1})" if where is not None else ""
        raise PromptFileError(f"{key}: {source}: invalid YAML{line}: {getattr(error, 'problem', error)}") from None
    if not isinstance(node, yaml.MappingNode) or not node.value:
        raise PromptFileError(f"{key}: {source} must be a non-empty mapping of id: caption (a non-empty YAML "
                              "mapping, not a list or a single value)")
    prompts, seen = [], {}
    for key_node, value_node in node.value:
        if not isinstance(key_node, yaml.ScalarNode) or not key_node.value.strip():
            raise PromptFileError(f"{key}: {source} line {key_node.start_mark.line + 1}: an id must be a plain "
                                  "non-empty scalar")
        pid = key_node.value.strip()
        line = key_node.start_mark.line + 1
        if pid in seen:
            raise PromptFileError(f"{key}: {source} line {line}: duplicate id {pid!r} (first on line {seen[pid]})")
        seen[pid] = line
        if not isinstance(value_node, yaml.ScalarNode):
            raise PromptFileError(f"{key}: {source} line {line}: the caption of id {pid!r} must be text")
        caption = value_node.value.strip()
        if not caption or (value_node.tag == "tag:yaml.org,2002:null" and value_node.style is None):
            raise PromptFileError(f"{key}: {source} line {line}: empty caption for id {pid!r}")
        prompts.append((pid, caption))
    return prompts


def load_prompt_set(spec: str, offset: int, count: int, key: str = "collect.prompts") -> list[tuple[str, str]]:
    """``count`` ``(id, caption)`` pairs from index ``offset`` of a built-in prompt set or a YAML ``id: caption`` file
    (``parse_prompt_yaml``); every problem is a ``PromptFileError`` naming ``key`` and the file."""
    builtin = resources.files("deepcompressor") / "data" / "prompts" / f"{spec}.yaml"
    if builtin.is_file():
        source, text = f"built-in prompt set {spec!r}", builtin.read_text(encoding="utf-8")
    else:
        path = Path(spec)
        if not path.is_file():
            raise PromptFileError(f"{key}: {spec!r} is neither a built-in prompt set nor a YAML file")
        try:
            source, text = str(path), path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            raise PromptFileError(f"{key}: {path}: cannot be read ({error})") from None
    prompts = parse_prompt_yaml(text, source, key)
    if offset < 0 or count < 0 or offset + count > len(prompts):
        raise PromptFileError(f"{key}: prompts {offset}..{offset + count - 1} requested, but {source} holds "
                              f"{len(prompts)}")
    return prompts[offset : offset + count]


# ------------------------------------------------------------------------------------------------ identity


def weights_fingerprint(module: nn.Module) -> str:
    """Hash of every tensor's name, shape and up to 1024 evenly spaced values rounded to bfloat16.

    Cheap at 8B (no full pass over the weights) and independent of the dtype the model runs in (a float32
    copy of a bfloat16 checkpoint has the same fingerprint).
    """
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        flat = tensor.detach().reshape(-1)
        digest.update(f"{name}:{tuple(tensor.shape)};".encode())
        if flat.numel() == 0:
            continue
        if not flat.is_floating_point():
            flat = flat.float()
        count = min(_FINGERPRINT_SAMPLES, flat.numel())
        # integer arithmetic: the same positions on every device (float linspace overshoots for huge tensors)
        index = torch.arange(count, dtype=torch.int64) * (flat.numel() - 1) // max(count - 1, 1)
        index = index.to(flat.device)
        values = flat.index_select(0, index).to(torch.bfloat16).view(torch.int16).cpu().numpy()
        digest.update(np.ascontiguousarray(values).tobytes())
    return digest.hexdigest()


def model_identity(pipeline_cfg, transformer: nn.Module, text_encoder) -> dict:
    """What identifies the calibrated model (stored in caches, run state and artifact manifests)."""
    p = pipeline_cfg
    if hasattr(text_encoder, "model"):
        text_fingerprint = weights_fingerprint(text_encoder.model)
    else:  # an encoder that is freed between generations (pipeline.release_text_encoder)
        with text_encoder.loaded() as encoder:
            text_fingerprint = weights_fingerprint(encoder.model)
    return {
        "arch": p.arch,
        "transformer_path": p.transformer_path,
        "text_encoder_path": p.text_encoder_path,
        "random_init": p.random_init,
        "seed": p.seed,
        "block_dtype": str(transformer.block_dtype).removeprefix("torch."),
        "device_type": transformer.device.type,
        "transformer_fingerprint": weights_fingerprint(transformer),
        "text_encoder_fingerprint": text_fingerprint,
    }


# ------------------------------------------------------------------------------------------------ capture


@dataclass(frozen=True)
class CaptureSettings:
    """Sampling settings of the calibration generations (release settings of ``pipeline.*``)."""

    schedule: tuple[tuple[int, int, int], ...]
    num_scales: int  # captured scales (a prefix of the schedule)
    cfg: float
    tau: float
    top_k: int
    top_p: float
    h_div_w: float
    seed: int

    @classmethod
    def from_config(cls, cfg) -> CaptureSettings:
        from infinity.schedules import get_scale_schedule

        p = cfg.pipeline
        schedule = tuple(tuple(int(v) for v in s) for s in get_scale_schedule(p.pn, p.h_div_w))
        wanted = cfg.collect.num_scales
        num_scales = len(schedule) if wanted == 0 else min(wanted, len(schedule))
        return cls(schedule, num_scales, p.cfg, p.tau, p.top_k, p.top_p, p.h_div_w, cfg.collect.seed)

    def as_dict(self) -> dict:
        return {
            "schedule": [list(s) for s in self.schedule],
            "num_scales": self.num_scales,
            "cfg": self.cfg,
            "tau": self.tau,
            "top_k": self.top_k,
            "top_p": self.top_p,
            "h_div_w": self.h_div_w,
            "seed": self.seed,
        }


@dataclass
class PromptCapture:
    """What the first block saw while one prompt was generated.

    Attributes:
        xs: Per captured scale the first block's input ``[rows, L_s, C]`` float32 (rows = 2 with CFG: the
            conditional row, then the unconditional one).
        ca_kv: Cross-attention memory ``[N, C]`` float32 (packed rows of all CFG rows).
        lens: Text tokens per row.
        gss: Shared AdaLN modulation ``[rows, 1, 6, C]`` float32.
    """

    xs: list[torch.Tensor]
    ca_kv: torch.Tensor
    lens: list[int]
    gss: torch.Tensor

    @property
    def rows(self) -> int:
        return self.xs[0].shape[0]

    def to(self, device) -> PromptCapture:
        return PromptCapture([x.to(device) for x in self.xs], self.ca_kv.to(device), list(self.lens),
                             self.gss.to(device))

    def state(self) -> dict:
        return {"xs": self.xs, "ca_kv": self.ca_kv, "lens": list(self.lens), "gss": self.gss}

    @classmethod
    def from_state(cls, state: dict, settings: CaptureSettings, width: int, source: str) -> PromptCapture:
        """Validate a stored capture against the settings and the model width (ValueError naming ``source``)."""
        try:
            xs, ca_kv, lens, gss = state["xs"], state["ca_kv"], [int(n) for n in state["lens"]], state["gss"]
        except (KeyError, TypeError) as error:
            raise ValueError(f"{source}: not a prompt capture (missing {error})") from None
        sizes = [t * h * w for t, h, w in settings.schedule[: settings.num_scales]]
        if not isinstance(xs, list) or len(xs) != len(sizes):
            raise ValueError(f"{source}: expected {len(sizes)} captured scales")
        rows = len(lens)
        for si, (x, size) in enumerate(zip(xs, sizes)):
            if tuple(x.shape) != (rows, size, width) or x.dtype != torch.float32:
                raise ValueError(f"{source}: scale {si} input has shape {tuple(x.shape)} {x.dtype}, expected "
                                 f"({rows}, {size}, {width}) float32")
        if tuple(ca_kv.shape) != (sum(lens), width) or tuple(gss.shape) != (rows, 1, 6, width):
            raise ValueError(f"{source}: text conditioning shapes {tuple(ca_kv.shape)} / {tuple(gss.shape)} do not "
                             f"fit lens {lens} and width {width}")
        return cls(list(xs), ca_kv, lens, gss)


class _CaptureComplete(Exception):
    """Raised from the hook once every wanted scale is captured (ends the generation early)."""


@torch.no_grad()
def capture_prompt(model, text_encoder, caption: str, settings: CaptureSettings, seed: int) -> PromptCapture:
    """Generate ``caption`` with the sampler and record the first block's inputs and the text conditioning."""
    from infinity.sampler import sample

    block = model.blocks()[0]
    xs: list[torch.Tensor] = []
    text: dict = {}

    def hook(_module, args):
        x, gss, context = args[0], args[1], args[2]
        if not text:
            text.update(ca_kv=context.ca_kv.detach().float().clone(), lens=list(context.lens),
                        gss=gss.detach().float().clone())
        xs.append(x.detach().float().clone())
        if len(xs) == settings.num_scales:
            raise _CaptureComplete

    batch = text_encoder.encode([caption])
    handle = block.register_forward_pre_hook(hook)
    try:
        sample(model, batch.kv_compact, batch.lens, [list(s) for s in settings.schedule], cfg=settings.cfg,
               tau=settings.tau, top_k=settings.top_k, top_p=settings.top_p, seed=seed, h_div_w=settings.h_div_w)
    except _CaptureComplete:
        pass
    finally:
        handle.remove()
    if len(xs) != settings.num_scales:
        raise RuntimeError(f"captured {len(xs)} scales, expected {settings.num_scales}")
    check_capture_finite(xs, text, caption)
    return PromptCapture(xs, text["ca_kv"], text["lens"], text["gss"])


class CaptureError(ValueError):
    """Calibration activations that cannot be used (non-finite values); the message names the prompt and tensor."""


def check_capture_finite(xs: list[torch.Tensor], text: dict, caption: str) -> None:
    """NaN / Inf in the first block's inputs or the text conditioning would poison every calibrated layer and show
    up only as NaN scales: stop here, naming the prompt and the scale."""
    short = caption if len(caption) <= 60 else caption[:57] + "..."
    for name in ("ca_kv", "gss"):
        if not bool(torch.isfinite(text[name]).all()):
            raise CaptureError(f"calibration prompt {short!r}: the text conditioning ({name}) has NaN or Inf values "
                               "(check the text encoder's weights)")
    for si, x in enumerate(xs):
        if not bool(torch.isfinite(x).all()):
            raise CaptureError(f"calibration prompt {short!r}: the block inputs of scale {si} have NaN or Inf values "
                               "(check the transformer's weights)")


def capture_key_data(identity: dict, prompts: list[tuple[str, str]], settings: CaptureSettings) -> dict:
    data = {"format": CAPTURE_FORMAT, "model": identity, "prompts": [list(p) for p in prompts],
            "settings": settings.as_dict()}
    if identity.get("device_type") == "cpu":
        # CPU products sum in an order that depends on the thread count: a capture made with another count differs
        # in its last bits, enough to move the tiny model's calibrated numbers, so it is not reused.
        data["cpu_threads"] = torch.get_num_threads()
    return data


def load_or_capture(model, text_encoder, prompts: list[tuple[str, str]], settings: CaptureSettings, identity: dict,
                    cache_dir: str | Path) -> tuple[list[PromptCapture], Path]:
    """The captures of ``prompts`` (on the CPU), from the cache when valid, generated (and cached) otherwise.

    Returns the captures and the cache folder.
    """
    key_data = capture_key_data(identity, prompts, settings)
    key = sha256_json(key_data)
    folder = Path(cache_dir) / key[:20]
    key_file = folder / "key.json"
    if key_file.is_file():
        try:
            stored = json.loads(key_file.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            stored = None
        if stored != json.loads(json.dumps(key_data)):
            logger.warning("%s does not match this capture's settings; capturing again", key_file)
            for path in folder.glob("prompt_*.pt"):
                path.unlink()
    write_json(key_file, key_data)
    width = model.arch.embed_dim
    captures: list[PromptCapture] = []
    generated = 0
    for index, (prompt_id, caption) in enumerate(tqdm(prompts, desc="calibration prompts", unit="prompt")):
        path = folder / f"prompt_{index:04d}.pt"
        capture = None
        if path.is_file():
            try:
                capture = PromptCapture.from_state(load_pt(path), settings, width, str(path))
            except ValueError as error:
                logger.warning("%s; capturing this prompt again", error)
        if capture is None:
            logger.debug("capturing prompt %s: %s", prompt_id, caption)
            capture = capture_prompt(model, text_encoder, caption, settings, settings.seed + index).to("cpu")
            save_pt(path, capture.state())
            generated += 1
        captures.append(capture)
    logger.info("calibration data: %d prompts x %d scales (%d generated, %d from the cache %s)", len(prompts),
                settings.num_scales, generated, len(prompts) - generated, folder)
    return captures, folder
