"""chat_web under abuse: clients that go away, queue floods, oversized bodies, replies that never end, and
schemathesis against the OpenAPI schema. The tests assert on counts and status codes; their timeouts are only hang
guards, so a slow or loaded machine changes how long they take, not whether they pass."""

import contextlib
import http.client
import json
import os
import re
import socket
import subprocess
import sys
import time

import httpx
import pytest

from nanochat.engine import Engine
from nanochat.serve import Worker, create_app
from nanochat.tokenizer import RustBPETokenizer
from tests.conftest import tiny_model
from tests.serve.conftest import TEXTS, serve, user

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCHEMATHESIS_CONFIG = os.path.join(REPO, "tests", "reliability", "schemathesis.toml")
HANG_GUARD = 60  # seconds: fail instead of hanging; shorter than a full endless reply (4096 * DELAY = 205 s)
DELAY = 0.05  # seconds per step of the endless model, at least
LONG = 4096  # max_tokens of the requests that would run "forever"


class EndlessEngine(Engine):
    """A model that never ends its reply: the same token every step, each step at least `delay` s after the last,
    until max_tokens. `steps` counts what it generated. The sleep is a floor: a slow machine generates fewer steps
    in a given time, never more, so a reply of LONG tokens always outlasts HANG_GUARD."""

    def __init__(self, model, tokenizer, delay=DELAY):
        super().__init__(model, tokenizer)
        self.delay, self.steps = delay, 0
        self.token = tokenizer.encode("a")[0]

    def generate(self, tokens, num_samples=1, max_tokens=None, **kwargs):
        for _ in range(max_tokens):
            time.sleep(self.delay)
            self.steps += 1
            yield [self.token] * num_samples, [1] * num_samples


@pytest.fixture(scope="module")
def tokenizer():
    return RustBPETokenizer.train_from_iterator(TEXTS, 320)


@pytest.fixture(scope="module")
def model(tokenizer):
    return tiny_model("gpt", tokenizer.get_vocab_size(), depth=2, seed=1, max_seq_len=128)


@contextlib.contextmanager
def endless_server(model, tokenizer, **limits):
    """chat_web with one replica of an endless model; yields (url, engine)."""
    engine = EndlessEngine(model, tokenizer)
    with serve(create_app([Worker(id=0, model_name="endless", engine=engine)], **limits)) as url:
        yield url, engine


def stats(url):
    return httpx.get(url + "/stats", timeout=HANG_GUARD).json()


def wait_until(condition, what):
    deadline = time.monotonic() + HANG_GUARD
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting until {what}"
        time.sleep(0.01)


def open_request(url, path, head_lines, body=b""):
    """A request written by hand on a socket of our own, so the test decides what is sent and when the client goes
    away."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=HANG_GUARD)
    head = [f"POST {path} HTTP/1.1", f"Host: {host}", "Content-Type: application/json", *head_lines]
    sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode() + body)
    return sock


def post_json(url, path, payload):
    body = json.dumps(payload).encode()
    return open_request(url, path, [f"Content-Length: {len(body)}"], body)


def read_response(sock):
    response = http.client.HTTPResponse(sock)
    response.begin()
    return response.status, response.read()


def small_request(url):
    """A 3-token request: served at once when the replica is free."""
    r = httpx.post(url + "/v1/chat/completions", json={"messages": [user("Hi")], "max_tokens": 3}, timeout=HANG_GUARD)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 3
    return r


# -----------------------------------------------------------------------------
# A client that goes away stops its generation and frees the replica


def test_abandoned_request_stops(model, tokenizer):
    """The attack: a non-stream n=8, max_tokens=4096 request whose client leaves. Before, it ran all 4096 steps for
    nobody while the next request waited behind it (here 205 s, past the hang guard)."""
    with endless_server(model, tokenizer) as (url, engine):
        sock = post_json(url, "/v1/chat/completions", {"messages": [user("Hello")], "n": 8, "max_tokens": LONG})
        wait_until(lambda: engine.steps > 0, "the abandoned request generates")
        sock.close()
        small_request(url)  # the replica is free again: this one got it
        abandoned = engine.steps - 3
        assert 0 < abandoned < LONG
        s = stats(url)
        assert (s["requests_cancelled"], s["requests_served"], s["busy_workers"]) == (1, 1, 0)
        assert s["tokens_generated"] <= 8 * abandoned + 3


@pytest.mark.parametrize("path, extra", [("/chat/completions", {}), ("/v1/chat/completions", {"stream": True})])
def test_abandoned_stream_stops(model, tokenizer, path, extra):
    with endless_server(model, tokenizer) as (url, engine):
        body = {"messages": [user("Hello")], "max_tokens": LONG, **extra}
        with httpx.stream("POST", url + path, json=body, timeout=HANG_GUARD) as r:
            assert r.status_code == 200
            wait_until(lambda: engine.steps > 0, "the stream generates")
        # leaving the block closed the connection halfway through the stream
        small_request(url)
        assert 0 < engine.steps - 3 < LONG
        assert stats(url)["requests_cancelled"] == 1


def test_request_abandoned_in_the_queue_never_runs(model, tokenizer):
    with endless_server(model, tokenizer) as (url, engine):
        with httpx.stream("POST", url + "/chat/completions", json={"messages": [user("Hello")], "max_tokens": LONG},
                          timeout=HANG_GUARD):  # holds the only replica
            wait_until(lambda: engine.steps > 0, "the first request generates")
            sock = post_json(url, "/v1/chat/completions", {"messages": [user("Hi")], "max_tokens": LONG})
            wait_until(lambda: stats(url)["waiting_requests"] == 1, "the second request waits for the replica")
            sock.close()
            wait_until(lambda: stats(url)["waiting_requests"] == 0, "the second request left the queue")
            assert stats(url)["requests_cancelled"] == 1  # the first one still generates
        small_request(url)
        assert engine.steps - 3 < LONG  # neither abandoned request ran to its end
        assert stats(url)["requests_cancelled"] == 2


# -----------------------------------------------------------------------------
# Limits: queue, body size, generation time


def test_full_queue_answers_503_with_retry_after(model, tokenizer):
    with endless_server(model, tokenizer, max_queue=2) as (url, engine):
        with httpx.Client(timeout=HANG_GUARD) as client, contextlib.ExitStack() as streams:
            for _ in range(3):  # one generates, two wait: the queue is full
                r = streams.enter_context(client.stream("POST", url + "/chat/completions",
                                                        json={"messages": [user("Hello")], "max_tokens": LONG}))
                assert r.status_code == 200
            assert stats(url)["waiting_requests"] == 2
            for path in ("/chat/completions", "/v1/chat/completions"):
                r = client.post(url + path, json={"messages": [user("Hi")], "max_tokens": 3})
                assert r.status_code == 503, r.text
                assert int(r.headers["Retry-After"]) >= 1
                assert r.json()["error"]["code"] == "queue_full" and r.json()["error"]["type"] == "server_error"
            assert stats(url)["requests_refused"] == 2
        small_request(url)  # the three streams went away: served at once
        assert stats(url)["requests_cancelled"] == 3


@pytest.mark.parametrize("path", ["/chat/completions", "/v1/chat/completions"])
def test_oversized_body_refused_before_it_is_read(model, tokenizer, path):
    """A Content-Length of 100 MB, and no body sent at all: only an answer that does not read it can come back."""
    with endless_server(model, tokenizer, max_body_bytes=1000) as (url, engine):
        sock = open_request(url, path, ["Content-Length: 100000000"])
        status, body = read_response(sock)
        sock.close()
        assert status == 413, body
        assert json.loads(body)["error"]["code"] == "body_too_large"
        for padding, status in ((800, 200), (1000, 413)):  # unknown fields are ignored, but they are bytes
            body = {"messages": [user("Hi")], "max_tokens": 1, "padding": "x" * padding}
            r = httpx.post(url + path, json=body, timeout=HANG_GUARD)
            assert r.status_code == status, r.text
        assert engine.steps == 1  # only the request within the limit ran


@pytest.mark.parametrize("path", ["/chat/completions", "/v1/chat/completions"])
def test_oversized_chunked_body_refused_as_it_streams(model, tokenizer, path):
    """A chunked body has no length up front: 1200 bytes are sent and the body never ends, so the 413 can only come
    from counting the bytes as they arrive."""
    with endless_server(model, tokenizer, max_body_bytes=1000) as (url, engine):
        sock = open_request(url, path, ["Transfer-Encoding: chunked"])
        for _ in range(2):
            sock.sendall(b"258\r\n" + b"x" * 600 + b"\r\n")  # 0x258 = 600 bytes
        status, body = read_response(sock)
        sock.close()
        assert status == 413, body
        assert json.loads(body)["error"]["code"] == "body_too_large"
        assert engine.steps == 0


@pytest.mark.parametrize("stream", [False, True])
def test_time_limit_stops_generation(model, tokenizer, stream):
    """--max_generation_seconds=0.5 against a reply that would take 205 s: it stops with finish_reason "length"."""
    with endless_server(model, tokenizer, max_generation_seconds=0.5) as (url, engine):
        body = {"messages": [user("Hi")], "max_tokens": LONG, "stream": stream,
                "stream_options": {"include_usage": True} if stream else None}
        r = httpx.post(url + "/v1/chat/completions", json=body, timeout=HANG_GUARD)
        assert r.status_code == 200
        if stream:
            chunks = [json.loads(line[6:]) for line in r.text.splitlines()
                      if line.startswith("data: ") and line != "data: [DONE]"]
            finish = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1]
            tokens = chunks[-1]["usage"]["completion_tokens"]
        else:
            finish, tokens = r.json()["choices"][0]["finish_reason"], r.json()["usage"]["completion_tokens"]
        assert finish == "length"
        assert 0 < tokens == engine.steps < LONG
        s = stats(url)
        assert (s["requests_timed_out"], s["requests_served"]) == (1, 1)


# -----------------------------------------------------------------------------
# Schemathesis: generated requests against /openapi.json, on a tiny random model (real sampling)


@pytest.fixture(scope="module")
def schema_server(model, tokenizer):
    app = create_app([Worker(id=0, model_name="gpt_tiny", engine=Engine(model, tokenizer))], max_tokens=16)
    with serve(app) as url:
        yield url


def run_schemathesis(url, *options):
    """The schemathesis CLI against `url` with tests/reliability/schemathesis.toml; returns the number of cases it
    generated. Every check must pass: no 5xx, responses as the schema says, schema-valid requests served or refused
    only for a documented reason, schema-breaking ones refused."""
    pytest.importorskip("schemathesis")
    cmd = [sys.executable, "-m", "schemathesis.cli", "--no-color", "--config-file", SCHEMATHESIS_CONFIG, "run",
           url + "/openapi.json", "--workers", "1", "--generation-database", "none", *options]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stdout[-20000:] + result.stderr[-5000:]
    generated, passed = map(int, re.search(r"(\d+) generated, (\d+) passed", result.stdout).groups())
    assert generated == passed
    return generated


def test_schemathesis_boundaries(schema_server):
    """The coverage phase: each field at and just past its limits, missing, null, of the wrong type (~360 cases)."""
    assert run_schemathesis(schema_server, "--phases", "coverage", "--seed", "0") >= 100


@pytest.mark.slow
def test_schemathesis_1000_cases(schema_server):
    assert run_schemathesis(schema_server, "--max-examples", "500") >= 1000
