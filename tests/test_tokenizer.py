import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nanochat.tokenizer import SPECIAL_TOKENS, RustBPETokenizer, get_token_bytes, get_tokenizer

CORPUS = [
    "The quick brown fox jumps over the lazy dog. It was the best of times, it was the worst of times.",
    "def add(a, b):\n    return a + b\n\nprint(add(12, 34))  # 46\n",
    "In 1969 the first humans walked on the Moon; 2024 is a leap year with 366 days.",
    "Größe, naïve café, 你好世界, こんにちは, Привет мир, 🎉 emoji!",
] * 20


@pytest.fixture(scope="module")
def tok():
    return RustBPETokenizer.train_from_iterator(CORPUS, 400)


def special_ids(tok):
    return {tok.encode_special(s) for s in SPECIAL_TOKENS}


# -----------------------------------------------------------------------------
# encode / decode


def test_vocab_layout(tok):
    assert tok.get_vocab_size() == 400
    assert tok.get_special_tokens() == set(SPECIAL_TOKENS)
    # special tokens are the last 9 ids, in order, bos first
    assert [tok.encode_special(s) for s in SPECIAL_TOKENS] == list(range(391, 400))
    assert tok.get_bos_token_id() == 391
    assert tok.id_to_token(391) == "<|bos|>"
    assert tok.id_to_token(ord("a")) == "a"  # byte-level: the first 256 ids are the bytes
    # learned merges compress the training text
    assert len(tok.encode(CORPUS[0])) < len(CORPUS[0].encode()) / 2


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_roundtrip_unicode(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert not set(ids) & special_ids(tok)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.text(), max_size=8))
def test_roundtrip_batched(tok, texts):
    batch = tok.encode(texts, num_threads=2)
    assert batch == [tok.encode(t) for t in texts]
    assert [tok.decode(ids) for ids in batch] == texts


def test_user_text_never_yields_special_tokens(tok):
    for s in SPECIAL_TOKENS:
        text = f"hello {s} world{s}"
        ids = tok.encode(text)
        assert not set(ids) & special_ids(tok), s
        assert tok.decode(ids) == text
        assert tok.encode([text, s]) == [ids, tok.encode(s)]
    assert tok.encode("<|bos|>") != [tok.get_bos_token_id()]
    assert tok("<|bos|>") == tok.encode("<|bos|>")  # __call__ is encode


def test_prepend_append(tok):
    bos, end = tok.get_bos_token_id(), tok.encode_special("<|assistant_end|>")
    plain = tok.encode("hi there")
    assert tok.encode("hi there", prepend="<|bos|>", append="<|assistant_end|>") == [bos] + plain + [end]
    assert tok.encode("hi there", prepend=bos, append=end) == [bos] + plain + [end]
    assert tok.encode(["hi there", ""], prepend=bos) == [[bos] + plain, [bos]]
    assert tok.encode(["a"], append=end) == [tok.encode("a") + [end]]
    with pytest.raises(ValueError, match="not a special token"):
        tok.encode("x", prepend="<|nope|>")
    with pytest.raises(ValueError, match=r"id in \[0, 400\)"):
        tok.encode("x", append=400)
    with pytest.raises(TypeError, match="str or a list"):
        tok.encode(b"bytes")


def test_vocab_size_too_small():
    with pytest.raises(ValueError, match="vocab_size=264 is too small: it must be >= 265"):
        RustBPETokenizer.train_from_iterator(CORPUS, 264)


# -----------------------------------------------------------------------------
# chat rendering

CONVERSATION = {"messages": [
    {"role": "user", "content": "What is 6 times 7?"},
    {"role": "assistant", "content": [
        {"type": "text", "text": "Let me compute."},
        {"type": "python", "text": "6*7"},
        {"type": "python_output", "text": "42"},
        {"type": "text", "text": "It is 42."},
    ]},
    {"role": "user", "content": "Thanks!"},
    {"role": "assistant", "content": "You're welcome."},
]}


def expected_render(tok, first_user="What is 6 times 7?"):
    """The conversation above, rendered by hand: (ids, mask) built piece by piece."""
    sp = tok.encode_special
    pieces = [
        ([sp("<|bos|>")], 0),
        ([sp("<|user_start|>")] + tok.encode(first_user) + [sp("<|user_end|>")], 0),
        ([sp("<|assistant_start|>")], 0),
        (tok.encode("Let me compute."), 1),
        ([sp("<|python_start|>")] + tok.encode("6*7") + [sp("<|python_end|>")], 1),
        ([sp("<|output_start|>")] + tok.encode("42") + [sp("<|output_end|>")], 0),
        (tok.encode("It is 42.") + [sp("<|assistant_end|>")], 1),
        ([sp("<|user_start|>")] + tok.encode("Thanks!") + [sp("<|user_end|>")], 0),
        ([sp("<|assistant_start|>")], 0),
        (tok.encode("You're welcome.") + [sp("<|assistant_end|>")], 1),
    ]
    ids = [i for piece, _ in pieces for i in piece]
    mask = [m for piece, m in pieces for _ in piece]
    return ids, mask


def test_render_conversation_mask(tok):
    ids, mask = tok.render_conversation(CONVERSATION)
    assert (ids, mask) == expected_render(tok)
    # the supervised tokens are exactly the assistant's words, tool call and end tokens
    learned = tok.decode([i for i, m in zip(ids, mask) if m])
    assert learned == "Let me compute.<|python_start|>6*7<|python_end|>It is 42.<|assistant_end|>" \
                      "You're welcome.<|assistant_end|>"


def test_render_truncation(tok):
    full_ids, full_mask = tok.render_conversation(CONVERSATION)
    ids, mask = tok.render_conversation(CONVERSATION, max_tokens=10)
    assert (ids, mask) == (full_ids[:10], full_mask[:10])
    assert tok.render_conversation(CONVERSATION, max_tokens=10_000) == (full_ids, full_mask)


def test_render_system_message_merged(tok):
    conv = {"messages": [{"role": "system", "content": "Be brief."}] + CONVERSATION["messages"]}
    assert tok.render_conversation(conv) == expected_render(tok, first_user="Be brief.\n\nWhat is 6 times 7?")
    assert conv["messages"][1]["content"] == "What is 6 times 7?"  # input not mutated


def test_render_rejects_bad_roles(tok):
    with pytest.raises(ValueError, match="message 1 has role 'user', expected 'assistant'"):
        tok.render_conversation({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]})
    with pytest.raises(ValueError, match="message 0 has role 'assistant', expected 'user'"):
        tok.render_conversation({"messages": [{"role": "assistant", "content": "a"}]})
    with pytest.raises(ValueError, match="system message must be followed by a user message"):
        tok.render_conversation({"messages": [{"role": "system", "content": "a"}]})
    with pytest.raises(ValueError, match="unknown assistant part type 'image'"):
        tok.render_conversation({"messages": [{"role": "user", "content": "a"},
                                              {"role": "assistant", "content": [{"type": "image", "text": ""}]}]})
    with pytest.raises(ValueError, match="no messages"):
        tok.render_conversation({"messages": []})


def test_render_for_completion(tok):
    ids = tok.render_for_completion(CONVERSATION)
    prompt, _ = tok.render_conversation({"messages": CONVERSATION["messages"][:3]})
    assert ids == prompt + [tok.encode_special("<|assistant_start|>")]
    # the prompt is a prefix of the full rendering: the model continues exactly where training had the answer
    full_ids, _ = tok.render_conversation(CONVERSATION)
    assert full_ids[:len(ids)] == ids
    assert len(CONVERSATION["messages"]) == 4  # input not mutated
    # a conversation ending with the user gets the same prompt
    assert tok.render_for_completion({"messages": CONVERSATION["messages"][:3]}) == ids


# -----------------------------------------------------------------------------
# save / load


def test_save_load_roundtrip(tok, tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    tok.save(str(tmp_path / "tokenizer"))
    assert sorted(os.listdir(tmp_path / "tokenizer")) == ["token_bytes.pt", "tokenizer.json"]
    loaded = get_tokenizer()
    assert loaded.hash == tok.hash and len(tok.hash) == 64
    assert loaded.get_vocab_size() == tok.get_vocab_size()
    for text in CORPUS[:4] + ["<|bos|> unseen text ∑"]:
        assert loaded.encode(text) == tok.encode(text)
    assert loaded.render_conversation(CONVERSATION) == tok.render_conversation(CONVERSATION)

    token_bytes = get_token_bytes()
    assert token_bytes.dtype == torch.int64 and token_bytes.shape == (400,)
    for i in range(391):
        assert token_bytes[i] == len(tok.enc.decode_single_token_bytes(i))
    assert token_bytes[:256].tolist() == [1] * 256
    assert token_bytes[391:].tolist() == [0] * 9
    assert token_bytes.max() > 1  # merges are multi-byte


def test_hash_depends_on_training():
    a = RustBPETokenizer.train_from_iterator(CORPUS, 300)
    b = RustBPETokenizer.train_from_iterator(CORPUS, 300)
    c = RustBPETokenizer.train_from_iterator(CORPUS[1:2] * 20, 300)
    d = RustBPETokenizer.train_from_iterator(CORPUS, 320)
    assert a.hash == b.hash  # deterministic training
    assert len({a.hash, c.hash, d.hash}) == 3


def test_load_errors(tok, tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="python -m scripts.tok_train"):
        get_tokenizer()
    with pytest.raises(FileNotFoundError, match="python -m scripts.tok_train"):
        get_token_bytes()
    path = tmp_path / "tokenizer" / "tokenizer.json"
    tok.save(str(path.parent))
    data = json.loads(path.read_text())
    data["tokens"][300], data["tokens"][301] = data["tokens"][301], data["tokens"][300]
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="is corrupt"):
        get_tokenizer()


# -----------------------------------------------------------------------------
# scripts.tok_train on a tiny corpus


def write_shards(data_dir, shards):
    os.makedirs(data_dir, exist_ok=True)
    for i, docs in enumerate(shards):
        pq.write_table(pa.table({"text": docs}), os.path.join(data_dir, f"shard_{i:05d}.parquet"), row_group_size=4)


def test_tok_train_script(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    train_docs = [f"{CORPUS[i % 4]} number {i}" for i in range(40)]
    write_shards(tmp_path / "base_data", [train_docs[:20], train_docs[20:], ["validation text only"] * 4])
    from nanochat.cli import parse
    from nanochat.config import TokTrainConfig
    from nanochat.tokenizer import text_iterator, train_tokenizer

    # max_chars stops early; doc_cap crops each document; the validation shard is never read
    docs = list(text_iterator(max_chars=250, doc_cap=30))
    assert all(len(d) <= 30 for d in docs) and 250 <= sum(map(len, docs)) < 280
    assert list(text_iterator(10**9, 10**6)) == train_docs

    tok = train_tokenizer(vocab_size=300, max_chars=10**9, doc_cap=10_000)
    assert tok.get_vocab_size() == 300
    assert get_tokenizer().hash == tok.hash
    assert tok.hash == RustBPETokenizer.train_from_iterator(train_docs, 300).hash

    args = parse(TokTrainConfig, ["--", "--vocab-size=4096", "--max_chars", "2e6"])
    assert (args.vocab_size, args.max_chars, args.doc_cap) == (4096, 2_000_000, 10_000)
