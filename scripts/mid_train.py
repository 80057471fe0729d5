"""
Mid-training: continue a base model on the conversation mixture, whole conversations packed into BOS-aligned rows,
before SFT (nanochat/finetune.py).
    python -m scripts.mid_train --model_tag=alcoholic_d4    # base -> mid_checkpoints/alcoholic_d4
    torchrun --standalone --nproc_per_node=8 -m scripts.mid_train -- --model_tag=gpt_d20
    python -m scripts.mid_train --model_tag=gpt_d4 --data=my_chats.jsonl     # your conversations (tasks/userchat.py)
"""

from nanochat.cli import parse, run_cli
from nanochat.config import MidConfig
from nanochat.finetune import finetune
from nanochat.trainer import run_stage


def main(argv=None):
    config = parse(MidConfig, argv, prog="mid_train.py", description=__doc__)
    return run_stage(lambda c: finetune(c, "mid"), config)


if __name__ == "__main__":
    run_cli(main)
