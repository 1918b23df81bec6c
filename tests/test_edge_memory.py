"""The pipeline's memory options for small devices: the text encoder freed between generations (features of seen
prompt lists cached), non-block linears in bfloat16 within 1% of float32 fidelity, and one flag
(``--pipeline-random-init``) that makes a 2B/8B chain runnable without files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from deepcompressor.app.diffusion.capture import parse_prompt_yaml
from deepcompressor.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]
PN = "0.06M"


@pytest.fixture(scope="module")
def reference_pipe():
    from infinity.pipeline import load_pipeline

    return load_pipeline("tiny", device="cpu")


def _held_out_prompts(count: int) -> list[str]:
    path = ROOT / "deepcompressor/data/prompts/qdiff.yaml"
    prompts = [text for _, text in parse_prompt_yaml(path.read_text(), str(path))]
    return prompts[512 : 512 + count]  # the evaluation split, after the calibration prompts


def test_released_text_encoder_gives_the_same_images_and_reloads_only_for_new_prompts(reference_pipe):
    from infinity.pipeline import load_pipeline
    from infinity.text_cache import ReleasingTextEncoder

    pipe = load_pipeline("tiny", device="cpu", release_text_encoder=True, text_cache_size=1)
    encoder = pipe.text_encoder
    assert isinstance(encoder, ReleasingTextEncoder) and encoder.loads == 1  # built once to learn its width
    assert encoder.out_dim == reference_pipe.text_encoder.out_dim
    assert encoder.max_length == reference_pipe.text_encoder.max_length
    first, second = _held_out_prompts(2)
    got = pipe.generate([first], seed=3, pn=PN)
    assert encoder.loads == 2 and encoder.resident_bytes > 0
    ref = reference_pipe.generate([first], seed=3, pn=PN)
    assert torch.equal(got.images, ref.images)
    pipe.generate([first], seed=4, pn=PN)
    assert encoder.loads == 2  # same prompt list: features from the cache
    pipe.generate([second], seed=0, pn=PN)
    assert encoder.loads == 3
    pipe.generate([first], seed=0, pn=PN)
    assert encoder.loads == 4  # evicted by the second prompt (cache of one list)


def test_released_text_encoder_can_be_fingerprinted_for_the_model_identity():
    from infinity.pipeline import load_pipeline

    from deepcompressor.app.diffusion.capture import model_identity

    cfg = load_config([str(ROOT / "configs/models/infinity-tiny.yaml")], {"pipeline.device": "cpu"})
    kept = load_pipeline("tiny", device="cpu")
    released = load_pipeline("tiny", device="cpu", release_text_encoder=True)
    assert (model_identity(cfg.pipeline, released.transformer, released.text_encoder)
            == model_identity(cfg.pipeline, kept.transformer, kept.text_encoder))


def test_text_cache_size_is_checked():
    with pytest.raises(ConfigError, match="text_cache_size"):
        load_config([], {"pipeline.text_cache_size": -1})


def test_bfloat16_non_block_linears_stay_within_one_percent_of_float32(reference_pipe):
    from infinity.pipeline import load_pipeline
    from infinity.precision import nonblock_linears

    pipe = load_pipeline("tiny", device="cpu", nonblock_dtype="bfloat16")
    linears = nonblock_linears(pipe.transformer)
    assert {"head", "shared_ada_lin.1", "text_proj_for_ca.0", "head_nm.ada_lin.1"} <= set(linears)
    assert all(m.weight.dtype == torch.bfloat16 for m in linears.values())
    assert all(b.sa.mat_qkv.weight.dtype == torch.float32 for b in pipe.transformer.blocks())
    equal = total = 0
    for i, prompt in enumerate(_held_out_prompts(4)):
        a = reference_pipe.generate([prompt], seed=i, pn=PN, return_logits=True)
        b = pipe.generate([prompt], seed=i, pn=PN, return_logits=True)
        assert b.sample.logits[0].dtype == torch.float32
        first = a.sample.logits[0]
        assert ((b.sample.logits[0] - first).norm() / first.norm()).item() < 0.01
        equal += sum(int((x == y).sum()) for x, y in zip(a.sample.bits, b.sample.bits))
        total += sum(x.numel() for x in a.sample.bits)
    agreement = equal / total
    assert 0.99 <= agreement < 1.0  # rounded (not identical), but 99% of the sampled bits as in float32


def test_casting_non_block_linears_is_idempotent_and_reversible():
    from infinity.precision import cast_nonblock_linears
    from infinity.tiny import build_tiny_transformer

    model = build_tiny_transformer(0, "cpu", torch.float32)
    cast_nonblock_linears(model, "bfloat16")
    names = cast_nonblock_linears(model, torch.bfloat16)
    head = model.get_submodule("head")
    assert len(head._forward_pre_hooks) == 1 and len(head._forward_hooks) == 1
    cast_nonblock_linears(model, "float32")
    assert head.weight.dtype == torch.float32 and not head._forward_pre_hooks and not head._forward_hooks
    assert "head" in names
    with pytest.raises(ValueError, match="non-block dtype"):
        cast_nonblock_linears(model, "int8")


@pytest.mark.parametrize("model_yaml", ["infinity-2b.yaml", "infinity-8b.yaml"])
def test_random_init_alone_makes_a_model_chain_loadable(model_yaml, monkeypatch):
    for name in ("INFINITY_2B_CKPT", "INFINITY_8B_DIR", "INFINITY_VAE_D32", "INFINITY_VAE_D56", "FLAN_T5_XL_DIR"):
        monkeypatch.delenv(name, raising=False)
    files = [str(ROOT / "configs/models" / model_yaml), str(ROOT / "configs/svdquant/int4.yaml")]
    cfg = load_config(files, {"pipeline.random_init": True})
    p = cfg.pipeline
    assert (p.transformer_path, p.vae_path, p.text_encoder_path) == (None, None, None)
    with pytest.raises(ConfigError, match="--pipeline-random-init"):
        load_config(files)
    # A set variable is still used (a real text encoder with random blocks stays possible).
    monkeypatch.setenv("FLAN_T5_XL_DIR", "/models/flan-t5-xl")
    assert load_config(files, {"pipeline.random_init": True}).pipeline.text_encoder_path == "/models/flan-t5-xl"


def test_random_init_flag_works_in_the_apps(tmp_path, monkeypatch, capsys):
    from deepcompressor.config import parse_cli

    for name in ("INFINITY_8B_DIR", "INFINITY_VAE_D56", "FLAN_T5_XL_DIR"):
        monkeypatch.delenv(name, raising=False)
    argv = [str(ROOT / "configs/models/infinity-8b.yaml"), "--pipeline-random-init", "--dump-config"]
    with pytest.raises(SystemExit) as exit_info:
        parse_cli("ptq_infinity", argv)
    assert exit_info.value.code == 0
    assert "random_init: true" in capsys.readouterr().out


def test_edge_recipe_sets_exactly_the_memory_options():
    import yaml

    recipe = ROOT / "configs/edge/memory.yaml"
    base = load_config([str(ROOT / "configs/models/infinity-tiny.yaml")])
    cfg = load_config([str(ROOT / "configs/models/infinity-tiny.yaml"), str(recipe)])
    keys = yaml.safe_load(recipe.read_text())["pipeline"]
    assert keys and all(getattr(cfg.pipeline, k) == v for k, v in keys.items())
    changed = {k for k in keys if getattr(base.pipeline, k) != getattr(cfg.pipeline, k)}
    assert changed == {"release_text_encoder", "vae_tiled", "nonblock_dtype"}  # the other two are the defaults


def test_pipeline_decodes_in_bands_when_asked(reference_pipe):
    from infinity.pipeline import load_pipeline

    pipe = load_pipeline("tiny", device="cpu", vae_tile_rows=4)
    calls = []
    original = pipe.vae.decode
    pipe.vae.decode = lambda codes, **kw: calls.append(kw) or original(codes, **kw)
    got = pipe.generate(["a red fox"], seed=0, pn=PN)
    ref = reference_pipe.generate(["a red fox"], seed=0, pn=PN)
    assert calls == [{"tiled": True, "tile_rows": 4}]
    assert (got.images.int() - ref.images.int()).abs().max() <= 1  # float32: within one uint8 level
