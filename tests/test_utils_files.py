"""Atomic writes: whole files only, with the mode the process umask gives."""

from __future__ import annotations

import os
import stat

import pytest
import torch

from deepcompressor.utils.files import load_pt, save_pt, write_json, write_text


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_written_files_follow_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        paths = [write_text(tmp_path / "a.txt", "x"), write_json(tmp_path / "b.json", {"a": 1}),
                 save_pt(tmp_path / "c.pt", {"t": torch.ones(2)})]
    finally:
        os.umask(old)
    for path in paths:
        assert stat.S_IMODE(path.stat().st_mode) == mode, path
    assert torch.equal(load_pt(tmp_path / "c.pt")["t"], torch.ones(2))
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # no temporary file left
