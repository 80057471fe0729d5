import csv
import gzip
import hashlib
import http.server
import io
import json
import math
import os
import threading
import zipfile
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

from nanochat import core_eval
from nanochat.core_eval import (
    CORE_TASKS,
    OFFLINE_BUNDLE_DIR,
    centered_accuracy,
    crop_to_context,
    download_bundle,
    evaluate_core,
    evaluate_example,
    evaluate_task,
    load_bundle,
    load_task_data,
    render_prompts_lm,
    render_prompts_mc,
    render_prompts_schema,
    resolve_bundle,
)
from nanochat.models import MODEL_TYPES
from tests.conftest import free_port, tiny_model

# -----------------------------------------------------------------------------
# A byte tokenizer and a bigram model whose every prediction is known in advance


class ByteTokenizer:
    """One token per UTF-8 byte, BOS = 256: token spans can be read off the strings."""

    def get_bos_token_id(self):
        return 256

    def __call__(self, texts, prepend=None):
        head = [] if prepend is None else [prepend]
        return [head + list(t.encode("utf-8")) for t in texts]


# The model predicts one next byte per byte: its ASCII successor ('a' -> 'b'), except ' ' -> 'a', and ':' / 'q' -> ' '
NEXT = {c: c + 1 for c in range(256)}
NEXT.update({ord(" "): ord("a"), ord(":"): ord(" "), ord("q"): ord(" ")})
VOCAB = 257
HIT = math.log(1 + (VOCAB - 1) * math.exp(-10))  # loss of the predicted byte (logit 10 vs 0 for the rest)


class BigramModel(nn.Module):
    def __init__(self, sequence_len=512):
        super().__init__()
        self.config = SimpleNamespace(sequence_len=sequence_len)
        table = torch.zeros(VOCAB, VOCAB)
        for c, n in NEXT.items():
            table[c, n % VOCAB] = 10.0
        self.register_buffer("table", table)
        self.calls = 0

    def forward(self, idx):
        assert idx.size(1) <= self.config.sequence_len, "the evaluator fed more than sequence_len tokens"
        self.calls += 1
        return self.table[idx]


# Three hand-made tasks. Hand-computed outcomes are noted per item (X = scored span, all-hit spans win).
MC_ITEMS = [
    {"query": "Q1", "choices": ["xyz", "abc"], "gold": 1},         # abc all hits -> 1: right
    {"query": "Q2", "choices": ["abc", "abd"], "gold": 0},         # common prefix " ab": c hit, d miss -> 0: right
    {"query": "Q3", "choices": ["abcd", "zz"], "gold": 1},         # abcd all hits -> 0: wrong
    {"query": "Q4", "choices": ["mno", "abc", "bcd"], "gold": 2},  # abc all hits -> 1: wrong
]
SCHEMA_ITEMS = [
    {"context_options": ["xq", "xr"], "continuation": "abc", "gold": 0},  # q->' ' hits -> 0: right
    {"context_options": ["yr", "yq"], "continuation": "abc", "gold": 0},  # -> 1: wrong
    {"context_options": ["zq", "zs"], "continuation": "bcd", "gold": 0},  # misses 1/4 vs 2/4 -> 0: right
]
LM_ITEMS = [
    {"context": "count:", "continuation": "abc"},     # ':'->' '->'a'->'b'->'c': right
    {"context": "more:", "continuation": "abd"},      # 'b'->'c' != 'd': wrong
    {"context": "again: ", "continuation": "abcde"},  # context stripped, then as the first: right
    {"context": "last", "continuation": "abc"},       # 't'->'u' != ' ': wrong
]
MINI_TASKS = [  # label, type, shots, delimiter, random baseline %, items, expected accuracy
    ("mc_task", "multiple_choice", 1, " ", 25, MC_ITEMS, 2 / 4),
    ("schema_task", "schema", 0, " ", 50, SCHEMA_ITEMS, 2 / 3),
    ("lm_task", "language_modeling", 1, " ", 0, LM_ITEMS, 2 / 4),
]


def write_bundle(root, tasks=MINI_TASKS, gz=False):
    """A DCLM-layout bundle folder: core.yaml, eval_meta_data.csv, eval_data/<label>.jsonl[.gz]."""
    os.makedirs(os.path.join(root, "eval_data"), exist_ok=True)
    lines, rows = ["icl_tasks:"], ["Eval Task,Task Category,Task Type,#shots,#datapoints,Random baseline"]
    for i, (label, task_type, shots, delim, rb, items, _) in enumerate(tasks):
        name = f"{label}.jsonl" + (".gz" if gz and i % 2 == 0 else "")
        data = "".join(json.dumps(x) + "\n" for x in items).encode()
        with open(os.path.join(root, "eval_data", name), "wb") as f:
            f.write(gzip.compress(data) if name.endswith(".gz") else data)
        lines += [f"- label: {label}", f"  dataset_uri: {name}", f"  num_fewshot: [{shots}]",
                  f"  icl_task_type: {task_type}", f"  continuation_delimiter: {json.dumps(delim)}"]
        rows.append(f"{label},test,{task_type},{shots},{len(items)},{rb}")
    with open(os.path.join(root, "core.yaml"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(root, "eval_meta_data.csv"), "w") as f:
        f.write("\n".join(rows) + "\n")
    return str(root)


def meta(task_type, shots=0, delim=" ", label=None):
    return {"task_type": task_type, "num_fewshot": shots, "continuation_delimiter": delim, "label": label}


# -----------------------------------------------------------------------------
# Prompt rendering, byte for byte


def test_render_mc_with_fewshot():
    shots = [{"query": "Question: 2+2?", "choices": ["3", "4"], "gold": 1},
             {"query": "Question: sky?", "choices": ["blue", "red"], "gold": 0}]
    item = {"query": "Question: grass?", "choices": ["green", "pink"], "gold": 0}
    assert render_prompts_mc(item, "\nAnswer: ", shots) == [
        "Question: 2+2?\nAnswer: 4\n\nQuestion: sky?\nAnswer: blue\n\nQuestion: grass?\nAnswer: green",
        "Question: 2+2?\nAnswer: 4\n\nQuestion: sky?\nAnswer: blue\n\nQuestion: grass?\nAnswer: pink",
    ]
    assert render_prompts_mc(item, " ") == ["Question: grass? green", "Question: grass? pink"]


def test_render_schema_with_fewshot():
    shots = [{"context_options": ["Ann thanked Bo because Ann", "Ann thanked Bo because Bo"],
              "continuation": "helped her.", "gold": 1}]
    item = {"context_options": ["The cup hit the jar so the cup", "The cup hit the jar so the jar"],
            "continuation": "broke.", "gold": 1}
    assert render_prompts_schema(item, " ", shots) == [
        "Ann thanked Bo because Bo helped her.\n\nThe cup hit the jar so the cup broke.",
        "Ann thanked Bo because Bo helped her.\n\nThe cup hit the jar so the jar broke.",
    ]


def test_render_lm_strips_contexts_and_prompt_without():
    shots = [{"context": "  The capital of France is ", "continuation": "Paris"},
             {"context": "The capital of Peru is", "continuation": "Lima"}]
    item = {"context": "The capital of Chad is  ", "continuation": "N'Djamena"}
    prefix = "The capital of France is Paris\n\nThe capital of Peru is Lima\n\n"
    assert render_prompts_lm(item, " ", shots) == [prefix + "The capital of Chad is",
                                                   prefix + "The capital of Chad is N'Djamena"]
    assert render_prompts_lm({"context": "Q: x\n", "continuation": "y"}, "\nAnswer: ") == ["Q: x\nAnswer:",
                                                                                        "Q: x\nAnswer: y"]


# -----------------------------------------------------------------------------
# Scoring with the bigram model: hand-computed accuracies, centered accuracies and CORE


@pytest.mark.parametrize("label,task_type,shots,delim,rb,items,expected", MINI_TASKS)
def test_evaluate_task_matches_hand_computed(label, task_type, shots, delim, rb, items, expected):
    model = BigramModel()
    acc = evaluate_task(model, ByteTokenizer(), items, "cpu", meta(task_type, shots, delim))
    assert acc == pytest.approx(expected)
    assert model.calls == len(items)  # one forward per item, all candidates batched


def test_mc_mean_loss_picks_lowest_and_first_on_ties():
    model, tok = BigramModel(), ByteTokenizer()
    # "abc" and "ab" are both all hits (equal mean loss): the first listed wins
    assert evaluate_example(0, model, tok, [{"query": "Q", "choices": ["ab", "abc"], "gold": 0}], "cpu",
                            meta("multiple_choice"))
    assert not evaluate_example(0, model, tok, [{"query": "Q", "choices": ["ab", "abc"], "gold": 1}], "cpu",
                                meta("multiple_choice"))
    # mean, not sum: "bcde" (b missed, c d e hit) beats "ac" (a hit, c missed), which has the lower sum
    assert evaluate_example(0, model, tok, [{"query": "Q", "choices": ["ac", "bcde"], "gold": 1}], "cpu",
                            meta("multiple_choice"))


def test_evaluate_core_on_mini_bundle(tmp_path):
    bundle = write_bundle(tmp_path / "bundle", gz=True)
    out = evaluate_core(BigramModel(), ByteTokenizer(), "cpu", bundle, progress=False)
    assert out["results"] == pytest.approx({"mc_task": 0.5, "schema_task": 2 / 3, "lm_task": 0.5})
    # centered = (acc - rb/100) / (1 - rb/100): (0.5-0.25)/0.75, (2/3-0.5)/0.5, 0.5/1
    assert out["centered"] == pytest.approx({"mc_task": 1 / 3, "schema_task": 1 / 3, "lm_task": 0.5})
    assert out["core"] == pytest.approx((1 / 3 + 1 / 3 + 0.5) / 3)


def test_centered_accuracy():
    assert centered_accuracy(0.25, 25) == 0.0
    assert centered_accuracy(1.0, 62) == pytest.approx(1.0)
    assert centered_accuracy(0.0, 50) == pytest.approx(-1.0)
    assert centered_accuracy(0.7, 0) == pytest.approx(0.7)


def test_max_per_task_keeps_the_first_items():
    model = BigramModel()
    assert evaluate_task(model, ByteTokenizer(), MC_ITEMS, "cpu", meta("multiple_choice"), max_per_task=2) == 1.0
    assert model.calls == 2
    assert evaluate_task(model, ByteTokenizer(), MC_ITEMS, "cpu", meta("multiple_choice"), max_per_task=-1) == 0.5


def test_fewshot_prompts_are_cropped_to_sequence_len():
    # 3-shot LM prompts of ~40 bytes, a model that takes 16 tokens: same verdicts, never more than 16 tokens fed
    items = [{"context": f"item {i}:", "continuation": "abc"} for i in range(5)] + [LM_ITEMS[1]]
    model = BigramModel(sequence_len=16)
    acc = evaluate_task(model, ByteTokenizer(), items, "cpu", meta("language_modeling", shots=3))
    assert acc == pytest.approx(5 / 6)


def test_crop_to_context_shifts_spans():
    tokens, starts, ends = crop_to_context([[1, 2, 3, 4, 5, 6], [1, 2, 3]], [4, 2], [6, 3], 4)
    assert tokens == [[3, 4, 5, 6], [1, 2, 3]]
    assert (starts, ends) == ([2, 2], [4, 3])
    # a span pushed off the left is scored from position 1 (position 0 has no prediction)
    assert crop_to_context([[1, 2, 3, 4, 5]], [1], [5], 3) == ([[3, 4, 5]], [1], [3])


def test_spans_never_empty_when_one_candidate_contains_another():
    tok = ByteTokenizer()
    # "ab" is a prefix of "abc": each choice still scores at least its last token
    tokens, starts, ends = core_eval.batch_mc(tok, ["Q ab", "Q abc"])
    assert (starts, ends) == ([4, 4], [5, 6])
    tokens, starts, ends = core_eval.batch_schema(tok, ["cat sat", "a cat sat"])
    assert (starts, ends) == ([1, 3], [8, 10])


def test_too_few_items_for_the_shots_is_a_clear_error():
    with pytest.raises(ValueError, match=r"task mc_task: 1-shot prompts need at least 2 items, got 1; use --max_per"):
        evaluate_task(BigramModel(), ByteTokenizer(), MC_ITEMS, "cpu", meta("multiple_choice", 1, label="mc_task"),
                      max_per_task=1)


def test_unknown_task_type_is_an_error():
    with pytest.raises(ValueError, match="task_type 'cloze' is not one of multiple_choice, schema, language_m"):
        evaluate_example(0, BigramModel(), ByteTokenizer(), MC_ITEMS, "cpu", meta("cloze"))


# -----------------------------------------------------------------------------
# Distributed: rank r scores items r::world_size, the results are summed across ranks


def _ddp_worker(rank, world_size, port, out_dir):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        model = BigramModel()
        acc = evaluate_task(model, ByteTokenizer(), MC_ITEMS, "cpu", meta("multiple_choice", shots=1))
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump({"acc": acc, "calls": model.calls}, f)
    finally:
        dist.destroy_process_group()


def test_evaluate_task_ddp_splits_and_all_reduces(tmp_path):
    mp.spawn(_ddp_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    results = [json.load(open(tmp_path / f"rank{r}.json")) for r in range(2)]
    # each rank alone has 1 right of its 2 items (0.25 of the task); only the all_reduce makes it 0.5 on both
    assert results == [{"acc": 0.5, "calls": 2}, {"acc": 0.5, "calls": 2}]


# -----------------------------------------------------------------------------
# Real models and tokenizer through the same path


@pytest.fixture(scope="module")
def tiny_tokenizer():
    from nanochat.tokenizer import RustBPETokenizer
    corpus = [json.dumps(x) for x in MC_ITEMS + SCHEMA_ITEMS + LM_ITEMS] * 5 + [
        "Question: Which gas do plants take in? Answer: carbon dioxide. The capital of France is Paris.\n"] * 20
    return RustBPETokenizer.train_from_iterator(corpus, 300)


def build_tiny(model_type, tokenizer):
    return tiny_model(model_type, tokenizer.get_vocab_size(), max_seq_len=64, head_dim=16, random_weights=False)


@pytest.mark.parametrize("model_type", list(MODEL_TYPES))
def test_real_tiny_model_on_mini_bundle(tmp_path, tiny_tokenizer, model_type):
    model = build_tiny(model_type, tiny_tokenizer)
    out = evaluate_core(model, tiny_tokenizer, "cpu", write_bundle(tmp_path / "b"), progress=False)
    assert set(out["results"]) == {"mc_task", "schema_task", "lm_task"}
    for label, acc in out["results"].items():
        assert 0.0 <= acc <= 1.0
        n = {"mc_task": 4, "schema_task": 3, "lm_task": 4}[label]
        assert round(acc * n, 6) == round(acc * n)  # a whole number of items right
    assert -3.0 <= out["core"] <= 1.0


def test_real_tiny_model_on_offline_bundle(tiny_tokenizer):
    # one item of every offline task through BPE tokens, with its real few-shot prompt cropped to 64 tokens
    model = build_tiny("gpt", tiny_tokenizer)
    for task in load_bundle(OFFLINE_BUNDLE_DIR):
        data = load_task_data(OFFLINE_BUNDLE_DIR, task)[:task["num_fewshot"] + 1]
        assert evaluate_example(0, model, tiny_tokenizer, data, "cpu", task) in (True, False)


# -----------------------------------------------------------------------------
# The offline bundle shipped in data/eval_bundle

OFFICIAL_META = {  # label: (type, shots, delimiter, random baseline %) from the official core.yaml / csv
    "hellaswag_zeroshot": ("multiple_choice", 0, " ", 25), "jeopardy": ("language_modeling", 10, "\nAnswer: ", 0),
    "bigbench_qa_wikidata": ("language_modeling", 10, " ", 0), "arc_easy": ("multiple_choice", 10, "\nAnswer: ", 25),
    "arc_challenge": ("multiple_choice", 10, "\nAnswer: ", 25), "copa": ("multiple_choice", 0, " ", 50),
    "commonsense_qa": ("multiple_choice", 10, " ", 20), "piqa": ("multiple_choice", 10, "\nAnswer: ", 50),
    "openbook_qa": ("multiple_choice", 0, " ", 25), "lambada_openai": ("language_modeling", 0, " ", 0),
    "hellaswag": ("multiple_choice", 10, " ", 25), "winograd": ("schema", 0, " ", 50),
    "winogrande": ("schema", 0, " ", 50), "bigbench_dyck_languages": ("language_modeling", 10, " ", 0),
    "agi_eval_lsat_ar": ("multiple_choice", 3, " ", 20), "bigbench_cs_algorithms": ("language_modeling", 10, " ", 0),
    "bigbench_operators": ("language_modeling", 10, " ", 0),
    "bigbench_repeat_copy_logic": ("language_modeling", 10, " ", 0), "squad": ("language_modeling", 10, " ", 0),
    "coqa": ("language_modeling", 0, " ", 0), "boolq": ("multiple_choice", 10, "\nAnswer: ", 62),
    "bigbench_language_identification": ("multiple_choice", 10, " ", 9.1),
}


def check_item(item, task_type):
    if task_type == "multiple_choice":
        assert set(item) == {"query", "choices", "gold"} and isinstance(item["query"], str)
        assert len(item["choices"]) >= 2 and all(isinstance(c, str) and c for c in item["choices"])
        assert isinstance(item["gold"], int) and 0 <= item["gold"] < len(item["choices"])
    elif task_type == "schema":
        assert set(item) == {"context_options", "continuation", "gold"} and item["continuation"]
        assert len(item["context_options"]) >= 2 and all(isinstance(c, str) for c in item["context_options"])
        assert isinstance(item["gold"], int) and 0 <= item["gold"] < len(item["context_options"])
    else:
        assert set(item) == {"context", "continuation"} and isinstance(item["context"], str)
        assert isinstance(item["continuation"], str) and item["continuation"].strip()


def test_offline_bundle_matches_official_settings_and_schemas():
    tasks = load_bundle(OFFLINE_BUNDLE_DIR)
    labels = [t["label"] for t in tasks]
    assert labels == [t for t in CORE_TASKS if t in labels]  # official order, no strangers
    assert len(labels) >= 19
    for t in tasks:
        assert (t["task_type"], t["num_fewshot"], t["continuation_delimiter"], t["random_baseline"]) == \
            OFFICIAL_META[t["label"]], t["label"]
        data = load_task_data(OFFLINE_BUNDLE_DIR, t)
        assert t["num_fewshot"] + 1 <= len(data) <= 500, t["label"]
        for item in data:
            check_item(item, t["task_type"])
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(OFFLINE_BUNDLE_DIR) for f in fs)
    assert size < 3 * 2**20
    licences = open(os.path.join(OFFLINE_BUNDLE_DIR, "LICENSES.md")).read()
    assert all(f"| {label} |" in licences for label in labels)


# -----------------------------------------------------------------------------
# Downloading a bundle (from a server on 127.0.0.1)


def zipped_bundle(tmp_path):
    root = write_bundle(tmp_path / "src" / "eval_bundle")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for d, _, files in os.walk(root):
            for f in files:
                path = os.path.join(d, f)
                zf.write(path, os.path.relpath(path, tmp_path / "src"))
    return buf.getvalue()


@pytest.fixture
def server():
    """Serves `server.files[path] = bytes`; paths in `server.fail_first` answer 503 the first time, paths in
    `server.fail_always` every time."""
    state = SimpleNamespace(files={}, fail_first=set(), fail_always=set(), requests=[])

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            state.requests.append(self.path)
            if self.path in state.fail_always:
                self.send_error(503)
                return
            if self.path in state.fail_first:
                state.fail_first.discard(self.path)
                self.send_error(503)
                return
            body = state.files.get(self.path)
            if body is None:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    yield state
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def no_sleep(monkeypatch):
    monkeypatch.setattr(core_eval.time, "sleep", lambda s: None)


def test_download_extracts_atomically(tmp_path, server, no_sleep):
    blob = zipped_bundle(tmp_path)
    server.files["/eval_bundle.zip"] = blob
    server.fail_first.add("/eval_bundle.zip")  # the first attempt fails: retried
    dest = tmp_path / "base" / "eval_bundle"
    download_bundle(str(dest), server.url + "/eval_bundle.zip", hashlib.sha256(blob).hexdigest(), retries=2)
    assert server.requests == ["/eval_bundle.zip", "/eval_bundle.zip"]
    assert [t["label"] for t in load_bundle(str(dest))] == ["mc_task", "schema_task", "lm_task"]
    assert os.listdir(tmp_path / "base") == ["eval_bundle"]  # no temp zip or folder left behind


def test_download_rejects_checksum_mismatch(tmp_path, server):
    server.files["/eval_bundle.zip"] = zipped_bundle(tmp_path)
    dest = tmp_path / "base" / "eval_bundle"
    with pytest.raises(ValueError, match="does not match the expected 0000"):
        download_bundle(str(dest), server.url + "/eval_bundle.zip", "0" * 64)
    assert os.listdir(tmp_path / "base") == []  # nothing installed, nothing left over
    assert server.requests == ["/eval_bundle.zip"]  # a mismatch is not retried


def test_download_gives_up_after_retries(tmp_path, server, no_sleep):
    server.fail_always.add("/flaky.zip")
    with pytest.raises(RuntimeError, match="after 3 attempts"):
        download_bundle(str(tmp_path / "eval_bundle"), server.url + "/flaky.zip", None, retries=3)
    assert len(server.requests) == 3
    # a missing file (404) is not retried: the bundle and the shards share fileio.download_file
    with pytest.raises(RuntimeError, match="HTTP 404"):
        download_bundle(str(tmp_path / "eval_bundle"), server.url + "/missing.zip", None, retries=3)
    assert len(server.requests) == 4
    assert os.listdir(tmp_path) == []  # no temp zip left behind


def test_resolve_bundle_download_cache_and_offline_fallback(tmp_path, server, monkeypatch, no_sleep):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "base"))
    blob = zipped_bundle(tmp_path)
    server.files["/eval_bundle.zip"] = blob
    # offline: the download fails, the shipped bundle is used
    monkeypatch.setattr(core_eval, "OFFICIAL_BUNDLE_URL", server.url + "/unreachable.zip")
    assert resolve_bundle() == (OFFLINE_BUNDLE_DIR, "offline")
    assert resolve_bundle(allow_download=False) == (OFFLINE_BUNDLE_DIR, "offline")
    # wrong checksum: refused, offline again
    monkeypatch.setattr(core_eval, "OFFICIAL_BUNDLE_URL", server.url + "/eval_bundle.zip")
    assert resolve_bundle() == (OFFLINE_BUNDLE_DIR, "offline")
    # right checksum: downloaded once, then cached
    monkeypatch.setattr(core_eval, "OFFICIAL_BUNDLE_SHA256", hashlib.sha256(blob).hexdigest())
    cached = str(tmp_path / "base" / "eval_bundle")
    assert resolve_bundle() == (cached, "downloaded")
    n = len(server.requests)
    assert resolve_bundle() == (cached, "cached") and len(server.requests) == n
    # an explicit folder wins; a folder without core.yaml is a clear error
    assert resolve_bundle(cached) == (cached, "local")
    with pytest.raises(FileNotFoundError, match="has no core.yaml"):
        resolve_bundle(str(tmp_path))


# -----------------------------------------------------------------------------
# scripts/base_eval end to end on a saved checkpoint


def test_base_eval_end_to_end(tmp_path, monkeypatch, capsys, tiny_tokenizer, server, no_sleep):
    from nanochat.checkpoint import checkpoint_dir, read_meta, save_checkpoint
    from scripts import base_eval

    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "base"))
    monkeypatch.setattr(core_eval, "OFFICIAL_BUNDLE_URL", server.url + "/unreachable.zip")
    tiny_tokenizer.save(str(tmp_path / "base" / "tokenizer"))
    model = build_tiny("alcoholic", tiny_tokenizer)
    ckpt = checkpoint_dir("base", "alcoholic_d1")
    save_checkpoint(ckpt, 7, model, {"tokenizer_hash": tiny_tokenizer.hash})

    out = base_eval.main(["--", "--bundle-dir", write_bundle(tmp_path / "b"), "--device_type=cpu"])
    text = capsys.readouterr().out
    assert f"CORE: {out['core']:.4f}  (local bundle: 0 of 22 tasks; not comparable" in text
    rows = list(csv.reader(open(tmp_path / "base" / "base_eval" / "alcoholic_d1_7.csv")))
    assert rows[0] == ["Task", "Accuracy", "Centered"] and [r[0] for r in rows[1:]] == ["mc_task", "schema_task",
                                                                                      "lm_task", "CORE"]
    assert float(rows[-1][2]) == pytest.approx(out["core"], abs=1e-6)
    metrics = read_meta(ckpt, 7)["metrics"]
    assert metrics["core"] == pytest.approx(out["core"])
    assert metrics["core_tasks"]["mc_task"]["accuracy"] == pytest.approx(out["results"]["mc_task"])

    # no --bundle_dir, no cached bundle, no network: the offline bundle (here a small stand-in), said so
    stand_in = [("copa",) + MINI_TASKS[0][1:], ("winogrande",) + MINI_TASKS[1][1:]]
    monkeypatch.setattr(core_eval, "OFFLINE_BUNDLE_DIR", write_bundle(tmp_path / "offline", stand_in))
    out = base_eval.main(["--model_type=alcoholic", "--max_per_task=3", "--device_type=cpu"])
    text = capsys.readouterr().out
    assert "offline bundle: 2 of 22 tasks" in text
    assert f"CORE: {out['core']:.4f}  (offline bundle: 2 of 22 tasks, subsampled; not comparable" in text
    assert list(out["results"]) == ["copa", "winogrande"]
    assert read_meta(ckpt, 7)["metrics"]["core_bundle"] == "offline bundle: 2 of 22 tasks, max_per_task=3"
