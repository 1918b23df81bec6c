"""Storage precision of the transformer's non-block linears (text projections, shared AdaLN, head norm, head).

They are float32 by default (as the reference computes them). At 8B they are 0.57 GiB in float32, which matters on
an 8 GB module once the blocks are 4-bit. ``cast_nonblock_linears(model, torch.bfloat16)`` stores their weights
in bfloat16 and runs them in bfloat16: inputs are cast to the weight's dtype, outputs back to float32, so every
caller still sees float32 as before. The blocks are not touched.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["NONBLOCK_DTYPES", "cast_nonblock_linears", "nonblock_linears"]

NONBLOCK_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_HOOKS = "_nonblock_cast_hooks"


def nonblock_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """The ``nn.Linear`` modules outside ``block_chunks``."""
    return {name: m for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and not name.startswith("block_chunks.")}


def _cast_input(module: nn.Linear, args):
    x = args[0]
    return (x.to(module.weight.dtype), *args[1:]) if x.dtype != module.weight.dtype else None


def _output_float32(module: nn.Linear, args, output: torch.Tensor) -> torch.Tensor:
    return output.float()


def cast_nonblock_linears(model: nn.Module, dtype: str | torch.dtype) -> list[str]:
    """Store (and run) every non-block linear of ``model`` in ``dtype``; float32 undoes it. Idempotent; returns
    the names of the linears."""
    if isinstance(dtype, str):
        if dtype not in NONBLOCK_DTYPES:
            raise ValueError(f"non-block dtype must be one of {sorted(NONBLOCK_DTYPES)}, got {dtype!r}")
        dtype = NONBLOCK_DTYPES[dtype]
    linears = nonblock_linears(model)
    for module in linears.values():
        for handle in getattr(module, _HOOKS, ()):
            handle.remove()
        module.to(dtype)
        if dtype != torch.float32:
            setattr(module, _HOOKS, (module.register_forward_pre_hook(_cast_input),
                                     module.register_forward_hook(_output_float32)))
        elif hasattr(module, _HOOKS):
            delattr(module, _HOOKS)
    return list(linears)
