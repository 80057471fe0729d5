"""
BPE tokenizer in the style of GPT-4: trained with rustbpe, encoded with tiktoken.

- Training: rustbpe learns byte-level merges from a text iterator (fast, parallel, Rust).
- Inference: the learned ranks plus the special tokens become a tiktoken.Encoding (fast, releases the GIL).
- Byte-level: the 256 single bytes are always in the vocab, so any unicode text round-trips.
- Special tokens sit at the end of the vocab and are never produced from user text.
"""

import base64
import binascii
import copy
import hashlib
import io
import json
import os
import time
import warnings

import rustbpe
import tiktoken
import torch

from nanochat.dataset import parquets_iter_batched
from nanochat.fileio import FileError, atomic_write_bytes, get_base_dir, open_regular, read_json
from nanochat.log import UserError, one_line, print0, progress

SPECIAL_TOKENS = [
    "<|bos|>",  # every document begins with it
    "<|user_start|>", "<|user_end|>",  # chat turns
    "<|assistant_start|>", "<|assistant_end|>",
    "<|python_start|>", "<|python_end|>",  # the assistant calls the python tool
    "<|output_start|>", "<|output_end|>",  # the tool's output, fed back to the assistant
]

# GPT-4's split pattern except numbers are split into chunks of at most 2 digits (GPT-4: 3), which spends
# fewer vocab entries on numbers: that matters for the small vocabularies trained here.
SPLIT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
)

TOKENIZER_FILE = "tokenizer.json"
TOKEN_BYTES_FILE = "token_bytes.pt"
TRAINED_ON_FILE = "trained_on.json"  # which data the tokenizer was trained on: {"hash", "data": {path, key} | None}
FORMAT_VERSION = 1


def _content_hash(mergeable_ranks, special_tokens, pattern):
    """sha256 over everything that decides how text maps to ids (ranks in order, special tokens, split pattern)."""
    h = hashlib.sha256()
    h.update(pattern.encode("utf-8"))
    for token_bytes, rank in sorted(mergeable_ranks.items(), key=lambda kv: kv[1]):
        h.update(rank.to_bytes(4, "little") + len(token_bytes).to_bytes(4, "little") + token_bytes)
    for name, idx in sorted(special_tokens.items(), key=lambda kv: kv[1]):
        h.update(idx.to_bytes(4, "little") + name.encode("utf-8") + b"\0")
    return h.hexdigest()


class TokenizerNotFound(UserError, FileNotFoundError):
    """No trained tokenizer where one is expected; the message says how to train one."""


class TokenizerError(UserError, ValueError):
    """A tokenizer file that is damaged or not what it claims; the message names it and says how to replace it."""


RETRAIN = "retrain with `python -m scripts.tok_train`"


def _saved_problem(data):
    """Why the JSON of a tokenizer.json is not one that save() wrote (None when it could be)."""
    if not isinstance(data, dict):
        return f"it holds a JSON {type(data).__name__}, not an object"
    if data.get("format_version") != FORMAT_VERSION:
        return f"it has format_version={data.get('format_version')!r}, this code reads {FORMAT_VERSION}"
    if data.get("special_tokens") != SPECIAL_TOKENS:
        return f"it has special tokens {str(data.get('special_tokens'))[:200]}, expected {SPECIAL_TOKENS}"
    for key, typ in (("hash", str), ("pattern", str), ("tokens", list)):
        if not isinstance(data.get(key), typ):
            return f"its {key} is a {type(data.get(key)).__name__}, expected a {typ.__name__}"
    if not all(isinstance(t, str) for t in data["tokens"]):
        return "its tokens are not all base64 strings"
    return None


class RustBPETokenizer:
    """Wraps a tiktoken.Encoding; `mergeable_ranks` and `pattern` are kept for saving and export."""

    def __init__(self, mergeable_ranks, pattern=SPLIT_PATTERN):
        self.mergeable_ranks = dict(mergeable_ranks)
        self.pattern = pattern
        n = len(self.mergeable_ranks)
        if sorted(self.mergeable_ranks.values()) != list(range(n)):
            raise ValueError(f"mergeable ranks must be exactly 0..{n - 1}; got {n} ranks that are not contiguous")
        self.special_tokens = {name: n + i for i, name in enumerate(SPECIAL_TOKENS)}
        self.enc = tiktoken.Encoding(
            name="rustbpe", pat_str=pattern, mergeable_ranks=self.mergeable_ranks, special_tokens=self.special_tokens
        )
        self.hash = _content_hash(self.mergeable_ranks, self.special_tokens, pattern)
        self.bos_token_id = self.special_tokens["<|bos|>"]

    # -------------------------------------------------------------------------
    # Training, saving, loading

    @classmethod
    def train_from_iterator(cls, text_iterator, vocab_size):
        min_size = 256 + len(SPECIAL_TOKENS)
        if vocab_size < min_size:
            raise ValueError(
                f"vocab_size={vocab_size} is too small: it must be >= {min_size} "
                f"(256 byte tokens + {len(SPECIAL_TOKENS)} special tokens)"
            )
        trainer = rustbpe.Tokenizer()
        trainer.train_from_iterator(iter(text_iterator), vocab_size - len(SPECIAL_TOKENS), pattern=SPLIT_PATTERN)
        ranks = {bytes(b): r for b, r in trainer.get_mergeable_ranks()}
        tokenizer = cls(ranks, SPLIT_PATTERN)
        if tokenizer.get_vocab_size() < vocab_size:
            # rustbpe stops once no pair occurs twice: a corpus this small cannot fill the vocab
            print0(
                f"the corpus only supported {len(ranks) - 256} merges: vocab_size is "
                f"{tokenizer.get_vocab_size()} instead of the requested {vocab_size}; train on more text for more"
            )
        return tokenizer

    @classmethod
    def from_directory(cls, tokenizer_dir):
        path = os.path.join(tokenizer_dir, TOKENIZER_FILE)
        if not os.path.lexists(path):
            raise TokenizerNotFound(
                f"no tokenizer at {path}; train one with `python -m scripts.tok_train` "
                f"(it saves to $NANOCHAT_BASE_DIR/tokenizer)"
            )
        data = read_json(path, error=TokenizerError)
        problem = _saved_problem(data)
        if problem:
            raise TokenizerError(f"{path} is not a nanochat tokenizer: {problem}; {RETRAIN}")
        try:
            ranks = {base64.b64decode(b, validate=True): rank for rank, b in enumerate(data["tokens"])}
            tokenizer = cls(ranks, data["pattern"])
        except (binascii.Error, ValueError, TypeError, OverflowError) as e:  # bad base64, duplicates, a bad regex
            raise TokenizerError(f"{path} is corrupt ({one_line(e)}); {RETRAIN}") from None
        if tokenizer.hash != data["hash"]:
            raise TokenizerError(
                f"{path} is corrupt: stored hash {data['hash'][:12]}.. != content hash {tokenizer.hash[:12]}..; "
                f"{RETRAIN}"
            )
        return tokenizer

    def save(self, tokenizer_dir):
        """Write tokenizer.json (ranks as base64 in rank order, pattern, hash) and token_bytes.pt, atomically."""
        os.makedirs(tokenizer_dir, exist_ok=True)
        by_rank = sorted(self.mergeable_ranks.items(), key=lambda kv: kv[1])
        tokens = [base64.b64encode(b).decode("ascii") for b, _ in by_rank]
        data = {"format_version": FORMAT_VERSION, "hash": self.hash, "pattern": self.pattern,
                "special_tokens": SPECIAL_TOKENS, "tokens": tokens}
        atomic_write_bytes(os.path.join(tokenizer_dir, TOKENIZER_FILE), json.dumps(data).encode("utf-8"))
        buf = io.BytesIO()
        torch.save(self.token_bytes(), buf)
        atomic_write_bytes(os.path.join(tokenizer_dir, TOKEN_BYTES_FILE), buf.getvalue())

    def token_bytes(self):
        """(vocab,) int64: UTF-8 byte length of each token, 0 for special tokens (excluded from bits-per-byte)."""
        lengths = torch.zeros(self.get_vocab_size(), dtype=torch.int64)
        for b, rank in self.mergeable_ranks.items():
            lengths[rank] = len(b)
        return lengths

    # -------------------------------------------------------------------------
    # Vocabulary

    def get_vocab_size(self):
        return self.enc.n_vocab

    def get_special_tokens(self):
        return set(self.special_tokens)

    def id_to_token(self, id):
        return self.enc.decode([id])

    def encode_special(self, text):
        if text not in self.special_tokens:
            raise ValueError(f"{text!r} is not a special token; special tokens are {SPECIAL_TOKENS}")
        return self.special_tokens[text]

    def get_bos_token_id(self):
        return self.bos_token_id

    # -------------------------------------------------------------------------
    # Encoding, decoding

    def _as_id(self, token):
        if isinstance(token, str):
            return self.encode_special(token)
        if isinstance(token, int) and 0 <= token < self.get_vocab_size():
            return token
        raise ValueError(f"prepend/append must be a special token string or an id in [0, {self.get_vocab_size()}); "
                         f"got {token!r}")

    def encode(self, text, prepend=None, append=None, num_threads=8):
        """str -> list[int]; list[str] -> list[list[int]] (encoded in parallel). Text that spells a special
        token ("<|bos|>") is encoded as ordinary text: only prepend/append can add special ids."""
        prepend_id = None if prepend is None else self._as_id(prepend)
        append_id = None if append is None else self._as_id(append)
        if isinstance(text, str):
            ids = self.enc.encode_ordinary(text)
            if prepend_id is not None:
                ids.insert(0, prepend_id)
            if append_id is not None:
                ids.append(append_id)
            return ids
        if isinstance(text, list):
            batch = self.enc.encode_ordinary_batch(text, num_threads=num_threads)
            if prepend_id is not None:
                batch = [[prepend_id] + ids for ids in batch]
            if append_id is not None:
                for ids in batch:
                    ids.append(append_id)
            return batch
        raise TypeError(f"encode() takes a str or a list[str], got {type(text).__name__}")

    __call__ = encode

    def decode(self, ids):
        return self.enc.decode(list(ids))

    # -------------------------------------------------------------------------
    # Chat rendering

    def render_conversation(self, conversation, max_tokens=2048):
        """Conversation -> (ids, mask). mask[i] = 1 where the model is trained to predict ids[i]: the assistant's
        text, its python tool calls and <|assistant_end|>; 0 for bos, user turns and python outputs (those come from
        the user and the tool at inference time). Truncated to max_tokens (None: no truncation)."""
        messages = _merge_system_message(_get_messages(conversation))
        ids, mask = [], []

        def add(token_ids, m):
            if isinstance(token_ids, int):
                token_ids = [token_ids]
            ids.extend(token_ids)
            mask.extend([m] * len(token_ids))

        special = self.special_tokens
        add(self.bos_token_id, 0)
        for i, message in enumerate(messages):
            role, content = message["role"], message["content"]
            if role == "user":
                if not isinstance(content, str):
                    raise ValueError(f"message {i}: user content must be a str, got {type(content).__name__}")
                add(special["<|user_start|>"], 0)
                add(self.encode(content), 0)
                add(special["<|user_end|>"], 0)
                continue
            add(special["<|assistant_start|>"], 0)
            parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
            for part in parts:
                kind, text = part.get("type"), part.get("text", "")
                if kind == "text":
                    add(self.encode(text), 1)
                elif kind == "python":  # the model writes the tool call: supervised
                    add(special["<|python_start|>"], 1)
                    add(self.encode(text), 1)
                    add(special["<|python_end|>"], 1)
                elif kind == "python_output":  # the tool writes the result: not supervised
                    add(special["<|output_start|>"], 0)
                    add(self.encode(text), 0)
                    add(special["<|output_end|>"], 0)
                else:
                    raise ValueError(f"message {i}: unknown assistant part type {kind!r}; "
                                     f"allowed: 'text', 'python', 'python_output'")
            add(special["<|assistant_end|>"], 1)
        if max_tokens is not None:
            ids, mask = ids[:max_tokens], mask[:max_tokens]
        return ids, mask

    def render_for_completion(self, conversation):
        """Prompt for the assistant's reply: the conversation without its last assistant message (if it ends with
        one), followed by <|assistant_start|>. Used for RL and evaluation. Never truncated."""
        messages = list(_get_messages(conversation))
        if messages and messages[-1]["role"] == "assistant":
            messages.pop()
        if not messages:
            raise ValueError("render_for_completion needs at least one user message before the assistant's reply")
        ids, _ = self.render_conversation({"messages": copy.deepcopy(messages)}, max_tokens=None)
        ids.append(self.special_tokens["<|assistant_start|>"])
        return ids


def _get_messages(conversation):
    messages = conversation["messages"] if isinstance(conversation, dict) else conversation
    if not messages:
        raise ValueError("conversation has no messages")
    return messages


def _merge_system_message(messages):
    """A system message is folded into the first user message (the vocab has no system tokens); then roles must
    alternate user, assistant, user, ..."""
    if messages[0]["role"] == "system":
        if len(messages) < 2 or messages[1]["role"] != "user":
            raise ValueError("a system message must be followed by a user message")
        merged = {"role": "user", "content": messages[0]["content"] + "\n\n" + messages[1]["content"]}
        messages = [merged] + list(messages[2:])
    for i, message in enumerate(messages):
        expected = "user" if i % 2 == 0 else "assistant"
        if message.get("role") != expected:
            roles = [m.get("role") for m in messages]
            raise ValueError(f"message {i} has role {message.get('role')!r}, expected {expected!r}: roles must "
                             f"alternate user/assistant starting with user (after an optional system); got {roles}")
    return messages


def get_tokenizer():
    """The tokenizer trained by `python -m scripts.tok_train`, from $NANOCHAT_BASE_DIR/tokenizer."""
    return RustBPETokenizer.from_directory(os.path.join(get_base_dir(), "tokenizer"))


def trained_on():
    """What the tokenizer in $NANOCHAT_BASE_DIR/tokenizer was trained on: {"path", "key"} of the user's data, None for
    the default shards, or "unknown" (trained before this was recorded, or imported)."""
    try:
        note = read_json(os.path.join(get_base_dir(), "tokenizer", TRAINED_ON_FILE))
    except FileError:
        return "unknown"
    return note.get("data") if note.get("hash") == get_tokenizer().hash else "unknown"


def get_token_bytes(device="cpu", vocab_size=None):
    """(vocab,) int64 byte length per token id (0 for special tokens), saved beside the tokenizer. A file that is
    not such a tensor (of vocab_size entries, when given) is a TokenizerError."""
    path = os.path.join(get_base_dir(), "tokenizer", TOKEN_BYTES_FILE)
    if not os.path.lexists(path):
        raise TokenizerNotFound(f"no {path}; train the tokenizer with `python -m scripts.tok_train`")
    try:
        with open_regular(path, error=TokenizerError) as f, warnings.catch_warnings():
            warnings.filterwarnings("ignore", "Detected pickle protocol")
            lengths = torch.load(f, map_location="cpu", weights_only=True)
    except TokenizerError:
        raise
    except Exception as e:  # the restricted unpickler's and the zip reader's errors vary; all mean "not loadable"
        raise TokenizerError(f"{path} is not a token_bytes file ({one_line(e)[:120]}); {RETRAIN}") from None
    if not (isinstance(lengths, torch.Tensor) and lengths.ndim == 1 and lengths.dtype == torch.int64
            and bool((lengths >= 0).all())):
        what = f"a {type(lengths).__name__}" if not isinstance(lengths, torch.Tensor) else \
            f"a {lengths.dtype} tensor of shape {tuple(lengths.shape)}"
        raise TokenizerError(f"{path} holds {what}, not the byte lengths of the tokens (int64, 1-D, >= 0); {RETRAIN}")
    if vocab_size is not None and lengths.numel() != vocab_size:
        raise TokenizerError(f"{path} has {lengths.numel()} entries but the tokenizer {vocab_size} tokens: it "
                             f"belongs to another tokenizer; {RETRAIN}")
    return lengths.to(device)


# -----------------------------------------------------------------------------
# Training on the training split


def text_iterator(max_chars, doc_cap, data_dir=None):
    """Training documents, each cropped to doc_cap characters (a few huge documents must not dominate the pair
    counts), until max_chars characters in total or the end of the training split (of data_dir's shards; default:
    dataset.get_data_dir())."""
    nchars = 0
    for docs in parquets_iter_batched("train", data_dir=data_dir):
        for doc in docs:
            doc = doc[:doc_cap]
            nchars += len(doc)
            yield doc
            if nchars >= max_chars:
                return


def train_tokenizer(vocab_size=65536, max_chars=2_000_000_000, doc_cap=10_000, tokenizer_dir=None, data_dir=None,
                    data=None):
    """Train on the training split (of data_dir's shards), save to tokenizer_dir (default
    $NANOCHAT_BASE_DIR/tokenizer) with a note of the data (`data`: the user's, see trained_on), print a summary."""
    tokenizer_dir = tokenizer_dir or os.path.join(get_base_dir(), "tokenizer")
    stats = {"chars": 0, "docs": 0}

    def counted():  # the bar counts characters read, up to max_chars; the merges that follow are not counted
        with progress(desc="tokenizer text", total=max_chars, unit="char", unit_scale=True) as bar:
            for doc in text_iterator(max_chars, doc_cap, data_dir):
                stats["chars"] += len(doc)
                stats["docs"] += 1
                bar.update(min(len(doc), max_chars - bar.n))  # the last document may pass max_chars
                yield doc

    t0 = time.time()
    tokenizer = RustBPETokenizer.train_from_iterator(counted(), vocab_size)
    train_time = time.time() - t0
    tokenizer.save(tokenizer_dir)
    note = {"hash": tokenizer.hash, "data": data}  # data None: the default shards (downloaded or embedded)
    atomic_write_bytes(os.path.join(tokenizer_dir, TRAINED_ON_FILE), json.dumps(note, indent=1).encode())

    token_bytes = tokenizer.token_bytes()
    ordinary = token_bytes[token_bytes > 0].float()
    sample = "Hello world! The year 2024 has 366 days; x = 3.14159 * r**2."
    print0(f"Trained on {stats['docs']:,} documents, {stats['chars']:,} characters in {train_time:.2f}s")
    print0(f"vocab_size: {tokenizer.get_vocab_size():,} ({len(tokenizer.get_special_tokens())} special tokens)")
    print0(f"token bytes: min {int(ordinary.min())}, max {int(ordinary.max())}, mean {ordinary.mean():.2f}")
    print0(f"sample: {sample!r} -> {len(tokenizer.encode(sample))} tokens ({len(sample.encode())} bytes)")
    print0(f"hash: {tokenizer.hash}")
    print0(f"saved to {tokenizer_dir}")
    return tokenizer
