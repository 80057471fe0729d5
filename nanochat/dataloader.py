"""
Pretraining data loader: parquet documents -> BOS-prefixed token stream -> (inputs, targets) batches.

Each rank reads its own row groups (rank r of w takes every w-th row group), tokenizes the documents in small
batches, appends them to one token buffer, and cuts windows of B*T+1 tokens from it: inputs are the first B*T,
targets the last B*T. Consecutive windows share one token, so every token of the stream is a target exactly once.
The loader loops over epochs forever.

Shards and row groups without usable text are skipped (see dataset.iter_row_groups); a rank left with nothing
to read gets a DataError instead of looping forever.

Resumable: the state is where the stream stands (epoch, the row group being read, how many of its documents are
tokenized) plus the tokens already tokenized but not emitted, so a restored loader yields exactly the same batches.
"""

import torch

from nanochat.dataset import DataError, iter_row_groups
from nanochat.dist import get_dist_info


class DataLoader:
    every_target_counts = True  # a plain token stream: no target is -1, so the trainer need not count them

    def __init__(self, B, T, split, tokenizer=None, device="cpu", rank=None, world_size=None,
                 tokenizer_threads=4, tokenizer_batch_size=128, data_dir=None):
        if split not in ("train", "val"):
            raise ValueError(f"split={split!r}; allowed: 'train', 'val'")
        if rank is None or world_size is None:
            _, rank, _, world_size = get_dist_info()
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
        if tokenizer is None:
            from nanochat.tokenizer import get_tokenizer
            tokenizer = get_tokenizer()
        self.B, self.T, self.split = B, T, split
        self.data_dir = data_dir  # the shards to read; None: dataset.get_data_dir()
        self.tokenizer = tokenizer
        self.bos = tokenizer.get_bos_token_id()
        self.device = torch.device(device)
        self.rank, self.world_size = rank, world_size
        self.tokenizer_threads, self.tokenizer_batch_size = tokenizer_threads, tokenizer_batch_size
        # position in the stream; see state_dict()
        self.epoch = 0
        self.prev_pos = None  # (shard_idx, rg_idx) of the row group before the current one; None: current is first
        self.cur_pos = None  # (shard_idx, rg_idx) of the row group being tokenized; None: none read this epoch
        self.docs = []  # documents of the current row group
        self.doc_idx = 0  # how many of them are already in the buffer
        self.buffer = []  # tokenized but not yet emitted
        self._row_groups = None  # iterator over this rank's row groups, created lazily (resume point may change)

    # -------------------------------------------------------------------------

    def _next_row_group(self):
        if self._row_groups is None:
            self._row_groups = iter_row_groups(self.split, start=self.rank, step=self.world_size, resume=self.prev_pos,
                                               data_dir=self.data_dir)
        try:
            docs, pos = next(self._row_groups)
        except StopIteration:
            if self.cur_pos is None:  # iter_row_groups raises first; kept so that an empty epoch can never loop
                raise DataError(
                    f"rank {self.rank} of {self.world_size} got no row groups of split {self.split!r}: the split has "
                    f"fewer usable row groups than ranks; use fewer ranks or more data"
                ) from None
            self.epoch += 1  # end of the split: start the next epoch from the first row group
            self.prev_pos, self.cur_pos, self.docs, self.doc_idx, self._row_groups = None, None, [], 0, None
            return
        self.prev_pos, self.cur_pos = self.cur_pos, tuple(pos)
        self.docs, self.doc_idx = docs, 0

    def _refill(self):
        """Tokenize the next batch of documents (BOS first) into the buffer."""
        while self.doc_idx >= len(self.docs):
            self._next_row_group()
        batch = self.docs[self.doc_idx:self.doc_idx + self.tokenizer_batch_size]
        for ids in self.tokenizer.encode(batch, prepend=self.bos, num_threads=self.tokenizer_threads):
            self.buffer.extend(ids)
        self.doc_idx += len(batch)

    def __iter__(self):
        return self

    def __next__(self):
        B, T = self.B, self.T
        while len(self.buffer) < B * T + 1:
            self._refill()
        use_cuda = self.device.type == "cuda"
        # pinned host memory lets the copy to the GPU run asynchronously (non_blocking)
        window = torch.tensor(self.buffer[:B * T + 1], dtype=torch.int64, pin_memory=use_cuda)
        del self.buffer[:B * T]  # keep the last token: it is the first input of the next window
        inputs = window[:-1].view(B, T).to(self.device, non_blocking=use_cuda)
        targets = window[1:].view(B, T).to(self.device, non_blocking=use_cuda)
        return inputs, targets

    # -------------------------------------------------------------------------

    def state_dict(self):
        """JSON-serialisable position in the stream. The leftover buffer is at most one tokenizer batch of
        documents plus B*T tokens, since documents are tokenized only when the buffer runs short."""
        return {
            "split": self.split, "rank": self.rank, "world_size": self.world_size,
            "epoch": self.epoch,
            "prev_pos": None if self.prev_pos is None else list(self.prev_pos),
            "cur_pos": None if self.cur_pos is None else list(self.cur_pos),
            "doc_idx": self.doc_idx,
            "buffer": list(self.buffer),
        }

    def load_state_dict(self, state):
        if (state["split"], state["rank"], state["world_size"]) != (self.split, self.rank, self.world_size):
            raise ValueError(
                f"dataloader state is for split={state['split']!r} rank={state['rank']} world_size="
                f"{state['world_size']}, this loader is split={self.split!r} rank={self.rank} "
                f"world_size={self.world_size}; resume with the same split and number of ranks"
            )
        self.epoch = state["epoch"]
        self.prev_pos = None if state["prev_pos"] is None else tuple(state["prev_pos"])
        self.cur_pos, self.docs, self.doc_idx, self._row_groups = None, [], 0, None
        self.buffer = list(state["buffer"])
        if state["cur_pos"] is not None:
            # re-read the row group that was being tokenized and skip the documents already in the buffer
            self._next_row_group()
            if self.cur_pos != tuple(state["cur_pos"]):
                raise RuntimeError(
                    f"dataloader resume expected row group {tuple(state['cur_pos'])} but the data gave "
                    f"{self.cur_pos}: the {self.split!r} shards changed since the state was saved"
                )
            self.prev_pos = None if state["prev_pos"] is None else tuple(state["prev_pos"])
            self.doc_idx = state["doc_idx"]


# -----------------------------------------------------------------------------
# Conversations (mid_train, chat_sft): a task's conversations rendered with the chat special tokens


class ConversationStream:
    """The conversations of a task in order, rank r of w taking every w-th one, epoch after epoch, rendered to
    (ids, mask) with tokenizer.render_conversation. Its state is (epoch, position) within this rank's share."""

    def __init__(self, task, tokenizer, rank=None, world_size=None):
        if rank is None or world_size is None:
            _, rank, _, world_size = get_dist_info()
        if len(task) < world_size:
            raise ValueError(f"the task has {len(task)} conversations, fewer than the {world_size} ranks")
        self.task, self.tokenizer = task, tokenizer
        self.rank, self.world_size = rank, world_size
        self.epoch, self.position = 0, 0

    def __len__(self):
        """Conversations per epoch for this rank."""
        return len(range(self.rank, len(self.task), self.world_size))

    def __next__(self):
        if self.position >= len(self):
            self.epoch, self.position = self.epoch + 1, 0
        conversation = self.task[self.rank + self.position * self.world_size]
        self.position += 1
        return self.tokenizer.render_conversation(conversation, max_tokens=None)

    def state_dict(self):
        return {"epoch": self.epoch, "position": self.position, "rank": self.rank, "world_size": self.world_size}

    def load_state_dict(self, state):
        if (state["rank"], state["world_size"]) != (self.rank, self.world_size):
            raise ValueError(f"conversation loader state is for rank {state['rank']} of {state['world_size']}, this "
                             f"is rank {self.rank} of {self.world_size}; resume with the same number of ranks")
        self.epoch, self.position = state["epoch"], state["position"]


def _to_device(rows, pad_id, device):
    """Rows of (ids, targets) of unequal length -> (inputs, targets) tensors padded on the right (targets -1)."""
    width = max(len(ids) for ids, _ in rows)
    use_cuda = device.type == "cuda"
    x = torch.tensor([ids + [pad_id] * (width - len(ids)) for ids, _ in rows], dtype=torch.long, pin_memory=use_cuda)
    y = torch.tensor([t + [-1] * (width - len(t)) for _, t in rows], dtype=torch.long, pin_memory=use_cuda)
    return x.to(device, non_blocking=use_cuda), y.to(device, non_blocking=use_cuda)


class PackedConversationLoader:
    """
    mid_train: whole conversations packed into rows of T+1 tokens, every row starting with a conversation's <|bos|>
    (BOS-aligned: no row begins in the middle of one). Each row takes, from a pool of the next `pool` conversations,
    the longest that still fits, until none does; the rest of the row is padding (target -1). A conversation longer
    than a row is cropped. Every token of a conversation is a target, as in pretraining: mid-training teaches the
    format and the content alike.
    """

    def __init__(self, task, tokenizer, B, T, device="cpu", pool=16, rank=None, world_size=None):
        self.stream = ConversationStream(task, tokenizer, rank, world_size)
        self.B, self.T, self.device, self.pool_size = B, T, torch.device(device), pool
        self.pad_id = tokenizer.get_bos_token_id()
        self.pool = []  # rendered conversations (token lists) taken from the stream but not yet placed

    def _row(self):
        row, capacity = [], self.T + 1
        while len(row) < capacity:
            while len(self.pool) < self.pool_size:
                self.pool.append(next(self.stream)[0])
            space = capacity - len(row)
            fitting = [i for i, ids in enumerate(self.pool) if len(ids) <= space]
            if fitting:
                row += self.pool.pop(max(fitting, key=lambda i: len(self.pool[i])))
            elif not row:
                row = self.pool.pop(0)[:capacity]
            else:
                break
        return row[:-1], row[1:]

    def __iter__(self):
        return self

    def __next__(self):
        rows = [self._row() for _ in range(self.B)]
        rows = [(x + [self.pad_id] * (self.T - len(x)), y + [-1] * (self.T - len(y))) for x, y in rows]
        return _to_device(rows, self.pad_id, self.device)

    def state_dict(self):
        return {**self.stream.state_dict(), "pool": [list(ids) for ids in self.pool]}

    def load_state_dict(self, state):
        self.stream.load_state_dict(state)
        self.pool = [list(ids) for ids in state["pool"]]


class PaddedConversationLoader:
    """
    chat_sft: one conversation per row, cut to T+1 tokens, the batch padded to its longest row. Targets are -1
    except where the model must learn to write: the assistant's text, its tool calls and <|assistant_end|>
    (the render_conversation mask); user turns, tool outputs and padding teach nothing.
    """

    def __init__(self, task, tokenizer, B, T, device="cpu", rank=None, world_size=None):
        self.stream = ConversationStream(task, tokenizer, rank, world_size)
        self.B, self.T, self.device = B, T, torch.device(device)
        self.pad_id = tokenizer.encode_special("<|assistant_end|>")

    def __iter__(self):
        return self

    def __next__(self):
        rows = []
        for _ in range(self.B):
            ids, mask = next(self.stream)
            ids, mask = ids[:self.T + 1], mask[:self.T + 1]
            rows.append((ids[:-1], [t if m else -1 for t, m in zip(ids[1:], mask[1:])]))
        return _to_device(rows, self.pad_id, self.device)

    def state_dict(self):
        return self.stream.state_dict()

    def load_state_dict(self, state):
        self.stream.load_state_dict(state)
