"""Transformer checkpoint loading: single files, training wrappers, sharded folders, strictness, dtypes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from infinity.checkpoints import (
    CheckpointError,
    fresh_cfg_uncond,
    load_transformer,
    random_transformer,
    resolve_dtype,
)

GOLDEN = Path(__file__).parent / "data" / "infinity" / "golden"


@pytest.fixture(scope="module")
def golden_sd() -> dict[str, torch.Tensor]:
    return torch.load(GOLDEN / "tiny_p0_state_dict.pt", weights_only=True)


def assert_matches(model, sd):
    got = model.state_dict()
    assert set(got) == set(sd)
    for name, tensor in sd.items():
        assert torch.equal(got[name], tensor), name


def save(obj, path: Path) -> Path:
    torch.save(obj, path)
    return path


def test_single_file_roundtrip_and_forward(golden_sd, tmp_path):
    model = load_transformer(save(golden_sd, tmp_path / "infinity.pth"), "tiny_p0", device="cpu")
    assert_matches(model, golden_sd)
    assert not any(p.requires_grad for p in model.parameters())
    inputs = torch.load(GOLDEN / "tiny_p0_inputs.pt", weights_only=True)
    ref = torch.load(GOLDEN / "tiny_p0_forward.pt", weights_only=True)["logits"]
    schedule = [tuple(r) for r in inputs["scale_schedule"].tolist()]
    with torch.no_grad():
        logits = model(inputs["kv_compact"], inputs["lens"].tolist(), inputs["x_BLC_wo_prefix"], schedule)
    torch.testing.assert_close(logits, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "wrap",
    [
        lambda sd: {"trainer": {"gpt_fsdp": sd, "step": 10, "optimizer": {"lr": 1e-4}}, "args": {"depth": 4}},
        lambda sd: {"state_dict": sd},
        lambda sd: {"model": sd, "epoch": 3},
        lambda sd: {f"module.{k}": v for k, v in sd.items()},
    ],
)
def test_training_wrappers_are_unwrapped(golden_sd, tmp_path, wrap):
    model = load_transformer(save(wrap(golden_sd), tmp_path / "ckpt.pth"), "tiny_p0", device="cpu")
    assert_matches(model, golden_sd)


def test_ignorable_entries_and_missing_zero_buffers_are_accepted(golden_sd, tmp_path):
    sd = {k: v for k, v in golden_sd.items() if not k.endswith("zero_k_bias")}
    sd["lvl_1L"] = torch.zeros(1, 1, 57, dtype=torch.float32)
    sd["attn_bias_for_masking"] = torch.zeros(1, 1, 128, 128)
    sd["Infinity_visible_kvlen"] = torch.zeros(3)
    sd["Infinity_invisible_qlen"] = torch.zeros(3)
    model = load_transformer(save(sd, tmp_path / "x.pth"), "tiny_p0", device="cpu")
    assert_matches(model, golden_sd)


def test_missing_tensor_is_named(golden_sd, tmp_path):
    sd = dict(golden_sd)
    del sd["block_chunks.1.module.0.ffn.fc1.bias"]
    with pytest.raises(CheckpointError, match=r"missing: block_chunks\.1\.module\.0\.ffn\.fc1\.bias"):
        load_transformer(save(sd, tmp_path / "x.pth"), "tiny_p0", device="cpu")


def test_unexpected_tensor_is_named(golden_sd, tmp_path):
    sd = dict(golden_sd, **{"block_chunks.0.module.0.sa.extra_scale": torch.ones(3)})
    with pytest.raises(CheckpointError, match=r"unexpected: block_chunks\.0\.module\.0\.sa\.extra_scale"):
        load_transformer(save(sd, tmp_path / "x.pth"), "tiny_p0", device="cpu")


def test_non_finite_tensor_is_named(golden_sd, tmp_path):
    sd = dict(golden_sd)
    sd["block_chunks.0.module.1.ffn.fc2.weight"] = sd["block_chunks.0.module.1.ffn.fc2.weight"].clone()
    sd["block_chunks.0.module.1.ffn.fc2.weight"][3, 4] = float("nan")
    with pytest.raises(CheckpointError, match=r"NaN or Inf values in: block_chunks\.0\.module\.1\.ffn\.fc2\.weight"):
        load_transformer(save(sd, tmp_path / "x.pth"), "tiny_p0", device="cpu")


def test_misshaped_tensor_is_named(golden_sd, tmp_path):
    sd = dict(golden_sd)
    sd["head.weight"] = torch.zeros(10, 64)
    with pytest.raises(CheckpointError, match=r"mis-shaped: head\.weight \(checkpoint \(10, 64\), model \(12, 64\)\)"):
        load_transformer(save(sd, tmp_path / "x.pth"), "tiny_p0", device="cpu")


def test_wrong_architecture_and_wrong_files_are_refused(golden_sd, tmp_path):
    path = save(golden_sd, tmp_path / "x.pth")
    with pytest.raises(CheckpointError, match="Infinity-tiny_p1") as err:
        load_transformer(path, "tiny_p1", device="cpu")  # p1 has patchify: word_embed / head shapes differ
    assert "word_embed.weight" in str(err.value)
    vae = torch.load(GOLDEN / "tiny_vae_state_dict.pt", weights_only=True)
    with pytest.raises(CheckpointError, match="missing: cfg_uncond"):
        load_transformer(save(vae, tmp_path / "vae.pth"), "tiny_p0", device="cpu")
    with pytest.raises(CheckpointError, match="not a transformer state dict"):
        load_transformer(save({"config": {"depth": 4}}, tmp_path / "cfg.pth"), "tiny_p0", device="cpu")
    with pytest.raises(CheckpointError, match="expected a dict"):
        load_transformer(save([torch.zeros(2)], tmp_path / "list.pth"), "tiny_p0", device="cpu")
    (tmp_path / "text.pth").write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="text.pth"):
        load_transformer(tmp_path / "text.pth", "tiny_p0", device="cpu")
    with pytest.raises(CheckpointError, match="no such file"):
        load_transformer(tmp_path / "absent.pth", "tiny_p0", device="cpu")


def test_cfg_uncond_rows_are_adapted(golden_sd, tmp_path):
    short = dict(golden_sd, cfg_uncond=golden_sd["cfg_uncond"][:10].clone())
    model = load_transformer(save(short, tmp_path / "short.pth"), "tiny_p0", device="cpu")
    assert torch.equal(model.cfg_uncond[:10], golden_sd["cfg_uncond"][:10])
    assert torch.equal(model.cfg_uncond[10:], fresh_cfg_uncond(16, 256)[10:])
    fresh = fresh_cfg_uncond(512, 2048)
    assert fresh.abs().max() <= 2 / 2048**0.5 and 0.85 < fresh.std() * 2048**0.5 < 1.05
    long = dict(golden_sd, cfg_uncond=torch.cat((golden_sd["cfg_uncond"], torch.ones(4, 256))))
    model = load_transformer(save(long, tmp_path / "long.pth"), "tiny_p0", device="cpu")
    assert torch.equal(model.cfg_uncond, golden_sd["cfg_uncond"])


def shard(sd: dict, folder: Path, fmt: str, num_shards: int = 3) -> Path:
    folder.mkdir()
    names = list(sd)
    weight_map = {}
    for i in range(num_shards):
        part = {n: sd[n].clone().contiguous() for n in names[i::num_shards]}
        if fmt == "safetensors":
            from safetensors.torch import save_file

            file = f"model-{i + 1:05d}-of-{num_shards:05d}.safetensors"
            save_file(part, str(folder / file))
        else:
            file = f"pytorch_model-{i + 1:05d}-of-{num_shards:05d}.bin"
            torch.save(part, folder / file)
        weight_map.update(dict.fromkeys(part, file))
    index = "model.safetensors.index.json" if fmt == "safetensors" else "pytorch_model.bin.index.json"
    (folder / index).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


@pytest.mark.parametrize("fmt", ["bin", "safetensors"])
def test_sharded_folder_loads_shard_by_shard(golden_sd, tmp_path, fmt):
    folder = shard(golden_sd, tmp_path / "weights", fmt)
    model = load_transformer(folder, "tiny_p0", device="cpu")
    assert_matches(model, golden_sd)
    index = next(folder.glob("*.index.json"))
    assert_matches(load_transformer(index, "tiny_p0", device="cpu"), golden_sd)
    next(folder.glob("*00002-of-*")).unlink()
    with pytest.raises(CheckpointError, match="shard files missing"):
        load_transformer(folder, "tiny_p0", device="cpu")


def test_sharded_folder_with_a_missing_tensor(golden_sd, tmp_path):
    sd = {k: v for k, v in golden_sd.items() if k != "lvl_embed.weight"}
    folder = shard(sd, tmp_path / "weights", "bin")
    with pytest.raises(CheckpointError, match=r"missing: lvl_embed\.weight"):
        load_transformer(folder, "tiny_p0", device="cpu")


def test_block_dtype_policy(golden_sd, tmp_path):
    model = load_transformer(save(golden_sd, tmp_path / "x.pth"), "tiny_p0", device="cpu", dtype="bfloat16")
    for name, tensor in model.state_dict().items():
        expected = torch.bfloat16 if name.startswith("block_chunks.") else torch.float32
        assert tensor.dtype == expected, name
    assert resolve_dtype("auto", "cpu") == torch.float32 and resolve_dtype("auto", "cuda") == torch.bfloat16
    with pytest.raises(ValueError, match="unknown dtype"):
        resolve_dtype("int3", "cpu")


def test_random_init_is_seeded_and_materialised_once():
    a = random_transformer("tiny_p1", seed=4, device="cpu", dtype="bfloat16")
    b = random_transformer("tiny_p1", seed=4, device="cpu", dtype="bfloat16")
    c = random_transformer("tiny_p1", seed=5, device="cpu", dtype="bfloat16")
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["head.weight"], sc["head.weight"])
    assert not any(t.is_meta for t in sa.values())
    assert sa["block_chunks.0.module.0.ffn.fc1.weight"].dtype == torch.bfloat16
    assert sa["head.weight"].dtype == torch.float32
    assert torch.all(sa["block_chunks.1.module.1.sa.zero_k_bias"] == 0)


def test_legacy_non_zip_file_loads_without_mmap(golden_sd, tmp_path):
    path = tmp_path / "legacy.pth"
    torch.save(golden_sd, path, _use_new_zipfile_serialization=False)
    assert_matches(load_transformer(path, "tiny_p0", device="cpu"), golden_sd)
