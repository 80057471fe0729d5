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

from nanochat.common import get_dist_info
from nanochat.dataset import DataError, iter_row_groups


class DataLoader:
    def __init__(self, B, T, split, tokenizer=None, device="cpu", rank=None, world_size=None,
                 tokenizer_threads=4, tokenizer_batch_size=128):
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
            self._row_groups = iter_row_groups(self.split, start=self.rank, step=self.world_size, resume=self.prev_pos)
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
