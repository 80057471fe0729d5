"""
Benchmarks, one subcommand each. Every one prints a table and writes bench_results/<name>.json (--out).

    python -m scripts.bench params    # parameter counts by group and FLOPs/token of every registered type and preset
    python -m scripts.bench data      # tokenizer training time, dataloader tok/s (--with_model: vs d4 gpt)
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
import contextlib
import dataclasses
import io
import json
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from nanochat.cli import parse_args, str2bool
from nanochat.dist import autocast_ctx, resolve_device_type, synchronize
from nanochat.models import MODEL_TYPES, build_model, config_from_depth, presets
from nanochat.plan import describe, human

# -----------------------------------------------------------------------------
# Shared: timing, comparisons, tables, results


def alternate(fns, n):
    """{name: {figure: median}} of n rounds in which every fn runs once in turn, after one warm-up call each.
    A fn returns a dict of figures (e.g. {"s": seconds})."""
    for fn in fns.values():
        fn()
    runs = {name: [] for name in fns}
    for _ in range(n):
        for name, fn in fns.items():
            runs[name].append(fn())
    return {name: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for name, rs in runs.items()}


def timer(fn, device_type, then=None):
    """fn as a dict of figures: {"s": seconds it took}. With `then`: fn, then `then`, and "then_s": then's part."""

    def timed():
        synchronize(device_type)
        t0 = time.perf_counter()
        fn()
        synchronize(device_type)
        t1 = time.perf_counter()
        if then is None:
            return {"s": t1 - t0}
        then()
        synchronize(device_type)
        t2 = time.perf_counter()
        return {"s": t2 - t0, "then_s": t2 - t1}

    return timed


def compare(ours, peer):
    """The JSON of ours beside the peer: ratio = ours / peer for every figure both have (None without a peer)."""
    if peer is None:
        return {"ours": ours, "peer": None, "ratio": None}
    ratio = {k: ours[k] / peer[k] for k in ours if isinstance(peer.get(k), (int, float)) and peer[k]}
    return {"ours": ours, "peer": peer, "ratio": ratio}


def print_table(header, rows):
    table = [header] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for i, row in enumerate(table):
        print("  ".join(c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(row, widths))))
        if i == 0:
            print("  ".join("-" * w for w in widths))


def fmt(x, spec=",.1f"):
    return "-" if x is None else format(x, spec)


def write_results(args, name, results):
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"{name}.json")
    with open(path, "w") as f:
        json.dump(results, f, indent=1)
    print(f"\nwrote {path}")
    return path


def setup(args):
    """Threads and device of a run; returns the device type."""
    if args.threads:
        torch.set_num_threads(args.threads)
    return resolve_device_type(args.device_type or None)


def environment(args, device_type):
    env = {"device": device_type, "threads": torch.get_num_threads(), "n": args.n, "torch": torch.__version__}
    if device_type == "cuda":
        env["gpu"] = torch.cuda.get_device_name()
    return env


def quiet(fn, *args, **kwargs):
    """fn's result without its prints (setup_optimizers announces its LR scaling)."""
    with contextlib.redirect_stdout(io.StringIO()):
        return fn(*args, **kwargs)


def make_model(model_type, args, seq_len, device_type):
    torch.manual_seed(0)
    config = config_from_depth(model_type, args.depth, seq_len, args.vocab_size, head_dim=args.head_dim)
    return build_model(model_type, config, device=device_type)


def twin(model):
    """The transformers model with our weights (fp32), or (None, why not)."""
    try:
        from nanochat.hf import to_hf
        return to_hf(model).to(model.get_device()), ""
    except Exception as e:  # no transformers, no mapping for this type, or a config without an exact equivalent
        return None, f"{type(e).__name__}: {e}"


# -----------------------------------------------------------------------------
# params, data


def cmd_params(args):
    rows = [(f"{name} (preset)", describe(t, config)) for name, (t, config) in presets().items()]
    for depth in args.depths:
        for t in MODEL_TYPES:
            config = config_from_depth(t, depth, args.max_seq_len, args.vocab_size)
            rows.append((f"{t} d{depth}", describe(t, config)))
    cols = ["shape", "embedding", "lm_head", "matrices", "norms", "total", "flops"]
    print_table(["model"] + cols[:-1] + ["FLOPs/token"],
                [[name] + [r[k] if k == "shape" else human(r[k]) for k in cols] for name, r in rows])
    print(f"\nconfig_from_depth rows use max_seq_len={args.max_seq_len}, vocab_size={args.vocab_size}; "
          f"FLOPs/token = 6 * non-embedding params + attention (forward + backward)")
    write_results(args, "params", {name: r for name, r in rows})


def cmd_data(args):
    """Tokenizer training time and dataloader throughput on this machine, on the embedded corpus in a temp dir."""
    import tempfile

    from nanochat.dataloader import DataLoader
    from nanochat.dataset import build_embedded_shards
    from nanochat.tokenizer import RustBPETokenizer, text_iterator

    results = {"tokenizer_s": {}, "loader_tok_s": []}
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
                results["tokenizer_s"][vocab_size] = time.time() - t0
                print(f"  vocab {vocab_size:>6,}: {results['tokenizer_s'][vocab_size]:6.2f}s")

            print(f"dataloader tokens/s on this CPU ({args.seconds:g}s per cell):")
            if not args.with_model:
                print("  (with --with_model, the training tok/s of a d4 gpt, fp32 forward+backward, is printed beside)")
            header = f"  {'B':>2} {'T':>4} {'data, vocab 65536':>18} {'data, vocab 4096':>17}"
            print(header + (f" {'d4 gpt train, vocab 4096':>25}" if args.with_model else ""))
            for B, T in ((4, 256), (8, 256), (4, 512), (8, 512)):
                line, row = f"  {B:>2} {T:>4}", {"B": B, "T": T}
                for vocab_size, width in ((65536, 18), (4096, 17)):
                    loader = DataLoader(B, T, "train", tokenizer=tokenizers[vocab_size], rank=0, world_size=1,
                                        tokenizer_threads=args.tokenizer_threads)
                    next(loader)  # the first batch also opens the first shard
                    n, t0 = 0, time.time()
                    while time.time() - t0 < args.seconds:
                        next(loader)
                        n += 1
                    row[f"vocab_{vocab_size}"] = n * B * T / (time.time() - t0)
                    line += f" {row[f'vocab_{vocab_size}']:>{width},.0f}"
                if args.with_model:
                    row["d4_gpt_train"] = B * T / time_model_step(B, T, 4096)
                    line += f" {row['d4_gpt_train']:>25,.0f}"
                results["loader_tok_s"].append(row)
                print(line, flush=True)
        finally:
            if old_base is None:
                os.environ.pop("NANOCHAT_BASE_DIR", None)
            else:
                os.environ["NANOCHAT_BASE_DIR"] = old_base
    write_results(args, "data", results)


def time_model_step(B, T, vocab_size, steps=3):
    """Seconds per forward+backward of a d4 model of the default type (the first registered: gpt) in fp32 on CPU
    (median of `steps`, after one warmup step)."""
    model_type = next(iter(MODEL_TYPES))
    model = build_model(model_type, config_from_depth(model_type, 4, T, vocab_size), device="cpu")
    x = torch.randint(0, vocab_size, (B, T))
    fn = timer(lambda: (model(x, x).backward(), model.zero_grad(set_to_none=True)), "cpu")
    return alternate({model_type: fn}, steps)[model_type]["s"]


# -----------------------------------------------------------------------------
# train: forward+backward and a full optimizer step, ours vs the transformers twin


def peer_loss(peer, x, y):
    """The peer's loss as ours computes it: cross-entropy of every position against its own target."""
    return F.cross_entropy(peer(input_ids=x, use_cache=False).logits.flatten(0, 1).float(), y.flatten())


def training_fns(model, peer, x, y, device_type, compile=False):
    """Forward+backward, and a full step (forward+backward, clip at 1.0, optimizer, zero grads), of ours (AdamW +
    Muon, the trainer's optimizer_step) and of the peer (torch.optim.AdamW, as transformers users train).
    compile: torch.compile both models' forward+loss alike (the optimizers stay eager, as base_train's)."""
    from nanochat.trainer import optimizer_step

    optimizers = quiet(model.setup_optimizers)
    peer_adamw = torch.optim.AdamW(peer.parameters(), lr=1e-4)

    def fwdbwd(loss_fn):
        loss_fn = torch.compile(loss_fn) if compile else loss_fn

        def run():
            with autocast_ctx(device_type):
                loss = loss_fn(x, y)
            loss.backward()
        return run

    ours_fwdbwd, peer_fwdbwd = fwdbwd(model), fwdbwd(lambda x, y: peer_loss(peer, x, y))

    def peer_update():
        torch.nn.utils.clip_grad_norm_(peer.parameters(), 1.0)
        peer_adamw.step()
        peer.zero_grad(set_to_none=True)

    return {
        "ours_fwdbwd": timer(lambda: (ours_fwdbwd(), model.zero_grad(set_to_none=True)), device_type),
        "peer_fwdbwd": timer(lambda: (peer_fwdbwd(), peer.zero_grad(set_to_none=True)), device_type),
        "ours_step": timer(ours_fwdbwd, device_type, then=lambda: optimizer_step(model, optimizers, 1.0, 0.95, 1.0)),
        "peer_step": timer(peer_fwdbwd, device_type, then=peer_update),
    }


def matmul_share(fn, device_type, rounds=2):
    """(ms per call, ms of it in matrix multiplications) of fn, from torch.profiler's self times (the device's on
    CUDA). The time outside the matmuls bounds what any rewrite of the same matmuls can gain: total / matmul."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device_type == "cuda" else [])
    fn()
    with profile(activities=activities) as prof:
        for _ in range(rounds):
            fn()
    key = "self_device_time_total" if device_type == "cuda" else "self_cpu_time_total"
    events = prof.key_averages()
    total = sum(getattr(e, key) for e in events)
    mm = sum(getattr(e, key) for e in events if e.key in ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"))
    return total / rounds / 1e3, mm / rounds / 1e3


def cmd_train(args):
    device_type = setup(args)
    B, T = args.batch_size, args.seq_len
    shapes = dict(depth=args.depth, batch_size=B, seq_len=T, vocab_size=args.vocab_size, head_dim=args.head_dim,
                  activation_checkpointing=args.activation_checkpointing, compile=args.compile)
    results = {"shapes": shapes, "env": environment(args, device_type)}
    print(f"train: d{args.depth}, batch {B} x seq {T}, vocab {args.vocab_size}, {device_type} "
          f"({'bf16 autocast' if device_type == 'cuda' else 'fp32'}), {torch.get_num_threads()} threads, "
          f"median of {args.n}" + (", activation checkpointing" if args.activation_checkpointing else "")
          + (", both compiled" if args.compile else ""))
    rows = []
    for model_type in MODEL_TYPES:
        model = make_model(model_type, args, T, device_type).train()
        model.activation_checkpointing = args.activation_checkpointing
        peer, why = twin(model)
        if peer is None:
            print(f"{model_type}: no transformers twin ({why}); skipped")
            continue
        peer.train()
        if args.activation_checkpointing:
            peer.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        x = torch.randint(0, args.vocab_size, (B, T), device=device_type)
        y = torch.randint(0, args.vocab_size, (B, T), device=device_type)
        with torch.no_grad():  # the same weights compute the same loss: the two do the same work
            ours_loss = model(x, y).item()
            peer_loss_value = peer_loss(peer, x, y).item()
        fns = training_fns(model, peer, x, y, device_type, args.compile)
        t = alternate(fns, args.n)
        figures = {side: {"fwdbwd_tok_s": B * T / t[f"{side}_fwdbwd"]["s"],
                          "step_tok_s": B * T / t[f"{side}_step"]["s"],
                          "fwdbwd_ms": 1e3 * t[f"{side}_fwdbwd"]["s"], "step_ms": 1e3 * t[f"{side}_step"]["s"],
                          "optimizer_ms": 1e3 * t[f"{side}_step"]["then_s"]}
                   for side in ("ours", "peer")}
        if args.profile:  # where forward+backward's time goes: matmuls or the rest
            for side in ("ours", "peer"):
                total, mm = matmul_share(fns[f"{side}_fwdbwd"], device_type)
                figures[side].update(profiled_ms=total, matmul_ms=mm, matmul_share=mm / total)
        results[model_type] = dict(compare(figures["ours"], figures["peer"]), peer_class=type(peer).__name__,
                                   loss_diff=abs(ours_loss - peer_loss_value), flops_per_token=model.estimate_flops())
        r = results[model_type]
        for side in ("ours", "peer"):
            name = f"{model_type} {'ours' if side == 'ours' else type(peer).__name__}"
            ratios = [fmt(r["ratio"][k], ".2f") if side == "ours" else "" for k in ("fwdbwd_tok_s", "step_tok_s")]
            share = [fmt(100 * r[side]["matmul_share"], ".0f") + "%"] if args.profile else []
            rows.append([name, fmt(r[side]["fwdbwd_tok_s"], ",.0f"), fmt(r[side]["step_tok_s"], ",.0f"),
                         fmt(r[side]["optimizer_ms"]), *ratios, *share])
    print_table(["model", "fwd+bwd tok/s", "step tok/s", "optimizer ms", "ours/peer fwd+bwd", "ours/peer step"]
                + (["matmul share"] if args.profile else []), rows)
    print("step: forward+backward, grad clip, optimizer (ours AdamW+Muon, peer torch AdamW), zero grads; optimizer "
          "ms: the step's clip, optimizer and zero grads; loss_diff in the JSON: |our loss - peer loss| on one batch")
    if args.profile:
        print("matmul share: of forward+backward's profiled time, in mm/addmm/bmm; both sides run the same matmuls, "
              "so no rewrite of them beats the peer by more than its time / its matmul time")
    write_results(args, "train", results)
    return results


# -----------------------------------------------------------------------------
# decode and infer: prefill (time to first token) and time per output token, ours vs transformers generate


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


def cmd_decode(args):
    device_type = setup(args)
    torch.manual_seed(0)
    prompt = torch.randint(0, args.vocab_size, (args.prompt_len,)).tolist()
    shapes = dict(depth=args.depth, vocab_size=args.vocab_size, head_dim=args.head_dim, prompt_len=args.prompt_len,
                  max_tokens=args.max_tokens, batch_sizes=args.batch_sizes, compile=args.compile)
    results = {"shapes": shapes, "env": environment(args, device_type)}
    print(f"decode: d{args.depth}, vocab {args.vocab_size}, prompt {args.prompt_len}, {args.max_tokens} new tokens, "
          f"greedy, {device_type}, {torch.get_num_threads()} threads, median of {args.n}"
          + (", ours with compile_decode() (the peer eager)" if args.compile else ""))
    for model_type in MODEL_TYPES:
        model = make_model(model_type, args, args.prompt_len + args.max_tokens, device_type).eval()
        peer, why = twin(model)
        if args.compile:
            model.compile_decode()
        if peer is None:
            print(f"{model_type}: no transformers twin ({why})")
        results[model_type] = decode_rows(model_type, model, peer, prompt, args, device_type, args.batch_sizes,
                                          args.vocab_size)
    decode_table(results, MODEL_TYPES)
    print("prefill ms: time to the first new token; ms/token: each one after it; tok/s: new tokens of all rows per "
          "second, prefill included. Ours prefills a prompt once and copies its cache to the rows; transformers "
          "prefills every row. no_cache: our model recomputing the whole sequence for every token")
    write_results(args, "decode", results)
    return results


# Memory bandwidth of known GPUs (bytes/s), for the bandwidth utilisation of decoding
PEAK_BANDWIDTH = [("H200", 4.8e12), ("H100", 3.35e12), ("H800", 3.35e12), ("GH200", 4.0e12), ("B200", 8.0e12),
                  ("A100", 2.0e12), ("A800", 2.0e12), ("L40S", 0.864e12), ("L4", 0.3e12), ("A10G", 0.6e12),
                  ("A10", 0.6e12), ("RTX 4090", 1.0e12), ("RTX 3090", 0.936e12), ("V100", 0.9e12), ("T4", 0.32e12)]


def peak_bandwidth(name):
    return next((bw for key, bw in PEAK_BANDWIDTH if key in name.upper()), None)


def decode_utilisation(model, rows, context, tpot_ms):
    """(bandwidth, compute) utilisation of one decode step as fractions of the GPU's peaks, lower bounds: the step
    reads every weight once (as stored) and the rows' keys and values (bf16), and multiplies 2 FLOPs per weight
    per row plus attention over the context."""
    from nanochat.mfu import get_peak_flops

    c = model.config
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    kv_bytes = rows * context * c.n_layer * 2 * c.n_kv_head * model.head_dim * 2
    n_embedding = sum(p.numel() for p in model.param_groups()["embedding"])
    n_params = sum(p.numel() for p in model.parameters())
    flops = rows * (2 * (n_params - n_embedding) + 4 * c.n_layer * c.n_head * model.head_dim * context)
    seconds = tpot_ms / 1e3
    bandwidth, peak = peak_bandwidth(torch.cuda.get_device_name()), get_peak_flops("cuda")
    return ((weight_bytes + kv_bytes) / seconds / bandwidth if bandwidth else None,
            flops / seconds / peak if peak else None)


def cmd_infer(args):
    from nanochat.checkpoint import load_model

    device_type = setup(args)
    model, tokenizer, meta = load_model(args.source, device=device_type, model_tag=args.model_tag, step=args.step)
    model.eval()
    if args.compile:
        model.compile_decode()
    text = "The history of the city begins with a small settlement on the river, where traders met to exchange "
    prompt = (tokenizer.encode(text, prepend=tokenizer.get_bos_token_id()) * args.prompt_len)[:args.prompt_len]
    context = model.config.sequence_len
    if args.prompt_len + args.max_tokens > context:
        raise SystemExit(f"--prompt_len + --max_tokens = {args.prompt_len + args.max_tokens} > the model's context "
                         f"{context}; lower them")
    peer, why = twin(model)
    if peer is None:
        print(f"no transformers twin ({why}): ours only")
    model_type = model.model_type
    print(f"infer: {args.source}/{meta['model_tag']} ({model_type}), prompt {len(prompt)}, {args.max_tokens} new "
          f"tokens, batch sizes {args.batch_sizes}, {device_type}, median of {args.n}"
          + (", ours with compile_decode()" if args.compile else ""))
    shapes = dict(source=args.source, model_tag=meta["model_tag"], step=meta.get("step"), model_type=model_type,
                  config=dataclasses.asdict(model.config), prompt_len=len(prompt), max_tokens=args.max_tokens,
                  batch_sizes=args.batch_sizes, compile=args.compile)
    results = {"shapes": shapes, "env": environment(args, device_type)}
    results[model_type] = decode_rows(model_type, model, peer, prompt, args, device_type, args.batch_sizes,
                                      tokenizer.get_vocab_size())
    if device_type == "cuda":  # the mid-decode context: prompt plus half the new tokens
        for key, e in results[model_type].items():
            if key.startswith("batch"):
                bw, compute = decode_utilisation(model, int(key[5:]), len(prompt) + args.max_tokens // 2,
                                                 e["ours"]["tpot_ms"])
                e["ours"].update(bandwidth_util=bw, compute_util=compute)
                print(f"{key}: bandwidth {fmt(bw and 100 * bw, '.1f')}%, compute "
                      f"{fmt(compute and 100 * compute, '.1f')}%, peak memory {e['ours']['peak_mem_gib']:.2f} GiB")
    decode_table(results, [model_type])
    write_results(args, "infer", results)
    return results


# -----------------------------------------------------------------------------
# memory: the measured peak of real training steps vs the --dry_run estimate


def training_memory(spec):
    """Peak memory of spec["steps"] training steps as the trainer runs them (forward_backward, optimizer_step):
    max allocated on CUDA, max RSS on CPU; and the runtime baseline as --dry_run measures it (on CPU the RSS after
    a tiny warm-up step, before the model is built). Meant for a fresh process."""
    from nanochat.mfu import peak_memory
    from nanochat.plan import current_rss, runtime_baseline
    from nanochat.trainer import forward_backward, optimizer_step

    device_type = spec["device_type"]
    baseline = runtime_baseline(device_type)
    torch.manual_seed(0)
    model = build_model(spec["model_type"], config_from_depth(spec["model_type"], spec["depth"], spec["seq_len"],
                                                              spec["vocab_size"], head_dim=spec["head_dim"]),
                        device=device_type).train()
    model.activation_checkpointing = spec["activation_checkpointing"]
    optimizers = quiet(model.setup_optimizers)
    B, T, V = spec["batch_size"], spec["seq_len"], spec["vocab_size"]
    for _ in range(spec["steps"]):
        x = torch.randint(0, V, (B, T), device=device_type)
        forward_backward(model, [(x, x)], False, 1, device_type)
        optimizer_step(model, optimizers, 1.0, 0.95, 1.0)
    peak = peak_memory(device_type)
    if device_type != "cuda":  # the kernel updates max RSS lazily: it can lag the resident memory of this moment
        peak = max(peak, current_rss() or 0)
    return {"peak": peak, "baseline": baseline, "delta": peak - baseline}


def measure_in_subprocess(spec):
    """training_memory(spec) in a fresh Python process, so that no figure carries another's memory."""
    cmd = [sys.executable, "-m", "scripts.bench", "memory_child", json.dumps(spec)]
    env = dict(os.environ)
    if spec.get("threads"):
        env["OMP_NUM_THREADS"] = str(spec["threads"])
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=os.path.dirname(os.path.dirname(
        os.path.abspath(__file__))))
    if out.returncode != 0:
        raise RuntimeError(f"memory measurement of {spec['model_type']} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def cmd_memory_child(args):
    print(json.dumps(training_memory(json.loads(args.spec))))


def cmd_memory(args):
    from nanochat.plan import allocator_held, tensor_peak_bytes

    device_type = setup(args)
    B, T = args.batch_size, args.seq_len
    modes = {"off": [False], "on": [True], "both": [False, True]}[args.activation_checkpointing]
    shapes = dict(depth=args.depth, batch_size=B, seq_len=T, vocab_size=args.vocab_size, head_dim=args.head_dim,
                  steps=args.steps)
    results = {"shapes": shapes, "env": environment(args, device_type)}
    print(f"memory: d{args.depth}, batch {B} x seq {T}, vocab {args.vocab_size}, {args.steps} training steps in a "
          f"fresh process per run, {device_type}")
    rows, gib = [], 2**30
    for ckpt in modes:
        for model_type in MODEL_TYPES:
            spec = dict(model_type=model_type, depth=args.depth, batch_size=B, seq_len=T, vocab_size=args.vocab_size,
                        head_dim=args.head_dim, steps=args.steps, activation_checkpointing=ckpt,
                        device_type=device_type, threads=args.threads)
            measured = measure_in_subprocess(spec)
            config = config_from_depth(model_type, args.depth, T, args.vocab_size, head_dim=args.head_dim)
            counted = tensor_peak_bytes(model_type, config, B, T, device_type, ckpt)
            # the estimate as --dry_run makes it (estimate_peak_memory), with the runtime baseline of the fresh process
            held, tensors = allocator_held(counted, device_type, ckpt), counted.peak
            estimate = {"peak": held + measured["baseline"], "tensors": tensors, "heap_tensors": counted.heap_peak,
                        "held": held, "baseline": measured["baseline"]}
            key = model_type + ("+ckpt" if ckpt else "")
            results[key] = {"measured": measured, "estimate": estimate,
                            "ratio": estimate["peak"] / measured["peak"],
                            "tensors_ratio": tensors / measured["delta"] if measured["delta"] > 0 else None,
                            "activation_checkpointing": ckpt}
            rows.append([key, fmt(measured["peak"] / gib, ".2f"), fmt(estimate["peak"] / gib, ".2f"),
                         fmt(results[key]["ratio"], ".3f"), fmt(measured["delta"] / gib, ".2f"),
                         fmt(tensors / gib, ".2f"), fmt(results[key]["tensors_ratio"], ".3f")])
    what = "max allocated" if device_type == "cuda" else "max RSS"
    print_table(["model", f"measured ({what}) GiB", "estimate GiB", "est/meas", "measured - baseline GiB",
                 "tensors' peak GiB", "tensors/(meas - base)"], rows)
    print("estimate: nanochat.plan.estimate_peak_memory (base_train --dry_run): the tensors' peak in a training step, "
          "counted on fake tensors" + (", plus what glibc's heap keeps (plan.CPU_HEAP_RETENTION) and the process's "
                                       "RSS after a tiny warm-up step" if device_type != "cuda" else ""))
    write_results(args, "memory", results)
    return results


# -----------------------------------------------------------------------------
# scaling: tok/s and FLOPs/token over depth


def cmd_scaling(args):
    device_type = setup(args)
    B, T = args.batch_size, args.seq_len
    # one head_dim for every depth: 64 splits every width (64 x depth) into whole heads, where the types' default
    # of 128 does not at odd depths
    head_dim = args.head_dim or 64
    results = {"shapes": dict(depths=args.depths, batch_size=B, seq_len=T, vocab_size=args.vocab_size,
                              head_dim=head_dim),
               "env": environment(args, device_type)}
    results.update({t: {"depth": [], "params": [], "flops_per_token": [], "tok_s": [], "tflops": []}
                    for t in MODEL_TYPES})
    print(f"scaling: forward+backward tok/s over depth, batch {B} x seq {T}, vocab {args.vocab_size}, head_dim "
          f"{head_dim}, {device_type}, median of {args.n}")
    rows = []
    for depth in args.depths:
        fns, models = {}, {}
        for t in MODEL_TYPES:
            torch.manual_seed(0)
            config = config_from_depth(t, depth, T, args.vocab_size, head_dim=head_dim)
            model = models[t] = build_model(t, config, device=device_type).train()
            x = torch.randint(0, args.vocab_size, (B, T), device=device_type)

            def fwdbwd(model=model, x=x):
                with autocast_ctx(device_type):
                    loss = model(x, x)
                loss.backward()
                model.zero_grad(set_to_none=True)

            fns[t] = timer(fwdbwd, device_type)
        times = alternate(fns, args.n)
        for t, model in models.items():
            r, flops, tok_s = results[t], model.estimate_flops(), B * T / times[t]["s"]
            r["depth"].append(depth)
            r["params"].append(sum(p.numel() for p in model.parameters()))
            r["flops_per_token"].append(flops)
            r["tok_s"].append(tok_s)
            r["tflops"].append(flops * tok_s / 1e12)
            rows.append([f"{t} d{depth}", human(r["params"][-1]), human(flops), fmt(tok_s, ",.0f"),
                         fmt(flops * tok_s / 1e9, ",.1f")])
        del models, fns
    print_table(["model", "params", "FLOPs/token", "tok/s", "GFLOP/s"], rows)
    write_results(args, "scaling", results)
    plot_scaling(results, os.path.join(args.out, "scaling.png"))
    return results


def plot_scaling(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for t in MODEL_TYPES:
        r = results[t]
        ax1.plot(r["depth"], r["tok_s"], marker="o", label=t)
        ax2.plot(r["depth"], r["flops_per_token"], marker="o", label=t)
    ax1.set(xlabel="depth", ylabel="tokens/s (forward+backward)", yscale="log", title="training throughput")
    ax2.set(xlabel="depth", ylabel="FLOPs/token", yscale="log", title="training FLOPs per token")
    for ax in (ax1, ax2):
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    print(f"wrote {path}")


# -----------------------------------------------------------------------------
# Command line


def build_parser():
    def common(n=5, threads=0):
        p = argparse.ArgumentParser(add_help=False)  # a fresh one each time: subcommands differ in defaults
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

    parser = argparse.ArgumentParser(description="nanochat benchmarks")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("params", parents=common(), help="parameter counts by group and FLOPs/token of every type")
    p.add_argument("--depths", type=int, nargs="+", default=[4, 12, 20], help="config_from_depth depths")
    p.add_argument("--max_seq_len", type=int, default=2048, help="context length of the depth configs")
    p.add_argument("--vocab_size", type=int, default=65536, help="vocab size of the depth configs")
    p.set_defaults(func=cmd_params)
    p = sub.add_parser("data", parents=common(), help="tokenizer training time and dataloader tok/s")
    p.add_argument("--seconds", type=float, default=2.0, help="time per dataloader measurement")
    p.add_argument("--tokenizer_threads", type=int, default=4, help="threads for batched tokenization")
    p.add_argument("--with_model", action="store_true", help="also time a d4 gpt forward+backward (fp32, CPU)")
    p.set_defaults(func=cmd_data)
    p = sub.add_parser("train", parents=common(n=3), help="training tok/s, ours vs the transformers twin")
    shape_args(p, 4)
    p.add_argument("--activation_checkpointing", type=str2bool, nargs="?", const=True, default=False,
                   help="checkpoint every block (ours) and gradient_checkpointing_enable (peer)")
    p.add_argument("--compile", type=str2bool, nargs="?", const=True, default=False,
                   help="torch.compile ours and the peer alike (compilation takes ~20 s per model on CPU)")
    p.add_argument("--profile", type=str2bool, nargs="?", const=True, default=False,
                   help="also profile forward+backward: the share of its time in matmuls, on both sides")
    p.set_defaults(func=cmd_train)

    def decode_args(p, batch_sizes):
        p.add_argument("--prompt_len", type=int, default=64)
        p.add_argument("--max_tokens", type=int, default=64, help="new tokens per row")
        p.add_argument("--batch_sizes", type=int, nargs="+", default=batch_sizes, help="rows decoded together")
        p.add_argument("--skip_no_cache", action="store_true", help="leave out our model without its KV cache")
        p.add_argument("--compile", type=str2bool, nargs="?", const=True, default=False,
                       help="ours with model.compile_decode() (compilation excluded: each batch size warms up first)")

    # decode: one token at a time is too little work for two threads, and idle threads slow it on a busy machine
    p = sub.add_parser("decode", parents=common(n=3, threads=1), help="prefill and per-token time vs transformers")
    shape_args(p, 4, batch_size=0)
    decode_args(p, [1, 8])
    p.set_defaults(func=cmd_decode)
    p = sub.add_parser("infer", parents=common(), help="decoding figures of a real checkpoint, batch-size sweep")
    p.add_argument("--source", default="base", choices=["base", "mid", "sft", "rl"])
    p.add_argument("--model_tag", default=None, help="checkpoint directory (default: the largest)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the last)")
    decode_args(p, [1, 2, 4, 8, 16])
    p.set_defaults(func=cmd_infer)
    p = sub.add_parser("memory", parents=common(), help="measured training peak memory vs the --dry_run estimate")
    shape_args(p, 8, seq_len=512)
    p.add_argument("--steps", type=int, default=3, help="training steps measured")
    p.add_argument("--activation_checkpointing", choices=["off", "on", "both"], default="off")
    p.set_defaults(func=cmd_memory)
    p = sub.add_parser("memory_child", help=argparse.SUPPRESS)
    p.add_argument("spec")
    p.set_defaults(func=cmd_memory_child)
    p = sub.add_parser("scaling", parents=common(), help="tok/s and FLOPs/token over depth, plotted")
    shape_args(p)
    p.add_argument("--depths", type=int, nargs="+", default=list(range(2, 13)), help="depths to measure")
    p.set_defaults(func=cmd_scaling)
    return parser


def main(argv=None):
    args = parse_args(build_parser(), argv)
    return args.func(args)


if __name__ == "__main__":
    main()
