"""Tokenizer, data download, transformers export/import, and the architecture comparison."""

from dataclasses import dataclass

from nanochat.config.base import (
    AUTO_OR_POSITIVE_INT,
    COUNT,
    NON_NEGATIVE,
    NON_NEGATIVE_INT,
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
class DownloadConfig:
    num_files: int = flag(-1, "number of shards to download, -1 = all", AUTO_OR_POSITIVE_INT, short="-n")
    num_workers: int = flag(4, "parallel downloads", POSITIVE_INT, short="-w")
    base_url: str | None = flag(None, "where shard_XXXXX.parquet files live (default: $NANOCHAT_DATA_URL or "
                                "FineWeb-edu's on the Hugging Face hub)")
    attempts: int = flag(5, "tries per shard", POSITIVE_INT)
    backoff: float = flag(2.0, "seconds before the first retry, doubling", NON_NEGATIVE)

    def __post_init__(self):
        validate(self)


@dataclass(frozen=True)
class ExportConfig(CheckpointConfig):
    source: str = flag("base", "checkpoint stage", short="-i", choices=STAGES)
    out_dir: str | None = flag(None, "new (or empty) directory to write", required=True)
    dtype: str = flag("float32", "dtype of the saved weights", choices=("float32", "bfloat16", "float16"))
    ignore_dropout: bool = flag(False, "export a model trained with dropout > 0 as its inference model (dropout 0)")


@dataclass(frozen=True)
class ImportConfig:
    hf_dir: str | None = flag(None, "local transformers directory (config.json, safetensors, tokenizer.json)",
                              required=True)
    model_tag: str | None = flag(None, "checkpoint folder to create", short="-g", required=True)
    source: str = flag("base", "checkpoint stage", short="-i", choices=STAGES)
    overwrite_tokenizer: bool = flag(False, "replace a different tokenizer in $NANOCHAT_BASE_DIR/tokenizer")

    def __post_init__(self):
        validate(self)


NON_NEGATIVE_OR_ALL = Check(lambda v: v == -1 or v >= 0, "-1 (all), 0 (skip) or a positive integer")


@dataclass(frozen=True)
class CompareConfig:
    model_types: tuple[str, ...] | None = flag(None, "train and compare these architectures (the first is the "
                                               "reference of the matching)", nargs="+", choices=model_types)
    depth: tuple[int, ...] = flag((4,), "one or more depths; an arm per type and depth", POSITIVE_INT, nargs="+")
    seeds: int = flag(3, "runs per arm, seeds 1..N (the seed sets the initial weights; the data order is the same "
                      "for every run)", POSITIVE_INT)
    num_iterations: int = flag(200, "optimizer steps of every run", POSITIVE_INT)
    param_match: bool = flag(False, "equal parameter counts (via each type's MLP width field)")
    flop_match: bool = flag(False, "equal FLOPs per token (via each type's MLP width field)")
    tag_prefix: str = flag("cmp", "checkpoint tags are {prefix}_{type}_d{depth}..._s{seed}")
    nproc_per_node: int = flag(1, "processes per run (torchrun when > 1)", POSITIVE_INT)
    loss_tokens: int = flag(65536, "tokens per split for scripts.base_loss after training (0 = skip)",
                            NON_NEGATIVE_INT)
    core_max_per_task: int = flag(50, "examples per CORE task for scripts.base_eval after training (-1 = all, "
                                  "0 = skip)", NON_NEGATIVE_OR_ALL)
    chat_tasks: str = flag("", "chat_eval tasks on the base models, e.g. 'ARC-Easy' (empty = skip); chat scores of "
                           "sft/rl checkpoints with the same tags are reported whenever they exist")
    chat_max_problems: int = flag(200, "problems per chat task", POSITIVE_INT)
    dry_run: bool = flag(False, "print the runs and their shapes, train nothing")
    source: str = flag("base", "stage of --model_tags", short="-i", choices=STAGES)
    model_tags: tuple[str, ...] | None = flag(None, "tabulate these checkpoints instead of training; shell patterns "
                                              "allowed, tags differing only by _s<seed> form one arm (default: "
                                              "every checkpoint of the source)", nargs="*")
    out_dir: str | None = flag(None, "default: $NANOCHAT_BASE_DIR/report")

    def __post_init__(self):
        validate(self)
        if self.param_match and self.flop_match:
            raise ConfigError("--param_match and --flop_match: give one")
