import os

import pytest


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
        from scripts.tok_train import train_tokenizer

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


def pytest_configure(config):
    # Under pytest-xdist each worker is one process of its own: one intra-op thread each, so two workers on two
    # cores do not oversubscribe them (OpenMP threads that spin-wait for each other are slow when they share a core)
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        torch.set_num_threads(1)
