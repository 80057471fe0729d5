"""
bench data: tokenizer training time and dataloader throughput on this machine, on the embedded corpus in a temp
dir; with --data=PATH on the user's own text instead, after timing its preparation into shards (MB/s of input, and
the same in tokens/s at each tokenizer's bytes per token); with --with_model, the training tok/s of a d4 gpt beside.
"""

import contextlib
import os
import tempfile
import time

import torch

from nanochat.bench.harness import alternate, timer, write_results
from nanochat.log import print0
from nanochat.models import MODEL_TYPES, build_model, config_from_depth

VOCAB_SIZES = (65536, 4096)
SHAPES = ((4, 256), (8, 256), (4, 512), (8, 512))  # (B, T) of the dataloader cells


TOKENIZER_CHARS = 20_000_000  # enough text for the tokenizers of a large --data (the embedded corpus is ~5M)


@contextlib.contextmanager
def temp_base_dir():
    """NANOCHAT_BASE_DIR is a fresh temp dir; restored afterwards."""
    old_base = os.environ.get("NANOCHAT_BASE_DIR")
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["NANOCHAT_BASE_DIR"] = tmp
        try:
            yield
        finally:
            if old_base is None:
                os.environ.pop("NANOCHAT_BASE_DIR", None)
            else:
                os.environ["NANOCHAT_BASE_DIR"] = old_base


def prepare_own(path, results):
    """Prepare --data in the temp base dir, timed (then once more: the reuse, hashing only); returns its shards."""
    from nanochat.userdata import prepare_text

    t0 = time.time()
    directory, manifest = prepare_text(path)
    seconds = time.time() - t0
    t0 = time.time()
    prepare_text(path)
    results["prepare"] = {"bytes": manifest["bytes"], "documents": manifest["documents"], "seconds": seconds,
                          "mb_per_s": manifest["bytes"] / seconds / 1e6, "reuse_seconds": time.time() - t0}
    print0(f"preparation of {path}: {manifest['bytes'] / 1e6:.1f} MB, {manifest['documents']:,} documents in "
           f"{seconds:.2f}s = {results['prepare']['mb_per_s']:.1f} MB/s; prepared again (unchanged: hashing only) "
           f"in {results['prepare']['reuse_seconds']:.2f}s")
    return directory


def bytes_per_token(tokenizer, data_dir):
    from nanochat.dataset import parquets_iter_batched

    docs = next(parquets_iter_batched("val", data_dir=data_dir))
    return sum(len(d.encode()) for d in docs) / sum(map(len, tokenizer.encode(docs)))


def train_tokenizers(results, data_dir=None):
    """{vocab_size: tokenizer} trained on the embedded corpus (or --data's first TOKENIZER_CHARS characters); the
    seconds each took go in results."""
    from nanochat.tokenizer import RustBPETokenizer, text_iterator

    print0(f"tokenizer training on {'--data' if data_dir else 'the whole embedded corpus'} (scripts.tok_train):")
    tokenizers = {}
    for vocab_size in VOCAB_SIZES:
        t0 = time.time()
        tokenizers[vocab_size] = RustBPETokenizer.train_from_iterator(
            text_iterator(TOKENIZER_CHARS, 10_000, data_dir), vocab_size)
        results["tokenizer_s"][vocab_size] = time.time() - t0
        line = f"  vocab {vocab_size:>6,}: {results['tokenizer_s'][vocab_size]:6.2f}s"
        if "prepare" in results:  # the preparation's MB/s, in this tokenizer's tokens
            ratio = bytes_per_token(tokenizers[vocab_size], data_dir)
            tok_s = results["prepare"][f"tok_per_s_{vocab_size}"] = results["prepare"]["mb_per_s"] * 1e6 / ratio
            line += f"; {ratio:.2f} bytes/token: the preparation's {tok_s:,.0f} tok/s"
        print0(line)
    return tokenizers


def loader_tok_s(tokenizer, B, T, args, data_dir=None):
    """Tokens/s of the training DataLoader over args.seconds."""
    from nanochat.dataloader import DataLoader

    loader = DataLoader(B, T, "train", tokenizer=tokenizer, rank=0, world_size=1,
                        tokenizer_threads=args.tokenizer_threads, data_dir=data_dir)
    next(loader)  # the first batch also opens the first shard
    n, t0 = 0, time.time()
    while time.time() - t0 < args.seconds:
        next(loader)
        n += 1
    return n * B * T / (time.time() - t0)


def time_model_step(B, T, vocab_size, steps=3):
    """Seconds per forward+backward of a d4 model of the default type (the first registered: gpt) in fp32 on CPU
    (median of `steps`, after one warmup step)."""
    model_type = next(iter(MODEL_TYPES))
    model = build_model(model_type, config_from_depth(model_type, 4, T, vocab_size), device="cpu")
    x = torch.randint(0, vocab_size, (B, T))
    fn = timer(lambda: (model(x, x).backward(), model.zero_grad(set_to_none=True)), "cpu")
    return alternate({model_type: fn}, steps)[model_type]["s"]


def loader_table(args, tokenizers, results, data_dir=None):
    """One line per (B, T): the loader's tok/s at each vocab size (and the d4 gpt's training tok/s)."""
    print0(f"dataloader tokens/s on this CPU ({args.seconds:g}s per cell):")
    if not args.with_model:
        print0("  (with --with_model, the training tok/s of a d4 gpt, fp32 forward+backward, is printed beside)")
    header = f"  {'B':>2} {'T':>4} {'data, vocab 65536':>18} {'data, vocab 4096':>17}"
    print0(header + (f" {'d4 gpt train, vocab 4096':>25}" if args.with_model else ""))
    for B, T in SHAPES:
        line, row = f"  {B:>2} {T:>4}", {"B": B, "T": T}
        for vocab_size, width in zip(VOCAB_SIZES, (18, 17)):
            row[f"vocab_{vocab_size}"] = loader_tok_s(tokenizers[vocab_size], B, T, args, data_dir)
            line += f" {row[f'vocab_{vocab_size}']:>{width},.0f}"
        if args.with_model:
            row["d4_gpt_train"] = B * T / time_model_step(B, T, 4096)
            line += f" {row['d4_gpt_train']:>25,.0f}"
        results["loader_tok_s"].append(row)
        print0(line)


def run(args):
    from nanochat.dataset import build_embedded_shards

    results = {"tokenizer_s": {}, "loader_tok_s": []}
    with temp_base_dir():
        print0(f"torch threads: {torch.get_num_threads()}, tokenizer_threads: {args.tokenizer_threads}")
        if args.data:
            data_dir = prepare_own(args.data, results)
        else:
            data_dir = None
            build_embedded_shards()
        tokenizers = train_tokenizers(results, data_dir)
        loader_table(args, tokenizers, results, data_dir)
    write_results(args, "data", results)
