"""
Evaluate a checkpoint on the chat tasks (ARC-Easy, ARC-Challenge, MMLU, GSM8K, HumanEval, SpellingBee, Arithmetic):
multiple choice from the logits, generated answers through the Engine (calculator included); with several tasks,
ChatCORE. See nanochat/chat_eval.py.

Examples:
python -m scripts.chat_eval -i sft -a ARC-Easy
python -m scripts.chat_eval -i base --model_tag=gpt_d4 -a "ARC-Easy|GSM8K" --max_problems=20
torchrun --standalone --nproc_per_node=8 -m scripts.chat_eval -- -i sft
"""

from nanochat.chat_eval import evaluate_chat
from nanochat.cli import parse, run_cli
from nanochat.config import ChatEvalConfig
from nanochat.dist import compute_cleanup


def main(argv=None):
    config = parse(ChatEvalConfig, argv, prog="chat_eval.py", description=__doc__)
    try:
        return evaluate_chat(config)
    finally:
        compute_cleanup()


if __name__ == "__main__":
    run_cli(main)
