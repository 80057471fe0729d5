"""
Multiple-choice practice in the ARC/MMLU chat format, from questions that chat_eval never scores.

Sources: ARC-Easy and ARC-Challenge train when the hub copy is on disk, else their validation splits (shipped in
data/tasks/); MMLU auxiliary_train when on disk, else MMLU dev + validation. Test splits are never sources, and as
a guard against the same question sitting in two splits, any question whose text also appears in a split that
chat_eval scores (ARC-Easy/Challenge test, MMLU test) is dropped.
Split "train" or "val": a stable hash of the question text holds out 1 question in 20 for the validation loss.
"""

import zlib
from functools import lru_cache

import pyarrow.compute as pc

from tasks.arc import ARC, SUBSETS
from tasks.common import Task, evaluate_mc, hf_datasets_dir, hub_has
from tasks.mmlu import MMLU

VAL_EVERY = 20  # 1 question in VAL_EVERY (by hash) is held out for "val"


def question_texts(task):
    """The question text of every example of an ARC/MMLU task, in the task's order, read column-wise (fast)."""
    table = task.rows.table
    if "question" in table.column_names:
        column = table.column("question")
    else:  # the hub's MMLU auxiliary_train wraps each row in a "train" struct
        column = pc.struct_field(table.column("train"), "question")
    texts = column.to_pylist()
    return texts if task.rows.order is None else [texts[int(i)] for i in task.rows.order]


def practice_sources(datasets=("ARC", "MMLU")):
    """The ARC/MMLU tasks practice is drawn from: training splits when on disk, else validation/dev. Never test."""
    sources = []
    if "ARC" in datasets:
        sources += [ARC(subset, "train" if hub_has("allenai/ai2_arc", subset, "train") else "validation")
                    for subset in SUBSETS]
    if "MMLU" in datasets:  # auxiliary_train sits in one of two hub layouts
        aux = [place for place in (("auxiliary_train", "train"), ("all", "auxiliary_train"))
               if hub_has("cais/mmlu", *place)]
        sources += [MMLU(*aux[0])] if aux else [MMLU("all", "dev"), MMLU("all", "validation")]
    assert all(source.split != "test" for source in sources), "practice must never read a test split"
    return sources


def scored_questions():
    """Question texts of the test splits chat_eval scores (read from the same files chat_eval reads)."""
    return _scored_questions(hf_datasets_dir())


@lru_cache(maxsize=4)
def _scored_questions(hf_dir):  # cached per datasets folder: it decides which files are read
    tasks = [*(ARC(subset, "test") for subset in SUBSETS), MMLU("all", "test")]
    return frozenset(q for task in tasks for q in question_texts(task))


def held_out(question):
    return zlib.crc32(question.encode("utf-8")) % VAL_EVERY == 0


class MCPractice(Task):
    eval_type = "categorical"

    def __init__(self, split="train", datasets=("ARC", "MMLU"), **kwargs):
        super().__init__(**kwargs)
        if split not in ("train", "val") or not datasets or not set(datasets) <= {"ARC", "MMLU"}:
            raise ValueError(f"MCPractice split={split!r} datasets={datasets!r}: split must be train|val, datasets "
                             "one or both of ARC, MMLU")
        self.split, self.datasets = split, tuple(datasets)
        self.sources = practice_sources(datasets)
        scored = scored_questions()
        self.index = []  # (source, example index) of every practice question of this split
        self.dropped = 0  # questions also found in a scored test split
        for s, source in enumerate(self.sources):
            for i, question in enumerate(question_texts(source)):
                if question in scored:
                    self.dropped += 1
                elif held_out(question) == (split == "val"):
                    self.index.append((s, i))

    def num_examples(self):
        return len(self.index)

    def get_example(self, index):
        s, i = self.index[index]
        return self.sources[s][i]

    def evaluate(self, conversation, completion):
        return evaluate_mc(conversation, completion)
