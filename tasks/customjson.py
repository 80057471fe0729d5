"""
Conversations from a JSONL file of your own, one conversation per line: either a list of messages
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
or an object with a "messages" list (the hub's chat layout). See data/chat/identity_conversations.jsonl.
"""

import json
import os

from nanochat.fileio import open_regular
from tasks.common import Task
from tasks.smoltalk import check_messages


class CustomJSON(Task):

    def __init__(self, filepath, **kwargs):
        super().__init__(**kwargs)
        if not os.path.exists(filepath):
            raise FileNotFoundError(f"CustomJSON: {filepath} does not exist. Give a JSONL file with one "
                                    "conversation per line, e.g. data/chat/identity_conversations.jsonl")
        self.filepath = filepath
        self.conversations = []
        with open_regular(filepath, "r", encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    item = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{filepath}:{lineno}: not valid JSON ({e})") from None
                messages = item["messages"] if isinstance(item, dict) and "messages" in item else item
                if not isinstance(messages, list):
                    raise ValueError(f"{filepath}:{lineno}: expected a list of messages or an object with "
                                     f"'messages', got {type(item).__name__}")
                check_messages(messages, f"{filepath}:{lineno}")
                self.conversations.append(messages)

    def num_examples(self):
        return len(self.conversations)

    def get_example(self, index):
        return {"messages": self.conversations[index]}
