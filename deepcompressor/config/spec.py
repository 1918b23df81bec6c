"""The schema seen as a flat table of dotted keys: types, choices, defaults and help texts.

Files, command-line flags and ``--set`` all address settings by dotted key (``quant.wgts.dtype``); this module
derives that table from the dataclasses once, checks single values against it, and builds a ``RunConfig`` back
from a flat ``{dotted key: value}`` mapping.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import inspect
import re
import typing
from dataclasses import dataclass
from typing import Any

from .schema import RunConfig

__all__ = ["LeafSpec", "build_config", "check_value", "closest", "leaf_specs", "section_keys", "suggest_key"]


@dataclass(frozen=True)
class LeafSpec:
    """One settable value of the schema."""

    key: str
    kind: type  # str, int, float, bool or list
    nullable: bool
    item_kind: type | None
    choices: tuple[str, ...] | None
    default: Any
    doc: str

    @property
    def type_name(self) -> str:
        if self.kind is list:
            name = f"a list of {_KIND_NAMES[self.item_kind]}s"
        else:
            name = _KIND_NAMES[self.kind]
        return f"{name} or null" if self.nullable else name


_KIND_NAMES = {str: "string", int: "integer", float: "number", bool: "boolean (true/false)"}


def _parse_arg_docs(cls: type) -> dict[str, str]:
    """Field descriptions from the Google-style ``Args:`` sections of a class and its bases."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        text = inspect.cleandoc(klass.__dict__.get("__doc__") or "")
        in_args, current = False, None
        for line in text.splitlines():
            if line.strip() == "Args:":
                in_args = True
                continue
            if not in_args:
                continue
            if line and not line.startswith(" "):
                break
            match = re.match(r"^ {4}(\w+): (.*)$", line)
            if match:
                current = match.group(1)
                docs[current] = match.group(2).strip()
            elif current and line.strip():
                docs[current] += " " + line.strip()
    return docs


def _leaf_type(tp: Any) -> tuple[type, bool, type | None]:
    nullable = False
    args = typing.get_args(tp)
    if type(None) in args:
        nullable = True
        (tp,) = (arg for arg in args if arg is not type(None))
    if typing.get_origin(tp) is list:
        (item,) = typing.get_args(tp)
        return list, nullable, item
    return tp, nullable, None


def _walk(cls: type, prefix: str, leaves: dict[str, LeafSpec], sections: set[str]) -> None:
    hints = typing.get_type_hints(cls)
    docs = _parse_arg_docs(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            sections.add(key)
            _walk(tp, f"{key}.", leaves, sections)
            continue
        kind, nullable, item_kind = _leaf_type(tp)
        if kind not in (str, int, float, bool, list) or (kind is list and item_kind not in (str, int, float)):
            raise TypeError(f"unsupported type {tp!r} of schema field {key}")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        choices = f.metadata.get("choices")
        leaves[key] = LeafSpec(key, kind, nullable, item_kind, choices, default, docs.get(f.name, ""))


@functools.cache
def _tables() -> tuple[dict[str, LeafSpec], frozenset[str]]:
    leaves: dict[str, LeafSpec] = {}
    sections: set[str] = set()
    _walk(RunConfig, "", leaves, sections)
    return leaves, frozenset(sections)


def leaf_specs() -> dict[str, LeafSpec]:
    """Every settable dotted key of ``RunConfig`` in schema order."""
    return _tables()[0]


def section_keys() -> frozenset[str]:
    """Dotted keys of the nested sections (``quant``, ``quant.wgts``, ...)."""
    return _tables()[1]


def closest(word: str, candidates: typing.Iterable[str]) -> str | None:
    matches = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return matches[0] if matches else None


def suggest_key(key: str) -> str | None:
    """The known key a misspelt ``key`` most likely meant: a sibling first, then any dotted key."""
    known = list(leaf_specs()) + sorted(section_keys())
    parent, _, name = key.rpartition(".")
    # A key under the wrong section, e.g. quant.rank for quant.low_rank.rank.
    nested = [k for k in known if k.startswith(f"{parent}.") and k.rpartition(".")[2] == name] if parent else []
    if len(nested) == 1:
        return nested[0]
    siblings = [k for k in known if k.rpartition(".")[0] == parent]
    match = closest(name, [k.rpartition(".")[2] for k in siblings])
    if match is not None:
        return f"{parent}.{match}" if parent else match
    match = closest(key, known)
    if match is not None:
        return match
    same_name = [k for k in known if k.rpartition(".")[2] == name]
    return same_name[0] if len(same_name) == 1 else None


def _check_scalar(kind: type, value: Any) -> Any:
    if kind is bool:
        ok = isinstance(value, bool)
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    else:
        ok = isinstance(value, str)
    if not ok:
        raise ValueError(f"expected {'an' if kind is int else 'a'} {_KIND_NAMES[kind]}, got {_describe(value)}")
    return value


def _describe(value: Any) -> str:
    names = {bool: "boolean", int: "integer", float: "number", str: "string", list: "list", dict: "mapping"}
    return f"{names.get(type(value), type(value).__name__)} {value!r}"


def _check_choice(spec: LeafSpec, value: str) -> None:
    if spec.choices is not None and value not in spec.choices:
        allowed = ", ".join(spec.choices) + (" or null" if spec.nullable else "")
        hint = closest(str(value), spec.choices)
        suggestion = f"; did you mean {hint!r}?" if hint else ""
        raise ValueError(f"invalid value {value!r}: expected one of {allowed}{suggestion}")


def check_value(spec: LeafSpec, value: Any) -> Any:
    """The value normalised to the field's type (ints become floats for float fields); ValueError if invalid."""
    if value is None:
        if spec.nullable:
            return None
        raise ValueError(f"must not be null (expected {spec.type_name})")
    if spec.kind is list:
        if not isinstance(value, list):
            raise ValueError(f"expected {spec.type_name}, got {_describe(value)}")
        items = []
        for index, item in enumerate(value):
            try:
                item = _check_scalar(spec.item_kind, item)
                _check_choice(spec, item)
            except ValueError as error:
                raise ValueError(f"element {index}: {error}") from None
            items.append(item)
        return items
    value = _check_scalar(spec.kind, value)
    _check_choice(spec, value)
    return value


def build_config(values: dict[str, Any], cls: type = RunConfig, prefix: str = "") -> Any:
    """A config dataclass from checked ``{dotted key: value}``; missing keys keep the schema defaults."""
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(hints[f.name]):
            kwargs[f.name] = build_config(values, hints[f.name], f"{key}.")
        elif key in values:
            value = values[key]
            kwargs[f.name] = list(value) if isinstance(value, list) else value
    return cls(**kwargs)
