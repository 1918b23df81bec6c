"""Configuration errors: every problem names where it came from (file or flag) and the dotted key."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ConfigError", "ConfigIssue"]


@dataclass(frozen=True)
class ConfigIssue:
    """One problem: ``source`` is a file path or a command-line flag (None for schema defaults)."""

    message: str
    key: str | None = None
    source: str | None = None

    def __str__(self) -> str:
        parts = [part for part in (self.source, self.key) if part]
        return ": ".join(parts + [self.message])


class ConfigError(ValueError):
    """The configuration is invalid; ``issues`` lists every problem found at the failing stage."""

    def __init__(self, issues: list[ConfigIssue]):
        if not issues:
            raise ValueError("ConfigError needs at least one issue")
        self.issues = list(issues)
        super().__init__("\n".join(str(issue) for issue in self.issues))
