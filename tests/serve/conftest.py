"""What the chat web server's tests share: a tiny tokenizer and one tiny model of each architecture (module-scoped
fixtures), workers made of them, a server in a thread, and the reply the server must give."""

import contextlib
import threading
import time

import pytest
import uvicorn

from nanochat.engine import Engine
from nanochat.models import MODEL_TYPES
from nanochat.serve import Worker
from nanochat.tokenizer import RustBPETokenizer
from tests.conftest import free_port, tiny_model

TEXTS = ["Hello! How are you today? I am fine, thank you. What is the capital of France? It is Paris.",
         "The quick brown fox jumps over the lazy dog. Once upon a time there was a little model that talked."] * 20
SEQ_LEN = 128


@pytest.fixture(scope="module")
def tokenizer():
    return RustBPETokenizer.train_from_iterator(TEXTS, 320)


@pytest.fixture(scope="module")
def models(tokenizer):
    """One tiny model of each architecture."""
    V = tokenizer.get_vocab_size()
    return {t: tiny_model(t, V, depth=2, seed=i + 1, max_seq_len=SEQ_LEN) for i, t in enumerate(MODEL_TYPES)}


def make_workers(models, tokenizer, spec):
    """spec: [(served name, model type, source, replicas)]; replicas of one model share its weights."""
    workers = []
    for name, model_type, source, replicas in spec:
        for _ in range(replicas):
            workers.append(Worker(id=len(workers), model_name=name, engine=Engine(models[model_type], tokenizer),
                                  source=source))
    return workers


@contextlib.contextmanager
def serve(app):
    """uvicorn in a thread on a free port; yields the base URL and stops the server afterwards."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not server.started:
        assert thread.is_alive() and time.time() < deadline, "the server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{server.config.port}"
    finally:
        server.should_exit = True
        thread.join(timeout=20)


def greedy_reply(model, tokenizer, prompt, max_tokens):
    """What the server must answer with temperature 0: the engine's greedy tokens up to the first end token."""
    ends = {tokenizer.encode_special("<|assistant_end|>"), tokenizer.get_bos_token_id()}
    out = []
    for column, _ in Engine(model, tokenizer).generate(prompt, max_tokens=max_tokens, temperature=0.0):
        if column[0] in ends:
            return tokenizer.decode(out), len(out), "stop"
        out.append(column[0])
    return tokenizer.decode(out), len(out), "length"


def chat_prompt(tokenizer, messages):
    return tokenizer.render_for_completion({"messages": messages})


def user(content):
    return {"role": "user", "content": content}
