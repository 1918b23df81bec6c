"""Block-by-block calibration of the transformer by replaying the real blocks on the captured inputs.

Replay: block ``i`` is called exactly as the sampler calls it (``block(x, gss, text_ctx, rope, layer_cache,
store)``), prompt by prompt and scale by scale, with a fresh ``LayerKVCache`` per prompt (same capacity and
``store`` pattern as the sampler), so the earlier scales' KV prefix is exactly what the sampler's cache held and
the cross-attention reads the prompt's real text memory. Replaying the full-precision block on its captured
inputs reproduces the next block's captured inputs bit for bit (tested).

Per block, the linears are calibrated in execution order (``sa.mat_qkv``, ``sa.proj``, ``ca.mat_q``,
``ca.mat_kv``, ``ca.proj``, ``ffn.fc1``, ``ffn.fc2``). The inputs of each one come from replaying the block with
the earlier linears already quantized (the replay stops at the layer; ``ca.mat_kv`` reads the text memory and
needs no replay). Each layer then goes through the engine (``calib.layer.calibrate_linear``: smoothing search,
low-rank branch, weight quantization by round-to-nearest or range search) on at most ``quant.max_tokens``
tokens evenly spaced over the selected ``(prompt, scale)`` samples; GPTQ uses the Hessian of every token of
those samples, accumulated while replaying. The quantized layer replaces the ``nn.Linear``.

Propagation: the quantized block's outputs become the next block's inputs (as in DeepCompressor), so every
block is calibrated on what it sees in the quantized model (teacher-forced on the full-precision bits); each
layer's reference output is its full-precision output on those same inputs.

Smoothing scales stay a run-time division of the layer input, except ``ca.mat_q`` with ``quant.smooth.fold``:
its input is ``ca_norm``'s output, whose affine absorbs ``1 / s``. The other smoothed inputs follow the AdaLN
modulation (per-sample scale and shift: nothing to fold into) or an attention / GELU output.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from ...calib.gptq import accumulate_hessian
from ...calib.layer import calibrate_linear, quant_config_for_kind
from ...calib.search import subsample_tokens, synchronize
from ...calib.smooth import fold_smooth_into_norm
from ...nn.fake_linear import FakeQuantLinear
from ...nn.layer_map import BLOCK_LAYERS
from ...nn.offload import to_host

__all__ = [
    "BLOCK_STATE_FORMAT",
    "BlockResult",
    "ReplayPlan",
    "SampleSelection",
    "calibrate_block",
    "install_block_state",
    "install_layer",
    "layer_needs_calibration",
    "replay_block",
    "validate_block_state",
]

logger = logging.getLogger(__name__)

BLOCK_STATE_FORMAT = "var-compressor-block-state/1"


class _StopReplay(Exception):
    """Raised by a tap once it has seen its layer's input: the rest of the block is not needed."""


# ------------------------------------------------------------------------------------------------ replay


@dataclass
class ReplayPlan:
    """What every replay of every block shares: per-prompt text memory and modulation, per-scale RoPE slices and
    the sampler's KV-cache ``store`` flags and capacity."""

    contexts: list
    gss: list[torch.Tensor]
    rope: list[tuple[torch.Tensor, torch.Tensor]]
    store: list[bool]
    capacity: int

    @classmethod
    def build(cls, captures, settings, model) -> ReplayPlan:
        from infinity.model import TextContext
        from infinity.rope import rope_table
        from infinity.schedules import scale_starts, tokens_per_scale

        device = model.device
        schedule = [list(s) for s in settings.schedule]
        sizes, starts = tokens_per_scale(schedule), scale_starts(schedule)
        cos, sin = rope_table(model.arch.head_dim, schedule, settings.h_div_w, device)
        n = settings.num_scales
        rope = [(cos[starts[s] : starts[s] + sizes[s]], sin[starts[s] : starts[s] + sizes[s]]) for s in range(n)]
        store = [s != len(schedule) - 1 for s in range(n)]
        contexts = [TextContext.build(c.ca_kv.to(device), c.lens) for c in captures]
        gss = [c.gss.to(device) for c in captures]
        return cls(contexts, gss, rope, store, sum(sizes[:-1]))


def replay_block(block: nn.Module, plan: ReplayPlan, inputs: list[list[torch.Tensor]], *, tap=None,
                 keep_outputs: bool = False, host_outputs: bool = False) -> list[list[torch.Tensor]] | None:
    """Run ``block`` on ``inputs[prompt][scale]`` as the sampler does; returns the outputs if ``keep_outputs``.

    ``tap`` (a forward pre-hook already registered on one of the block's linears) is told the current
    ``(prompt, scale)``; it may end each block call early by raising ``_StopReplay``. Inputs kept in host memory
    (``memory.offload``) are copied to the block's device one sample at a time, and their outputs copied back;
    ``host_outputs`` keeps the outputs in host memory whatever the inputs.
    """
    from infinity.kv_cache import LayerKVCache

    device = next(block.parameters()).device
    outputs = [] if keep_outputs else None
    with torch.no_grad():
        for p, xs in enumerate(inputs):
            context = plan.contexts[p]
            context.memo = {}
            cache = LayerKVCache(capacity=plan.capacity)
            outs = []
            try:
                for s, x in enumerate(xs):
                    if tap is not None:
                        tap.current = (p, s)
                    try:
                        y = block(x.to(device, non_blocking=True), plan.gss[p], context, plan.rope[s], cache,
                                  plan.store[s])
                    except _StopReplay:
                        continue
                    if keep_outputs:
                        outs.append(to_host(y) if (host_outputs or y.device != x.device) and y.device.type != "cpu"
                                    else y)
            finally:
                cache.reset()
                context.memo = None
            if keep_outputs:
                outputs.append(outs)
    return outputs


# ------------------------------------------------------------------------------------------------ samples


@dataclass
class SampleSelection:
    """Which ``(prompt, scale)`` samples calibrate, and which of their tokens the searches use.

    ``quant.num_samples`` samples are taken evenly spaced over all captured ones (prompt-major order); over the
    concatenated tokens of the selected samples (every CFG row), ``quant.max_tokens`` evenly spaced tokens feed
    the searches. ``token_index[(p, s)]`` indexes the rows of that call's ``x.reshape(-1, C)``.
    """

    selected: set[tuple[int, int]]
    token_index: dict[tuple[int, int], torch.Tensor]
    prompts: list[int]
    num_tokens: int

    @classmethod
    def build(cls, num_prompts: int, sizes: list[int], rows: int, num_samples: int, max_tokens: int,
              device) -> SampleSelection:
        samples = [(p, s) for p in range(num_prompts) for s in range(len(sizes))]
        if 0 < num_samples < len(samples):
            keep = torch.linspace(0, len(samples) - 1, num_samples).round().long().tolist()
            samples = [samples[i] for i in keep]
        counts = [rows * sizes[s] for _, s in samples]
        total = sum(counts)
        wanted = min(total, max_tokens)
        chosen = torch.linspace(0, total - 1, wanted).round().long()
        token_index, start = {}, 0
        for sample, count in zip(samples, counts):
            lo = int(torch.searchsorted(chosen, start))
            hi = int(torch.searchsorted(chosen, start + count))
            token_index[sample] = (chosen[lo:hi] - start).to(device)
            start += count
        prompts = sorted({p for p, _ in samples})
        return cls(set(samples), token_index, prompts, int(wanted))


class _LinearTap:
    """Forward pre-hook of the linear being calibrated: keeps the selected tokens of its input, accumulates the
    GPTQ Hessian over every token of the selected samples, and stops the replay."""

    def __init__(self, selection: SampleSelection, hessian: bool, stop: bool = True) -> None:
        self.selection = selection
        self.want_hessian = hessian
        self.stop = stop
        self.current: tuple[int, int] = (0, 0)
        self.parts: list[torch.Tensor] = []
        self.hessian: torch.Tensor | None = None
        self.hessian_tokens = 0

    def __call__(self, _module, args) -> None:
        if self.current in self.selection.selected:
            x = args[0].reshape(-1, args[0].shape[-1])
            index = self.selection.token_index[self.current]
            if index.numel():
                self.parts.append(x.index_select(0, index).float())
            if self.want_hessian:
                self.hessian, self.hessian_tokens = accumulate_hessian(self.hessian, self.hessian_tokens, x)
        if self.stop:
            raise _StopReplay

    def tokens(self) -> torch.Tensor:
        return torch.cat(self.parts)


# ------------------------------------------------------------------------------------------------ one layer


class _TapGroup:
    """Taps of several linears of one block, told the current sample together (a replay that feeds them all)."""

    def __init__(self, taps: dict[str, _LinearTap]) -> None:
        self.taps = taps

    @property
    def current(self) -> tuple[int, int]:
        return next(iter(self.taps.values())).current

    @current.setter
    def current(self, value: tuple[int, int]) -> None:
        for tap in self.taps.values():
            tap.current = value


def block_layer_inputs(block: nn.Module, block_name: str, inputs, plan: ReplayPlan, selection: SampleSelection,
                       layers: dict[str, str], *, host_outputs: bool = False):
    """One replay of the (unchanged) block that records the selected tokens of every linear of ``layers``
    (``{suffix: kind}``; ``ca.mat_kv`` reads the text memory) and returns ``({name: tokens}, block outputs)``."""
    taps = {suffix: _LinearTap(selection, hessian=False, stop=False) for suffix, kind in layers.items()
            if kind != "ca_kv"}
    handles = [block.get_submodule(suffix).register_forward_pre_hook(tap) for suffix, tap in taps.items()]
    try:
        outputs = replay_block(block, plan, inputs, tap=_TapGroup(taps), keep_outputs=True, host_outputs=host_outputs)
    finally:
        for handle in handles:
            handle.remove()
    found = {f"{block_name}.{suffix}": subsample_tokens(tap.tokens(), selection.num_tokens)
             for suffix, tap in taps.items()}
    for suffix, kind in layers.items():
        if kind == "ca_kv":
            found[f"{block_name}.{suffix}"] = _text_inputs(plan, selection, block.dtype, selection.num_tokens, False)[0]
    return found, outputs


def layer_needs_calibration(qcfg, kind: str) -> bool:
    layer_cfg = quant_config_for_kind(qcfg, kind)
    return layer_cfg.wgts.dtype is not None or layer_cfg.ipts.dtype is not None


def calibrate_layer(linear: nn.Linear, x: torch.Tensor, hessian: torch.Tensor | None, layer_cfg, *, kind: str,
                    name: str) -> dict:
    """Calibrate one linear on its inputs ``x [tokens, in]``; returns its block-state entry (see ``BlockState``)."""
    use_gptq = layer_cfg.gptq.enabled and layer_cfg.wgts.dtype is not None
    # The Hessian covers every token of the selected samples; the searches see at most quant.max_tokens of them.
    result = calibrate_linear(linear.weight.detach(), None if linear.bias is None else linear.bias.detach(), x,
                              layer_cfg, name=name, hessian=hessian if use_gptq else None)
    lin = result.linears[0]
    qweight, error_final = lin.qweight, lin.error_final
    fake = FakeQuantLinear(
        linear.in_features, linear.out_features,
        weight=linear.weight.detach() if qweight is None else None,
        bias=None if linear.bias is None else linear.bias.detach(), qweight=qweight,
        smooth_scale=result.smooth_scale, lowrank_l1=lin.lowrank_l1, lowrank_l2=lin.lowrank_l2,
        wgts=layer_cfg.wgts, ipts=layer_cfg.ipts, input_scale=result.input_scale, input_zero=result.input_zero,
        rotation=result.rotation, name=name,
    )
    state, meta = fake.artifact_state(pack=True)
    if qweight is None:
        state["weight"] = linear.weight.detach()  # 16-bit weights (only the inputs are quantized)
    smooth = None
    if result.smooth_scale is not None:
        smooth = {"scale": result.smooth_scale, "alpha": result.smooth_alpha, "beta": result.smooth_beta,
                  "gamma": result.smooth_gamma, "folded_into": None}
    report = {
        "name": name, "kind": kind, "error_rtn": lin.error_rtn, "error_final": error_final,
        "smooth_alpha": result.smooth_alpha, "smooth_beta": result.smooth_beta, "smooth_gamma": result.smooth_gamma,
        "lowrank_errors": list(lin.lowrank_errors), "gptq": use_gptq,
        "clip_ratio_mean": None if lin.clip_ratio is None else float(lin.clip_ratio.float().mean()),
        "num_tokens": result.num_tokens, "timings": result.timings,
    }
    return {"kind": kind, "state": state, "meta": meta, "smooth": smooth, "report": report}


def _smoothing_note(report: dict) -> str:
    if report.get("smooth_gamma") is not None:
        return f", gain-projected smoothing, exponent {report['smooth_gamma']:.2f}"
    return "" if report["smooth_alpha"] is None else f", smoothing alpha {report['smooth_alpha']:.2f}"


def _fold_into_norm(entry: dict, norm: nn.LayerNorm, norm_name: str) -> dict[str, torch.Tensor]:
    """Move ``ca.mat_q``'s smoothing division into ``ca_norm``'s affine; returns the new norm parameters."""
    s = entry["smooth"]["scale"]
    weight, bias = fold_smooth_into_norm(norm.weight.detach(), None if norm.bias is None else norm.bias.detach(), s)
    entry["state"].pop("smooth_scale")
    if "weight" in entry["state"]:  # 16-bit weight: it now reads the smoothed input
        w = entry["state"]["weight"]
        entry["state"]["weight"] = (w.float() * s).to(w.dtype)
    entry["smooth"]["folded_into"] = norm_name
    entry["report"]["smooth_folded_into"] = norm_name
    params = {f"{norm_name}.weight": weight}
    if bias is not None:
        params[f"{norm_name}.bias"] = bias
    return params


# ------------------------------------------------------------------------------------------------ install


def install_layer(model: nn.Module, name: str, entry: dict) -> FakeQuantLinear:
    """Replace the linear ``name`` by the ``FakeQuantLinear`` of a block-state entry (on the model's device)."""
    state = {k: v.to(model.device) for k, v in entry["state"].items()}
    module = FakeQuantLinear.from_artifact(state, entry["meta"], weight=state.get("weight"), name=name)
    model.set_submodule(name, module)
    return module


def _set_params(model: nn.Module, params: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, value in params.items():
            target = model.get_parameter(name)
            target.copy_(value.to(target.device, target.dtype))


def install_block_state(model: nn.Module, state: dict) -> None:
    """Install every quantized layer and modified parameter of a block state."""
    for name, entry in state["layers"].items():
        install_layer(model, name, entry)
    _set_params(model, state["params"])


# ------------------------------------------------------------------------------------------------ one block


@dataclass
class BlockResult:
    state: dict
    outputs: list[list[torch.Tensor]]
    timings: dict[str, float] = field(default_factory=dict)


def _text_inputs(plan: ReplayPlan, selection: SampleSelection, dtype: torch.dtype, max_tokens: int,
                 hessian: bool) -> tuple[torch.Tensor, torch.Tensor | None, int]:
    """Inputs of ``ca.mat_kv``: the text memory rows of the selected prompts, as the block feeds them."""
    rows = torch.cat([plan.contexts[p].ca_kv.to(dtype) for p in selection.prompts])
    h = None
    count = 0
    if hessian:
        h, count = accumulate_hessian(None, 0, rows)
    return subsample_tokens(rows, max_tokens).float(), h, count


def calibrate_block(model: nn.Module, index: int, inputs: list[list[torch.Tensor]], plan: ReplayPlan,
                    selection: SampleSelection, qcfg, run_key: str, *, progress=None,
                    layer_configs: dict | None = None) -> BlockResult:
    """Calibrate and quantize every linear of block ``index`` in place; returns its state and its outputs.
    ``layer_configs`` maps layer names to their own ``QuantConfig`` (mixed precision)."""
    block = model.blocks()[index]
    block_name = model.block_names()[index]
    device = model.device
    entries: dict[str, dict] = {}
    params: dict[str, torch.Tensor] = {}
    timings = {"replay": 0.0, "calibrate": 0.0}
    for suffix, kind in BLOCK_LAYERS:
        name = f"{block_name}.{suffix}"
        if progress is not None:
            progress.set_postfix_str(suffix)
        layer_cfg = (layer_configs or {}).get(name) or quant_config_for_kind(qcfg, kind)
        if layer_cfg.wgts.dtype is None and layer_cfg.ipts.dtype is None:  # 16-bit: the layer stays as it is
            if progress is not None:
                progress.update(1)
            continue
        linear = block.get_submodule(suffix)
        want_hessian = layer_cfg.gptq.enabled and layer_cfg.wgts.dtype is not None
        synchronize(device)
        start = time.perf_counter()
        if kind == "ca_kv":
            x, hessian, hessian_tokens = _text_inputs(plan, selection, block.dtype, qcfg.max_tokens, want_hessian)
        else:
            tap = _LinearTap(selection, want_hessian)
            handle = linear.register_forward_pre_hook(tap)
            try:
                replay_block(block, plan, inputs, tap=tap)
            finally:
                handle.remove()
            x, hessian, hessian_tokens = tap.tokens(), tap.hessian, tap.hessian_tokens
        synchronize(device)
        timings["replay"] += time.perf_counter() - start
        start = time.perf_counter()
        entry = calibrate_layer(linear, x, hessian, layer_cfg, kind=kind, name=name)
        del x, hessian
        entry["report"]["hessian_tokens"] = hessian_tokens
        # a rotated layer smooths rotated channels, which the norm's per-channel affine cannot hold
        if kind == "ca_q" and entry["smooth"] is not None and qcfg.smooth.fold and not qcfg.rotation.enabled:
            block_params = _fold_into_norm(entry, block.ca_norm, f"{block_name}.ca_norm")
            _set_params(model, block_params)
            params.update(block_params)
        install_layer(model, name, entry)
        synchronize(device)
        timings["calibrate"] += time.perf_counter() - start
        entries[name] = entry
        report = entry["report"]
        logger.info("%s: relative output error %.4g -> %.4g (round-to-nearest -> calibrated%s)", name,
                    report["error_rtn"], report["error_final"],
                    _smoothing_note(report))
        if progress is not None:
            progress.update(1)
    start = time.perf_counter()
    outputs = replay_block(block, plan, inputs, keep_outputs=True)
    synchronize(device)
    timings["replay"] += time.perf_counter() - start
    state = {"format": BLOCK_STATE_FORMAT, "run_key": run_key, "block": index, "name": block_name,
             "layers": entries, "params": params, "timings": timings}
    return BlockResult(state, outputs, timings)


def validate_block_state(state, index: int, block_name: str, run_key: str, source: str) -> None:
    """ValueError naming ``source`` unless ``state`` is block ``index``'s state of the run ``run_key``."""
    if not isinstance(state, dict) or state.get("format") != BLOCK_STATE_FORMAT:
        raise ValueError(f"{source}: not a block state of this tool")
    if state.get("run_key") != run_key:
        raise ValueError(f"{source}: written by a run with a different configuration or model")
    if state.get("block") != index or state.get("name") != block_name:
        raise ValueError(f"{source}: holds block {state.get('block')} ({state.get('name')}), expected {index}")
    for name in state["layers"]:
        if not name.startswith(block_name + "."):
            raise ValueError(f"{source}: layer {name} is not in block {block_name}")
    for name in state["params"]:
        if not name.startswith(block_name + "."):
            raise ValueError(f"{source}: parameter {name} is not in block {block_name}")
