"""Loading a checkpoint: the evaluation and terminal-chat flags (the server's are in nanochat/serve/config.py)."""

from dataclasses import dataclass

from nanochat.config.base import (
    AUTO_OR_POSITIVE_INT,
    DEVICE_TYPES,
    NAME,
    NON_NEGATIVE,
    NON_NEGATIVE_INT,
    PATH,
    POSITIVE_INT,
    STAGES,
    ConfigError,
    flag,
    model_types,
    validate,
)
from nanochat.config.data import VAL_FRACTION


@dataclass(frozen=True)
class CheckpointConfig:
    source: str | None = flag(None, "checkpoint stage; None = the most trained (rl > sft > mid > base)", short="-i",
                              choices=STAGES)
    model_tag: str | None = flag(None, "checkpoint folder, e.g. gpt_d4; None = the largest", NAME, short="-g")
    model_type: str | None = flag(None, "with no --model_tag, the largest checkpoint of this type; always checked "
                                  "on load", choices=model_types)
    step: int | None = flag(None, "checkpoint step; None = the last", NON_NEGATIVE_INT, short="-s")
    device_type: str = flag("", "cuda|mps|cpu (empty = autodetect)", choices=DEVICE_TYPES)

    def __post_init__(self):
        validate(self)


@dataclass(frozen=True)
class BaseLossConfig(CheckpointConfig):
    source: str = flag("base", "checkpoint stage", short="-i", choices=STAGES)
    device_batch_size: int = flag(8, "sequences per forward pass", POSITIVE_INT)
    split_tokens: int = flag(-1, "tokens evaluated per split (-1: 20*524288 on CUDA, 64 batches elsewhere)",
                             AUTO_OR_POSITIVE_INT)
    data: str | None = flag(None, "score on this text of your own (see base_train --data; None: the data the "
                            "checkpoint trained on, its held-out split as prepared then)")
    text_field: str | None = flag(None, "with --data: the JSON field / parquet column of the text (None: the "
                                  "checkpoint's, else 'text')")
    val_fraction: float | None = flag(None, "with --data: the held-out fraction (None: the checkpoint's, else 0.01)",
                                      VAL_FRACTION)
    skip_bad_lines: bool | None = flag(None, "with --data: skip bad lines (None: as the checkpoint's training did)")


@dataclass(frozen=True)
class BaseEvalConfig(CheckpointConfig):
    source: str = flag("base", "checkpoint stage", short="-i", choices=STAGES)
    max_per_task: int = flag(-1, "items per task (-1 = all); a quick-look knob", AUTO_OR_POSITIVE_INT)
    bundle_dir: str | None = flag(None, "a local eval bundle (core.yaml, eval_meta_data.csv, eval_data/)", PATH)


@dataclass(frozen=True)
class ChatEvalConfig(CheckpointConfig):
    task_name: str | None = flag(None, "one task or several separated by |; None = all", short="-a")
    max_problems: int | None = flag(None, "first N problems per task; None = all", POSITIVE_INT, short="-x")
    temperature: float = flag(0.0, "sampling temperature (0 = greedy)", NON_NEGATIVE, short="-t")
    top_k: int = flag(50, "sample among the k most likely tokens", NON_NEGATIVE_INT, short="-k")
    num_samples: int = flag(1, "samples per generative problem (pass@n)", POSITIVE_INT, short="-n")
    max_new_tokens: int = flag(512, "longest generated answer", POSITIVE_INT, short="-m")
    batch_size: int = flag(8, "problems per forward pass (categorical); rows decoded together (generative: prompts "
                           "of one length, num_samples rows each)", POSITIVE_INT, short="-b")

    def __post_init__(self):
        super().__post_init__()
        from nanochat.chat_eval import TASKS, task_names

        unknown = [name for name in task_names(self) if name not in TASKS]
        if unknown:
            raise ConfigError(f"unknown task {unknown[0]!r}; valid: {'|'.join(TASKS)}")


@dataclass(frozen=True)
class ChatCliConfig(CheckpointConfig):
    prompt: str = flag("", "answer this one prompt and exit", short="-p")
    temperature: float = flag(0.6, "0 is greedy", NON_NEGATIVE, short="-t")
    top_k: int = flag(50, "sample among the k most likely tokens", NON_NEGATIVE_INT, short="-k")
    max_tokens: int = flag(512, "max tokens per reply", POSITIVE_INT, short="-m")
    compile: bool = flag(False, "compile the one-token decode step: a slower start (compilation), faster tokens")
