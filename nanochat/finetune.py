"""
Fine-tuning on conversations: mid-training and supervised fine-tuning (scripts/mid_train.py, scripts/chat_sft.py).
They differ only in the data and the defaults (nanochat/config.py: MidConfig, SFTConfig):
- mid: the mid-training mixture, whole conversations packed into BOS-aligned rows; every token is learned;
  nanochat's base learning rates with a warmdown over the last 20%.
- sft: the SFT mixture, one conversation per row, padded; only the assistant's tokens are learned (tool outputs
  and the user's turns are not); 2% of the base learning rates, decaying linearly to 0.
The model type, the architecture and (unless given) the batch size and learning rates come from the source
checkpoint (nanochat/start.py); the loop, checkpoints, resume and DDP are the trainer's.
"""

import dataclasses
import math
import random

from nanochat.dataloader import PackedConversationLoader, PaddedConversationLoader
from nanochat.dist import compute_init
from nanochat.log import UserError, print0
from nanochat.loss_eval import evaluate_loss
from nanochat.plan import batch_plan
from nanochat.report import get_report
from nanochat.start import start_finetune
from nanochat.trainer import LoaderBatches, Stage, train
from tasks import mixtures

STAGES = {
    "mid": dict(script="mid_train", mixture=mixtures.mid_mixture, loader=PackedConversationLoader,
                section="Midtraining"),
    "sft": dict(script="chat_sft", mixture=mixtures.sft_mixture, loader=PaddedConversationLoader, section="Chat SFT"),
}


def epoch_tokens(task, tokenizer, row_tokens, sample=2000):
    """Tokens in one epoch of packed rows, estimated from a fixed sample of conversations (each at most one row)."""
    idx = random.Random(0).sample(range(len(task)), min(sample, len(task)))
    lengths = [min(len(tokenizer.render_conversation(task[i], max_tokens=None)[0]), row_tokens) for i in idx]
    return len(task) * sum(lengths) / len(lengths)


def step_plan(config, stage, train_task, tokenizer, device_type, world_size):
    """(grad_accum, tokens per step or None, steps per epoch, the unit of a step, a note)."""
    B = config.device_batch_size
    if stage == "mid":
        tokens_per_step, grad_accum, note = batch_plan(config, device_type, world_size)
        per_epoch = epoch_tokens(train_task, tokenizer, config.max_seq_len + 1) / tokens_per_step
        return grad_accum, tokens_per_step, per_epoch, f"{tokens_per_step:,} tokens", note
    examples = config.examples_per_step or (32 if device_type == "cuda" else B * world_size)
    if examples % (B * world_size):
        raise UserError(f"--examples_per_step={examples} is not a multiple of device_batch_size * world_size = "
                        f"{B * world_size}")
    return examples // (B * world_size), None, len(train_task) / examples, f"{examples} conversations", ""


def finetune(config, stage):
    """Mid-train (stage "mid") or fine-tune ("sft") from the source checkpoint, or --resume the stage's own."""
    spec = STAGES[stage]
    ddp, rank, _, world_size, device = compute_init(config.device_type, seed=config.seed)
    model, tokenizer, lineage, resume, config = start_finetune(config, stage, device)
    config = dataclasses.replace(config, max_seq_len=config.max_seq_len or model.config.sequence_len)
    B, T = config.device_batch_size, config.max_seq_len
    train_task = spec["mixture"]("train", source=config.chat_data, seed=config.seed)
    val_task = spec["mixture"]("val", source=config.chat_data, seed=config.seed)
    print0(f"{stage} data: {mixtures.describe(train_task)}")
    grad_accum, tokens_per_step, per_epoch, unit, note = step_plan(config, stage, train_task, tokenizer, device.type,
                                                                   world_size)
    num_iterations = config.num_iterations if config.num_iterations > 0 else \
        max(1, math.ceil(config.num_epochs * per_epoch))
    if note:
        print0(note)
    print0(f"{spec['script']}: {model.model_type} {config.model_tag} from {lineage[-1]['source']} step "
           f"{lineage[-1]['step']}; {num_iterations:,} steps of {unit} ({B} x {T} x {world_size} ranks x {grad_accum} "
           f"accumulation), {num_iterations / per_epoch:.2f} epochs")
    eval_steps = config.eval_steps or (100 if device.type == "cuda" else 16)

    def evaluate(model, step):
        loss = evaluate_loss(model, spec["loader"](val_task, tokenizer, B, T, device=device), eval_steps)
        print0(f"step {step:05d} | held-out loss {loss:.4f}")
        return {"val_loss": loss}

    meta = {"train_args": dataclasses.asdict(config), "tokenizer_hash": tokenizer.hash, "lineage": lineage,
            "chat_data": mixtures.describe(train_task)}
    batches = LoaderBatches(spec["loader"](train_task, tokenizer, B, T, device=device), grad_accum)
    results = train(config, model, Stage(stage, spec["script"], config.model_tag, num_iterations, batches, meta,
                                         evaluate, compile_dynamic=stage == "sft", tokens_per_step=tokens_per_step),
                    resume)
    get_report().log(section=spec["section"], data=[{"model_tag": config.model_tag}, {"mixture": meta["chat_data"]},
                                                    dataclasses.asdict(config), results])
    return results
