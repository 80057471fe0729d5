"""
Checkpoints that know their model type.

Layout: $NANOCHAT_BASE_DIR/{base,mid,chatsft,chatrl}_checkpoints/{model_tag}/ with, per step,
  model_{step:06d}.safetensors   weights (safe to load from strangers)
  optim_{step:06d}_rank{r}.pt    per-rank optimizer, dataloader and RNG state (for --resume)
  meta_{step:06d}.json           model_type, config, args, metrics, tokenizer hash, sha256 of the weights
Every file is written atomically, and meta is written last: a step exists only once its meta file does,
so a crash mid-save leaves the previous step as the latest complete one.

Nothing in a checkpoint runs code when loaded: weights are safetensors, meta is JSON, and the rank state is written
with torch.save and read with torch.load(weights_only=True), whose restricted unpickler accepts tensors and plain
containers and refuses anything that would run code. Format 2 kept the rank state as optim_*_rank{r}.safetensors:
its weights and meta load as before, and `python -m dev.convert_rank_state DIR` turns its rank state into .pt files
so that --resume can continue from it.
"""

import glob
import hashlib
import json
import os
import re
import warnings

import torch
import torch.distributed as dist
from safetensors import SafetensorError
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save

from nanochat.cli import non_negative_int
from nanochat.fileio import (
    atomic_write,
    atomic_write_bytes,
    get_base_dir,
    open_regular,
    read_bytes,
    read_json,
    remove_orphan_tmp_files,
)
from nanochat.limits import name_problem
from nanochat.log import UserError, one_line, print0
from nanochat.models import MODEL_TYPES, check_memory, config_from_dict, config_to_dict

FORMAT_VERSION = 3  # 3: rank state in optim_*_rank{r}.pt (torch.save); 2: in optim_*_rank{r}.safetensors
CONVERT_COMMAND = "python -m dev.convert_rank_state"  # format 2 -> 3, for --resume
SOURCE_DIRS = {"base": "base_checkpoints", "mid": "mid_checkpoints", "sft": "chatsft_checkpoints",
               "rl": "chatrl_checkpoints"}
TRAIN_COMMANDS = {"base": "python -m scripts.base_train", "mid": "python -m scripts.mid_train",
                  "sft": "python -m scripts.chat_sft", "rl": "python -m scripts.chat_rl"}


class CheckpointError(UserError):
    """A checkpoint that cannot be used as asked; the message says where, what was expected and what was found."""


def _sha256(data: bytes):
    return hashlib.sha256(data).hexdigest()


def source_dir(source):
    if source not in SOURCE_DIRS:
        raise ValueError(f"unknown checkpoint source {source!r}; valid: {', '.join(SOURCE_DIRS)}")
    return os.path.join(get_base_dir(), SOURCE_DIRS[source])


def checkpoint_dir(source, model_tag):
    """{source}_checkpoints/{model_tag}. A tag is a folder name, never a path: one that could lead elsewhere ('/',
    '..', control characters) is refused."""
    problem = name_problem(model_tag)
    if problem:
        raise CheckpointError(f"model tag {model_tag!r} is not a name ({problem}): a tag names a folder in "
                              f"{source_dir(source)}")
    return os.path.join(source_dir(source), model_tag)


def default_model_tag(model_type, depth):
    return f"{model_type}_d{depth}"


def list_steps(ckpt_dir):
    """Complete steps (those with a meta file), ascending."""
    steps = []
    for path in glob.glob(os.path.join(ckpt_dir, "meta_*.json")):
        m = re.fullmatch(r"meta_(\d+)\.json", os.path.basename(path))
        if m:
            steps.append(int(m.group(1)))
    return sorted(steps)


def find_last_step(ckpt_dir):
    steps = list_steps(ckpt_dir)
    if not steps:
        raise CheckpointError(f"no complete checkpoint (meta_*.json) in {ckpt_dir}")
    return steps[-1]


def _paths(ckpt_dir, step, rank=0):
    return (os.path.join(ckpt_dir, f"model_{step:06d}.safetensors"),
            os.path.join(ckpt_dir, f"meta_{step:06d}.json"),
            os.path.join(ckpt_dir, f"optim_{step:06d}_rank{rank}.pt"))


def rank_state_path(ckpt_dir, step, rank=0):
    """The file load_rank_state reads."""
    return _paths(ckpt_dir, step, rank)[2]


def format2_rank_state_path(ckpt_dir, step, rank=0):
    """Where a format-2 checkpoint kept the rank state (dev/convert_rank_state.py reads it)."""
    return os.path.join(ckpt_dir, f"optim_{step:06d}_rank{rank}.safetensors")


# -----------------------------------------------------------------------------
# Saving


def save_rank_state(path, state):
    """torch.save `state` (optimizer/dataloader/RNG state: tensors in plain containers) to `path`, atomically.
    A state that torch.load(weights_only=True) would refuse is a TypeError now, not a failed --resume later."""

    def write(f):
        torch.save(state, f)
        f.flush()
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(f.name)
        if unsafe:
            raise TypeError(f"a rank state may hold only tensors, plain containers and numbers, not "
                            f"{', '.join(unsafe)}: torch.load(weights_only=True) would refuse it on --resume")

    atomic_write(path, write)


def save_checkpoint(ckpt_dir, step, model, meta, rank_state=None, rank=0):
    """Write one step. `rank_state` (optimizer/dataloader/RNG state of this rank) is saved by every rank;
    weights and meta by rank 0, meta last, after every rank has finished writing."""
    os.makedirs(ckpt_dir, exist_ok=True)
    model_path, meta_path, rank_path = _paths(ckpt_dir, step, rank)
    if rank_state is not None:
        save_rank_state(rank_path, rank_state)
    if rank == 0:
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
        blob = safetensors_save(tensors, metadata={"model_type": model.model_type, "step": str(step)})
        atomic_write_bytes(model_path, blob)
    if dist.is_available() and dist.is_initialized():
        dist.barrier()  # every rank's state is on disk before the step is declared complete
    if rank == 0:
        meta = dict(meta, format_version=FORMAT_VERSION, step=step, model_type=model.model_type,
                    model_config=config_to_dict(model.config), model_sha256=_sha256(blob),
                    world_size=dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1)
        atomic_write_bytes(meta_path, json.dumps(meta, indent=2).encode())
        print0(f"saved checkpoint step {step} to {ckpt_dir}")
        # after the barrier no rank of this job is mid-write: temp files of dead processes are leftovers of a kill
        remove_orphan_tmp_files(ckpt_dir)


def record_metrics(source, model_tag, step, metrics):
    """Merge evaluation results into a checkpoint's meta file (atomically)."""
    ckpt_dir = checkpoint_dir(source, model_tag)
    step = find_last_step(ckpt_dir) if step is None else step
    _, meta_path, _ = _paths(ckpt_dir, step)
    meta = read_meta(ckpt_dir, step)
    meta.setdefault("metrics", {}).update(metrics)
    atomic_write_bytes(meta_path, json.dumps(meta, indent=2).encode())


# -----------------------------------------------------------------------------
# Loading


# Types of the meta fields that loading relies on; a meta file that breaks them is reported, not half-loaded.
META_TYPES = {"model_config": dict, "step": int, "format_version": int, "world_size": int, "model_sha256": str,
              "tokenizer_hash": str, "metrics": dict, "train_args": dict, "dataloader_state": dict}


def _type_name(value):
    return {dict: "object", list: "list", str: "string", bool: "boolean", type(None): "null"}.get(type(value),
                                                                                                   type(value).__name__)


def validate_meta(meta, meta_path):
    """Raise CheckpointError unless `meta` has the shape loading relies on (checked fields, model_config values)."""
    if not isinstance(meta, dict):
        raise CheckpointError(f"{meta_path} holds a JSON {_type_name(meta)}, expected an object with model_type and "
                              f"model_config: the file is damaged; resume or load another step")
    if meta.get("model_type") not in MODEL_TYPES:
        raise CheckpointError(f"{meta_path} names model_type={meta.get('model_type')!r}; "
                              f"this version knows {', '.join(MODEL_TYPES)}")
    if "model_config" not in meta:
        raise CheckpointError(f"{meta_path} has no model_config: the file is damaged; resume or load another step")
    for key, typ in META_TYPES.items():
        value = meta.get(key)
        if key in meta and (not isinstance(value, typ) or (typ is int and isinstance(value, bool))):
            expected = {dict: "an object", int: "an integer", str: "a string"}[typ]
            raise CheckpointError(f"{meta_path}: {key} is a {_type_name(value)} ({str(value)[:40]!r}), expected "
                                  f"{expected}: the file is damaged; resume or load another step")
    for k, v in meta["model_config"].items():
        if not isinstance(v, (int, float, str, bool, type(None))):
            raise CheckpointError(f"{meta_path}: model_config.{k} is a {_type_name(v)}, expected a number, string, "
                                  f"boolean or null: the file is damaged")
    m = re.fullmatch(r"meta_(\d+)\.json", os.path.basename(meta_path))
    if m and "step" in meta and meta["step"] != int(m.group(1)):
        raise CheckpointError(f"{meta_path} says step {meta['step']}, its file name step {int(m.group(1))}: the file "
                              f"is damaged or was renamed; resume or load another step")
    if meta.get("format_version", 1) > FORMAT_VERSION:
        raise CheckpointError(f"{meta_path} has format_version {meta['format_version']}, this version of nanochat "
                              f"reads up to {FORMAT_VERSION}: update nanochat to load it")
    return meta


def read_meta(ckpt_dir, step):
    _, meta_path, _ = _paths(ckpt_dir, step)
    return validate_meta(read_json(meta_path, error=CheckpointError), meta_path)


def load_rank_state(ckpt_dir, step, rank=0):
    """This rank's optimizer/dataloader/RNG state of a step, for --resume. Rank 0 also tidies the folder: temp
    files of killed writers and the files of incomplete steps after `step` (the resumed run writes them again).
    Never runs code from the file (see the module docstring); any damage is a CheckpointError."""
    if rank == 0:
        remove_orphan_tmp_files(ckpt_dir)
        remove_incomplete_steps(ckpt_dir, after=step)
    path = rank_state_path(ckpt_dir, step, rank)
    if not os.path.exists(path):
        old = format2_rank_state_path(ckpt_dir, step, rank)
        if os.path.exists(old):
            raise CheckpointError(f"{old}: a format-2 rank state, which this version does not resume from; convert "
                                  f"the checkpoint with `{CONVERT_COMMAND} {ckpt_dir}`, then resume")
        raise CheckpointError(f"{path} is missing: this checkpoint cannot resume rank {rank} "
                              f"(was it saved with a different number of processes?)")
    f = open_regular(path, error=CheckpointError)
    try:
        with f, warnings.catch_warnings():
            warnings.filterwarnings("ignore", "Detected pickle protocol")  # a pickle torch.save did not write
            state = torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:  # the restricted unpickler's and the zip reader's errors vary; all mean "not loadable"
        raise CheckpointError(f"{path} is not a valid rank state file ({_load_error(e)}): the file is damaged or "
                              f"was not written by nanochat; resume from another step or start without --resume"
                              ) from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} holds a {type(state).__name__}, not a rank state (a dict): resume from "
                              f"another step or start without --resume")
    return state


def _load_error(e):
    """What torch.load refused, without its advice to retry with weights_only=False (the one thing not to do)."""
    m = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\n\n|$)", str(e), re.S)
    return f"the restricted unpickler refused it: {one_line(m.group(1).split('. ')[0])}" if m else one_line(e)


def remove_incomplete_steps(ckpt_dir, after):
    """Delete model_/optim_ files of steps later than `after` that have no meta file: a save cut short."""
    complete = set(list_steps(ckpt_dir))
    removed = []
    for path in glob.glob(os.path.join(ckpt_dir, "*_*")):
        # optim_*.safetensors: the rank state of format 2, left by a save of that version cut short
        m = re.fullmatch(r"model_(\d+)\.safetensors|optim_(\d+)_rank\d+\.(?:pt|safetensors)", os.path.basename(path))
        step = int(m.group(1) or m.group(2)) if m else None
        if m and step > after and step not in complete:
            os.remove(path)
            removed.append(os.path.basename(path))
    if removed:
        print0(f"removed the files of incomplete step(s) in {ckpt_dir} (no meta file): "
               f"{', '.join(sorted(removed)[:5])}{' ...' if len(removed) > 5 else ''}")
    return removed


def load_state_dict(ckpt_dir, step, meta):
    """Read and verify the weights: size/hash mismatches and truncation are reported, never loaded."""
    model_path, _, _ = _paths(ckpt_dir, step)
    blob = read_bytes(model_path, error=CheckpointError)
    expected = meta.get("model_sha256")
    if expected and _sha256(blob) != expected:
        raise CheckpointError(f"weights file {model_path} is corrupted or truncated: sha256 {_sha256(blob)[:16]}... "
                              f"does not match {expected[:16]}... recorded in its meta file")
    try:
        state_dict = safetensors_load(blob)
    except (SafetensorError, ValueError) as e:
        raise CheckpointError(f"weights file {model_path} is not a valid safetensors file: {one_line(e)}") from None
    bad = [k for k, v in state_dict.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise CheckpointError(f"weights file {model_path} holds NaN/inf values in {', '.join(bad[:3])}"
                              f"{' ...' if len(bad) > 3 else ''}: a model that cannot compute anything; load another "
                              f"step")
    return state_dict


def build_model_from_meta(ckpt_dir, meta, state_dict, device):
    model_type = meta["model_type"]
    try:
        config = config_from_dict(model_type, meta["model_config"])
        with torch.device("meta"):
            model = MODEL_TYPES[model_type].model_cls(config)
    except (TypeError, ValueError, RuntimeError) as e:  # e.g. a width of "abc" or -1 in a damaged meta file
        raise CheckpointError(f"model_config in {ckpt_dir} is not a valid {model_type} config: {one_line(e)}") from e
    expected, found = set(model.state_dict().keys()), set(state_dict.keys())
    if expected != found:
        missing, unexpected = sorted(expected - found), sorted(found - expected)
        raise CheckpointError(f"weights in {ckpt_dir} do not match a {model_type} model with its config: "
                              f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                              f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")
    for k, v in model.state_dict().items():
        if v.shape != state_dict[k].shape:
            raise CheckpointError(f"{k} in {ckpt_dir}: expected shape {tuple(v.shape)} from the config, "
                                  f"found {tuple(state_dict[k].shape)}")
    try:
        check_memory(model, device)
    except UserError as e:
        raise CheckpointError(f"cannot load {ckpt_dir}: {e}") from None
    model.to_empty(device=device)
    model.init_weights()  # also sets non-persistent buffers (rotary tables)
    model.load_state_dict(state_dict, strict=True, assign=False)
    return model


def check_model_type(ckpt_dir, meta, model_type):
    if model_type is not None and model_type != meta["model_type"]:
        raise CheckpointError(
            f"checkpoint {ckpt_dir} holds a '{meta['model_type']}' model, but --model_type={model_type} was given. "
            f"Use --model_type={meta['model_type']} or leave --model_type out (it is read from the checkpoint).")


def check_tokenizer(ckpt_dir, meta, tokenizer):
    expected = meta.get("tokenizer_hash")
    if expected and tokenizer.hash != expected:
        raise CheckpointError(
            f"checkpoint {ckpt_dir} was trained with tokenizer {expected[:12]}, but the tokenizer in "
            f"{os.path.join(get_base_dir(), 'tokenizer')} is {tokenizer.hash[:12]}. Restore the original tokenizer "
            f"or retrain the model with this one.")


def list_model_tags(source, model_type=None):
    """Tags under a source that hold at least one complete step (optionally of one model type)."""
    root = source_dir(source)
    tags = []
    for tag in sorted(os.listdir(root)) if os.path.isdir(root) else []:
        steps = list_steps(os.path.join(root, tag))
        if not steps:
            continue
        try:
            meta = read_meta(os.path.join(root, tag), steps[-1])
        except CheckpointError as e:  # one damaged folder must not hide the others; loading it names the damage
            print0(f"skipping checkpoint folder {tag}: {e}")
            continue
        if model_type is not None and meta["model_type"] != model_type:
            continue
        tags.append(tag)
    return tags


def add_checkpoint_args(parser, default_source=None, several_tags=False):
    """The flags of every script that loads a checkpoint: -i/--source, -g/--model_tag, --model_type, -s/--step."""
    source_help = "checkpoint stage" + ("" if default_source else "; None = the most trained (rl > sft > mid > base)")
    parser.add_argument("-i", "--source", default=default_source, choices=list(SOURCE_DIRS), help=source_help)
    parser.add_argument("-g", "--model_tag", default=None, action="append" if several_tags else "store",
                        help="checkpoint folder, e.g. gpt_d4" + ("; repeat to use several" if several_tags else "")
                             + "; None = the largest")
    parser.add_argument("--model_type", default=None, choices=list(MODEL_TYPES),
                        help="with no --model_tag, the largest checkpoint of this type; always checked on load")
    parser.add_argument("-s", "--step", type=non_negative_int, default=None, help="checkpoint step; None = the last")


def resolve_source(source, model_type=None):
    """An explicit source is kept; None picks the most trained stage that has a checkpoint (rl > sft > mid > base),
    so `python -m scripts.chat_eval -a HumanEval` works right after pretraining too."""
    if source is not None:
        return source
    for candidate in ("rl", "sft", "mid", "base"):
        if list_model_tags(candidate, model_type):
            print0(f"no -i/--source given: using the {candidate!r} checkpoints, the most trained stage found")
            return candidate
    raise CheckpointError(f"no checkpoints under {get_base_dir()}; train one first: "
                          f"python -m scripts.base_train --model_type={model_type or 'gpt'}")


def find_largest_model_tag(source, model_type=None):
    """The tag whose latest step has the most layers (ties: the most recently written)."""
    tags = list_model_tags(source, model_type)
    if not tags:
        what = f"{model_type} " if model_type else ""
        raise CheckpointError(f"no {what}checkpoint in {source_dir(source)}; train one first: "
                              f"{TRAIN_COMMANDS[source]} --model_type={model_type or 'gpt'}")

    def key(tag):
        d = checkpoint_dir(source, tag)
        step = find_last_step(d)
        return read_meta(d, step)["model_config"].get("n_layer", 0), os.path.getmtime(_paths(d, step)[1])

    return max(tags, key=key)


def load_model_from_dir(ckpt_dir, device, phase="eval", step=None, model_type=None, tokenizer=None):
    step = find_last_step(ckpt_dir) if step is None else step
    meta = read_meta(ckpt_dir, step)
    check_model_type(ckpt_dir, meta, model_type)
    if tokenizer is not None:
        check_tokenizer(ckpt_dir, meta, tokenizer)
    model = build_model_from_meta(ckpt_dir, meta, load_state_dict(ckpt_dir, step, meta), device)
    model.train(phase == "train")
    return model, meta


def load_model(source, device=None, phase="eval", model_tag=None, step=None, model_type=None):
    """Load (model, tokenizer, meta) of a source ("base", "mid", "sft", "rl"). The model class comes from the
    checkpoint's metadata; model_tag defaults to the largest checkpoint (of model_type, when given)."""
    from nanochat.tokenizer import get_tokenizer

    device = torch.device("cpu") if device is None else torch.device(device)
    if model_tag is None:
        model_tag = find_largest_model_tag(source, model_type)
    ckpt_dir = checkpoint_dir(source, model_tag)
    if not list_steps(ckpt_dir):
        available = list_model_tags(source)
        raise CheckpointError(f"no checkpoint {ckpt_dir}; available under {source_dir(source)}: "
                              f"{', '.join(available) or 'none'}. Train one: {TRAIN_COMMANDS[source]}")
    tokenizer = get_tokenizer()
    model, meta = load_model_from_dir(ckpt_dir, device, phase, step, model_type, tokenizer)
    meta = dict(meta, model_tag=model_tag, checkpoint_dir=ckpt_dir)
    return model, tokenizer, meta


# -----------------------------------------------------------------------------
# Random number generators: part of every rank's state, so a resumed run draws the same numbers


def get_rng_state():
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
