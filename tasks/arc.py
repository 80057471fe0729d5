"""
ARC, the AI2 Reasoning Challenge: grade-school science multiple choice questions.
https://huggingface.co/datasets/allenai/ai2_arc (subsets ARC-Easy and ARC-Challenge)
"""

from tasks.common import Task, evaluate_mc, load_rows, mc_conversation, offline_file

SUBSETS = ("ARC-Easy", "ARC-Challenge")
SPLITS = ("train", "validation", "test")


class ARC(Task):
    eval_type = "categorical"

    def __init__(self, subset, split, **kwargs):
        super().__init__(**kwargs)
        if subset not in SUBSETS or split not in SPLITS:
            raise ValueError(f"ARC subset={subset!r} split={split!r}: subset must be one of {SUBSETS}, "
                             f"split one of {SPLITS}")
        self.subset, self.split = subset, split
        offline = [offline_file(f"ai2_arc_{subset}_{split}.jsonl.gz")]
        self.rows = load_rows("allenai/ai2_arc", subset, split, offline, what=subset).shuffle(seed=42)

    def get_example(self, index):
        row = self.rows[index]
        letters = row["choices"]["label"]  # usually A-D; a few questions use 1-4 or have 3 or 5 choices
        if row["answerKey"] not in letters:
            raise ValueError(f"ARC {row.get('id')}: answer {row['answerKey']!r} is not one of the labels {letters}")
        return mc_conversation(row["question"], letters, row["choices"]["text"], row["answerKey"])

    def evaluate(self, conversation, completion):
        return evaluate_mc(conversation, completion)
