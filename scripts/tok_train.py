"""
Train the BPE tokenizer on the training shards and save it to $NANOCHAT_BASE_DIR/tokenizer.

    python -m scripts.tok_train                       # vocab 65536 on up to 2B characters
    python -m scripts.tok_train --vocab_size=4096     # small vocab for CPU runs
"""

import argparse

from nanochat.cli import count, parse_args, positive_int, run_cli
from nanochat.log import UserError, print0
from nanochat.report import get_report
from nanochat.tokenizer import train_tokenizer


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
