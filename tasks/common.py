"""
What every task shares: the Task interface, mixtures, multiple-choice rendering, and finding datasets on disk.

A task is a list of conversations in nanochat's format, {"messages": [{"role": ..., "content": ...}, ...]},
plus task-specific fields (multiple choice tasks add "letters", the answer options the model may pick from).
Evaluation tasks also say how to score a model's answer: `evaluate` (bool/int) and `reward` (float, for RL).

Datasets are read in the layout the Hugging Face hub stores them, e.g.
    $NANOCHAT_HF_DIR/allenai/ai2_arc/ARC-Easy/test-00000-of-00001.parquet
with NANOCHAT_HF_DIR defaulting to $NANOCHAT_BASE_DIR/hf_datasets (`huggingface-cli download --repo-type dataset
allenai/ai2_arc --local-dir $NANOCHAT_BASE_DIR/hf_datasets/allenai/ai2_arc` puts files exactly there).
When a dataset is not there, the small offline copy in data/tasks/ is used (see data/tasks/LICENSES.md).
"""

import glob
import gzip
import io
import json
import os
import random

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from nanochat.fileio import get_base_dir, open_regular
from nanochat.log import print0

REPO_DATA_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data")
OFFLINE_TASKS_DIR = os.path.join(REPO_DATA_DIR, "tasks")


def hf_datasets_dir():
    return os.environ.get("NANOCHAT_HF_DIR") or os.path.join(get_base_dir(), "hf_datasets")


class Rows:
    """Read-only rows of a dataset (a pyarrow Table), optionally in a permuted order. Rows come out as dicts."""

    def __init__(self, table, order=None):
        self.table = table  # left in chunks (one per row group): row access stays cheap, no copy
        self.order = order

    def __len__(self):
        return self.table.num_rows if self.order is None else len(self.order)

    def __getitem__(self, index):
        if not 0 <= index < len(self):
            raise IndexError(f"row {index} out of range for {len(self)} rows")
        i = index if self.order is None else int(self.order[index])
        return {name: self.table.column(name)[i].as_py() for name in self.table.column_names}

    def shuffle(self, seed):
        # numpy's Generator permutation: the same order as datasets.Dataset.shuffle(seed=seed)
        return Rows(self.table, np.random.default_rng(seed).permutation(self.table.num_rows))


def read_jsonl(path):
    with open_regular(path) as raw, (gzip.open(raw, "rt", encoding="utf-8") if path.endswith(".gz") else
                                     io.TextIOWrapper(raw, encoding="utf-8")) as f:
        return [json.loads(line) for line in f if line.strip()]


def read_table(path):
    if path.endswith(".parquet"):
        with open_regular(path) as f:
            return pq.read_table(f)
    return pa.Table.from_pylist(read_jsonl(path))


def hub_files(repo, config_dir, split):
    """Files of one split in the hub's layouts: <config>/<split>-00000-of-00001.parquet (datasets' own push),
    <config>/<split>/0000.parquet (the auto-converted parquet branch), or JSONL with the same names."""
    root = os.path.join(hf_datasets_dir(), repo, config_dir)
    patterns = [f"{split}-*.parquet", f"{split}.parquet", f"{split}/*.parquet",
                f"{split}-*.jsonl", f"{split}.jsonl", f"{split}-*.jsonl.gz", f"{split}.jsonl.gz"]
    for pattern in patterns:
        files = sorted(glob.glob(os.path.join(root, pattern)))
        if files:
            return files, root
    return [], os.path.join(root, f"{split}-*.parquet")


def hub_has(repo, config_dir, split):
    """Whether a split of a hub dataset is on disk (the offline copies in data/tasks/ do not count)."""
    return bool(hub_files(repo, config_dir, split)[0])


_announced = set()


def load_rows(repo, config_dir, split, offline=None, what=None):
    """Rows of `repo` (a hub dataset id) from the hub layout on disk, else from the offline file(s).
    `offline`: list of candidate paths (the first that exists is used). Raises FileNotFoundError naming every
    place searched."""
    files, searched = hub_files(repo, config_dir, split)
    if files:
        return Rows(pa.concat_tables([read_table(f) for f in files], promote_options="default"))
    for path in offline or []:
        if os.path.exists(path):
            if path not in _announced:  # once per process, not for every task instance
                _announced.add(path)
                print0(f"{what or repo}: {searched} not found, using the offline copy {path}")
            return Rows(read_table(path))
    tried = "\n  ".join([searched, *(offline or [])])
    raise FileNotFoundError(
        f"{what or repo}: dataset {repo} ({config_dir}/{split}) not found. Searched:\n  {tried}\n"
        f"Download it with `huggingface-cli download --repo-type dataset {repo} --local-dir "
        f"{os.path.join(hf_datasets_dir(), repo)}` (or point NANOCHAT_HF_DIR at a folder holding {repo}/).")


def offline_file(name):
    return os.path.join(OFFLINE_TASKS_DIR, name)


# -----------------------------------------------------------------------------


class Task:
    """A dataset of conversations with a lightweight view [start:stop:step] over it."""

    def __init__(self, start=0, stop=None, step=1):
        if start < 0 or step < 1 or (stop is not None and stop < start):
            raise ValueError(f"bad task slice start={start} stop={stop} step={step}: "
                             "need 0 <= start <= stop and step >= 1")
        self.start, self.stop, self.step = start, stop, step

    # 'categorical' (pick one of conversation["letters"]), 'generative' (sample a completion), or None for a
    # training-only task
    eval_type = None

    def num_examples(self):
        return len(self.rows)  # tasks backed by a dataset hold it in self.rows; the others override this

    def get_example(self, index):
        raise NotImplementedError

    def __len__(self):
        stop = self.num_examples() if self.stop is None else min(self.stop, self.num_examples())
        return max(0, -(-(stop - self.start) // self.step))  # ceil((stop - start) / step)

    def __getitem__(self, index):
        if not isinstance(index, int):
            raise TypeError(f"task index must be an int, got {type(index).__name__}")
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {type(self).__name__} with {len(self)} examples")
        return self.get_example(self.start + index * self.step)

    def evaluate(self, conversation, completion):
        raise NotImplementedError(f"{type(self).__name__} has no evaluation")

    def reward(self, conversation, completion):
        """RL reward: by default 1.0 for a correct answer, else 0.0."""
        return float(self.evaluate(conversation, completion))


class TaskMixture(Task):
    """All examples of several tasks in one deterministic shuffled order (pass a task twice to oversample it)."""

    def __init__(self, tasks, seed=42, **kwargs):
        super().__init__(**kwargs)
        self.tasks = tasks
        self.index_map = [(t, i) for t, task in enumerate(tasks) for i in range(len(task))]
        random.Random(seed).shuffle(self.index_map)

    def num_examples(self):
        return len(self.index_map)

    def get_example(self, index):
        t, i = self.index_map[index]
        return self.tasks[t][i]


class TaskSequence(Task):
    """The examples of several tasks one task after the other (a curriculum)."""

    def __init__(self, tasks, **kwargs):
        super().__init__(**kwargs)
        self.tasks = tasks
        self.lengths = [len(task) for task in tasks]

    def num_examples(self):
        return sum(self.lengths)

    def get_example(self, index):
        for task, length in zip(self.tasks, self.lengths):
            if index < length:
                return task[index]
            index -= length
        raise IndexError(f"index out of range for TaskSequence with {sum(self.lengths)} examples")


def render_mc(question, letters, choices):
    """nanochat's multiple-choice prompt. Each letter comes right after its choice with no space before it
    ("=A"), so it is the same token as the bare letter the assistant answers with (" A" would be another token);
    small models also bind the letter to the choice better when it follows it."""
    query = f"Multiple Choice question: {question}\n"
    query += "".join(f"- {choice}={letter}\n" for letter, choice in zip(letters, choices))
    query += "\nRespond only with the letter of the correct answer."
    return query


def mc_conversation(question, letters, choices, answer_letter, **extra):
    messages = [{"role": "user", "content": render_mc(question, letters, choices)},
                {"role": "assistant", "content": answer_letter}]
    return {"messages": messages, "letters": list(letters), **extra}


def evaluate_mc(conversation, completion):
    """A multiple-choice answer is right when it is the expected letter (surrounding whitespace ignored)."""
    return completion.strip() == conversation["messages"][-1]["content"]
