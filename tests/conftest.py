"""Fixtures and helpers that several test files share: a prepared base dir, tiny models of any registered
architecture, free ports. Helpers are imported as `from tests.conftest import tiny_model`."""

import contextlib
import os
import signal
import socket
import time

import pytest
import torch

from nanochat.models import MODEL_TYPES, build_model, config_from_depth


@pytest.fixture(scope="session")
def prepared_base_dir(tmp_path_factory):
    """A base dir with the embedded corpus shards and a small (512-token) tokenizer, built once per session.
    Tests that train copy nothing from it: they point NANOCHAT_BASE_DIR at it and write under their own tags,
    or use `base_env` for a private copy."""
    base = tmp_path_factory.mktemp("nanochat_base")
    old = os.environ.get("NANOCHAT_BASE_DIR")
    os.environ["NANOCHAT_BASE_DIR"] = str(base)
    try:
        from nanochat.dataset import build_embedded_shards
        from nanochat.tokenizer import train_tokenizer

        build_embedded_shards()
        train_tokenizer(vocab_size=512, max_chars=3_000_000)
    finally:
        if old is None:
            os.environ.pop("NANOCHAT_BASE_DIR", None)
        else:
            os.environ["NANOCHAT_BASE_DIR"] = old
    return base


@pytest.fixture
def base_env(prepared_base_dir, tmp_path, monkeypatch):
    """A private base dir per test: shards and tokenizer linked from the session's prepared one."""
    base = tmp_path / "base"
    base.mkdir()
    for name in ("embedded_data", "tokenizer"):
        os.symlink(prepared_base_dir / name, base / name)
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(base))
    return base


# -----------------------------------------------------------------------------
# Helpers


def sigkill_when(proc, ready, timeout=300):
    """SIGKILL the subprocess `proc` as soon as ready() is true (polled every 5 ms); it must still be running then."""
    deadline = time.time() + timeout
    while not ready():
        assert proc.poll() is None, "the run ended before it could be interrupted"
        assert time.time() < deadline, f"not ready to be interrupted after {timeout} s"
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL


@contextlib.contextmanager
def torch_threads(n):
    """Run the block with n intra-op threads, then restore the count. A test that compares a computation with
    another one (a subprocess started with OMP_NUM_THREADS=n, or a second in-process run) runs both under the same
    count: a matmul's reduction order, and hence its last bits, depends on how many threads split it."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# Tests that compare two computations of one function whose float operations run in another order (other kernels,
# shapes, chunks or thread counts) run both in float64. Summed in any two orders, n terms differ by at most
# 2 n u sum|terms| (u = 2^-53 ~ 1.1e-16; Higham, Accuracy and Stability of Numerical Algorithms, 2002, eq. 3.5):
# for the tests' models (reductions of at most 4096 terms of magnitude <= 10, two layers whose Lipschitz constants
# are below 10^2) that bounds every output difference by ~1e-9, at any thread count and on any CPU. Seen: <= 1e-13.
FP64_ATOL = 1e-8


def free_port():
    """A TCP port free on 127.0.0.1 right now (for a server, or a torch.distributed rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def perturb(model, seed=0):
    """Random values for every parameter (matrices ~ 1/sqrt(fan_in), vectors such as norm weights ~ 1), so that the
    zero-initialised output projections, which make every block a no-op, hide no path: no context, KV-cache or
    loading bug."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.copy_(torch.randn(p.shape, generator=g) * p.size(1) ** -0.5)
            else:
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
    return model


def tiny_model(model_type, vocab_size, depth=1, max_seq_len=32, head_dim=32, seed=0, random_weights=True,
               **overrides):
    """A small model of any registered architecture, in eval mode: perturbed weights (see perturb), or with
    random_weights=False the architecture's own init. Overrides set any config field."""
    torch.manual_seed(seed)
    config = config_from_depth(model_type, depth, max_seq_len, vocab_size, head_dim=head_dim, **overrides)
    model = build_model(model_type, config)
    return (perturb(model, seed) if random_weights else model).eval()


def first_type_fast():
    """Every registered architecture as a pytest parameter, all but the first marked slow: for long tests of
    behaviour that does not depend on the architecture (one shows it; -m slow runs the others)."""
    first, *rest = MODEL_TYPES
    return [first] + [pytest.param(t, marks=pytest.mark.slow) for t in rest]


def pytest_configure(config):
    # Under pytest-xdist each worker is one process of its own: one intra-op thread each, so two workers on two
    # cores do not oversubscribe them (OpenMP threads that spin-wait for each other are slow when they share a core)
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        torch.set_num_threads(1)
