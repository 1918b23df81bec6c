"""Kernel choices measured once per GPU and shape, kept in memory and on disk across processes.

One JSON file per kind of choice under ``$VAR_COMPRESSOR_CACHE`` (default ``~/.cache/var-compressor``):
``{"format": ..., "choices": {key: choice}}``. A file of another format, or one that cannot be read, is ignored
with a warning; a read-only cache folder never stops inference.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

__all__ = ["ChoiceCache", "cache_root"]

logger = logging.getLogger(__name__)


def cache_root() -> Path:
    return Path(os.environ.get("VAR_COMPRESSOR_CACHE") or os.path.join(os.path.expanduser("~"), ".cache",
                                                                        "var-compressor"))


class ChoiceCache:
    """Choices of one kind (``filename``, ``fmt``); ``valid(choice)`` filters entries read back from disk."""

    def __init__(self, filename: str, fmt: str, what: str, valid: Callable[[dict], bool] | None = None) -> None:
        self.filename, self.format, self.what = filename, fmt, what
        self.valid = valid or (lambda choice: isinstance(choice, dict))
        self.table: dict[str, dict] | None = None

    @property
    def path(self) -> Path:
        return cache_root() / self.filename

    def _load(self) -> dict:
        if self.table is None:
            self.table = {}
            try:
                data = json.loads(self.path.read_text())
                if isinstance(data, dict) and data.get("format") == self.format and isinstance(data.get("choices"),
                                                                                                 dict):  # fmt: skip
                    self.table = data["choices"]
            except FileNotFoundError:
                pass
            except (OSError, ValueError) as error:
                logger.warning("ignoring unreadable %s cache %s: %s", self.what, self.path, error)
        return self.table

    def get(self, key: str) -> dict | None:
        choice = self._load().get(key)
        return choice if self.valid(choice) else None

    def put(self, key: str, choice: dict, persist: bool = True) -> None:
        table = self._load()
        table[key] = choice
        if not persist:
            return
        from ..utils.files import write_json

        try:
            write_json(self.path, {"format": self.format, "choices": table})
        except OSError as error:  # a read-only home must not stop inference
            logger.warning("could not write the %s cache %s: %s", self.what, self.path, error)

    def clear_memory(self) -> None:
        self.table = None
