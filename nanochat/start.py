"""
Where a training stage starts: its own latest checkpoint (--resume), or, for the fine-tuning stages, the checkpoint
of an earlier stage, whose settings it inherits. Pretraining from scratch needs neither (nanochat/pretrain.py).
"""

import dataclasses
from dataclasses import dataclass

from nanochat.checkpoint import (
    CheckpointError,
    checkpoint_dir,
    find_largest_model_tag,
    find_last_step,
    list_model_tags,
    load_model,
    load_model_from_dir,
    load_rank_state,
    rank_state_path,
    set_rng_state,
)
from nanochat.config import inherit
from nanochat.dist import get_dist_info
from nanochat.log import UserError, one_line, print0
from nanochat.tokenizer import get_tokenizer


@dataclass
class Resume:
    """Where an interrupted run of a stage stopped: its last complete step, this rank's state and the meta."""

    step: int
    rank_state: dict
    meta: dict


def resume_from(source, model_tag, device, tokenizer, model_type=None):
    """(model, Resume) from the latest complete checkpoint of `model_tag`, to continue training."""
    ckpt_dir = checkpoint_dir(source, model_tag)
    try:
        step = find_last_step(ckpt_dir)
    except CheckpointError as e:
        raise UserError(f"--resume: {e}. Start without --resume to train from scratch.") from None
    model, meta = load_model_from_dir(ckpt_dir, device, phase="train", step=step, model_type=model_type,
                                      tokenizer=tokenizer)
    _, rank, _, _ = get_dist_info()
    print0(f"Resuming {ckpt_dir} from step {step}")
    return model, Resume(step, load_rank_state(ckpt_dir, step, rank), meta)


def restore(optimizers, batches, rank_state, ckpt_dir, step, rank):
    """Put optimizers, data position and RNG back where a checkpoint left them; a rank state that loads but does not
    fit this run (another model, optimizer or loader) is a one-line error naming its file."""
    try:
        for opt, state in zip(optimizers, rank_state["optimizers"], strict=True):
            opt.load_state_dict(state)
        batches.load_state_dict(rank_state["dataloader"])
        set_rng_state(rank_state["rng"])
    except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{rank_state_path(ckpt_dir, step, rank)} does not fit this run "
                              f"({type(e).__name__}: {one_line(e)}); start without --resume") from e


def default_source(stage, model_tag):
    """mid-training starts from base; SFT from mid, or from base when this tag has no mid checkpoint."""
    if stage == "sft" and model_tag and model_tag not in list_model_tags("mid"):
        print0(f"no mid checkpoint {model_tag!r}: fine-tuning the base model instead")
        return "base"
    return {"mid": "base", "sft": "mid", "rl": "sft"}[stage]


def start_finetune(config, stage, device):
    """(model, tokenizer, lineage, resume, config) of a fine-tuning stage: the stage's own latest checkpoint with
    --resume, else the source checkpoint. The returned config has the source's settings where it left them unset,
    and its model_tag and source resolved."""
    source = config.source or default_source(stage, config.model_tag)
    if source == stage:
        raise UserError(f"--source={source}: this stage writes {source} checkpoints; start from an earlier stage")
    model_tag = config.model_tag or find_largest_model_tag(source, config.model_type)
    config = dataclasses.replace(config, source=source, model_tag=model_tag)
    tokenizer = get_tokenizer()
    if config.resume:  # its meta holds the settings the interrupted run resolved
        model, resume = resume_from(stage, model_tag, device, tokenizer, model_type=config.model_type)
        lineage, meta = resume.meta["lineage"], resume.meta
    else:
        model, tokenizer, meta = load_model(source, device, phase="train", model_tag=model_tag,
                                            step=config.model_step, model_type=config.model_type)
        lineage = meta.get("lineage", []) + [{"source": source, "model_tag": model_tag, "step": meta["step"]}]
        resume = None
    return model, tokenizer, lineage, resume, inherit(config, meta.get("train_args", {}))
