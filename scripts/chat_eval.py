"""
Evaluate a checkpoint on the chat tasks: ARC-Easy, ARC-Challenge, MMLU (multiple choice), GSM8K, HumanEval,
SpellingBee, Arithmetic (generated answers; Arithmetic is generated word problems with the calculator, held out
from the ones the offline chat data trains on).

Multiple choice is scored from the logits: the prompt ends with <|assistant_start|>, and the answer is the choice
letter with the highest logit at that position (only the letters offered count), so base models can be scored
too. Generative tasks sample a reply with the Engine (calculator tool included) and check it.
With more than one task, ChatCORE is the mean accuracy centered on chance: 0 = random, 1 = perfect.

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
