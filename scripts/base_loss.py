"""
Bits per byte of a checkpoint on the train and validation splits, plus a few samples.
    python -m scripts.base_loss --model_tag=alcoholic_d4
    python -m scripts.base_loss --model_tag=mine_d4 --data=other_texts/   # on other text of your own
A checkpoint trained with --data is scored on that data's held-out split unless --data says otherwise.
    torchrun --standalone --nproc_per_node=8 -m scripts.base_loss -- --model_type=gpt
"""

from nanochat.checkpoint import load_model, record_metrics
from nanochat.cli import parse, run_cli
from nanochat.config import BaseLossConfig
from nanochat.dataloader import DataLoader
from nanochat.dist import autocast_ctx, compute_cleanup, compute_init, on_rank0
from nanochat.log import print0
from nanochat.loss_eval import evaluate_bpb
from nanochat.pretrain import sample
from nanochat.report import get_report
from nanochat.tokenizer import get_token_bytes
from nanochat.userdata import checkpoint_data_dir, report_lines


def main(argv=None):
    args = parse(BaseLossConfig, argv, prog="base_loss.py", description=__doc__)
    ddp, rank, _, world_size, device = compute_init(args.device_type)
    model, tokenizer, meta = load_model(args.source, device, model_tag=args.model_tag, step=args.step,
                                        model_type=args.model_type)
    T = model.config.sequence_len
    tokens_per_batch = args.device_batch_size * T * world_size
    split_tokens = args.split_tokens if args.split_tokens > 0 else (
        20 * 524288 if device.type == "cuda" else 64 * tokens_per_batch)
    steps = max(1, split_tokens // tokens_per_batch)
    token_bytes = get_token_bytes(device=device, vocab_size=tokenizer.get_vocab_size())
    data_dir, record = on_rank0(lambda: checkpoint_data_dir(meta, args.data, args.text_field, args.val_fraction,
                                                            args.skip_bad_lines))
    print0(f"{meta['model_type']} model {meta['model_tag']} step {meta['step']}: "
           f"{steps} batches of {tokens_per_batch:,} tokens per split")
    results = {}
    for split in ("train", "val"):
        loader = DataLoader(args.device_batch_size, T, split, tokenizer=tokenizer, device=device, data_dir=data_dir)
        with autocast_ctx(device.type):
            results[f"{split}_bpb"] = evaluate_bpb(model, loader, steps, token_bytes)
        print0(f"{split} bpb: {results[f'{split}_bpb']:.4f}")
    if rank == 0:
        print0("Samples:")
        with autocast_ctx(device.type):
            sample(model, tokenizer)
        record_metrics(args.source, meta["model_tag"], meta["step"], results)
        get_report().log(section="Base model loss", data=[{"model_tag": meta["model_tag"], "step": meta["step"],
                                                           "tokens_per_split": steps * tokens_per_batch},
                                                          report_lines(record) if record else {}, results])
    compute_cleanup()
    return results


if __name__ == "__main__":
    run_cli(main)
