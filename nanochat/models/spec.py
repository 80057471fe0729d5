"""ModelSpec: what an architecture tells the tools about itself (torchtitan's TrainSpec, for a model alone)."""

from dataclasses import dataclass, field
from typing import Callable

from nanochat.models.hf_mapping import HFMapping


@dataclass(frozen=True)
class ModelSpec:
    """Everything the tools need to know about one architecture; nothing else ever names a concrete model."""

    config_cls: type
    model_cls: type
    config_from_depth: Callable  # (depth, max_seq_len, vocab_size, **overrides) -> config
    # the config field of the MLP's hidden width, which --param_match/--flop_match adjust (None: fixed by the width)
    mlp_width_field: str | None = None
    presets: dict = field(default_factory=dict)  # named configs, e.g. the model-selection guide's d20
    memory_advice: str = ""  # printed after an out-of-memory error: why this architecture needs the memory it does
    hf: HFMapping | None = None  # how it maps onto a transformers model type (None: no export/import)
    # named variants for scripts.compare --ablate: {name: {config field: value, or a function of the config}}
    ablations: dict = field(default_factory=dict)
