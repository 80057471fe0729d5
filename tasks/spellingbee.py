"""
Synthetic spelling tasks that small models need help with, because a token hides the letters it is made of.

SpellingBee: "How many r are in strawberry?" The ideal answer spells the word out, counts along, checks the
count with a calculator call ('strawberry'.count('r')) and ends with "#### 3", graded like GSM8K.
SimpleSpelling: "Spell the word: apple" -> "apple:a,p,p,l,e", the skill SpellingBee depends on.

Examples are generated from the word list shipped in data/tasks/words.txt.gz (SCOWL, see data/tasks/LICENSES.md).
Example i of a split is always the same: its random generator is seeded by the split and i.
"""

import gzip
import os
import random
from functools import lru_cache

from nanochat.fileio import open_regular
from tasks.common import OFFLINE_TASKS_DIR, Task
from tasks.gsm8k import evaluate_final_number

WORDS_PATH = os.path.join(OFFLINE_TASKS_DIR, "words.txt.gz")
LETTERS = "abcdefghijklmnopqrstuvwxyz"
# seeds of different splits/tasks never meet as long as size stays below this
SEED_OFFSETS = {("bee", "train"): 0, ("bee", "test"): 10_000_000,
                ("spell", "train"): 20_000_000, ("spell", "test"): 30_000_000}

QUESTION_TEMPLATES = [
    "How many {letter} are in {word}",
    "How many {letter} are there in the word {word}",
    "How many times does the letter {letter} appear in {word}",
    "Count the {letter} in {word}",
    "Count how many times {letter} occurs in {word}",
    "In the word {word}, how many {letter} are there",
    "What is the number of {letter} in {word}",
    "How often does {letter} show up in {word}",
    "{word}: how many {letter}",
    "Number of {letter}s in {word}",
    "Tell me how many {letter} the word {word} has",
    "Can you count the letter {letter} in {word}",
    "¿Cuántas {letter} hay en la palabra {word}",
    "Combien de {letter} y a-t-il dans {word}",
    "Wie viele {letter} hat das Wort {word}",
    "Quante {letter} ci sono in {word}",
    "{word} 里有几个 {letter}",
]


@lru_cache(maxsize=1)
def load_words():
    if not os.path.exists(WORDS_PATH):
        raise FileNotFoundError(f"word list {WORDS_PATH} not found: it ships with the repository; rebuild it with "
                                "`python -m dev.build_task_data --words <one-word-per-line file>`")
    with open_regular(WORDS_PATH) as raw, gzip.open(raw, "rt", encoding="utf-8") as f:
        return [w.strip() for w in f if w.strip()]


def check_split(name, size, split):
    if split not in ("train", "test"):
        raise ValueError(f"{name} split={split!r}: must be train|test")
    if not 0 < size <= 10_000_000:
        raise ValueError(f"{name} size={size}: must be in 1..10,000,000 (splits use disjoint seed ranges)")


def count_answer_parts(word, letter):
    """The ideal assistant message: spell, count step by step, double check with Python, give the number."""
    count = word.count(letter)
    lines = [f"Let me spell out {word} and count the letter '{letter}'.", "", f"{word}:{','.join(word)}", ""]
    running = 0
    for i, char in enumerate(word, 1):
        if char == letter:
            running += 1
            lines.append(f"{i}:{char} yes, {running} so far")  # no space between i and char: "1:a", one token pair
        else:
            lines.append(f"{i}:{char}")
    lines += ["", f"That makes {running}. Let me double check with Python:", "", ""]
    return [
        {"type": "text", "text": "\n".join(lines)},
        {"type": "python", "text": f"'{word}'.count('{letter}')"},
        {"type": "python_output", "text": str(count)},
        {"type": "text", "text": f"\n\nPython also says {count}.\n\n#### {count}"},
    ]


class SpellingBee(Task):
    eval_type = "generative"

    def __init__(self, size=1000, split="train", **kwargs):
        super().__init__(**kwargs)
        check_split("SpellingBee", size, split)
        self.size, self.split = size, split
        self.words = load_words()

    def num_examples(self):
        return self.size

    def get_example(self, index):
        rng = random.Random(SEED_OFFSETS[("bee", self.split)] + index)
        word = rng.choice(self.words)
        letter = rng.choice(word) if rng.random() < 0.9 else rng.choice(LETTERS)  # sometimes the answer is 0
        template = rng.choice(QUESTION_TEMPLATES)
        quote = rng.choice(["", "'", '"'])
        question = template.format(letter=f"{quote}{letter}{quote}", word=word)
        if rng.random() < 0.3:
            question = question.lower()  # people often type without capitals or a question mark
        if rng.random() < 0.6:
            question += "?"
        messages = [{"role": "user", "content": question},
                    {"role": "assistant", "content": count_answer_parts(word, letter)}]
        return {"messages": messages}

    def evaluate(self, conversation, completion):
        return evaluate_final_number(conversation, completion)


class SimpleSpelling(Task):
    eval_type = "generative"

    def __init__(self, size=1000, split="train", **kwargs):
        super().__init__(**kwargs)
        check_split("SimpleSpelling", size, split)
        self.size, self.split = size, split
        self.words = load_words()

    def num_examples(self):
        return self.size

    def get_example(self, index):
        rng = random.Random(SEED_OFFSETS[("spell", self.split)] + index)
        word = rng.choice(self.words)
        messages = [{"role": "user", "content": f"Spell the word: {word}"},
                    {"role": "assistant", "content": f"{word}:{','.join(word)}"}]
        return {"messages": messages}

    def evaluate(self, conversation, completion):
        return int(completion.strip() == conversation["messages"][-1]["content"])
