"""The training family: the loop's flags (every stage), pretraining, fine-tuning and RL."""

import dataclasses
from dataclasses import dataclass, field

from nanochat.config.base import (
    AUTO_OR_NON_NEGATIVE,
    AUTO_OR_POSITIVE_INT,
    CHAT_DATA,
    DEVICE_TYPES,
    FINITE,
    FRACTION,
    NAME_OR_DEFAULT,
    NON_EMPTY,
    NON_NEGATIVE,
    NON_NEGATIVE_INT,
    POSITIVE,
    POSITIVE_INT,
    SEQUENCE_LEN,
    STAGES,
    ConfigError,
    flag,
    model_types,
    muon_variants,
    validate,
)
from nanochat.config.data import ChatData, TextData


@dataclass(frozen=True)
class TrainConfig:
    run: str = flag("dummy", "wandb run name ('dummy' = no wandb)", NON_EMPTY)
    device_type: str = flag("", "cuda|mps|cpu (empty = autodetect)", choices=DEVICE_TYPES)
    device_batch_size: int | None = flag(32, "sequences per device per micro-step", POSITIVE_INT)
    num_iterations: int = flag(-1, "optimizer steps (-1: decided by the stage's data or compute budget)",
                               AUTO_OR_POSITIVE_INT)
    embedding_lr: float | None = flag(0.2, "AdamW learning rate of the token embedding", NON_NEGATIVE)
    unembedding_lr: float | None = flag(0.004, "AdamW learning rate of the lm_head (and of learnable norm weights)",
                                        NON_NEGATIVE)
    matrix_lr: float | None = flag(0.02, "Muon learning rate of the matrices inside the blocks", NON_NEGATIVE)
    weight_decay: float | None = flag(0.0, "AdamW weight decay", NON_NEGATIVE)
    muon_variant: str | None = flag("nanochat", "Muon for the matrices: nanochat (Polar Express, NorMuon, cautious "
                                    "weight decay) or classic (fixed Newton-Schulz coefficients); see "
                                    "nanochat/optim.py", choices=muon_variants)
    matrix_weight_decay: float = flag(-1.0, "Muon's weight decay of the matrices (-1: the --muon_variant's rule, "
                                      "0.2*(768/width)^2 for nanochat)", AUTO_OR_NON_NEGATIVE)
    muon_momentum_warmup: int = flag(300, "steps over which Muon's momentum ramps from 0.85 to 0.95 (0: 0.95 from "
                                     "the start)", NON_NEGATIVE_INT)
    grad_clip: float | None = flag(1.0, "max gradient norm (0 = off)", NON_NEGATIVE)
    init_lr_frac: float = flag(1.0, "every learning rate is multiplied by this at the start", NON_NEGATIVE)
    warmup_ratio: float = flag(0.0, "fraction of the steps with a linear warmup", FRACTION)
    warmdown_ratio: float = flag(0.2, "fraction of the steps at the end with a linear warmdown", FRACTION)
    final_lr_frac: float = flag(0.0, "learning rate at the end of the warmdown, as a fraction of the initial one",
                                FRACTION)
    eval_every: int = flag(250, "evaluate every N steps (-1 = only at the start and the end)", AUTO_OR_POSITIVE_INT)
    save_every: int = flag(-1, "checkpoint every N steps (-1 = only at the end)", AUTO_OR_POSITIVE_INT)
    log_every: int = flag(1, "print and record loss and grad norm every N steps: reading them waits for the device, "
                          "so the steps in between queue work without waiting (NaN/inf is still caught, at the next "
                          "log step or checkpoint, and names the step it happened at)", POSITIVE_INT)
    seed: int = flag(42, "random seed (weights at init, data order, sampling)")
    model_tag: str = flag("", "checkpoint directory name (default {model_type}_d{depth}, or the source's)",
                          NAME_OR_DEFAULT)
    resume: bool = flag(False, "continue from the latest complete checkpoint of this model_tag")
    compile: bool | None = flag(None, "torch.compile the model (default: on CUDA only)")
    activation_checkpointing: bool = flag(False, "recompute each block's activations in backward: less memory, "
                                          "~1/3 more compute")

    def __post_init__(self):
        validate(self)
        if self.warmup_ratio + self.warmdown_ratio > 1:
            raise ConfigError(f"--warmup_ratio={self.warmup_ratio} + --warmdown_ratio={self.warmdown_ratio} > 1: the "
                              f"warmup and the warmdown would overlap")


# Settings a fine-tuning stage takes from its source checkpoint unless given (None = "the source's")
INHERITED = ("device_batch_size", "embedding_lr", "unembedding_lr", "matrix_lr", "weight_decay", "muon_variant",
             "grad_clip")


def inherit(config, source_config):
    """config with every INHERITED field left at None set to the source checkpoint's value (a dict, as saved in
    its meta), or to the pretraining default when the source does not say (an imported model)."""
    values = {name: source_config.get(name) for name in INHERITED if getattr(config, name) is None}
    values = {k: v if v is not None else getattr(TrainConfig, k) for k, v in values.items()}
    return dataclasses.replace(config, **values)


@dataclass(frozen=True)
class BaseTrainConfig(TrainConfig, TextData):
    model_type: str = flag("gpt", "architecture (python -m scripts.bench params lists them)")
    depth: int = flag(20, "number of layers; width = 64 * depth", POSITIVE_INT)
    max_seq_len: int = flag(2048, "context length", SEQUENCE_LEN)
    total_batch_size: int = flag(-1, "tokens per optimizer step (-1: 524288 on CUDA, one micro-batch elsewhere)",
                                 AUTO_OR_POSITIVE_INT)
    target_flops: float = flag(-1.0, "compute budget deciding num_iterations (-1: off)", FINITE)
    target_param_data_ratio: float = flag(20.0, "tokens per parameter (Chinchilla=20)", FINITE)
    eval_tokens: int = flag(-1, "validation tokens (-1: 20*524288 on CUDA, 16 batches elsewhere)",
                            AUTO_OR_POSITIVE_INT)
    core_metric_every: int = flag(-1, "CORE metric every N steps and at the end (-1 = off; scripts.base_eval runs it "
                                  "afterwards)", AUTO_OR_POSITIVE_INT)
    core_metric_max_per_task: int = flag(500, "examples per CORE task in training", AUTO_OR_POSITIVE_INT)
    sample_every: int = flag(2000, "print samples every N steps (-1 = end only)", AUTO_OR_POSITIVE_INT)
    dry_run: bool = flag(False, "print parameter counts, FLOPs, batch plan and a memory estimate, then exit")
    # any config field of any registered architecture, as a flag of its own (nanochat/cli.py): {field: value}
    model: dict = field(default_factory=dict, metadata=dict(help="architecture overrides", architecture=True))

    def __post_init__(self):
        if self.model_type not in model_types():
            raise ConfigError(f"--model_type={self.model_type!r} is not known; valid: {', '.join(model_types())}")
        super().__post_init__()
        from nanochat.models import config_from_depth

        try:  # every architecture flag is checked before any work (data, tokenizer); the vocabulary comes later
            config_from_depth(self.model_type, self.depth, self.max_seq_len, 256, **self.model)
        except ValueError as e:
            raise ConfigError(str(e)) from None


# -----------------------------------------------------------------------------
# Fine-tuning: mid-training and SFT start from a checkpoint and inherit its settings


@dataclass(frozen=True)
class FinetuneConfig(TrainConfig):
    source: str | None = flag(None, "stage of the checkpoint to start from", short="-i", choices=STAGES)
    model_step: int | None = flag(None, "step of the source checkpoint (default: the last)", NON_NEGATIVE_INT)
    model_type: str | None = flag(None, "check that the source holds this architecture", choices=model_types)
    max_seq_len: int | None = flag(None, "tokens per row (default: the model's context)", SEQUENCE_LEN)
    num_epochs: float = flag(1.0, "passes over the training data (--num_iterations, when given, is the step budget "
                             "instead)", POSITIVE)
    eval_steps: int | None = flag(None, "held-out batches per evaluation (default: 100 on CUDA, 16 elsewhere)",
                                  POSITIVE_INT)
    chat_data: str = flag("auto", "hub: nanochat's mixture from $NANOCHAT_HF_DIR; embedded: the generated offline "
                          "one", choices=CHAT_DATA)
    # inherited from the source checkpoint unless given (INHERITED)
    device_batch_size: int | None = flag(None, "sequences per device per micro-step (default: the source's)",
                                         POSITIVE_INT)
    embedding_lr: float | None = flag(None, "AdamW learning rate of the token embedding (default: the source's)",
                                      NON_NEGATIVE)
    unembedding_lr: float | None = flag(None, "AdamW learning rate of the lm_head and norm weights (default: the "
                                        "source's)", NON_NEGATIVE)
    matrix_lr: float | None = flag(None, "Muon learning rate of the matrices (default: the source's)", NON_NEGATIVE)
    weight_decay: float | None = flag(None, "AdamW weight decay (default: the source's)", NON_NEGATIVE)
    muon_variant: str | None = flag(None, "Muon variant, nanochat or classic (default: the source's)",
                                    choices=muon_variants)
    grad_clip: float | None = flag(None, "max gradient norm, 0 = off (default: the source's)", NON_NEGATIVE)
    matrix_weight_decay: float = flag(0.0, "Muon's weight decay of the matrices (-1: the --muon_variant's rule; "
                                      "fine-tuning does not decay them, as nanochat)", AUTO_OR_NON_NEGATIVE)


@dataclass(frozen=True)
class MidConfig(FinetuneConfig, ChatData):
    total_batch_size: int = flag(-1, "tokens per optimizer step (-1: 524288 on CUDA, one micro-batch elsewhere)",
                                 AUTO_OR_POSITIVE_INT)
    init_lr_frac: float = flag(1.0, "every learning rate is multiplied by this at the start", NON_NEGATIVE)
    warmdown_ratio: float = flag(0.2, "fraction of the steps at the end with a linear warmdown", FRACTION)
    eval_every: int = flag(150, "evaluate every N steps (-1 = only at the start and the end)", AUTO_OR_POSITIVE_INT)


@dataclass(frozen=True)
class SFTConfig(FinetuneConfig, ChatData):
    examples_per_step: int | None = flag(None, "conversations per optimizer step (default: 32 on CUDA, one "
                                         "micro-batch elsewhere)", POSITIVE_INT)
    init_lr_frac: float = flag(0.02, "every learning rate is multiplied by this at the start", NON_NEGATIVE)
    warmdown_ratio: float = flag(1.0, "fraction of the steps at the end with a linear warmdown", FRACTION)
    eval_every: int = flag(100, "evaluate every N steps (-1 = only at the start and the end)", AUTO_OR_POSITIVE_INT)


@dataclass(frozen=True)
class RLConfig(FinetuneConfig):
    source: str = flag("sft", "stage to start from", short="-i", choices=STAGES)
    examples_per_step: int = flag(16, "prompts per optimizer step (all ranks)", POSITIVE_INT)
    num_samples: int = flag(16, "answers sampled per prompt (k)", POSITIVE_INT)
    max_new_tokens: int = flag(256, "longest sampled answer", POSITIVE_INT)
    temperature: float = flag(1.0, "sampling temperature", NON_NEGATIVE)
    top_k: int = flag(50, "sample among the k most likely tokens", NON_NEGATIVE_INT)
    eval_examples: int = flag(400, "held-out problems per pass@k evaluation", POSITIVE_INT)
    device_batch_size: int = flag(8, "prompts sampled together, and rows per forward pass of the policy update",
                                  POSITIVE_INT)
    init_lr_frac: float = flag(0.05, "every learning rate is multiplied by this at the start", NON_NEGATIVE)
    warmdown_ratio: float = flag(1.0, "fraction of the steps at the end with a linear warmdown", FRACTION)
    eval_every: int = flag(60, "pass@k every N steps (-1 = only at the start and the end)", AUTO_OR_POSITIVE_INT)
    save_every: int = flag(60, "checkpoint every N steps (-1 = only at the end)", AUTO_OR_POSITIVE_INT)
    muon_momentum_warmup: int = flag(0, "steps over which Muon's momentum ramps from 0.85 to 0.95 (0: 0.95 from the "
                                     "start, as nanochat's RL)", NON_NEGATIVE_INT)
    chat_data: str = flag("auto", "hub: GSM8K from $NANOCHAT_HF_DIR; embedded: the generated arithmetic problems",
                          choices=CHAT_DATA)
