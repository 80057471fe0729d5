"""
Model registry: the only place that knows which architectures exist. Training, evaluation and inference ask
it for a config and a model by model_type and never import a concrete model.
Adding an architecture = one file with a config dataclass, a BaseLM subclass, config_from_depth and its ModelSpec
(presets, the MLP width field, advice and, to export to transformers, an HFMapping), plus one line in MODEL_TYPES;
tests/test_third_architecture.py shows it.
Nothing reads MODEL_TYPES at import time: flags, choices and lists are built from it when they are needed.
"""

import dataclasses
import itertools

import torch

from nanochat.dist import available_memory
from nanochat.engine import KVCache
from nanochat.limits import float_problem, size_problem
from nanochat.log import UserError
from nanochat.models import alcoholic, gpt
from nanochat.models.base import BaseLM
from nanochat.models.spec import ModelSpec

MODEL_TYPES = {
    "gpt": gpt.SPEC,
    "alcoholic": alcoholic.SPEC,
}

# Knobs that config_from_depth understands beyond the config fields (GPT has no head_dim field: it sets n_head)
DEPTH_KNOBS = ("head_dim",)
# Config fields that come from elsewhere: --max_seq_len, the tokenizer, --depth
DERIVED_FIELDS = ("sequence_len", "vocab_size", "n_layer")


class ModelTooLarge(UserError, ValueError):
    """A model whose weights would not fit in the memory available: refused before any of it is allocated."""


def check_values(model_type, values):
    """Raise ValueError unless every value of a {field: value} mapping of model_type's config is within nanochat's
    limits (nanochat/limits.py), whatever the architecture: a float field holds a finite number, an int field (a size)
    is no larger than its limit. Checked before the config is made, so that no check of its own (nor anything built
    from it) ever sees a value past the limits."""
    fields = {f.name: f for f in dataclasses.fields(get_model_spec(model_type).config_cls)}
    for name, value in values.items():
        f = fields.get(name)
        annotation = "" if f is None else f.type if isinstance(f.type, str) else f"{getattr(f.type, '__name__', '')} " \
                                                                                 f"{f.type}"
        is_float = "float" in annotation or isinstance(value, float)
        problem = float_problem(name, value) if is_float else size_problem(name, value)
        if problem is not None:
            raise ValueError(f"{model_type} config: {problem}")


def check_config(model_type, config):
    """check_values of every field of `config`. The registry applies it to every config it builds or is given, from
    flags, code, a checkpoint's meta or a transformers config."""
    check_values(model_type, {f.name: getattr(config, f.name) for f in dataclasses.fields(config)})
    return config


def check_memory(model, device):
    """Raise ModelTooLarge when the weights and buffers of `model` (built on the meta device) need more memory than
    `device` has available, before they are allocated (dist.available_memory; unknown: not checked)."""
    need = sum(t.numel() * t.element_size() for t in itertools.chain(model.parameters(), model.buffers()))
    free = available_memory(device)
    if free is not None and need > free:
        raise ModelTooLarge(f"this {model.model_type} model needs {need / 2**30:,.1f} GiB for its weights alone, "
                            f"more than the {free / 2**30:,.1f} GiB available on {device}: pick a smaller "
                            f"configuration")


def get_model_spec(model_type):
    if model_type not in MODEL_TYPES:
        raise ValueError(f"unknown model_type {model_type!r}; valid types: {', '.join(MODEL_TYPES)}")
    return MODEL_TYPES[model_type]


def config_fields(model_type):
    return [f.name for f in dataclasses.fields(get_model_spec(model_type).config_cls)]


def presets():
    """Every named config of every architecture: {"gpt/guide_d20": (model_type, config), ...}."""
    return {f"{t}/{name}": (t, config) for t, spec in MODEL_TYPES.items() for name, config in spec.presets.items()}


def architecture_fields():
    """{name: (type, help, [model types])} of every config field of every registered architecture, the flags that
    nanochat/cli.py makes: the fields that come from elsewhere (DERIVED_FIELDS) left out, DEPTH_KNOBS added."""
    out = {name: (int, "channels per head (default 128): n_head = n_embd / head_dim", list(MODEL_TYPES))
           for name in DEPTH_KNOBS}
    for model_type, spec in MODEL_TYPES.items():
        for f in dataclasses.fields(spec.config_cls):
            if f.name in DERIVED_FIELDS:
                continue
            typ, help, owners = out.setdefault(f.name, (f.type, f.metadata.get("help", ""), []))
            if model_type not in owners:
                owners.append(model_type)
    return out


def overrides_for(model_type, overrides):
    """The overrides (a {field: value} dict) that model_type understands: a run's flags applied to another type
    (the dry run's comparison, scripts.compare's arms)."""
    valid = set(config_fields(model_type)) | set(DEPTH_KNOBS)
    return {k: v for k, v in overrides.items() if k in valid}


def config_from_depth(model_type, depth, max_seq_len, vocab_size, **overrides):
    """
    The config of a model of `depth` layers (nanochat's scaling): n_embd = 64 * depth, heads of ~head_dim=128
    channels; gpt: n_kv_head = n_head; alcoholic: n_kv_head ~ n_head / 2, intermediate_size = 4 * n_embd.
    Overrides set any config field (None values are ignored, so unset command-line flags can be passed as is);
    fields derived from an overridden one follow it (e.g. n_embd -> n_head and intermediate_size).
    """
    spec = get_model_spec(model_type)
    overrides = {k: v for k, v in overrides.items() if v is not None}
    valid = config_fields(model_type) + [k for k in DEPTH_KNOBS if k not in config_fields(model_type)]
    unknown = [k for k in overrides if k not in valid]
    if unknown:
        raise ValueError(f"unknown override {unknown[0]!r} for model_type {model_type!r}; valid fields: "
                         f"{', '.join(valid)}")
    if not isinstance(depth, int) or depth <= 0:
        raise ValueError(f"depth must be a positive int, got {depth!r}")
    check_values(model_type, {"n_layer": depth, "sequence_len": max_seq_len, "vocab_size": vocab_size, **overrides})
    return check_config(model_type, spec.config_from_depth(depth, max_seq_len, vocab_size, **overrides))


def build_model(model_type, config, device="cpu"):
    """Build on the meta device (no memory, no init cost), check that it fits (check_memory), allocate on `device`,
    then init_weights()."""
    spec = get_model_spec(model_type)
    if not isinstance(config, spec.config_cls):
        raise TypeError(f"model_type {model_type!r} needs a {spec.config_cls.__name__}, "
                        f"got a {type(config).__name__}")
    check_config(model_type, config)
    with torch.device("meta"):
        model = spec.model_cls(config)
    check_memory(model, device)
    model.to_empty(device=device)
    model.init_weights()
    return model


def config_to_dict(config):
    return dataclasses.asdict(config)


def config_from_dict(model_type, d):
    fields = config_fields(model_type)
    unknown = [k for k in d if k not in fields]
    if unknown:
        raise ValueError(f"config for model_type {model_type!r} has unknown keys {unknown}; valid fields: "
                         f"{', '.join(fields)} (was it saved by a model of another type?)")
    check_values(model_type, d)
    return check_config(model_type, get_model_spec(model_type).config_cls(**d))


__all__ = ["MODEL_TYPES", "ModelSpec", "BaseLM", "KVCache", "get_model_spec", "config_fields", "config_from_depth",
           "build_model", "config_to_dict", "config_from_dict", "presets", "architecture_fields", "overrides_for",
           "check_config", "check_values", "check_memory", "ModelTooLarge"]
