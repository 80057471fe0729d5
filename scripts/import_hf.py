"""
Import a Hugging Face transformers directory as a checkpoint: `qwen3` -> alcoholic (without its input norm),
`nanochat` -> gpt. Its tokenizer goes to $NANOCHAT_BASE_DIR/tokenizer. Then base_eval, chat_cli and chat_web load
it like any other checkpoint. Configs with no exact equivalent (other architectures, sliding windows, RoPE scaling,
biases, ...) are refused with the reason.

    python -m scripts.import_hf --hf_dir=hf/alcoholic_d4 --model_tag=imported_d4 --source=sft
    python -m scripts.chat_cli -i sft --model_tag=imported_d4
"""


from nanochat.cli import parse, run_cli
from nanochat.config import ImportConfig


def main(argv=None):
    args = parse(ImportConfig, argv, prog="import_hf.py", description=__doc__)
    from nanochat import hf  # needs transformers, an optional dependency

    ckpt_dir = hf.import_dir(args.hf_dir, args.model_tag, args.source, args.overwrite_tokenizer)
    print(f"imported {args.hf_dir} into {ckpt_dir}; chat with it: "
          f"python -m scripts.chat_cli -i {args.source} --model_tag={args.model_tag}")


if __name__ == "__main__":
    run_cli(main)
