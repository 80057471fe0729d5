"""
Export a checkpoint to a Hugging Face transformers directory: gpt -> `nanochat` (NanoChatForCausalLM), alcoholic ->
`qwen3` (Qwen3ForCausalLM), with the tokenizer, its chat template and a model card. It loads offline with
AutoModelForCausalLM / AutoTokenizer and no trust_remote_code; in fp32 its logits equal ours.

    python -m scripts.export_hf --source=sft --model_tag=alcoholic_d4 --out_dir=hf/alcoholic_d4
    python -m scripts.export_hf --source=base --model_tag=gpt_d4 --out_dir=hf/gpt_d4 --dtype=bfloat16
"""

import argparse

import torch

from nanochat.checkpoint import add_checkpoint_args, load_model
from nanochat.cli import parse_args, run_cli, str2bool

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build_parser():
    parser = argparse.ArgumentParser(description="Export a checkpoint to a Hugging Face transformers directory",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_checkpoint_args(parser, default_source="base")
    parser.add_argument("--out_dir", required=True, help="new (or empty) directory to write")
    parser.add_argument("--dtype", default="float32", choices=list(DTYPES), help="dtype of the saved weights")
    parser.add_argument("--ignore_dropout", type=str2bool, nargs="?", const=True, default=False,
                        help="export a model trained with dropout > 0 as its inference model (dropout 0)")
    return parser


def main(argv=None):
    args = parse_args(build_parser(), argv)
    from nanochat import hf  # needs transformers, an optional dependency

    model, tokenizer, meta = load_model(args.source, "cpu", phase="eval", model_tag=args.model_tag, step=args.step,
                                        model_type=args.model_type)
    hf.export(model, tokenizer, args.out_dir, meta=dict(meta, source=args.source), dtype=DTYPES[args.dtype],
              ignore_dropout=args.ignore_dropout)
    print(f"exported {meta['model_tag']} ({meta['model_type']}, {args.source}, step {meta['step']}) to {args.out_dir} "
          f"as transformers '{hf.mapping(meta['model_type']).hf_type}'")


if __name__ == "__main__":
    run_cli(main)
