"""Layer names -> kinds: every linear of every preset has exactly the kind ``deepcompressor.nn.layer_map`` gives it."""

from __future__ import annotations

import pytest
from torch import nn

from deepcompressor.config.schema import LAYER_KINDS
from deepcompressor.nn.layer_map import BLOCK_LAYERS, block_layer_names, layer_kind, linear_layers

# Written out from the interface contract, not derived from the module under test.
OUTSIDE_BLOCKS = {
    "word_embed": "embed",
    "shared_ada_lin.1": "adaln",
    "head_nm.ada_lin.1": "adaln",
    "text_proj_for_sos.ca.mat_kv": "text_proj",
    "text_proj_for_sos.ca.proj": "text_proj",
    "text_proj_for_ca.0": "text_proj",
    "text_proj_for_ca.2": "text_proj",
    "head": "head",
}
INSIDE_BLOCK = {
    "sa.mat_qkv": "sa_qkv",
    "sa.proj": "sa_out",
    "ca.mat_q": "ca_q",
    "ca.mat_kv": "ca_kv",
    "ca.proj": "ca_out",
    "ffn.fc1": "ffn_up",
    "ffn.fc2": "ffn_down",
}


@pytest.mark.parametrize("arch", ["tiny", "2b", "8b"])
def test_every_linear_of_the_model_has_its_kind(arch):
    from infinity.checkpoints import build_meta_model

    model = build_meta_model(arch)
    linears = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    kinds = linear_layers(model)
    assert sorted(kinds) == sorted(linears)
    expected = dict(OUTSIDE_BLOCKS)
    for block in model.block_names():
        expected.update({f"{block}.{suffix}": kind for suffix, kind in INSIDE_BLOCK.items()})
    assert kinds == expected
    assert set(kinds.values()) == set(LAYER_KINDS)


def test_block_layers_are_in_execution_order():
    import torch
    from infinity.model import TextContext
    from infinity.tiny import build_tiny_transformer

    model = build_tiny_transformer(0, "cpu")
    block = model.blocks()[0]
    order = []
    handles = [module.register_forward_pre_hook(lambda m, a, name=name: order.append(name))
               for name, module in block.named_modules() if isinstance(module, nn.Linear)]
    c, half = model.arch.embed_dim, model.arch.head_dim // 2
    context = TextContext.build(torch.randn(3, c), [3])
    with torch.no_grad():
        block(torch.randn(1, 4, c), torch.zeros(1, 1, 6, c), context, (torch.ones(4, half), torch.zeros(4, half)))
    for handle in handles:
        handle.remove()
    assert order == [suffix for suffix, _ in BLOCK_LAYERS]
    assert [kind for _, kind in block_layer_names("b")] == [INSIDE_BLOCK[s] for s in order]


@pytest.mark.parametrize("name", ["block_chunks.0.module.1.sa.q_proj", "lvl_embed", "head.1", "text_proj_for_ca.1"])
def test_unknown_names_are_rejected(name):
    with pytest.raises(ValueError, match="not a linear layer"):
        layer_kind(name)
