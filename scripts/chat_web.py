"""
Chat web server: the chat page and two APIs from one FastAPI app.

    python -m scripts.chat_web                                   # the largest sft model
    python -m scripts.chat_web --source=base --model_tag=alcoholic_d4 --port=8000
    python -m scripts.chat_web --model_tag=gpt_d4 --model_tag=alcoholic_d4   # two models, a picker in the page
    python -m scripts.chat_web --num_gpus=4                      # 4 replicas, requests spread over them

Endpoints:
    GET  /                      chat page (nanochat/ui.html)
    POST /chat/completions      nanochat's streaming API: `data: {"token": ..., "gpu": worker}`, `data: {"done": true}`
    POST /v1/chat/completions   OpenAI-compatible (stream and non-stream): the `openai` client works unchanged
    GET  /v1/models             OpenAI-compatible model list
    GET  /health, GET /stats    liveness; requests, tokens, tokens/s and per-worker load

Every served model has `--num_workers` replicas (one per GPU on CUDA). A request waits in a bounded queue
for a free replica of its model; generation runs in a thread so the event loop keeps serving other clients.
Requests are limited like nanochat's (message count and length, temperature, top_k, max_tokens); bad input
gets a 4xx JSON error `{"error": {"message", "type", "param", "code"}}`, never a 500.

Limits that keep one client from taking the server (docs/reliability.md):
    --max_queue                 requests that may wait per model; one more gets 503 with Retry-After
    --max_body_bytes            a larger body gets 413 before it is read (Content-Length, or counted as it streams)
    --max_generation_seconds    a reply stops after this long, with finish_reason "length"
    client gone                 generation stops within a token (stream or not) and the replica is free again
"""

import argparse
import asyncio
import json
import logging
import math
import os
import random
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Annotated, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException

from nanochat.checkpoint import add_checkpoint_args
from nanochat.cli import non_negative_float, non_negative_int, port_number, positive_float, positive_int, run_cli
from nanochat.dist import autocast_ctx
from nanochat.engine import Engine
from nanochat.log import print0

# Abuse limits (as nanochat's server)
MAX_MESSAGES_PER_REQUEST = 500
MAX_MESSAGE_LENGTH = 8000
MAX_TOTAL_CONVERSATION_LENGTH = 32000
MAX_TOP_K = 200
MAX_MAX_TOKENS = 4096
MAX_SAMPLES = 8  # OpenAI's `n`: rows decoded together from one prefill
MAX_SEED = 2**53 - 1  # the largest integer a JSON number (a float64) holds exactly: a larger bound is not one

# Serving limits (command-line flags)
MAX_QUEUE = 32  # requests waiting for a replica, per served model; beyond that 503
MAX_BODY_BYTES = 1 << 20  # 1 MiB: a request within the 32000-character limit is < 250 KB even \u-escaped
MAX_GENERATION_SECONDS = 120.0  # a 4096-token reply at ~35 tokens/s
DISCONNECT_POLL_SECONDS = 0.1  # a gone client costs at most this much generation (plus one token)

UI_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "nanochat", "ui.html")

# -----------------------------------------------------------------------------
# Request and response schemas (they are also the OpenAPI schema at /openapi.json)


def integral(value):
    """The request models are strict: the schema is the contract, so `"seed": false` or `"n": "2"` is refused rather
    than coerced. But 5.0 is an integer to JSON Schema (and to JavaScript), so integer fields take it."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


class TextPart(BaseModel):
    model_config = ConfigDict(strict=True)
    type: Literal["text"]
    text: str = Field(min_length=1, max_length=MAX_MESSAGE_LENGTH)


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True)
    role: Literal["system", "user", "assistant"]
    # OpenAI clients may send content as a list of text parts
    content: Annotated[str, Field(min_length=1, max_length=MAX_MESSAGE_LENGTH)] | Annotated[
        list[TextPart], Field(min_length=1)] = Field(
        description=f"text, or text parts that together have at most {MAX_MESSAGE_LENGTH} characters")

    def text(self):
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


MESSAGES_RULES = (
    f"At most {MAX_TOTAL_CONVERSATION_LENGTH} characters in all. Chat models: an optional system message, then "
    "user and assistant alternating, the last one from the user. The prompt must fit the model's context. "
    "JSON Schema cannot say these (sums, order, token counts): a request that breaks one gets 400 with `code` "
    "conversation_too_long, message_too_long, invalid_roles or context_length_exceeded.")


class ChatRequest(BaseModel):
    """nanochat's request. Unset sampling fields take the server's defaults."""
    model_config = ConfigDict(strict=True)
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES_PER_REQUEST, description=MESSAGES_RULES)
    model: str | None = Field(None, description="a served model id (GET /v1/models); default: the first one")
    temperature: float | None = Field(None, ge=0.0, le=2.0, description="0 is greedy")
    top_k: int | None = Field(None, ge=1, le=MAX_TOP_K)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    max_tokens: int | None = Field(None, ge=1, le=MAX_MAX_TOKENS)
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="default: random")
    _integral = field_validator("top_k", "max_tokens", "seed", mode="before")(integral)


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True)
    include_usage: bool = False


class OpenAIChatRequest(ChatRequest):
    """OpenAI's chat.completions request (the subset that applies; other fields are ignored)."""
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_MAX_TOKENS, description="alias of max_tokens")
    n: int = Field(1, ge=1, le=MAX_SAMPLES)
    stream: bool = False
    stream_options: StreamOptions | None = None
    _integral_too = field_validator("max_completion_tokens", "n", mode="before")(integral)


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: Literal["stop", "length"] = Field(
        description="stop: the model ended its reply; length: max_tokens, the context or the server's time limit "
                    "(--max_generation_seconds) ran out")


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "nanochat"
    source: str = Field(description="checkpoint source: base models complete text, the others chat")
    model_type: str
    workers: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


ERROR_RESPONSES = {"4XX": {"model": ErrorResponse,
                           "description": "invalid request (400), unknown model or route (404), body too large (413)"}}
RETRY_AFTER = {"Retry-After": {"description": "seconds to wait", "schema": {"type": "integer"}}}
QUEUE_FULL_RESPONSE = {503: {"model": ErrorResponse, "description": "the queue is full", "headers": RETRY_AFTER}}
SSE_RESPONSE = {200: {"content": {"text/event-stream": {}}, "description": "server-sent events"}}


class APIError(StarletteHTTPException):
    """An error answered as JSON. An HTTPException, so that FastAPI lets it through from reading the body."""

    def __init__(self, status, message, param=None, code=None, headers=None):
        super().__init__(status, message, headers)
        self.status, self.message, self.param, self.code = status, message, param, code


def error_response(status, message, param=None, code=None, headers=None):
    kind = "invalid_request_error" if status < 500 else "server_error"
    body = ErrorResponse(error=ErrorDetail(message=message, type=kind, param=param, code=code))
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


class BodyLimit:
    """ASGI middleware: a request body over `max_bytes` gets 413 without being read. A Content-Length over the limit
    is refused at the first read, before any byte of the body; a chunked body is counted as it streams in and refused
    as soon as it passes the limit."""

    def __init__(self, app, max_bytes):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = Headers(scope=scope).get("content-length", "")
        received = 0

        async def limited_receive():
            nonlocal received
            if declared.isdigit() and int(declared) > self.max_bytes:
                raise self.too_large()
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                raise self.too_large()
            return message

        await self.app(scope, limited_receive, send)

    def too_large(self):
        return APIError(413, f"the request body is larger than {self.max_bytes} bytes, the most this server takes "
                        f"(--max_body_bytes)", None, "body_too_large")


# -----------------------------------------------------------------------------
# Workers: one model replica each, handed out through a queue per served model


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


# -----------------------------------------------------------------------------
# Prompts and generation


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
    client went away: a task polls for that) or when the time limit has passed, so the replica is free again one
    token later. Afterwards `rows` holds each row's text, token count and finish reason."""

    def __init__(self, app, request, pool, prompt, req, num_samples=1):
        state = app.state
        self.pool, self.prompt, self.num_samples, self.stats = pool, prompt, num_samples, state.stats
        self.params = dict(
            max_tokens=req.max_tokens or getattr(req, "max_completion_tokens", None) or state.defaults["max_tokens"],
            temperature=state.defaults["temperature"] if req.temperature is None else req.temperature,
            top_k=req.top_k or state.defaults["top_k"], top_p=req.top_p,
            seed=random.randint(0, 2**31 - 1) if req.seed is None else req.seed)
        self.max_seconds = state.max_generation_seconds
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
        self.task = asyncio.create_task(self._start(state.executor))
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
                    for i, (row, token) in enumerate(zip(self.rows, column)):
                        if row.finish_reason is not None:
                            continue
                        if token in self.ends:
                            row.finish_reason = "stop"
                            piece = row.flush()  # tokens held back inside a character that never completed
                        else:
                            piece = row.add(token)
                        if piece:
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


class EventStream(StreamingResponse):
    """The server-sent events of one generation. However the response ends (done, client gone, send failed), the
    generation is cancelled, so its replica or queue place is never left behind."""

    def __init__(self, events, generation):
        super().__init__(events, media_type="text/event-stream")
        self.generation = generation

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.generation.cancel()


def sse(data):
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


# -----------------------------------------------------------------------------
# The app


def create_app(workers, temperature=0.8, top_k=50, max_tokens=512, max_queue=MAX_QUEUE, max_body_bytes=MAX_BODY_BYTES,
               max_generation_seconds=MAX_GENERATION_SECONDS):
    """The FastAPI app serving `workers` (each a replica of a named model). Sampling defaults apply to requests
    that leave a field unset; the limits are the command line's."""
    if not workers:
        raise ValueError("create_app needs at least one Worker")
    app = FastAPI(title="nanochat", description=__doc__, version="1.0")
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    app.add_middleware(CORSMiddleware, allow_origins=["*"], allow_methods=["*"], allow_headers=["*"])
    names = list(dict.fromkeys(w.model_name for w in workers))  # served order = first appearance
    app.state.pools = {n: ModelPool(n, [w for w in workers if w.model_name == n], max_queue) for n in names}
    app.state.workers = workers
    app.state.defaults = dict(temperature=temperature, top_k=top_k, max_tokens=max_tokens)
    app.state.max_generation_seconds = max_generation_seconds
    app.state.stats = Stats()
    # one thread per worker is enough: a worker runs one generation at a time
    app.state.executor = ThreadPoolExecutor(max_workers=len(workers), thread_name_prefix="generate")

    @app.exception_handler(APIError)
    async def api_error(request, exc):
        return error_response(exc.status, exc.message, exc.param, exc.code, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, exc):
        errors = exc.errors()
        if any(e.get("type") == "json_invalid" for e in errors):
            return error_response(400, "the request body is not valid JSON", None, "invalid_json")
        first = errors[0] if errors else {}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        param = ".".join(loc) or None
        message = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()) if p != 'body') or 'body'}: {e.get('msg')}"
                            for e in errors[:5])
        return error_response(400, message, param, "invalid_request")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc):  # unknown route, wrong method (with its Allow header)
        return error_response(exc.status_code, str(exc.detail), None, None, exc.headers)

    @app.exception_handler(Exception)
    async def internal_error(request, exc):
        logging.getLogger("uvicorn.error").exception(f"internal error on {request.url.path}")
        return error_response(500, f"internal error: {type(exc).__name__}: {exc}")

    def get_pool(name):
        if name is None:
            return app.state.pools[names[0]]
        if name not in app.state.pools:
            raise APIError(404, f"model {name!r} is not served here; served models: {', '.join(names)}",
                           "model", "model_not_found")
        return app.state.pools[name]

    def prepare(req):
        total = sum(len(m.text()) for m in req.messages)
        if total > MAX_TOTAL_CONVERSATION_LENGTH:
            raise APIError(400, f"the conversation has {total} characters; at most {MAX_TOTAL_CONVERSATION_LENGTH} "
                           f"are allowed", "messages", "conversation_too_long")
        for i, m in enumerate(req.messages):
            if len(m.text()) > MAX_MESSAGE_LENGTH:  # text parts add up
                raise APIError(400, f"message {i} has {len(m.text())} characters; at most {MAX_MESSAGE_LENGTH} "
                               f"are allowed per message", f"messages.{i}.content", "message_too_long")
        pool = get_pool(req.model)
        return pool, render_prompt(pool, req.messages)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def root():
        with open(UI_PATH, encoding="utf-8") as f:
            html = f.read()
        d = app.state.defaults
        return HTMLResponse(html.replace("__TEMPERATURE__", f"{d['temperature']:g}")
                            .replace("__TOP_K__", str(d["top_k"])))

    responses = {**SSE_RESPONSE, **ERROR_RESPONSES, **QUEUE_FULL_RESPONSE}

    @app.post("/chat/completions", responses=responses, response_class=StreamingResponse)
    async def chat_completions(req: ChatRequest, request: Request):
        """nanochat's streaming API: `data: {"token": text, "gpu": worker_id}` events, then `data: {"done": true}`."""
        pool, prompt = prepare(req)
        gen = Generation(app, request, pool, prompt, req)

        async def events():
            try:
                async for _, piece in gen.pieces():
                    yield sse({"token": piece, "gpu": gen.worker.id})
            except Exception as e:
                logging.getLogger("uvicorn.error").exception("generation failed")
                yield sse({"error": f"generation failed: {type(e).__name__}: {e}"})
            yield sse({"done": True})

        return EventStream(events(), gen)

    @app.post("/v1/chat/completions", response_model=ChatCompletion, responses=responses)
    async def openai_chat_completions(req: OpenAIChatRequest, request: Request):
        """OpenAI-compatible chat completions; `stream: true` sends `chat.completion.chunk` events and `[DONE]`."""
        pool, prompt = prepare(req)
        gen = Generation(app, request, pool, prompt, req, num_samples=req.n)
        completion_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if not req.stream:
            try:
                async for _ in gen.pieces():
                    pass
            finally:
                gen.cancel()  # a no-op unless this handler itself was cancelled
            choices = [Choice(index=i, message=AssistantMessage(content=r.text), finish_reason=r.finish_reason)
                       for i, r in enumerate(gen.rows)]
            return ChatCompletion(id=completion_id, created=created, model=pool.name, choices=choices,
                                  usage=gen.usage())

        def chunk(choices, usage=None):
            data = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": pool.name,
                    "choices": choices}
            if usage is not None:
                data["usage"] = usage.model_dump()
            return sse(data)

        async def events():
            yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
                         for i in range(req.n)])
            try:
                async for i, piece in gen.pieces():
                    yield chunk([{"index": i, "delta": {"content": piece}, "finish_reason": None}])
            except Exception as e:
                logging.getLogger("uvicorn.error").exception("generation failed")
                yield sse({"error": {"message": f"generation failed: {type(e).__name__}: {e}",
                                     "type": "server_error"}})
                yield "data: [DONE]\n\n"
                return
            yield chunk([{"index": i, "delta": {}, "finish_reason": r.finish_reason} for i, r in enumerate(gen.rows)])
            if req.stream_options and req.stream_options.include_usage:
                yield chunk([], gen.usage())
            yield "data: [DONE]\n\n"

        return EventStream(events(), gen)

    @app.get("/v1/models", response_model=ModelList)
    async def list_models():
        return ModelList(data=[ModelCard(id=p.name, created=p.created, source=p.source,
                                         model_type=p.model.model_type, workers=len(p.workers))
                               for p in app.state.pools.values()])

    @app.get("/health")
    async def health():
        pools = app.state.pools.values()
        return {"status": "ok", "ready": True, "models": names, "num_workers": len(workers),
                "available_workers": sum(p.available() for p in pools),
                "waiting_requests": sum(p.waiting() for p in pools)}

    @app.get("/stats")
    async def stats():
        s = app.state.stats
        busy = sum(w.busy for w in workers)
        return {
            "uptime_seconds": round(time.time() - s.started, 3),
            "requests_served": s.requests_served,
            "requests_timed_out": s.requests_timed_out,
            "requests_cancelled": s.requests_cancelled,
            "requests_refused": s.requests_refused,
            "waiting_requests": sum(p.waiting() for p in app.state.pools.values()),
            "tokens_generated": s.tokens_generated,
            "tokens_per_second": round(s.tokens_generated / s.generation_seconds, 2) if s.generation_seconds else 0.0,
            "total_workers": len(workers), "busy_workers": busy, "available_workers": len(workers) - busy,
            "workers": [{"id": w.id, "model": w.model_name, "device": str(w.device),
                         "status": "busy" if w.busy else "idle", "requests": w.requests, "tokens": w.tokens}
                        for w in workers],
        }

    return app


# -----------------------------------------------------------------------------
# Command line


def load_workers(source, model_tags, num_workers, device_type, step=None, model_type=None):
    """`num_workers` replicas of each model tag (None: the default tag); on CUDA replica i goes to GPU i."""
    import torch

    from nanochat.checkpoint import load_model

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


def build_parser():
    parser = argparse.ArgumentParser(description="nanochat web server: chat page, nanochat and OpenAI APIs",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_checkpoint_args(parser, several_tags=True)  # base models complete text instead of chatting
    parser.add_argument("-n", "--num_gpus", "--num_workers", dest="num_workers", type=positive_int, default=1,
                        help="replicas per served model (one per GPU on CUDA)")
    parser.add_argument("-p", "--port", type=port_number, default=8000, help="port to listen on")
    parser.add_argument("--host", type=str, default="127.0.0.1", help="0.0.0.0 to listen on every interface")
    parser.add_argument("--device_type", type=str, default="", help="cuda|cpu|mps; empty: autodetect")
    parser.add_argument("-t", "--temperature", type=non_negative_float, default=0.8, help="default temperature")
    parser.add_argument("-k", "--top_k", type=non_negative_int, default=50, help="default top-k")
    parser.add_argument("-m", "--max_tokens", type=positive_int, default=512, help="default max tokens per reply")
    parser.add_argument("--max_queue", type=positive_int, default=MAX_QUEUE,
                        help="requests that may wait for a replica, per model; one more gets 503 with Retry-After")
    parser.add_argument("--max_body_bytes", type=positive_int, default=MAX_BODY_BYTES,
                        help="a larger request body gets 413 before it is read")
    parser.add_argument("--max_generation_seconds", type=positive_float, default=MAX_GENERATION_SECONDS,
                        help="a reply stops after this long (finish_reason 'length')")
    return parser


def main(argv=None):
    import uvicorn

    from nanochat.checkpoint import resolve_source
    from nanochat.cli import parse_args
    from nanochat.dist import compute_init, resolve_device_type

    args = parse_args(build_parser(), argv)
    if args.num_workers < 1:
        raise SystemExit(f"--num_workers must be >= 1, got {args.num_workers}")
    if not 0 <= args.temperature <= 2 or not 1 <= args.top_k <= MAX_TOP_K or not 1 <= args.max_tokens <= 4096:
        raise SystemExit("defaults out of range: --temperature in [0, 2], --top_k in [1, 200], --max_tokens in "
                         "[1, 4096]")
    if args.max_queue < 0 or args.max_body_bytes < 0 or not args.max_generation_seconds > 0:
        raise SystemExit(f"limits out of range: --max_queue >= 0 (got {args.max_queue}), --max_body_bytes >= 0 (got "
                         f"{args.max_body_bytes}), --max_generation_seconds > 0 (got {args.max_generation_seconds})")
    device_type = resolve_device_type(args.device_type)
    compute_init(device_type)
    tags = list(dict.fromkeys(args.model_tag)) if args.model_tag else None
    args.source = resolve_source(args.source, args.model_type)
    workers = load_workers(args.source, tags, args.num_workers, device_type, args.step, args.model_type)
    app = create_app(workers, temperature=args.temperature, top_k=args.top_k, max_tokens=args.max_tokens,
                     max_queue=args.max_queue, max_body_bytes=args.max_body_bytes,
                     max_generation_seconds=args.max_generation_seconds)
    print(f"Serving {', '.join(app.state.pools)} ({args.source}) with {len(workers)} worker(s): "
          f"open http://{args.host}:{args.port}/", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    run_cli(main)
