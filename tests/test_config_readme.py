"""The README's commands and CI agree with the repository."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text(encoding="utf-8")


def section(title: str) -> str:
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", README, flags=re.MULTILINE | re.DOTALL)
    assert match, f"README has no '## {title}' section"
    return match.group(1)


def test_readme_commands_name_existing_config_files():
    named = set(re.findall(r"configs/[\w./-]+\.yaml", README))
    assert "configs/models/infinity-tiny.yaml" in named
    assert sorted(name for name in named if not (REPO / name).is_file()) == []


def test_ci_runs_exactly_the_readme_test_command():
    (block,) = re.findall(r"```bash\n(.*?)```", section("Tests"), flags=re.DOTALL)
    command = block.strip()
    ci_lines = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines() if line.strip()]
    assert ci_lines[-1] == command


def test_quick_start_has_two_commands_and_the_tiny_chain():
    (block,) = re.findall(r"```bash\n(.*?)```", section("Quick start"), flags=re.DOTALL)
    commands = [line for line in block.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    assert len(commands) == 2
    chain = "configs/models/infinity-tiny.yaml configs/collect/qdiff.yaml configs/svdquant/int4.yaml"
    assert "deepcompressor.app.diffusion.ptq_infinity " + chain + " configs/svdquant/fast.yaml" in commands[0]
    assert commands[1] == "bash .ci/run"


def test_sections_for_every_area_exist():
    for title in ("Configuration", "Model", "Quantization engine", "PTQ", "KV cache", "Diagnostics", "Benchmarks"):
        section(title)
