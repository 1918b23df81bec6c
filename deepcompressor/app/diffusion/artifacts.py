"""PTQ artifacts: writing, loading with validation, and applying them to a full-precision model.

A directory holds

- ``model.pt``: ``{"format", "layers": {name: {"meta", "state"}}, "params": {name: tensor}}``. ``state`` of a
  quantized linear: integer weight codes (4-bit packed two per byte) with their scales (and zero points), bias,
  static input ranges, or the 16-bit weight when only its inputs are quantized; ``meta`` describes the formats
  (``FakeQuantLinear.artifact_state``). ``params`` is every other parameter and buffer of the transformer.
- ``smooth.pt``: ``{"format", "scales": {name: {"scale", "alpha", "beta", "gamma", "folded_into"}}}``: smoothing
  scales (``alpha``/``beta`` of a grid candidate, or ``gamma`` of a gain-projected one);
  ``folded_into`` names the norm whose affine holds ``1 / s`` (then the layer does not divide at run time).
- ``branch.pt``: ``{"format", "branches": {name: {"l1", "l2"}}}``: low-rank factors ``[out, r]``, ``[r, in]``.
- ``config.yaml``: the resolved run config. ``fidelity.json`` / ``fidelity.md``: the fidelity report.
- ``manifest.json`` (written last): format, package versions, model identity, per-layer kinds, sizes and the
  sha256 of every other file.

``load_artifacts(dir)`` checks all of it (missing file, sha256, formats, names and shapes across files, the config
against the manifest's model identity) and returns an :class:`ArtifactBundle`; ``apply_artifacts(model, bundle)``
checks the model (architecture, weights fingerprint, every layer and parameter name and shape) before it swaps
in the ``FakeQuantLinear`` modules and loads the parameters. Without a full-precision model,
``deepcompressor.app.diffusion.quantized_model.load_quantized_transformer(dir)`` builds the W4A4 transformer
straight from the artifacts.
"""

from __future__ import annotations

import json
import logging
import platform
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import torch
from torch import nn

from ...config import ConfigError, load_config, save_config
from ...config.schema import RunConfig
from ...nn.fake_linear import FakeQuantLinear
from ...nn.layer_map import layer_kind
from ...utils.files import load_pt, save_pt, sha256_file, to_cpu, write_json
from .capture import weights_fingerprint

__all__ = [
    "ARTIFACT_FILES",
    "ARTIFACT_FORMAT",
    "ArtifactBundle",
    "ArtifactError",
    "apply_artifacts",
    "build_fake_layer",
    "estimate_model_pt_bytes",
    "layer_entries_for_artifacts",
    "load_artifacts",
    "read_manifest",
    "write_artifacts",
    "write_manifest",
]

logger = logging.getLogger(__name__)

ARTIFACT_FORMAT = "var-compressor-ptq/1"
MODEL_FILE, SMOOTH_FILE, BRANCH_FILE, CONFIG_FILE, MANIFEST_FILE = (
    "model.pt", "smooth.pt", "branch.pt", "config.yaml", "manifest.json")
ARTIFACT_FILES = (MODEL_FILE, SMOOTH_FILE, BRANCH_FILE, CONFIG_FILE)
_BRANCH_KEYS = ("lowrank_l1", "lowrank_l2")
_PACKAGES = ("var-compressor", "torch", "numpy", "transformers", "omniconfig", "pyyaml")
# Keys of the pipeline section that identify the model (the rest are run-time and sampling settings).
IDENTITY_KEYS = ("arch", "transformer_path", "text_encoder_path", "random_init", "seed")


class ArtifactError(ValueError):
    """Invalid, corrupted or mismatched artifacts; the message names the file, layer or key."""


# ------------------------------------------------------------------------------------------------ writing


def layer_entries_for_artifacts(entries: dict[str, dict]) -> tuple[dict, dict, dict]:
    """Split block-state layer entries into the ``model.pt`` layers, ``smooth.pt`` scales, ``branch.pt`` factors."""
    layers, scales, branches = {}, {}, {}
    for name, entry in entries.items():
        state = dict(entry["state"])
        l1, l2 = state.pop("lowrank_l1", None), state.pop("lowrank_l2", None)
        state.pop("smooth_scale", None)
        if l1 is not None:
            branches[name] = {"l1": l1, "l2": l2}
        if entry["smooth"] is not None:
            scales[name] = dict(entry["smooth"])
        layers[name] = {"kind": entry["kind"], "meta": entry["meta"], "state": state}
    return layers, scales, branches


def _package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def write_artifacts(directory: str | Path, cfg: RunConfig, model: nn.Module, entries: dict[str, dict],
                    fp_numel: int) -> dict:
    """Write ``model.pt``, ``smooth.pt``, ``branch.pt`` and ``config.yaml`` atomically; returns size figures.

    ``model`` is the quantized transformer (its non-quantized parameters go to ``model.pt``), ``entries`` the
    layer entries of every block state, ``fp_numel`` the number of values of the full-precision transformer
    (the sizes are reported relative to its bfloat16 size).
    """
    directory = Path(directory)
    layers, scales, branches = layer_entries_for_artifacts(entries)
    params = {name: tensor.detach() for name, tensor in model.state_dict().items()
              if not any(name.startswith(layer + ".") for layer in layers)}
    save_pt(directory / MODEL_FILE, to_cpu({"format": ARTIFACT_FORMAT, "layers": layers, "params": params}))
    save_pt(directory / SMOOTH_FILE, to_cpu({"format": ARTIFACT_FORMAT, "scales": scales}))
    save_pt(directory / BRANCH_FILE, to_cpu({"format": ARTIFACT_FORMAT, "branches": branches}))
    save_config(cfg, directory / CONFIG_FILE)
    sizes = {name: (directory / name).stat().st_size for name in (MODEL_FILE, SMOOTH_FILE, BRANCH_FILE)}
    bf16_bytes = 2 * fp_numel
    return {"files": sizes, "bf16_bytes": bf16_bytes, "model_pt_over_bf16": sizes[MODEL_FILE] / bf16_bytes,
            "all_over_bf16": sum(sizes.values()) / bf16_bytes, "num_quantized_layers": len(layers)}


def estimate_model_pt_bytes(model: nn.Module, qcfg) -> dict[str, int]:
    """Tensor bytes ``model.pt`` will hold for ``model`` (meta tensors are fine) quantized with ``qcfg``, without
    container overhead: ``{"quantized_layers", "other", "total", "bf16"}`` (``bf16``: the whole model in bf16)."""
    from ...calib.layer import quant_config_for_kind
    from ...nn.layer_map import is_block_kind, linear_layers
    from ...quant.core import quantized_weight_bytes

    quantized, covered = 0, set()
    for name, kind in linear_layers(model).items():
        if not is_block_kind(kind):
            continue
        layer_cfg = quant_config_for_kind(qcfg, kind)
        if layer_cfg.wgts.dtype is None and layer_cfg.ipts.dtype is None:
            continue
        linear = model.get_submodule(name)
        out_f, in_f = linear.out_features, linear.in_features
        covered.update(f"{name}.{key}" for key, _ in linear.named_parameters())
        if linear.bias is not None:
            quantized += linear.bias.numel() * linear.bias.element_size()
        if layer_cfg.wgts.dtype is None:
            quantized += linear.weight.numel() * linear.weight.element_size()
            continue
        quantized += quantized_weight_bytes(out_f, in_f, layer_cfg.wgts)
    other = sum(t.numel() * t.element_size() for n, t in model.state_dict().items() if n not in covered)
    bf16 = 2 * sum(t.numel() for t in model.state_dict().values())
    return {"quantized_layers": quantized, "other": other, "total": quantized + other, "bf16": bf16}


def write_manifest(directory: str | Path, identity: dict, layers: dict[str, str], extra: dict) -> Path:
    """``manifest.json`` with the sha256 of every artifact file present (written last: it seals the directory)."""
    directory = Path(directory)
    files = {}
    for path in sorted(directory.iterdir()):
        listed = path.name in ARTIFACT_FILES or path.name.startswith("fidelity.")
        if path.is_file() and listed:
            files[path.name] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    manifest = {"format": ARTIFACT_FORMAT, "packages": _package_versions(), "model": identity, "layers": layers,
                "files": files, **extra}
    return write_json(directory / MANIFEST_FILE, manifest)


# ------------------------------------------------------------------------------------------------ loading


@dataclass
class ArtifactBundle:
    """Validated contents of an artifact directory (tensors on the CPU; memory-mapped from the files, copy on
    write, when loaded with ``mmap=True``)."""

    directory: Path
    manifest: dict
    config: RunConfig
    layers: dict[str, dict]
    params: dict[str, torch.Tensor]
    scales: dict[str, dict]
    branches: dict[str, dict]

    def layer_state(self, name: str) -> dict[str, torch.Tensor]:
        """The full ``FakeQuantLinear.from_artifact`` state of layer ``name`` (smoothing and branch included)."""
        state = dict(self.layers[name]["state"])
        smooth = self.scales.get(name)
        if smooth is not None and smooth["folded_into"] is None:
            state["smooth_scale"] = smooth["scale"]
        branch = self.branches.get(name)
        if branch is not None:
            state["lowrank_l1"], state["lowrank_l2"] = branch["l1"], branch["l2"]
        return state


def _fail(message: str):
    raise ArtifactError(message)


def _load_checked(directory: Path, name: str, manifest: dict, mmap: bool = False) -> object:
    path = directory / name
    if not path.is_file():
        _fail(f"{path}: missing artifact file")
    expected = manifest["files"].get(name)
    if expected is None:
        _fail(f"{directory / MANIFEST_FILE}: does not list {name}")
    actual = sha256_file(path)
    if actual != expected["sha256"]:
        _fail(f"{path}: sha256 {actual[:16]}... does not match the manifest ({expected['sha256'][:16]}...): "
              "the file is corrupted or was replaced")
    if name.endswith(".pt"):
        try:
            data = load_pt(path, mmap=mmap)
        except (ValueError, FileNotFoundError) as error:
            raise ArtifactError(str(error)) from None
        if not isinstance(data, dict) or data.get("format") != ARTIFACT_FORMAT:
            _fail(f"{path}: not a {ARTIFACT_FORMAT} file")
        return data
    return None


def _check_tensor_dict(items, path: str, keys: tuple[str, ...]) -> None:
    if not isinstance(items, dict):
        _fail(f"{path}: expected a mapping")
    for name, entry in items.items():
        if not isinstance(entry, dict) or any(not isinstance(entry.get(k), torch.Tensor) for k in keys):
            _fail(f"{path}: entry {name} lacks tensors {keys}")


def _compare_config(expected: RunConfig, actual: RunConfig, directory: Path) -> None:
    from ...config import config_to_dict

    diffs = []
    exp_p, act_p = config_to_dict(expected)["pipeline"], config_to_dict(actual)["pipeline"]
    diffs += [f"pipeline.{k}" for k in IDENTITY_KEYS if exp_p[k] != act_p[k]]
    exp_q, act_q = config_to_dict(expected)["quant"], config_to_dict(actual)["quant"]
    diffs += [f"quant.{k}" for k in exp_q if exp_q[k] != act_q[k]]
    if diffs:
        _fail(f"{directory}: the artifacts were made with a different configuration (differs in {', '.join(diffs)})")


def _non_finite_tensors(value, prefix: str = "") -> list[str]:
    """Dotted keys of the floating-point tensors holding NaN or Inf anywhere in nested dicts / lists."""
    if isinstance(value, torch.Tensor):
        return [prefix or "<tensor>"] if value.is_floating_point() and not bool(torch.isfinite(value).all()) else []
    if isinstance(value, dict):
        return [k for key, item in value.items() for k in _non_finite_tensors(item, f"{prefix}.{key}" if prefix
                                                                               else str(key))]
    if isinstance(value, (list, tuple)):
        return [k for i, item in enumerate(value) for k in _non_finite_tensors(item, f"{prefix}[{i}]")]
    return []


def read_manifest(directory: str | Path) -> dict:
    """The checked ``manifest.json`` of an artifact directory (its sections present; the files it lists are
    checked by ``load_artifacts``). Cheap: callers use it to check the model identity before any heavy work."""
    directory = Path(directory)
    manifest_path = directory / MANIFEST_FILE
    if not directory.is_dir():
        _fail(f"{directory}: artifact directory not found")
    if not manifest_path.is_file():
        _fail(f"{manifest_path}: missing (the run did not finish writing its artifacts)")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        _fail(f"{manifest_path}: unreadable ({error})")
    if not isinstance(manifest, dict) or manifest.get("format") != ARTIFACT_FORMAT:
        _fail(f"{manifest_path}: not a {ARTIFACT_FORMAT} manifest")
    for key in ("files", "model", "layers"):
        if not isinstance(manifest.get(key), dict):
            _fail(f"{manifest_path}: missing section {key!r}")
    return manifest


def load_artifacts(directory: str | Path, expected_config: RunConfig | None = None, *,
                   mmap: bool = False) -> ArtifactBundle:
    """Load and validate an artifact directory; with ``expected_config`` its model identity and ``quant``
    section must match the artifacts' config. Raises :class:`ArtifactError` naming the problem.

    ``mmap``: the tensors stay memory-mapped from the ``.pt`` files (private, copy-on-write mappings: page cache
    the kernel can drop and read again, instead of process memory holding a copy of every file)."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    manifest_path = directory / MANIFEST_FILE
    model_data = _load_checked(directory, MODEL_FILE, manifest, mmap)
    smooth_data = _load_checked(directory, SMOOTH_FILE, manifest, mmap)
    branch_data = _load_checked(directory, BRANCH_FILE, manifest, mmap)
    _load_checked(directory, CONFIG_FILE, manifest)
    for name in manifest["files"]:
        if name not in ARTIFACT_FILES:
            _load_checked(directory, name, manifest)
    try:
        config = load_config([str(directory / CONFIG_FILE)])
    except ConfigError as error:
        raise ArtifactError(f"{directory / CONFIG_FILE}: invalid config: {error}") from None

    identity = manifest["model"]
    for key in ("arch", "random_init", "seed", "transformer_path"):
        if identity.get(key) != getattr(config.pipeline, key):
            _fail(f"{manifest_path}: model.{key} = {identity.get(key)!r} does not match pipeline.{key} = "
                  f"{getattr(config.pipeline, key)!r} of {directory / CONFIG_FILE}")
    if expected_config is not None:
        _compare_config(expected_config, config, directory)

    layers, params = model_data.get("layers"), model_data.get("params")
    scales, branches = smooth_data.get("scales"), branch_data.get("branches")
    if not isinstance(layers, dict) or not isinstance(params, dict):
        _fail(f"{directory / MODEL_FILE}: missing 'layers' or 'params'")
    _check_tensor_dict(scales, str(directory / SMOOTH_FILE), ("scale",))
    _check_tensor_dict(branches, str(directory / BRANCH_FILE), ("l1", "l2"))
    if set(layers) != set(manifest["layers"]):
        _fail(f"{directory / MODEL_FILE}: its layers differ from the manifest's")
    for name in list(scales) + list(branches):
        if name not in layers:
            _fail(f"{directory}: {name} has smoothing or low-rank factors but is not a quantized layer of model.pt")
    for file, data in ((MODEL_FILE, model_data), (SMOOTH_FILE, smooth_data), (BRANCH_FILE, branch_data)):
        bad = _non_finite_tensors(data)
        if bad:
            shown = ", ".join(bad[:5]) + (f", ... ({len(bad)} in all)" if len(bad) > 5 else "")
            _fail(f"{directory / file}: NaN or Inf values in {shown}")
    bundle = ArtifactBundle(directory, manifest, config, layers, params, scales, branches)
    for name, entry in layers.items():
        try:
            kind = layer_kind(name)
        except ValueError as error:
            raise ArtifactError(f"{directory / MODEL_FILE}: {error}") from None
        if entry.get("kind") != kind or manifest["layers"][name] != kind:
            _fail(f"{directory / MODEL_FILE}: layer {name} is recorded as {entry.get('kind')!r}, expected {kind!r}")
        build_fake_layer(bundle, name, weight=None, device="meta")  # shapes and formats (no data touched)
    return bundle


def build_fake_layer(bundle: ArtifactBundle, name: str, weight: torch.Tensor | None,
                 device: str | None = None) -> FakeQuantLinear:
    """The layer's ``FakeQuantLinear``; ``device="meta"`` checks shapes and formats without reading or unpacking
    any tensor data."""
    entry = bundle.layers[name]
    state = bundle.layer_state(name)
    if device is not None:
        state = {key: value.to(device) if isinstance(value, torch.Tensor) else value
                 for key, value in state.items()}
        weight = None if weight is None else weight.to(device)
    meta = entry["meta"]
    stored = state.get("weight")
    try:
        module = FakeQuantLinear.from_artifact(state, meta, weight=stored if stored is not None else weight,
                                               name=name)
    except (ValueError, KeyError, TypeError) as error:
        raise ArtifactError(f"{bundle.directory / MODEL_FILE}: layer {name}: {error}") from None
    shapes = {"lowrank_l1": (module.out_features, None), "lowrank_l2": (None, module.in_features)}
    for key, (rows, cols) in shapes.items():
        tensor = state.get(key)
        if tensor is not None and ((rows is not None and tensor.shape[0] != rows) or
                                   (cols is not None and tensor.shape[1] != cols)):
            _fail(f"{bundle.directory / BRANCH_FILE}: {name}.{key} has shape {tuple(tensor.shape)}, which does not "
                  f"fit a {module.out_features}x{module.in_features} layer")
    return module


# ------------------------------------------------------------------------------------------------ applying


def apply_artifacts(model: nn.Module, bundle: ArtifactBundle, *, keep_float_weight: bool = False,
                    check_fingerprint: bool = True) -> nn.Module:
    """Swap the bundle's quantized layers into the full-precision ``model`` and load its other parameters.

    Everything is checked before the model is touched: architecture, weights fingerprint (the model must be the
    one that was calibrated), every layer name (an ``nn.Linear`` of the model) and shape, every parameter name
    and shape. ``keep_float_weight`` keeps the float weights in the quantized layers (ablation switches).
    """
    identity = bundle.manifest["model"]
    arch = getattr(getattr(model, "arch", None), "name", None)
    if arch != identity["arch"]:
        _fail(f"{bundle.directory}: artifacts are for Infinity-{identity['arch']}, the model is Infinity-{arch}")
    if any(isinstance(m, FakeQuantLinear) for m in model.modules()):
        _fail("apply_artifacts: the model already holds quantized layers; pass a full-precision model")
    if check_fingerprint:
        fingerprint = weights_fingerprint(model)
        if fingerprint != identity["transformer_fingerprint"]:
            _fail(f"{bundle.directory}: the model's weights do not match the calibrated model (fingerprint "
                  f"{fingerprint[:12]} vs {identity['transformer_fingerprint'][:12]})")
    modules = dict(model.named_modules())
    built = {}
    for name, entry in bundle.layers.items():
        linear = modules.get(name)
        if not isinstance(linear, nn.Linear):
            _fail(f"{bundle.directory / MODEL_FILE}: layer {name} is not a linear layer of the model")
        meta = entry["meta"]
        if (linear.in_features, linear.out_features) != (int(meta["in_features"]), int(meta["out_features"])):
            _fail(f"{bundle.directory / MODEL_FILE}: layer {name} is {meta['out_features']}x{meta['in_features']}, "
                  f"the model's is {linear.out_features}x{linear.in_features}")
        weight = None
        if keep_float_weight:
            weight = linear.weight.detach()
            smooth = bundle.scales.get(name)
            if smooth is not None and smooth["folded_into"] is not None:
                weight = (weight.float() * smooth["scale"].to(weight.device)).to(weight.dtype)
        built[name] = build_fake_layer(bundle, name, weight)
    own = {name: t for name, t in model.state_dict().items()
           if not any(name.startswith(layer + ".") for layer in bundle.layers)}
    missing = sorted(set(own) - set(bundle.params))
    extra = sorted(set(bundle.params) - set(own))
    if missing or extra:
        _fail(f"{bundle.directory / MODEL_FILE}: parameters do not match the model "
              f"(missing {missing[:3]}, unknown {extra[:3]})")
    for name, tensor in bundle.params.items():
        if tuple(tensor.shape) != tuple(own[name].shape):
            _fail(f"{bundle.directory / MODEL_FILE}: parameter {name} has shape {tuple(tensor.shape)}, the model's "
                  f"is {tuple(own[name].shape)}")
    device = next(model.parameters()).device
    with torch.no_grad():
        for name, tensor in bundle.params.items():
            own[name].copy_(tensor.to(own[name].device, own[name].dtype))
    for name, module in built.items():
        model.set_submodule(name, module.to(device))
    return model
