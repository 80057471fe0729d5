"""
Import a Hugging Face transformers directory as a checkpoint: `qwen3` -> alcoholic (without its input norm),
`nanochat` -> gpt. Its tokenizer goes to $NANOCHAT_BASE_DIR/tokenizer. Then base_eval, chat_cli and chat_web load
it like any other checkpoint. Configs with no exact equivalent (other architectures, sliding windows, RoPE scaling,
biases, ...) are refused with the reason.

    python -m scripts.import_hf --hf_dir=hf/alcoholic_d4 --model_tag=imported_d4 --source=sft
    python -m scripts.chat_cli -i sft --model_tag=imported_d4
"""

import argparse

from nanochat.checkpoint import SOURCE_DIRS
from nanochat.cli import parse_args, run_cli, str2bool


def build_parser():
    parser = argparse.ArgumentParser(description="Import a Hugging Face transformers directory as a checkpoint",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--hf_dir", required=True, help="local transformers directory (config.json, safetensors, "
                                                        "tokenizer.json)")
    parser.add_argument("-g", "--model_tag", required=True, help="checkpoint folder to create")
    parser.add_argument("-i", "--source", default="base", choices=list(SOURCE_DIRS), help="checkpoint stage")
    parser.add_argument("--overwrite_tokenizer", type=str2bool, nargs="?", const=True, default=False,
                        help="replace a different tokenizer in $NANOCHAT_BASE_DIR/tokenizer")
    return parser


def main(argv=None):
    args = parse_args(build_parser(), argv)
    from nanochat import hf  # needs transformers, an optional dependency

    ckpt_dir = hf.import_dir(args.hf_dir, args.model_tag, args.source, args.overwrite_tokenizer)
    print(f"imported {args.hf_dir} into {ckpt_dir}; chat with it: "
          f"python -m scripts.chat_cli -i {args.source} --model_tag={args.model_tag}")


if __name__ == "__main__":
    run_cli(main)
