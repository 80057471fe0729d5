"""
The documented limits on what a file, a flag or a client may declare (docs/reliability.md, "Limits"). Plain
constants and checks with no dependencies, so that the configs, the models and the file readers share them.
"""

import math
import unicodedata

# Architecture sizes, from flags, a checkpoint's meta or a transformers config.json. Every int field of a registered
# architecture's config is a size: those named here have their own limit, any other one is at most MAX_WIDTH.
MAX_SEQUENCE_LEN = 1 << 17  # 131,072 positions: the longest context (flag --max_seq_len, meta, max_position_embeddings)
MAX_LAYERS = 1024
MAX_HEADS = 1 << 12  # 4,096 query or key/value heads
MAX_VOCAB = 1 << 21  # 2,097,152 tokens
MAX_WIDTH = 1 << 17  # n_embd, MLP widths, head_dim and any other int field of an architecture
SIZE_LIMITS = {"sequence_len": MAX_SEQUENCE_LEN, "n_layer": MAX_LAYERS, "n_head": MAX_HEADS, "n_kv_head": MAX_HEADS,
               "vocab_size": MAX_VOCAB}
# Rotary tables are computed for this many positions at most when a model is built; positions beyond (up to 10x the
# context) are computed when first needed: 32 MiB at head_dim 128
ROTARY_PRECOMPUTED = 1 << 16

# Files read whole into memory
MAX_JSON_BYTES = 64 << 20  # meta_*.json, tokenizer.json, config.json, index files, markers
MAX_NAME_CHARS = 200  # a checkpoint tag or tag prefix


def size_limit(name):
    return SIZE_LIMITS.get(name, MAX_WIDTH)


def size_problem(name, value):
    """Why `value` is not an acceptable size for the architecture field `name` (None when it is)."""
    if isinstance(value, int) and not isinstance(value, bool) and value > size_limit(name):
        return f"{name}={value:,} is larger than {size_limit(name):,}, the most nanochat accepts"
    return None


def float_problem(name, value):
    """Why `value` is not an acceptable value of the float field `name` (None when it is)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"{name}={value!r} is not a number"
    if not math.isfinite(value):
        return f"{name}={value!r} is not a finite number"
    return None


def name_problem(value):
    """Why `value` cannot be a checkpoint tag (a folder name under $NANOCHAT_BASE_DIR), None when it can: a name,
    not a path: no '/', '\\', '..' or control characters, not '.', not empty, at most MAX_NAME_CHARS characters."""
    if not isinstance(value, str) or not value:
        return "it is empty"
    if len(value) > MAX_NAME_CHARS:
        return f"it is longer than {MAX_NAME_CHARS} characters"
    if "/" in value or "\\" in value:
        return "it holds a path separator"
    if value in (".", "..") or ".." in value:
        return "it holds '..'"
    if any(unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp") for c in value):
        return "it holds a control character"
    return None
