"""Checkpoints and data under damage: nothing in a checkpoint runs code, damaged files give one-line errors,
broken shards are skipped instead of hanging the loader, and a kill mid-save leaves a resumable folder.
See docs/reliability.md ("Checkpoints and data")."""

import ast
import io
import json
import os
import pickle
import re
import subprocess
import sys
import threading
import zipfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_save

from nanochat import dataset
from nanochat.checkpoint import (
    CheckpointError,
    checkpoint_dir,
    find_last_step,
    list_model_tags,
    load_model,
    load_rank_state,
    save_checkpoint,
)
from nanochat.cli import run_cli
from nanochat.dataloader import DataLoader
from nanochat.dataset import DataError
from nanochat.fileio import remove_orphan_tmp_files
from nanochat.tokenizer import RustBPETokenizer

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = ["--depth=1", "--head_dim=32", "--max_seq_len=32", "--device_batch_size=2", "--eval_every=-1",
        "--eval_tokens=64", "--sample_every=-1"]


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
    return result["value"]


def dead_pid():
    """The id of a process that has exited (ids are not reused this fast)."""
    proc = subprocess.Popen([sys.executable, "-c", ""])
    proc.wait()
    return proc.pid


def one_line_error(e):
    msg = str(e)
    assert "\n" not in msg and msg.strip(), msg
    return msg


# -----------------------------------------------------------------------------
# Planted code in checkpoints never runs


class Plant:
    """Unpickling this creates the marker file: what a malicious optim file would do (it could run anything)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def small_model():
    from nanochat.models import build_model, config_from_depth

    torch.manual_seed(0)
    return build_model("gpt", config_from_depth("gpt", 1, 32, 512, head_dim=32))


def save_step(base, step=5, tag="t", rank_state=None):
    from nanochat.tokenizer import get_tokenizer

    d = checkpoint_dir("base", tag)
    save_checkpoint(d, step, small_model(), {"tokenizer_hash": get_tokenizer().hash}, rank_state=rank_state)
    return d


class Foreign:
    """A plain object of a class the restricted unpickler does not know: refused though its unpickling runs nothing."""


def _torch_save_bytes(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _zip_bytes():
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("archive/data.txt", "not a checkpoint")
    return buf.getvalue()


CRAFTED = {
    "torch.save that runs code": lambda marker: _torch_save_bytes({"optimizers": [Plant(marker)]}),
    "raw pickle that runs code": lambda marker: pickle.dumps({"optimizers": [Plant(marker)]}),
    "pickle protocol 0 that runs code": lambda marker: pickle.dumps({"x": Plant(marker)}, protocol=0),
    "foreign class": lambda marker: _torch_save_bytes({"x": Foreign()}),
    "format-2 safetensors named .pt": lambda marker: safetensors_save(
        {"t": torch.ones(3)}, metadata={"format": "nanochat-rank-state", "version": "1", "state": "{}"}),
    "zip of something else": lambda marker: _zip_bytes(),
    "not a dict": lambda marker: _torch_save_bytes([torch.ones(2), 3]),
    "empty": lambda marker: b"",
    "garbage": lambda marker: bytes(range(256)) * 4,
    "truncated": lambda marker: _torch_save_bytes({"t": torch.ones(4096)})[:-200],
}


@pytest.mark.parametrize("kind", list(CRAFTED))
def test_crafted_rank_state_never_runs_and_is_one_line_error(base_env, tmp_path, kind):
    d = save_step(base_env, rank_state={"x": torch.arange(3)})
    marker = tmp_path / "pwned"
    with open(os.path.join(d, "optim_000005_rank0.pt"), "wb") as f:
        f.write(CRAFTED[kind](marker))
    with pytest.raises(CheckpointError, match=r"optim_000005_rank0\.pt (is not a valid rank state|holds a list)") as e:
        load_rank_state(d, 5)
    assert "without --resume" in one_line_error(e.value)
    assert not marker.exists()


def test_reduce_like_plain_data_loads_as_data(base_env, tmp_path):
    marker = tmp_path / "pwned"
    d = save_step(base_env, rank_state={"__reduce__": ["builtins.open", [str(marker), "w"]], "__class__": "os.system"})
    assert load_rank_state(d, 5) == {"__reduce__": ["builtins.open", [str(marker), "w"]], "__class__": "os.system"}
    assert not marker.exists()


@pytest.mark.parametrize("plant", ["pickle that runs code", "well-formed foreign state", "format 2"])
def test_resume_from_planted_optim_file_is_one_line_cli_error(base_env, tmp_path, capsys, plant):
    from scripts import base_train

    base_train.main([*TINY, "--num_iterations=1", "--model_tag=p"])
    d = checkpoint_dir("base", "p")
    marker = tmp_path / "pwned"
    path = os.path.join(d, "optim_000001_rank0.pt")
    if plant == "pickle that runs code":
        torch.save({"optimizers": [Plant(marker)]}, path)
    elif plant == "well-formed foreign state":
        torch.save({"optimizers": [{"__reduce__": str(marker)}]}, path)
    else:  # a format-2 folder: the rank state as safetensors, no .pt
        os.remove(path)
        with open(os.path.join(d, "optim_000001_rank0.safetensors"), "wb") as f:
            f.write(CRAFTED["format-2 safetensors named .pt"](marker))
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        run_cli(lambda: base_train.main([*TINY, "--num_iterations=2", "--model_tag=p", "--resume"]))
    assert e.value.code == 1
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "optim_000001_rank0" in errors[0] and "Traceback" not in err, err
    if plant == "format 2":
        assert f"python -m dev.convert_rank_state {d}" in errors[0]
    assert not marker.exists()


def test_no_unsafe_torch_load_in_the_project():
    """Every torch.load call passes weights_only=True (the restricted unpickler); nothing calls pickle.load."""
    offenders = []
    for top in ("nanochat", "scripts", "tasks", "tests", "dev"):
        for root, _, files in os.walk(os.path.join(REPO, top)):
            for name in (f for f in files if f.endswith(".py")):
                path = os.path.join(root, name)
                with open(path, encoding="utf-8") as f:
                    tree = ast.parse(f.read(), path)
                for node in ast.walk(tree):
                    if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
                        continue
                    owner = getattr(node.func.value, "id", None)
                    if owner == "pickle" and node.func.attr in ("load", "loads", "Unpickler"):
                        offenders.append(f"{path}:{node.lineno} pickle.{node.func.attr}")
                    if owner == "torch" and node.func.attr == "load":
                        kw = {k.arg: k.value for k in node.keywords}
                        if not (isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True):
                            offenders.append(f"{path}:{node.lineno} torch.load without weights_only=True")
    assert not offenders, offenders


# -----------------------------------------------------------------------------
# Damaged meta files: one-line errors


DAMAGED_META = {
    "a JSON list": lambda meta: [meta],
    "no model_config": lambda meta: {k: v for k, v in meta.items() if k != "model_config"},
    "model_config a list": lambda meta: dict(meta, model_config=[1, 2]),
    "model_config null": lambda meta: dict(meta, model_config=None),
    "model_config value an object": lambda meta: dict(meta, model_config=dict(meta["model_config"], n_embd={})),
    "model_config width a string": lambda meta: dict(meta, model_config=dict(meta["model_config"], n_embd="64")),
    "step a string": lambda meta: dict(meta, step="5"),
    "model_sha256 a number": lambda meta: dict(meta, model_sha256=5),
    "tokenizer_hash a list": lambda meta: dict(meta, tokenizer_hash=["x"]),
    "metrics a list": lambda meta: dict(meta, metrics=[]),
    "format_version from the future": lambda meta: dict(meta, format_version=99),
}


@pytest.mark.parametrize("damage", list(DAMAGED_META))
def test_damaged_meta_is_one_line_error(base_env, damage):
    d = save_step(base_env)
    path = os.path.join(d, "meta_000005.json")
    with open(path) as f:
        meta = json.load(f)
    with open(path, "w") as f:
        json.dump(DAMAGED_META[damage](meta), f)
    with pytest.raises(CheckpointError) as e:
        load_model("base", model_tag="t")
    assert d in one_line_error(e.value)


@pytest.mark.parametrize("content", [b"", b"\xff\xfe not utf-8", b'{"model_type": "gpt", '])
def test_unreadable_meta_is_one_line_error(base_env, content):
    d = save_step(base_env)
    with open(os.path.join(d, "meta_000005.json"), "wb") as f:
        f.write(content)
    with pytest.raises(CheckpointError, match="cannot read .*meta_000005.json") as e:
        load_model("base", model_tag="t")
    one_line_error(e.value)


def test_damaged_folder_does_not_hide_the_others(base_env):
    save_step(base_env, tag="good")
    d = save_step(base_env, tag="bad")
    with open(os.path.join(d, "meta_000005.json"), "w") as f:
        f.write("[]")
    assert list_model_tags("base") == ["good"] and list_model_tags("base", "gpt") == ["good"]


# -----------------------------------------------------------------------------
# Kills mid-save: orphan temp files and incomplete steps


def test_orphan_tmp_files_removed_at_save_live_writers_kept(base_env):
    d = checkpoint_dir("base", "t")
    os.makedirs(d)
    dead, live = dead_pid(), os.getppid()  # the parent (pytest's launcher or shell) is alive
    orphans = [f"model_000010.safetensors.tmp.{dead}", f"optim_000010_rank1.pt.tmp.{dead}"]
    kept = [f"optim_000010_rank1.pt.tmp.{live}", "notes.txt"]
    for name in orphans + kept:
        open(os.path.join(d, name), "wb").close()
    save_step(base_env, step=5)
    assert sorted(os.listdir(d)) == sorted(kept + ["meta_000005.json", "model_000005.safetensors"])


def test_remove_orphan_tmp_files_by_prefix(tmp_path):
    dead = dead_pid()
    names = [f"a.parquet.tmp.{dead}", "a.parquet.tmp", f"b.parquet.tmp.{dead}", f"a.parquet.tmp.{os.getpid()}"]
    for name in names:
        (tmp_path / name).write_bytes(b"x")
    removed = remove_orphan_tmp_files(str(tmp_path), prefix="a.parquet")
    assert sorted(os.path.basename(p) for p in removed) == sorted(names[:2])
    assert sorted(os.listdir(tmp_path)) == sorted(names[2:])


def test_kill_mid_save_resumes_previous_step_bitwise_and_cleans_up(base_env):
    """Step 4's save is cut before its meta file (plus temp files of the killed writer): --resume continues
    from step 2, removes the leftovers, and recomputes step 4 bit for bit."""
    from scripts import base_train

    base_train.main([*TINY, "--num_iterations=4", "--save_every=2", "--model_tag=k"])
    d = checkpoint_dir("base", "k")
    reference = load_file(os.path.join(d, "model_000004.safetensors"))
    os.remove(os.path.join(d, "meta_000004.json"))
    dead = dead_pid()
    leftovers = [f"meta_000004.json.tmp.{dead}", f"optim_000004_rank0.pt.tmp.{dead}"]
    for name in leftovers:
        with open(os.path.join(d, name), "wb") as f:
            f.write(b"half written")
    assert find_last_step(d) == 2
    # the leftovers are gone once the resumed run has loaded step 2 (checked from inside the run)
    seen = {}
    original = DataLoader.load_state_dict

    def load_state_dict(self, state):
        seen["files"] = sorted(os.listdir(d))
        return original(self, state)

    DataLoader.load_state_dict = load_state_dict
    try:
        base_train.main([*TINY, "--num_iterations=4", "--save_every=2", "--model_tag=k", "--resume"])
    finally:
        DataLoader.load_state_dict = original
    assert not set(leftovers) & set(seen["files"])
    assert "model_000004.safetensors" not in seen["files"]  # the incomplete step's files went too
    assert find_last_step(d) == 4
    resumed = load_file(os.path.join(d, "model_000004.safetensors"))
    assert all(torch.equal(resumed[k], reference[k]) for k in reference)  # (the files differ in header order)
    assert not [n for n in os.listdir(d) if ".tmp" in n]


# -----------------------------------------------------------------------------
# Broken shards: skipped with a warning, or a clear error; never a hang

ROWS, GROUPS = 3, 4  # per row group, per shard
HANG = 20  # seconds; a healthy run of any test below takes well under one


def make_doc(doc_id):
    return f"id{doc_id}x " + " ".join(["the", "of", "and", "to", "in", "is"][(doc_id + k) % 6] for k in range(6)) + "."


def write_shard(path, first_id):
    pq.write_table(pa.table({"text": [make_doc(first_id + i) for i in range(ROWS * GROUPS)]}), path,
                   row_group_size=ROWS)
    return set(range(first_id, first_id + ROWS * GROUPS))


BROKEN = {
    "zero rows": lambda p: pq.write_table(pa.table({"text": pa.array([], pa.string())}), p),
    "zero bytes": lambda p: p.write_bytes(b""),
    "text file": lambda p: p.write_text("not parquet at all\n" * 20),
    "cut short": lambda p: (write_shard(p, 900), p.write_bytes(p.read_bytes()[:-40])),
    "wrong column": lambda p: pq.write_table(pa.table({"content": [make_doc(900), make_doc(901)]}), p),
    "text not strings": lambda p: pq.write_table(pa.table({"text": [1, 2, 3]}), p),
    "null texts": lambda p: pq.write_table(pa.table({"text": pa.array([None] * 6, pa.string())}), p, row_group_size=3),
}
FAILED_BEFORE = [k for k in BROKEN if k != "zero rows"]  # a zero-row shard among good ones never broke the loader


@pytest.fixture(scope="module")
def tok():
    return RustBPETokenizer.train_from_iterator([make_doc(i) for i in range(50)], 280)


@pytest.fixture
def data_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    (tmp_path / "base_data").mkdir()
    return tmp_path / "base_data"


def doc_ids(tok, batches):
    return {int(m) for x, _ in batches for m in re.findall(r"id(\d+)x", tok.decode(x.flatten().tolist()))}


def take(loader, n):
    return [next(loader) for _ in range(n)]


@pytest.mark.parametrize("kind", FAILED_BEFORE)
def test_broken_train_shard_is_skipped_once_with_a_warning(data_dir, tok, capsys, kind):
    good = write_shard(data_dir / "shard_00000.parquet", 0) | write_shard(data_dir / "shard_00002.parquet", 100)
    BROKEN[kind](data_dir / "shard_00001.parquet")
    write_shard(data_dir / "shard_00003.parquet", 200)  # val
    capsys.readouterr()
    loader = DataLoader(2, 16, "train", tokenizer=tok, rank=0, world_size=1)
    batches = within(HANG, take, loader, 40)  # more than two epochs
    assert loader.epoch >= 2
    assert doc_ids(tok, batches) == good
    warnings = [line for line in capsys.readouterr().out.splitlines() if "shard_" in line]
    assert len(warnings) == 1 and "shard_00001.parquet" in warnings[0], warnings  # once, not once per epoch


@pytest.mark.parametrize("kind", list(BROKEN))
def test_no_usable_train_shard_is_a_clear_error_not_a_hang(data_dir, tok, kind):
    BROKEN[kind](data_dir / "shard_00000.parquet")
    BROKEN[kind](data_dir / "shard_00001.parquet")
    write_shard(data_dir / "shard_00002.parquet", 200)  # val is fine
    loader = DataLoader(2, 16, "train", tokenizer=tok, rank=0, world_size=1)
    with pytest.raises(DataError, match=r"no usable text in the 'train' split \(2 shard\(s\)") as e:
        within(HANG, next, loader)
    assert "shard_00000.parquet" in one_line_error(e.value) and "shard_00001.parquet" in str(e.value)


@pytest.mark.parametrize("kind", list(BROKEN))
def test_broken_val_shard_is_an_error_and_never_taken_from_train(data_dir, tok, kind):
    train = write_shard(data_dir / "shard_00000.parquet", 0) | write_shard(data_dir / "shard_00001.parquet", 100)
    BROKEN[kind](data_dir / "shard_00002.parquet")  # the last shard is val
    with pytest.raises(DataError, match="validation split is the last shard by name") as e:
        within(HANG, next, DataLoader(2, 16, "val", tokenizer=tok, rank=0, world_size=1))
    one_line_error(e.value)
    # the training split is unchanged: the broken val shard does not move shard_00001 into val
    loader = DataLoader(2, 16, "train", tokenizer=tok, rank=0, world_size=1)
    assert doc_ids(tok, within(HANG, take, loader, 30)) == train


def test_null_texts_among_good_ones_are_dropped(data_dir, tok):
    texts = [make_doc(0), None, make_doc(1), None, None, None, make_doc(2), make_doc(3), make_doc(4)]
    pq.write_table(pa.table({"text": pa.array(texts, pa.string())}), data_dir / "shard_00000.parquet",
                   row_group_size=3)  # the middle row group is all nulls
    write_shard(data_dir / "shard_00001.parquet", 200)
    rows = within(HANG, list, dataset.iter_row_groups("train"))
    assert rows == [([make_doc(0), make_doc(1)], (0, 0)), ([make_doc(2), make_doc(3), make_doc(4)], (0, 2))]


def test_resume_across_a_skipped_shard_is_exact(data_dir, tok):
    write_shard(data_dir / "shard_00000.parquet", 0)
    BROKEN["zero bytes"](data_dir / "shard_00001.parquet")
    write_shard(data_dir / "shard_00002.parquet", 100)
    write_shard(data_dir / "shard_00003.parquet", 200)

    def run():
        loader = DataLoader(1, 8, "train", tokenizer=tok, rank=1, world_size=2, tokenizer_batch_size=2)
        reference = DataLoader(1, 8, "train", tokenizer=tok, rank=1, world_size=2, tokenizer_batch_size=2)
        expected = take(reference, 40)
        for k in range(40):
            if k % 7 == 0:
                restored = DataLoader(1, 8, "train", tokenizer=tok, rank=1, world_size=2, tokenizer_batch_size=2)
                restored.load_state_dict(json.loads(json.dumps(loader.state_dict())))
                for (x, y), (ex, ey) in zip(take(restored, 5), expected[k:k + 5]):
                    assert torch.equal(x, ex) and torch.equal(y, ey)
            next(loader)

    within(HANG, run)
