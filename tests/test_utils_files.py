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


def test_images_are_written_with_the_process_umask(tmp_path):
    import os

    import torch
    from infinity.generate import save_png

    from deepcompressor.utils.files import write_png

    previous = os.umask(0o027)
    try:
        write_png(tmp_path / "a.png", torch.zeros(4, 4, 3, dtype=torch.uint8))
        save_png(torch.zeros(4, 4, 3, dtype=torch.uint8), tmp_path / "b.png")
    finally:
        os.umask(previous)
    assert (tmp_path / "a.png").stat().st_mode & 0o777 == 0o640
    assert (tmp_path / "b.png").stat().st_mode & 0o777 == 0o640
