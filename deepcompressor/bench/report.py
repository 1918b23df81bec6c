"""The common end of a benchmark: print its table, write its JSON."""

from __future__ import annotations

import os

from ..utils.files import write_json

__all__ = ["finish"]


def finish(table: str, results: dict, json_path: str | os.PathLike | None) -> int:
    """Print ``table``; write ``results`` to ``json_path`` (atomically) when given; exit code 0."""
    print(table)
    if json_path:
        write_json(json_path, results)
        print(f"wrote {json_path}")
    return 0
