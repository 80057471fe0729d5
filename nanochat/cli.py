"""
The command line: every script accepts --key=value and --key value, dashes or underscores (--model-type ==
--model_type), and ignores a leading "--" (torchrun's `-m scripts.x -- --flags` form). A bad flag is one line on
stderr and exit status 2, before any work; a UserError during the run is one line and exit status 1.
"""

import argparse
import math
import sys

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


def parse_args(parser, argv=None):
    """argparse with the conventions above; argv defaults to sys.argv[1:]. A bad flag is one line on stderr and
    exit status 2, before any work."""

    def error(message):
        print(f"{parser.prog}: error: {message} (see --help)", file=sys.stderr, flush=True)
        sys.exit(2)

    parser.error = error
    for group in parser._action_groups:  # argument groups keep their own reference to error()
        group.error = error
    return parser.parse_args(normalize_argv(sys.argv[1:] if argv is None else list(argv)))


# Flag types: argparse refuses a bad value at parse time, naming the flag and what it accepts


def _number(cast, check, what):
    def parse(value):
        try:
            v = cast(value)
        except (TypeError, ValueError, OverflowError):
            raise argparse.ArgumentTypeError(f"{value!r} is not {what}") from None
        if isinstance(v, float) and not math.isfinite(v) or not check(v):
            raise argparse.ArgumentTypeError(f"{value!r} is not {what}")
        return v

    parse.__name__ = what
    return parse


positive_int = _number(int, lambda v: v >= 1, "a positive integer")
non_negative_int = _number(int, lambda v: v >= 0, "an integer >= 0")
auto_or_positive_int = _number(int, lambda v: v == -1 or v >= 1, "-1 (auto) or an integer >= 1")
non_negative_float = _number(float, lambda v: v >= 0, "a finite number >= 0")
auto_or_non_negative_float = _number(float, lambda v: v == -1 or v >= 0, "-1 (auto) or a finite number >= 0")
positive_float = _number(float, lambda v: v > 0, "a finite number > 0")
fraction = _number(float, lambda v: 0 <= v <= 1, "a number in [0, 1]")
count = _number(lambda s: int(float(s)), lambda v: v >= 1, "a positive number (2e9 is fine)")
port_number = _number(int, lambda v: 0 <= v <= 65535, "a port number (0-65535)")


def str2bool(value):
    """For flags like --qk_norm=False: argparse's bool('False') would be True."""
    if isinstance(value, bool):
        return value
    v = value.strip().lower()
    if v in ("1", "true", "yes", "y", "on"):
        return True
    if v in ("0", "false", "no", "n", "off"):
        return False
    raise ValueError(f"expected a boolean (true/false), got {value!r}")


def run_cli(main):
    """Entry point of a script: run main(), turning UserError into a one-line message and exit status 1."""
    try:
        return main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(1)
