"""Engine: KV-cache decoding parity with model.generate, sampling, stopping, tool use, and the calculator."""

import time

import pytest
import torch

from nanochat import tools as tools_module
from nanochat.engine import Engine, KVCache, sample_next_token
from nanochat.models import MODEL_TYPES
from nanochat.tokenizer import RustBPETokenizer
from nanochat.tools import use_calculator
from tests.conftest import tiny_model

TEXTS = ["The quick brown fox jumps over the lazy dog. 2+3*4 = 14, and 1,000 * 3 = 3000.",
         "strawberry has three r letters; hello world, how are you today? I am fine, thank you."] * 20


@pytest.fixture(scope="module")
def tokenizer():
    return RustBPETokenizer.train_from_iterator(TEXTS, 300)


@pytest.fixture(scope="module", params=list(MODEL_TYPES))
def model(request, tokenizer):
    return tiny_model(request.param, tokenizer.get_vocab_size(), depth=2, max_seq_len=64)


# -----------------------------------------------------------------------------
# Calculator


@pytest.mark.parametrize("expr, expected", [
    ("2+3*4", 14),
    ('"strawberry".count("r")', 3),
    ("'banana'.count('an')", 2),
    ("(1 + 2) * -3", -9),
    ("7 // 2 + 7 % 2", 4),
    ("10 / 4", 2.5),
    ("2 ** 10", 1024),
    ("1,000 * 3", 3000),  # thousands separators
    (" 12 ", 12),
    ("(" * 100 + "1" + ")" * 100, 1),
])
def test_calculator_values(expr, expected):
    assert use_calculator(expr) == expected


@pytest.mark.parametrize("expr", [
    "__import__('os')",
    "open('x')",
    "(1).real",  # attribute access
    "'abc'.upper()",  # the only method is count
    "'abc'.count('a', 1)",  # count with extra arguments
    "'a'.count(x)",
    "x + 1",  # names
    "[1, 2][0]",  # subscripts and lists
    "lambda: 1",
    "'ab' * 3",  # strings only as count's receiver
    "2 ** 100000",  # huge exponent
    "9 ** 9 ** 9",
    "(10 ** 500) ** 3",  # a result too large to print
    "1 / 0",
    "(-8) ** 0.5",  # complex
    "1 +",  # syntax error
    "1+" * 600 + "1",  # longer than the limit
    "",
])
def test_calculator_refuses(expr):
    assert use_calculator(expr) is None


def test_calculator_time_limit(monkeypatch):
    assert use_calculator("1 + 2 + 3", max_time=1.0) == 6
    clock = iter(range(0, 10_000, 2))  # every reading of the clock is 2 s after the previous one
    monkeypatch.setattr(tools_module.time, "monotonic", lambda: next(clock))
    assert use_calculator("1 + 2 + 3", max_time=1.0) is None
    monkeypatch.setattr(tools_module.time, "monotonic", time.perf_counter)
    assert use_calculator("1 + 2 + 3", max_time=1.0) == 6


# -----------------------------------------------------------------------------
# Sampling


def test_sample_greedy_top_k_top_p():
    logits = torch.tensor([[0.1, 2.0, -1.0, 1.9], [3.0, 0.0, 0.5, -2.0]])
    rng = torch.Generator().manual_seed(0)
    assert sample_next_token(logits, rng, temperature=0.0).tolist() == [[1], [0]]
    for _ in range(20):
        assert sample_next_token(logits, rng, temperature=1.5, top_k=1).tolist() == [[1], [0]]
        assert sample_next_token(logits, rng, temperature=1.5, top_p=1e-6).tolist() == [[1], [0]]
        assert sample_next_token(logits, rng, temperature=1.5, top_p=5e-324).tolist() == [[1], [0]]  # 0 in float32


def test_sample_top_p_keeps_the_nucleus():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log().expand(4000, -1)
    rng = torch.Generator().manual_seed(0)
    counts = torch.bincount(sample_next_token(logits, rng, 1.0, top_p=0.7)[:, 0], minlength=4)
    assert counts[2] == counts[3] == 0  # 0.5 + 0.3 >= 0.7: the tail is cut
    assert abs(counts[0] / 4000 - 0.5 / 0.8) < 0.03  # the kept tokens are renormalised
    counts = torch.bincount(sample_next_token(logits, rng, 1.0, top_k=3)[:, 0], minlength=4)
    assert counts[3] == 0 and counts[2] > 0


# -----------------------------------------------------------------------------
# Engine on real models


def test_greedy_matches_model_generate(model, tokenizer):
    engine = Engine(model, tokenizer)
    for text in ["The quick brown fox", "hello world, how are you today? I am"]:
        prompt = tokenizer.encode(text, prepend="<|bos|>")
        reference = list(model.generate(prompt, max_tokens=24, temperature=0.0))
        columns = list(engine.generate(prompt, num_samples=1, max_tokens=24, temperature=0.0))
        assert [column[0] for column, _ in columns] == reference
        assert all(m == [1] for _, m in columns)


def test_model_uses_context(model, tokenizer):
    # guards the parity test above: with context ignored, a KV-cache bug could not change the output
    engine = Engine(model, tokenizer)
    a = tokenizer.encode("The quick brown fox", prepend="<|bos|>")
    b = tokenizer.encode("hello world fox", prepend="<|bos|>")
    assert a[-1] == b[-1]
    out_a = [column[0] for column, _ in engine.generate(a, max_tokens=8, temperature=0.0)]
    out_b = [column[0] for column, _ in engine.generate(b, max_tokens=8, temperature=0.0)]
    assert out_a != out_b


def test_batched_sampling_reproducible(model, tokenizer):
    engine = Engine(model, tokenizer)
    prompt = tokenizer.encode("hello world", prepend="<|bos|>")
    kwargs = dict(num_samples=4, max_tokens=12, temperature=1.0, seed=123)
    first = list(engine.generate(prompt, **kwargs))
    second = list(engine.generate(prompt, **kwargs))
    assert first == second
    rows = [[column[i] for column, _ in first] for i in range(4)]
    assert len({tuple(r) for r in rows}) == 4  # each row samples its own tokens, the first one included
    other = list(engine.generate(prompt, **dict(kwargs, seed=124)))
    assert other != first


def test_several_prompts_decode_together_as_they_do_alone(model, tokenizer):
    """generate_batch_many: prompts of one length share the prefill and every decode step (generate_batch_group);
    each row answers as its prompt alone does, and the tool state machine runs per row."""
    engine = Engine(model, tokenizer)
    texts = ["The quick brown fox", "hello world, how are", "strawberry has three"]
    prompts = [tokenizer.encode(t, prepend="<|bos|>") for t in texts]
    n = min(len(p) for p in prompts)
    prompts = [p[:n] for p in prompts]
    assert len({tuple(p) for p in prompts}) == 3
    together, masks = engine.generate_batch_group(prompts, num_samples=2, max_tokens=16, temperature=0.0)
    assert len(together) == 6 and all(len(m) == len(r) for r, m in zip(together, masks))
    for i, prompt in enumerate(prompts):
        alone, _ = engine.generate_batch(prompt, num_samples=2, max_tokens=16, temperature=0.0)
        # greedy: equal unless two logits tie within the last bits that batching may change (random weights: no)
        assert together[2 * i:2 * i + 2] == alone
    with pytest.raises(ValueError, match=r"the same length, got lengths \[4, 5\]"):
        engine.generate_batch_group([prompts[0][:4], prompts[1][:5]])
    # any lengths: grouped by length, each prompt's rows as decoded in its group
    mixed = [prompts[0], prompts[1][:-1], prompts[2]]
    many = {i: rows for i, rows, _ in engine.generate_batch_many(mixed, num_samples=2, max_tokens=16,
                                                                 temperature=0.0)}
    assert many == {0: together[0:2], 1: engine.generate_batch(mixed[1], 2, max_tokens=16, temperature=0.0)[0],
                    2: together[4:6]}


def test_top_k_1_is_greedy(model, tokenizer):
    engine = Engine(model, tokenizer)
    prompt = tokenizer.encode("The quick", prepend="<|bos|>")
    # same batch shape on both sides: the logits are then bitwise equal (rows of different batch sizes are not)
    greedy, _ = engine.generate_batch(prompt, num_samples=3, max_tokens=16, temperature=0.0)
    top1, _ = engine.generate_batch(prompt, num_samples=3, max_tokens=16, temperature=1.0, top_k=1, seed=7)
    assert top1 == greedy


def test_stops_when_context_is_full(tokenizer):
    model = tiny_model("gpt", tokenizer.get_vocab_size(), depth=2, max_seq_len=16)
    engine = Engine(model, tokenizer)
    prompt = tokenizer.encode("The quick brown fox", prepend="<|bos|>")
    # a scripted end would stop earlier; random weights rarely pick the 2 ending tokens in 13 greedy steps
    columns = list(engine.generate(prompt, max_tokens=None, temperature=0.0))
    ends = {tokenizer.encode_special("<|assistant_end|>"), tokenizer.get_bos_token_id()}
    assert not ends & {column[0] for column, _ in columns}
    assert len(columns) == 16 - len(prompt) + 1  # the last sampled token needs no slot in the cache
    with pytest.raises(ValueError, match="context is 16"):
        next(engine.generate(list(range(17)), max_tokens=1))


# -----------------------------------------------------------------------------
# Engine on a scripted model: stopping and the tool-use state machine


class ScriptedModel:
    """Implements just the model interface the engine uses; step i of the decode puts all the probability on
    script[i] (for every row). Records what it was fed."""

    def __init__(self, script, vocab_size, sequence_len=64):
        self.script, self.vocab_size = list(script), vocab_size
        self.config = type("Config", (), {"sequence_len": sequence_len})()
        self.fed = []

    def get_device(self):
        return torch.device("cpu")

    def make_kv_cache(self, batch_size, seq_len, device=None, dtype=None):
        return KVCache(batch_size, 1, seq_len, 2, 1, device=torch.device("cpu"), dtype=torch.float32)

    def __call__(self, ids, kv_cache=None):
        B, T = ids.shape
        self.fed.append(ids[:, -1].tolist())
        kv = torch.zeros(B, 1, T, 2)
        kv_cache.insert_kv(0, kv, kv)  # advances pos and enforces the cache size like a real model
        step = len(self.fed) - 1
        logits = torch.zeros(B, T, self.vocab_size)
        logits[:, -1, self.script[min(step, len(self.script) - 1)]] = 10.0
        return logits

    def decode(self, ids, kv_cache):
        return self(ids, kv_cache)[:, -1]


def test_tool_use_forces_calculator_output(tokenizer):
    special = tokenizer.encode_special
    expr = tokenizer.encode("2+3*4")
    forced = [special("<|output_start|>")] + tokenizer.encode("14") + [special("<|output_end|>")]
    filler = tokenizer.encode("x")[0]  # what the model "wants" while the tool output is forced
    script = ([special("<|python_start|>")] + expr + [special("<|python_end|>")] + [filler] * len(forced)
              + [special("<|assistant_end|>")])
    model = ScriptedModel(script, tokenizer.get_vocab_size())
    engine = Engine(model, tokenizer)
    prompt = tokenizer.encode("what is 2+3*4?", prepend="<|bos|>")
    columns = list(engine.generate(prompt, num_samples=2, max_tokens=50, temperature=0.0))
    expected = [special("<|python_start|>")] + expr + [special("<|python_end|>")] + forced + \
        [special("<|assistant_end|>")]
    for row in range(2):
        assert [c[row] for c, _ in columns] == expected
        assert [m[row] for _, m in columns] == [1] * (len(expr) + 2) + [0] * len(forced) + [1]
    # the forced tokens were fed back to the model (so it conditions on the tool's answer)
    assert [f[0] for f in model.fed[len(expr) + 3:len(expr) + 3 + len(forced)]] == forced
    engine = Engine(ScriptedModel(script, tokenizer.get_vocab_size()), tokenizer)
    results, masks = engine.generate_batch(prompt, num_samples=1, max_tokens=50, temperature=0.0)
    assert results[0] == prompt + expected[:-1]  # the terminal <|assistant_end|> is not in the results
    assert masks[0] == [0] * len(prompt) + [1] * (len(expr) + 2) + [0] * len(forced)


def test_refused_tool_call_forces_nothing(tokenizer):
    special = tokenizer.encode_special
    expr = tokenizer.encode("open('x')")
    script = [special("<|python_start|>")] + expr + [special("<|python_end|>"), special("<|assistant_end|>")]
    engine = Engine(ScriptedModel(script, tokenizer.get_vocab_size()), tokenizer)
    columns = list(engine.generate([tokenizer.get_bos_token_id()], max_tokens=50, temperature=0.0))
    assert [c[0] for c, _ in columns] == script
    assert all(m == [1] for _, m in columns)


@pytest.mark.parametrize("end", ["<|assistant_end|>", "<|bos|>"])
def test_stops_on_end_token(tokenizer, end):
    a, b = 70, 71  # any two ordinary tokens
    end_id = tokenizer.encode_special(end)
    model = ScriptedModel([a, b, end_id, a, a, a], tokenizer.get_vocab_size())
    engine = Engine(model, tokenizer)
    columns = list(engine.generate([tokenizer.get_bos_token_id()], max_tokens=50, temperature=0.0))
    assert [c[0] for c, _ in columns] == [a, b, end_id]
    assert len(model.fed) == 3  # prefill + 2 decode steps: nothing is run after the end
    engine = Engine(ScriptedModel([a, b, end_id, a, a, a], tokenizer.get_vocab_size()), tokenizer)
    results, _ = engine.generate_batch([tokenizer.get_bos_token_id()], max_tokens=50, temperature=0.0)
    assert results == [[tokenizer.get_bos_token_id(), a, b]]


def test_max_tokens(tokenizer):
    model = ScriptedModel([5] * 100, tokenizer.get_vocab_size())
    columns = list(Engine(model, tokenizer).generate([1, 2, 3], num_samples=3, max_tokens=7, temperature=0.0))
    assert len(columns) == 7 and all(c == [5, 5, 5] for c, _ in columns)


def test_rejects_bad_prompts(model, tokenizer):
    engine = Engine(model, tokenizer)
    for bad in ([], "hello", [1.5]):
        with pytest.raises(ValueError, match="non-empty list of ints"):
            next(engine.generate(bad))
        with pytest.raises(ValueError, match="non-empty list of ints"):
            next(engine.generate_many([[1, 2], bad]))
