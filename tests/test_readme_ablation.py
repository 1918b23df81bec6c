"""The README's ablation table is what its command prints here: ``OMP_NUM_THREADS=1 python3 -m
deepcompressor.bench.ptq_ablation`` in a fresh process (every method run from scratch on the tiny model), compared
digit for digit. A process of its own: the tests' ``TRITON_INTERPRET=1`` changes the PTQ's numbers (see the
README)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from deepcompressor.bench.ptq_ablation import METHODS

REPO = Path(__file__).resolve().parents[1]


def _readme_rows() -> dict[str, tuple[str, str, str]]:
    text = (REPO / "README.md").read_text()
    start = text.index("<!-- ablation table:")
    rows = {}
    for line in text[start:].splitlines()[3:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        method = re.search(r"`(\w+)`", cells[1]).group(1)
        rows[method] = (cells[2], cells[3], cells[4])
    return rows


def test_readme_ablation_table_is_regenerated(tmp_path):
    expected = _readme_rows()
    assert set(expected) == set(METHODS)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(REPO / "Infinity_rep"), env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, "-m", "deepcompressor.bench.ptq_ablation", "--output-root",
                           str(tmp_path / "runs"), "--json", str(tmp_path / "rows.json")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=1200, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads((tmp_path / "rows.json").read_text())
    got = {r["method"]: (f"{r['logit_rel_error']:.4f}", f"{100 * r['bit_agreement']:.2f}%",
                         f"{r['mean_layer_error']:.4f}") for r in rows}
    assert got == expected
