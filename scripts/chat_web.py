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

Every served model has `--num_workers` replicas (one per GPU on CUDA). A request waits in an asyncio queue
for a free replica of its model; generation runs in a thread so the event loop keeps serving other clients.
Requests are limited like nanochat's (message count and length, temperature, top_k, max_tokens); bad input
gets a 4xx JSON error `{"error": {"message", "type", "param", "code"}}`, never a 500.
"""

import argparse
import asyncio
import json
import os
import random
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import aclosing
from dataclasses import dataclass
from typing import Annotated, Literal

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from nanochat.checkpoint import add_checkpoint_args
from nanochat.common import autocast_ctx, logger, run_cli
from nanochat.engine import Engine

# Abuse limits (as nanochat's server)
MAX_MESSAGES_PER_REQUEST = 500
MAX_MESSAGE_LENGTH = 8000
MAX_TOTAL_CONVERSATION_LENGTH = 32000
MAX_TOP_K = 200
MAX_MAX_TOKENS = 4096
MAX_SAMPLES = 8  # OpenAI's `n`: rows decoded together from one prefill

UI_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "nanochat", "ui.html")

# -----------------------------------------------------------------------------
# Request and response schemas (they are also the OpenAPI schema at /openapi.json)


class TextPart(BaseModel):
    type: Literal["text"]
    text: str = Field(max_length=MAX_MESSAGE_LENGTH)


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    # OpenAI clients may send content as a list of text parts
    content: Annotated[str, Field(min_length=1, max_length=MAX_MESSAGE_LENGTH)] | list[TextPart]

    def text(self):
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatRequest(BaseModel):
    """nanochat's request. Unset sampling fields take the server's defaults."""
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES_PER_REQUEST)
    model: str | None = Field(None, description="a served model id (GET /v1/models); default: the first one")
    temperature: float | None = Field(None, ge=0.0, le=2.0, description="0 is greedy")
    top_k: int | None = Field(None, ge=1, le=MAX_TOP_K)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    max_tokens: int | None = Field(None, ge=1, le=MAX_MAX_TOKENS)
    seed: int | None = Field(None, ge=0, le=2**63 - 1, description="default: random")


class StreamOptions(BaseModel):
    include_usage: bool = False


class OpenAIChatRequest(ChatRequest):
    """OpenAI's chat.completions request (the subset that applies; other fields are ignored)."""
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_MAX_TOKENS, description="alias of max_tokens")
    n: int = Field(1, ge=1, le=MAX_SAMPLES)
    stream: bool = False
    stream_options: StreamOptions | None = None


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
    finish_reason: Literal["stop", "length"]


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


ERROR_RESPONSES = {"4XX": {"model": ErrorResponse, "description": "invalid request, unknown model or route"}}
SSE_RESPONSE = {200: {"content": {"text/event-stream": {}}, "description": "server-sent events"}}


class APIError(Exception):
    def __init__(self, status, message, param=None, code=None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def error_response(status, message, param=None, code=None):
    kind = "invalid_request_error" if status < 500 else "server_error"
    body = ErrorResponse(error=ErrorDetail(message=message, type=kind, param=param, code=code))
    return JSONResponse(body.model_dump(), status_code=status)


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

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def device(self):
        return self.engine.model.get_device()


class ModelPool:
    """The replicas of one served model. The queue is made on first use, inside the server's event loop."""

    def __init__(self, name, workers):
        self.name, self.workers = name, workers
        self.source = workers[0].source
        self.chat = self.source != "base"  # base models never saw the chat format: they complete text
        self.tokenizer = workers[0].tokenizer
        self.model = workers[0].engine.model
        self.created = int(time.time())
        self._free = None

    def _queue(self):
        if self._free is None:
            self._free = asyncio.Queue()
            for w in self.workers:
                self._free.put_nowait(w)
        return self._free

    async def acquire(self):
        worker = await self._queue().get()
        worker.busy = True
        return worker

    def release(self, worker):
        worker.busy = False
        self._queue().put_nowait(worker)

    def available(self):
        return self._queue().qsize()


class Stats:
    def __init__(self):
        self.started = time.time()
        self.requests_served = 0
        self.tokens_generated = 0
        self.generation_seconds = 0.0  # summed over workers: tokens/s is the speed of one busy worker

    def record(self, worker, num_tokens, seconds):
        self.requests_served += 1
        self.tokens_generated += num_tokens
        self.generation_seconds += seconds
        worker.requests += 1
        worker.tokens += num_tokens


# -----------------------------------------------------------------------------
# Prompts and generation


def render_prompt(pool, messages):
    """Token ids to generate from. Chat models get the chat format; a base model gets the messages' text as one
    document it continues (each message picks up where the previous one ended)."""
    tokenizer = pool.tokenizer
    try:
        if pool.chat:
            if messages[-1].role != "user":
                raise APIError(400, f"the last message must have role 'user', got {messages[-1].role!r}", "messages")
            conversation = {"messages": [{"role": m.role, "content": m.text()} for m in messages]}
            ids = tokenizer.render_for_completion(conversation)
        else:
            ids = tokenizer.encode("".join(m.text() for m in messages), prepend=tokenizer.get_bos_token_id())
    except ValueError as e:  # role order (the tokenizer names the problem), or text that cannot be encoded
        raise APIError(400, str(e), "messages") from e
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


async def stream_columns(pool, worker, executor, prompt, num_samples, params):
    """Run engine.generate in a thread; yield its token columns without blocking the event loop. The worker goes
    back to the pool when the thread has finished (also when the client went away and the stream was closed)."""
    loop = asyncio.get_running_loop()
    queue = asyncio.Queue()
    stop = threading.Event()

    def emit(item):
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:  # the event loop is gone (server shutting down)
            stop.set()

    def run():
        try:
            with autocast_ctx(worker.device.type):
                for column, _ in worker.engine.generate(prompt, num_samples=num_samples, **params):
                    if stop.is_set():
                        return
                    emit(column)
        except Exception as e:  # reported to the client by the consumer
            emit(e)
        finally:
            emit(_END)

    future = loop.run_in_executor(executor, run)
    future.add_done_callback(lambda _: pool.release(worker))
    try:
        while (item := await queue.get()) is not _END:
            if isinstance(item, Exception):
                raise item
            yield item
    finally:
        stop.set()


class Generation:
    """One request's generation: acquires a worker, decodes rows to text, records stats. Iterate `pieces()` for
    (row, text) pairs; afterwards `rows` holds each row's text, token count and finish reason."""

    def __init__(self, app, pool, prompt, req, num_samples=1):
        state = app.state
        self.app, self.pool, self.prompt, self.num_samples = app, pool, prompt, num_samples
        self.params = dict(
            max_tokens=req.max_tokens or getattr(req, "max_completion_tokens", None) or state.defaults["max_tokens"],
            temperature=state.defaults["temperature"] if req.temperature is None else req.temperature,
            top_k=req.top_k or state.defaults["top_k"], top_p=req.top_p,
            seed=random.randint(0, 2**31 - 1) if req.seed is None else req.seed)
        self.rows = [RowText(pool.tokenizer) for _ in range(num_samples)]
        self.worker = None
        self.ends = {pool.tokenizer.encode_special("<|assistant_end|>"), pool.tokenizer.get_bos_token_id()}

    async def pieces(self):
        self.worker = await self.pool.acquire()
        t0 = time.time()
        columns = stream_columns(self.pool, self.worker, self.app.state.executor, self.prompt, self.num_samples,
                                 self.params)
        async with aclosing(columns):
            async for column in columns:
                for i, (row, token) in enumerate(zip(self.rows, column)):
                    if row.finish_reason is not None:
                        continue
                    if token in self.ends:
                        row.finish_reason = "stop"
                    elif piece := row.add(token):
                        yield i, piece
        for i, row in enumerate(self.rows):
            if row.finish_reason is None:
                row.finish_reason = "length"  # max_tokens or the context ran out
                if piece := row.flush():
                    yield i, piece
        num_tokens = sum(r.num_tokens for r in self.rows)
        self.app.state.stats.record(self.worker, num_tokens, time.time() - t0)
        logger.info(f"{self.pool.name} worker {self.worker.id}: {len(self.prompt)} prompt tokens, "
                    f"{num_tokens} generated in {time.time() - t0:.2f}s")

    def usage(self):
        completion = sum(r.num_tokens for r in self.rows)
        prompt = len(self.prompt)
        return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


def sse(data):
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


# -----------------------------------------------------------------------------
# The app


def create_app(workers, temperature=0.8, top_k=50, max_tokens=512):
    """The FastAPI app serving `workers` (each a replica of a named model). Sampling defaults apply to requests
    that leave a field unset."""
    if not workers:
        raise ValueError("create_app needs at least one Worker")
    app = FastAPI(title="nanochat", description=__doc__, version="1.0")
    app.add_middleware(CORSMiddleware, allow_origins=["*"], allow_methods=["*"], allow_headers=["*"])
    names = list(dict.fromkeys(w.model_name for w in workers))  # served order = first appearance
    app.state.pools = {n: ModelPool(n, [w for w in workers if w.model_name == n]) for n in names}
    app.state.workers = workers
    app.state.defaults = dict(temperature=temperature, top_k=top_k, max_tokens=max_tokens)
    app.state.stats = Stats()
    # one thread per worker is enough: a worker runs one generation at a time
    app.state.executor = ThreadPoolExecutor(max_workers=len(workers), thread_name_prefix="generate")

    @app.exception_handler(APIError)
    async def api_error(request, exc):
        return error_response(exc.status, exc.message, exc.param, exc.code)

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
    async def http_error(request, exc):
        return error_response(exc.status_code, str(exc.detail), None, None)

    @app.exception_handler(Exception)
    async def internal_error(request, exc):
        logger.exception(f"internal error on {request.url.path}")
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
                           f"are allowed", "messages")
        for i, m in enumerate(req.messages):
            if len(m.text()) > MAX_MESSAGE_LENGTH:  # text parts add up
                raise APIError(400, f"message {i} has {len(m.text())} characters; at most {MAX_MESSAGE_LENGTH} "
                               f"are allowed per message", f"messages.{i}.content")
            if not m.text():
                raise APIError(400, f"message {i} has empty content", f"messages.{i}.content")
        pool = get_pool(req.model)
        return pool, render_prompt(pool, req.messages)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def root():
        with open(UI_PATH, encoding="utf-8") as f:
            html = f.read()
        d = app.state.defaults
        return HTMLResponse(html.replace("__TEMPERATURE__", f"{d['temperature']:g}")
                            .replace("__TOP_K__", str(d["top_k"])))

    @app.post("/chat/completions", responses={**SSE_RESPONSE, **ERROR_RESPONSES}, response_class=StreamingResponse)
    async def chat_completions(req: ChatRequest):
        """nanochat's streaming API: `data: {"token": text, "gpu": worker_id}` events, then `data: {"done": true}`."""
        pool, prompt = prepare(req)
        gen = Generation(app, pool, prompt, req)

        async def events():
            try:
                async for _, piece in gen.pieces():
                    yield sse({"token": piece, "gpu": gen.worker.id})
            except Exception as e:
                logger.exception("generation failed")
                yield sse({"error": f"generation failed: {type(e).__name__}: {e}"})
            yield sse({"done": True})

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/v1/chat/completions", response_model=ChatCompletion, responses={**SSE_RESPONSE, **ERROR_RESPONSES})
    async def openai_chat_completions(req: OpenAIChatRequest):
        """OpenAI-compatible chat completions; `stream: true` sends `chat.completion.chunk` events and `[DONE]`."""
        pool, prompt = prepare(req)
        gen = Generation(app, pool, prompt, req, num_samples=req.n)
        completion_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if not req.stream:
            async for _ in gen.pieces():
                pass
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
                logger.exception("generation failed")
                yield sse({"error": {"message": f"generation failed: {type(e).__name__}: {e}",
                                     "type": "server_error"}})
                yield "data: [DONE]\n\n"
                return
            yield chunk([{"index": i, "delta": {}, "finish_reason": r.finish_reason} for i, r in enumerate(gen.rows)])
            if req.stream_options and req.stream_options.include_usage:
                yield chunk([], gen.usage())
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.get("/v1/models", response_model=ModelList)
    async def list_models():
        return ModelList(data=[ModelCard(id=p.name, created=p.created, source=p.source,
                                         model_type=p.model.model_type, workers=len(p.workers))
                               for p in app.state.pools.values()])

    @app.get("/health")
    async def health():
        pools = app.state.pools.values()
        return {"status": "ok", "ready": True, "models": names, "num_workers": len(workers),
                "available_workers": sum(p.available() for p in pools)}

    @app.get("/stats")
    async def stats():
        s = app.state.stats
        busy = sum(w.busy for w in workers)
        return {
            "uptime_seconds": round(time.time() - s.started, 3),
            "requests_served": s.requests_served,
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
            logger.info(f"worker {len(workers)}: {name} ({meta['model_type']}, step {meta['step']}) on {device}")
            workers.append(Worker(id=len(workers), model_name=name, engine=Engine(model, tokenizer), source=source))
    return workers


def build_parser():
    parser = argparse.ArgumentParser(description="nanochat web server: chat page, nanochat and OpenAI APIs",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_checkpoint_args(parser, several_tags=True)  # base models complete text instead of chatting
    parser.add_argument("-n", "--num_gpus", "--num_workers", dest="num_workers", type=int, default=1,
                        help="replicas per served model (one per GPU on CUDA)")
    parser.add_argument("-p", "--port", type=int, default=8000, help="port to listen on")
    parser.add_argument("--host", type=str, default="127.0.0.1", help="0.0.0.0 to listen on every interface")
    parser.add_argument("--device_type", type=str, default="", help="cuda|cpu|mps; empty: autodetect")
    parser.add_argument("-t", "--temperature", type=float, default=0.8, help="default temperature")
    parser.add_argument("-k", "--top_k", type=int, default=50, help="default top-k")
    parser.add_argument("-m", "--max_tokens", type=int, default=512, help="default max tokens per reply")
    return parser


def main(argv=None):
    import uvicorn

    from nanochat.checkpoint import resolve_source
    from nanochat.common import compute_init, parse_args, resolve_device_type

    args = parse_args(build_parser(), argv)
    if args.num_workers < 1:
        raise SystemExit(f"--num_workers must be >= 1, got {args.num_workers}")
    if not 0 <= args.temperature <= 2 or not 1 <= args.top_k <= MAX_TOP_K or not 1 <= args.max_tokens <= 4096:
        raise SystemExit("defaults out of range: --temperature in [0, 2], --top_k in [1, 200], --max_tokens in "
                         "[1, 4096]")
    device_type = resolve_device_type(args.device_type)
    compute_init(device_type)
    tags = list(dict.fromkeys(args.model_tag)) if args.model_tag else None
    args.source = resolve_source(args.source, args.model_type)
    workers = load_workers(args.source, tags, args.num_workers, device_type, args.step, args.model_type)
    app = create_app(workers, temperature=args.temperature, top_k=args.top_k, max_tokens=args.max_tokens)
    print(f"Serving {', '.join(app.state.pools)} ({args.source}) with {len(workers)} worker(s): "
          f"open http://{args.host}:{args.port}/", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    run_cli(main)
