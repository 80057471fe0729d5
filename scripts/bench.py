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

from nanochat.bench import data, decode, infer, memory, params, scaling, train
from nanochat.cli import parse_command, run_cli
from nanochat.config.bench import BENCH_COMMANDS

RUNS = {"params": params.run, "data": data.run, "train": train.run, "decode": decode.run, "infer": infer.run,
        "memory": memory.run, "scaling": scaling.run}


def main(argv=None):
    name, config = parse_command(BENCH_COMMANDS, argv, prog="bench.py", description=__doc__)
    return RUNS[name](config)


if __name__ == "__main__":
    run_cli(main)
