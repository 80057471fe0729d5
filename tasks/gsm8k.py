"""
GSM8K: grade school math word problems with worked solutions.
https://huggingface.co/datasets/openai/gsm8k (subsets main and socratic)

A solution marks each calculation as <<expression=result>> and ends with "#### <answer>", e.g.
    Weng earns 12/60 = $<<12/60=0.2>>0.2 per minute.
    #### 10
The calculations become calculator tool calls in the assistant message: a "python" part with the expression
followed by a "python_output" part with its result.
"""

import re

from tasks.common import Task, load_rows, offline_file

ANSWER_RE = re.compile(r"#### (\-?[0-9\.\,]+)")
CALC_RE = re.compile(r"(<<[^>]+>>)")


def extract_answer(text):
    """The number after '####', normalized as the official grader does (commas dropped), or None."""
    match = ANSWER_RE.search(text)
    if match is None:
        return None
    return match.group(1).strip().replace(",", "").rstrip(".")


def solution_to_parts(solution):
    parts = []
    for piece in CALC_RE.split(solution):
        if piece.startswith("<<") and piece.endswith(">>"):
            expr, sep, result = piece[2:-2].rpartition("=")
            if not sep:  # a calculation without its result
                expr, result = result, ""
            parts.append({"type": "python", "text": expr})
            parts.append({"type": "python_output", "text": result})
        elif piece:
            parts.append({"type": "text", "text": piece})
    return parts


def evaluate_final_number(conversation, completion):
    """Right when the number after '####' matches the reference (the last text part of the assistant message)."""
    reference = extract_answer(conversation["messages"][-1]["content"][-1]["text"])
    return int(reference is not None and extract_answer(completion) == reference)


class GSM8K(Task):
    eval_type = "generative"

    def __init__(self, subset, split, **kwargs):
        super().__init__(**kwargs)
        if subset not in ("main", "socratic") or split not in ("train", "test"):
            raise ValueError(f"GSM8K subset={subset!r} split={split!r}: subset must be main|socratic, split train|test")
        self.subset, self.split = subset, split
        offline = [offline_file(f"gsm8k_{subset}_{split}.jsonl.gz")]
        self.rows = load_rows("openai/gsm8k", subset, split, offline, what="GSM8K").shuffle(seed=42)

    def get_example(self, index):
        row = self.rows[index]
        messages = [{"role": "user", "content": row["question"]},
                    {"role": "assistant", "content": solution_to_parts(row["answer"])}]
        return {"messages": messages}

    def evaluate(self, conversation, completion):
        return evaluate_final_number(conversation, completion)
