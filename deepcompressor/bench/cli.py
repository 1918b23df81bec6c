"""The benchmarks' one flag convention for lists: ``--flag a b c``, ``--flag a,b,c`` and mixes mean the same, and
an unknown item is one error line naming the flag and the choices."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

__all__ = ["add_list_argument"]


class _ListAction(argparse.Action):
    def __init__(self, *args, allowed: Sequence[str] | None = None, **kwargs):
        self.allowed = tuple(allowed) if allowed is not None else None
        super().__init__(*args, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        items = [part for value in values for part in str(value).split(",") if part]
        if not items:
            parser.error(f"{option_string}: expected at least one item")
        if self.allowed is not None:
            unknown = [item for item in items if item not in self.allowed]
            if unknown:
                parser.error(f"{option_string}: unknown {', '.join(unknown)}; choose from {', '.join(self.allowed)}")
        setattr(namespace, self.dest, items)


def add_list_argument(parser: argparse.ArgumentParser, *flags: str, choices: Sequence[str] | None = None,
                      default: list[str] | None = None, help: str = "", dest: str | None = None) -> None:
    """A list flag (space- or comma-separated items, checked against ``choices``)."""
    kwargs = {"dest": dest} if dest else {}
    parser.add_argument(*flags, nargs="+", action=_ListAction, allowed=choices, default=default,
                        help=f"{help} (space- or comma-separated)".strip(), **kwargs)
