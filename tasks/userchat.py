"""
Conversations of your own (--data=PATH.jsonl for mid_train and chat_sft; a directory of .jsonl files, and .gz/.zst,
work too), one conversation per line, in either layout:
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                  {"role": "assistant", "content": "Hello!"}]}
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
An optional system message comes first (it is folded into the first user message when rendered, as nanochat does:
the vocabulary has no system tokens), then user and assistant alternate, user first and assistant last, and no
content is empty. A user's content is a string (or OpenAI's list of {"type": "text", "text": ...} parts); an
assistant's is a string or a list of parts: {"type": "text", "text": ...}, {"type": "python", "text": "347+85"} (a
calculator call, which the model learns to write) followed by {"type": "python_output", "text": "432"} (its answer:
at inference the Engine computes it and puts it there, so it is not learned). Other keys are ignored.

Prepared once into parquet (one conversation per row, as JSON) under $NANOCHAT_BASE_DIR/user_chat/<key>/, with a
held-out split chosen by the hash of each conversation, as the pretraining text of nanochat/userdata.py (see
nanochat/userfiles.py for the key, the split and the one-line errors).
"""

import json
import os

import pyarrow.parquet as pq

from nanochat.config.data import CHAT_SPEC
from nanochat.log import print0
from nanochat.tools import use_calculator
from nanochat.userfiles import (
    check_bad_lines,
    content_key,
    find_files,
    loads_json,
    not_text,
    prepare_once,
    split_summary,
    text_lines,
    write_splits,
)
from tasks.common import Task

SUFFIXES = (".jsonl",)
FORMAT_VERSION = 1
COLUMN = "conversation"
ROLES = ("system", "user", "assistant")
PART_TYPES = ("text", "python", "python_output")


def parse_spec(spec):
    """'mine.jsonl:3' -> ('mine.jsonl', 3); 'mine.jsonl' -> ('mine.jsonl', 1). A path that exists as given is taken
    whole, ':3' and all."""
    if os.path.exists(spec):
        return spec, 1
    m = CHAT_SPEC.match(spec)
    return m.group("path"), int(m.group("weight") or 1)


def _text_parts(content, i):
    """A user or system content: a string, or a list of {"type": "text"} parts joined."""
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" and
                                         isinstance(p.get("text"), str) for p in content):
        content = "".join(p["text"] for p in content)
    if not isinstance(content, str):
        raise ValueError(f"message {i}: content must be a string (or a list of text parts), got "
                         f"{type(content).__name__}")
    return content


def _assistant_parts(content, i):
    """An assistant content: a string, or a list of text / python / python_output parts (each output right after
    its call)."""
    if isinstance(content, str):
        return content, content
    if not isinstance(content, list):
        raise ValueError(f"message {i}: the assistant's content must be a string or a list of parts, got "
                         f"{type(content).__name__}")
    parts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in PART_TYPES or not isinstance(part.get("text"), str):
            raise ValueError(f"message {i} part {j}: expected {{\"type\": one of {'|'.join(PART_TYPES)}, \"text\": "
                             f"a string}}, got {json.dumps(part)[:80]}")
        if kind == "python_output" and (not parts or parts[-1]["type"] != "python"):
            raise ValueError(f"message {i} part {j}: a python_output must come right after its python call")
        parts.append({"type": kind, "text": part["text"]})
    return parts, "".join(p["text"] for p in parts)


def conversation_messages(item):
    """The messages of one JSON line, checked and reduced to role and content; ValueError(what is wrong)."""
    messages = item.get("messages") if isinstance(item, dict) else item
    if not isinstance(messages, list):
        raise ValueError('expected {"messages": [...]} or a list of messages, got a JSON '
                         f"{type(item).__name__}" + (" without 'messages'" if isinstance(item, dict) else ""))
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise ValueError(f"message {i}: expected an object with 'role' and 'content'")
        role = message["role"]
        if role not in ROLES:
            raise ValueError(f"message {i}: role {role!r} is not one of {', '.join(ROLES)} (a tool call goes in the "
                             f"assistant's content, as python and python_output parts)")
        if role == "system" and i > 0:
            raise ValueError(f"message {i}: a system message can only come first")
        turn = i - (1 if out and out[0]["role"] == "system" else 0)
        expected = "user" if turn % 2 == 0 else "assistant"
        if role != "system" and role != expected:
            raise ValueError(f"message {i}: role {role!r} where {expected!r} belongs (an optional system message, "
                             f"then user and assistant alternating, user first)")
        content, text = _assistant_parts(message["content"], i) if role == "assistant" else (
            (_text_parts(message["content"], i),) * 2)
        if not text.strip():
            raise ValueError(f"message {i} ({role}): empty content")
        out.append({"role": role, "content": content})
    if not out or out[-1]["role"] != "assistant":
        raise ValueError("no assistant message at the end: nothing for the model to learn" if out else "no messages")
    return out


def tool_mismatches(messages):
    """Calculator calls whose python_output is not what the Engine's calculator answers (or that it refuses)."""
    count = 0
    for message in messages:
        parts = message["content"] if isinstance(message["content"], list) else []
        for call, output in zip(parts, parts[1:]):
            if call["type"] == "python" and output["type"] == "python_output":
                count += str(use_calculator(call["text"])) != output["text"].strip()
    return count


def file_conversations(path, shown, bad, on_progress, record):
    """The JSON of each checked conversation of a file; its calculator mismatches are counted into its record."""
    record.setdefault("tool_mismatches", 0)
    for lineno, line in text_lines(path, shown, bad, whole=True, on_progress=on_progress):
        if not line.strip():
            continue
        ok, item = loads_json(line, lineno, bad)
        if not ok:
            continue
        try:
            messages = conversation_messages(item)
        except ValueError as e:
            bad(lineno, str(e))
            continue
        text = json.dumps(messages, ensure_ascii=False)
        if not_text(text):
            bad(lineno, f"the conversation holds {not_text(text)}")
            continue
        record["tool_mismatches"] += tool_mismatches(messages)
        yield text


def build(files, hashes, root, val_fraction, skip_bad_lines, staging):
    """Every file's conversations into a training and a held-out split; returns the manifest."""
    records, train_shards, val_shard = write_splits(files, hashes, root, val_fraction, skip_bad_lines, staging,
                                                    file_conversations, "conversation", column=COLUMN)
    return {"kind": "chat", "format_version": FORMAT_VERSION, "val_fraction": val_fraction, "files": records,
            **split_summary(records, "conversation"), "train_shards": train_shards, "val_shard": val_shard,
            "tool_mismatches": sum(r["tool_mismatches"] for r in records)}


def prepare_conversations(path, val_fraction=0.05, skip_bad_lines=False):
    """(directory, manifest) of the conversations under PATH, prepared on first use."""
    files = find_files(path, SUFFIXES)
    settings = {"kind": "chat", "format_version": FORMAT_VERSION, "val_fraction": val_fraction}
    key, hashes = content_key(files, settings)
    directory, manifest = prepare_once(
        "user_chat", key, lambda staging: build(files, hashes, path.rstrip("/") or path, val_fraction,
                                                skip_bad_lines, staging), f"--data={path}")
    check_bad_lines(manifest, skip_bad_lines)
    print0(f"--data={path}: {manifest['conversations']:,} conversations, {manifest['train_conversations']:,} for "
           f"training, {manifest['val_conversations']:,} held out")
    if manifest["tool_mismatches"]:
        print0(f"note: {manifest['tool_mismatches']} calculator call(s) in {path} have a python_output that is not "
               f"what the calculator answers: at inference the Engine writes the calculator's answer there")
    return directory, manifest


class UserConversations(Task):
    """One split of a prepared --data file: its conversations, in the order of their hash (nanochat/userfiles.py)."""

    def __init__(self, directory, manifest, split, name, **kwargs):
        super().__init__(**kwargs)
        if split not in ("train", "val"):
            raise ValueError(f"split={split!r}: must be train|val")
        self.name, self.split = name, split
        files = manifest["train_shards"] if split == "train" else [manifest["val_shard"]]
        self.rows = pq.ParquetDataset([os.path.join(directory, f) for f in files]).read().column(COLUMN)

    def num_examples(self):
        return len(self.rows)

    def get_example(self, index):
        return {"messages": json.loads(self.rows[index].as_py())}


def data_record(spec, directory, manifest, weight):
    """What a run records of one --data file: path, weight, content hash, counts, and each file's name and hash."""
    return {"path": os.path.abspath(spec), "weight": weight, "key": manifest["key"], "dir": directory,
            "conversations": manifest["conversations"], "train_conversations": manifest["train_conversations"],
            "val_conversations": manifest["val_conversations"], "bad_lines_skipped": manifest["bad_lines"],
            "files": [{k: f[k] for k in ("name", "sha256", "conversations")} for f in manifest["files"][:100]]}
