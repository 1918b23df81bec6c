"""The YAML files shipped under configs/: they load, they mean what their names say, they stay consistent."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from deepcompressor.config import ConfigError, config_to_dict, load_config

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
TINY = CONFIGS / "models" / "infinity-tiny.yaml"
QDIFF = CONFIGS / "collect" / "qdiff.yaml"
INT4 = CONFIGS / "svdquant" / "int4.yaml"
FAST = CONFIGS / "svdquant" / "fast.yaml"
MODEL_ENV = ("INFINITY_2B_CKPT", "INFINITY_VAE_D32", "FLAN_T5_XL_DIR", "INFINITY_8B_DIR", "INFINITY_VAE_D56")


@pytest.fixture
def model_env(tmp_path, monkeypatch):
    for name in MODEL_ENV:
        monkeypatch.setenv(name, str(tmp_path / name.lower()))
    return tmp_path


def flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def chain_for(path: Path) -> list[Path]:
    """A complete chain around one shipped file (a model file needs a quantization method after it)."""
    if path.parent.name == "models":
        return [path, QDIFF, INT4]
    return [TINY, QDIFF, INT4, path]


SHIPPED = sorted(CONFIGS.rglob("*.yaml"))


def test_the_expected_files_are_shipped():
    names = {str(path.relative_to(CONFIGS)) for path in SHIPPED}
    for name in (
        "models/infinity-tiny.yaml",
        "models/infinity-2b.yaml",
        "models/infinity-8b.yaml",
        "models/infinity-2b-naive.yaml",
        "models/infinity-2b-smoothquant.yaml",
        "models/infinity-2b-w16.yaml",
        "collect/qdiff.yaml",
        "svdquant/__default__.yaml",
        "svdquant/int4.yaml",
        "svdquant/int8.yaml",
        "svdquant/gptq.yaml",
        "svdquant/fast.yaml",
        "ablations/naive.yaml",
        "ablations/smoothquant.yaml",
        "ablations/svdquant.yaml",
        "ablations/w16.yaml",
        "edge/memory.yaml",
    ):
        assert name in names


@pytest.mark.parametrize("path", SHIPPED, ids=[str(p.relative_to(CONFIGS)) for p in SHIPPED])
def test_every_shipped_yaml_loads(path, model_env):
    load_config(chain_for(path))


def test_tiny_svdquant_chain():
    cfg = load_config([TINY, QDIFF, INT4])
    assert (cfg.pipeline.arch, cfg.pipeline.random_init, cfg.pipeline.seed) == ("tiny", True, 0)
    assert (cfg.quant.wgts.dtype, cfg.quant.wgts.group_size) == ("sint4", 64)
    assert (cfg.quant.ipts.dtype, cfg.quant.ipts.group_size, cfg.quant.ipts.static) == ("sint4", 64, False)
    assert cfg.quant.smooth.enabled and cfg.quant.calib_range.enabled and not cfg.quant.gptq.enabled
    assert (cfg.quant.low_rank.enabled, cfg.quant.low_rank.rank) == (True, 32)
    assert (cfg.collect.prompts, cfg.collect.num_prompts, cfg.collect.num_scales) == ("qdiff", 12, 0)


def test_qdiff_prompt_set_has_the_calibration_prompts():
    prompts = yaml.safe_load((REPO / "deepcompressor" / "data" / "prompts" / "qdiff.yaml").read_text())
    assert len(prompts) >= load_config([QDIFF]).collect.num_prompts


def test_fast_changes_exactly_the_keys_it_sets():
    before = flat(config_to_dict(load_config([TINY, QDIFF, INT4])))
    after = flat(config_to_dict(load_config([TINY, QDIFF, INT4, FAST])))
    changed = {key for key in before if before[key] != after[key]}
    assert changed == set(flat(yaml.safe_load(FAST.read_text())))
    assert all(after[key] < before[key] or before[key] == 0 for key in changed)


def test_real_models_take_paths_from_the_environment(model_env):
    cfg2 = load_config([CONFIGS / "models" / "infinity-2b.yaml", QDIFF, INT4])
    assert (cfg2.pipeline.arch, cfg2.pipeline.tau, cfg2.pipeline.cfg) == ("2b", 0.5, 3.0)
    assert cfg2.pipeline.transformer_path == str(model_env / "infinity_2b_ckpt")
    assert cfg2.pipeline.vae_path == str(model_env / "infinity_vae_d32")
    assert cfg2.pipeline.text_encoder_path == str(model_env / "flan_t5_xl_dir")
    cfg8 = load_config([CONFIGS / "models" / "infinity-8b.yaml", QDIFF, INT4])
    assert (cfg8.pipeline.arch, cfg8.pipeline.tau, cfg8.pipeline.cfg) == ("8b", 1.0, 3.0)
    assert cfg8.pipeline.transformer_path == str(model_env / "infinity_8b_dir")
    assert cfg8.pipeline.vae_path == str(model_env / "infinity_vae_d56")


def test_real_model_without_its_variable_names_it(model_env, monkeypatch):
    monkeypatch.delenv("INFINITY_VAE_D32")
    with pytest.raises(ConfigError) as excinfo:
        load_config([CONFIGS / "models" / "infinity-2b.yaml"])
    (issue,) = excinfo.value.issues
    assert issue.key == "pipeline.vae_path" and "INFINITY_VAE_D32" in issue.message
    assert issue.source.endswith("infinity-2b.yaml")


# What an ablation decides; grid sizes and budgets stay with the chain (svdquant/fast.yaml, flags).
METHOD_KEYS = (
    "wgts.dtype",
    "wgts.group_size",
    "ipts.dtype",
    "ipts.group_size",
    "ipts.static",
    "smooth.enabled",
    "low_rank.enabled",
    "low_rank.rank",
    "calib_range.enabled",
    "gptq.enabled",
)


def method_of(files) -> dict:
    quant = flat(config_to_dict(load_config(files))["quant"])
    return {key: quant[key] for key in METHOD_KEYS}


@pytest.mark.parametrize("ablation", ["naive", "smoothquant", "svdquant", "w16"])
def test_ablation_stacked_last_is_independent_of_the_method_before_it(ablation):
    tail = CONFIGS / "ablations" / f"{ablation}.yaml"
    on_svdquant = method_of([TINY, QDIFF, INT4, tail])
    on_int8_gptq = method_of(
        [TINY, QDIFF, CONFIGS / "svdquant" / "int8.yaml", CONFIGS / "svdquant" / "gptq.yaml", tail]
    )
    on_nothing = method_of([TINY, QDIFF, tail])
    assert on_svdquant == on_int8_gptq == on_nothing


def test_ablations_mean_what_they_say():
    svdquant = method_of([TINY, QDIFF, CONFIGS / "ablations" / "svdquant.yaml"])
    assert svdquant == method_of([TINY, QDIFF, INT4])  # the same method as the svdquant/ chain
    naive = method_of([TINY, QDIFF, INT4, CONFIGS / "ablations" / "naive.yaml"])
    assert naive == {
        **svdquant,
        "smooth.enabled": False,
        "low_rank.enabled": False,
        "calib_range.enabled": False,
    }
    assert (naive["wgts.dtype"], naive["wgts.group_size"], naive["ipts.dtype"], naive["ipts.group_size"]) == (
        "sint4",
        64,
        "sint4",
        64,
    )
    assert method_of([TINY, QDIFF, CONFIGS / "ablations" / "smoothquant.yaml"]) == {
        **svdquant,
        "low_rank.enabled": False,
    }
    assert method_of([TINY, QDIFF, CONFIGS / "ablations" / "w16.yaml"]) == {**svdquant, "ipts.dtype": None}


def test_ablation_keeps_the_fast_grids():
    cfg = load_config([TINY, QDIFF, INT4, FAST, CONFIGS / "ablations" / "smoothquant.yaml"])
    assert cfg.quant.smooth.num_grids == 10 and cfg.quant.num_samples == 64


@pytest.mark.parametrize("variant", ["naive", "smoothquant", "w16"])
def test_2b_variants_equal_the_2b_model_plus_the_ablation(variant, model_env):
    as_variant = load_config([CONFIGS / "models" / f"infinity-2b-{variant}.yaml", QDIFF])
    as_stack = load_config([CONFIGS / "models" / "infinity-2b.yaml", QDIFF, CONFIGS / "ablations" / f"{variant}.yaml"])
    assert as_variant == as_stack
