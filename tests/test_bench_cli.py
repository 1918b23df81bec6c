"""The benchmarks' list flags: space- or comma-separated, unknown items refused naming the flag."""

import argparse

import pytest

from deepcompressor.bench import kv, w4a4_gpu
from deepcompressor.bench.cli import add_list_argument


def test_space_and_comma_separated_lists_are_the_same():
    parser = argparse.ArgumentParser()
    add_list_argument(parser, "--things", choices=("a", "b", "c"), default=["a"])
    assert parser.parse_args([]).things == ["a"]
    assert parser.parse_args(["--things", "a,b", "c"]).things == ["a", "b", "c"]
    assert parser.parse_args(["--things", "b", "c"]).things == ["b", "c"]


def test_unknown_items_are_one_error_naming_the_flag(capsys):
    with pytest.raises(SystemExit):
        kv.parse_args(["--sections", "quality,qualty"])
    assert "--sections: unknown qualty; choose from quality, calib_time, memory, kernel" in capsys.readouterr().err


def test_the_gpu_umbrella_takes_sections_like_the_others():
    assert w4a4_gpu.parse_args(["--sections", "check,8b"]).parts == ["check", "8b"]
    assert w4a4_gpu.parse_args(["--parts", "check", "2b"]).parts == ["check", "2b"]  # the former spelling
