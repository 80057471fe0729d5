"""Validation at the door: every bad flag of every script is one line on stderr and a non-zero exit, before any
work; a non-finite loss or gradient stops training at any step, the first included, and never leaves a
non-finite checkpoint."""

import importlib
import os
import subprocess
import sys

import pytest
import torch

from nanochat.checkpoint import checkpoint_dir, find_last_step, list_steps
from nanochat.cli import run_cli
from nanochat.models import MODEL_TYPES
from scripts import base_train

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = ["--depth=1", "--head_dim=32", "--max_seq_len=32", "--device_batch_size=2", "--eval_every=-1",
        "--eval_tokens=64", "--sample_every=-1"]

BAD_FLAGS = [
    # (script, argv, exit status, what the one line says)
    ("base_train", ["--device_batch_size=0"], 2, "--device_batch_size: '0' is not a positive integer"),
    ("base_train", ["--depth=0"], 2, "--depth: '0' is not a positive integer"),
    ("base_train", ["--max_seq_len=0"], 2, "--max_seq_len: '0' is not an integer in [1, 131072]"),
    ("base_train", ["--max_seq_len=10000000", "--dry_run"], 2, "--max_seq_len: '10000000' is not an integer in "
     "[1, 131072] (the longest context nanochat accepts)"),
    ("base_train", ["--matrix_lr=nan"], 2, "--matrix_lr: 'nan' is not a finite number >= 0"),
    ("base_train", ["--embedding_lr=-0.1"], 2, "--embedding_lr: '-0.1' is not a finite number >= 0"),
    ("base_train", ["--unembedding_lr=inf"], 2, "--unembedding_lr: 'inf' is not a finite number >= 0"),
    ("base_train", ["--num_iterations=-5"], 2, "--num_iterations: '-5' is not -1 (auto) or an integer >= 1"),
    ("base_train", ["--num_iterations=0"], 2, "--num_iterations: '0' is not -1 (auto) or an integer >= 1"),
    ("base_train", ["--save_every=0"], 2, "--save_every: '0' is not -1 (auto) or an integer >= 1"),
    ("base_train", ["--matrix_weight_decay=nan"], 2,
     "--matrix_weight_decay: 'nan' is not -1 (auto) or a finite number >= 0"),
    ("chat_rl", ["--matrix_weight_decay=-0.5"], 2,
     "--matrix_weight_decay: '-0.5' is not -1 (auto) or a finite number >= 0"),
    ("base_train", ["--warmdown_ratio=1.5"], 2, "--warmdown_ratio: '1.5' is not a number in [0, 1]"),
    ("base_train", ["--warmup_ratio=0.9"], 2, "would overlap"),
    ("base_train", ["--model_type=llama"], 2, "--model_type='llama' is not known; valid: gpt, alcoholic"),
    ("base_train", ["--model_type=alcoholic", "--n_kv_head=3"], 2, "must be a multiple of n_kv_head=3"),
    ("base_train", ["--model_type=alcoholic", "--norm_type=bogus"], 2, "unknown norm_type='bogus'"),
    ("base_train", ["--model_type=alcoholic", "--dropout=2.0"], 2, "dropout=2.0 must be in [0, 1)"),
    ("base_train", ["--rope_theta=5e5"], 2, "unknown override 'rope_theta' for model_type 'gpt'"),
    ("base_train", ["--qk_norm=maybe", "--model_type=alcoholic"], 2, "--qk_norm"),
    ("mid_train", ["--num_epochs=0"], 2, "--num_epochs: '0' is not a finite number > 0"),
    ("chat_sft", ["--device_batch_size=-3"], 2, "--device_batch_size: '-3' is not a positive integer"),
    ("chat_sft", ["--examples_per_step=0"], 2, "--examples_per_step: '0' is not a positive integer"),
    ("chat_rl", ["--num_samples=0"], 2, "--num_samples: '0' is not a positive integer"),
    ("chat_rl", ["--temperature=-1"], 2, "--temperature: '-1' is not a finite number >= 0"),
    ("chat_eval", ["-x", "0"], 2, "--max_problems: '0' is not a positive integer"),
    ("chat_eval", ["-a", "Nope"], 2, "unknown task 'Nope'"),
    ("chat_cli", ["-m", "0"], 2, "--max_tokens: '0' is not a positive integer"),
    ("chat_web", ["--port=70000"], 2, "--port: '70000' is not a port number (0-65535)"),
    ("chat_web", ["--max_queue=0"], 2, "--max_queue: '0' is not a positive integer"),
    ("chat_web", ["--max_generation_seconds=nan"], 2, "--max_generation_seconds: 'nan' is not a finite number > 0"),
    ("base_eval", ["--max_per_task=0"], 2, "--max_per_task: '0' is not -1 (auto) or an integer >= 1"),
    ("base_loss", ["--device_batch_size=0"], 2, "--device_batch_size: '0' is not a positive integer"),
    ("base_loss", ["-s", "-1"], 2, "--step: '-1' is not an integer >= 0"),
    ("tok_train", ["--vocab_size=0"], 2, "--vocab_size: '0' is not a positive integer"),
    ("tok_train", ["--vocab_size=100"], 1, "vocab_size=100 is too small"),
    ("tok_train", ["--max_chars=inf"], 2, "--max_chars: 'inf' is not a positive number"),
]


@pytest.mark.parametrize("script, argv, status, message", BAD_FLAGS,
                         ids=[f"{s}{' '.join(a)}" for s, a, _, _ in BAD_FLAGS])
def test_bad_flag_is_one_line_and_no_work(tmp_path, monkeypatch, capsys, script, argv, status, message):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    main = importlib.import_module(f"scripts.{script}").main
    with pytest.raises(SystemExit) as e:
        run_cli(lambda: main(argv))
    assert e.value.code == status
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err and "Traceback" not in err, err
    assert os.listdir(tmp_path) == []  # nothing prepared, trained or written


def test_bad_flag_from_the_command_line(tmp_path):
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(tmp_path))
    proc = subprocess.run([sys.executable, "-m", "scripts.base_train", "--device_batch_size=0"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.splitlines() == [
        "base_train.py: error: argument --device_batch_size: '0' is not a positive integer (see --help)"]


# -----------------------------------------------------------------------------
# Non-finite values in training


def poison(monkeypatch, model_type, at_call, where):
    """Make the training loss (where="loss") or one gradient (where="grad") NaN at the at_call-th training forward."""
    cls = MODEL_TYPES[model_type].model_cls
    original = cls.forward
    calls = {"n": 0}

    def forward(self, idx, targets=None, kv_cache=None, loss_reduction="mean"):
        out = original(self, idx, targets, kv_cache, loss_reduction)
        if targets is not None and loss_reduction == "sum":  # the training loss
            calls["n"] += 1
            if calls["n"] == at_call:
                if where == "loss":
                    return out * float("nan")
                weight = self.lm_head.weight
                weight.register_hook(lambda g: g * float("nan"))  # the loss stays finite, a gradient does not
        return out

    monkeypatch.setattr(cls, "forward", forward)


@pytest.mark.parametrize("where", ["loss", "grad"])
def test_non_finite_at_the_first_step_saves_nothing(base_env, monkeypatch, capsys, where):
    poison(monkeypatch, "gpt", 1, where)
    with pytest.raises(SystemExit) as e:
        base_train.main([*TINY, "--num_iterations=4", "--save_every=1"])
    assert e.value.code == 1
    assert "NaN/inf at step 0" in capsys.readouterr().out
    assert list_steps(checkpoint_dir("base", "gpt_d1")) == []


def test_non_finite_gradient_later_keeps_the_last_good_checkpoint(base_env, monkeypatch, capsys):
    poison(monkeypatch, "gpt", 4, "grad")  # training step 3
    with pytest.raises(SystemExit):
        base_train.main([*TINY, "--num_iterations=6", "--save_every=2"])
    d = checkpoint_dir("base", "gpt_d1")
    assert "NaN/inf at step 3" in capsys.readouterr().out and find_last_step(d) == 2
    from nanochat.checkpoint import load_model

    model, _, _ = load_model("base", model_tag="gpt_d1")
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_non_finite_between_log_steps_is_caught_before_the_next_checkpoint(base_env, monkeypatch, capsys):
    # with --log_every the loss is not read every step: the NaN of step 1 is found when step 2 would be saved,
    # named with its own step, and the checkpoint of step 1 (written before it) stays the last one
    poison(monkeypatch, "gpt", 2, "loss")
    with pytest.raises(SystemExit) as e:
        base_train.main([*TINY, "--num_iterations=6", "--save_every=1", "--log_every=5"])
    assert e.value.code == 1
    d = checkpoint_dir("base", "gpt_d1")
    assert "NaN/inf at step 1" in capsys.readouterr().out and find_last_step(d) == 1
