"""
Pretrain a base model of any registered architecture. One process:
    python -m scripts.base_train --model_type=alcoholic --depth=4 --device_batch_size=1 --num_iterations=50
Many GPUs (or CPU processes with gloo):
    torchrun --standalone --nproc_per_node=8 -m scripts.base_train -- --model_type=gpt --depth=20
The script knows nothing of the architecture: the registry builds the model and its flags, the model builds its
optimizers, and nanochat.trainer runs the loop.
"""

import argparse
import os

import torch.distributed as dist

from nanochat.checkpoint import default_model_tag
from nanochat.cli import auto_or_positive_int, parse_args, positive_int, run_cli, str2bool
from nanochat.core_eval import evaluate_core, prepare_bundle
from nanochat.dataloader import DataLoader
from nanochat.dist import compute_init
from nanochat.fileio import get_base_dir
from nanochat.log import UserError, print0
from nanochat.loss_eval import evaluate_bpb
from nanochat.models import MODEL_TYPES, add_config_args, build_model, config_from_depth, config_overrides
from nanochat.plan import CUDA_TOTAL_BATCH, batch_plan, plan_iterations, print_dry_run
from nanochat.report import get_report
from nanochat.tokenizer import get_token_bytes
from nanochat.trainer import add_train_args, check_args, is_due, resume_from, run_stage, train


def build_parser():
    p = argparse.ArgumentParser(description="Pretrain a base model.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model_type", default="gpt", help=f"architecture: {', '.join(MODEL_TYPES)}")
    p.add_argument("--depth", type=positive_int, default=20, help="number of layers; width = 64 * depth")
    p.add_argument("--max_seq_len", type=positive_int, default=2048, help="context length")
    p.add_argument("--total_batch_size", type=auto_or_positive_int, default=-1,
                   help=f"tokens per optimizer step (-1: {CUDA_TOTAL_BATCH} on CUDA, one micro-batch elsewhere)")
    p.add_argument("--target_flops", type=float, default=-1.0, help="compute budget deciding num_iterations")
    p.add_argument("--target_param_data_ratio", type=float, default=20, help="tokens per parameter (Chinchilla=20)")
    p.add_argument("--eval_tokens", type=auto_or_positive_int, default=-1,
                   help=f"validation tokens (-1: {20 * CUDA_TOTAL_BATCH} on CUDA, 16 batches elsewhere)")
    p.add_argument("--core_metric_every", type=auto_or_positive_int, default=-1,
                   help="CORE metric every N steps and at the end (-1 = off; scripts.base_eval runs it afterwards)")
    p.add_argument("--core_metric_max_per_task", type=auto_or_positive_int, default=500,
                   help="examples per CORE task in training")
    p.add_argument("--sample_every", type=auto_or_positive_int, default=2000,
                   help="print samples every N steps (-1 = end only)")
    p.add_argument("--dry_run", type=str2bool, nargs="?", const=True, default=False,
                   help="print parameter counts, FLOPs, batch plan and a memory estimate, then exit")
    add_train_args(p)
    add_config_args(p)
    return p


# -----------------------------------------------------------------------------
# Data and tokenizer: prepared on first use so the first run needs no manual step


def ensure_data_and_tokenizer(rank):
    from nanochat import dataset
    from nanochat.tokenizer import get_tokenizer

    if rank == 0:
        data_dir = dataset.get_data_dir()  # builds the embedded corpus shards when no real shards exist
        try:
            get_tokenizer()
        except FileNotFoundError:
            if os.path.abspath(data_dir) != os.path.abspath(os.path.join(get_base_dir(), "embedded_data")):
                raise UserError(f"No tokenizer in {os.path.join(get_base_dir(), 'tokenizer')}. Train one on your "
                                f"data first: python -m scripts.tok_train --vocab_size=65536") from None
            from nanochat.tokenizer import train_tokenizer
            print0("No tokenizer found: training a 4096-token BPE tokenizer on the embedded corpus "
                        "(same as: python -m scripts.tok_train --vocab_size=4096)")
            train_tokenizer(vocab_size=4096)
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    return get_tokenizer()


def sample(model, tokenizer, device):
    prompts = ["The capital of France is", "Once upon a time", "And God said,", "It is a truth universally"]
    model.eval()
    for prompt in prompts:
        tokens = tokenizer.encode(prompt, prepend=tokenizer.get_bos_token_id())
        out = list(model.generate(tokens, max_tokens=16, temperature=0))
        print0(f"  {prompt!r} -> {tokenizer.decode(out)!r}")


def make_evaluate(args, tokenizer, device, world_size, num_iterations, start_step):
    """Validation bpb (every --eval_every), CORE (every --core_metric_every) and samples (every --sample_every),
    each also at the end."""
    token_bytes = get_token_bytes(device=device)
    micro_tokens = args.device_batch_size * args.max_seq_len * world_size
    eval_tokens = args.eval_tokens if args.eval_tokens > 0 else (
        20 * CUDA_TOTAL_BATCH if device.type == "cuda" else 16 * micro_tokens)
    eval_steps = max(1, eval_tokens // micro_tokens)
    core_bundle = None
    if args.core_metric_every > 0:
        core_bundle, note, _ = prepare_bundle()
        print0(f"CORE every {args.core_metric_every} steps on {core_bundle} ({note})")

    def due(every, step):
        return step == num_iterations or (step > start_step and is_due(every, step))

    def evaluate(model, step):
        val_loader = DataLoader(args.device_batch_size, args.max_seq_len, "val", tokenizer=tokenizer, device=device)
        results = {"val_bpb": evaluate_bpb(model, val_loader, eval_steps, token_bytes)}
        print0(f"step {step:05d} | validation bpb {results['val_bpb']:.4f}")  # cheap: at every evaluation
        if core_bundle and due(args.core_metric_every, step):
            results["core"] = evaluate_core(model, tokenizer, device, core_bundle, args.core_metric_max_per_task,
                                            progress=False)["core"]
            print0(f"step {step:05d} | CORE {results['core']:.4f}")
        if int(os.environ.get("RANK", 0)) == 0 and due(args.sample_every, step):
            print0("Samples:")
            sample(model, tokenizer, device)
        return results

    def eval_due(step):
        return any(is_due(every, step) for every in (args.eval_every, args.core_metric_every, args.sample_every))

    return evaluate, eval_due


# -----------------------------------------------------------------------------


def make_config(args, vocab_size):
    try:
        return config_from_depth(args.model_type, args.depth, args.max_seq_len, vocab_size, **config_overrides(args))
    except ValueError as e:  # a flag this type does not have, or a value its config refuses
        raise UserError(str(e)) from None


def run(args):
    check_args(args)
    if args.model_type not in MODEL_TYPES:
        raise UserError(f"--model_type={args.model_type!r} is not known; valid: {', '.join(MODEL_TYPES)}")
    make_config(args, vocab_size=256)  # every architecture flag is checked before any work (data, tokenizer)
    ddp, rank, local_rank, world_size, device = compute_init(args.device_type, seed=args.seed)
    tokenizer = ensure_data_and_tokenizer(rank)
    vocab_size = tokenizer.get_vocab_size()
    if args.dry_run:
        print_dry_run(args, vocab_size, device.type, world_size)
        return None

    # Model: fresh, or the latest complete checkpoint of this tag when resuming
    model_tag = args.model_tag or default_model_tag(args.model_type, args.depth)
    resume = None
    if args.resume:
        model, resume = resume_from("base", model_tag, device, tokenizer, model_type=args.model_type)
    else:
        model = build_model(args.model_type, make_config(args, vocab_size), device=device)

    num_params = sum(p.numel() for p in model.parameters())
    flops_per_token = model.estimate_flops()
    total_batch, grad_accum, note = batch_plan(args, device.type, world_size)
    num_iterations, why = plan_iterations(args, num_params, flops_per_token, total_batch)
    print0(f"Model: {args.model_type} {model.config}")
    print0("Parameters: " + ", ".join(f"{k}={v:,}" for k, v in model.num_params_by_group().items()))
    print0(f"FLOPs per token: {flops_per_token:.3e}")
    if note:
        print0(note)
    print0(f"Batch: {args.device_batch_size} x {args.max_seq_len} x {world_size} ranks x {grad_accum} accumulation "
           f"= {total_batch:,} tokens/step; {num_iterations:,} steps ({why}); "
           f"{total_batch * num_iterations:,} tokens, {total_batch * num_iterations / num_params:.2f} tokens/param")

    loader = DataLoader(args.device_batch_size, args.max_seq_len, "train", tokenizer=tokenizer, device=device)
    evaluate, eval_due = make_evaluate(args, tokenizer, device, world_size, num_iterations,
                                       resume.step if resume else 0)
    meta = {"train_args": vars(args), "tokenizer_hash": tokenizer.hash, "lineage": []}
    results = train(args, model, loader, source="base", model_tag=model_tag, num_iterations=num_iterations,
                    grad_accum=grad_accum, meta=meta, script="base_train", evaluate=evaluate, eval_due=eval_due,
                    resume=resume, tokens_per_step=total_batch)
    get_report().log(section="Base model training", data=[{"model_tag": model_tag, **model.num_params_by_group(),
                     "flops_per_token": flops_per_token, "tokens_per_step": total_batch}, vars(args), results])
    return results


def main(argv=None):
    return run_stage(run, parse_args(build_parser(), argv))


if __name__ == "__main__":
    run_cli(main)
