"""The W4A4 Infinity transformer built straight from its PTQ artifacts, without the full-precision weights.

``load_quantized_transformer(directory)`` gives the model that ``w4a4_from_artifacts`` (the full-precision
transformer, ``apply_artifacts``, ``convert_to_w4a4``) gives, tensor for tensor, but never reads or builds a
full-precision weight: at 8B the bfloat16 transformer (15.9 GiB) does not fit an 8 or 16 GB Jetson module, its
W4A4 form does. ``model.pt`` holds every tensor the quantized model needs (the packed 4-bit codes with their scales
and zero points, bias and static input ranges of each quantized layer, and ``params``: every other parameter and
buffer), ``smooth.pt`` the smoothing scales that are not folded into a norm, ``branch.pt`` the low-rank factors.

How (see ``load_quantized_transformer``): the files are validated by ``load_artifacts`` and memory-mapped; the
model of the manifest's architecture is built on the meta device; everything is checked against it before any
tensor is placed; then each parameter / buffer goes straight to the target device in the dtype the checkpoint
loaders give it (``infinity.checkpoints.tensor_dtype``), and each quantized layer is built on the device as a
``W4A4Linear`` (``W4A4Linear.from_artifact``), one layer at a time.
"""

from __future__ import annotations

import logging
from itertools import chain
from pathlib import Path

import torch
from torch import nn

from ...config.schema import RunConfig
from ...kernels.w4a4_dispatch import BACKENDS
from ...nn.w4a4_linear import W4A4Linear
from .artifacts import MANIFEST_FILE, MODEL_FILE, ArtifactBundle, ArtifactError, build_fake_layer, load_artifacts

__all__ = ["load_quantized_transformer"]

logger = logging.getLogger(__name__)


def _fail(message: str):
    raise ArtifactError(message)


def _message(name: str, error: Exception) -> str:
    text = str(error)
    return text[len(name) + 2:] if text.startswith(f"{name}: ") else text


def _check_layers(model: nn.Module, bundle: ArtifactBundle, arch_name: str, backend: str) -> list[str]:
    """``_check_linears``, and every quantized layer builds as a ``W4A4Linear`` (checked on meta tensors: no data
    read); returns their names in module order."""
    names = _check_linears(model, bundle, arch_name)
    path = bundle.directory / MODEL_FILE
    for name in names:
        state = {key: value.to("meta") if isinstance(value, torch.Tensor) else value
                 for key, value in bundle.layer_state(name).items() if key != "weight"}
        try:
            W4A4Linear.from_artifact(state, bundle.layers[name]["meta"], name=name, backend=backend)
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            raise ArtifactError(f"{path}: layer {name}: {_message(name, error)}") from None
    return names


def _check_linears(model: nn.Module, bundle: ArtifactBundle, arch_name: str) -> list[str]:
    """Every quantized layer is an ``nn.Linear`` of ``model`` with the artifact's shape; their names in order."""
    path = bundle.directory / MODEL_FILE
    modules = dict(model.named_modules())
    for name, entry in bundle.layers.items():
        linear = modules.get(name)
        if not isinstance(linear, nn.Linear):
            _fail(f"{path}: layer {name} is not a linear layer of Infinity-{arch_name}")
        meta = entry["meta"]
        try:
            shape = (int(meta["out_features"]), int(meta["in_features"]))
        except (KeyError, TypeError, ValueError) as error:
            raise ArtifactError(f"{path}: layer {name}: invalid metadata ({error})") from None
        if shape != (linear.out_features, linear.in_features):
            _fail(f"{path}: layer {name} is {shape[0]}x{shape[1]}, Infinity-{arch_name}'s is "
                  f"{linear.out_features}x{linear.in_features}")
    return [name for name in modules if name in bundle.layers]


def _check_params(model: nn.Module, bundle: ArtifactBundle, arch_name: str) -> None:
    """``bundle.params`` is exactly every parameter and buffer of ``model`` outside the quantized layers."""
    path = bundle.directory / MODEL_FILE
    own = {name: t for name, t in model.state_dict(keep_vars=True).items()
           if not any(name.startswith(layer + ".") for layer in bundle.layers)}
    computed = [name for name, _ in model.named_buffers()
                if name not in own and not any(name.startswith(layer + ".") for layer in bundle.layers)]
    if computed:  # Infinity has none today (RoPE tables are built per call); a new one needs its init code here
        _fail(f"Infinity-{arch_name} has non-persistent buffers the artifacts cannot hold and this loader does not "
              f"compute: {', '.join(computed[:5])}")
    missing = sorted(set(own) - set(bundle.params))
    extra = sorted(set(bundle.params) - set(own))
    if missing or extra:
        _fail(f"{path}: parameters do not match Infinity-{arch_name} (missing {missing[:3]}"
              f"{f' and {len(missing) - 3} more' if len(missing) > 3 else ''}, unknown {extra[:3]}"
              f"{f' and {len(extra) - 3} more' if len(extra) > 3 else ''})")
    for name, tensor in bundle.params.items():
        if not isinstance(tensor, torch.Tensor):
            _fail(f"{path}: parameter {name} is a {type(tensor).__name__}, not a tensor")
        if tuple(tensor.shape) != tuple(own[name].shape):
            _fail(f"{path}: parameter {name} has shape {tuple(tensor.shape)}, Infinity-{arch_name}'s is "
                  f"{tuple(own[name].shape)}")


@torch.no_grad()
def load_quantized_transformer(directory: str | Path, *, device: str | torch.device = "auto",
                               dtype: str | torch.dtype = "auto", backend: str = "auto",
                               expected_config: RunConfig | None = None, real: bool = True,
                               ) -> tuple[nn.Module, ArtifactBundle, list[str]]:
    """The W4A4 transformer of a PTQ artifact directory, built without its full-precision weights.

    Returns ``(model, bundle, layer_names)``: the ``Infinity`` model on ``device`` (``auto``: CUDA if available)
    with blocks in ``dtype`` (``auto``: bfloat16 on CUDA, float32 elsewhere; everything outside the blocks
    float32, as ``infinity.checkpoints`` loads it), every quantized layer a ``W4A4Linear`` running ``backend``;
    the validated :class:`ArtifactBundle` (tensors memory-mapped from the files); the converted layer names in
    module order. The model equals, tensor for tensor (names, dtypes, values), the one ``w4a4_from_artifacts``
    makes from the full-precision model with the same device, dtype and backend.

    Checks, each an :class:`ArtifactError` naming the file, layer or key: everything ``load_artifacts`` checks
    (files, sha256, formats, names and shapes across files, config against the manifest's model identity, and
    ``expected_config``'s model identity and ``quant`` section); then, before any tensor is placed: the
    manifest's architecture, every quantized layer an ``nn.Linear`` of that architecture with the artifact's
    shape that builds as a ``W4A4Linear`` (a layer that keeps 16-bit weights, i.e. only its inputs quantized,
    is refused as ``convert_to_w4a4`` refuses it), and ``params`` exactly every other parameter and buffer with
    its shape; after: no meta tensor left. Linears that are not quantized layers stay ``nn.Linear`` with their
    weights from ``params``.

    ``real=False`` builds each quantized layer as the ``FakeQuantLinear`` that ``apply_artifacts`` would install
    (the simulated model, any format; still no full-precision weight of a quantized layer is read).

    Identity: ``apply_artifacts`` compares the fingerprint of the full-precision weights with the manifest's;
    without those weights that check cannot run. The manifest's model identity (checked against the config by
    ``load_artifacts``, and against ``expected_config`` if given) and the sha256 of every file are the check
    instead: the artifacts are a complete, self-describing model.

    Memory: the ``.pt`` files are memory-mapped (private, copy-on-write mappings: clean page cache the kernel can
    drop and read again, not process memory; ``load_artifacts`` reads every byte once for the sha256 and NaN
    checks); no float weight and no unpacked (one byte per code) copy is made. The device holds the model placed
    so far plus, while one layer is built there, that layer's packed state and the repacking temporaries (under
    2 bytes per weight of that one layer): the peak is the W4A4 model plus one layer (measured on an H200 with
    synthetic artifacts: 8B 4.84 GiB resident, at most 5.03 GiB peak; 2B 1.37 / 1.40 GiB; the full-precision
    path peaks at 24.1 / 6.4 GiB). On the CPU the placed tensors that need no conversion share the mapped file
    pages.
    """
    from infinity.arch import get_arch
    from infinity.checkpoints import build_meta_model, resolve_device, resolve_dtype, set_tensor, tensor_dtype

    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    device = resolve_device(device)
    block_dtype = resolve_dtype(dtype, device)
    bundle = load_artifacts(directory, expected_config, mmap=True)
    arch_name = bundle.manifest["model"].get("arch")
    try:
        arch = get_arch(arch_name)
    except ValueError as error:
        raise ArtifactError(f"{bundle.directory / MANIFEST_FILE}: model.arch: {error}") from None
    model = build_meta_model(arch)
    if real:
        layer_names = _check_layers(model, bundle, arch.name, backend)
    else:  # load_artifacts has built every FakeQuantLinear on its own; only the model's layout is left to check
        layer_names = _check_linears(model, bundle, arch.name)
    _check_params(model, bundle, arch.name)

    for name, tensor in bundle.params.items():  # the transfers and casts apply_artifacts' copy_ does
        set_tensor(model, name, tensor.to(device, tensor_dtype(name, block_dtype)))
    for name in layer_names:
        if real:
            state = {key: value.to(device) for key, value in bundle.layer_state(name).items() if key != "weight"}
            layer = W4A4Linear.from_artifact(state, bundle.layers[name]["meta"], name=name, backend=backend)
            del state
        else:
            layer = build_fake_layer(bundle, name, weight=None).to(device)
        model.set_submodule(name, layer)
        del layer
    left = [name for name, t in chain(model.named_parameters(), model.named_buffers()) if t.is_meta]
    if left:
        _fail(f"{bundle.directory / MODEL_FILE}: no value for {', '.join(left[:5])}"
              f"{f' and {len(left) - 5} more' if len(left) > 5 else ''} of Infinity-{arch.name}")
    logger.info("built the %s Infinity-%s from %s: %d quantized layers on %s (blocks %s)",
                "W4A4" if real else "fake-quantized", arch.name, bundle.directory, len(layer_names), device,
                block_dtype)
    return model, bundle, layer_names
