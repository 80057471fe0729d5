"""
Export a checkpoint to a Hugging Face transformers directory: gpt -> `nanochat` (NanoChatForCausalLM), alcoholic ->
`qwen3` (Qwen3ForCausalLM), with the tokenizer, its chat template and a model card. It loads offline with
AutoModelForCausalLM / AutoTokenizer and no trust_remote_code; in fp32 its logits equal ours.

    python -m scripts.export_hf --source=sft --model_tag=alcoholic_d4 --out_dir=hf/alcoholic_d4
    python -m scripts.export_hf --source=base --model_tag=gpt_d4 --out_dir=hf/gpt_d4 --dtype=bfloat16
"""


import torch

from nanochat.checkpoint import load_model
from nanochat.cli import parse, run_cli
from nanochat.config import ExportConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def main(argv=None):
    args = parse(ExportConfig, argv, prog="export_hf.py", description=__doc__)
    from nanochat import hf  # needs transformers, an optional dependency

    model, tokenizer, meta = load_model(args.source, "cpu", phase="eval", model_tag=args.model_tag, step=args.step,
                                        model_type=args.model_type)
    hf.export(model, tokenizer, args.out_dir, meta=dict(meta, source=args.source), dtype=DTYPES[args.dtype],
              ignore_dropout=args.ignore_dropout)
    print(f"exported {meta['model_tag']} ({meta['model_type']}, {args.source}, step {meta['step']}) to {args.out_dir} "
          f"as transformers '{hf.mapping(meta['model_type']).hf_type}'")


if __name__ == "__main__":
    run_cli(main)
