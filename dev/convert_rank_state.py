"""
Convert the rank state of a format-2 checkpoint folder to the current format, so that --resume can continue from it.

    python -m dev.convert_rank_state ~/.cache/nanochat/base_checkpoints/gpt_d20

Format 2 kept each rank's optimizer, dataloader and RNG state in optim_{step:06d}_rank{r}.safetensors: the tensors,
and in the safetensors metadata the rest of the state as JSON, with tags for what JSON lacks:
    {"__tensor__": key}   the tensor stored under key     {"__tuple__": [...]}            a tuple (AdamW's betas)
    {"__float__": "nan"}  nan, inf or -inf                {"__dict__": [[key, value], ...]} a dict with non-str keys
This writes optim_{step:06d}_rank{r}.pt next to each such file (nanochat.checkpoint.save_rank_state), bit for bit
the same state, and changes nothing else: weights and meta files of format 2 load as they are. Steps that already
have their .pt are skipped. Nothing read runs code: safetensors and JSON only.
"""

import argparse
import glob
import json
import os
import re
import sys

import torch
from safetensors import SafetensorError, safe_open

from nanochat.checkpoint import CheckpointError, save_rank_state
from nanochat.cli import run_cli
from nanochat.log import one_line, print0

FORMAT, VERSION = "nanochat-rank-state", "1"  # the metadata of a format-2 rank state file
TAGS = ("__tensor__", "__tuple__", "__float__", "__dict__")


def decode(node, tensors):
    """The state that the JSON tree `node` describes, with its tensors taken from `tensors`."""
    if isinstance(node, list):
        return [decode(v, tensors) for v in node]
    if not isinstance(node, dict):
        return node
    if len(node) != 1 or next(iter(node)) not in TAGS:
        return {k: decode(v, tensors) for k, v in node.items()}
    tag, value = next(iter(node.items()))
    if tag == "__tensor__":
        if not isinstance(value, str) or value not in tensors:
            raise ValueError(f"placeholder for a tensor {value!r} that the file does not hold")
        return tensors[value]
    if tag == "__float__":
        if value not in ("nan", "inf", "-inf"):
            raise ValueError(f"__float__ must be nan, inf or -inf, got {value!r}")
        return float(value)
    if not isinstance(value, list):
        raise ValueError(f"{tag} must hold a list, got a {type(value).__name__}")
    if tag == "__tuple__":
        return tuple(decode(v, tensors) for v in value)
    if not all(isinstance(kv, list) and len(kv) == 2 for kv in value):
        raise ValueError("__dict__ must hold [key, value] pairs")
    keys = [decode(k, tensors) for k, _ in value]
    if any(isinstance(k, (dict, list, torch.Tensor)) for k in keys):
        raise ValueError("a dict key cannot be a dict, list or tensor")
    return {k: decode(v, tensors) for k, (_, v) in zip(keys, value)}


def read_format2(path):
    """The rank state in a format-2 optim_*.safetensors file. Raises CheckpointError naming the file."""
    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        if metadata.get("format") != FORMAT or metadata.get("version") != VERSION:
            raise ValueError(f"metadata format={metadata.get('format')!r} version={metadata.get('version')!r}, "
                             f"expected {FORMAT!r} version {VERSION!r}")
        return decode(json.loads(metadata.get("state", "null")), tensors)
    except (OSError, SafetensorError, ValueError, RecursionError) as e:
        raise CheckpointError(f"{path} is not a format-2 rank state file ({one_line(e)})") from None


def convert_dir(ckpt_dir):
    """Write the .pt of every format-2 rank state file in ckpt_dir that has none yet; returns the written paths."""
    paths = sorted(p for p in glob.glob(os.path.join(ckpt_dir, "optim_*_rank*.safetensors"))
                   if re.fullmatch(r"optim_\d+_rank\d+\.safetensors", os.path.basename(p)))
    if not paths:
        raise CheckpointError(f"no format-2 rank state (optim_*_rank*.safetensors) in {ckpt_dir}")
    written = []
    for path in paths:
        out = path.removesuffix(".safetensors") + ".pt"
        if os.path.exists(out):
            print0(f"{os.path.basename(out)} exists: skipped")
            continue
        save_rank_state(out, read_format2(path))
        written.append(out)
        print0(f"{os.path.basename(path)} -> {os.path.basename(out)}")
    print0(f"converted {len(written)} rank state file(s) in {ckpt_dir}; --resume can continue from them "
           f"(the .safetensors ones are no longer read and may be deleted)")
    return written


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("ckpt_dir", help="a checkpoint folder, e.g. $NANOCHAT_BASE_DIR/base_checkpoints/gpt_d20")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    return run_cli(lambda: convert_dir(args.ckpt_dir))


if __name__ == "__main__":
    main()
