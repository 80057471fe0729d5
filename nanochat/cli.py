"""
The command line, the one place that turns configs (nanochat/config.py) into flags. Every script accepts
--key=value and --key value, dashes or underscores (--model-type == --model_type), and ignores a leading "--"
(torchrun's `-m scripts.x -- --flags` form); --help lists every flag with its default. A bad flag is one line on
stderr and exit status 2, before any work; a UserError during the run is one line and exit status 1.
"""

import argparse
import dataclasses
import math
import sys
import types
import typing

from nanochat.config.base import (
    AUTO_OR_NON_NEGATIVE,
    AUTO_OR_POSITIVE_INT,
    COUNT,
    FRACTION,
    NON_NEGATIVE,
    NON_NEGATIVE_INT,
    PORT,
    POSITIVE,
    POSITIVE_INT,
    Check,
    ConfigError,
    choices_of,
)
from nanochat.log import UserError


def normalize_argv(argv):
    out = []
    for i, arg in enumerate(argv):
        if arg == "--" and i == 0:
            continue
        if arg.startswith("--") and len(arg) > 2:
            key, sep, value = arg[2:].partition("=")
            arg = "--" + key.replace("-", "_") + sep + value
        out.append(arg)
    return out


def str2bool(value):
    """For flags like --qk_norm=False: argparse's bool('False') would be True."""
    if isinstance(value, bool):
        return value
    v = value.strip().lower()
    if v in ("1", "true", "yes", "y", "on"):
        return True
    if v in ("0", "false", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"{value!r} is not a boolean (true/false)")


def value_parser(cast, check=None):
    """An argparse type: cast the text, refuse nan/inf and what `check` refuses, naming what is accepted."""
    what = check.what if check else "a finite number" if cast is float else f"a valid {cast.__name__}"
    cast = check.cast if check and check.cast else cast

    def parse(text):
        try:
            v = cast(text)
        except (TypeError, ValueError, OverflowError):
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if isinstance(v, float) and not math.isfinite(v) or check is not None and not check.ok(v):
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}")
        return v

    parse.__name__ = what
    return parse


def _base_type(annotation):
    """int | None -> int, tuple[str, ...] -> str."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    if typing.get_origin(annotation) in (tuple, list):
        annotation = typing.get_args(annotation)[0]
    return annotation


def _add_field(parser, f, default):
    meta, typ = f.metadata, _base_type(f.type)
    names = ([meta["short"]] if meta.get("short") else []) + [f"--{f.name}"] + list(meta.get("aliases", ()))
    kwargs = dict(dest=f.name, default=default, help=meta.get("help", ""), required=meta.get("required", False))
    if typ is bool:
        kwargs.update(type=str2bool, nargs="?", const=True)
    elif typ in (int, float):
        kwargs["type"] = value_parser(typ, meta.get("check"))
    elif meta.get("check") is not None:
        kwargs["type"] = value_parser(str, meta["check"])
    if meta.get("nargs"):
        kwargs["nargs"] = meta["nargs"]
    if meta.get("repeat"):
        kwargs.update(action="append", default=None)
    if choices_of(f) is not None and not kwargs.get("nargs"):
        kwargs["choices"] = choices_of(f)
    parser.add_argument(*names, **kwargs)


def architecture_flags(parser):
    """One flag per config field of every registered architecture (name, type and help from its dataclass), so a
    new field, or a new architecture, is a flag with no edit anywhere else. Unset flags are left out."""
    from nanochat.limits import size_limit
    from nanochat.models import architecture_fields

    group = parser.add_argument_group("architecture overrides (any config field; unset = the type's default)")
    for name, (annotation, help, owners) in architecture_fields().items():
        typ = _base_type(annotation)
        size = Check(lambda v, n=name: 1 <= v <= size_limit(n), f"an integer in [1, {size_limit(name)}]")
        kind = dict(type=str2bool, nargs="?", const=True) if typ is bool else \
            dict(type=value_parser(int, size)) if typ is int else dict(type=value_parser(float)) if typ is float \
            else dict(type=typ)
        group.add_argument(f"--{name}", dest=f"architecture.{name}", default=None, metavar=name.upper(),
                           help=f"{help} [{', '.join(owners)}]".strip(), **kind)


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


def one_line_errors(parser):
    """parser.error (and its groups') prints one line naming the program and exits with status 2."""

    def error(message):
        print(f"{parser.prog}: error: {message} (see --help)", file=sys.stderr, flush=True)
        sys.exit(2)

    parser.error = error
    for group in parser._action_groups:  # argument groups keep their own reference to error()
        group.error = error
    return parser


def add_config_flags(parser, cls):
    """One flag per field of the config class `cls` (the architecture fields expanded)."""
    for f in dataclasses.fields(cls):
        if f.metadata.get("architecture"):
            architecture_flags(parser)
        else:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            _add_field(parser, f, default)
    return parser


def parser_for(cls, prog=None, description=None):
    parser = argparse.ArgumentParser(prog=prog, description=description, formatter_class=_Formatter,
                                     allow_abbrev=False)
    return one_line_errors(add_config_flags(parser, cls))


def config_from_namespace(cls, ns):
    values, architecture = {}, {}
    for key, value in vars(ns).items():
        if key.startswith("architecture."):
            if value is not None:
                architecture[key.split(".", 1)[1]] = value
        else:
            values[key] = tuple(value) if isinstance(value, list) else value
    for f in dataclasses.fields(cls):
        if f.metadata.get("architecture"):
            values[f.name] = architecture
    return cls(**values)


def parse(cls, argv=None, prog=None, description=None, known=False):
    """The config `cls` from the command line (argv defaults to sys.argv[1:]). known=True also returns the flags it
    does not know, for a script that passes them on (scripts.compare -> base_train)."""
    parser = parser_for(cls, prog, description)
    argv = normalize_argv(sys.argv[1:] if argv is None else list(argv))
    ns, rest = parser.parse_known_args(argv) if known else (parser.parse_args(argv), [])
    try:
        config = config_from_namespace(cls, ns)
    except ConfigError as e:
        parser.error(str(e))
    return (config, rest) if known else config


def parse_command(commands, argv=None, prog=None, description=None):
    """(name, config) of a script with subcommands: `commands` maps each name to (config class, help), and the
    subcommand's flags are its config's fields, checked as parse() checks them."""
    parser = argparse.ArgumentParser(prog=prog, description=description, formatter_class=_Formatter,
                                     allow_abbrev=False)
    subparsers = parser.add_subparsers(dest="command", required=True)
    parsers = {}
    for name, (cls, help) in commands.items():
        parsers[name] = sub = subparsers.add_parser(name, help=help, description=help, formatter_class=_Formatter,
                                                    allow_abbrev=False)
        one_line_errors(add_config_flags(sub, cls))
    one_line_errors(parser)
    ns = parser.parse_args(normalize_argv(sys.argv[1:] if argv is None else list(argv)))
    name = ns.command
    del ns.command
    try:
        return name, config_from_namespace(commands[name][0], ns)
    except ConfigError as e:
        parsers[name].error(str(e))


def run_cli(main):
    """Entry point of a script: run main(), turning UserError into a one-line message and exit status 1."""
    try:
        return main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(1)


# -----------------------------------------------------------------------------
# argparse types and the one-line-error parse for scripts whose parser is written by hand (subcommands)


def parse_args(parser, argv=None):
    """parser.parse_args with the conventions above (one-line errors, normalised flag names)."""

    def error(message):
        print(f"{parser.prog}: error: {message} (see --help)", file=sys.stderr, flush=True)
        sys.exit(2)

    parser.error = error
    for group in parser._action_groups:
        group.error = error
    return parser.parse_args(normalize_argv(sys.argv[1:] if argv is None else list(argv)))


positive_int = value_parser(int, POSITIVE_INT)
non_negative_int = value_parser(int, NON_NEGATIVE_INT)
auto_or_positive_int = value_parser(int, AUTO_OR_POSITIVE_INT)
non_negative_float = value_parser(float, NON_NEGATIVE)
auto_or_non_negative_float = value_parser(float, AUTO_OR_NON_NEGATIVE)
positive_float = value_parser(float, POSITIVE)
fraction = value_parser(float, FRACTION)
count = value_parser(int, COUNT)
port_number = value_parser(int, PORT)
