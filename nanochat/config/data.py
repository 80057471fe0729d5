"""Your own data (--data): the flags of the stages that read files you bring, as mixins of their configs."""

import re
from dataclasses import dataclass

from nanochat.config.base import Check, flag

VAL_FRACTION = Check(lambda v: 0 < v <= 0.5, "a fraction in (0, 0.5]")
# PATH or PATH:WEIGHT; the weight is how many times each training conversation of the file is seen per epoch
CHAT_SPEC = re.compile(r"^(?P<path>.+?)(?::(?P<weight>\d+))?$")
CHAT_DATA_SPEC = Check(lambda v: bool(v) and (CHAT_SPEC.match(v).group("weight") or "1") != "0" and
                       not v.startswith(":"), "PATH or PATH:WEIGHT with a weight >= 1", cast=str)
MIX = ("replace", "add")


@dataclass(frozen=True)
class TextData:
    """tok_train, base_train: pretraining text of your own (nanochat/userdata.py)."""

    data: str | None = flag(None, "your own text: a file or a directory (searched recursively) of .txt/.md (documents "
                            "separated by two or more blank lines), .jsonl (a text field per line), .parquet (a text "
                            "column), each also .gz/.zst; prepared once into shards under $NANOCHAT_BASE_DIR/user_data "
                            "(None: the downloaded FineWeb-edu shards, else the embedded corpus)")
    text_field: str = flag("text", "the JSON field / parquet column that holds the text")
    val_fraction: float = flag(0.01, "documents held out for validation, chosen by the hash of their text (never "
                               "none)", VAL_FRACTION)
    skip_bad_lines: bool = flag(False, "skip (and count) bad lines and empty files instead of stopping at the first")


@dataclass(frozen=True)
class ChatData:
    """mid_train, chat_sft: conversations of your own (tasks/userchat.py)."""

    data: tuple[str, ...] | None = flag(None, "your conversations: a .jsonl file (or a directory of them, .gz/.zst "
                                        "too), one conversation per line; repeat for several; PATH:WEIGHT sees each "
                                        "of its conversations WEIGHT times per epoch", CHAT_DATA_SPEC, repeat=True)
    mix: str = flag("replace", "with --data: replace the built-in mixture with your conversations, or add them to it",
                    choices=MIX)
    val_fraction: float = flag(0.05, "conversations of each --data file held out for the held-out loss, chosen by "
                               "the hash of their text (never none)", VAL_FRACTION)
    skip_bad_lines: bool = flag(False, "skip (and count) bad lines and empty files instead of stopping at the first")
