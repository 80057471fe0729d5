"""
Reinforcement learning on problems with a checkable answer (GSM8K, or the generated arithmetic problems), on-policy
and GRPO-like, as nanochat; it runs in the same training loop as the other stages (nanochat/rl.py).
    python -m scripts.chat_rl --model_tag=alcoholic_d4     # sft -> chatrl_checkpoints/alcoholic_d4
    torchrun --standalone --nproc_per_node=8 -m scripts.chat_rl -- --model_tag=gpt_d20
"""

from nanochat.cli import parse, run_cli
from nanochat.config import RLConfig
from nanochat.rl import reinforce
from nanochat.trainer import run_stage


def main(argv=None):
    return run_stage(reinforce, parse(RLConfig, argv, prog="chat_rl.py", description=__doc__))


if __name__ == "__main__":
    run_cli(main)
