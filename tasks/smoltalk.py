"""
SmolTalk: general chat conversations for finetuning.
https://huggingface.co/datasets/HuggingFaceTB/smol-smoltalk (data/train-*.parquet, data/test-*.parquet)
Offline source: data/chat/smoltalk_{split}.jsonl.gz, a few hundred short conversations generated from templates
by dev/build_task_data.py (greetings, arithmetic, spelling, simple facts, questions about nanochat).
"""

import os

from tasks.common import REPO_DATA_DIR, Task, load_rows


def check_messages(messages, where):
    """An optional system message, then user and assistant strictly alternating, user first, string contents."""
    rest = messages[1:] if messages and messages[0]["role"] == "system" else messages
    if len(rest) < 2:
        raise ValueError(f"{where}: a conversation needs at least a user and an assistant message, got {len(rest)}")
    for i, message in enumerate(rest):
        expected = "user" if i % 2 == 0 else "assistant"
        if message.get("role") != expected:
            raise ValueError(f"{where}: message {i} has role {message.get('role')!r}, expected {expected!r}")
        if not isinstance(message.get("content"), (str, list)):
            raise ValueError(f"{where}: message {i} content must be a string or a list of parts")


class SmolTalk(Task):

    def __init__(self, split, **kwargs):
        super().__init__(**kwargs)
        if split not in ("train", "test"):
            raise ValueError(f"SmolTalk split={split!r}: must be train|test")
        self.split = split
        offline = [os.path.join(REPO_DATA_DIR, "chat", f"smoltalk_{split}.jsonl.gz")]
        self.rows = load_rows("HuggingFaceTB/smol-smoltalk", "data", split, offline, what="SmolTalk").shuffle(seed=42)

    def get_example(self, index):
        messages = [{"role": m["role"], "content": m["content"]} for m in self.rows[index]["messages"]]
        check_messages(messages, f"SmolTalk {self.split} row {index}")
        return {"messages": messages}
