import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

from nanochat.checkpoint import checkpoint_dir, find_last_step, load_model, load_rank_state, read_meta
from nanochat.cli import normalize_argv, parse
from nanochat.config import BaseTrainConfig
from nanochat.log import UserError
from nanochat.mfu import cpu_peak_key, cpu_peak_path, read_cpu_peaks
from nanochat.models import MODEL_TYPES, build_model, config_from_depth
from nanochat.steps import lr_multiplier, muon_momentum, optimizer_step, weight_decay_multiplier
from scripts import base_train
from tests.conftest import first_type_fast, sigkill_when, torch_threads

TYPES = list(MODEL_TYPES)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--depth=1", "--head_dim=32", "--max_seq_len=32", "--device_batch_size=2", "--eval_every=-1",
        "--eval_tokens=256", "--sample_every=-1"]


def read_metrics(ckpt_dir):
    with open(os.path.join(ckpt_dir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    return {r["step"]: r["loss"] for r in records if "loss" in r}, [r for r in records if "val_bpb" in r]


def run_script(args, base_dir, **kwargs):
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(base_dir), OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "scripts.base_train", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs)


def test_argv_conventions():
    assert normalize_argv(["--", "--model-type=alcoholic", "--depth", "4", "--max-seq-len=64"]) == \
        ["--model_type=alcoholic", "--depth", "4", "--max_seq_len=64"]
    config = parse(BaseTrainConfig, ["--model-type", "alcoholic", "--qk-norm=false", "--", "--depth", "2"][:3])
    assert config.model_type == "alcoholic" and config.model == {"qk_norm": False}
    assert parse(BaseTrainConfig, ["--", "--depth", "2", "--resume"]).resume is True  # a bare boolean flag is true


@pytest.mark.parametrize("model_type", TYPES)
def test_train_saves_typed_checkpoint(base_env, model_type, capsys):
    result = base_train.main([f"--model_type={model_type}", *TINY, "--num_iterations=3"])
    out = capsys.readouterr().out
    assert "one micro-batch per step" in out and "tok/s" in out and "eta" in out
    d = checkpoint_dir("base", f"{model_type}_d1")
    assert result["checkpoint_dir"] == d and find_last_step(d) == 3
    meta = read_meta(d, 3)
    assert meta["model_type"] == model_type and meta["train_args"]["depth"] == 1
    losses, vals = read_metrics(d)
    assert sorted(losses) == [0, 1, 2] and vals[-1]["step"] == 3
    model, _, _ = load_model("base", model_tag=f"{model_type}_d1")
    assert model.model_type == model_type


def test_core_metric_during_training(base_env, monkeypatch):
    from nanochat import core_eval

    monkeypatch.setattr(core_eval, "OFFICIAL_BUNDLE_URL", "http://127.0.0.1:9/eval_bundle.zip")  # offline
    base_train.main(["--model_type=alcoholic", *TINY, "--num_iterations=2", "--core_metric_every=1",
                     "--core_metric_max_per_task=11"])
    with open(os.path.join(checkpoint_dir("base", "alcoholic_d1"), "metrics.jsonl")) as f:
        cores = [json.loads(line) for line in f if '"core"' in line]
    assert [c["step"] for c in cores] == [1, 2] and all(-1 <= c["core"] <= 1 for c in cores)


def test_unknown_model_type_lists_valid(base_env, capsys):
    with pytest.raises(SystemExit) as e:  # a flag error: refused at parse time, before any work
        base_train.main(["--model_type=llama", *TINY, "--num_iterations=1"])
    assert e.value.code == 2 and f"valid: {', '.join(MODEL_TYPES)}" in capsys.readouterr().err


def test_override_unknown_for_type(base_env, capsys):
    with pytest.raises(SystemExit) as e:
        base_train.main(["--model_type=gpt", *TINY, "--num_iterations=1", "--rope_theta=5e5"])
    assert e.value.code == 2 and "unknown override 'rope_theta' for model_type 'gpt'" in capsys.readouterr().err


def test_total_batch_not_divisible(base_env):
    with pytest.raises(UserError, match="not a multiple of .* = 64. Use e.g. --total_batch_size=64"):
        base_train.main([*TINY, "--num_iterations=1", "--total_batch_size=100"])


def test_grad_accumulation_plan(base_env, capsys):
    base_train.main([*TINY, "--num_iterations=2", "--total_batch_size=128"])
    assert "x 2 accumulation = 128 tokens/step" in capsys.readouterr().out


def test_dry_run_prints_every_type(base_env, capsys):
    assert base_train.main(["--model_type=alcoholic", "--depth=1", "--dry_run"]) is None
    out = capsys.readouterr().out
    assert "[alcoholic (chosen)]" in out and all(f"[{t}]" in out for t in MODEL_TYPES if t != "alcoholic")
    assert out.count("estimated peak memory") == len(MODEL_TYPES) and "matrices=" in out and "FLOPs/token" in out
    assert not os.path.exists(checkpoint_dir("base", "alcoholic_d1"))


def test_mfu_above_100_percent_is_na_and_the_peak_measured_again(base_env, capsys):
    with open(cpu_peak_path(), "w") as f:  # a peak far too low, as one measured under heavy load would be
        json.dump({cpu_peak_key(): {"flops": 1.0}}, f)
    base_train.main([*TINY, "--num_iterations=2"])
    out = capsys.readouterr().out
    assert "mfu n/a" in out and "so the peak is wrong" in out and not re.search(r"mfu \d", out)
    assert cpu_peak_key() not in read_cpu_peaks()


def test_activation_checkpointing_trains(base_env, capsys):
    result = base_train.main([*TINY, "--num_iterations=2", "--activation_checkpointing"])
    assert result["step"] == 2 and "mfu" in capsys.readouterr().out


def test_nan_loss_stops_and_keeps_last_checkpoint(base_env, monkeypatch, capsys):
    calls = {"n": 0}
    original = MODEL_TYPES["gpt"].model_cls.forward

    def forward(self, idx, targets=None, kv_cache=None, loss_reduction="mean"):
        out = original(self, idx, targets, kv_cache, loss_reduction)
        if targets is not None and loss_reduction == "sum":  # the training loss (evaluation asks for "none")
            calls["n"] += 1
            if calls["n"] == 6:  # training step 5
                return out * float("nan")
        return out

    monkeypatch.setattr(MODEL_TYPES["gpt"].model_cls, "forward", forward)
    with pytest.raises(SystemExit) as e:
        base_train.main([*TINY, "--num_iterations=10", "--save_every=2"])
    assert e.value.code == 1
    out = capsys.readouterr().out
    d = checkpoint_dir("base", "gpt_d1")
    assert "NaN/inf at step 5" in out and f"last good checkpoint is step 4 in {d}" in out
    assert find_last_step(d) == 4
    model, _, meta = load_model("base", model_tag="gpt_d1")
    assert meta["step"] == 4 and all(torch.isfinite(p).all() for p in model.parameters())


def test_oom_prints_concrete_advice(base_env, monkeypatch, capsys):
    def forward(self, *args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(MODEL_TYPES["alcoholic"].model_cls, "forward", forward)
    with pytest.raises(SystemExit) as e:
        base_train.main(["--model_type=alcoholic", *TINY, "--num_iterations=2"])
    assert e.value.code == 2
    out = capsys.readouterr().out
    assert "Reduce --device_batch_size (e.g. 2 -> 1)" in out and "Reduce --depth" in out
    assert "Next try: python -m scripts.base_train --model_type=alcoholic --depth=1 --device_batch_size=1" in out
    assert "Alcoholic uses more memory" in out


@pytest.mark.parametrize("model_type", TYPES)
def test_validation_bpb_decreases(base_env, model_type):
    base_train.main([f"--model_type={model_type}", "--depth=2", "--head_dim=32", "--max_seq_len=64",
                     "--device_batch_size=4", "--num_iterations=40", "--eval_every=20", "--eval_tokens=2048",
                     "--sample_every=-1"])
    _, vals = read_metrics(checkpoint_dir("base", f"{model_type}_d2"))
    bpb = [v["val_bpb"] for v in vals]
    assert [v["step"] for v in vals] == [0, 20, 40]
    assert bpb[0] > bpb[1] > bpb[2] and bpb[2] < 0.8 * bpb[0], bpb


# Bitwise equality holds on any machine: both runs are separate processes of the same binary with the same inputs
# and OMP_NUM_THREADS=1, so every kernel runs the same sequence of float operations. Slow for every type: the
# default suite kills a real process in tests/test_chat_stages.py (chat_sft runs the same training loop and
# checkpointing) and resumes base_train bitwise from a cut save in tests/reliability/test_checkpoint_data.py.
@pytest.mark.slow
@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_sigkill_then_resume_is_bitwise_identical(base_env, model_type):
    steps = 40
    args = [f"--model_type={model_type}", *TINY, f"--num_iterations={steps}", "--save_every=5"]
    ref = run_script([*args, "--model_tag=ref"], base_env)  # runs beside the victim, on the other core
    d = checkpoint_dir("base", "victim")
    victim = run_script([*args, "--model_tag=victim"], base_env)
    metrics = os.path.join(d, "metrics.jsonl")
    # kill once a checkpoint exists and training went on past it
    sigkill_when(victim, lambda: os.path.exists(metrics) and len(open(metrics).read().splitlines()) >= 10)
    killed_at = find_last_step(d)
    assert 5 <= killed_at < steps
    out, _ = ref.communicate(timeout=300)
    assert ref.returncode == 0, out
    ref_losses, _ = read_metrics(checkpoint_dir("base", "ref"))

    resumed = run_script([*args, "--model_tag=victim", "--resume"], base_env)
    out, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, out
    assert f"Resuming {d} from step {killed_at}" in out
    losses, _ = read_metrics(d)
    assert sorted(losses) == list(range(steps))
    assert losses == ref_losses  # bitwise: floats compared exactly
    a, _, _ = load_model("base", model_tag="ref")
    b, _, _ = load_model("base", model_tag="victim")
    for (k, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), k


@pytest.mark.slow
def test_resume_with_nanochat_muon_is_bitwise_identical(base_env):
    """The nanochat variant's extra optimizer state (NorMuon second moments) goes through the checkpoint: a run
    resumed from its step-3 checkpoint ends exactly where the uninterrupted run ends."""
    args = ["--model_type=gpt", *TINY, "--num_iterations=6", "--save_every=3", "--muon_variant=nanochat"]
    base_train.main([*args, "--model_tag=ref"])
    ref = checkpoint_dir("base", "ref")
    assert read_meta(ref, 6)["train_args"]["muon_variant"] == "nanochat"
    muon_state = load_rank_state(ref, 3)["optimizers"][1]["state"]
    assert all("second_moment" in s for s in muon_state.values())
    victim = checkpoint_dir("base", "victim")
    shutil.copytree(ref, victim)
    for name in os.listdir(victim):
        if "000006" in name or name == "metrics.jsonl":
            os.remove(os.path.join(victim, name))
    base_train.main([*args, "--model_tag=victim", "--resume"])
    assert read_metrics(victim)[0] == {s: v for s, v in read_metrics(ref)[0].items() if s >= 3}
    a, _, _ = load_model("base", model_tag="ref")
    b, _, _ = load_model("base", model_tag="victim")
    for (k, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), k


def test_resume_with_other_type_is_refused(base_env):
    base_train.main(["--model_type=alcoholic", *TINY, "--num_iterations=2", "--model_tag=x"])
    with pytest.raises(Exception, match="holds a 'alcoholic' model, but --model_type=gpt"):
        base_train.main(["--model_type=gpt", *TINY, "--num_iterations=4", "--model_tag=x", "--resume"])


@pytest.mark.parametrize("model_type", first_type_fast())
def test_ddp_two_ranks_equals_single_process(base_env, model_type):
    """torchrun with 2 gloo ranks == one process that averages the gradients of the same two rank streams."""
    from nanochat.dataloader import DataLoader
    from nanochat.tokenizer import get_tokenizer

    steps = 4
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(base_env), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "scripts.base_train", "--", f"--model_type={model_type}", *TINY, f"--num_iterations={steps}"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    d = checkpoint_dir("base", f"{model_type}_d1")
    assert read_meta(d, steps)["world_size"] == 2
    states = [load_rank_state(d, steps, r)["dataloader"] for r in (0, 1)]
    assert states[0]["rank"] == 0 and states[1]["rank"] == 1 and states[0]["cur_pos"] != states[1]["cur_pos"]

    # the same training in one process, on one thread as each rank: the same kernels reduce in the same order. The
    # two ranks' gradients are summed once either way (a + b is exact to swap), and the halving is by a power of
    # two, so the weights must agree bit for bit
    args = parse(BaseTrainConfig, [f"--model_type={model_type}", *TINY])
    tokenizer = get_tokenizer()
    with torch_threads(1):
        torch.manual_seed(args.seed)
        config = config_from_depth(model_type, 1, 32, tokenizer.get_vocab_size(), head_dim=32)
        model = build_model(model_type, config)
        optimizers = model.setup_optimizers()
        loaders = [DataLoader(2, 32, "train", tokenizer=tokenizer, rank=r, world_size=2) for r in (0, 1)]
        first = [next(loader) for loader in loaders]
        assert not torch.equal(first[0][0], first[1][0])  # the ranks see different data
        for step in range(steps):
            for x, y in first if step == 0 else [next(loader) for loader in loaders]:
                (model(x, y) / 2).backward()
            optimizer_step(model, optimizers, lr_multiplier(step, steps, args), muon_momentum(step), args.grad_clip,
                           weight_decay_multiplier(step, steps))
    ddp_model, _, _ = load_model("base", model_tag=f"{model_type}_d1")
    for (k, p), q in zip(model.state_dict().items(), ddp_model.state_dict().values()):
        torch.testing.assert_close(p, q, atol=0, rtol=0, msg=lambda m, k=k: f"{k}: {m}")


@pytest.mark.slow
@pytest.mark.parametrize("model_type", TYPES)
def test_guide_small_model_command(base_env, model_type):
    """The guide's 'Small Model (Learning)' command, unchanged (python -m form)."""
    proc = run_script([f"--model_type={model_type}", "--depth=4", "--device_batch_size=1", "--num_iterations=50"],
                      base_env)
    out, _ = proc.communicate(timeout=1800)
    assert proc.returncode == 0, out
    d = checkpoint_dir("base", f"{model_type}_d4")
    assert read_meta(d, 50)["model_type"] == model_type
