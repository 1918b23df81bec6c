"""Names of the Infinity transformer's linear layers -> layer kinds (the vocabulary of ``quant.*.skips``).

Inside block ``block_chunks.{k}.module.{j}`` the linears are, in execution (and calibration) order::

    sa.mat_qkv (sa_qkv)  sa.proj (sa_out)  ca.mat_q (ca_q)  ca.mat_kv (ca_kv)  ca.proj (ca_out)
    ffn.fc1 (ffn_up)  ffn.fc2 (ffn_down)

Outside the blocks: ``word_embed`` (embed), ``shared_ada_lin.1`` and ``head_nm.ada_lin.1`` (adaln),
``text_proj_for_sos.ca.{mat_kv,proj}`` and ``text_proj_for_ca.{0,2}`` (text_proj), ``head`` (head).
"""

from __future__ import annotations

import re

from torch import nn

from ..config.schema import LAYER_KINDS

__all__ = [
    "BLOCK_KINDS",
    "BLOCK_LAYERS",
    "OTHER_LAYERS",
    "block_layer_names",
    "block_linear_shapes",
    "is_block_kind",
    "layer_kind",
    "linear_layers",
]

# (suffix inside a block, kind), in execution order: the order in which PTQ calibrates them.
BLOCK_LAYERS: tuple[tuple[str, str], ...] = (
    ("sa.mat_qkv", "sa_qkv"),
    ("sa.proj", "sa_out"),
    ("ca.mat_q", "ca_q"),
    ("ca.mat_kv", "ca_kv"),
    ("ca.proj", "ca_out"),
    ("ffn.fc1", "ffn_up"),
    ("ffn.fc2", "ffn_down"),
)
BLOCK_KINDS = tuple(kind for _, kind in BLOCK_LAYERS)

# Exact names of the linears outside the blocks.
OTHER_LAYERS: dict[str, str] = {
    "word_embed": "embed",
    "shared_ada_lin.1": "adaln",
    "head_nm.ada_lin.1": "adaln",
    "text_proj_for_sos.ca.mat_kv": "text_proj",
    "text_proj_for_sos.ca.proj": "text_proj",
    "text_proj_for_ca.0": "text_proj",
    "text_proj_for_ca.2": "text_proj",
    "head": "head",
}

_BLOCK_NAME = re.compile(r"^block_chunks\.(\d+)\.module\.(\d+)\.(.+)$")
_SUFFIX_KIND = dict(BLOCK_LAYERS)

assert set(BLOCK_KINDS) | set(OTHER_LAYERS.values()) == set(LAYER_KINDS), "layer kinds out of sync with the schema"


def layer_kind(name: str) -> str:
    """Kind of the linear layer called ``name`` (a module name of the transformer); ValueError if unknown."""
    match = _BLOCK_NAME.match(name)
    if match:
        kind = _SUFFIX_KIND.get(match.group(3))
        if kind is None:
            raise ValueError(f"{name!r} is not a linear layer of an Infinity block (known: {', '.join(_SUFFIX_KIND)})")
        return kind
    kind = OTHER_LAYERS.get(name)
    if kind is None:
        raise ValueError(f"{name!r} is not a linear layer of the Infinity transformer")
    return kind


def block_index(name: str, blocks_per_chunk: int) -> int | None:
    """Global block index of a module name inside ``block_chunks.{k}.module.{j}``, or None outside the blocks."""
    match = _BLOCK_NAME.match(name)
    return None if match is None else int(match.group(1)) * blocks_per_chunk + int(match.group(2))


def block_linear_shapes(arch) -> dict[str, tuple[int, int]]:
    """``(out_features, in_features)`` of each block linear kind of an architecture (``infinity.arch`` preset)."""
    c, hidden = arch.embed_dim, arch.mlp_hidden
    return {"sa_qkv": (3 * c, c), "sa_out": (c, c), "ca_q": (c, c), "ca_kv": (2 * c, c), "ca_out": (c, c),
            "ffn_up": (hidden, c), "ffn_down": (c, hidden)}


def is_block_kind(kind: str) -> bool:
    return kind in BLOCK_KINDS


def block_layer_names(block_name: str) -> list[tuple[str, str]]:
    """``(full module name, kind)`` of the linears of one block, in calibration order."""
    return [(f"{block_name}.{suffix}", kind) for suffix, kind in BLOCK_LAYERS]


def linear_layers(model: nn.Module) -> dict[str, str]:
    """Every linear layer of ``model`` (``nn.Linear`` or a quantized replacement: any module with ``in_features``
    and ``out_features``) -> kind.

    Raises ValueError naming a linear layer that has no kind, so a changed model layout fails loudly.
    """
    return {
        name: layer_kind(name)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) or (hasattr(module, "in_features") and hasattr(module, "out_features"))
    }
