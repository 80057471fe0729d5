"""
Benchmarks, one subcommand each:

    python -m scripts.bench params       # parameter counts by group and FLOPs/token, GPT vs Alcoholic
    python -m scripts.bench data         # tokenizer training time, dataloader tok/s (--with_model: vs d4 gpt)
    python -m scripts.bench decode       # Engine tok/s with the KV cache vs full recompute, GPT vs Alcoholic
"""

import argparse
import dataclasses
import os
import time

import torch

from nanochat.common import parse_args
from nanochat.models import MODEL_TYPES, config_from_depth
from nanochat.models.alcoholic import AlcoholicNanoConfig
from nanochat.models.gpt import GPTConfig

# The two configs of the model-selection guide, as written there
SEED_CONFIGS = {
    "gpt": GPTConfig(sequence_len=2048, vocab_size=65536, n_layer=20, n_head=16, n_kv_head=16, n_embd=1280),
    "alcoholic": AlcoholicNanoConfig(sequence_len=2048, vocab_size=65536, n_layer=20, n_head=16, n_kv_head=8,
                                     n_embd=1280, intermediate_size=5120, rope_theta=1_000_000.0, qk_norm=True,
                                     norm_type="rmsnorm", mlp_type="swiglu", dropout=0.0),
}


def human(n):
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


def describe(model_type, config):
    """Params by group and FLOPs/token, from a model on the meta device (no memory, no init)."""
    with torch.device("meta"):
        model = MODEL_TYPES[model_type].model_cls(config)
    c = dataclasses.asdict(config)
    shape = f"L{c['n_layer']} C{c['n_embd']} H{c['n_head']}/{c['n_kv_head']} D{model.head_dim}"
    return dict(shape=shape, **model.num_params_by_group(), flops=model.estimate_flops())


def cmd_params(args):
    rows = [(f"{t} seed (guide)", describe(t, config)) for t, config in SEED_CONFIGS.items()]
    for depth in args.depths:
        for t in MODEL_TYPES:
            config = config_from_depth(t, depth, args.max_seq_len, args.vocab_size)
            rows.append((f"{t} d{depth}", describe(t, config)))
    cols = ["shape", "embedding", "lm_head", "matrices", "norms", "total", "flops"]
    header = ["model"] + cols[:-1] + ["FLOPs/token"]
    table = [header] + [[name] + [r[k] if k == "shape" else human(r[k]) for k in cols] for name, r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for i, row in enumerate(table):
        print("  ".join(cell.ljust(w) if j < 2 else cell.rjust(w) for j, (cell, w) in enumerate(zip(row, widths))))
        if i == 0:
            print("  ".join("-" * w for w in widths))
    print(f"\nconfig_from_depth rows use max_seq_len={args.max_seq_len}, vocab_size={args.vocab_size}; "
          f"FLOPs/token = 6 * non-embedding params + attention (forward + backward)")


def cmd_data(args):
    """Tokenizer training time and dataloader throughput on this machine, on the embedded corpus in a temp dir."""
    import tempfile

    import torch

    from nanochat.dataloader import DataLoader
    from nanochat.dataset import build_embedded_shards
    from nanochat.tokenizer import RustBPETokenizer
    from scripts.tok_train import text_iterator

    old_base = os.environ.get("NANOCHAT_BASE_DIR")
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["NANOCHAT_BASE_DIR"] = tmp  # the embedded shards and nothing else: never the user's data
        try:
            build_embedded_shards()
            print(f"torch threads: {torch.get_num_threads()}, tokenizer_threads: {args.tokenizer_threads}")
            print("tokenizer training on the whole embedded corpus (scripts.tok_train):")
            tokenizers = {}
            for vocab_size in (65536, 4096):
                t0 = time.time()
                tokenizers[vocab_size] = RustBPETokenizer.train_from_iterator(text_iterator(2e9, 10_000), vocab_size)
                print(f"  vocab {vocab_size:>6,}: {time.time() - t0:6.2f}s")

            print(f"dataloader tokens/s on this CPU ({args.seconds:g}s per cell):")
            if not args.with_model:
                print("  (with --with_model, the training tok/s of a d4 gpt, fp32 forward+backward, is printed beside)")
            header = f"  {'B':>2} {'T':>4} {'data, vocab 65536':>18} {'data, vocab 4096':>17}"
            print(header + (f" {'d4 gpt train, vocab 4096':>25}" if args.with_model else ""))
            for B, T in ((4, 256), (8, 256), (4, 512), (8, 512)):
                line = f"  {B:>2} {T:>4}"
                for vocab_size, width in ((65536, 18), (4096, 17)):
                    loader = DataLoader(B, T, "train", tokenizer=tokenizers[vocab_size], rank=0, world_size=1,
                                        tokenizer_threads=args.tokenizer_threads)
                    next(loader)  # the first batch also opens the first shard
                    n, t0 = 0, time.time()
                    while time.time() - t0 < args.seconds:
                        next(loader)
                        n += 1
                    line += f" {n * B * T / (time.time() - t0):>{width},.0f}"
                if args.with_model:
                    line += f" {B * T / time_model_step(B, T, 4096):>25,.0f}"
                print(line, flush=True)
        finally:
            if old_base is None:
                os.environ.pop("NANOCHAT_BASE_DIR", None)
            else:
                os.environ["NANOCHAT_BASE_DIR"] = old_base


def time_model_step(B, T, vocab_size, steps=3):
    """Seconds per forward+backward of a d4 gpt in fp32 on CPU (median of `steps`, after one warmup step)."""
    import torch

    from nanochat.models import build_model, config_from_depth

    model = build_model("gpt", config_from_depth("gpt", 4, T, vocab_size), device="cpu")
    x = torch.randint(0, vocab_size, (B, T))
    times = []
    for _ in range(steps + 1):
        t0 = time.time()
        model(x, x).backward()
        model.zero_grad(set_to_none=True)
        times.append(time.time() - t0)
    return sorted(times[1:])[steps // 2]


class _NoStopTokenizer:
    """What the Engine asks of a tokenizer, with special tokens that no model can sample (id -1): every run
    decodes exactly max_tokens, so the timings compare equal work."""

    def __init__(self, vocab_size):
        self.vocab_size = vocab_size

    def get_vocab_size(self):
        return self.vocab_size

    def encode_special(self, name):
        return -1

    def get_bos_token_id(self):
        return -1


def decode_without_cache(model, prompt, max_tokens):
    """Greedy decoding that recomputes the whole sequence for every new token (what the KV cache saves)."""
    ids = torch.tensor([prompt], dtype=torch.long, device=model.get_device())
    out = []
    with torch.inference_mode():
        for _ in range(max_tokens):
            next_id = model(ids)[:, -1, :].argmax(dim=-1, keepdim=True)
            ids = torch.cat([ids, next_id], dim=1)
            out.append(next_id.item())
    return out


def cmd_decode(args):
    """Greedy decoding speed on CPU in fp32: Engine with the KV cache (1 and --num_samples rows) vs no cache.
    Measurements are interleaved over --repeats rounds and the fastest of each is kept, which filters out
    slowdowns from other processes on the machine."""
    from nanochat.engine import Engine
    from nanochat.models import build_model

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"CPU fp32, torch threads {torch.get_num_threads()}; depth {args.depth}, vocab {args.vocab_size}, "
          f"prompt {args.prompt_len} tokens, {args.max_tokens} new tokens (best of {args.repeats})")
    prompt = torch.randint(0, args.vocab_size, (args.prompt_len,)).tolist()
    runs, models = {}, {}
    for model_type in MODEL_TYPES:
        config = config_from_depth(model_type, args.depth, args.prompt_len + args.max_tokens, args.vocab_size)
        model = models[model_type] = build_model(model_type, config, device="cpu").eval()
        engine = Engine(model, _NoStopTokenizer(args.vocab_size))

        def run_engine(rows, engine=engine):
            return [c[0] for c, _ in engine.generate(prompt, num_samples=rows, max_tokens=args.max_tokens,
                                                     temperature=0.0)]

        runs[model_type] = {"kv": lambda f=run_engine: f(1), "full": lambda m=model: decode_without_cache(
            m, prompt, args.max_tokens), "rows": lambda f=run_engine: f(args.num_samples)}
        runs[model_type]["kv"]()  # warmup
    best, tokens = {}, {}
    for _ in range(args.repeats):
        for model_type, fns in runs.items():
            for name, fn in fns.items():
                t0 = time.perf_counter()
                result = fn()
                dt = time.perf_counter() - t0
                best[model_type, name] = min(dt, best.get((model_type, name), float("inf")))
                tokens[model_type, name] = result

    header = (f"{'model':<14} {'params':>8} {'engine+KV tok/s':>16} {'no cache tok/s':>15} {'speedup':>8} "
              f"{f'engine x{args.num_samples} tok/s':>17} {'same tokens':>12}")
    print(header)
    print("-" * len(header))
    n = args.max_tokens
    for model_type, model in models.items():
        t_kv, t_full, t_rows = (best[model_type, k] for k in ("kv", "full", "rows"))
        same = tokens[model_type, "kv"] == tokens[model_type, "full"]
        params = human(sum(p.numel() for p in model.parameters()))
        print(f"{f'{model_type} d{args.depth}':<14} {params:>8} {n / t_kv:>16,.1f} {n / t_full:>15,.1f} "
              f"{t_full / t_kv:>7.1f}x {n * args.num_samples / t_rows:>17,.1f} {'yes' if same else 'NO':>12}")
    print("tok/s: new tokens per second, the prompt's prefill included; 'same tokens': greedy decoding with and "
          "without the cache agree")


def main(argv=None):
    parser = argparse.ArgumentParser(description="nanochat benchmarks")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("params", help="parameter counts by group and FLOPs/token for GPT and Alcoholic")
    p.add_argument("--depths", type=int, nargs="+", default=[4, 12, 20], help="config_from_depth depths")
    p.add_argument("--max_seq_len", type=int, default=2048, help="context length of the depth configs")
    p.add_argument("--vocab_size", type=int, default=65536, help="vocab size of the depth configs")
    p.set_defaults(func=cmd_params)
    p = sub.add_parser("data", help="tokenizer training time and dataloader tok/s on this CPU (embedded corpus)")
    p.add_argument("--seconds", type=float, default=2.0, help="time per dataloader measurement")
    p.add_argument("--tokenizer_threads", type=int, default=4, help="threads for batched tokenization")
    p.add_argument("--with_model", action="store_true", help="also time a d4 gpt forward+backward (fp32, CPU)")
    p.set_defaults(func=cmd_data)
    p = sub.add_parser("decode", help="Engine decoding tok/s with the KV cache vs full recompute (CPU, fp32)")
    p.add_argument("--depth", type=int, default=4, help="config_from_depth depth of both models")
    p.add_argument("--vocab_size", type=int, default=4096, help="the CPU quickstart's vocab")
    p.add_argument("--prompt_len", type=int, default=64)
    p.add_argument("--max_tokens", type=int, default=128, help="new tokens per run")
    p.add_argument("--num_samples", type=int, default=4, help="rows decoded together from one prefill")
    p.add_argument("--repeats", type=int, default=5, help="rounds of measurements (the fastest is reported)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (0: torch's default); 1 is steadiest on a busy machine")
    p.set_defaults(func=cmd_decode)
    args = parse_args(parser, argv)
    args.func(args)


if __name__ == "__main__":
    main()
