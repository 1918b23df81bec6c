"""Command line of every app: YAML files, one flag per config key, ``--set``, ``--dump-config``.

    prog [CONFIG.yaml ...] [--quant-wgts-dtype sint4] [--no-pipeline-random-init] [--set quant.wgts.dtype=sint4]

- Every dotted key ``a.b_c`` has a flag ``--a-b-c VALUE``; booleans have ``--a-b-c`` / ``--no-a-b-c``; lists
  take comma-separated items (``--quant-wgts-skips embed,head``, ``""`` for none); ``null`` / ``none`` sets an
  optional value to null.
- ``--set KEY=VALUE`` sets any dotted key with a YAML value (``--set quant.wgts.skips=[embed,head]``).
- Flags beat every file; among flags, the later one wins.
- Any problem prints ``prog: error: ...`` naming the file or flag and the dotted key, and exits with code 2.

omniconfig's own ``ConfigParser`` is not used for parsing: it reports problems through ``assert``, merges
unknown file keys silently, requires config files below the working directory, builds list flags by calling
``list(str)``, and gives booleans an optional value that swallows a following YAML path. The table of keys comes
from ``deepcompressor.config.spec`` instead; omniconfig writes the YAML.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

import yaml

from .dump import config_to_yaml
from .errors import ConfigError, ConfigIssue
from .files import Layer, file_layers, mapping_layer
from .loader import resolve_layers
from .schema import RunConfig
from .spec import LeafSpec, closest, leaf_specs, section_keys, suggest_key

__all__ = ["build_parser", "flag_of", "parse_cli"]

_OVERRIDES_DEST = "_config_overrides"
_NULL_WORDS = ("null", "none")


def flag_of(key: str) -> str:
    """The command-line flag of a dotted key: ``quant.low_rank.rank`` -> ``--quant-low-rank-rank``."""
    return "--" + key.replace(".", "-").replace("_", "-")


class _Override(argparse.Action):
    """Records ``(source, key, raw value)`` in command-line order, so a later flag wins."""

    def __init__(self, option_strings, dest, key: str | None = None, negatable: bool = False, **kwargs):
        self.key = key
        super().__init__(option_strings, dest, nargs=0 if negatable else None, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        if self.nargs == 0:
            value: Any = not option_string.startswith("--no-")
        else:
            value = values
        recorded = list(getattr(namespace, self.dest, None) or [])
        recorded.append((option_string, self.key, value))
        setattr(namespace, self.dest, recorded)


def _metavar(spec: LeafSpec) -> str:
    if spec.kind is list:
        return "ITEM,..."
    if spec.choices:
        return "{" + ",".join(spec.choices) + "}"
    return {int: "INT", float: "FLOAT", str: "STR"}[spec.kind]


def _help(spec: LeafSpec) -> str:
    text = spec.doc.rstrip(".") if spec.doc else spec.key
    if spec.choices and spec.kind is list:
        text += f". Items: {', '.join(spec.choices)}"
    default = ",".join(map(str, spec.default)) if isinstance(spec.default, list) else spec.default
    text += f". Default: {'null' if default is None else default!r}."
    return text.replace("%", "%%")


def build_parser(prog: str, description: str | None = None) -> argparse.ArgumentParser:
    """The parser with the config files, ``--dump-config``, ``--set`` and one flag per config key."""
    parser = argparse.ArgumentParser(
        prog=prog,
        usage="%(prog)s [CONFIG.yaml ...] [--SECTION-KEY VALUE ...] [--set KEY=VALUE ...] [--dump-config] [-h]",
        description=description,
        allow_abbrev=False,
        epilog="Later files beat earlier ones, __default__.yaml files of their folders come first, flags beat "
        "all files. Paths accept ~ and ${ENV_VAR}.",
    )
    parser.add_argument("config_files", nargs="*", metavar="CONFIG.yaml", help="config files, merged in order")
    parser.add_argument("--dump-config", action="store_true", help="print the resolved config as YAML and exit")
    parser.add_argument(
        "--set",
        action=_Override,
        dest=_OVERRIDES_DEST,
        metavar="KEY=VALUE",
        help="set any dotted key to a YAML value, e.g. --set quant.wgts.dtype=sint4 (repeatable)",
    )
    groups: dict[str, argparse._ArgumentGroup] = {}
    for key, spec in leaf_specs().items():
        section = key.rpartition(".")[0]
        if section not in groups:
            groups[section] = parser.add_argument_group(f"{section} settings")
        flag = flag_of(key)
        if spec.kind is bool:
            groups[section].add_argument(
                flag,
                "--no-" + flag[2:],
                action=_Override,
                dest=_OVERRIDES_DEST,
                key=key,
                negatable=True,
                help=_help(spec),
            )
        else:
            groups[section].add_argument(
                flag, action=_Override, dest=_OVERRIDES_DEST, key=key, metavar=_metavar(spec), help=_help(spec)
            )
    return parser


def _flag_value(spec: LeafSpec, text: str) -> Any:
    """A flag's text converted to the field's type (the schema check then validates it)."""
    if isinstance(text, bool):
        return text
    if spec.nullable and text.strip().lower() in _NULL_WORDS:
        return None
    if spec.kind is list:
        items = [item.strip() for item in text.split(",") if item.strip()]
        return [_scalar_from_text(spec.item_kind, item) for item in items]
    return _scalar_from_text(spec.kind, text)


def _scalar_from_text(kind: type, text: str) -> Any:
    if kind is str:
        return text
    try:
        return kind(text)
    except ValueError:
        raise ValueError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}") from None


def _override_layers(recorded: list[tuple[str, str | None, Any]]) -> list[Layer]:
    specs = leaf_specs()
    layers: list[Layer] = []
    issues: list[ConfigIssue] = []
    for option, key, raw in recorded:
        if key is not None:
            try:
                layers.append(Layer(option, {key: _flag_value(specs[key], raw)}))
            except ValueError as error:
                issues.append(ConfigIssue(str(error), key=key, source=option))
            continue
        source = f"--set {raw}"
        name, equals, text = raw.partition("=")
        name = name.strip()
        if not equals or not name:
            issues.append(ConfigIssue("expected KEY=VALUE, e.g. --set quant.wgts.dtype=sint4", source=source))
            continue
        if name not in specs and name not in section_keys():
            hint = suggest_key(name)
            issues.append(
                ConfigIssue("unknown key" + (f"; did you mean {hint!r}?" if hint else ""), key=name, source=source)
            )
            continue
        try:
            value = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError as error:
            issues.append(ConfigIssue(f"invalid YAML value: {error}", key=name, source=source))
            continue
        try:
            layers.append(mapping_layer({name: value}, source, dotted=True))
        except ConfigError as error:
            issues += error.issues
    if issues:
        raise ConfigError(issues)
    return layers


def _fail(parser: argparse.ArgumentParser, lines: Sequence[str]) -> NoReturn:
    body = lines[0] if len(lines) == 1 else "invalid configuration:\n" + "\n".join(f"  {line}" for line in lines)
    parser.exit(2, f"{parser.prog}: error: {body}\n(see {parser.prog} --help for every flag)\n")


def _unknown_arguments(parser: argparse.ArgumentParser, unknown: list[str]) -> list[str]:
    options = [option for action in parser._actions for option in action.option_strings]
    lines = []
    for argument in unknown:
        name = argument.split("=", 1)[0]
        hint = closest(name, options) if name.startswith("-") else None
        lines.append(f"unrecognized argument {argument!r}" + (f"; did you mean {hint}?" if hint else ""))
    return lines


def parse_cli(
    prog: str,
    argv: Sequence[str] | None = None,
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None,
    description: str | None = None,
) -> tuple[RunConfig, argparse.Namespace]:
    """Parse an app's command line into the validated config and the app's own arguments.

    ``add_arguments(parser)`` adds the app's extra flags. The returned namespace holds those plus
    ``config_files`` (the YAML files as given, e.g. for :func:`deepcompressor.config.run_dir`). Handles
    ``--dump-config`` (prints YAML, exits 0), no config files (usage, exit code 2) and every config error (message
    naming file/flag and dotted key, exit code 2).
    """
    parser = build_parser(prog, description)
    if add_arguments is not None:
        add_arguments(parser)
    argv = sys.argv[1:] if argv is None else list(argv)
    namespace, unknown = parser.parse_known_intermixed_args(argv)
    if unknown:
        _fail(parser, _unknown_arguments(parser, unknown))
    recorded = getattr(namespace, _OVERRIDES_DEST, None) or []
    issues: list[ConfigIssue] = []
    layers: list[Layer] = []
    for stage in (lambda: file_layers(namespace.config_files), lambda: _override_layers(recorded)):
        try:
            layers += stage()
        except ConfigError as error:
            issues += error.issues
    if issues:
        _fail(parser, [str(issue) for issue in issues])
    try:
        cfg = resolve_layers(layers)
    except ConfigError as error:
        _fail(parser, [str(issue) for issue in error.issues])
    if not namespace.config_files and not namespace.dump_config:
        # A run with nothing chosen is almost always a mistake (a run directory and minutes of work follow).
        parser.print_usage(sys.stderr)
        parser.exit(2, f"{parser.prog}: error: no config files given; start from a model, e.g. "
                       f"configs/models/infinity-tiny.yaml configs/svdquant/int4.yaml\n")
    if namespace.dump_config:
        sys.stdout.write(config_to_yaml(cfg))
        sys.stdout.flush()
        parser.exit(0)
    for internal in (_OVERRIDES_DEST, "dump_config"):
        if hasattr(namespace, internal):
            delattr(namespace, internal)
    return cfg, namespace
