"""The benchmarks' flags (scripts/bench.py), one config per subcommand; shared fields in the bases."""

from dataclasses import dataclass

from nanochat.config.base import (
    DEVICE_TYPES,
    NAME,
    NON_NEGATIVE_INT,
    PATH,
    POSITIVE,
    POSITIVE_INT,
    SEQUENCE_LEN,
    STAGES,
    Check,
    ConfigError,
    flag,
    validate,
)
from nanochat.limits import MAX_LAYERS, MAX_VOCAB

DEPTH = Check(lambda v: 1 <= v <= MAX_LAYERS, f"an integer in [1, {MAX_LAYERS}]")
VOCAB = Check(lambda v: 2 <= v <= MAX_VOCAB, f"an integer in [2, {MAX_VOCAB}]")
EVEN = Check(lambda v: v >= 2 and v % 2 == 0, "an even integer >= 2")


def check_shapes(depths, seq_len, vocab_size, head_dim=None):
    """Every registered type can be built at these depths (a head_dim that does not split the width is refused)."""
    from nanochat.models import MODEL_TYPES, config_from_depth

    for model_type in MODEL_TYPES:
        for depth in depths:
            try:
                config_from_depth(model_type, depth, seq_len, vocab_size, head_dim=head_dim)
            except ValueError as e:
                raise ConfigError(str(e)) from None


@dataclass(frozen=True)
class BenchConfig:
    n: int = flag(5, "rounds; every figure is the median of n", POSITIVE_INT)
    threads: int = flag(0, "torch CPU threads (0: torch's default)", NON_NEGATIVE_INT)
    device_type: str = flag("", "cuda|mps|cpu (empty = autodetect)", choices=DEVICE_TYPES)
    out: str = flag("bench_results", "directory of the JSON results", PATH)

    def __post_init__(self):
        validate(self)


@dataclass(frozen=True)
class ShapeConfig(BenchConfig):
    """A model of config_from_depth at one depth, fed random tokens."""
    depth: int = flag(4, "config_from_depth depth of every model type", DEPTH)
    vocab_size: int = flag(4096, "vocab size (4096: the CPU quickstart's)", VOCAB)
    head_dim: int | None = flag(None, "head_dim override (default: the type's)", EVEN)

    def __post_init__(self):
        super().__post_init__()
        check_shapes([self.depth], getattr(self, "seq_len", 64), self.vocab_size, self.head_dim)


@dataclass(frozen=True)
class ParamsConfig(BenchConfig):
    depths: tuple[int, ...] = flag((4, 12, 20), "config_from_depth depths", DEPTH, nargs="+")
    max_seq_len: int = flag(2048, "context length of the depth configs", SEQUENCE_LEN)
    vocab_size: int = flag(65536, "vocab size of the depth configs", VOCAB)

    def __post_init__(self):
        super().__post_init__()
        check_shapes(self.depths, self.max_seq_len, self.vocab_size)


@dataclass(frozen=True)
class DataConfig(BenchConfig):
    seconds: float = flag(2.0, "time per dataloader measurement", POSITIVE)
    tokenizer_threads: int = flag(4, "threads for batched tokenization", POSITIVE_INT)
    with_model: bool = flag(False, "also time a d4 gpt forward+backward (fp32, CPU)")
    data: str | None = flag(None, "your own text (as base_train --data): time its preparation (MB/s, in a temp dir) "
                            "and measure the tokenizers and the loader on it instead of the embedded corpus", PATH)


@dataclass(frozen=True)
class TrainBenchConfig(ShapeConfig):
    n: int = flag(3, "rounds; every figure is the median of n", POSITIVE_INT)
    batch_size: int = flag(8, "sequences per step", POSITIVE_INT)
    seq_len: int = flag(256, "tokens per sequence", SEQUENCE_LEN)
    activation_checkpointing: bool = flag(False, "checkpoint every block (ours) and gradient_checkpointing_enable "
                                          "(peer)")
    compile: bool = flag(False, "torch.compile ours and the peer alike (compilation takes ~20 s per model on CPU)")
    profile: bool = flag(False, "also profile forward+backward: the share of its time in matmuls, on both sides")


@dataclass(frozen=True)
class DecodeFlags:
    prompt_len: int = flag(64, "prompt tokens", SEQUENCE_LEN)
    max_tokens: int = flag(64, "new tokens per row", SEQUENCE_LEN)
    skip_no_cache: bool = flag(False, "leave out our model without its KV cache")
    compile: bool = flag(False, "ours with model.compile_decode() (compilation excluded: each batch size warms up "
                         "first)")


@dataclass(frozen=True)
class DecodeConfig(ShapeConfig, DecodeFlags):
    # one token at a time is too little work for two threads, and idle threads slow it on a busy machine
    n: int = flag(3, "rounds; every figure is the median of n", POSITIVE_INT)
    threads: int = flag(1, "torch CPU threads (0: torch's default)", NON_NEGATIVE_INT)
    batch_sizes: tuple[int, ...] = flag((1, 8), "rows decoded together", POSITIVE_INT, nargs="+")


@dataclass(frozen=True)
class InferConfig(BenchConfig, DecodeFlags):
    source: str = flag("base", "checkpoint stage", choices=STAGES)
    model_tag: str | None = flag(None, "checkpoint directory (default: the largest)", NAME)
    step: int | None = flag(None, "checkpoint step (default: the last)", NON_NEGATIVE_INT)
    batch_sizes: tuple[int, ...] = flag((1, 2, 4, 8, 16), "rows decoded together", POSITIVE_INT, nargs="+")


@dataclass(frozen=True)
class MemoryConfig(ShapeConfig):
    depth: int = flag(8, "config_from_depth depth of every model type", DEPTH)
    batch_size: int = flag(8, "sequences per step", POSITIVE_INT)
    seq_len: int = flag(512, "tokens per sequence", SEQUENCE_LEN)
    steps: int = flag(3, "training steps measured", POSITIVE_INT)
    activation_checkpointing: str = flag("off", "measure without, with, or both", choices=("off", "on", "both"))


@dataclass(frozen=True)
class ScalingConfig(BenchConfig):
    vocab_size: int = flag(4096, "vocab size (4096: the CPU quickstart's)", VOCAB)
    head_dim: int | None = flag(None, "head_dim override (default 64)", EVEN)
    batch_size: int = flag(8, "sequences per step", POSITIVE_INT)
    seq_len: int = flag(256, "tokens per sequence", SEQUENCE_LEN)
    depths: tuple[int, ...] = flag(tuple(range(2, 13)), "depths to measure", DEPTH, nargs="+")

    def __post_init__(self):
        super().__post_init__()
        check_shapes(self.depths, self.seq_len, self.vocab_size, self.head_dim or 64)


# subcommand -> (config, help)
BENCH_COMMANDS = {
    "params": (ParamsConfig, "parameter counts by group and FLOPs/token of every type"),
    "data": (DataConfig, "tokenizer training time and dataloader tok/s"),
    "train": (TrainBenchConfig, "training tok/s, ours vs the transformers twin"),
    "decode": (DecodeConfig, "prefill and per-token time vs transformers"),
    "infer": (InferConfig, "decoding figures of a real checkpoint, batch-size sweep"),
    "memory": (MemoryConfig, "measured training peak memory vs the --dry_run estimate"),
    "scaling": (ScalingConfig, "tok/s and FLOPs/token over depth, plotted"),
}
