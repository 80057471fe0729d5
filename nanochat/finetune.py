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
import os
import random

from nanochat.dataloader import PackedConversationLoader, PaddedConversationLoader
from nanochat.dist import compute_init, on_rank0
from nanochat.log import UserError, print0, progress
from nanochat.loss_eval import evaluate_loss
from nanochat.plan import batch_plan
from nanochat.report import get_report
from nanochat.start import start_finetune
from nanochat.trainer import LoaderBatches, Stage, train
from tasks import mixtures
from tasks.common import TaskMixture
from tasks.userchat import UserConversations, data_record, parse_spec, prepare_conversations

STAGES = {
    "mid": dict(script="mid_train", mixture=mixtures.mid_mixture, loader=PackedConversationLoader,
                section="Midtraining"),
    "sft": dict(script="chat_sft", mixture=mixtures.sft_mixture, loader=PaddedConversationLoader, section="Chat SFT"),
}


def chat_tasks(config, spec, tokenizer, row_tokens):
    """(training task, {metric: held-out task}, records of --data). Without --data the built-in mixture and its
    held-out split (val_loss). With --data (tasks/userchat.py) the user's conversations, each file's seen WEIGHT times
    per epoch, replace the mixture (--mix=replace) or join it (--mix=add); val_loss is then the loss on the user's
    held-out conversations, and with add mixture_val_loss the built-in one."""

    def builtin(split):
        return spec["mixture"](split, source=config.chat_data, seed=config.seed)

    if not config.data:
        return builtin("train"), {"val_loss": builtin("val")}, []
    specs = [parse_spec(item) for item in config.data]
    prepared = on_rank0(lambda: [prepare_conversations(path, config.val_fraction, config.skip_bad_lines)
                                 for path, _ in specs])
    train, val, records = [], [], []
    for (path, weight), (directory, manifest) in zip(specs, prepared):
        name = os.path.basename(path.rstrip("/"))
        own = UserConversations(directory, manifest, "train", name)
        train += [own] * weight
        val.append(UserConversations(directory, manifest, "val", name))
        records.append(data_record(path, directory, manifest, weight))
        count_truncated(records[-1], own, tokenizer, row_tokens)
    held_out = {"val_loss": val[0] if len(val) == 1 else TaskMixture(val, seed=config.seed)}
    if config.mix == "add":
        mixture = builtin("train")
        train = list(getattr(mixture, "tasks", [mixture])) + train
        held_out["mixture_val_loss"] = builtin("val")
    return TaskMixture(train, seed=config.seed), held_out, records


def count_truncated(record, task, tokenizer, row_tokens):
    """How many training conversations of a --data file are longer than a row: the loaders keep their first
    row_tokens tokens (the end of a long answer is not learned). Counted into its record, and printed."""
    n = len(task)
    rows = progress(range(n), desc="measuring", total=n, unit="conv") if n > 20_000 else range(n)
    record["truncated"] = sum(len(tokenizer.render_conversation(task[i], max_tokens=None)[0]) > row_tokens
                              for i in rows)
    if record["truncated"]:
        print0(f"{record['path']}: {record['truncated']:,} of {n:,} training conversations are longer than a row of "
               f"{row_tokens:,} tokens and are truncated to it ({100 * record['truncated'] / n:.1f}%)")


def check_same_data(resume, records):
    """--resume continues on the conversations the run started on: its position means nothing in others."""
    had = [(r["path"], r["key"], r["weight"]) for r in resume.meta.get("own_data") or []] if resume else None
    now = [(r["path"], r["key"], r["weight"]) for r in records]
    if resume and had != now:
        raise UserError(f"--resume: this run started on --data {[h[0] for h in had] or 'none'} (content hashes "
                        f"{[h[1][:16] for h in had]}), it is now given {[n[0] for n in now] or 'none'} (content "
                        f"hashes {[n[1][:16] for n in now]}): resume with the same files, or start without --resume")


def own_report_lines(records):
    """--data in the run report: each --data's path, weight, content hash and counts, and each of its files' name,
    sha256 and conversations."""
    if not records:
        return {}
    return {"data": " | ".join(
        f"{r['path']} (x{r['weight']}, {r['conversations']:,} conversations: {r['train_conversations']:,} train, "
        f"{r['val_conversations']:,} held out, {r['truncated']:,} truncated"
        + (f", {r['bad_lines_skipped']:,} bad lines skipped" if r["bad_lines_skipped"] else "") + ")"
        for r in records),
        "data_hash": " | ".join(r["key"][:16] for r in records),
        "data_files": " | ".join("; ".join(f"{f['name']} (sha256 {f['sha256'][:12]}, {f['conversations']:,} "
                                           f"conversations)" for f in r["files"][:20]) for r in records)}


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
    train_task, held_out, records = chat_tasks(config, spec, tokenizer, T + 1)
    check_same_data(resume, records)
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
        results = {}
        for metric, task in held_out.items():  # a small held-out set is read once, not over and over
            steps = min(eval_steps, math.ceil(len(task) / (B * world_size)))
            results[metric] = evaluate_loss(model, spec["loader"](task, tokenizer, B, T, device=device), steps)
            print0(f"step {step:05d} | {'held-out loss' if metric == 'val_loss' else metric} {results[metric]:.4f}")
        return results

    meta = {"train_args": dataclasses.asdict(config), "tokenizer_hash": tokenizer.hash, "lineage": lineage,
            "chat_data": mixtures.describe(train_task), "own_data": records}
    batches = LoaderBatches(spec["loader"](train_task, tokenizer, B, T, device=device), grad_accum)
    results = train(config, model, Stage(stage, spec["script"], config.model_tag, num_iterations, batches, meta,
                                         evaluate, compile_dynamic=stage == "sft", tokens_per_step=tokens_per_step),
                    resume)
    get_report().log(section=spec["section"], data=[{"model_tag": config.model_tag}, {"mixture": meta["chat_data"]},
                                                    own_report_lines(records), dataclasses.asdict(config), results])
    return results
