"""The W4A4 layer as a torch custom op (``torch.ops.deepcompressor.w4a4_linear``), so that ``torch.compile`` can
trace a model through ``W4A4Linear`` on the GPU: the Triton kernels, their backend choice and their workspaces stay
behind one opaque call with an explicit signature, and a fake (meta) implementation gives the output's shape.

Every operand is a tensor or a plain value: the input quantizer's format as its four settings (format name, group
size, symmetric, scale dtype name), the weight's signedness, the backend name and the layer's name (for messages).
"""

from __future__ import annotations

from types import SimpleNamespace

import torch

from ..quant.formats import resolve_spec
from .w4a4_dispatch import LinearOperands, linear_forward

__all__ = ["spec_fields", "w4a4_linear"]


def spec_fields(spec) -> tuple[str, int, bool, str]:
    """A ``QuantSpec`` as the op's four plain arguments."""
    return spec.fmt.name, int(spec.group_size), bool(spec.symmetric), str(spec.scale_dtype).removeprefix("torch.")


@torch.library.custom_op("deepcompressor::w4a4_linear", mutates_args=())
def w4a4_linear(x2d: torch.Tensor, w_packed: torch.Tensor, w_scale: torch.Tensor, w_zero: torch.Tensor | None,
                smooth: torch.Tensor | None, l1t: torch.Tensor | None, l2t: torch.Tensor | None,
                bias: torch.Tensor | None, static_scale: torch.Tensor | None, static_zero: torch.Tensor | None,
                fmt: str, group_size: int, symmetric: bool, scale_dtype: str, w_signed: bool, backend: str,
                name: str) -> torch.Tensor:
    """``y [M, N]`` of one W4A4 layer with 4-bit inputs (``deepcompressor.kernels.w4a4_dispatch.linear_forward``)."""
    spec = resolve_spec(SimpleNamespace(dtype=fmt, group_size=group_size, symmetric=symmetric,
                                        scale_dtype=scale_dtype))
    ops = LinearOperands(spec=spec, w_packed=w_packed, w_scale=w_scale, w_zero=w_zero, w_signed=w_signed,
                         smooth=smooth, l1t=l1t, l2t=l2t, bias=bias, static_scale=static_scale,
                         static_zero=static_zero, name=name)
    return linear_forward(x2d, ops, backend)


@w4a4_linear.register_fake
def _(x2d, w_packed, w_scale, w_zero, smooth, l1t, l2t, bias, static_scale, static_zero, fmt, group_size, symmetric,
      scale_dtype, w_signed, backend, name):
    return x2d.new_empty(x2d.shape[0], w_packed.shape[0])
