"""
Supervised fine-tuning on conversations: only the assistant's tokens are learned.
    python -m scripts.chat_sft --model_tag=alcoholic_d4     # mid (or base) -> chatsft_checkpoints/alcoholic_d4
    torchrun --standalone --nproc_per_node=8 -m scripts.chat_sft -- --model_tag=gpt_d20
    python -m scripts.chat_sft --model_tag=gpt_d4 --data=my_chats.jsonl      # your conversations (tasks/userchat.py)
    python -m scripts.chat_sft --model_tag=gpt_d4 --data=a.jsonl:3 --data=b.jsonl --mix=add   # weighted, + built-in
The model type, the architecture and (unless given) the batch size and learning rates come from the source
checkpoint; see nanochat/finetune.py.
"""

from nanochat.cli import parse, run_cli
from nanochat.config import SFTConfig
from nanochat.finetune import finetune
from nanochat.trainer import run_stage


def main(argv=None):
    config = parse(SFTConfig, argv, prog="chat_sft.py", description=__doc__)
    return run_stage(lambda c: finetune(c, "sft"), config)


if __name__ == "__main__":
    run_cli(main)
