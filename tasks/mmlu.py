"""
MMLU: multiple choice questions on 57 subjects, from elementary mathematics to law.
https://huggingface.co/datasets/cais/mmlu
Subset "all" (splits test, validation, dev, auxiliary_train) or "auxiliary_train" (split train): the auxiliary
training questions (ARC, RACE, ...) used to teach the multiple-choice format.
"""

from tasks.common import Task, evaluate_mc, load_rows, mc_conversation, offline_file

LETTERS = ("A", "B", "C", "D")
SPLITS = {"all": ("test", "validation", "dev", "auxiliary_train"), "auxiliary_train": ("train",)}


class MMLU(Task):
    eval_type = "categorical"

    letters = LETTERS

    def __init__(self, subset, split, **kwargs):
        super().__init__(**kwargs)
        if split not in SPLITS.get(subset, ()):
            raise ValueError(f"MMLU subset={subset!r} split={split!r}: valid pairs are "
                             + ", ".join(f"{s}/{p}" for s, ps in SPLITS.items() for p in ps))
        self.subset, self.split = subset, split
        offline = [offline_file(f"mmlu_{subset}_{split}.jsonl.gz")]
        self.rows = load_rows("cais/mmlu", subset, split, offline, what="MMLU").shuffle(seed=42)

    def get_example(self, index):
        row = self.rows[index]
        row = row.get("train") or row  # the hub's auxiliary_train rows are wrapped in a "train" struct
        if len(row["choices"]) != len(LETTERS):
            raise ValueError(f"MMLU row {index}: expected 4 choices, got {len(row['choices'])}")
        return mc_conversation(row["question"], LETTERS, row["choices"], LETTERS[row["answer"]],
                               subject=row.get("subject", ""))

    def evaluate(self, conversation, completion):
        return evaluate_mc(conversation, completion)
