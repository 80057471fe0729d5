"""
Benchmarks, one subcommand each. Every one prints a table and writes bench_results/<name>.json (--out).

    python -m scripts.bench params    # parameter counts by group and FLOPs/token of every registered type and preset
    python -m scripts.bench data      # tokenizer training time, dataloader tok/s (--with_model: vs d4 gpt)
    python -m scripts.bench data --data=my_texts/   # ... on your own text, after timing its preparation (MB/s)
    python -m scripts.bench train     # tok/s of forward+backward and of a full optimizer step, vs transformers
    python -m scripts.bench decode    # Engine prefill and per-token time at batch 1 and 8, vs transformers generate
    python -m scripts.bench infer     # the same on a checkpoint, batch-size sweep (CUDA: bandwidth, compute, memory)
    python -m scripts.bench memory    # measured training peak memory vs the --dry_run estimate
    python -m scripts.bench scaling   # tok/s and FLOPs/token over depth, plotted

The peer of each model type is its transformers twin (NanoChatForCausalLM for gpt, Qwen3ForCausalLM for
alcoholic) holding the same weights (nanochat/hf.py). Ours and the peer take turns in one process, round after
round, so load from other processes falls on both alike; each figure is the median of --n rounds. In the JSON, a
comparison is {"ours": {...}, "peer": {...}, "ratio": {figure: ours / peer}}.
"""

import argparse

from nanochat.bench import data, decode, infer, memory, params, scaling, train
from nanochat.cli import parse_args, run_cli, str2bool


def common_args(n=5, threads=0):
    """The flags of every subcommand, as a parents= list (a fresh parser each time: subcommands differ in defaults)."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--n", type=int, default=n, help="rounds; every figure is the median of n")
    p.add_argument("--threads", type=int, default=threads, help="torch CPU threads (0: torch's default)")
    p.add_argument("--device_type", default="", help="cuda|mps|cpu (empty = autodetect)")
    p.add_argument("--out", default="bench_results", help="directory of the JSON results")
    return [p]


def shape_args(p, depth=None, batch_size=8, seq_len=256):
    if depth:
        p.add_argument("--depth", type=int, default=depth, help="config_from_depth depth of every model type")
    p.add_argument("--vocab_size", type=int, default=4096, help="vocab size (4096: the CPU quickstart's)")
    p.add_argument("--head_dim", type=int, default=None, help="head_dim override (default: the type's)")
    if batch_size:
        p.add_argument("--batch_size", type=int, default=batch_size, help="sequences per step")
        p.add_argument("--seq_len", type=int, default=seq_len, help="tokens per sequence")


def decode_args(p, batch_sizes):
    p.add_argument("--prompt_len", type=int, default=64)
    p.add_argument("--max_tokens", type=int, default=64, help="new tokens per row")
    p.add_argument("--batch_sizes", type=int, nargs="+", default=batch_sizes, help="rows decoded together")
    p.add_argument("--skip_no_cache", action="store_true", help="leave out our model without its KV cache")
    p.add_argument("--compile", type=str2bool, nargs="?", const=True, default=False,
                   help="ours with model.compile_decode() (compilation excluded: each batch size warms up first)")


def add_params(sub):
    p = sub.add_parser("params", parents=common_args(), help="parameter counts by group and FLOPs/token of every type")
    p.add_argument("--depths", type=int, nargs="+", default=[4, 12, 20], help="config_from_depth depths")
    p.add_argument("--max_seq_len", type=int, default=2048, help="context length of the depth configs")
    p.add_argument("--vocab_size", type=int, default=65536, help="vocab size of the depth configs")
    p.set_defaults(func=params.run)


def add_data(sub):
    p = sub.add_parser("data", parents=common_args(), help="tokenizer training time and dataloader tok/s")
    p.add_argument("--seconds", type=float, default=2.0, help="time per dataloader measurement")
    p.add_argument("--tokenizer_threads", type=int, default=4, help="threads for batched tokenization")
    p.add_argument("--with_model", action="store_true", help="also time a d4 gpt forward+backward (fp32, CPU)")
    p.add_argument("--data", default=None, help="your own text (as base_train --data): time its preparation (MB/s, "
                   "in a temp dir) and measure the tokenizers and the loader on it instead of the embedded corpus")
    p.set_defaults(func=data.run)


def add_train(sub):
    p = sub.add_parser("train", parents=common_args(n=3), help="training tok/s, ours vs the transformers twin")
    shape_args(p, 4)
    p.add_argument("--activation_checkpointing", type=str2bool, nargs="?", const=True, default=False,
                   help="checkpoint every block (ours) and gradient_checkpointing_enable (peer)")
    p.add_argument("--compile", type=str2bool, nargs="?", const=True, default=False,
                   help="torch.compile ours and the peer alike (compilation takes ~20 s per model on CPU)")
    p.add_argument("--profile", type=str2bool, nargs="?", const=True, default=False,
                   help="also profile forward+backward: the share of its time in matmuls, on both sides")
    p.set_defaults(func=train.run)


def add_decode(sub):
    # decode: one token at a time is too little work for two threads, and idle threads slow it on a busy machine
    p = sub.add_parser("decode", parents=common_args(n=3, threads=1), help="prefill and per-token time vs transformers")
    shape_args(p, 4, batch_size=0)
    decode_args(p, [1, 8])
    p.set_defaults(func=decode.run)


def add_infer(sub):
    p = sub.add_parser("infer", parents=common_args(), help="decoding figures of a real checkpoint, batch-size sweep")
    p.add_argument("--source", default="base", choices=["base", "mid", "sft", "rl"])
    p.add_argument("--model_tag", default=None, help="checkpoint directory (default: the largest)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the last)")
    decode_args(p, [1, 2, 4, 8, 16])
    p.set_defaults(func=infer.run)


def add_memory(sub):
    p = sub.add_parser("memory", parents=common_args(), help="measured training peak memory vs the --dry_run estimate")
    shape_args(p, 8, seq_len=512)
    p.add_argument("--steps", type=int, default=3, help="training steps measured")
    p.add_argument("--activation_checkpointing", choices=["off", "on", "both"], default="off")
    p.set_defaults(func=memory.run)


def add_scaling(sub):
    p = sub.add_parser("scaling", parents=common_args(), help="tok/s and FLOPs/token over depth, plotted")
    shape_args(p)
    p.add_argument("--depths", type=int, nargs="+", default=list(range(2, 13)), help="depths to measure")
    p.set_defaults(func=scaling.run)


def build_parser():
    parser = argparse.ArgumentParser(description="nanochat benchmarks")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (add_params, add_data, add_train, add_decode, add_infer, add_memory, add_scaling):
        add(sub)
    return parser


def main(argv=None):
    args = parse_args(build_parser(), argv)
    return args.func(args)


if __name__ == "__main__":
    run_cli(main)
