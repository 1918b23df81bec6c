"""The deployed form of an SVDQuant linear: packed 4-bit weights, 4-bit activations, 16-bit low-rank branch.

``W4A4Linear`` computes what ``FakeQuantLinear`` simulates (same formula, same quantizers)::

    xs = x / s
    y  = Q_a(xs) @ W_main^T + (xs @ L2^T) @ L1^T + bias

but with the integer codes: ``W_main`` is held as two 4-bit codes per byte (layout of
``deepcompressor.kernels.w4a4_layout``) with per-group (64 inputs) scales and zero points, and the forward runs the
kernels of ``deepcompressor.kernels.w4a4`` (Triton on CUDA, the same arithmetic in PyTorch elsewhere). Layers whose
inputs stay 16-bit (``quant.ipts.skips``, e.g. the cross-attention key/value projection of the text) keep the packed
weight and dequantize it at each call.

Build one from a ``FakeQuantLinear`` (``W4A4Linear.from_fake``), from the state of one layer of the PTQ artifacts
(``W4A4Linear.from_artifact``: no float weight, no ``FakeQuantLinear``), a whole model from its PTQ artifacts
(``deepcompressor.app.diffusion.quantized_model.load_quantized_transformer``, without the full-precision model; or
``apply_artifacts`` on the full-precision model then ``convert_to_w4a4``), or, for latency and memory measurements
without calibration, from float weights (``synthesize_w4a4``: round-to-nearest residual of a seeded random low-rank
branch and smoothing).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from ..calib.search import quantized_linear_output
from ..config.schema import ActivationQuantConfig, WeightQuantConfig
from ..kernels.w4a4 import check_activation_spec, check_weight_spec, dequantized_weight, padded_rank
from ..kernels.w4a4_dispatch import BACKENDS, LinearOperands, linear_forward, resolve_backend, weight_only_forward
from ..kernels.w4a4_layout import GROUP, check_group_multiple, pack_weight, unpack_weight
from ..kernels.w4a4_ops import spec_fields
from ..quant.formats import resolve_spec
from ..quant.hadamard import block_hadamard, check_block_size
from ..quant.tensor import QuantTensor
from .fake_linear import FakeQuantLinear, _quantizer_from_meta
from .layer_map import is_block_kind, layer_kind

__all__ = ["W4A4Linear", "convert_to_w4a4", "kernel_packed_from_packed", "synthesize_w4a4", "synthetic_w4a4_linear",
           "w4a4_layers"]

logger = logging.getLogger(__name__)

_QUARTER = GROUP // 4  # bytes holding one half of a group in the natural packing


def kernel_packed_from_packed(packed: torch.Tensor) -> torch.Tensor:
    """Codes packed in the natural order (``quant.packing``: inputs ``2i``, ``2i + 1`` in byte ``i``) ``[N, K / 2]``
    -> the kernel layout (``kernels.w4a4_layout.pack_weight``) ``[N, K / 2]``, nibble for nibble.

    Equal to ``pack_weight(unpack_int4(packed).reshape(N, K), signed)`` for either signedness (a nibble is the
    code's 4-bit two's complement both ways), without any tensor of one byte per code: the temporaries are uint8
    of half the packed size each, and no value needs checking (every nibble is a valid 4-bit code).
    """
    if packed.dtype != torch.uint8 or packed.dim() != 2:
        raise ValueError(f"kernel_packed_from_packed: expected uint8 [N, K / 2], got {packed.dtype} "
                         f"{tuple(packed.shape)}")
    n, half = packed.shape
    check_group_multiple(2 * half, "kernel_packed_from_packed")
    groups = packed.reshape(n, half // (2 * _QUARTER), 2, _QUARTER)
    first, second = groups[:, :, 0], groups[:, :, 1]  # byte i: inputs 2i, 2i + 1 (first) / 32 + 2i, 33 + 2i
    # Kernel byte 2i: inputs 2i | 32 + 2i << 4; byte 2i + 1: inputs 2i + 1 | 33 + 2i << 4.
    even = (first & 0xF) | (second << 4)
    odd = (first >> 4) | (second & 0xF0)
    return torch.stack((even, odd), dim=-1).reshape(n, half)


class W4A4Linear(nn.Module):
    """Real W4A4 SVDQuant linear (see the module docstring).

    Args:
        qweight: The quantized residual weight ``[out, in]`` (4-bit, groups of 64; packed or not).
        wgts: Its quantizer config (checked against ``qweight``).
        ipts: Input quantizer config (4-bit, groups of 64, dynamic or static), or None for 16-bit inputs.
        bias: ``[out]`` or None.
        smooth_scale: ``s [in]`` or None (folded into the previous layer, or no smoothing).
        lowrank_l1, lowrank_l2: ``[out, r]``, ``[r, in]`` or None; stored transposed and zero-padded to the
            kernels' width (a power of two >= 16).
        input_scale, input_zero: Static input-quantization parameters ``[1, in / 64]`` when ``ipts.static``.
        backend: ``auto`` (measured per GPU and shape), ``int`` (alias ``triton``: exact integer kernels), ``gemv``,
            ``dequant`` or ``torch``; see ``deepcompressor.kernels.w4a4_dispatch``.
    """

    def __init__(self, in_features: int, out_features: int, *, qweight: QuantTensor, wgts, ipts=None,
                 bias: torch.Tensor | None = None, smooth_scale: torch.Tensor | None = None,
                 lowrank_l1: torch.Tensor | None = None, lowrank_l2: torch.Tensor | None = None,
                 input_scale: torch.Tensor | None = None, input_zero: torch.Tensor | None = None,
                 rotation: int | None = None, name: str = "linear", backend: str = "auto"):
        super().__init__()
        self.in_features, self.out_features, self.name = in_features, out_features, name
        if rotation is not None:
            check_block_size(int(rotation), in_features, f"{name}: rotation")
        self.rotation = None if rotation is None else int(rotation)
        if backend not in BACKENDS:
            raise ValueError(f"{name}: backend must be one of {BACKENDS}, got {backend!r}")
        self.backend = resolve_backend(backend)
        check_group_multiple(in_features, name)
        self.wspec = resolve_spec(wgts)
        check_weight_spec(self.wspec, name)
        if tuple(qweight.shape) != (out_features, in_features):
            raise ValueError(f"{name}: quantized weight shape {qweight.shape} != ({out_features}, {in_features})")
        if (qweight.dtype, qweight.group_size) != (self.wspec.fmt.name, self.wspec.group_size):
            raise ValueError(f"{name}: quantized weight ({qweight.dtype}, group {qweight.group_size}) does not match "
                             f"the weight quantizer ({self.wspec.fmt.name}, group {self.wspec.group_size})")
        self.ispec = None if ipts is None or ipts.dtype is None else resolve_spec(ipts)
        if self.ispec is not None:
            check_activation_spec(self.ispec, name)
            self._ispec_fields = spec_fields(self.ispec)  # the custom op's plain arguments, made once
        self.static_inputs = self.ispec is not None and bool(getattr(ipts, "static", False))
        if self.static_inputs and input_scale is None:
            raise ValueError(f"{name}: static input quantization needs calibrated input_scale")
        if (lowrank_l1 is None) != (lowrank_l2 is None):
            raise ValueError(f"{name}: low-rank factors come in pairs (L1 and L2)")
        groups = in_features // GROUP
        signed = self.wspec.fmt.signed
        if qweight.packed:  # e.g. from the artifacts: repacked without unpacking to one byte per code
            packed = kernel_packed_from_packed(qweight.codes)
        else:
            packed = pack_weight(qweight.codes, signed)
        self.register_buffer("weight_packed", packed)
        self.register_buffer("weight_scale", qweight.scale.t().contiguous())
        zero = None if qweight.zero is None else qweight.zero.t().to(torch.int8).contiguous()
        self.register_buffer("weight_zero", zero)
        if bias is not None and tuple(bias.shape) != (out_features,):
            raise ValueError(f"{name}: bias has shape {tuple(bias.shape)}, expected ({out_features},)")
        self.register_buffer("bias", None if bias is None else bias.detach())
        if smooth_scale is not None and tuple(smooth_scale.shape) != (in_features,):
            raise ValueError(f"{name}: smooth_scale has shape {tuple(smooth_scale.shape)}, expected ({in_features},)")
        self.register_buffer("smooth_scale", None if smooth_scale is None else smooth_scale.detach())
        self.rank = 0 if lowrank_l1 is None else int(lowrank_l1.shape[1])
        l1t = l2t = None
        if lowrank_l1 is not None:
            if lowrank_l1.shape != (out_features, self.rank) or lowrank_l2.shape != (self.rank, in_features):
                raise ValueError(f"{name}: low-rank factors {tuple(lowrank_l1.shape)}, {tuple(lowrank_l2.shape)} do "
                                 f"not fit a {out_features}x{in_features} layer")
            width = padded_rank(self.rank)
            l1t = lowrank_l1.new_zeros(width, out_features)
            l1t[: self.rank] = lowrank_l1.t()
            l2t = lowrank_l2.new_zeros(in_features, width)
            l2t[:, : self.rank] = lowrank_l2.t()
        self.register_buffer("lowrank_l1t", l1t)
        self.register_buffer("lowrank_l2t", l2t)
        static_scale = static_zero = None
        if self.static_inputs:
            static_scale = self._static_param(input_scale, "input_scale", groups).to(self.ispec.scale_dtype).float()
            if self.ispec.has_zero:
                if input_zero is None:
                    raise ValueError(f"{name}: static {self.ispec.fmt.name} inputs need input_zero")
                static_zero = self._static_param(input_zero, "input_zero", groups).float()
        self.register_buffer("input_scale", static_scale)
        self.register_buffer("input_zero", static_zero)
        self._cast_cache: dict = {}

    def _static_param(self, value: torch.Tensor, key: str, groups: int) -> torch.Tensor:
        if value.numel() != groups or (value.dim() == 2 and value.shape[0] != 1):
            raise ValueError(f"{self.name}: {key} of shape {tuple(value.shape)}; the W4A4 kernels take one static "
                             f"range per group shared by all tokens ([1, {groups}])")
        return value.detach().reshape(groups)

    # ----- construction ----------------------------------------------------------------------------------------

    @classmethod
    def from_fake(cls, fake: FakeQuantLinear, *, name: str | None = None, backend: str = "auto") -> W4A4Linear:
        """The real form of a calibrated ``FakeQuantLinear`` (its switches must be the calibrated ones)."""
        name = name or fake.name
        if not fake.quant_weights or fake.qweight_codes is None:
            raise ValueError(f"{name}: the W4A4 path needs quantized weights (this layer keeps 16-bit weights)")
        if (fake.smooth, fake.lowrank) != fake._calibrated:
            raise ValueError(f"{name}: smooth/lowrank switches differ from the calibration; the real path only runs "
                             "the calibrated configuration")
        if fake.quant_inputs != (fake.ipts is not None):
            raise ValueError(f"{name}: quant_inputs is switched off; the real path only runs the calibrated "
                             "configuration")
        return cls(
            fake.in_features, fake.out_features, qweight=fake.qweight, wgts=fake.wgts, ipts=fake.ipts,
            bias=fake.bias, smooth_scale=fake.smooth_scale if fake.smooth else None,
            lowrank_l1=fake.lowrank_l1 if fake.lowrank else None, lowrank_l2=fake.lowrank_l2 if fake.lowrank else None,
            input_scale=fake.input_scale, input_zero=fake.input_zero, rotation=fake.rotation, name=name,
            backend=backend,
        )

    @classmethod
    def from_artifact(cls, state: dict[str, torch.Tensor], meta: dict, *, name: str = "linear",
                      backend: str = "auto") -> W4A4Linear:
        """The layer straight from its PTQ artifact state (``FakeQuantLinear.artifact_state`` plus the smoothing
        scale and low-rank factors, e.g. ``ArtifactBundle.layer_state``) and metadata.

        Equal, buffer for buffer, to ``W4A4Linear.from_fake(FakeQuantLinear.from_artifact(state, meta))`` but
        without the ``FakeQuantLinear``: no float weight, and the packed codes are repacked to the kernel layout
        without an unpacked copy. The layer is built on the device of ``state``'s tensors (meta tensors check the
        shapes and formats without any data). A stored 16-bit ``weight`` is not read: a layer without quantized
        weights raises ValueError, as ``from_fake`` does.
        """
        try:
            in_features, out_features = int(meta["in_features"]), int(meta["out_features"])
            wgts = _quantizer_from_meta(meta["wgts"], WeightQuantConfig)
            ipts = _quantizer_from_meta(meta["ipts"], ActivationQuantConfig)
            qmeta = meta["qweight"]
        except KeyError as err:
            raise ValueError(f"{name}: artifact metadata lacks {err}") from None
        except (TypeError, ValueError) as err:
            raise ValueError(f"{name}: invalid artifact metadata ({err})") from None
        if qmeta is None or wgts is None or wgts.dtype is None:
            if qmeta is not None:
                raise ValueError(f"{name}: a quantized weight needs the weight quantizer config it was made with")
            raise ValueError(f"{name}: the W4A4 path needs quantized weights (this layer keeps 16-bit weights)")
        qweight = QuantTensor.from_state(state, qmeta, prefix="qweight.", name=f"{name}.qweight")
        return cls(in_features, out_features, qweight=qweight, wgts=wgts, ipts=ipts, bias=state.get("bias"),
                   smooth_scale=state.get("smooth_scale"), lowrank_l1=state.get("lowrank_l1"),
                   lowrank_l2=state.get("lowrank_l2"), input_scale=state.get("input_scale"),
                   input_zero=state.get("input_zero"), rotation=meta.get("rotation"), name=name, backend=backend)

    # ----- helpers ---------------------------------------------------------------------------------------------

    def extra_repr(self) -> str:
        inputs = "16-bit" if self.ispec is None else f"{self.ispec.fmt.name}{' static' if self.static_inputs else ''}"
        return (f"in_features={self.in_features}, out_features={self.out_features}, weights={self.wspec.fmt.name}, "
                f"inputs={inputs}, smooth={self.smooth_scale is not None}, rank={self.rank}, backend={self.backend}")

    def _apply(self, fn, recurse=True):
        self._cast_cache = {}
        return super()._apply(fn, recurse)

    def _cast(self, key: str, dtype: torch.dtype) -> torch.Tensor | None:
        """Buffer ``key`` in ``dtype`` (what the fake-quantized reference computes with), converted once."""
        tensor = getattr(self, key)
        if tensor is None or tensor.dtype == dtype:
            return tensor
        cached = self._cast_cache.get((key, dtype))
        if cached is None:
            cached = self._cast_cache[(key, dtype)] = tensor.to(dtype)
        return cached

    def _cpu_weight(self) -> torch.Tensor:
        """The CPU path's dequantized float32 weight, computed once (CPU runs are for tests and the tiny model; on
        GPU the kernel unpacks in registers and nothing is kept)."""
        cached = self._cast_cache.get("weight")
        if cached is None:
            cached = self._cast_cache["weight"] = dequantized_weight(
                self.weight_packed, self.weight_scale, self.weight_zero, self.wspec.fmt.signed)
        return cached

    @property
    def qweight(self) -> QuantTensor:
        """The weight as a ``QuantTensor`` (natural order, unpacked)."""
        codes = unpack_weight(self.weight_packed, self.wspec.fmt.signed)
        zero = None if self.weight_zero is None else self.weight_zero.t().to(self.wspec.fmt.storage_dtype)
        return QuantTensor(codes, self.weight_scale.t(), zero, self.wspec.fmt.name, GROUP, tuple(codes.shape))

    def nbytes(self) -> int:
        """Bytes of every tensor the layer holds."""
        return sum(t.numel() * t.element_size() for t in self.buffers())

    def operands(self, dtype: torch.dtype) -> LinearOperands:
        """What the kernels multiply with for activations of ``dtype`` (16-bit tensors converted once, cached)."""
        return LinearOperands(
            spec=self.ispec, w_packed=self.weight_packed, w_scale=self.weight_scale, w_zero=self.weight_zero,
            w_signed=self.wspec.fmt.signed, smooth=self._cast("smooth_scale", dtype),
            l1t=self._cast("lowrank_l1t", dtype), l2t=self._cast("lowrank_l2t", dtype), bias=self._cast("bias", dtype),
            static_scale=self.input_scale, static_zero=self.input_zero, name=self.name)

    # ----- forward ---------------------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"{self.name}: input has {x.shape[-1]} channels, expected {self.in_features}")
        dtype = x.dtype
        if self.rotation:  # (x R)(W R)^T: the stored weights are the rotated layer's
            x = block_hadamard(x, self.rotation)
        x2d = x.reshape(-1, self.in_features)
        ops = self.operands(dtype)
        smooth, l1t, l2t, bias = ops.smooth, ops.l1t, ops.l2t, ops.bias
        if self.ispec is None:
            # 16-bit inputs: the packed weight dequantized for this call only.
            xs = x2d / smooth if smooth is not None else x2d
            if x.device.type == "cuda" and dtype != torch.float32 and self.backend != "torch":
                y = weight_only_forward(xs, ops)
            else:
                w = self.qweight.dequantize(dtype)
                l1, l2 = (None, None) if l1t is None else (l1t.t(), l2t.t())
                y = quantized_linear_output(xs, w, xs, l1, l2, bias)
        elif x.device.type == "cuda" or self.backend not in ("auto", "torch"):
            # The Triton paths go through the custom op: torch.compile sees one opaque call with a fake.
            y = torch.ops.deepcompressor.w4a4_linear(
                x2d, ops.w_packed, ops.w_scale, ops.w_zero, smooth, l1t, l2t, bias, ops.static_scale,
                ops.static_zero, *self._ispec_fields, ops.w_signed, self.backend, self.name)
        else:
            y = linear_forward(x2d, ops, self.backend, cpu_weight=self._cpu_weight)
        return y.reshape(*x.shape[:-1], self.out_features)


# ------------------------------------------------------------------------------------------------ whole models


def w4a4_layers(model: nn.Module) -> dict[str, W4A4Linear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, W4A4Linear)}


def convert_to_w4a4(model: nn.Module, *, backend: str = "auto") -> list[str]:
    """Swap every ``FakeQuantLinear`` of ``model`` (e.g. after ``apply_artifacts``) for its ``W4A4Linear``;
    returns the converted layer names. Raises ValueError naming a layer the real path cannot run."""
    fakes = [(name, m) for name, m in model.named_modules() if isinstance(m, FakeQuantLinear)]
    if not fakes:
        raise ValueError("convert_to_w4a4: the model holds no FakeQuantLinear layers (apply the PTQ artifacts first)")
    kept = [name for name, fake in fakes if _higher_precision(fake)]
    fakes = [(name, fake) for name, fake in fakes if not _higher_precision(fake)]
    for name, fake in fakes:
        device = next(fake.buffers()).device  # (a layer that keeps 16-bit weights has no codes: from_fake says so)
        model.set_submodule(name, W4A4Linear.from_fake(fake, name=name, backend=backend).to(device))
    logger.info("converted %d layers to W4A4Linear", len(fakes))
    if kept:
        logger.info("kept %d 8-bit layers (quant.mixed_precision) as FakeQuantLinear: %s", len(kept),
                    ", ".join(kept[:4]) + (" ..." if len(kept) > 4 else ""))
    return [name for name, _ in fakes]


def _higher_precision(fake: FakeQuantLinear) -> bool:
    """A layer that mixed precision kept at 8 bits: the 4-bit kernels do not run it; it stays fake-quantized."""
    formats = [q.dtype for q in (fake.wgts, fake.ipts) if q is not None]
    return any(dtype.endswith("8") for dtype in formats)


def synthetic_w4a4_linear(linear: nn.Linear, layer_cfg, rank: int, smooth: bool, generator: torch.Generator,
                          name: str = "linear", backend: str = "auto") -> W4A4Linear:
    """A ``W4A4Linear`` from a float linear (see ``synthesize_w4a4``); ``layer_cfg`` is a ``QuantConfig`` whose
    ``wgts`` / ``ipts`` apply to this layer."""
    from .synthetic import synthetic_factors

    f = synthetic_factors(linear, layer_cfg, rank, smooth, generator, name)
    s = f.smooth_scale
    return W4A4Linear(linear.in_features, linear.out_features, qweight=f.qweight, wgts=layer_cfg.wgts, ipts=f.ipts,
                      bias=None if linear.bias is None else linear.bias.detach(),
                      smooth_scale=None if s is None else s.to(linear.weight.dtype), lowrank_l1=f.lowrank_l1,
                      lowrank_l2=f.lowrank_l2, name=name, backend=backend)


@torch.no_grad()
def synthesize_w4a4(model: nn.Module, qcfg, *, seed: int = 0, backend: str = "auto") -> list[str]:
    """Replace every quantized block linear (per ``qcfg``'s skips) by a synthetic ``W4A4Linear`` built from its
    float weight: smoothing scales ``exp(U(-0.5, 0.5))`` (if ``qcfg.smooth.enabled``) and a random branch of rank
    ``qcfg.low_rank.rank`` (if enabled), the residual quantized round-to-nearest. For latency and memory
    measurements without calibration: the cost does not depend on the values. Returns the replaced names."""
    from ..calib.layer import quant_config_for_kind

    if qcfg.wgts.dtype is None:
        raise ValueError("synthesize_w4a4: quant.wgts.dtype is null; stack configs/svdquant/int4.yaml")
    rank = qcfg.low_rank.rank if qcfg.low_rank.enabled else 0
    names = []
    linears = [(name, m) for name, m in model.named_modules() if type(m) is nn.Linear]
    generator = None
    for name, linear in linears:
        kind = layer_kind(name)
        if not is_block_kind(kind) or kind in qcfg.wgts.skips:
            continue
        if generator is None:
            generator = torch.Generator(device=linear.weight.device).manual_seed(int(seed))
        layer_cfg = quant_config_for_kind(qcfg, kind)
        model.set_submodule(name, synthetic_w4a4_linear(linear, layer_cfg, rank, qcfg.smooth.enabled, generator, name,
                                                        backend))
        names.append(name)
    if not names:
        raise ValueError("synthesize_w4a4: no block linear is quantized by this config (check quant.wgts.skips)")
    logger.info("synthesized %d W4A4 layers (rank %d, smoothing %s)", len(names), rank, qcfg.smooth.enabled)
    return names
