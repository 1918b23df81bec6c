"""The original project's command-line spelling, translated to this project's flags before parsing.

The commands the original project documents (``--base-path DIR``, ``--enable_kv_quant true``, space-separated
lists) must work as written; each app names its own mapping and keeps its own flags as they are.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

__all__ = ["FALSE_WORDS", "TRUE_WORDS", "SeedFlagError", "seed_bool_flags", "translate_seed_flags"]

TRUE_WORDS, FALSE_WORDS = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


class SeedFlagError(ValueError):
    """A seed-style flag with a value it cannot take (the message names the flag)."""


def seed_bool_flags(names: Mapping[str, str]) -> dict[str, str]:
    """``{"kv": "kv-enabled"}`` -> ``{"--enable_kv_quant": "kv-enabled", "--enable-kv-quant": "kv-enabled"}``."""
    return {f"--enable{sep}{what}{sep}quant": flag for what, flag in names.items() for sep in ("_", "-")}


def translate_seed_flags(argv: Sequence[str], *, value_flags: Mapping[str, str] = {},
                         bool_flags: Mapping[str, str] = {}, list_flags: Sequence[str] = ()) -> list[str]:
    """Rewrite ``argv``:

    - ``bool_flags``: ``--enable_kv_quant true`` / ``--enable_kv_quant=false`` -> ``--<flag>`` / ``--no-<flag>``
      (``true``/``false``, ``1``/``0``, ``yes``/``no``, ``on``/``off``; anything else is a ``SeedFlagError``);
    - ``value_flags``: ``--base-path DIR`` -> ``--<our name> DIR`` (``=`` forms kept);
    - ``list_flags``: ``--flag A B C`` -> ``--flag A,B,C``.
    """
    out: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        name, eq, inline = arg.partition("=")
        if name in bool_flags:
            value = inline if eq else (argv[i + 1] if i + 1 < len(argv) else "")
            i += 1 if eq else 2
            if value.lower() not in TRUE_WORDS + FALSE_WORDS:
                raise SeedFlagError(f"{name}: expected true or false, got {value!r}")
            out.append(("--" if value.lower() in TRUE_WORDS else "--no-") + bool_flags[name])
            continue
        if name in value_flags:
            out.append(value_flags[name] + (f"={inline}" if eq else ""))
            i += 1
            continue
        if name in list_flags and not eq:
            items = []
            i += 1
            while i < len(argv) and not argv[i].startswith("--"):
                items.extend(part for part in argv[i].split(",") if part)
                i += 1
            out += [name, ",".join(items)]
            continue
        out.append(arg)
        i += 1
    return out
