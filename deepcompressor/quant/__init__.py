"""Integer formats, quantizers (fake and real from one code path) and int4 packing."""

from .core import compute_qparams, dequantize_codes, group_view, num_groups, quantize_codes
from .formats import FORMATS, IntFormat, QuantSpec, get_format, resolve_spec, scale_dtype_from_name
from .functional import dequantize, fake_quantize, quantization_params, quantize
from .packing import pack_int4, unpack_int4
from .tensor import QuantTensor

__all__ = [
    "FORMATS",
    "IntFormat",
    "QuantSpec",
    "QuantTensor",
    "compute_qparams",
    "dequantize",
    "dequantize_codes",
    "fake_quantize",
    "get_format",
    "group_view",
    "num_groups",
    "pack_int4",
    "quantization_params",
    "quantize",
    "quantize_codes",
    "resolve_spec",
    "scale_dtype_from_name",
    "unpack_int4",
]
