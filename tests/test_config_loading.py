"""Config files: merge order, __default__.yaml, __base__ includes, env expansion, every error path."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from deepcompressor.config import (
    ConfigError,
    RunConfig,
    config_to_dict,
    derive_run_dirname,
    load_config,
    run_dir,
    save_config,
)
from deepcompressor.config.files import default_files


def write(path: Path, data: dict | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data), encoding="utf-8")
    return path


def issues_of(excinfo: pytest.ExceptionInfo) -> list[tuple[str | None, str | None, str]]:
    return [(issue.source, issue.key, issue.message) for issue in excinfo.value.issues]


def only_issue(excinfo: pytest.ExceptionInfo):
    assert len(excinfo.value.issues) == 1, excinfo.value
    return excinfo.value.issues[0]


# ---------------------------------------------------------------- merge order


def test_later_file_wins_and_sections_merge_deeply(tmp_path):
    a = write(tmp_path / "a.yaml", {"quant": {"wgts": {"dtype": "sint4", "group_size": 64}}, "pipeline": {"seed": 3}})
    b = write(tmp_path / "b.yaml", {"quant": {"wgts": {"group_size": 128}, "ipts": {"dtype": "uint8"}}})
    cfg = load_config([a, b])
    assert cfg.quant.wgts.dtype == "sint4"  # kept from a: b only touched group_size
    assert cfg.quant.wgts.group_size == 128
    assert cfg.quant.ipts.dtype == "uint8"
    assert cfg.pipeline.seed == 3
    assert load_config([b, a]).quant.wgts.group_size == 64


def test_lists_are_replaced_not_appended(tmp_path):
    a = write(tmp_path / "a.yaml", {"quant": {"wgts": {"skips": ["embed", "head"]}}})
    b = write(tmp_path / "b.yaml", {"quant": {"wgts": {"skips": ["adaln"]}}})
    assert load_config([a, b]).quant.wgts.skips == ["adaln"]
    assert load_config([b, a]).quant.wgts.skips == ["embed", "head"]


def test_no_files_gives_schema_defaults():
    assert load_config([]) == RunConfig()


def test_int_is_accepted_for_float_fields(tmp_path):
    cfg = load_config([write(tmp_path / "a.yaml", {"pipeline": {"cfg": 4}})])
    assert cfg.pipeline.cfg == 4.0 and isinstance(cfg.pipeline.cfg, float)


def test_empty_file_and_empty_section_are_allowed(tmp_path):
    empty = write(tmp_path / "empty.yaml", "# nothing yet\n")
    commented = write(tmp_path / "commented.yaml", "quant:\n  # wgts: {dtype: sint4}\n")
    assert load_config([empty, commented]) == RunConfig()


# ---------------------------------------------------------------- __default__.yaml


@pytest.fixture
def default_tree(tmp_path):
    root = tmp_path / "configs"
    write(root / "__default__.yaml", {"pipeline": {"seed": 1}, "collect": {"num_prompts": 5}})
    write(root / "svd" / "__default__.yaml", {"pipeline": {"seed": 2}, "quant": {"wgts": {"dtype": "sint8"}}})
    write(root / "svd" / "x.yaml", {"quant": {"wgts": {"dtype": "sint4"}}})
    write(root / "svd" / "y.yaml", {"quant": {"wgts": {"group_size": 32}}})
    write(root / "models" / "m.yaml", {"pipeline": {"seed": 7}})
    return root


def test_defaults_apply_outermost_first_then_the_file(default_tree):
    cfg = load_config([default_tree / "svd" / "y.yaml"])
    assert cfg.pipeline.seed == 2  # svd/__default__ beats configs/__default__
    assert cfg.collect.num_prompts == 5
    assert cfg.quant.wgts.dtype == "sint8"
    assert cfg.quant.wgts.group_size == 32


def test_explicit_files_beat_defaults_that_appear_later(default_tree):
    # svd/__default__.yaml is discovered through the second file but still applies before models/m.yaml.
    cfg = load_config([default_tree / "models" / "m.yaml", default_tree / "svd" / "x.yaml"])
    assert cfg.pipeline.seed == 7
    assert cfg.quant.wgts.dtype == "sint4"


def test_default_files_order_and_root(default_tree, tmp_path):
    assert default_files(default_tree / "svd" / "x.yaml") == [
        (default_tree / "__default__.yaml").resolve(),
        (default_tree / "svd" / "__default__.yaml").resolve(),
    ]
    # Outside a folder named "configs" only the file's own folder counts: tmp_path's default is not used.
    write(tmp_path / "__default__.yaml", {"pipeline": {"seed": 99}})
    write(tmp_path / "other" / "__default__.yaml", {"pipeline": {"seed": 11}})
    lone = write(tmp_path / "other" / "z.yaml", {"collect": {"seed": 4}})
    assert default_files(lone) == [(tmp_path / "other" / "__default__.yaml").resolve()]
    assert load_config([lone]).pipeline.seed == 11


# ---------------------------------------------------------------- __base__ includes


def test_base_includes_apply_before_the_file(tmp_path):
    write(tmp_path / "shared" / "fmt.yaml", {"quant": {"wgts": {"dtype": "sint4", "group_size": 64}}})
    write(tmp_path / "seed.yaml", {"pipeline": {"seed": 5}, "quant": {"wgts": {"group_size": 16}}})
    top = write(
        tmp_path / "top.yaml", {"__base__": ["shared/fmt.yaml", "seed.yaml"], "quant": {"wgts": {"group_size": 32}}}
    )
    cfg = load_config([top])
    assert (cfg.quant.wgts.dtype, cfg.quant.wgts.group_size, cfg.pipeline.seed) == ("sint4", 32, 5)
    single = write(tmp_path / "single.yaml", {"__base__": "seed.yaml"})
    assert load_config([single]).quant.wgts.group_size == 16


def test_base_errors_name_the_including_file(tmp_path):
    missing = write(tmp_path / "missing.yaml", {"__base__": "nope.yaml"})
    with pytest.raises(ConfigError) as excinfo:
        load_config([missing])
    issue = only_issue(excinfo)
    assert (issue.key, "nope.yaml" in issue.message) == ("__base__", True)
    assert issue.source.endswith("missing.yaml")

    write(tmp_path / "a.yaml", {"__base__": "b.yaml"})
    write(tmp_path / "b.yaml", {"__base__": "a.yaml"})
    with pytest.raises(ConfigError, match="include cycle"):
        load_config([tmp_path / "a.yaml"])

    bad = write(tmp_path / "bad.yaml", {"__base__": {"a": 1}})
    with pytest.raises(ConfigError, match="list of paths"):
        load_config([bad])


def test_problem_in_an_included_file_names_that_file(tmp_path):
    write(tmp_path / "base.yaml", {"quant": {"wgts": {"dtype": "int4"}}})
    top = write(tmp_path / "top.yaml", {"__base__": "base.yaml"})
    with pytest.raises(ConfigError) as excinfo:
        load_config([top])
    issue = only_issue(excinfo)
    assert issue.source.endswith("base.yaml") and issue.key == "quant.wgts.dtype"


# ---------------------------------------------------------------- paths


def test_env_vars_and_home_expand_in_path_keys(tmp_path, monkeypatch):
    monkeypatch.setenv("VC_TEST_CKPT_DIR", str(tmp_path / "ckpt"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    pipeline = {
        "arch": "2b",
        "transformer_path": "${VC_TEST_CKPT_DIR}/t.pth",
        "vae_path": "~/vae.pth",
        "text_encoder_path": "$VC_TEST_CKPT_DIR/t5",
    }
    cfg_file = write(tmp_path / "m.yaml", {"pipeline": pipeline, "output": {"root": "~/runs"}})
    cfg = load_config([cfg_file])
    assert cfg.pipeline.transformer_path == f"{tmp_path}/ckpt/t.pth"
    assert cfg.pipeline.vae_path == f"{tmp_path}/home/vae.pth"
    assert cfg.pipeline.text_encoder_path == f"{tmp_path}/ckpt/t5"
    assert cfg.output.root == f"{tmp_path}/home/runs"


def test_unset_env_var_names_key_and_variable(tmp_path, monkeypatch):
    monkeypatch.delenv("VC_TEST_SURELY_UNSET", raising=False)
    cfg_file = write(tmp_path / "m.yaml", {"collect": {"cache_dir": "${VC_TEST_SURELY_UNSET}/cache"}})
    with pytest.raises(ConfigError) as excinfo:
        load_config([cfg_file])
    issue = only_issue(excinfo)
    assert issue.key == "collect.cache_dir" and issue.source.endswith("m.yaml")
    assert "VC_TEST_SURELY_UNSET" in issue.message


def test_env_var_is_not_needed_once_a_later_layer_replaces_the_path(tmp_path, monkeypatch):
    monkeypatch.delenv("VC_TEST_SURELY_UNSET", raising=False)
    cfg_file = write(tmp_path / "m.yaml", {"collect": {"cache_dir": "${VC_TEST_SURELY_UNSET}/cache"}})
    assert load_config([cfg_file], {"collect.cache_dir": "here"}).collect.cache_dir == "here"


def test_run_dir_derivation():
    files = ["configs/models/infinity-2b-naive.yaml", "configs/collect/qdiff.yaml", "configs/svdquant/int4.yaml"]
    assert derive_run_dirname("infinity-2b", files) == "infinity-2b.naive.qdiff.int4"
    assert derive_run_dirname("infinity-tiny", ["configs/models/infinity-tiny.yaml"]) == "infinity-tiny"
    cfg = RunConfig()
    assert run_dir(cfg, files) == Path("runs") / "infinity-tiny.infinity-2b-naive.qdiff.int4"
    cfg.output.dirname = "mine"
    assert run_dir(cfg, files) == Path("runs/mine")


# ---------------------------------------------------------------- saving


def test_save_config_round_trips_atomically(tmp_path):
    cfg = load_config([], {"quant.wgts.dtype": "sint4", "quant.wgts.skips": [], "pipeline.top_p": 0.5})
    target = save_config(cfg, tmp_path / "deep" / "run" / "config.yaml")
    assert load_config([target]) == cfg
    assert sorted(os.listdir(target.parent)) == ["config.yaml"]  # no temporary file left behind
    assert yaml.safe_load(target.read_text()) == config_to_dict(cfg)


def test_overrides_accept_dotted_and_nested_keys():
    cfg = load_config([], {"quant.wgts.dtype": "sint4", "quant": {"ipts": {"dtype": "sint8"}}})
    assert (cfg.quant.wgts.dtype, cfg.quant.ipts.dtype) == ("sint4", "sint8")
    with pytest.raises(ConfigError, match=r"quant\.wgts\.dtpye"):
        load_config([], {"quant.wgts.dtpye": "sint4"})


# ---------------------------------------------------------------- error paths


def load_error(tmp_path, data: dict | str, name: str = "bad.yaml") -> pytest.ExceptionInfo:
    path = write(tmp_path / name, data)
    with pytest.raises(ConfigError) as excinfo:
        load_config([path])
    return excinfo


def test_unknown_key_suggests_the_close_match(tmp_path):
    excinfo = load_error(tmp_path, "quant: {wgts: {dtpye: sint4}}\n")
    issue = only_issue(excinfo)
    assert issue.key == "quant.wgts.dtpye" and issue.source.endswith("bad.yaml")
    assert "did you mean 'quant.wgts.dtype'" in issue.message


@pytest.mark.parametrize(
    ("data", "key", "fragment"),
    [
        ({"pipeline": {"seed": "3"}}, "pipeline.seed", "expected an integer"),
        ({"quant": {"wgts": {"group_size": 64.0}}}, "quant.wgts.group_size", "expected an integer"),
        ({"pipeline": {"random_init": 1}}, "pipeline.random_init", "boolean"),
        ({"pipeline": {"random_init": "true"}}, "pipeline.random_init", "boolean"),
        ({"pipeline": {"seed": True}}, "pipeline.seed", "expected an integer"),
        ({"pipeline": {"tau": "hot"}}, "pipeline.tau", "number"),
        ({"pipeline": {"name": 12}}, "pipeline.name", "expected a string"),
        ({"pipeline": {"name": None}}, "pipeline.name", "must not be null"),
        ({"quant": {"wgts": {"skips": "embed"}}}, "quant.wgts.skips", "list of strings"),
        ({"quant": {"wgts": {"skips": ["embed", 3]}}}, "quant.wgts.skips", "element 1"),
        ({"quant": {"wgts": {"skips": ["embed", "hed"]}}}, "quant.wgts.skips", "did you mean 'head'"),
        ({"quant": {"wgts": {"dtype": "int4"}}}, "quant.wgts.dtype", "expected one of sint4, uint4, sint8, uint8"),
        ({"quant": {"ipts": {"dtype": "sint3"}}}, "quant.ipts.dtype", "invalid value 'sint3'"),
        ({"pipeline": {"arch": "3b"}}, "pipeline.arch", "expected one of 2b, 8b, tiny"),
        ({"kv": {"dtype": "sint8"}}, "kv.dtype", "expected one of uint8, uint4"),
        ({"quant": {"wgts": 4}}, "quant.wgts", "is a section"),
        ({"pipeline": {"seed": {"a": 1}}}, "pipeline.seed", "mapping"),
    ],
)
def test_wrong_types_and_choices_name_file_and_key(tmp_path, data, key, fragment):
    excinfo = load_error(tmp_path, data)
    issue = only_issue(excinfo)
    assert issue.key == key and issue.source.endswith("bad.yaml")
    assert fragment in issue.message


@pytest.mark.parametrize(
    ("overrides", "key", "fragment"),
    [
        ({"pipeline.arch": "2b"}, "pipeline.transformer_path", "required"),
        ({"quant.wgts.group_size": -2}, "quant.wgts.group_size", "-1"),
        ({"quant.ipts.group_size": -5}, "quant.ipts.group_size", "positive"),
        (
            {"quant.wgts.dtype": "sint4", "quant.low_rank.enabled": True, "quant.low_rank.rank": 0},
            "quant.low_rank.rank",
            "> 0",
        ),
        ({"quant.low_rank.enabled": True}, "quant.low_rank.enabled", "quant.wgts.dtype is null"),
        ({"quant.gptq.enabled": True}, "quant.gptq.enabled", "quant.wgts.dtype is null"),
        ({"quant.calib_range.max_shrink": 1.0}, "quant.calib_range.max_shrink", "[0, 1)"),
        ({"pipeline.top_p": 1.5}, "pipeline.top_p", "[0, 1]"),
        ({"pipeline.device": "gpu"}, "pipeline.device", "cuda"),
        ({"eval.prompt_offset": 4}, "eval.prompt_offset", "overlap"),
        ({"kv.enabled": True, "kv.calib_path": ""}, "kv.calib_path", "required"),
        ({"output.dirname": "../elsewhere"}, "output.dirname", "relative"),
    ],
)
def test_schema_rules_name_the_dotted_key(overrides, key, fragment):
    with pytest.raises(ConfigError) as excinfo:
        load_config([], overrides)
    matching = [issue for issue in excinfo.value.issues if issue.key == key]
    assert matching and fragment in matching[0].message, excinfo.value


def test_required_paths_for_real_checkpoints(tmp_path):
    excinfo = load_error(tmp_path, {"pipeline": {"arch": "8b", "transformer_path": "/x"}})
    keys = sorted(key for _, key, _ in issues_of(excinfo))
    assert keys == ["pipeline.text_encoder_path", "pipeline.vae_path"]
    # random_init needs no files; the tiny preset never does.
    assert load_config([], {"pipeline.arch": "8b", "pipeline.random_init": True}).pipeline.arch == "8b"


def test_invalid_value_is_reported_even_if_a_later_file_overrides_it(tmp_path):
    bad = write(tmp_path / "bad.yaml", {"quant": {"wgts": {"dtype": "int4"}}})
    good = write(tmp_path / "good.yaml", {"quant": {"wgts": {"dtype": "sint4"}}})
    with pytest.raises(ConfigError) as excinfo:
        load_config([bad, good])
    assert only_issue(excinfo).source.endswith("bad.yaml")


def test_all_problems_are_reported_together(tmp_path):
    excinfo = load_error(tmp_path, {"pipeline": {"arch": "3b", "sed": 1}, "quant": {"wgts": {"dtpye": "x"}}})
    assert sorted(key for _, key, _ in issues_of(excinfo)) == ["pipeline.sed", "quant.wgts.dtpye"]


@pytest.mark.parametrize(
    ("text", "name", "fragment"),
    [
        ("quant: [\n", "bad.yaml", "invalid YAML"),
        ("quant:\n  wgts: {dtype: sint4\n", "bad.yaml", "line"),
        ("pipeline: {seed: 1}\npipeline: {seed: 2}\n", "bad.yaml", "duplicate key 'pipeline'"),
        ("- a\n- b\n", "bad.yaml", "top level must be a mapping"),
        ("pipeline: {seed: 1}\n", "bad.toml", "not a YAML config file"),
        ("quant.wgts.dtype: sint4\n", "bad.yaml", "nest the sections"),
    ],
)
def test_file_format_errors_name_the_file(tmp_path, text, name, fragment):
    excinfo = load_error(tmp_path, text, name)
    issue = only_issue(excinfo)
    assert issue.source.endswith(name) and fragment in issue.message


def test_missing_file_is_an_error_naming_it(tmp_path):
    (tmp_path / "folder.yaml").mkdir()
    with pytest.raises(ConfigError) as excinfo:
        load_config([tmp_path / "absent.yaml", tmp_path / "folder.yaml"])
    (first, second) = excinfo.value.issues
    assert first.source.endswith("absent.yaml") and "not found" in first.message
    assert "folder" in second.message
