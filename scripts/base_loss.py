"""
Bits per byte of a checkpoint on the train and validation splits, plus a few samples.
    python -m scripts.base_loss --model_tag=alcoholic_d4
    torchrun --standalone --nproc_per_node=8 -m scripts.base_loss -- --model_type=gpt
"""

import argparse

from nanochat.checkpoint import add_checkpoint_args, load_model, record_metrics
from nanochat.cli import auto_or_positive_int, parse_args, positive_int, run_cli
from nanochat.dataloader import DataLoader
from nanochat.dist import autocast_ctx, compute_cleanup, compute_init
from nanochat.log import print0
from nanochat.loss_eval import evaluate_bpb
from nanochat.report import get_report
from nanochat.tokenizer import get_token_bytes
from scripts.base_train import sample


def build_parser():
    p = argparse.ArgumentParser(description="Bits per byte of a checkpoint on train/val, and samples.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_checkpoint_args(p, default_source="base")
    p.add_argument("--device_batch_size", type=positive_int, default=8)
    p.add_argument("--split_tokens", type=auto_or_positive_int, default=-1,
                   help="tokens evaluated per split (-1: 20*524288 on CUDA, 64 batches elsewhere)")
    p.add_argument("--device_type", default="")
    return p


def main(argv=None):
    args = parse_args(build_parser(), argv)
    ddp, rank, _, world_size, device = compute_init(args.device_type)
    model, tokenizer, meta = load_model(args.source, device, model_tag=args.model_tag, step=args.step,
                                        model_type=args.model_type)
    T = model.config.sequence_len
    tokens_per_batch = args.device_batch_size * T * world_size
    split_tokens = args.split_tokens if args.split_tokens > 0 else (
        20 * 524288 if device.type == "cuda" else 64 * tokens_per_batch)
    steps = max(1, split_tokens // tokens_per_batch)
    token_bytes = get_token_bytes(device=device)
    print0(f"{meta['model_type']} model {meta['model_tag']} step {meta['step']}: "
           f"{steps} batches of {tokens_per_batch:,} tokens per split")
    results = {}
    for split in ("train", "val"):
        loader = DataLoader(args.device_batch_size, T, split, tokenizer=tokenizer, device=device)
        with autocast_ctx(device.type):
            results[f"{split}_bpb"] = evaluate_bpb(model, loader, steps, token_bytes)
        print0(f"{split} bpb: {results[f'{split}_bpb']:.4f}")
    if rank == 0:
        print0("Samples:")
        with autocast_ctx(device.type):
            sample(model, tokenizer, device)
        record_metrics(args.source, meta["model_tag"], meta["step"], results)
        get_report().log(section="Base model loss", data=[{"model_tag": meta["model_tag"], "step": meta["step"],
                                                           "tokens_per_split": steps * tokens_per_batch}, results])
    compute_cleanup()
    return results


if __name__ == "__main__":
    run_cli(main)
