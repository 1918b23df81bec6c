"""The real (integer) form of a quantized tensor."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .core import as_rows, compute_dtype_for, dequantize_codes, group_view, num_groups
from .formats import get_format
from .packing import pack_int4, unpack_int4

__all__ = ["QuantTensor"]


@dataclass
class QuantTensor:
    """Integer codes with their group scales (and zero points).

    Attributes:
        codes: int8 (signed formats) / uint8 (unsigned formats) codes with the logical ``shape``; or, when
            ``packed``, uint8 ``[..., n // 2]`` holding two 4-bit codes per byte (see ``quant.packing``).
        scale: ``[R, G]`` in the scale dtype (``R`` = rows, or 1 for per-tensor / static activation scales;
            ``G`` = number of groups along the last dimension).
        zero: ``[R, G]`` zero points in the codes' container dtype, or None (symmetric signed).
        dtype: Format name (``sint4`` ...).
        group_size: -1, 0 or k (see ``quant.core``).
        shape: Logical shape of the quantized tensor.
        packed: Whether ``codes`` holds packed 4-bit pairs.
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None
    dtype: str
    group_size: int
    shape: tuple[int, ...]
    packed: bool = False

    @property
    def format(self):
        return get_format(self.dtype)

    def unpacked_codes(self) -> torch.Tensor:
        """Codes with the logical shape (unpacking when needed)."""
        if not self.packed:
            return self.codes
        return unpack_int4(self.codes, self.format.signed).reshape(self.shape)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``(codes - zero) * scale`` with the logical shape, computed in float32 (float64 if asked) then cast."""
        cdtype = compute_dtype_for(dtype)
        codes = as_rows(self.unpacked_codes()).to(cdtype)
        values = dequantize_codes(group_view(codes, self.group_size), self.scale, self.zero)
        return values.reshape(self.shape).to(dtype)

    def pack(self) -> QuantTensor:
        """Two 4-bit codes per byte (a no-op if already packed). Only 4-bit formats with an even last dim."""
        if self.packed:
            return self
        if self.format.bits != 4:
            raise ValueError(f"pack: only 4-bit formats are packed, this tensor is {self.dtype}")
        return QuantTensor(pack_int4(self.codes, self.format.signed), self.scale, self.zero, self.dtype,
                           self.group_size, self.shape, packed=True)

    def unpack(self) -> QuantTensor:
        if not self.packed:
            return self
        return QuantTensor(self.unpacked_codes(), self.scale, self.zero, self.dtype, self.group_size, self.shape)

    def to(self, device: torch.device | str) -> QuantTensor:
        zero = None if self.zero is None else self.zero.to(device)
        return QuantTensor(self.codes.to(device), self.scale.to(device), zero, self.dtype, self.group_size,
                           self.shape, self.packed)

    def state_dict(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """Tensors by name (``{prefix}codes``, ``{prefix}scale``, ``{prefix}zero``) for artifacts."""
        state = {f"{prefix}codes": self.codes, f"{prefix}scale": self.scale}
        if self.zero is not None:
            state[f"{prefix}zero"] = self.zero
        return state

    def metadata(self) -> dict:
        """Plain-Python description (format, groups, shape, packing) that goes with ``state_dict``."""
        return {"dtype": self.dtype, "group_size": self.group_size, "shape": list(self.shape), "packed": self.packed}

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor], metadata: dict, prefix: str = "",
                   name: str = "QuantTensor") -> QuantTensor:
        """Rebuild from ``state_dict`` + ``metadata``, validating shapes and dtypes (errors name ``name``)."""
        try:
            codes, scale = state[f"{prefix}codes"], state[f"{prefix}scale"]
            dtype, group_size = metadata["dtype"], int(metadata["group_size"])
            shape, packed = tuple(int(d) for d in metadata["shape"]), bool(metadata["packed"])
        except KeyError as err:
            raise ValueError(f"{name}: missing entry {err} in the quantized tensor state") from None
        fmt = get_format(dtype, key=f"{name}.dtype")
        zero = state.get(f"{prefix}zero")
        expected_codes = list(shape[:-1]) + [shape[-1] // 2] if packed else list(shape)
        if list(codes.shape) != expected_codes:
            raise ValueError(f"{name}: codes shape {tuple(codes.shape)} does not match shape {shape} "
                             f"(packed={packed})")
        if codes.dtype != (torch.uint8 if packed else fmt.storage_dtype):
            raise ValueError(f"{name}: codes dtype {codes.dtype} does not match format {dtype} (packed={packed})")
        rows = 1
        for d in shape[:-1]:
            rows *= d
        groups = num_groups(shape[-1], group_size)
        max_rows = 1 if group_size == 0 else rows
        if scale.dim() != 2 or scale.shape[1] != groups or scale.shape[0] not in (1, max_rows):
            raise ValueError(f"{name}: scale shape {tuple(scale.shape)} does not fit {groups} groups of {max_rows} rows")
        if zero is not None and zero.shape != scale.shape:
            raise ValueError(f"{name}: zero shape {tuple(zero.shape)} differs from scale shape {tuple(scale.shape)}")
        return cls(codes, scale, zero, dtype, group_size, shape, packed)

