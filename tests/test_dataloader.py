import json
import os
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from nanochat.dataloader import DataLoader
from nanochat.tokenizer import RustBPETokenizer

WORDS = "the of and to in is was for on that with as by at from his her which are be this had not".split()
N_TRAIN_SHARDS, ROWS_PER_GROUP, GROUPS_PER_SHARD = 2, 3, 4


def make_doc(doc_id):
    """A document whose id can be read back from the decoded token stream ("id17x")."""
    n = 5 + doc_id % 7
    return f"id{doc_id}x " + " ".join(WORDS[(doc_id * 7 + k) % len(WORDS)] for k in range(n)) + "."


@pytest.fixture()
def data(tmp_path, monkeypatch):
    """Base dir with 2 train shards and 1 val shard of 4 row groups x 3 docs each, and a small tokenizer."""
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    data_dir = tmp_path / "base_data"
    os.makedirs(data_dir)
    docs_per_shard = ROWS_PER_GROUP * GROUPS_PER_SHARD
    all_docs = []
    for shard in range(N_TRAIN_SHARDS + 1):
        docs = [make_doc(shard * docs_per_shard + i) for i in range(docs_per_shard)]
        pq.write_table(pa.table({"text": docs}), data_dir / f"shard_{shard:05d}.parquet", row_group_size=ROWS_PER_GROUP)
        all_docs.append(docs)
    train_docs = [d for docs in all_docs[:-1] for d in docs]
    tok = RustBPETokenizer.train_from_iterator(train_docs, 300)
    return tok, train_docs, all_docs[-1]


def stream_of(batches):
    """The contiguous token stream the batches were cut from (consecutive windows share one token)."""
    tokens = batches[0][0][0, :1].tolist()
    for _, targets in batches:
        tokens += targets.flatten().tolist()
    return tokens


def doc_ids(tok, tokens):
    return {int(m) for m in re.findall(r"id(\d+)x", tok.decode(tokens))}


def take(loader, n):
    return [next(loader) for _ in range(n)]


def test_batches_shapes_and_shift(data):
    tok, _, _ = data
    loader = DataLoader(4, 16, "train", tokenizer=tok, rank=0, world_size=1)
    batches = take(loader, 5)
    for inputs, targets in batches:
        assert inputs.shape == targets.shape == (4, 16)
        assert inputs.dtype == targets.dtype == torch.int64
        # targets are the inputs shifted by one along the flattened window
        assert torch.equal(inputs.flatten()[1:], targets.flatten()[:-1])
    # consecutive windows are contiguous: the last target is the next window's first input
    for (_, t0), (i1, _) in zip(batches, batches[1:]):
        assert t0[-1, -1] == i1[0, 0]
    stream = stream_of(batches)
    bos = tok.get_bos_token_id()
    assert stream[0] == bos and stream.count(bos) >= 5
    # the stream is the documents in order, each with BOS in front
    first_doc = make_doc(0)
    assert stream[:1 + len(tok.encode(first_doc))] == tok.encode(first_doc, prepend=bos)
    assert tok.decode(stream).startswith("<|bos|>" + first_doc + "<|bos|>" + make_doc(1))


def test_val_split_reads_only_the_last_shard(data):
    tok, train_docs, val_docs = data
    stream = stream_of(take(DataLoader(2, 16, "val", tokenizer=tok, rank=0, world_size=1), 20))
    assert doc_ids(tok, stream) == {int(re.match(r"id(\d+)x", d).group(1)) for d in val_docs}


def test_loops_past_one_epoch(data):
    tok, train_docs, _ = data
    loader = DataLoader(2, 16, "train", tokenizer=tok, rank=0, world_size=1)
    total_tokens = sum(len(ids) + 1 for ids in tok.encode(train_docs))
    n = 3 * total_tokens // (2 * 16) + 1  # three epochs' worth
    batches = take(loader, n)
    assert loader.epoch == 3
    stream = stream_of(batches)
    # epoch 2 repeats epoch 1 token for token
    assert stream[total_tokens:2 * total_tokens] == stream[:total_tokens]


@pytest.mark.parametrize("k", [0, 1, 3, 7, 12])
def test_resume_gives_identical_batches(data, k):
    tok, train_docs, _ = data
    B, T, m = 2, 8, 10
    reference = take(DataLoader(B, T, "train", tokenizer=tok, rank=0, world_size=1, tokenizer_batch_size=2), k + m)
    loader = DataLoader(B, T, "train", tokenizer=tok, rank=0, world_size=1, tokenizer_batch_size=2)
    take(loader, k)
    state = json.loads(json.dumps(loader.state_dict()))
    restored = DataLoader(B, T, "train", tokenizer=tok, rank=0, world_size=1, tokenizer_batch_size=2)
    restored.load_state_dict(state)
    for (ri, rt), (i, t) in zip(reference[k:], take(restored, m)):
        assert torch.equal(ri, i) and torch.equal(rt, t)
    # the state stays small: at most one tokenizer batch of documents beyond the next window
    assert len(state["buffer"]) <= B * T + 1 + sum(len(ids) + 1 for ids in tok.encode(train_docs[:2]))


def test_resume_across_epoch_boundary(data):
    tok, train_docs, _ = data
    loader = DataLoader(1, 8, "train", tokenizer=tok, rank=1, world_size=2)
    reference = DataLoader(1, 8, "train", tokenizer=tok, rank=1, world_size=2)
    states = []
    for _ in range(80):  # over two epochs of rank 1's half
        states.append(json.loads(json.dumps(loader.state_dict())))
        next(loader)
    assert loader.epoch >= 2
    expected = take(reference, 90)
    for step in range(0, 80, 9):
        restored = DataLoader(1, 8, "train", tokenizer=tok, rank=1, world_size=2)
        restored.load_state_dict(states[step])
        for ref, got in zip(expected[step:step + 10], take(restored, 10)):
            assert torch.equal(ref[0], got[0]) and torch.equal(ref[1], got[1])


def test_ranks_get_disjoint_documents(data):
    tok, train_docs, _ = data
    seen = []
    for rank in (0, 1):
        loader = DataLoader(2, 16, "train", tokenizer=tok, rank=rank, world_size=2)
        seen.append(doc_ids(tok, stream_of(take(loader, 30))))  # 30 batches: more than an epoch of the half
        assert loader.epoch >= 1
    all_ids = set(range(len(train_docs)))
    assert seen[0] and seen[1]
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] == all_ids


def test_state_mismatch_and_bad_args(data):
    tok, _, _ = data
    state = DataLoader(2, 8, "train", tokenizer=tok, rank=0, world_size=2).state_dict()
    with pytest.raises(ValueError, match="rank=0 world_size=2, this loader is split='train' rank=1 world_size=2"):
        DataLoader(2, 8, "train", tokenizer=tok, rank=1, world_size=2).load_state_dict(state)
    with pytest.raises(ValueError, match="split='test'; allowed: 'train', 'val'"):
        DataLoader(2, 8, "test", tokenizer=tok, rank=0, world_size=1)
    with pytest.raises(ValueError, match=r"rank=2 must be in \[0, world_size=2\)"):
        DataLoader(2, 8, "train", tokenizer=tok, rank=2, world_size=2)


def test_default_tokenizer_and_rank(data, tmp_path):
    tok, _, _ = data
    tok.save(str(tmp_path / "tokenizer"))
    loader = DataLoader(2, 8, "train")  # tokenizer from the base dir, rank 0 of 1 outside torchrun
    assert (loader.rank, loader.world_size) == (0, 1)
    reference = DataLoader(2, 8, "train", tokenizer=tok, rank=0, world_size=1)
    assert torch.equal(next(loader)[0], next(reference)[0])
