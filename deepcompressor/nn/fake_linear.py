"""A linear layer that simulates its quantized form (fake quantization) for evaluation and ablations.

Forward (``calib.search.quantized_linear_output``)::

    xs = x / s                                   # smoothing         (switch ``smooth``)
    y  = Q_a(xs) @ W_main^T                      # input quantization (switch ``quant_inputs``)
       + (xs @ L2^T) @ L1^T                      # low-rank branch   (switch ``lowrank``)
       + bias

``W_main`` is the calibrated quantized residual when the switches match the calibration (``quant_weights`` on,
and ``smooth`` / ``lowrank`` on exactly when they were calibrated). Any other combination is rebuilt from the
float weight: ``W * s`` (if ``smooth``) ``- L1 L2`` (if ``lowrank``), round-to-nearest quantized if
``quant_weights``. With every switch off the layer is the float linear.
"""

from __future__ import annotations

import torch
from torch import nn

from ..calib.search import quantized_linear_output
from ..config.schema import ActivationQuantConfig, WeightQuantConfig
from ..quant.functional import fake_quantize
from ..quant.hadamard import block_hadamard, check_block_size
from ..quant.tensor import QuantTensor

__all__ = ["FakeQuantLinear"]


def _quantizer_meta(cfg) -> dict | None:
    if cfg is None or cfg.dtype is None:
        return None
    meta = {"dtype": cfg.dtype, "group_size": cfg.group_size, "symmetric": cfg.symmetric,
            "scale_dtype": cfg.scale_dtype}
    if hasattr(cfg, "static"):
        meta["static"] = bool(cfg.static)
    return meta


def _quantizer_from_meta(meta: dict | None, cls):
    if meta is None:
        return None
    extra = {"static": bool(meta.get("static", False))} if cls is ActivationQuantConfig else {}
    return cls(dtype=meta["dtype"], group_size=int(meta["group_size"]), symmetric=bool(meta["symmetric"]),
               scale_dtype=meta["scale_dtype"], **extra)


class FakeQuantLinear(nn.Module):
    """Fake-quantized replacement of an ``nn.Linear`` (see the module docstring).

    Args:
        weight: Float weight ``[out, in]`` of the original linear; needed for ablations that leave the
            calibrated configuration (may be None for a deployed artifact).
        bias: ``[out]`` or None.
        qweight: Quantized residual weight, or None (weights not quantized).
        smooth_scale: ``s [in]`` or None.
        lowrank_l1, lowrank_l2: Branch factors ``[out, r]``, ``[r, in]`` or None.
        wgts, ipts: Quantizer configs of the weight and of the inputs (None or ``dtype None``: 16-bit).
        input_scale, input_zero: Static input-quantization parameters when ``ipts.static``.
        rotation: Hadamard block size when the inputs are rotated (``quant.rotation``): the input is rotated first
            and every weight above (quantized residual, branch, smoothing) belongs to the rotated layer; ``weight``
            stays the original one.
        name: Layer name for error messages.
    """

    def __init__(self, in_features: int, out_features: int, *, weight: torch.Tensor | None = None,
                 bias: torch.Tensor | None = None, qweight: QuantTensor | None = None,
                 smooth_scale: torch.Tensor | None = None, lowrank_l1: torch.Tensor | None = None,
                 lowrank_l2: torch.Tensor | None = None, wgts=None, ipts=None,
                 input_scale: torch.Tensor | None = None, input_zero: torch.Tensor | None = None,
                 rotation: int | None = None, name: str = "linear"):
        super().__init__()
        self.in_features, self.out_features, self.name = in_features, out_features, name
        if rotation is not None:
            check_block_size(int(rotation), in_features, f"{name}: rotation")
        self.rotation = None if rotation is None else int(rotation)
        if weight is None and qweight is None:
            raise ValueError(f"{name}: needs the float weight or a quantized weight")
        if (lowrank_l1 is None) != (lowrank_l2 is None):
            raise ValueError(f"{name}: low-rank factors come in pairs (L1 and L2)")
        if qweight is not None and tuple(qweight.shape) != (out_features, in_features):
            raise ValueError(f"{name}: quantized weight shape {qweight.shape} != ({out_features}, {in_features})")
        self.wgts = wgts if wgts is not None and wgts.dtype is not None else None
        self.ipts = ipts if ipts is not None and ipts.dtype is not None else None
        if qweight is not None and self.wgts is None:
            raise ValueError(f"{name}: a quantized weight needs the weight quantizer config it was made with")
        if qweight is not None and (qweight.dtype, qweight.group_size) != (self.wgts.dtype, self.wgts.group_size):
            raise ValueError(f"{name}: quantized weight ({qweight.dtype}, group {qweight.group_size}) does not match "
                             f"the weight quantizer ({self.wgts.dtype}, group {self.wgts.group_size})")
        if self.ipts is not None and getattr(self.ipts, "static", False) and input_scale is None:
            raise ValueError(f"{name}: static input quantization needs calibrated input_scale")
        if input_scale is not None:
            # the input format is checked against its calibrated parameters as the weight format is against qweight
            if self.ipts is None or not getattr(self.ipts, "static", False):
                raise ValueError(f"{name}: a calibrated input_scale needs a static input quantizer config, got "
                                 f"{'16-bit inputs' if self.ipts is None else 'dynamic input quantization'}")
            g = self.ipts.group_size
            groups = 1 if g == 0 else (in_features // g if g > 0 and in_features % g == 0 else None)
            if groups is None or input_scale.numel() != groups or (input_zero is not None
                                                                   and input_zero.numel() != groups):
                raise ValueError(f"{name}: input_scale has {input_scale.numel()} values, the input quantizer "
                                 f"(group {g} of {in_features} inputs) needs {groups}")
        self.register_buffer("weight", weight)
        self.register_buffer("bias", bias)
        self.register_buffer("smooth_scale", smooth_scale)
        self.register_buffer("lowrank_l1", lowrank_l1)
        self.register_buffer("lowrank_l2", lowrank_l2)
        self.register_buffer("input_scale", input_scale)
        self.register_buffer("input_zero", input_zero)
        self._qmeta = None if qweight is None else qweight.unpack().metadata()
        self.register_buffer("qweight_codes", None if qweight is None else qweight.unpacked_codes())
        self.register_buffer("qweight_scale", None if qweight is None else qweight.scale)
        self.register_buffer("qweight_zero", None if qweight is None else qweight.zero)
        # Ablation switches; what was not calibrated cannot be switched on.
        self.smooth = smooth_scale is not None
        self.lowrank = lowrank_l1 is not None
        self.quant_weights = self.wgts is not None
        self.quant_inputs = self.ipts is not None
        self._calibrated = (self.smooth, self.lowrank)
        self._main_cache: tuple | None = None

    @classmethod
    def from_linear(cls, linear: nn.Linear, layer_result, cfg, *, index: int = 0, keep_float_weight: bool = True,
                    name: str = "linear") -> FakeQuantLinear:
        """Build from the calibrated ``LayerCalibResult`` and the ``QuantConfig`` used for it (``index`` picks the
        linear of a group that shares one input)."""
        result = layer_result.linears[index]
        weight = linear.weight.detach()
        to = {"device": weight.device}
        s = layer_result.smooth_scale
        return cls(
            linear.in_features, linear.out_features,
            weight=weight if keep_float_weight else None,
            bias=None if linear.bias is None else linear.bias.detach(),
            qweight=None if result.qweight is None else result.qweight.to(weight.device),
            smooth_scale=None if s is None else s.to(**to),
            lowrank_l1=None if result.lowrank_l1 is None else result.lowrank_l1.to(**to),
            lowrank_l2=None if result.lowrank_l2 is None else result.lowrank_l2.to(**to),
            wgts=cfg.wgts, ipts=cfg.ipts,
            input_scale=None if layer_result.input_scale is None else layer_result.input_scale.to(**to),
            input_zero=None if layer_result.input_zero is None else layer_result.input_zero.to(**to),
            rotation=getattr(layer_result, "rotation", None), name=name,
        )

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, smooth={self.smooth}, "
                f"lowrank={self.lowrank}, quant_weights={self.quant_weights}, quant_inputs={self.quant_inputs}")

    @property
    def qweight(self) -> QuantTensor | None:
        if self.qweight_codes is None:
            return None
        meta = self._qmeta
        return QuantTensor(self.qweight_codes, self.qweight_scale, self.qweight_zero, meta["dtype"],
                           meta["group_size"], tuple(meta["shape"]))

    def _check_switches(self) -> None:
        for switch, present in (("smooth", self.smooth_scale is not None), ("lowrank", self.lowrank_l1 is not None),
                                ("quant_weights", self.wgts is not None), ("quant_inputs", self.ipts is not None)):
            if getattr(self, switch) and not present:
                raise RuntimeError(f"{self.name}: switch {switch!r} is on but the layer was not calibrated for it")

    def main_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """``W_main`` for the current switches (cached until a switch, dtype or device changes)."""
        ref = self.qweight_codes if self.qweight_codes is not None else self.weight
        key = (self.smooth, self.lowrank, self.quant_weights, dtype, ref.device)
        if self._main_cache is not None and self._main_cache[0] == key:
            return self._main_cache[1]
        if self.quant_weights and self.qweight_codes is not None and (self.smooth, self.lowrank) == self._calibrated:
            w = self.qweight.dequantize(dtype)
        else:
            if self.weight is None:
                raise RuntimeError(f"{self.name}: this switch combination needs the float weight, which was not kept")
            w = self.weight.float()
            if self.rotation:
                w = block_hadamard(w, self.rotation)
            if self.smooth:
                w = w * self.smooth_scale.float()
            if self.lowrank:
                w = w - self.lowrank_l1.float() @ self.lowrank_l2.float()
            if self.quant_weights:
                w = fake_quantize(w, self.wgts, name=self.name)
            w = w.to(dtype)
        self._main_cache = (key, w)
        return w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_switches()
        dtype = x.dtype
        if self.rotation:
            x = block_hadamard(x, self.rotation)
        xs = x / self.smooth_scale.to(dtype) if self.smooth else x
        xq = xs
        if self.quant_inputs:
            xq = fake_quantize(xs, self.ipts, scale=self.input_scale, zero=self.input_zero, check=False)
        l1 = l2 = None
        if self.lowrank:
            l1, l2 = self.lowrank_l1.to(dtype), self.lowrank_l2.to(dtype)
        bias = None if self.bias is None else self.bias.to(dtype)
        return quantized_linear_output(xq, self.main_weight(dtype), xs, l1, l2, bias)

    # ----- artifacts -------------------------------------------------------------------------------------------

    def artifact_state(self, pack: bool = True) -> tuple[dict[str, torch.Tensor], dict]:
        """Tensors by name and a plain-Python metadata dict describing them (the float weight is not included).

        4-bit weight codes are packed two per byte when ``pack`` (and the input dimension is even).
        """
        state: dict[str, torch.Tensor] = {}
        meta: dict = {"in_features": self.in_features, "out_features": self.out_features,
                      "wgts": _quantizer_meta(self.wgts), "ipts": _quantizer_meta(self.ipts), "qweight": None,
                      "rotation": self.rotation}
        qweight = self.qweight
        if qweight is not None:
            if pack and qweight.format.bits == 4 and self.in_features % 2 == 0:
                qweight = qweight.pack()
            state.update(qweight.state_dict("qweight."))
            meta["qweight"] = qweight.metadata()
        for key in ("bias", "smooth_scale", "lowrank_l1", "lowrank_l2", "input_scale", "input_zero"):
            value = getattr(self, key)
            if value is not None:
                state[key] = value.detach()
        return state, meta

    @classmethod
    def from_artifact(cls, state: dict[str, torch.Tensor], meta: dict, *, weight: torch.Tensor | None = None,
                      name: str = "linear") -> FakeQuantLinear:
        """Inverse of ``artifact_state``; ``weight`` (the float weight) enables every ablation switch."""
        try:
            in_features, out_features = int(meta["in_features"]), int(meta["out_features"])
            wgts = _quantizer_from_meta(meta["wgts"], WeightQuantConfig)
            ipts = _quantizer_from_meta(meta["ipts"], ActivationQuantConfig)
        except KeyError as err:
            raise ValueError(f"{name}: artifact metadata lacks {err}") from None
        qweight = None
        if meta.get("qweight") is not None:
            qweight = QuantTensor.from_state(state, meta["qweight"], prefix="qweight.", name=f"{name}.qweight")
        expected = {"bias": (out_features,), "smooth_scale": (in_features,)}
        for key, shape in expected.items():
            if key in state and tuple(state[key].shape) != shape:
                raise ValueError(f"{name}: {key} has shape {tuple(state[key].shape)}, expected {shape}")
        if weight is not None and tuple(weight.shape) != (out_features, in_features):
            raise ValueError(f"{name}: float weight {tuple(weight.shape)} != ({out_features}, {in_features})")
        return cls(in_features, out_features, weight=weight, bias=state.get("bias"), qweight=qweight,
                   smooth_scale=state.get("smooth_scale"), lowrank_l1=state.get("lowrank_l1"),
                   lowrank_l2=state.get("lowrank_l2"), wgts=wgts, ipts=ipts, input_scale=state.get("input_scale"),
                   input_zero=state.get("input_zero"), rotation=meta.get("rotation"), name=name)
