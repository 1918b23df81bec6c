"""The W4A4 transformer built straight from its PTQ artifacts (``load_quantized_transformer``) is today's model
(full-precision transformer + ``apply_artifacts`` + ``convert_to_w4a4``) bit for bit, reads no full-precision
weight, and refuses bad artifacts with errors naming the file, layer or key before placing any tensor."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from deepcompressor.app.diffusion.artifacts import ArtifactError, write_manifest
from deepcompressor.app.diffusion.quantized_model import load_quantized_transformer
from deepcompressor.config import load_config
from deepcompressor.nn.w4a4_linear import W4A4Linear
from deepcompressor.utils.files import load_pt, save_pt

ROOT = Path(__file__).resolve().parents[1]
TINY = [str(ROOT / "configs/models/infinity-tiny.yaml"), str(ROOT / "configs/svdquant/int4.yaml")]
# A real (if short) calibration: smoothing folded into ca_norm where it helps, low-rank branch, range search, and
# static input ranges; the cross-attention key/value projection keeps 16-bit inputs.
PTQ = {"pipeline.device": "cpu", "collect.num_prompts": 1, "quant.max_tokens": 128, "quant.smooth.num_grids": 2,
       "quant.low_rank.rank": 8, "quant.low_rank.num_iters": 1, "quant.calib_range.num_grids": 2,
       "quant.ipts.static": True, "eval.num_prompts": 1}


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    """``{"ptq": dir, "synthetic": dir}``: a PTQ run's artifacts (static inputs) and synthetic artifacts of the
    shipped W4A4 config (dynamic inputs), both written by the artifact writer."""
    from deepcompressor.app.diffusion.ptq_infinity import run_ptq
    from deepcompressor.app.diffusion.synthetic_artifacts import write_synthetic_artifacts

    root = tmp_path_factory.mktemp("quantized_load")
    values = dict(PTQ, **{"output.root": str(root / "runs"), "collect.cache_dir": str(root / "cache")})
    ptq = run_ptq(load_config(TINY[:1] + [str(ROOT / "configs/collect/qdiff.yaml")] + TINY[1:], values),
                  root / "ptq")
    assert ptq.complete
    synthetic = write_synthetic_artifacts(load_config(TINY, {"pipeline.device": "cpu", "quant.low_rank.rank": 8}),
                                          root / "synthetic")
    return {"ptq": ptq.directory, "synthetic": synthetic}


def _todays_model(directory, dtype=torch.float32):
    """Today's path: the full-precision tiny transformer + apply_artifacts + convert_to_w4a4."""
    from infinity.tiny import build_tiny_transformer

    from deepcompressor.bench.w4a4_pipeline import w4a4_from_artifacts

    model = build_tiny_transformer(0, "cpu", dtype)
    _, names = w4a4_from_artifacts(model, directory, backend="torch")
    return model, names


def _generate(model):
    from infinity.sampler import sample
    from infinity.schedules import get_scale_schedule

    kv = torch.randn(5, model.arch.text_channels, generator=torch.Generator().manual_seed(1))
    return sample(model, kv, [5], get_scale_schedule("0.06M", 1.0), cfg=3.0, seed=0, return_logits=True)


# ------------------------------------------------------------------------------------------------ equality


def test_packed_codes_repack_to_the_kernel_layout_exactly():
    from deepcompressor.kernels.w4a4_layout import pack_weight
    from deepcompressor.nn.w4a4_linear import kernel_packed_from_packed
    from deepcompressor.quant.packing import unpack_int4

    packed = torch.randint(0, 256, (48, 96), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    for signed in (True, False):
        expected = pack_weight(unpack_int4(packed, signed).reshape(48, 192), signed)
        assert torch.equal(kernel_packed_from_packed(packed), expected)


@pytest.mark.parametrize("kind, dtype", [("ptq", torch.float32), ("ptq", torch.bfloat16),
                                         ("synthetic", torch.float32)], ids=["ptq-fp32", "ptq-bf16", "synthetic-fp32"])
def test_the_model_equals_todays_tensor_for_tensor(artifacts, kind, dtype):
    model, bundle, names = load_quantized_transformer(artifacts[kind], device="cpu", dtype=dtype, backend="torch")
    ref, ref_names = _todays_model(artifacts[kind], dtype)
    assert names == ref_names and len(names) == 42
    assert [(n, type(m)) for n, m in model.named_modules()] == [(n, type(m)) for n, m in ref.named_modules()]
    assert sum(isinstance(m, nn.Linear) for m in model.modules()) == 8  # the non-block linears stay nn.Linear
    got, expected = model.state_dict(), ref.state_dict()
    assert list(got) == list(expected)
    for key, tensor in expected.items():
        assert got[key].dtype == tensor.dtype and torch.equal(got[key], tensor), key
    # Every tensor the modules hold (non-persistent buffers too), and how each layer runs.
    assert [n for n, _ in model.named_buffers()] == [n for n, _ in ref.named_buffers()]
    assert [(n, p.requires_grad) for n, p in model.named_parameters()] == [
        (n, p.requires_grad) for n, p in ref.named_parameters()]
    assert model.training == ref.training and model.block_dtype == ref.block_dtype == dtype
    for name in names:
        a, b = model.get_submodule(name), ref.get_submodule(name)
        assert (a.backend, a.static_inputs, a.rank, a.ispec, a.wspec) == (b.backend, b.static_inputs, b.rank,
                                                                            b.ispec, b.wspec), name
    layers = [model.get_submodule(n) for n in names]
    assert sum(layer.ispec is None for layer in layers) == 6  # ca.mat_kv: 16-bit inputs
    assert all(layer.static_inputs for layer in layers if layer.ispec is not None) == (kind == "ptq")
    if kind == "ptq":
        assert any(s["folded_into"] for s in bundle.scales.values())  # ca_norm holds the folded 1 / s


@pytest.mark.parametrize("kind", ["ptq", "synthetic"])
def test_a_generation_is_bit_identical(artifacts, kind):
    model, _, _ = load_quantized_transformer(artifacts[kind], device="cpu", backend="torch")
    ref, _ = _todays_model(artifacts[kind])
    got, expected = _generate(model), _generate(ref)
    assert len(got.bits) == len(expected.bits) == 7
    for a, b in zip(got.logits, expected.logits):
        assert torch.equal(a, b)
    for a, b in zip(got.bits, expected.bits):
        assert torch.equal(a, b)
    assert torch.equal(got.summed_codes, expected.summed_codes)


# ------------------------------------------------------------------------------------------------ no float weights


def test_no_full_precision_weight_is_read_or_built(artifacts, monkeypatch):
    import infinity.checkpoints
    import infinity.pipeline
    import infinity.tiny
    from torch.utils._python_dispatch import TorchDispatchMode

    from deepcompressor.nn.fake_linear import FakeQuantLinear

    def refuse(*args, **kwargs):
        raise AssertionError("the full-precision transformer must not be built")

    for module, names in ((infinity.checkpoints, ("load_transformer", "random_transformer", "read_state_dict_shards")),
                          (infinity.pipeline, ("load_transformer", "random_transformer")),
                          (infinity.tiny, ("build_tiny_transformer", "tiny_weights"))):
        for name in names:
            monkeypatch.setattr(module, name, refuse)
    monkeypatch.setattr(W4A4Linear, "from_fake", refuse)
    float_weights = []
    fake_init = FakeQuantLinear.__init__

    def record(self, *args, weight=None, **kwargs):
        float_weights.append(weight)
        fake_init(self, *args, weight=weight, **kwargs)

    monkeypatch.setattr(FakeQuantLinear, "__init__", record)

    directory = artifacts["ptq"]
    bundle_layers = load_pt(directory / "model.pt")["layers"]
    params = load_pt(directory / "model.pt")["params"]
    shapes = {(int(e["meta"]["out_features"]), int(e["meta"]["in_features"])) for e in bundle_layers.values()}
    weight_shapes = shapes - {tuple(t.shape) for t in params.values()}  # a layer's shape no other tensor has
    assert len(weight_shapes) >= 3

    class FloatWeights(TorchDispatchMode):
        """Records every floating-point tensor an operation produces with a quantized layer's weight shape."""

        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if (isinstance(t, torch.Tensor) and t.is_floating_point() and not t.is_meta
                        and tuple(t.shape) in weight_shapes):
                    self.seen.append((str(func), tuple(t.shape)))
            return out

    with FloatWeights() as mode:
        model, _, names = load_quantized_transformer(directory, device="cpu", backend="torch")
    assert mode.seen == []
    assert float_weights and all(w is None for w in float_weights)  # load_artifacts' checks build no float weight
    assert len(names) == 42 and all(isinstance(model.get_submodule(n), W4A4Linear) for n in names)
    assert not any(isinstance(m, FakeQuantLinear) for m in model.modules())


# ------------------------------------------------------------------------------------------------ errors


def _copy(src: Path, dst: Path, *, config=None, manifest=None, **edits) -> Path:
    """A copy of an artifact directory, edited (``model=f`` calls ``f`` on model.pt's dict, likewise ``smooth``,
    ``branch``; ``config(text)``, ``manifest(dict)``) and sealed again (so that only the edit is wrong)."""
    shutil.copytree(src, dst)
    for stem, edit in edits.items():
        data = load_pt(dst / f"{stem}.pt")
        edit(data)
        save_pt(dst / f"{stem}.pt", data)
    if config is not None:
        (dst / "config.yaml").write_text(config((dst / "config.yaml").read_text()))
    m = json.loads((dst / "manifest.json").read_text())
    if manifest is not None:
        manifest(m)
    extra = {k: v for k, v in m.items() if k not in ("format", "packages", "model", "layers", "files")}
    write_manifest(dst, m["model"], m["layers"], extra)
    return dst


@pytest.fixture
def placed(monkeypatch):
    """Counts the tensors placed on the model (none may be placed before an error)."""
    import infinity.checkpoints

    calls = []
    original = infinity.checkpoints.set_tensor
    monkeypatch.setattr(infinity.checkpoints, "set_tensor", lambda *a: (calls.append(a[1]), original(*a)))
    return calls


def _load(directory, **kwargs):
    return load_quantized_transformer(directory, device="cpu", backend="torch", **kwargs)


def test_wrong_architecture(artifacts, tmp_path, placed):
    src = artifacts["synthetic"]
    with pytest.raises(ArtifactError, match=r"different configuration \(differs in pipeline\.arch"):
        _load(src, expected_config=load_config(TINY, {"pipeline.arch": "2b"}))
    relabelled = _copy(src, tmp_path / "2b", config=lambda text: text.replace("arch: tiny", "arch: 2b"),
                       manifest=lambda m: m["model"].update(arch="2b"))
    with pytest.raises(ArtifactError, match=r"model\.pt: layer block_chunks\.0\.module\.0\.sa\.mat_qkv is 768x256, "
                                            r"Infinity-2b's is 6144x2048"):
        _load(relabelled)
    assert placed == []


def test_missing_layer_and_unknown_layer(artifacts, tmp_path, placed):
    src, name = artifacts["synthetic"], "block_chunks.1.module.2.ffn.fc2"
    missing = _copy(src, tmp_path / "missing", model=lambda d: d["layers"].pop(name),
                    smooth=lambda d: d["scales"].pop(name), branch=lambda d: d["branches"].pop(name),
                    manifest=lambda m: m["layers"].pop(name))
    with pytest.raises(ArtifactError, match=rf"model\.pt: parameters do not match Infinity-tiny \(missing "
                                            rf"\['{name}\.bias', '{name}\.weight'\]"):
        _load(missing)

    other = "block_chunks.5.module.0.ffn.fc2"  # tiny has 2 chunks of 3 blocks
    renamed = _copy(src, tmp_path / "renamed", model=lambda d: d["layers"].update({other: d["layers"].pop(name)}),
                    smooth=lambda d: d["scales"].update({other: d["scales"].pop(name)}),
                    branch=lambda d: d["branches"].update({other: d["branches"].pop(name)}),
                    manifest=lambda m: m["layers"].update({other: m["layers"].pop(name)}))
    with pytest.raises(ArtifactError, match=rf"model\.pt: layer {other} is not a linear layer of Infinity-tiny"):
        _load(renamed)
    assert placed == []


def test_shape_mismatches(artifacts, tmp_path, placed):
    src = artifacts["synthetic"]
    short = _copy(src, tmp_path / "param", model=lambda d: d["params"].update(pos_start=torch.zeros(1, 1, 128)))
    with pytest.raises(ArtifactError, match=r"model\.pt: parameter pos_start has shape \(1, 1, 128\), "
                                            r"Infinity-tiny's is \(1, 1, 256\)"):
        _load(short)
    extra = _copy(src, tmp_path / "extra", model=lambda d: d["params"].update(spare=torch.zeros(3)))
    with pytest.raises(ArtifactError, match=r"parameters do not match Infinity-tiny \(missing \[\], unknown "
                                            r"\['spare'\]"):
        _load(extra)
    assert placed == []


def test_corrupted_files(artifacts, tmp_path, placed):
    src = artifacts["synthetic"]
    flipped = tmp_path / "flipped"
    shutil.copytree(src, flipped)
    raw = bytearray((flipped / "model.pt").read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    (flipped / "model.pt").write_bytes(bytes(raw))
    with pytest.raises(ArtifactError, match=r"model\.pt: sha256 .* does not match the manifest"):
        _load(flipped)
    truncated = tmp_path / "truncated"
    shutil.copytree(src, truncated)
    (truncated / "model.pt").write_bytes((src / "model.pt").read_bytes()[:4096])
    _copy(truncated, tmp_path / "resealed")  # a sealed but unreadable file
    with pytest.raises(ArtifactError, match=r"model\.pt: cannot be read as a torch file"):
        _load(tmp_path / "resealed")
    (tmp_path / "no_manifest").mkdir()
    with pytest.raises(ArtifactError, match=r"manifest\.json: missing"):
        _load(tmp_path / "no_manifest")
    assert placed == []


def test_a_layer_with_16_bit_weights_is_refused_like_convert_to_w4a4(artifacts, tmp_path, placed):
    src, name = artifacts["synthetic"], "block_chunks.0.module.1.ffn.fc1"

    def keep_16_bit(data):
        entry = data["layers"][name]
        meta = entry["meta"]
        entry["state"] = {"weight": torch.randn(meta["out_features"], meta["in_features"]),
                          "bias": entry["state"]["bias"]}
        meta["wgts"], meta["qweight"] = None, None

    directory = _copy(src, tmp_path / "w16", model=keep_16_bit)
    with pytest.raises(ValueError, match="needs quantized weights") as today:
        _todays_model(directory)
    with pytest.raises(ArtifactError) as new:
        _load(directory)
    assert str(new.value) == f"{directory / 'model.pt'}: layer {today.value}"
    assert placed == []


def test_w4a4_from_artifact_checks_its_state(artifacts):
    from deepcompressor.app.diffusion.artifacts import load_artifacts

    bundle = load_artifacts(artifacts["ptq"])
    name = "block_chunks.0.module.0.sa.proj"
    state, meta = bundle.layer_state(name), bundle.layers[name]["meta"]
    layer = W4A4Linear.from_artifact(state, meta, name=name, backend="torch")
    assert layer.weight_packed.shape == (256, 128) and layer.static_inputs
    with pytest.raises(ValueError, match=f"{name}: static input quantization needs calibrated input_scale"):
        W4A4Linear.from_artifact({k: v for k, v in state.items() if k != "input_scale"}, meta, name=name)
    with pytest.raises(ValueError, match=rf"{name}\.qweight: codes shape \(256, 64\)"):
        W4A4Linear.from_artifact(dict(state, **{"qweight.codes": state["qweight.codes"][:, :64]}), meta, name=name)
    with pytest.raises(ValueError, match=f"{name}: artifact metadata lacks 'ipts'"):
        W4A4Linear.from_artifact(state, {k: v for k, v in meta.items() if k != "ipts"}, name=name)
