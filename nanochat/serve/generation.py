"""
One request's generation: the prompt it renders to, then engine.generate in its replica's thread while the event loop
keeps serving others. It stops within a token when the client goes away or the time limit has passed.
"""

import asyncio
import random
import threading
import time

from nanochat.dist import autocast_ctx
from nanochat.log import print0
from nanochat.serve.schemas import APIError, Usage

MAX_GENERATION_SECONDS = 120.0  # a 4096-token reply at ~35 tokens/s
DISCONNECT_POLL_SECONDS = 0.1  # a gone client costs at most this much generation (plus one token)


def render_prompt(pool, messages):
    """Token ids to generate from. Chat models get the chat format; a base model gets the messages' text as one
    document it continues (each message picks up where the previous one ended)."""
    tokenizer = pool.tokenizer
    try:
        if pool.chat:
            if messages[-1].role != "user":
                raise APIError(400, f"the last message must have role 'user', got {messages[-1].role!r}", "messages",
                               "invalid_roles")
            conversation = {"messages": [{"role": m.role, "content": m.text()} for m in messages]}
            ids = tokenizer.render_for_completion(conversation)
        else:
            ids = tokenizer.encode("".join(m.text() for m in messages), prepend=tokenizer.get_bos_token_id())
    except ValueError as e:  # role order: the tokenizer names the problem
        raise APIError(400, str(e), "messages", "invalid_roles") from e
    context = pool.model.config.sequence_len
    if len(ids) >= context:
        raise APIError(400, f"the conversation is {len(ids)} tokens but model {pool.name!r} has a context of "
                       f"{context} tokens; start a new chat or send fewer/shorter messages", "messages",
                       "context_length_exceeded")
    return ids


def sampling_params(req, defaults):
    """engine.generate's arguments: the request's fields, the server's `defaults` where unset, a random seed unless
    the request has one."""
    return dict(
        max_tokens=req.max_tokens or getattr(req, "max_completion_tokens", None) or defaults["max_tokens"],
        temperature=defaults["temperature"] if req.temperature is None else req.temperature,
        top_k=req.top_k or defaults["top_k"], top_p=req.top_p,
        seed=random.randint(0, 2**31 - 1) if req.seed is None else req.seed)


class RowText:
    """Turns one row's tokens into text pieces, holding back tokens that end inside a multi-byte character."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.pending, self.parts = [], []
        self.num_tokens = 0
        self.finish_reason = None

    def add(self, token):
        self.num_tokens += 1
        self.pending.append(token)
        text = self.tokenizer.decode(self.pending)
        if text.endswith("\ufffd"):  # incomplete UTF-8: wait for the next token
            return ""
        self.pending = []
        self.parts.append(text)
        return text

    def flush(self):
        text = self.tokenizer.decode(self.pending) if self.pending else ""
        self.pending = []
        self.parts.append(text)
        return text

    @property
    def text(self):
        return "".join(self.parts)


_END = object()


class Generation:
    """One request's generation, started when it is made: it takes a place in its model's queue (or raises 503),
    waits for a free replica, and runs engine.generate in the replica's thread, which decodes every row to text and
    hands (row, text) pieces to `pieces()`. Between two tokens the thread stops when `cancel()` was called (the
    client went away: a task polls for that) or when `max_seconds` have passed, so the replica is free again one
    token later. Afterwards `rows` holds each row's text, token count and finish reason.

    `request` is the Starlette request (polled for a disconnect), `params` engine.generate's sampling arguments,
    `stats` the server's Stats, `executor` the thread pool the replicas generate in."""

    def __init__(self, request, pool, prompt, params, stats, executor, max_seconds, num_samples=1):
        self.pool, self.prompt, self.params, self.stats = pool, prompt, params, stats
        self.num_samples, self.max_seconds = num_samples, max_seconds
        self.rows = [RowText(pool.tokenizer) for _ in range(num_samples)]
        self.ends = {pool.tokenizer.encode_special("<|assistant_end|>"), pool.tokenizer.get_bos_token_id()}
        self.worker = None
        self.outcome = None  # "done", "time_limit", "cancelled" or "error"
        self.seconds = 0.0  # spent generating
        self.finished = False
        self.stop = threading.Event()
        self.out = asyncio.Queue()  # (row, text) pieces, an exception if generation failed, then _END
        try:
            pool.admit()
        except APIError:
            self.stats.requests_refused += 1
            raise
        self.task = asyncio.create_task(self._start(executor))
        self.task.add_done_callback(self._never_started)
        self.watcher = asyncio.create_task(self._watch(request))

    async def _start(self, executor):
        self.worker = await self.pool.acquire()
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(executor, self._generate, loop)  # no await since acquire: nothing can cancel
        future.add_done_callback(self._finish)                         # between getting the worker and this

    def _generate(self, loop):
        """The replica's thread: generate, decode each row, hand the pieces to the event loop; stop early on cancel()
        or the time limit."""
        def emit(item):
            try:
                loop.call_soon_threadsafe(self.out.put_nowait, item)
            except RuntimeError:  # the event loop is gone (server shutting down)
                self.stop.set()

        t0 = time.monotonic()
        self.outcome = "done"
        try:
            with autocast_ctx(self.worker.device.type):
                for column, _ in self.worker.engine.generate(self.prompt, num_samples=self.num_samples, **self.params):
                    if self.stop.is_set():
                        self.outcome = "cancelled"
                        return
                    for i, piece in self._decode(column):
                        emit((i, piece))
                    if time.monotonic() - t0 > self.max_seconds:
                        self.outcome = "time_limit"
                        break
            for i, row in enumerate(self.rows):
                if row.finish_reason is None:
                    row.finish_reason = "length"  # max_tokens, the context or the time limit ran out
                    if piece := row.flush():
                        emit((i, piece))
        except Exception as e:  # reported to the client by pieces()
            self.outcome = "error"
            emit(e)
        finally:
            self.seconds = time.monotonic() - t0

    def _decode(self, column):
        """The (row, text) pieces of one generated token per row; a row ends at its first end token."""
        for i, (row, token) in enumerate(zip(self.rows, column)):
            if row.finish_reason is not None:
                continue
            if token in self.ends:
                row.finish_reason = "stop"
                piece = row.flush()  # tokens held back inside a character that never completed
            else:
                piece = row.add(token)
            if piece:
                yield i, piece

    def _finish(self, _):
        """Back on the event loop once the thread has ended: the replica goes back, then the reader hears the end."""
        self.pool.release(self.worker)
        num_tokens = sum(r.num_tokens for r in self.rows)
        self.stats.record(self.worker, num_tokens, self.seconds, self.outcome)
        print0(f"{self.pool.name} worker {self.worker.id}: {len(self.prompt)} prompt tokens, {num_tokens} "
               f"generated in {self.seconds:.2f}s ({self.outcome})")
        self._end()

    def _never_started(self, task):
        if self.worker is None:  # cancelled while waiting for a replica
            self.pool.leave()
            self.outcome = "cancelled"
            self.stats.requests_cancelled += 1
            self._end()

    def _end(self):
        self.finished = True
        self.out.put_nowait(_END)

    async def _watch(self, request):
        """ASGI tells of a disconnect only to a receive() call, so poll for one while the generation runs."""
        while not self.finished:
            if await request.is_disconnected():
                self.cancel()
                return
            await asyncio.sleep(DISCONNECT_POLL_SECONDS)

    def cancel(self):
        """Stop: leave the queue, or end the thread at its next token. Harmless once the generation has ended."""
        self.stop.set()
        self.task.cancel()

    async def pieces(self):
        while (item := await self.out.get()) is not _END:
            if isinstance(item, Exception):
                raise item
            yield item

    def usage(self):
        completion = sum(r.num_tokens for r in self.rows)
        prompt = len(self.prompt)
        return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)
