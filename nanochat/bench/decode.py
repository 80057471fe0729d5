"""
bench decode: prefill (time to first token) and time per output token of the Engine at several batch sizes, vs
transformers generate on the twin with the same weights, and vs our model without its KV cache.
"""

import time

import torch

from nanochat.bench.harness import (
    alternate,
    compare,
    environment,
    fmt,
    make_model,
    print_table,
    setup,
    twin,
    write_results,
)
from nanochat.dist import autocast_ctx, synchronize
from nanochat.log import print0
from nanochat.models import MODEL_TYPES


class NoStopTokenizer:
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


class Stamps:
    """A transformers streamer that only notes when each new token arrives (its first put() is the prompt)."""

    def __init__(self):
        self.times = []

    def put(self, value):
        self.times.append(time.perf_counter())

    def end(self):
        pass


def decode_figures(t0, stamps, rows, device_type):
    """Time to first token (prefill + first sample), time per output token after it, and new tokens/s overall."""
    n = len(stamps)
    figures = {"ttft_ms": 1e3 * (stamps[0] - t0), "tpot_ms": 1e3 * (stamps[-1] - stamps[0]) / max(1, n - 1),
               "tok_s": rows * n / (stamps[-1] - t0)}
    if device_type == "cuda":
        figures["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return figures


def start(device_type):
    if device_type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    synchronize(device_type)
    return time.perf_counter()


def engine_run(engine, prompt, rows, max_tokens, device_type):
    t0, stamps = start(device_type), []
    with autocast_ctx(device_type):
        for _ in engine.generate(prompt, num_samples=rows, max_tokens=max_tokens, temperature=0.0):
            stamps.append(time.perf_counter())  # the Engine returns its tokens as a list: synchronised already
    return decode_figures(t0, stamps, rows, device_type)


@torch.inference_mode()
def no_cache_run(model, prompt, rows, max_tokens, device_type):
    """Greedy decoding that recomputes the whole sequence for every new token (what the KV cache saves)."""
    ids = torch.tensor([prompt] * rows, dtype=torch.long, device=model.get_device())
    t0, stamps = start(device_type), []
    with autocast_ctx(device_type):
        for _ in range(max_tokens):
            next_ids = model(ids)[:, -1, :].argmax(dim=-1, keepdim=True)
            ids = torch.cat([ids, next_ids], dim=1)
            next_ids.tolist()
            stamps.append(time.perf_counter())
    return decode_figures(t0, stamps, rows, device_type)


@torch.inference_mode()
def peer_run(peer, prompt, rows, max_tokens, device_type, out=None):
    """transformers generate, greedy, with its KV cache, exactly max_tokens new tokens per row."""
    ids = torch.tensor([prompt] * rows, dtype=torch.long, device=peer.device)
    stamps = Stamps()
    t0 = start(device_type)
    with autocast_ctx(device_type):
        result = peer.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                               min_new_tokens=max_tokens, do_sample=False, use_cache=True, streamer=stamps,
                               pad_token_id=0, eos_token_id=None)
    if out is not None:
        out.extend(result[0, len(prompt):].tolist())
    return decode_figures(t0, stamps.times[1:], rows, device_type)


def decode_rows(model_type, model, peer, prompt, args, device_type, batch_sizes, vocab_size):
    """{f"batch{b}": comparison} for every batch size, plus our no-cache figures at batch 1."""
    from nanochat.engine import Engine

    engine = Engine(model, NoStopTokenizer(vocab_size))
    n_new = args.max_tokens
    with autocast_ctx(device_type):
        ours_tokens = [column[0] for column, _ in engine.generate(prompt, max_tokens=n_new, temperature=0.0)]
    peer_tokens = []
    if peer is not None:
        peer_run(peer, prompt, 1, n_new, device_type, out=peer_tokens)
    result = {"same_tokens": ours_tokens == peer_tokens if peer is not None else None}
    for b in batch_sizes:
        fns = {"ours": lambda b=b: engine_run(engine, prompt, b, n_new, device_type)}
        if peer is not None:
            fns["peer"] = lambda b=b: peer_run(peer, prompt, b, n_new, device_type)
        if b == 1 and not args.skip_no_cache:
            fns["no_cache"] = lambda: no_cache_run(model, prompt, 1, n_new, device_type)
        t = alternate(fns, args.n)
        entry = compare(t["ours"], t.get("peer"))
        if "no_cache" in t:
            entry["no_cache"] = t["no_cache"]
            entry["cache_speedup"] = t["no_cache"]["tpot_ms"] / t["ours"]["tpot_ms"]
        result[f"batch{b}"] = entry
    return result


def decode_table(results, types):
    rows = []
    for model_type in types:
        r = results[model_type]
        for key in [k for k in r if k.startswith("batch")]:
            e = r[key]
            for side in ("ours", "peer", "no_cache"):
                if e.get(side) is None:
                    continue
                f = e[side]
                ratio = fmt(e["ratio"]["tok_s"], ".2f") if side == "ours" and e["ratio"] else ""
                rows.append([f"{model_type} {key} {side}", fmt(f["ttft_ms"], ".1f"), fmt(f["tpot_ms"], ".2f"),
                             fmt(f["tok_s"]), ratio] + ([fmt(f.get("peak_mem_gib"), ".2f")] if "peak_mem_gib" in f
                                                         else []))
    header = ["run", "prefill ms", "ms/token", "tok/s", "ours/peer tok/s"]
    if any(len(row) > len(header) for row in rows):
        header.append("peak GiB")
    print_table(header, [row + [""] * (len(header) - len(row)) for row in rows])


def run(args):
    device_type = setup(args)
    torch.manual_seed(0)
    prompt = torch.randint(0, args.vocab_size, (args.prompt_len,)).tolist()
    shapes = dict(depth=args.depth, vocab_size=args.vocab_size, head_dim=args.head_dim, prompt_len=args.prompt_len,
                  max_tokens=args.max_tokens, batch_sizes=args.batch_sizes, compile=args.compile)
    results = {"shapes": shapes, "env": environment(args, device_type)}
    print0(f"decode: d{args.depth}, vocab {args.vocab_size}, prompt {args.prompt_len}, {args.max_tokens} new tokens, "
           f"greedy, {device_type}, {torch.get_num_threads()} threads, median of {args.n}"
           + (", ours with compile_decode() (the peer eager)" if args.compile else ""))
    for model_type in MODEL_TYPES:
        model = make_model(model_type, args, args.prompt_len + args.max_tokens, device_type).eval()
        peer, why = twin(model)
        if args.compile:
            model.compile_decode()
        if peer is None:
            print0(f"{model_type}: no transformers twin ({why})")
        results[model_type] = decode_rows(model_type, model, peer, prompt, args, device_type, args.batch_sizes,
                                          args.vocab_size)
    decode_table(results, MODEL_TYPES)
    print0("prefill ms: time to the first new token; ms/token: each one after it; tok/s: new tokens of all rows per "
           "second, prefill included. Ours prefills a prompt once and copies its cache to the rows; transformers "
           "prefills every row. no_cache: our model recomputing the whole sequence for every token")
    write_results(args, "decode", results)
    return results
