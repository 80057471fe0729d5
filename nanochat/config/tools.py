"""Tokenizer, data download, transformers export/import, and the architecture comparison."""

import math
from dataclasses import dataclass

from nanochat.config.base import (
    AUTO_OR_POSITIVE_INT,
    COUNT,
    NAME,
    NON_NEGATIVE_INT,
    PATH,
    POSITIVE_INT,
    STAGES,
    Check,
    ConfigError,
    flag,
    model_types,
    validate,
)
from nanochat.config.data import TextData
from nanochat.config.evaluate import CheckpointConfig


@dataclass(frozen=True)
class TokTrainConfig(TextData):
    vocab_size: int = flag(65536, "vocabulary size including the special tokens", POSITIVE_INT)
    max_chars: int = flag(2_000_000_000, "train on at most this many characters (stops earlier if the corpus is "
                          "smaller)", COUNT)
    doc_cap: int = flag(10_000, "crop each document to this many characters", POSITIVE_INT)

    def __post_init__(self):
        validate(self)


@dataclass(frozen=True)
class TokEvalConfig:
    max_chars: int = flag(50_000, "characters of training and of validation documents to compress", COUNT)

    def __post_init__(self):
        validate(self)


@dataclass(frozen=True)
class DownloadConfig:
    num_files: int = flag(-1, "number of shards to download, -1 = all", AUTO_OR_POSITIVE_INT, short="-n")
    num_workers: int = flag(4, "parallel downloads (at most 64)",
                            Check(lambda v: 1 <= v <= 64, "an integer in [1, 64]"), short="-w")
    base_url: str | None = flag(None, "where shard_XXXXX.parquet files live (default: $NANOCHAT_DATA_URL or "
                                "FineWeb-edu's on the Hugging Face hub)")
    attempts: int = flag(5, "tries per shard", POSITIVE_INT)
    backoff: float = flag(2.0, "seconds before the first retry, doubling",
                          Check(lambda v: 0 <= v <= 3600, "a number of seconds in [0, 3600]"))

    def __post_init__(self):
        validate(self)


@dataclass(frozen=True)
class ExportConfig(CheckpointConfig):
    source: str = flag("base", "checkpoint stage", short="-i", choices=STAGES)
    out_dir: str | None = flag(None, "new (or empty) directory to write", PATH, required=True)
    dtype: str = flag("float32", "dtype of the saved weights", choices=("float32", "bfloat16", "float16"))
    ignore_dropout: bool = flag(False, "export a model trained with dropout > 0 as its inference model (dropout 0)")


@dataclass(frozen=True)
class ImportConfig:
    hf_dir: str | None = flag(None, "local transformers directory (config.json, safetensors, tokenizer.json)", PATH,
                              required=True)
    model_tag: str | None = flag(None, "checkpoint folder to create", NAME, short="-g", required=True)
    source: str = flag("base", "checkpoint stage", short="-i", choices=STAGES)
    overwrite_tokenizer: bool = flag(False, "replace a different tokenizer in $NANOCHAT_BASE_DIR/tokenizer")

    def __post_init__(self):
        validate(self)


NON_NEGATIVE_OR_ALL = Check(lambda v: v == -1 or v >= 0, "-1 (all), 0 (skip) or a positive integer")


def _multipliers(text):
    values = [float(v) for v in text.split(",") if v.strip()]
    if not values or any(not math.isfinite(v) or v <= 0 for v in values):
        raise ValueError(text)
    return tuple(sorted(set(values)))


def _multipliers_text(text):
    """The text, once it parses as multipliers (argparse runs the default "" through the type too)."""
    if text.strip():
        _multipliers(text)
    return text


MULTIPLIERS = Check(lambda v: v == "" or bool(_multipliers(v)), "comma-separated numbers > 0, e.g. 0.5,1,2",
                    cast=_multipliers_text)
CHAT_TASKS = "Arithmetic|SpellingBee|ARC-Easy"  # compare --chat's default: tool use, spelling, knowledge


@dataclass(frozen=True)
class CompareConfig:
    model_types: tuple[str, ...] | None = flag(None, "train and compare these architectures (the first is the "
                                               "reference of the matching)", nargs="+", choices=model_types)
    depth: tuple[int, ...] = flag((4,), "one or more depths; an arm per type and depth (with 3 or more, a fit of "
                                  "val bpb against training FLOPs per type)", POSITIVE_INT, nargs="+",
                                  aliases=("--depths",))
    seeds: int = flag(3, "runs per arm, seeds 1..N (the seed sets the initial weights; the data order is the same "
                      "for every run)", POSITIVE_INT)
    num_iterations: int = flag(200, "optimizer steps of every run", POSITIVE_INT)
    param_match: bool = flag(False, "equal parameter counts (via each type's MLP width field)")
    flop_match: bool = flag(False, "equal FLOPs per token (via each type's MLP width field)")
    lr_sweep: str = flag("", "learning-rate multipliers, e.g. 0.5,1,2: each arm is trained with seed 1 at each, and "
                         "its seeds at the one with the best val bpb (empty: 1 only)", MULTIPLIERS)
    lr_sweep_param: str = flag("all", "what --lr_sweep multiplies: every learning rate, or the matrices' (Muon) "
                               "alone", choices=("all", "matrix"))
    ablate: bool = flag(False, "also run each ablation of the listed types (their ModelSpec's: one choice switched "
                        "at a time), compared with the unablated arm")
    chat: bool = flag(False, "continue every base run through mid-training and SFT, then chat_eval --chat_tasks")
    mid_iterations: int = flag(100, "mid-training steps of each run with --chat", POSITIVE_INT)
    sft_iterations: int = flag(150, "SFT steps of each run with --chat", POSITIVE_INT)
    chat_tasks: str = flag("", f"chat_eval tasks: with --chat on the SFT models (default {CHAT_TASKS}), else on "
                           "the base models (empty = none); chat scores of sft/rl checkpoints with the same tags are "
                           "reported whenever they exist")
    chat_max_problems: int = flag(200, "problems per chat task", POSITIVE_INT)
    tag_prefix: str = flag("cmp", "checkpoint tags are {prefix}_{type}_d{depth}..._s{seed}", NAME)
    nproc_per_node: int = flag(1, "processes per run (torchrun when > 1)", POSITIVE_INT)
    loss_tokens: int = flag(65536, "tokens per split for scripts.base_loss after training (0 = skip)",
                            NON_NEGATIVE_INT)
    core_max_per_task: int = flag(50, "examples per CORE task for scripts.base_eval after training (-1 = all, "
                                  "0 = skip)", NON_NEGATIVE_OR_ALL)
    dry_run: bool = flag(False, "print the runs and their shapes, train nothing")
    source: str = flag("base", "stage of --model_tags", short="-i", choices=STAGES)
    model_tags: tuple[str, ...] | None = flag(None, "tabulate these checkpoints instead of training; shell patterns "
                                              "allowed, tags differing only by _s<seed> form one arm (default: "
                                              "every checkpoint of the source)", NAME, nargs="*")
    out_dir: str | None = flag(None, "default: $NANOCHAT_BASE_DIR/report", PATH)

    def __post_init__(self):
        validate(self)
        if self.param_match and self.flop_match:
            raise ConfigError("--param_match and --flop_match: give one")

    @property
    def multipliers(self):
        return _multipliers(self.lr_sweep) if self.lr_sweep else (1.0,)

    @property
    def chat_eval_tasks(self):
        return [t.strip() for t in (self.chat_tasks or (CHAT_TASKS if self.chat else "")).split("|") if t.strip()]
