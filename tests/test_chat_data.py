"""Chat data: generated arithmetic with the calculator, multiple-choice practice, and the mid/SFT/RL mixtures."""

import os
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import tasks.mixtures as mixtures
from nanochat import chat_eval
from nanochat.engine import Engine, RowState
from nanochat.tokenizer import RustBPETokenizer
from nanochat.tools import use_calculator
from tasks.arithmetic import SPLITS, ArithmeticTool, split_of
from tasks.common import offline_file, read_jsonl
from tasks.mcpractice import MCPractice, question_texts
from tasks.smoltalk import SmolTalk

# -----------------------------------------------------------------------------
# Arithmetic word problems


def canonical(expr):
    """The problem behind an expression: a+b and b+a (a*b and b*a) are the same problem."""
    terms = re.findall(r"\d+|[^\d]+", expr)
    if len(terms) >= 3 and terms[1] in "+*":
        terms[0], terms[2] = sorted([terms[0], terms[2]])
    if len(terms) == 5 and terms[3] == "*":
        terms[2], terms[4] = sorted([terms[2], terms[4]])
    return "".join(terms)


def test_arithmetic_is_deterministic_and_uses_the_calculator():
    a, b = ArithmeticTool(size=300), ArithmeticTool(size=300)
    assert [a[i] for i in range(300)] == [b[i] for i in range(300)]
    forms = set()
    for i in range(300):
        ex = a[i]
        parts = ex["messages"][1]["content"]
        assert [p["type"] for p in parts] == ["text", "python", "python_output", "text"]
        expr, output = parts[1]["text"], parts[2]["text"]
        assert output == str(use_calculator(expr)) and "." not in output  # exact: "12", never "12.0"
        assert int(output) >= 0 and parts[3]["text"].endswith(f"#### {output}")
        forms.add(re.sub(r"\d+", "n", expr))
        assert a.evaluate(ex, f"Sure.<|python_start|>{expr}<|python_end|>\n#### {output}") == 1
        assert a.evaluate(ex, f"#### {int(output) + 1}") == 0 and a.evaluate(ex, output) == 0  # needs "####"
        assert a.reward(ex, f"#### {output}") == 1.0 and a.reward(ex, "no idea") == 0.0
    assert forms == {"n+n", "n-n", "n*n", "n//n", "n+n-n", "n*n+n", "n-n*n"}
    questions = [a[i]["messages"][0]["content"] for i in range(300)]
    assert sum(q.startswith(("What is", "Compute")) for q in questions) < 150  # mostly word problems
    with pytest.raises(ValueError, match="train\\|val\\|test"):
        ArithmeticTool(split="validation")


def test_arithmetic_splits_never_share_a_problem():
    examples = {split: [ArithmeticTool(size=n, split=split)[i] for i in range(n)]
                for split, n in (("train", 3000), ("val", 500), ("test", 500))}
    questions = {s: {ex["messages"][0]["content"] for ex in exs} for s, exs in examples.items()}
    problems = {s: {canonical(ex["messages"][1]["content"][1]["text"]) for ex in exs} for s, exs in examples.items()}
    for s1, s2 in (("train", "val"), ("train", "test"), ("val", "test")):
        assert not questions[s1] & questions[s2] and not problems[s1] & problems[s2]
    assert len(questions["test"]) > 490  # 500 distinct problems, not a few repeated
    assert split_of(("add", 85, 347)) in SPLITS and split_of(("add", 85, 347)) == split_of(("add", 85, 347))


def test_arithmetic_fits_a_small_context_and_matches_what_the_engine_forces():
    text = "".join(f"{ArithmeticTool(size=400)[i]['messages']}" for i in range(400))
    tokenizer = RustBPETokenizer.train_from_iterator([text[i:i + 1000] for i in range(0, len(text), 1000)], 512)
    engine = Engine(model=None, tokenizer=tokenizer)
    output_start = tokenizer.encode_special("<|output_start|>")
    for split in SPLITS:
        task = ArithmeticTool(size=200, split=split)
        for i in range(200):
            ids, mask = tokenizer.render_conversation(task[i], max_tokens=None)
            assert len(ids) < 256
            state, forced = RowState([]), 0
            for j, token in enumerate(ids):  # replay the answer through the Engine's tool-use state machine
                engine._advance_row(state, token)
                if state.forced:
                    assert ids[j + 1:j + 1 + len(state.forced)] == list(state.forced) and ids[j + 1] == output_start
                    assert not any(mask[j + 1:j + 1 + len(state.forced)])  # the tool's output is not trained on
                    forced += 1
                    state.forced.clear()
            assert forced == 1


def test_chat_eval_scores_the_arithmetic_test_split():
    make, chance = chat_eval.TASKS["Arithmetic"]
    task = make()
    assert chance == 0.0 and task.split == "test" and len(task) == 500 and task.eval_type == "generative"


# -----------------------------------------------------------------------------
# Multiple-choice practice


def test_mc_practice_never_uses_scored_test_questions(offline_only):
    train, val = MCPractice("train"), MCPractice("val")
    assert all(source.split in ("validation", "dev") for source in train.sources)
    scored = set()
    for name in ("ai2_arc_ARC-Easy_test", "ai2_arc_ARC-Challenge_test", "mmlu_all_test"):
        scored |= {row["question"] for row in read_jsonl(offline_file(f"{name}.jsonl.gz"))}
    practice = {}
    for split, task in (("train", train), ("val", val)):
        practice[split] = [question_texts(task.sources[s])[i] for s, i in task.index]
        assert not set(practice[split]) & scored
        assert all(task[i]["messages"][0]["content"].startswith("Multiple Choice question:") for i in range(0, 50))
    assert not set(practice["train"]) & set(practice["val"])
    total = sum(len(source) for source in train.sources)
    assert len(train) + len(val) + train.dropped == total and 0 < train.dropped < 20 and 50 < len(val) < 300
    arc = MCPractice("train", datasets=("ARC",))
    assert [s.subset for s in arc.sources] == ["ARC-Easy", "ARC-Challenge"] and len(arc) < len(train)


def test_mc_practice_prefers_hub_training_splits_and_drops_test_questions(hub):
    task = MCPractice("train")
    assert [(type(s).__name__, s.split) for s in task.sources] == [("ARC", "train"), ("ARC", "train"),
                                                                      ("MMLU", "train")]
    val = MCPractice("val")
    questions = {question_texts(t.sources[s])[i] for t in (task, val) for s, i in t.index}
    assert task.dropped == 2 and "Which one is a planet?" not in questions  # planted in train and test of both ARCs
    assert len(questions) == 9 + 6 + 40 - 2 and {f"Aux question {i}?" for i in range(40)} <= questions


# -----------------------------------------------------------------------------
# Mixtures: embedded (nothing downloaded) and hub regimes


def write_parquet(path, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)


def arc_row(i, question):
    return {"id": f"q{i}", "question": question,
            "choices": {"text": ["a", "b", "c", "d"], "label": ["A", "B", "C", "D"]}, "answerKey": "B"}


@pytest.fixture
def offline_only(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_HF_DIR", str(tmp_path / "empty"))
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "base"))


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A tiny hub layout holding every dataset the nanochat mixtures train on."""
    root = tmp_path / "hf"
    monkeypatch.setenv("NANOCHAT_HF_DIR", str(root))
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "base"))
    chat = [{"messages": [{"role": "user", "content": f"hi {i}"}, {"role": "assistant", "content": "hello"}]}
            for i in range(30)]
    write_parquet(root / "HuggingFaceTB/smol-smoltalk/data/train-00000-of-00001.parquet", chat[:20])
    write_parquet(root / "HuggingFaceTB/smol-smoltalk/data/test-00000-of-00001.parquet", chat[20:])
    aux = [{"question": f"Aux question {i}?", "subject": "", "choices": ["w", "x", "y", "z"], "answer": 1}
           for i in range(40)]
    write_parquet(root / "cais/mmlu/auxiliary_train/train-00000-of-00001.parquet", [{"train": row} for row in aux])
    gsm = [{"question": f"What is {i} + 1?", "answer": f"{i}+1=<<{i}+1={i + 1}>>{i + 1}\n#### {i + 1}"}
           for i in range(12)]
    write_parquet(root / "openai/gsm8k/main/train-00000-of-00001.parquet", gsm)
    for subset, n in (("ARC-Easy", 9), ("ARC-Challenge", 6)):
        rows = [arc_row(i, f"{subset} question {i}?") for i in range(n - 1)] + [arc_row(99, "Which one is a planet?")]
        write_parquet(root / f"allenai/ai2_arc/{subset}/train-00000-of-00001.parquet", rows)
        write_parquet(root / f"allenai/ai2_arc/{subset}/test-00000-of-00001.parquet",
                      [arc_row(100, "Which one is a planet?")])
    return root


class Lines:
    """The regime lines ("<stage> data: ...") the mixtures print, read from captured stdout."""

    def __init__(self, capsys):
        self.capsys, self.seen = capsys, []

    def _read(self):
        self.seen += [line for line in self.capsys.readouterr().out.splitlines() if " data: " in line]
        return self.seen

    def __iter__(self):
        return iter(self._read())

    def __len__(self):
        return len(self._read())

    def __getitem__(self, i):
        return self._read()[i]


@pytest.fixture
def log(capsys):
    capsys.readouterr()
    return Lines(capsys)


def test_embedded_mixtures_when_nothing_is_downloaded(offline_only, log):
    mid, sft, rl = mixtures.mid_mixture("train"), mixtures.sft_mixture("train"), mixtures.rl_task("train")
    assert all("embedded" in line and "not under" in line for line in log) and len(log) == 3
    sizes = dict(mixtures.sizes(mid))
    assert sizes["ArithmeticTool(train)"] == 6000 and sizes["CustomJSON(identity_conversations.jsonl)"] == 24
    assert sizes["SmolTalk(train)"] == 400 and sizes["MCPractice(ARC+MMLU, train)"] > 2000
    assert 10_000 < len(mid) < 15_000 and 3000 < len(sft) < 6000
    assert isinstance(rl, ArithmeticTool) and rl.split == "train" and rl.eval_type == "generative"
    assert mixtures.describe(mid).startswith(f"{len(mid):,} conversations: ArithmeticTool(train) 6,000")
    # mid and SFT see different arithmetic problems, neither sees the held-out ones
    mid_arith = next(t for t in mid.tasks if isinstance(t, ArithmeticTool))
    sft_arith = next(t for t in sft.tasks if isinstance(t, ArithmeticTool))
    assert mid_arith[0] != sft_arith[0] and sft_arith.start == len(mid_arith) == mid_arith.size
    val = mixtures.mid_mixture("val")
    assert {t.split for t in val.tasks} == {"test", "val"} and mixtures.sft_mixture("val").num_examples() == len(val)
    assert mixtures.rl_task("val").split == "val"
    # deterministic per seed
    again = mixtures.mid_mixture("train")
    assert [mid[i] for i in range(0, len(mid), 97)] == [again[i] for i in range(0, len(again), 97)]
    reseeded = mixtures.mid_mixture("train", seed=1)
    assert [mid[i] for i in range(5)] != [reseeded[i] for i in range(5)]
    with pytest.raises(FileNotFoundError, match="SmolTalk train.*huggingface-cli"):
        mixtures.mid_mixture("train", source="hub")
    with pytest.raises(ValueError, match="train\\|val"):
        mixtures.sft_mixture("test")
    with pytest.raises(ValueError, match="auto\\|hub\\|embedded"):
        mixtures.rl_task("train", source="disk")


def test_hub_mixtures_when_the_datasets_are_on_disk(hub, log):
    mid = mixtures.mid_mixture("train")
    assert log[-1].startswith("mid data: hub mixture")
    assert dict(mixtures.sizes(mid)) == {
        "SmolTalk(train)": 20, "MMLU(auxiliary_train, train)": 40, "GSM8K(main, train)": 12,
        "CustomJSON(identity_conversations.jsonl)": 24, "SimpleSpelling(train)": 200_000,
        "SpellingBee(train)": 80_000}
    sft = mixtures.sft_mixture("train")
    assert dict(mixtures.sizes(sft)) == {
        "ARC(ARC-Easy, train)": 9, "ARC(ARC-Challenge, train)": 6, "GSM8K(main, train)": 12, "SmolTalk(train)": 20,
        "CustomJSON(identity_conversations.jsonl)": 12, "SimpleSpelling(train)": 300, "SpellingBee(train)": 300}
    sft_val = mixtures.sft_mixture("val")
    assert isinstance(sft_val, SmolTalk) and sft_val.split == "test" and len(sft_val) == 10
    assert [type(t).__name__ for t in mixtures.mid_mixture("val").tasks] == ["SmolTalk", "MMLU", "GSM8K"]
    rl = mixtures.rl_task("train")
    assert rl.split == "train" and len(rl) == 12 and rl.reward(rl[0], rl[0]["messages"][1]["content"][-1]["text"])
    embedded = mixtures.mid_mixture("train", source="embedded")
    assert "forced" in log[-1] and "ArithmeticTool(train)" in dict(mixtures.sizes(embedded))


def test_auto_falls_back_per_stage_when_only_some_datasets_are_there(hub, log):
    os.remove(hub / "allenai/ai2_arc/ARC-Challenge/train-00000-of-00001.parquet")
    assert mixtures.choose_source("mid") == "hub" and mixtures.choose_source("rl") == "hub"
    assert mixtures.choose_source("sft") == "embedded" and "ARC-Challenge train not under" in log[-1]
