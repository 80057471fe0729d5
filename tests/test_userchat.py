"""Fine-tuning on your own conversations (--data for mid_train and chat_sft): the layouts, the system message, tool
calls, bad lines as one-line errors, weights and --mix, the held-out split, truncation, and the whole path from your
own text and conversations to a chat model."""

import json
import os
import re
import subprocess
import sys

import httpx
import pytest

from nanochat.checkpoint import checkpoint_dir, load_rank_state, read_meta
from nanochat.cli import parse, run_cli
from nanochat.config import SFTConfig
from nanochat.engine import Engine, RowState
from nanochat.finetune import STAGES, chat_tasks
from nanochat.serve.app import create_app
from nanochat.serve.pool import load_workers
from nanochat.tokenizer import get_tokenizer
from nanochat.userfiles import BadInput, held_out_score
from scripts import base_train, chat_cli, chat_eval, chat_sft, mid_train, tok_train
from tasks import mixtures
from tasks.userchat import UserConversations, conversation_messages, parse_spec, prepare_conversations
from tests.serve.conftest import serve
from tests.test_userdata import write

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--depth=1", "--head_dim=32", "--max_seq_len=64", "--device_batch_size=2", "--eval_every=-1",
        "--eval_tokens=128", "--sample_every=-1"]
NAMES = "Alice Bob Carol Dan Eve Frank Grace Heidi Ivan Judy Mallory Oscar".split()
COLORS = "red green blue yellow purple orange".split()


def chat(i, system=False):
    name, color = NAMES[i % len(NAMES)], COLORS[(i * 7) % len(COLORS)]
    messages = [{"role": "user", "content": f"What color does {name} like? ({i})"},
                {"role": "assistant", "content": f"{name} likes {color}."}]
    return ([{"role": "system", "content": "Answer in one sentence."}] if system else []) + messages


def jsonl(conversations, layout="openai"):
    return "".join(json.dumps({"messages": c} if layout == "openai" else c) + "\n" for c in conversations)


def all_conversations(directory, manifest):
    return [t[i]["messages"] for split in ("train", "val")
            for t in [UserConversations(directory, manifest, split, "x")] for i in range(len(t))]


@pytest.fixture
def base_ckpt(base_env):
    """A one-step d1 gpt base checkpoint (gpt_d1) in a private base dir with the embedded shards and tokenizer."""
    base_train.main(["--model_type=gpt", *TINY, "--num_iterations=1"])
    return base_env


# -----------------------------------------------------------------------------
# Layouts


def test_both_layouts_openai_text_parts_and_the_system_message(base_env, tmp_path):
    plain = [chat(i) for i in range(10)]
    openai = [chat(i, system=True) for i in range(10, 20)]
    parts = [{"role": "user", "content": [{"type": "text", "text": "Hello "}, {"type": "text", "text": "there"}]},
             {"role": "assistant", "content": "Hi!", "name": "bot"}]  # extra keys are dropped
    path = write(tmp_path / "mine.jsonl", jsonl(plain, "list") + "\n" + jsonl(openai) + jsonl([parts]), ".gz")
    directory, manifest = prepare_conversations(path)
    got = all_conversations(directory, manifest)
    expected = plain + openai + [[{"role": "user", "content": "Hello there"}, {"role": "assistant", "content": "Hi!"}]]
    assert sorted(map(json.dumps, got)) == sorted(map(json.dumps, expected))
    assert manifest["conversations"] == 21 and manifest["files"][0]["name"] == "mine.jsonl.gz"
    tokenizer = get_tokenizer()
    merged = [{"role": "user", "content": "Answer in one sentence.\n\n" + openai[0][1]["content"]}, openai[0][2]]
    # the system message is folded into the first user turn, as nanochat does (the vocabulary has no system tokens)
    assert tokenizer.render_conversation({"messages": openai[0]}) == tokenizer.render_conversation(
        {"messages": merged})


def test_tool_calls_render_as_the_engine_forces_them(base_env, tmp_path, capsys):
    calls = [[{"role": "user", "content": f"What is {a} + {b}?"},
              {"role": "assistant", "content": [{"type": "text", "text": "Let me add. "},
                                                {"type": "python", "text": f"{a}+{b}"},
                                                {"type": "python_output", "text": str(a + b if a != 7 else 0)},
                                                {"type": "text", "text": f"It is {a + b}."}]}]
             for a, b in ((12, 30), (7, 8), (100, 1))]
    directory, manifest = prepare_conversations(write(tmp_path / "calc.jsonl", jsonl(calls)))
    assert manifest["tool_mismatches"] == 1  # 7+8 -> "0": not what the calculator answers
    assert "note: 1 calculator call(s)" in capsys.readouterr().out
    tokenizer, engine = get_tokenizer(), Engine(model=None, tokenizer=get_tokenizer())
    for conversation in all_conversations(directory, manifest):
        if conversation[0]["content"].startswith("What is 7"):
            continue
        ids, mask = tokenizer.render_conversation({"messages": conversation})
        state, forced = RowState([]), 0
        for j, token in enumerate(ids):  # replayed through the Engine: the output it forces is the one trained on
            engine._advance_row(state, token)
            if state.forced:
                assert ids[j + 1:j + 1 + len(state.forced)] == list(state.forced)
                assert not any(mask[j + 1:j + 1 + len(state.forced)])  # the tool's answer is not learned
                forced += 1
                state.forced.clear()
        assert forced == 1


@pytest.mark.parametrize("line, message", [
    ('{"messages": [{"role": "user", "content": "hi"}', r"not valid JSON \(Expecting ',' delimiter"),
    ('{"conversation": []}', r"expected \{\"messages\": \[\.\.\.\]\} or a list of messages, got a JSON dict without"),
    ('[{"role": "assistant", "content": "hi"}]', r"message 0: role 'assistant' where 'user' belongs"),
    ('[{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]', r"message 1: role 'user' where "
                                                                               r"'assistant' belongs"),
    ('[{"role": "user", "content": "a"}, {"role": "system", "content": "b"}]', r"message 1: a system message can "
                                                                                r"only come first"),
    ('[{"role": "user", "content": "a"}, {"role": "assistant", "content": "  "}]', r"message 1 \(assistant\): "
                                                                                     r"empty content"),
    ('[{"role": "user", "content": ""}, {"role": "assistant", "content": "b"}]', r"message 0 \(user\): empty"),
    ('[{"role": "user", "content": "a"}, {"role": "tool", "content": "b"}]', r"role 'tool' is not one of system, "
                                                                              r"user, assistant \(a tool call goes"),
    ('[{"role": "user", "content": "a"}]', r"no assistant message at the end"),
    ('[{"role": "user", "content": "a"}, {"role": "assistant", "content": [{"type": "python_output", "text": "1"}]}]',
     r"message 1 part 0: a python_output must come right after its python call"),
    ('[{"role": "user", "content": "a"}, {"role": "assistant", "content": [{"type": "image", "text": "x"}]}]',
     r"message 1 part 0: expected \{\"type\": one of text\|python\|python_output"),
    ('[{"role": "user", "content": 3}, {"role": "assistant", "content": "b"}]', r"message 0: content must be a "
                                                                                 r"string"),
])
def test_each_bad_conversation_names_what_is_wrong(line, message):
    try:
        conversation_messages(json.loads(line))
    except json.JSONDecodeError as e:
        assert re.search(message, f"not valid JSON ({e.msg}")
        return
    except ValueError as e:
        assert re.search(message, str(e)), str(e)
        return
    pytest.fail("accepted")


def test_bad_conversations_from_chat_sft_are_one_line_with_file_and_line(base_ckpt, tmp_path, capsys):
    good = jsonl([chat(i) for i in range(4)])
    cases = {
        "malformed.jsonl": (good + '{"messages": [\n', r"malformed.jsonl:5: not valid JSON"),
        "order.jsonl": (good + '[{"role": "assistant", "content": "x"}, {"role": "user", "content": "y"}]\n',
                        r"order.jsonl:5: message 0: role 'assistant' where 'user' belongs"),
        "empty.jsonl": ('\n' + good + '[{"role": "user", "content": "x"}, {"role": "assistant", "content": ""}]\n',
                        r"empty.jsonl:6: message 1 \(assistant\): empty content"),
        "latin1.jsonl": (good.encode() + '[{"role": "user", "content": "caf\xe9"}]\n'.encode("latin-1"),
                         r"latin1.jsonl:5: not UTF-8 \(byte 0xe9 at column 34\)"),
        "nothing.jsonl": ("\n\n", r"nothing.jsonl: no usable conversations in this file$"),
        "surrogate.jsonl": (good + '[{"role": "user", "content": "\\udfff"}, {"role": "assistant", "content": "b"}]\n',
                            r"surrogate.jsonl:5: the conversation holds a lone surrogate"),
    }
    for name, (data, message) in cases.items():
        path = write(tmp_path / name, data)
        with pytest.raises(SystemExit) as e:
            run_cli(lambda: chat_sft.main(["-i", "base", "--model_tag=gpt_d1", f"--data={path}", "--num_iterations=1"]))
        err = capsys.readouterr().err
        assert e.value.code == 1 and err.count("\n") == 1 and "Traceback" not in err, err
        assert err.startswith(f"error: {path}") and re.search(message, err), (name, err)
    assert not os.path.exists(checkpoint_dir("sft", "gpt_d1"))  # nothing trained on bad data


def test_skip_bad_lines_skips_and_counts(base_env, tmp_path, capsys):
    root = tmp_path / "convs"
    write(root / "a.jsonl", jsonl([chat(i) for i in range(6)]) + "{bad\n" + '[{"role": "user", "content": "x"}]\n')
    write(root / "b.jsonl", "\n")  # a file of nothing: skipped and counted too
    write(root / "c.jsonl", jsonl([chat(i) for i in range(6, 12)], "list"), ".zst")
    with pytest.raises(BadInput, match=r"a.jsonl:7: not valid JSON"):
        prepare_conversations(str(root))
    _, manifest = prepare_conversations(str(root), skip_bad_lines=True)
    assert manifest["bad_lines"] == 3 and manifest["conversations"] == 12
    assert [(f["name"], f["bad_lines"], f["conversations"]) for f in manifest["files"]] == [
        ("a.jsonl", 2, 6), ("b.jsonl", 1, 0), ("c.jsonl.zst", 0, 6)]
    assert "skipped 3 bad line(s) (--skip_bad_lines), the first:" in capsys.readouterr().out


# -----------------------------------------------------------------------------
# Mixing, weights, the held-out split, truncation


def test_held_out_split_is_by_content_and_never_empty(base_env, tmp_path):
    conversations = [chat(i) for i in range(200)]
    d1, m1 = prepare_conversations(write(tmp_path / "a.jsonl", jsonl(conversations)), val_fraction=0.1)
    d2, m2 = prepare_conversations(write(tmp_path / "b.jsonl", jsonl(conversations[::-1])), val_fraction=0.1)
    val = [{json.dumps(UserConversations(d, m, "val", "x")[i]["messages"], ensure_ascii=False)
            for i in range(m["val_conversations"])} for d, m in ((d1, m1), (d2, m2))]
    assert val[0] == val[1] == {json.dumps(c) for c in conversations if held_out_score(json.dumps(c)) < 0.1}
    assert 5 <= len(val[0]) <= 40
    _, m = prepare_conversations(write(tmp_path / "two.jsonl", jsonl(conversations[:2])))
    assert (m["train_conversations"], m["val_conversations"]) == (1, 1)


def test_weights_and_mix(base_env, tmp_path, capsys):
    a = write(tmp_path / "a.jsonl", jsonl([chat(i) for i in range(40)]))
    b = write(tmp_path / "b:c.jsonl", jsonl([chat(i) for i in range(40, 60)]))  # a ':' in the name itself
    assert parse_spec(f"{a}:3") == (a, 3) and parse_spec(b) == (b, 1) and parse_spec(a) == (a, 1)
    tokenizer = get_tokenizer()
    config = parse(SFTConfig, [f"--data={a}:3", f"--data={b}", "--chat_data=embedded"])
    train, held_out, records = chat_tasks(config, STAGES["sft"], tokenizer, 65)
    sizes = dict(mixtures.sizes(train))
    na, nb = records[0]["train_conversations"], records[1]["train_conversations"]
    assert sizes == {"UserConversations(a.jsonl, train)": 3 * na, "UserConversations(b:c.jsonl, train)": nb}
    assert len(train) == 3 * na + nb and list(held_out) == ["val_loss"]
    assert len(held_out["val_loss"]) == records[0]["val_conversations"] + records[1]["val_conversations"]
    assert [(r["weight"], r["truncated"]) for r in records] == [(3, 0), (1, 0)]
    added, held_out, _ = chat_tasks(parse(SFTConfig, [f"--data={a}", "--mix=add", "--chat_data=embedded"]),
                                    STAGES["sft"], tokenizer, 65)
    sizes = dict(mixtures.sizes(added))
    assert sizes["UserConversations(a.jsonl, train)"] == na and "ArithmeticTool(train)" in sizes
    assert list(held_out) == ["val_loss", "mixture_val_loss"] and len(held_out["mixture_val_loss"]) > 1000
    capsys.readouterr()
    _, _, records = chat_tasks(parse(SFTConfig, [f"--data={a}"]), STAGES["sft"], tokenizer, 12)
    assert records[0]["truncated"] == na  # every conversation is longer than 12 tokens: truncated, and said so
    assert f"{a}: {na} of {na} training conversations are longer than a row of 12 tokens" in capsys.readouterr().out


def test_mid_and_sft_record_the_data_and_resume_only_on_it(base_ckpt, tmp_path):
    path = write(tmp_path / "mine.jsonl", jsonl([chat(i) for i in range(30)]))
    mid_train.main(["--model_tag=gpt_d1", f"--data={path}:2", "--num_iterations=2", "--eval_steps=1",
                    "--save_every=1"])
    meta = read_meta(checkpoint_dir("mid", "gpt_d1"), 2)
    (record,) = meta["own_data"]
    assert (record["path"], record["weight"], record["conversations"]) == (path, 2, 30)
    assert record["files"][0]["name"] == "mine.jsonl" and len(record["files"][0]["sha256"]) == 64
    assert meta["chat_data"].startswith(f"{2 * record['train_conversations']} conversations: UserConversations")
    report = (base_ckpt / "report" / "midtraining.md").read_text()
    assert f"- data: {path} (x2, 30 conversations: {record['train_conversations']} train" in report
    assert f"- data_hash: {record['key'][:16]}" in report
    assert f"- data_files: mine.jsonl (sha256 {record['files'][0]['sha256'][:12]}, 30 conversations)" in report
    with pytest.raises(SystemExit):
        run_cli(lambda: mid_train.main(["--model_tag=gpt_d1", f"--data={path}", "--num_iterations=3", "--resume"]))
    mid_train.main(["--model_tag=gpt_d1", f"--data={path}:2", "--num_iterations=3", "--eval_steps=1", "--resume"])
    assert read_meta(checkpoint_dir("mid", "gpt_d1"), 3)["own_data"][0]["key"] == record["key"]


# -----------------------------------------------------------------------------
# End to end


@pytest.mark.slow
def test_own_text_and_conversations_to_a_chat_model(tmp_path, monkeypatch, capsys):
    """tok_train --data -> base_train --data -> chat_sft --data -> chat_cli, with files written here; SFT lowers
    the loss on the held-out conversations; chat_eval and chat_web serve the result unchanged."""
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "base"))
    facts = [f"{NAMES[i % 12]} likes {COLORS[(i * 7) % 6]}. {NAMES[(i + 3) % 12]} asked about it, and {NAMES[i % 12]} "
             f"said that {COLORS[(i * 7) % 6]} was the best color of all." for i in range(400)]
    write(tmp_path / "texts" / "facts.txt", "\n\n\n".join(facts))
    convs = write(tmp_path / "chats.jsonl", jsonl([chat(i, system=i % 4 == 0) for i in range(240)]))
    tok_train.main([f"--data={tmp_path / 'texts'}", "--vocab_size=512"])
    base_train.main([f"--data={tmp_path / 'texts'}", *TINY, "--num_iterations=30"])
    chat_sft.main(["--model_tag=gpt_d1", f"--data={convs}", "--num_iterations=40", "--init_lr_frac=0.5",
                   "--eval_steps=8"])
    with open(os.path.join(checkpoint_dir("sft", "gpt_d1"), "metrics.jsonl")) as f:
        held_out = [r["val_loss"] for r in map(json.loads, f) if "val_loss" in r]
    assert len(held_out) == 2 and held_out[1] < 0.8 * held_out[0], held_out
    capsys.readouterr()
    chat_cli.main(["--model_tag=gpt_d1", "-t", "0", "-m", "16", "-p", "What color does Alice like?"])
    answer = capsys.readouterr().out.strip().splitlines()[-1]
    assert answer.strip() and "likes" in answer, answer
    # chat_eval and chat_web take the checkpoint as any other
    assert "SpellingBee" in chat_eval.main(["-i", "sft", "--model_tag=gpt_d1", "-a", "SpellingBee", "-x", "2",
                                            "-m", "8"])
    app = create_app(load_workers("sft", ["gpt_d1"], 1, "cpu"), temperature=0.0, max_tokens=16)
    with serve(app) as url:
        r = httpx.post(f"{url}/v1/chat/completions", timeout=60,
                       json={"messages": [{"role": "user", "content": "What color does Bob like?"}]})
    assert r.status_code == 200 and "likes" in r.json()["choices"][0]["message"]["content"], r.text


@pytest.mark.slow
def test_two_ranks_prepare_once_and_train_on_own_data(tmp_path, monkeypatch):
    """torchrun with 2 gloo ranks: rank 0 prepares the text and the conversations, rank 1 waits for it and reads
    the same shards (its own row groups)."""
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "base"))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    texts = write(tmp_path / "texts" / "a.txt", "\n\n\n".join(f"{NAMES[i % 12]} likes {COLORS[i % 6]}, says {i}."
                                                              for i in range(400)))
    convs = write(tmp_path / "chats.jsonl", jsonl([chat(i) for i in range(60)]))

    def torchrun(script, *flags):
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                               "-m", f"scripts.{script}", "--", *flags], cwd=REPO, env=env, capture_output=True,
                              text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return proc.stdout

    out = torchrun("base_train", f"--data={texts}", *TINY, "--num_iterations=2")
    assert out.count("prepared in") == 1 and "training a 4096-token BPE tokenizer" in out
    d = checkpoint_dir("base", "gpt_d1")
    states = [load_rank_state(d, 2, r)["dataloader"] for r in (0, 1)]
    assert states[0]["cur_pos"] != states[1]["cur_pos"]  # each rank its own row groups of the prepared shards
    out = torchrun("chat_sft", "--model_tag=gpt_d1", f"--data={convs}", "--num_iterations=2", "--eval_steps=1",
                   "--device_batch_size=1")
    assert out.count("prepared in") == 1 and read_meta(checkpoint_dir("sft", "gpt_d1"), 2)["world_size"] == 2
