"""
Train the BPE tokenizer on the training shards and save it to $NANOCHAT_BASE_DIR/tokenizer.

    python -m scripts.tok_train                       # vocab 65536 on up to 2B characters
    python -m scripts.tok_train --vocab_size=4096     # small vocab for CPU runs
    python -m scripts.tok_train --data=my_texts/ --vocab_size=8192   # on your own text (see base_train --data)
"""

import dataclasses

from nanochat.cli import parse, run_cli
from nanochat.config import TokTrainConfig
from nanochat.log import UserError, print0
from nanochat.report import get_report
from nanochat.tokenizer import train_tokenizer
from nanochat.userdata import prepare_own_text, report_lines


def main(argv=None):
    args = parse(TokTrainConfig, argv, prog="tok_train.py", description=__doc__)
    data_dir, record = prepare_own_text(args) if args.data else (None, None)
    print0(f"vocab_size={args.vocab_size:,} max_chars={args.max_chars:,} doc_cap={args.doc_cap:,}")
    try:
        tokenizer = train_tokenizer(args.vocab_size, args.max_chars, args.doc_cap, data_dir=data_dir,
                                    data={k: record[k] for k in ("path", "key")} if record else None)
    except ValueError as e:  # e.g. a vocab_size below the 256 bytes + special tokens
        raise UserError(str(e)) from None
    result = {"vocab_size": tokenizer.get_vocab_size(), "hash": tokenizer.hash}
    get_report().log(section="Tokenizer training", data=[report_lines(record) if record else {},
                                                         dataclasses.asdict(args), result])
    return tokenizer


if __name__ == "__main__":
    run_cli(main)
