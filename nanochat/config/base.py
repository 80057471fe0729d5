"""The machinery of the configs: flag(), the checks a value must pass, and validate()."""

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Callable

from nanochat.limits import MAX_SEQUENCE_LEN, name_problem
from nanochat.log import UserError


class ConfigError(UserError, ValueError):
    """A value a config refuses; the message names the flag, the value and what it accepts."""


@dataclass(frozen=True)
class Check:
    """What a flag accepts: ok(value) and the words for it ("a positive integer"); cast parses the text when the
    field's type alone would not (2e9 for a count)."""

    ok: Callable
    what: str
    cast: Callable | None = None


def _finite(v):
    return not isinstance(v, float) or math.isfinite(v)


POSITIVE_INT = Check(lambda v: v >= 1, "a positive integer")
NON_NEGATIVE_INT = Check(lambda v: v >= 0, "an integer >= 0")
AUTO_OR_POSITIVE_INT = Check(lambda v: v == -1 or v >= 1, "-1 (auto) or an integer >= 1")
NON_NEGATIVE = Check(lambda v: _finite(v) and v >= 0, "a finite number >= 0")
AUTO_OR_NON_NEGATIVE = Check(lambda v: _finite(v) and (v == -1 or v >= 0), "-1 (auto) or a finite number >= 0")
POSITIVE = Check(lambda v: _finite(v) and v > 0, "a finite number > 0")
FINITE = Check(_finite, "a finite number")
FRACTION = Check(lambda v: _finite(v) and 0 <= v <= 1, "a number in [0, 1]")
COUNT = Check(lambda v: v >= 1, "a positive number (2e9 is fine)", cast=lambda s: int(float(s)))
PORT = Check(lambda v: 0 <= v <= 65535, "a port number (0-65535)")
SEQUENCE_LEN = Check(lambda v: 1 <= v <= MAX_SEQUENCE_LEN, f"an integer in [1, {MAX_SEQUENCE_LEN}] (the longest "
                     f"context nanochat accepts)")
# a checkpoint tag is a folder name under $NANOCHAT_BASE_DIR, never a path that could lead outside it
NAME = Check(lambda v: name_problem(v) is None, "a name (no '/', '\\', '..' or control characters)")
NAME_OR_DEFAULT = Check(lambda v: v == "" or name_problem(v) is None,
                        "'' (the default) or a name (no '/', '\\', '..' or control characters)")
PATH = Check(lambda v: v.strip() != "" and "\0" not in v, "a path (not empty)")
NON_EMPTY = Check(lambda v: v.strip() != "" and v.isprintable(), "a non-empty text without control characters")
DEVICE_TYPES = ("", "cuda", "mps", "cpu")  # "" = autodetect (cuda > mps > cpu)


def flag(default, help, check=None, short=None, choices=None, aliases=(), nargs=None, repeat=False, required=False):
    """A config field that is also a command-line flag. choices may be a callable (read when the flags are built,
    e.g. the registered model types); nargs "+"/"*" and repeat (the flag given several times) make tuples."""
    meta = dict(help=help, check=check, short=short, choices=choices, aliases=tuple(aliases), nargs=nargs,
                repeat=repeat, required=required)
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


def choices_of(f):
    choices = f.metadata.get("choices")
    return list(choices()) if callable(choices) else choices


def validate(config):
    """Every field's check and choices; None means "unset" (e.g. inherited from the source checkpoint)."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        values = value if isinstance(value, tuple) else (value,)
        check, choices = f.metadata.get("check"), choices_of(f)
        for v in values:
            if v is None or isinstance(v, bool):
                continue
            if isinstance(v, float) and not math.isfinite(v):
                raise ConfigError(f"--{f.name}: {v!r} is not {check.what if check else 'a finite number'}")
            if check is not None and not check.ok(v):
                raise ConfigError(f"--{f.name}: {v!r} is not {check.what}")
            if choices is not None and v not in choices:
                raise ConfigError(f"--{f.name}: {v!r} is not one of {', '.join(map(str, choices))}")


def model_types():
    from nanochat.models import MODEL_TYPES  # read when asked: a test may register an architecture

    return list(MODEL_TYPES)


def muon_variants():
    from nanochat.optim import MUON_VARIANTS

    return list(MUON_VARIANTS)


CHAT_DATA = ("auto", "hub", "embedded")  # where the chat stages' data comes from (tasks.mixtures.choose_source)
STAGES = ("base", "mid", "sft", "rl")  # checkpoint sources, in pipeline order
