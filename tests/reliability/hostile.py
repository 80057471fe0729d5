"""Helpers of the hostile-input tests: a base dir with its own tokenizer and a tiny checkpoint, edits of a checkpoint's
meta, a CLI run judged by its exit status and stderr, a subprocess judged by its peak memory, a hang guard."""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading

import pytest

from nanochat.checkpoint import checkpoint_dir, save_checkpoint
from nanochat.cli import run_cli
from tests.conftest import tiny_model

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HANG = 30  # seconds: a hang guard only; every refusal below takes well under a second


def own_tokenizer(base):
    """Replace the base dir's link to the shared tokenizer by a copy that a test may damage."""
    link = base / "tokenizer"
    target = os.path.realpath(link)
    os.remove(link)
    shutil.copytree(target, link)
    return link


def save_tiny(model_type="gpt", source="base", tag="t", step=5, **overrides):
    """A tiny checkpoint (depth 1, head_dim 32, context 32) of the base dir's tokenizer; returns its directory."""
    from nanochat.tokenizer import get_tokenizer

    tokenizer = get_tokenizer()
    model = tiny_model(model_type, tokenizer.get_vocab_size(), depth=1, max_seq_len=32, head_dim=32, **overrides)
    d = checkpoint_dir(source, tag)
    save_checkpoint(d, step, model, {"tokenizer_hash": tokenizer.hash})
    return d


def edit_meta(ckpt_dir, step=5, **model_config):
    """Set model_config fields of a saved meta file (weights and their hash untouched)."""
    path = os.path.join(ckpt_dir, f"meta_{step:06d}.json")
    with open(path) as f:
        meta = json.load(f)
    meta["model_config"].update(model_config)
    with open(path, "w") as f:
        json.dump(meta, f)
    return path


def cli_error(capsys, main, argv, status=None):
    """Run main(argv) as its script does (run_cli): it must exit non-zero with exactly one line on stderr and no
    traceback. Returns that line."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        within(HANG, run_cli, lambda: main(argv))
    err = capsys.readouterr().err
    assert e.value.code not in (0, None) and (status is None or e.value.code == status), (e.value.code, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def within(seconds, fn, *args):
    """fn(*args) in a thread: a hang fails the test after `seconds` instead of stopping the suite."""
    result = {}

    def run():
        try:
            result["value"] = fn(*args)
        except BaseException as e:  # handed to the test thread below
            result["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        pytest.fail(f"{getattr(fn, '__name__', fn)} still running after {seconds}s: it hangs")
    if "error" in result:
        raise result["error"]
    return result.get("value")


def run_measured(args, env=None, timeout=300):
    """Run `python -m <args>` in a fresh process: (exit status, stdout, stderr, peak RSS in bytes). The peak is that
    child's own, read from outside by wait4."""
    env = dict(os.environ, **(env or {}))
    env.pop("PYTEST_XDIST_WORKER", None)
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err, open(os.devnull) as devnull:
        proc = subprocess.Popen([sys.executable, "-m", *args], cwd=REPO, env=env, stdin=devnull, stdout=out,
                                stderr=err)
        timer = threading.Timer(timeout, proc.kill)
        timer.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            timer.cancel()
        proc.returncode = os.waitstatus_to_exitcode(status)
        assert proc.returncode != -9, f"{args} still running after {timeout}s"
        out.seek(0)
        err.seek(0)
        return proc.returncode, out.read().decode(), err.read().decode(), usage.ru_maxrss * 1024
