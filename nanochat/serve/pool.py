"""
Workers, one model replica each, handed out through a bounded queue per served model; the server's counters.
"""

import asyncio
import math
import time
from dataclasses import dataclass

import torch

from nanochat.checkpoint import load_model
from nanochat.engine import Engine
from nanochat.log import print0
from nanochat.serve.schemas import APIError

MAX_QUEUE = 32  # requests waiting for a replica, per served model; beyond that 503


@dataclass
class Worker:
    id: int
    model_name: str
    engine: Engine
    source: str = "sft"
    busy: bool = False
    requests: int = 0
    tokens: int = 0
    seconds: float = 0.0

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def device(self):
        return self.engine.model.get_device()


def load_workers(source, model_tags, num_workers, device_type, step=None, model_type=None):
    """`num_workers` replicas of each model tag (None: the default tag); on CUDA replica i goes to GPU i."""
    workers = []
    for tag in model_tags or [None]:
        for i in range(num_workers):
            if device_type == "cuda":
                device = torch.device("cuda", i % torch.cuda.device_count())
            else:
                device = torch.device(device_type)
            model, tokenizer, meta = load_model(source, device, phase="eval", model_tag=tag, step=step,
                                                model_type=model_type)
            name = meta.get("model_tag", tag)
            print0(f"worker {len(workers)}: {name} ({meta['model_type']}, step {meta['step']}) on {device}")
            workers.append(Worker(id=len(workers), model_name=name, engine=Engine(model, tokenizer), source=source))
    return workers


class ModelPool:
    """The replicas of one served model and the requests waiting for them: at most `max_queue` wait, the next one
    is refused. The queue of free replicas is made on first use, inside the server's event loop."""

    def __init__(self, name, workers, max_queue=MAX_QUEUE):
        self.name, self.workers, self.max_queue = name, workers, max_queue
        self.source = workers[0].source
        self.chat = self.source != "base"  # base models never saw the chat format: they complete text
        self.tokenizer = workers[0].tokenizer
        self.model = workers[0].engine.model
        self.created = int(time.time())
        self.admitted = 0  # requests generating or waiting for a replica
        self._free = None

    def _queue(self):
        if self._free is None:
            self._free = asyncio.Queue()
            for w in self.workers:
                self._free.put_nowait(w)
        return self._free

    def admit(self):
        """Take a place for a new request, or refuse it (503) when `max_queue` requests are already waiting."""
        if self.admitted >= len(self.workers) + self.max_queue:
            raise APIError(503, f"model {self.name!r} is busy: {self.max_queue} requests are already waiting; retry "
                           f"in {self.retry_after()} s", None, "queue_full", {"Retry-After": str(self.retry_after())})
        self.admitted += 1

    def retry_after(self):
        """Seconds until a place is likely free: some replica finishes a request every (mean time / replicas)."""
        requests, seconds = sum(w.requests for w in self.workers), sum(w.seconds for w in self.workers)
        return max(1, math.ceil(seconds / max(requests, 1) / len(self.workers)))

    async def acquire(self):
        worker = await self._queue().get()
        worker.busy = True
        return worker

    def release(self, worker):
        """The request that held `worker` is done: the replica and the request's place go back."""
        worker.busy = False
        self._queue().put_nowait(worker)
        self.admitted -= 1

    def leave(self):
        """A request went away before it got a replica."""
        self.admitted -= 1

    def available(self):
        return self._queue().qsize()

    def waiting(self):
        return self.admitted - sum(w.busy for w in self.workers)


def model_pools(workers, max_queue=MAX_QUEUE):
    """A ModelPool per served model name, in the order the names first appear in `workers`."""
    names = dict.fromkeys(w.model_name for w in workers)
    return {n: ModelPool(n, [w for w in workers if w.model_name == n], max_queue) for n in names}


class Stats:
    def __init__(self):
        self.started = time.time()
        self.requests_served = 0  # answered, also those the time limit cut short
        self.requests_timed_out = 0
        self.requests_cancelled = 0  # the client went away: generation stopped (or never started)
        self.requests_refused = 0  # 503: the queue was full
        self.tokens_generated = 0  # also those generated for requests later cancelled
        self.generation_seconds = 0.0  # summed over workers: tokens/s is the speed of one busy worker

    def record(self, worker, num_tokens, seconds, outcome):
        """One generation that ran on `worker`; outcome "done", "time_limit", "cancelled" or "error"."""
        self.tokens_generated += num_tokens
        self.generation_seconds += seconds
        worker.tokens += num_tokens
        self.requests_cancelled += outcome == "cancelled"
        if outcome in ("done", "time_limit"):  # answered
            self.requests_served += 1
            self.requests_timed_out += outcome == "time_limit"
            worker.requests += 1
            worker.seconds += seconds
