"""
Fine-tune a model on conversations. Supervised fine-tuning and mid-training are one script with two stages:
    python -m scripts.mid_train --model_tag=alcoholic_d4    # base -> mid_checkpoints/alcoholic_d4
    python -m scripts.chat_sft --model_tag=alcoholic_d4     # mid (or base) -> chatsft_checkpoints/alcoholic_d4
    torchrun --standalone --nproc_per_node=8 -m scripts.chat_sft -- --model_tag=gpt_d20

They differ only in the data and the defaults:
- mid: the mid-training mixture, whole conversations packed into BOS-aligned rows; every token is learned;
  nanochat's base learning rates with a warmdown over the last 20%.
- sft: the SFT mixture, one conversation per row, padded; only the assistant's tokens are learned (tool outputs
  and the user's turns are not); 2% of the base learning rates, decaying linearly to 0.
The model type, the architecture and (unless given) the batch size and learning rates come from the source
checkpoint; the loop, checkpoints, resume and DDP are base_train's (nanochat.trainer).
"""

import argparse
import math
import random

from nanochat.checkpoint import SOURCE_DIRS, find_largest_model_tag, list_model_tags, load_model
from nanochat.cli import auto_or_positive_int, non_negative_int, parse_args, positive_float, positive_int, run_cli
from nanochat.dataloader import PackedConversationLoader, PaddedConversationLoader
from nanochat.dist import compute_init
from nanochat.log import UserError, print0
from nanochat.loss_eval import evaluate_loss
from nanochat.plan import batch_plan
from nanochat.report import get_report
from nanochat.tokenizer import get_tokenizer
from nanochat.trainer import add_train_args, check_args, inherit_args, resume_from, run_stage, train
from tasks import mixtures

STAGES = {
    "mid": dict(script="mid_train", source="base", mixture=mixtures.mid_mixture, loader=PackedConversationLoader,
                defaults=dict(init_lr_frac=1.0, warmdown_ratio=0.2, eval_every=150)),
    "sft": dict(script="chat_sft", source="mid", mixture=mixtures.sft_mixture, loader=PaddedConversationLoader,
                defaults=dict(init_lr_frac=0.02, warmdown_ratio=1.0, eval_every=100)),
}


def build_parser(stage):
    spec = STAGES[stage]
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-i", "--source", default=None, choices=list(SOURCE_DIRS),
                   help=f"stage of the checkpoint to start from (default: {spec['source']}"
                        + (", or base when there is no mid checkpoint of this tag)" if stage == "sft" else ")"))
    p.add_argument("--model_step", type=non_negative_int, default=None,
                   help="step of the source checkpoint (default: the last)")
    p.add_argument("--model_type", default=None, help="check that the source holds this architecture")
    p.add_argument("--max_seq_len", type=positive_int, default=None,
                   help="tokens per row (default: the model's context)")
    p.add_argument("--num_epochs", type=positive_float, default=1.0, help="passes over the training mixture "
                   "(--num_iterations, when given, is the step budget instead)")
    if stage == "mid":
        p.add_argument("--total_batch_size", type=auto_or_positive_int, default=-1,
                       help="tokens per optimizer step (-1: 524288 on CUDA, one micro-batch elsewhere)")
    else:
        p.add_argument("--examples_per_step", type=positive_int, default=None,
                       help="conversations per optimizer step (default: 32 on CUDA, one micro-batch elsewhere)")
    p.add_argument("--eval_steps", type=positive_int, default=None, help="held-out batches per evaluation "
                   "(default: 100 on CUDA, 16 elsewhere)")
    p.add_argument("--chat_data", default="auto", choices=mixtures.SOURCES,
                   help="hub: nanochat's mixture from $NANOCHAT_HF_DIR; embedded: the generated offline one")
    add_train_args(p, inherit=True, **spec["defaults"])
    return p


def resolve_source(args, stage):
    if args.source is not None:
        return args.source
    default = STAGES[stage]["source"]
    if stage == "sft" and args.model_tag and args.model_tag not in list_model_tags("mid"):
        print0(f"no mid checkpoint {args.model_tag!r}: fine-tuning the base model instead")
        return "base"
    return default


def epoch_tokens(task, tokenizer, row_tokens, sample=2000):
    """Tokens in one epoch of packed rows, estimated from a fixed sample of conversations (each at most one row)."""
    idx = random.Random(0).sample(range(len(task)), min(sample, len(task)))
    lengths = [min(len(tokenizer.render_conversation(task[i], max_tokens=None)[0]), row_tokens) for i in idx]
    return len(task) * sum(lengths) / len(lengths)


def run(args, stage):
    spec = STAGES[stage]
    check_args(args)
    ddp, rank, _, world_size, device = compute_init(args.device_type, seed=args.seed)
    source = resolve_source(args, stage)
    if source == {"mid": "mid", "sft": "sft"}[stage]:
        raise UserError(f"--source={source}: {spec['script']} writes {source} checkpoints; start from an earlier stage")
    model_tag = args.model_tag or find_largest_model_tag(source, args.model_type)
    args.model_tag = model_tag

    resume = None
    if args.resume:  # the stage's own latest checkpoint; its meta holds the values the interrupted run resolved
        model, resume = resume_from(stage, model_tag, device, get_tokenizer(), model_type=args.model_type)
        tokenizer, lineage = get_tokenizer(), resume.meta["lineage"]
        inherit_args(args, resume.meta)
    else:
        model, tokenizer, source_meta = load_model(source, device, phase="train", model_tag=model_tag,
                                                   step=args.model_step, model_type=args.model_type)
        lineage = source_meta.get("lineage", []) + [{"source": source, "model_tag": model_tag,
                                                     "step": source_meta["step"]}]
        inherit_args(args, source_meta)
    args.max_seq_len = args.max_seq_len or model.config.sequence_len
    B, T = args.device_batch_size, args.max_seq_len

    train_task = spec["mixture"]("train", source=args.chat_data, seed=args.seed)
    val_task = spec["mixture"]("val", source=args.chat_data, seed=args.seed)
    print0(f"{stage} data: {mixtures.describe(train_task)}")
    if stage == "mid":
        tokens_per_step, grad_accum, note = batch_plan(args, device.type, world_size)
        per_epoch = epoch_tokens(train_task, tokenizer, T + 1) / tokens_per_step
        unit = f"{tokens_per_step:,} tokens"
    else:
        examples = args.examples_per_step or (32 if device.type == "cuda" else B * world_size)
        if examples % (B * world_size):
            raise UserError(f"--examples_per_step={examples} is not a multiple of device_batch_size * world_size = "
                            f"{B * world_size}")
        grad_accum, tokens_per_step = examples // (B * world_size), None
        per_epoch, unit, note = len(train_task) / examples, f"{examples} conversations", ""
    num_iterations = args.num_iterations if args.num_iterations > 0 else max(1, math.ceil(args.num_epochs * per_epoch))
    if note:
        print0(note)
    print0(f"{spec['script']}: {model.model_type} {model_tag} from {lineage[-1]['source']} step {lineage[-1]['step']}; "
           f"{num_iterations:,} steps of {unit} ({B} x {T} x {world_size} ranks x {grad_accum} accumulation), "
           f"{num_iterations / per_epoch:.2f} epochs")

    loader = spec["loader"](train_task, tokenizer, B, T, device=device)
    eval_steps = args.eval_steps or (100 if device.type == "cuda" else 16)

    def evaluate(model, step):
        val_loader = spec["loader"](val_task, tokenizer, B, T, device=device)
        loss = evaluate_loss(model, val_loader, eval_steps)
        print0(f"step {step:05d} | held-out loss {loss:.4f}")
        return {"val_loss": loss}

    meta = {"train_args": vars(args), "tokenizer_hash": tokenizer.hash, "lineage": lineage,
            "chat_data": mixtures.describe(train_task)}
    results = train(args, model, loader, source=stage, model_tag=model_tag, num_iterations=num_iterations,
                    grad_accum=grad_accum, meta=meta, script=spec["script"], evaluate=evaluate, resume=resume,
                    compile_dynamic=stage == "sft", tokens_per_step=tokens_per_step)
    get_report().log(section={"mid": "Midtraining", "sft": "Chat SFT"}[stage], data=[{"model_tag": model_tag},
                     {"mixture": meta["chat_data"]}, vars(args), results])
    return results


def main(argv=None, stage="sft"):
    args = parse_args(build_parser(stage), argv)
    return run_stage(lambda a: run(a, stage), args)


if __name__ == "__main__":
    run_cli(main)
