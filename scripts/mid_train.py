"""
Mid-training: continue a base model on the conversation mixture, whole conversations packed into BOS-aligned rows,
before SFT. It is the "mid" stage of scripts/chat_sft.py, which holds both fine-tuning stages.
    python -m scripts.mid_train --model_tag=alcoholic_d4
    torchrun --standalone --nproc_per_node=8 -m scripts.mid_train -- --model_tag=gpt_d20
"""

from nanochat.cli import run_cli
from scripts.chat_sft import main as finetune


def main(argv=None):
    return finetune(argv, stage="mid")


if __name__ == "__main__":
    run_cli(main)
