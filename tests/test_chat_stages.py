"""Chat stages: the conversation loaders, the SFT loss mask, RL rewards and advantages, base -> mid -> sft -> rl with
the model type carried along, and exact resume of chat_sft after a SIGKILL."""

import json
import os
import subprocess
import sys

import pytest
import torch

from nanochat import rl
from nanochat.checkpoint import CheckpointError, checkpoint_dir, find_last_step, load_model, read_meta
from nanochat.cli import parse
from nanochat.config import BaseTrainConfig, MidConfig, RLConfig, SFTConfig, TrainConfig, inherit
from nanochat.dataloader import PackedConversationLoader, PaddedConversationLoader
from nanochat.engine import Engine
from nanochat.models import MODEL_TYPES
from nanochat.steps import forward_backward, setup_optimizers
from nanochat.tokenizer import get_tokenizer
from scripts import base_train, chat_rl, chat_sft, mid_train
from tasks.common import Task
from tests.conftest import sigkill_when, tiny_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--depth=1", "--head_dim=32", "--max_seq_len=64", "--device_batch_size=2", "--eval_every=-1",
        "--eval_tokens=128", "--sample_every=-1"]
FAST = ["--eval_steps=2", "--eval_every=-1"]


class ListTask(Task):
    def __init__(self, conversations):
        super().__init__()
        self.conversations = conversations

    def num_examples(self):
        return len(self.conversations)

    def get_example(self, index):
        return self.conversations[index]


def conversation(i, words=1):
    return {"messages": [{"role": "user", "content": f"question {i} " * words},
                         {"role": "assistant", "content": [
                             {"type": "text", "text": f"answer {i} "},
                             {"type": "python", "text": f"{i}+1"},
                             {"type": "python_output", "text": str(i + 1)},
                             {"type": "text", "text": f"#### {i + 1}"}]}]}


@pytest.fixture
def tokenizer(base_env):
    return get_tokenizer()


# -----------------------------------------------------------------------------
# Loaders


def test_packed_rows_start_with_bos_and_hold_whole_conversations(tokenizer):
    task = ListTask([conversation(i, words=1 + i % 4) for i in range(40)])
    rendered = [tokenizer.render_conversation(task[i], max_tokens=None)[0] for i in range(40)]
    assert 2 * min(map(len, rendered)) <= 128 and max(map(len, rendered)) <= 128  # a row holds one or more
    loader = PackedConversationLoader(task, tokenizer, B=3, T=127, pool=4, rank=0, world_size=1)
    bos = tokenizer.get_bos_token_id()
    placed = []
    for _ in range(4):
        x, y = next(loader)
        assert x.shape == y.shape == (3, 127)
        for row_x, row_y in zip(x.tolist(), y.tolist()):
            assert row_x[0] == bos  # BOS-aligned: every row starts a conversation
            valid = [t for t in row_y if t != -1]
            tokens = [row_x[0]] + valid  # the row's tokens up to the padding
            assert all(t == -1 for t in row_y[len(valid):])  # padding only at the end
            while tokens:  # the row is whole rendered conversations, one after the other
                match = next(r for r in rendered if tokens[:len(r)] == r)
                placed.append(rendered.index(match))
                tokens = tokens[len(match):]
    assert len(placed) == len(set(placed))  # no conversation twice
    assert len(placed) > 12  # some rows hold two conversations


def test_packed_loader_crops_a_conversation_longer_than_a_row(tokenizer):
    long = conversation(1, words=40)
    ids = tokenizer.render_conversation(long, max_tokens=None)[0]
    x, y = next(PackedConversationLoader(ListTask([long]), tokenizer, 1, 32, rank=0, world_size=1))
    assert len(ids) > 33 and x[0].tolist() == ids[:32] and y[0].tolist() == ids[1:33]


def test_padded_loader_learns_only_the_assistant(tokenizer):
    task = ListTask([conversation(i) for i in range(5)])
    loader = PaddedConversationLoader(task, tokenizer, B=2, T=64, rank=0, world_size=1)
    x, y = next(loader)
    for row in range(2):
        ids, mask = tokenizer.render_conversation(task[row], max_tokens=None)
        n = len(ids) - 1
        assert x[row, :n].tolist() == ids[:-1]
        expected = [t if m else -1 for t, m in zip(ids[1:], mask[1:])]
        assert y[row, :n].tolist() == expected and all(t == -1 for t in y[row, n:].tolist())
        assert any(t != -1 for t in expected) and expected.count(-1) > 0


@pytest.mark.parametrize("loader_cls", [PackedConversationLoader, PaddedConversationLoader])
def test_conversation_loaders_resume_exactly(tokenizer, loader_cls):
    task = ListTask([conversation(i, words=1 + i % 5) for i in range(11)])
    a = loader_cls(task, tokenizer, 2, 48, rank=0, world_size=1)
    for _ in range(5):  # past the end of the first epoch
        next(a)
    state = json.loads(json.dumps(a.state_dict()))  # what a checkpoint stores
    b = loader_cls(task, tokenizer, 2, 48, rank=0, world_size=1)
    b.load_state_dict(state)
    for _ in range(6):
        (xa, ya), (xb, yb) = next(a), next(b)
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


# -----------------------------------------------------------------------------
# The SFT loss


@pytest.mark.parametrize("model_type", list(MODEL_TYPES))
def test_sft_loss_has_no_gradient_outside_the_assistant(tokenizer, model_type):
    model = tiny_model(model_type, tokenizer.get_vocab_size(), max_seq_len=64)
    x, y = next(PaddedConversationLoader(ListTask([conversation(3), conversation(12, words=4)]), tokenizer, 2, 64,
                                         rank=0, world_size=1))
    captured, original = {}, model.logits_or_loss

    def keep(hidden, targets=None, loss_reduction="mean"):  # the final hidden states, the lm_head's input
        hidden.retain_grad()
        captured["hidden"] = hidden
        return original(hidden, targets, loss_reduction)

    model.logits_or_loss = keep
    model(x, y).backward()
    grad = captured["hidden"].grad.abs().sum(-1)  # (B, T)
    assert torch.all(grad[y == -1] == 0)  # exactly zero: user turn, tool output, padding
    assert torch.all(grad[y != -1] > 0)


def test_a_step_without_supervised_tokens_is_finite_and_changes_nothing(tokenizer):
    model = tiny_model("gpt", tokenizer.get_vocab_size(), max_seq_len=64)
    x = torch.randint(0, 100, (2, 16))
    y = torch.full_like(x, -1)
    loss = model(x, y)
    assert torch.isfinite(loss) and loss.item() == 0.0
    before = [p.detach().clone() for p in model.parameters()]
    assert forward_backward(model, [(x, y)], False, 1, "cpu") == (None, 0)
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


# -----------------------------------------------------------------------------
# RL


def test_rl_rewards_and_advantages_by_hand(tokenizer):
    class Problems(Task):  # problem i: "question i", answer i + 1; 4 and 5 render to prompts of one length
        def num_examples(self):
            return 8

        def get_example(self, index):
            return conversation(index)

        def reward(self, conversation, completion):
            return float(completion.strip().endswith(conversation["messages"][1]["content"][-1]["text"]))

    class Scripted(Engine):  # the Engine with its decoding replaced: fixed answers for every prompt decoded at once
        calls = []

        def generate_batch_group(self, prompts, num_samples, keep_end, **kwargs):
            self.calls.append(len(prompts))
            texts = ["so #### 5", "#### 6", "hm #### 5", "#### 55"]
            rows, masks = [], []
            for prompt in prompts:
                for text in texts:
                    rows.append(prompt + tokenizer.encode(text) + [tokenizer.encode_special("<|assistant_end|>")])
                    masks.append([0] * len(prompt) + [1] * (len(rows[-1]) - len(prompt)))
            return rows, masks

    config = parse(RLConfig, ["--num_samples=4", "--max_new_tokens=8"])
    engine = Scripted(type("M", (), {"get_device": lambda self: torch.device("cpu")})(), tokenizer)
    (rows, masks, rewards), (_, _, rewards5) = rl.rollouts(engine, Problems(), [4, 5], config, seed=0)
    assert engine.calls == [2]  # one batch for the two prompts
    assert rewards5 == [0.0, 1.0, 0.0, 0.0]  # problem 5's answer is 6: its rows were scored against it
    assert rl.advantages(rewards) == [0.5, -0.5, 0.5, -0.5]
    assert rl.advantages([1.0, 1.0, 1.0]) == [0.0, 0.0, 0.0]  # nothing to learn when all agree
    batches = rl.policy_batches(rows, masks, rl.advantages(rewards), 0, torch.device("cpu"), 3)
    assert [b[0].shape[0] for b in batches] == [3, 1]
    prompt_len = masks[0].index(1)
    y = torch.cat([b[1] for b in batches])
    for r, row in enumerate(rows):  # targets: every sampled token (the ending one included), nothing else
        assert torch.all(y[r, :prompt_len - 1] == -1)
        assert y[r, prompt_len - 1:len(row) - 1].tolist() == row[prompt_len:]
        assert torch.all(y[r, len(row) - 1:] == -1)
    x, y, a = batches[0]
    model = tiny_model("gpt", tokenizer.get_vocab_size(), max_seq_len=64)
    nll = model(x, y, loss_reduction="none")
    torch.testing.assert_close(rl.pg_loss(model, x, y, a), (nll * a[:, None]).sum())


# -----------------------------------------------------------------------------
# The stages end to end


@pytest.mark.parametrize("model_type", list(MODEL_TYPES))
def test_model_type_survives_base_mid_sft_rl(base_env, model_type):
    tag = f"{model_type}_d1"
    base_train.main([f"--model_type={model_type}", *TINY, "--num_iterations=2", "--muon_variant=classic"])
    mid_train.main([f"--model_tag={tag}", "--num_iterations=2", *FAST])
    chat_sft.main([f"--model_tag={tag}", "--num_iterations=2", *FAST, "--save_every=1"])
    chat_rl.main([f"--model_tag={tag}", "--num_iterations=1", "--examples_per_step=1", "--num_samples=2",
                  "--max_new_tokens=4", "--eval_examples=1", "--device_batch_size=2"])
    lineage = []
    for stage in ("base", "mid", "sft", "rl"):
        d = checkpoint_dir(stage, tag)
        meta = read_meta(d, find_last_step(d))
        assert meta["model_type"] == model_type
        assert meta["train_args"]["muon_variant"] == "classic"  # not the default: inherited from base
        assert [(e["source"], e["step"]) for e in meta["lineage"]] == lineage
        lineage.append((stage, meta["step"]))
        model, _, _ = load_model(stage, model_tag=tag)
        assert model.model_type == model_type
    assert [r["step"] for r in map(json.loads, open(os.path.join(checkpoint_dir("sft", tag), "metrics.jsonl")))
            if "val_loss" in r] == [0, 2]
    other = next(t for t in MODEL_TYPES if t != model_type)
    with pytest.raises(CheckpointError, match=f"holds a '{model_type}' model, but --model_type={other}"):
        load_model("sft", model_tag=tag, model_type=other)
    with pytest.raises(CheckpointError, match=f"holds a '{model_type}' model, but --model_type={other}"):
        chat_sft.main([f"--model_tag={tag}", f"--model_type={other}", "--num_iterations=1", *FAST])


def test_muon_variant_comes_from_the_source_unless_given():
    for argv, source_args, expected in [
        ([], {"muon_variant": "classic"}, "classic"),
        (["--muon_variant=nanochat"], {"muon_variant": "classic"}, "nanochat"),
        ([], {"matrix_lr": 0.02}, TrainConfig.muon_variant),  # the source does not say: the pretraining default
        ([], {}, TrainConfig.muon_variant),  # no settings at all (an import)
    ]:
        config = inherit(parse(SFTConfig, argv), source_args)
        assert config.muon_variant == expected, (argv, source_args)
    config = inherit(parse(SFTConfig, ["--matrix_lr=0.5"]), {"matrix_lr": 0.02, "device_batch_size": 7})
    assert (config.matrix_lr, config.device_batch_size) == (0.5, 7)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_fine_tuning_does_not_decay_the_matrices(model_type):
    """Pretraining decays Muon's matrices by the variant's rule; mid/SFT/RL do not (as nanochat), unless asked:
    a decay toward 0 on top of a few hundred noisy fine-tuning steps only erodes what pretraining learned."""
    model = tiny_model(model_type, vocab_size=64)

    def muon_decay(cls, argv=()):
        config = inherit(parse(cls, list(argv)), {"muon_variant": "nanochat"})
        return setup_optimizers(model, config)[1].param_groups[0]["weight_decay"]

    assert parse(BaseTrainConfig, []).muon_variant == "nanochat" and muon_decay(BaseTrainConfig) > 0
    for cls in (MidConfig, SFTConfig, RLConfig):
        assert muon_decay(cls) == 0.0
        assert muon_decay(cls, ["--matrix_weight_decay=0.3"]) == 0.3
    assert muon_decay(BaseTrainConfig, ["--matrix_weight_decay=0"]) == 0.0


def test_wrong_model_type_is_one_line_from_the_command_line(base_env):
    base_train.main(["--model_type=alcoholic", *TINY, "--num_iterations=1"])
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(base_env), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "scripts.chat_sft", "-i", "base", "--model_tag=alcoholic_d1",
                           "--model_type=gpt", "--num_iterations=1"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("error: checkpoint ") and "holds a 'alcoholic' model, but --model_type=gpt" in lines[-1]
    assert "Traceback" not in proc.stderr


# what a few steps of each fine-tuning stage take, from a base checkpoint (RL: 2 prompts x 2 answers of <= 8 tokens)
STAGE_RUNS = {
    "sft": ("scripts.chat_sft", ["--eval_steps=1"]),
    "rl": ("scripts.chat_rl", ["--examples_per_step=2", "--num_samples=2", "--max_new_tokens=8", "--eval_examples=2",
                               "--eval_every=-1", "--device_batch_size=2"]),
}


@pytest.mark.parametrize("stage", list(STAGE_RUNS))
def test_sigkill_then_resume_is_bitwise_identical(base_env, stage):
    """Both runs are processes of the same binary with OMP_NUM_THREADS=1: the same float operations in the same
    order, so bitwise equality holds on any machine. RL included: its problems and sampling seeds are a function of
    the step, so the resumed run samples what the interrupted one would have."""
    for tag in ("ref", "victim"):  # the same seed: two identical base models under two tags
        base_train.main(["--model_type=gpt", *TINY, "--num_iterations=1", f"--model_tag={tag}"])
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(base_env), OMP_NUM_THREADS="1")
    module, extra_flags = STAGE_RUNS[stage]
    steps = 24 if stage == "sft" else 12

    def run(tag, *extra):
        return subprocess.Popen([sys.executable, "-m", module, "-i", "base", f"--model_tag={tag}",
                                 f"--num_iterations={steps}", "--save_every=4", *extra_flags, *extra],
                                cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def records(tag):
        with open(os.path.join(checkpoint_dir(stage, tag), "metrics.jsonl")) as f:
            return {r["step"]: (r.get("loss"), r.get("reward")) for r in map(json.loads, f) if "lrm" in r}

    ref = run("ref")  # runs beside the victim, on the other core
    victim = run("victim")
    d = checkpoint_dir(stage, "victim")
    # kill once a checkpoint exists and training went on past it
    sigkill_when(victim, lambda: os.path.exists(os.path.join(d, "metrics.jsonl")) and len(records("victim")) >= 6)
    killed_at = find_last_step(d)
    assert 4 <= killed_at < steps
    out, _ = ref.communicate(timeout=300)
    assert ref.returncode == 0, out

    resumed = run("victim", "--resume")
    out, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, out
    assert f"Resuming {d} from step {killed_at}" in out
    assert records("victim") == records("ref")  # bitwise: floats compared exactly
    assert sorted(records("ref")) == list(range(steps))
    a, _, _ = load_model(stage, model_tag="ref")
    b, _, _ = load_model(stage, model_tag="victim")
    for (k, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), k


def test_rl_logs_every_n_steps_like_every_stage(base_env, capsys):
    """chat_rl runs in the shared loop: --log_every reads the loss back every N steps only."""
    base_train.main(["--model_type=gpt", *TINY, "--num_iterations=1"])
    chat_rl.main(["-i", "base", "--model_tag=gpt_d1", "--num_iterations=5", "--log_every=2", *STAGE_RUNS["rl"][1]])
    with open(os.path.join(checkpoint_dir("rl", "gpt_d1"), "metrics.jsonl")) as f:
        logged = [r["step"] for r in map(json.loads, f) if "lrm" in r]
    assert logged == [0, 1, 3, 4]  # the first step alone (warm-up), then every 2nd, and the last
    out = capsys.readouterr().out
    assert "reward" in out and "tok/s" in out and "eta" in out


@pytest.mark.slow
def test_rl_compiles_like_every_stage(base_env, capsys):
    base_train.main(["--model_type=gpt", *TINY, "--num_iterations=1"])
    result = chat_rl.main(["-i", "base", "--model_tag=gpt_d1", "--num_iterations=2", "--compile",
                           *STAGE_RUNS["rl"][1]])
    assert result["step"] == 2
