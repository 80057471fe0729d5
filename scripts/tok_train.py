"""
Train the BPE tokenizer on the training shards and save it to $NANOCHAT_BASE_DIR/tokenizer.

    python -m scripts.tok_train                       # vocab 65536 on up to 2B characters
    python -m scripts.tok_train --vocab_size=4096     # small vocab for CPU runs
"""

import argparse
import os
import time

from nanochat.cli import count, parse_args, positive_int, run_cli
from nanochat.dataset import parquets_iter_batched
from nanochat.fileio import get_base_dir
from nanochat.log import UserError, print0
from nanochat.report import get_report
from nanochat.tokenizer import RustBPETokenizer


def text_iterator(max_chars, doc_cap):
    """Training documents, each cropped to doc_cap characters (a few huge documents must not dominate the pair
    counts), until max_chars characters in total or the end of the training split."""
    nchars = 0
    for docs in parquets_iter_batched("train"):
        for doc in docs:
            doc = doc[:doc_cap]
            nchars += len(doc)
            yield doc
            if nchars >= max_chars:
                return


def train_tokenizer(vocab_size=65536, max_chars=2_000_000_000, doc_cap=10_000, tokenizer_dir=None):
    """Train on the training split, save to tokenizer_dir (default $NANOCHAT_BASE_DIR/tokenizer), print a summary."""
    tokenizer_dir = tokenizer_dir or os.path.join(get_base_dir(), "tokenizer")
    stats = {"chars": 0, "docs": 0}

    def counted():
        for doc in text_iterator(max_chars, doc_cap):
            stats["chars"] += len(doc)
            stats["docs"] += 1
            yield doc

    t0 = time.time()
    tokenizer = RustBPETokenizer.train_from_iterator(counted(), vocab_size)
    train_time = time.time() - t0
    tokenizer.save(tokenizer_dir)

    token_bytes = tokenizer.token_bytes()
    ordinary = token_bytes[token_bytes > 0].float()
    sample = "Hello world! The year 2024 has 366 days; x = 3.14159 * r**2."
    print0(f"Trained on {stats['docs']:,} documents, {stats['chars']:,} characters in {train_time:.2f}s")
    print0(f"vocab_size: {tokenizer.get_vocab_size():,} ({len(tokenizer.get_special_tokens())} special tokens)")
    print0(f"token bytes: min {int(ordinary.min())}, max {int(ordinary.max())}, mean {ordinary.mean():.2f}")
    print0(f"sample: {sample!r} -> {len(tokenizer.encode(sample))} tokens ({len(sample.encode())} bytes)")
    print0(f"hash: {tokenizer.hash}")
    print0(f"saved to {tokenizer_dir}")
    return tokenizer


def parse_cli(argv=None):
    parser = argparse.ArgumentParser(description="Train the BPE tokenizer on the training shards")
    parser.add_argument("--vocab_size", type=positive_int, default=65536,
                        help="vocabulary size including the special tokens")
    parser.add_argument("--max_chars", type=count, default=2_000_000_000,
                        help="train on at most this many characters (stops earlier if the corpus is smaller)")
    parser.add_argument("--doc_cap", type=positive_int, default=10_000,
                        help="crop each document to this many characters")
    return parse_args(parser, argv)


def main(argv=None):
    args = parse_cli(argv)
    print0(f"vocab_size={args.vocab_size:,} max_chars={args.max_chars:,} doc_cap={args.doc_cap:,}")
    try:
        tokenizer = train_tokenizer(args.vocab_size, args.max_chars, args.doc_cap)
    except ValueError as e:  # e.g. a vocab_size below the 256 bytes + special tokens
        raise UserError(str(e)) from None
    get_report().log(section="Tokenizer training", data=[vars(args), {"vocab_size": tokenizer.get_vocab_size(),
                                                                      "hash": tokenizer.hash}])
    return tokenizer


if __name__ == "__main__":
    run_cli(main)
