"""Command line: per-key flags, --set, precedence over files, --dump-config, exit codes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from deepcompressor.config import flag_of, load_config, parse_cli
from deepcompressor.config.spec import leaf_specs

REPO = Path(__file__).resolve().parents[1]
ENTRY = [sys.executable, "-m", "deepcompressor.app.diffusion.ptq_infinity"]
TINY_CHAIN = ["configs/models/infinity-tiny.yaml", "configs/collect/qdiff.yaml", "configs/svdquant/int4.yaml"]


def write(path: Path, data: dict) -> str:
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return str(path)


def parse(argv, **kwargs):
    return parse_cli("test-app", argv, **kwargs)


def exit_of(argv, capsys, **kwargs) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as excinfo:
        parse(argv, **kwargs)
    captured = capsys.readouterr()
    return excinfo.value.code, captured.out, captured.err


@pytest.fixture
def base_file(tmp_path):
    return write(
        tmp_path / "base.yaml",
        {
            "pipeline": {"random_init": True, "seed": 5},
            "quant": {"wgts": {"dtype": "sint4", "skips": ["embed"]}, "ipts": {"dtype": "sint4"}},
        },
    )


def test_every_key_has_a_distinct_flag():
    flags = [flag_of(key) for key in leaf_specs()]
    assert len(set(flags)) == len(flags)
    assert flag_of("quant.low_rank.rank") == "--quant-low-rank-rank"


def test_flags_beat_files(base_file):
    cfg, _ = parse([base_file, "--quant-wgts-dtype", "uint8", "--pipeline-seed", "9", "--pipeline-cfg", "4.5"])
    assert (cfg.quant.wgts.dtype, cfg.pipeline.seed, cfg.pipeline.cfg) == ("uint8", 9, 4.5)
    assert cfg.quant.ipts.dtype == "sint4"  # untouched keys keep the file's value


def test_flags_may_come_before_or_between_files(base_file, tmp_path):
    other = write(tmp_path / "other.yaml", {"pipeline": {"seed": 6}})
    cfg, args = parse(["--quant-wgts-group-size", "32", base_file, "--pipeline-tau", "0.7", other])
    assert (cfg.quant.wgts.group_size, cfg.pipeline.tau, cfg.pipeline.seed) == (32, 0.7, 6)
    assert args.config_files == [base_file, other]


def test_boolean_flags(base_file):
    assert parse([base_file, "--no-pipeline-random-init"])[0].pipeline.random_init is False
    cfg, _ = parse([base_file, "--no-pipeline-random-init", "--pipeline-random-init", "--no-output-resume"])
    assert cfg.pipeline.random_init is True and cfg.output.resume is False


def test_list_flags_take_comma_separated_items(base_file):
    assert parse([base_file, "--quant-wgts-skips", "embed,head"])[0].quant.wgts.skips == ["embed", "head"]
    assert parse([base_file, "--quant-wgts-skips", ""])[0].quant.wgts.skips == []
    assert parse([base_file, "--quant-ipts-skips", " ca_kv , ca_q "])[0].quant.ipts.skips == ["ca_kv", "ca_q"]


def test_null_for_optional_values(base_file):
    assert parse([base_file, "--quant-ipts-dtype", "null"])[0].quant.ipts.dtype is None
    assert parse([base_file, "--set", "quant.wgts.dtype=null"])[0].quant.wgts.dtype is None


def test_set_takes_yaml_values_and_the_later_flag_wins(base_file):
    cfg, _ = parse(
        [base_file, "--set", "quant.wgts.skips=[head, adaln]", "--set", "quant.ipts={dtype: uint8, group_size: 16}"]
    )
    assert cfg.quant.wgts.skips == ["head", "adaln"]
    assert (cfg.quant.ipts.dtype, cfg.quant.ipts.group_size) == ("uint8", 16)
    assert parse([base_file, "--set", "pipeline.seed=1", "--pipeline-seed", "2"])[0].pipeline.seed == 2
    assert parse([base_file, "--pipeline-seed", "2", "--set", "pipeline.seed=1"])[0].pipeline.seed == 1


def test_app_arguments_are_returned_and_internals_removed(base_file):
    def add(parser):
        parser.add_argument("--prompt", default="a cat")
        parser.add_argument("--out")

    _, args = parse([base_file, "--out", "x.png"], add_arguments=add)
    assert (args.prompt, args.out, args.config_files) == ("a cat", "x.png", [base_file])
    assert set(vars(args)) == {"prompt", "out", "config_files"}


@pytest.mark.parametrize(
    ("argv", "fragments"),
    [
        (["--quant-wgts-dtpye", "sint4"], ["--quant-wgts-dtpye", "did you mean --quant-wgts-dtype"]),
        (["--pipeline-seed", "x"], ["--pipeline-seed", "pipeline.seed", "expected an integer"]),
        (["--pipeline-tau", "warm"], ["pipeline.tau", "expected a number"]),
        (["--quant-wgts-dtype", "int4"], ["--quant-wgts-dtype", "quant.wgts.dtype", "sint4"]),
        (["--quant-wgts-skips", "embed,hed"], ["quant.wgts.skips", "did you mean 'head'"]),
        (["--set", "quant.wgts.dtpye=sint4"], ["quant.wgts.dtpye", "did you mean 'quant.wgts.dtype'"]),
        (["--set", "quant.wgts.dtype"], ["KEY=VALUE"]),
        (["--set", "pipeline.seed=[1"], ["pipeline.seed", "invalid YAML"]),
        (["missing-file.yaml"], ["missing-file.yaml", "not found"]),
    ],
)
def test_errors_exit_2_with_a_message(argv, fragments, capsys):
    code, out, err = exit_of(argv, capsys)
    assert code == 2 and out == ""
    for fragment in fragments:
        assert fragment in err


def test_no_config_files_prints_usage_and_exits_2(capsys):
    code, out, err = exit_of([], capsys)
    assert code == 2 and out == ""
    assert err.startswith("usage: ") and "no config files given" in err and "Traceback" not in err
    code, out, _ = exit_of(["--dump-config"], capsys)  # the defaults can still be printed
    assert code == 0 and "pipeline:" in out


@pytest.mark.parametrize(("app", "message"), [
    ("deepcompressor.app.diffusion.ptq_infinity", "no config files given"),
    ("deepcompressor.app.diffusion.calibrate_cache_quantization", "no config files given"),
    ("evaluation.activations_measurements", "no config files given"),
    ("evaluation.benchmark_assembled_model", "no config files given"),
])
def test_every_app_without_config_files_exits_2_before_any_work(app, message, capsys):
    import importlib

    main = importlib.import_module(app).main
    with pytest.raises(SystemExit) as stop:
        main([])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: ") and message in err and "Traceback" not in err


def test_bad_yaml_file_exits_2_naming_it(tmp_path, capsys):
    broken = tmp_path / "broken.yaml"
    broken.write_text("quant:\n  wgts: {dtype: sint4\n")
    code, _, err = exit_of([str(broken)], capsys)
    assert code == 2 and "broken.yaml" in err and "invalid YAML" in err


def test_dump_config_round_trips(base_file, tmp_path, capsys):
    argv = [base_file, "--quant-wgts-skips", "head", "--pipeline-h-div-w", "1.5", "--set", "output.dirname=x"]
    expected, _ = parse(argv)
    code, out, _ = exit_of([*argv, "--dump-config"], capsys)
    assert code == 0
    dumped = tmp_path / "dumped.yaml"
    dumped.write_text(out)
    assert load_config([dumped]) == expected
    assert parse([str(dumped)])[0] == expected


def test_help_lists_the_flags(capsys):
    code, out, _ = exit_of(["--help"], capsys)
    assert code == 0
    assert "--quant-wgts-dtype" in out and "--no-pipeline-random-init" in out and "--dump-config" in out


def run_entry(*argv: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([*ENTRY, *argv], check=False, cwd=cwd, capture_output=True, text=True, timeout=120)


def test_entry_point_rejects_misspelled_key_with_exit_2(tmp_path):
    bad = tmp_path / "typo.yaml"
    bad.write_text("quant: {wgts: {dtpye: sint4}}\n")
    result = run_entry(*TINY_CHAIN, str(bad))
    assert result.returncode == 2, result
    assert "quant.wgts.dtpye" in result.stderr and "did you mean 'quant.wgts.dtype'" in result.stderr
    assert str(bad) in result.stderr or "typo.yaml" in result.stderr
    assert result.stdout == ""


def test_entry_point_dumps_the_tiny_chain():
    result = run_entry(*TINY_CHAIN, "--dump-config")
    assert result.returncode == 0, result.stderr
    dumped = yaml.safe_load(result.stdout)
    assert dumped["pipeline"]["arch"] == "tiny" and dumped["quant"]["wgts"]["dtype"] == "sint4"
    assert dumped == yaml.safe_load(yaml.safe_dump(dumped))
