"""
Chat web server: the chat page and two APIs from one FastAPI app.

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

import json
import logging
import os
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse, StreamingResponse
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException

from nanochat.fileio import open_regular
from nanochat.serve.access import AccessCheck
from nanochat.serve.generation import MAX_GENERATION_SECONDS, Generation, render_prompt, sampling_params
from nanochat.serve.pool import MAX_QUEUE, Stats, model_pools
from nanochat.serve.schemas import (
    ERROR_RESPONSES,
    QUEUE_FULL_RESPONSE,
    SSE_RESPONSE,
    APIError,
    AssistantMessage,
    ChatCompletion,
    ChatRequest,
    Choice,
    ModelCard,
    ModelList,
    OpenAIChatRequest,
    check_lengths,
    error_response,
)

MAX_BODY_BYTES = 1 << 20  # 1 MiB: a request within the 32000-character limit is < 250 KB even \u-escaped
UI_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "ui.html")
logger = logging.getLogger("uvicorn.error")  # internal errors go where uvicorn reports its own


# -----------------------------------------------------------------------------
# Errors, the body limit among them: one JSON format for all


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


def validation_error_response(errors):
    """400 for a body the schema refuses (FastAPI's default is 422 in a format of its own), naming the first field."""
    if any(e.get("type") == "json_invalid" for e in errors):
        return error_response(400, "the request body is not valid JSON", None, "invalid_json")
    first = errors[0] if errors else {}
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    message = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()) if p != 'body') or 'body'}: {e.get('msg')}"
                        for e in errors[:5])
    return error_response(400, message, param, "invalid_request")


def add_error_handlers(app):
    """Every refusal as an ErrorResponse: ours (APIError), the schema's, Starlette's (404, 405) and any bug (500)."""
    @app.exception_handler(APIError)
    async def api_error(request, exc):
        return error_response(exc.status, exc.message, exc.param, exc.code, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, exc):
        return validation_error_response(exc.errors())

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc):  # unknown route, wrong method (with its Allow header)
        return error_response(exc.status_code, str(exc.detail), None, None, exc.headers)

    @app.exception_handler(Exception)
    async def internal_error(request, exc):
        logger.exception(f"internal error on {request.url.path}")
        return error_response(500, f"internal error: {type(exc).__name__}: {exc}")


def generation_failed(e):
    """Log a generation that raised and say so to the client: the stream has begun, its status can no longer change."""
    logger.exception("generation failed")
    return f"generation failed: {type(e).__name__}: {e}"


# -----------------------------------------------------------------------------
# Generations and their server-sent events


def get_pool(state, name):
    """The pool of the served model `name` (None: the first one), or 404."""
    if name is None:
        return next(iter(state.pools.values()))
    if name not in state.pools:
        raise APIError(404, f"model {name!r} is not served here; served models: {', '.join(state.pools)}",
                       "model", "model_not_found")
    return state.pools[name]


def start_generation(state, request, req, num_samples=1):
    """Check `req`, render its prompt and start its generation; APIError when it cannot be served."""
    check_lengths(req.messages)
    pool = get_pool(state, req.model)
    prompt = render_prompt(pool, req.messages)
    return Generation(request, pool, prompt, sampling_params(req, state.defaults), stats=state.stats,
                      executor=state.executor, max_seconds=state.max_generation_seconds, num_samples=num_samples)


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
# Routes


def add_page(app):
    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def root():
        with open_regular(UI_PATH, "r", encoding="utf-8") as f:
            html = f.read()
        d = app.state.defaults
        return HTMLResponse(html.replace("__TEMPERATURE__", f"{d['temperature']:g}")
                            .replace("__TOP_K__", str(d["top_k"])))


GENERATION_RESPONSES = {**SSE_RESPONSE, **ERROR_RESPONSES, **QUEUE_FULL_RESPONSE}


def add_nanochat_api(app):
    @app.post("/chat/completions", responses=GENERATION_RESPONSES, response_class=StreamingResponse)
    async def chat_completions(req: ChatRequest, request: Request):
        """nanochat's streaming API: `data: {"token": text, "gpu": worker_id}` events, then `data: {"done": true}`."""
        gen = start_generation(app.state, request, req)
        return EventStream(nanochat_events(gen), gen)


async def nanochat_events(gen):
    try:
        async for _, piece in gen.pieces():
            yield sse({"token": piece, "gpu": gen.worker.id})
    except Exception as e:
        yield sse({"error": generation_failed(e)})
    yield sse({"done": True})


def add_openai_api(app):
    @app.post("/v1/chat/completions", response_model=ChatCompletion, responses=GENERATION_RESPONSES)
    async def openai_chat_completions(req: OpenAIChatRequest, request: Request):
        """OpenAI-compatible chat completions; `stream: true` sends `chat.completion.chunk` events and `[DONE]`."""
        gen = start_generation(app.state, request, req, num_samples=req.n)
        completion_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if req.stream:
            return EventStream(openai_events(gen, req, completion_id, created), gen)
        return await openai_completion(gen, completion_id, created)

    @app.get("/v1/models", response_model=ModelList)
    async def list_models():
        return ModelList(data=[ModelCard(id=p.name, created=p.created, source=p.source,
                                         model_type=p.model.model_type, workers=len(p.workers))
                               for p in app.state.pools.values()])


async def openai_completion(gen, completion_id, created):
    """The whole reply as one chat.completion, once the generation has ended."""
    try:
        async for _ in gen.pieces():
            pass
    finally:
        gen.cancel()  # a no-op unless the request handler itself was cancelled
    choices = [Choice(index=i, message=AssistantMessage(content=r.text), finish_reason=r.finish_reason)
               for i, r in enumerate(gen.rows)]
    return ChatCompletion(id=completion_id, created=created, model=gen.pool.name, choices=choices, usage=gen.usage())


async def openai_events(gen, req, completion_id, created):
    """The reply as chat.completion.chunk events: the role, the pieces, each row's finish reason, the usage if
    asked for, then [DONE]."""
    def chunk(choices, usage=None):
        data = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": gen.pool.name,
                "choices": choices}
        if usage is not None:
            data["usage"] = usage.model_dump()
        return sse(data)

    yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
                 for i in range(req.n)])
    try:
        async for i, piece in gen.pieces():
            yield chunk([{"index": i, "delta": {"content": piece}, "finish_reason": None}])
    except Exception as e:
        yield sse({"error": {"message": generation_failed(e), "type": "server_error"}})
        yield "data: [DONE]\n\n"
        return
    yield chunk([{"index": i, "delta": {}, "finish_reason": r.finish_reason} for i, r in enumerate(gen.rows)])
    if req.stream_options and req.stream_options.include_usage:
        yield chunk([], gen.usage())
    yield "data: [DONE]\n\n"


def add_status(app):
    @app.get("/health")
    async def health():
        pools = app.state.pools.values()
        return {"status": "ok", "ready": True, "models": list(app.state.pools), "num_workers": len(app.state.workers),
                "available_workers": sum(p.available() for p in pools),
                "waiting_requests": sum(p.waiting() for p in pools)}

    @app.get("/stats")
    async def stats():
        return stats_report(app.state)


def stats_report(state):
    s, workers = state.stats, state.workers
    busy = sum(w.busy for w in workers)
    return {
        "uptime_seconds": round(time.time() - s.started, 3),
        "requests_served": s.requests_served,
        "requests_timed_out": s.requests_timed_out,
        "requests_cancelled": s.requests_cancelled,
        "requests_refused": s.requests_refused,
        "waiting_requests": sum(p.waiting() for p in state.pools.values()),
        "tokens_generated": s.tokens_generated,
        "tokens_per_second": round(s.tokens_generated / s.generation_seconds, 2) if s.generation_seconds else 0.0,
        "total_workers": len(workers), "busy_workers": busy, "available_workers": len(workers) - busy,
        "workers": [{"id": w.id, "model": w.model_name, "device": str(w.device),
                     "status": "busy" if w.busy else "idle", "requests": w.requests, "tokens": w.tokens}
                    for w in workers],
    }


# -----------------------------------------------------------------------------
# The app


def create_app(workers, temperature=0.8, top_k=50, max_tokens=512, max_queue=MAX_QUEUE, max_body_bytes=MAX_BODY_BYTES,
               max_generation_seconds=MAX_GENERATION_SECONDS, host="127.0.0.1", allowed_hosts=(), cors_origins=()):
    """The FastAPI app serving `workers` (each a replica of a named model). Sampling defaults apply to requests
    that leave a field unset; the limits are the command line's. `host` is the bound address: with allowed_hosts
    and cors_origins it decides which Host headers and web pages are answered (nanochat/serve/access.py)."""
    if not workers:
        raise ValueError("create_app needs at least one Worker")
    app = FastAPI(title="nanochat", description=__doc__, version="1.0")
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    if cors_origins:  # none by default: only the server's own page reads its replies
        app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["*"])
    app.add_middleware(AccessCheck, bound_host=host, allowed_hosts=tuple(allowed_hosts),
                       cors_origins=tuple(cors_origins))  # added last: it runs first
    app.state.pools = model_pools(workers, max_queue)  # served order = first appearance
    app.state.workers = workers
    app.state.defaults = dict(temperature=temperature, top_k=top_k, max_tokens=max_tokens)
    app.state.max_generation_seconds = max_generation_seconds
    app.state.stats = Stats()
    # one thread per worker is enough: a worker runs one generation at a time
    app.state.executor = ThreadPoolExecutor(max_workers=len(workers), thread_name_prefix="generate")
    add_error_handlers(app)
    add_page(app)
    add_nanochat_api(app)
    add_openai_api(app)
    add_status(app)
    return app
