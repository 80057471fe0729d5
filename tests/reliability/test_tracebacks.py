"""The tracebacks that remained where a one-line error is promised (issue: hostile input, round two): each case is set
up, the script runs as from the command line (cli.run_cli), and it must exit non-zero with exactly one line on stderr
and no traceback, the line saying what is wrong. None of these files runs code; they are damaged or odd."""

import io
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from nanochat.tools import use_calculator
from scripts import base_loss, base_train, chat_cli, compare, export_hf, import_hf
from tests.conftest import tiny_model
from tests.reliability.hostile import cli_error, own_tokenizer, save_tiny

CHAT = ["-i", "base", "-g", "t", "-p", "Hi", "-m", "2", "--device_type=cpu"]


def tokenizer_json(base, edit):
    """Damage the base dir's (own copy of the) tokenizer.json with edit(data) -> new data (or raw bytes)."""
    path = own_tokenizer(base) / "tokenizer.json"
    data = edit(json.loads(path.read_text()))
    path.write_bytes(data if isinstance(data, bytes) else json.dumps(data).encode())


def token_bytes(base, value):
    path = own_tokenizer(base) / "token_bytes.pt"
    if isinstance(value, bytes):
        path.write_bytes(value)
    else:
        buf = io.BytesIO()
        torch.save(value, buf)
        path.write_bytes(buf.getvalue())


TOKENIZER_DAMAGE = {
    "not JSON": (lambda d: b"{not json", "cannot read"),
    "not UTF-8": (lambda d: b"\xff\xfe\x00", "cannot read"),
    "a list": (lambda d: [d], "holds a JSON list, not an object"),
    "integer tokens": (lambda d: dict(d, tokens=list(range(len(d["tokens"])))), "tokens are not all base64 strings"),
    "tokens not base64": (lambda d: dict(d, tokens=["%%%"] + d["tokens"][1:]), "is corrupt"),
    "duplicate tokens": (lambda d: dict(d, tokens=[d["tokens"][0]] + d["tokens"][:-1]), "is corrupt"),
    "wrong format version": (lambda d: dict(d, format_version=99), "format_version=99, this code reads 1"),
    "format version a string": (lambda d: dict(d, format_version="1"), "format_version='1'"),
    "no special tokens": (lambda d: {k: v for k, v in d.items() if k != "special_tokens"}, "special tokens None"),
    "wrong hash": (lambda d: dict(d, hash="0" * 64), "is corrupt: stored hash 000000000000"),
    "hash a number": (lambda d: dict(d, hash=5), "its hash is a int"),
    "a bad pattern": (lambda d: dict(d, pattern="(unclosed"), "is corrupt"),
    "nested 100k deep": (lambda d: b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
}


@pytest.mark.parametrize("damage", list(TOKENIZER_DAMAGE))
def test_a_damaged_tokenizer_json_is_one_line(base_env, capsys, damage):
    save_tiny()
    edit, message = TOKENIZER_DAMAGE[damage]
    tokenizer_json(base_env, edit)
    line = cli_error(capsys, chat_cli.main, CHAT, 1)
    assert "tokenizer.json" in line and message in line, line


TOKEN_BYTES_DAMAGE = {
    "garbage": (b"\x00garbage" * 10, "is not a token_bytes file"),
    "empty": (b"", "is not a token_bytes file"),
    "a list": ([1, 2, 3], "holds a list, not the byte lengths"),
    "floats": (torch.ones(512), "holds a torch.float32 tensor of shape (512,)"),
    "2-D": (torch.ones(2, 256, dtype=torch.int64), "tensor of shape (2, 256)"),
    "wrong length": (torch.ones(7, dtype=torch.int64), "has 7 entries but the tokenizer 512 tokens"),
    "negative": (-torch.ones(512, dtype=torch.int64), "not the byte lengths"),
}


@pytest.mark.parametrize("damage", list(TOKEN_BYTES_DAMAGE))
def test_a_damaged_token_bytes_file_is_one_line(base_env, capsys, damage):
    save_tiny()
    value, message = TOKEN_BYTES_DAMAGE[damage]
    token_bytes(base_env, value)
    line = cli_error(capsys, base_loss.main, ["-g", "t", "--device_type=cpu", "--split_tokens=64",
                                              "--device_batch_size=1"], 1)
    assert "token_bytes.pt" in line and message in line, line


def test_nan_weights_whose_hash_matches_are_one_line(base_env, capsys):
    """Weights written with NaNs and a meta that records their hash: the hash check passes, the values are refused
    before a reply would crash."""
    d = save_tiny()
    path = os.path.join(d, "model_000005.safetensors")
    tensors = load_file(path)
    tensors["lm_head.weight"][0, 0] = float("nan")
    save_file(tensors, path)
    meta_path = os.path.join(d, "meta_000005.json")
    meta = json.loads(open(meta_path).read())
    import hashlib

    meta["model_sha256"] = hashlib.sha256(open(path, "rb").read()).hexdigest()
    with open(meta_path, "w") as f:
        json.dump(meta, f)
    line = cli_error(capsys, chat_cli.main, CHAT, 1)
    assert "holds NaN/inf values in lm_head.weight" in line, line


def test_a_meta_whose_step_disagrees_with_its_file_is_one_line(base_env, capsys):
    d = save_tiny()
    path = os.path.join(d, "meta_000005.json")
    meta = json.loads(open(path).read())
    with open(path, "w") as f:
        json.dump(dict(meta, step=7), f)
    line = cli_error(capsys, chat_cli.main, CHAT, 1)
    assert "says step 7, its file name step 5" in line, line


def test_a_device_that_is_not_there_is_one_line(base_env, capsys):
    save_tiny()
    line = cli_error(capsys, chat_cli.main, [*CHAT[:-1], "--device_type=tpu"], 2)
    assert "--device_type" in line and "'tpu'" in line, line
    line = cli_error(capsys, base_train.main, ["--device_type=tpu"], 2)
    assert "invalid choice: 'tpu'" in line, line
    if not torch.cuda.is_available():
        line = cli_error(capsys, chat_cli.main, [*CHAT[:-1], "--device_type=cuda"], 1)
        assert "--device_type=cuda was asked for but this machine has no usable CUDA device" in line, line


@pytest.mark.parametrize("where", ["under a file", "a file", "not empty"])
def test_an_export_directory_that_cannot_be_written_is_one_line(base_env, tmp_path, capsys, where):
    pytest.importorskip("transformers")
    save_tiny()
    (tmp_path / "file").write_text("x")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    out = {"under a file": tmp_path / "file" / "out", "a file": tmp_path / "file", "not empty": tmp_path / "full"}
    line = cli_error(capsys, export_hf.main, ["-g", "t", f"--out_dir={out[where]}"], 1)
    assert f"--out_dir={out[where]}" in line, line


def hf_dir(tmp_path):
    from nanochat import hf
    from nanochat.tokenizer import get_tokenizer

    out = tmp_path / "hf"
    hf.export(tiny_model("gpt", get_tokenizer().get_vocab_size(), max_seq_len=32, head_dim=32), get_tokenizer(),
              str(out))
    return out


def hf_tokenizer_edit(edit):
    def apply(out):
        path = out / "tokenizer.json"
        path.write_text(json.dumps(edit(json.loads(path.read_text()))))
    return apply


def hf_config_edit(edit):
    def apply(out):
        path = out / "config.json"
        data = edit(json.loads(path.read_text()))
        path.write_bytes(data if isinstance(data, bytes) else json.dumps(data).encode())
    return apply


HF_DAMAGE = {
    "tokenizer vocab a list": (hf_tokenizer_edit(lambda d: {**d, "model": {**d["model"], "vocab": ["a", "b"]}}),
                               "its vocab is not an object of token -> integer id"),
    "tokenizer vocab ids strings": (hf_tokenizer_edit(lambda d: {**d, "model": {
        **d["model"], "vocab": {k: str(v) for k, v in d["model"]["vocab"].items()}}}), "its vocab is not an object"),
    "tokenizer added_tokens an object": (hf_tokenizer_edit(lambda d: {**d, "added_tokens": {"a": 1}}),
                                         "its added_tokens are not a list"),
    "tokenizer added_tokens of strings": (hf_tokenizer_edit(lambda d: {**d, "added_tokens": ["<|bos|>"]}),
                                          "its added_tokens are not a list"),
    "tokenizer model a string": (hf_tokenizer_edit(lambda d: {**d, "model": "BPE"}), "its model is a str"),
    "tokenizer merges numbers": (hf_tokenizer_edit(lambda d: {**d, "model": {**d["model"], "merges": [1, 2]}}),
                                 "its merges are not a list"),
    "tokenizer pre_tokenizer a list": (hf_tokenizer_edit(lambda d: {**d, "pre_tokenizer": []}),
                                       "its pre_tokenizer is not an object"),
    "tokenizer a list": (hf_tokenizer_edit(lambda d: [d]), "holds a JSON list"),
    "config nested 100k deep": (hf_config_edit(lambda d: b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"),
                                "nested too deeply"),
    "config a list": (hf_config_edit(lambda d: [d]), "is not a transformers config"),
    "config hidden_size a string": (hf_config_edit(lambda d: dict(d, hidden_size="64")), "config.json"),
    "config heads zero": (hf_config_edit(lambda d: dict(d, num_attention_heads=0)), "does not fit our model"),
    "index not an object": (lambda out: (out / "model.safetensors.index.json").write_text("[1]"),
                            "has no weight_map object"),
    "weights not safetensors": (lambda out: (out / "model.safetensors").write_bytes(b"\x00" * 64),
                                "is not a valid safetensors file"),
}


@pytest.mark.parametrize("damage", list(HF_DAMAGE))
def test_a_damaged_hf_directory_is_one_line(base_env, tmp_path, capsys, damage):
    pytest.importorskip("transformers")
    out = hf_dir(tmp_path)
    edit, message = HF_DAMAGE[damage]
    edit(out)
    line = cli_error(capsys, import_hf.main, [f"--hf_dir={out}", "--model_tag=x"], 1)
    assert message in line, line


@pytest.mark.parametrize("argv, message", [(["--depth", "-2"], "--depth/--depths: '-2' is not a positive integer"),
                                           (["--seeds", "0"], "--seeds: '0' is not a positive integer")])
def test_compare_refuses_sizes_that_would_do_nothing(tmp_path, monkeypatch, capsys, argv, message):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    line = cli_error(capsys, compare.main, ["--model_types", "gpt", *argv], 2)
    assert message in line, line


def test_a_dry_run_of_a_context_past_the_limit_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    line = cli_error(capsys, base_train.main, ["--max_seq_len=10000000", "--dry_run"], 2)
    assert "--max_seq_len: '10000000' is not an integer in [1, 131072]" in line, line
    assert os.listdir(tmp_path) == []


def test_the_calculator_reads_commas_as_thousands_separators_only():
    assert use_calculator("(1,2)") is None  # a tuple: refused, not 12
    assert use_calculator("2*(3,4)") is None and use_calculator("12,5") is None
    assert use_calculator("1,234 * 2") == 2468 and use_calculator("1,234,567 + 1") == 1234568
    assert use_calculator('"a,b,c".count(",")') == 2
