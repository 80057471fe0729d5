"""Pretraining on your own text (--data): every format and compression, the content hash, the held-out split, bad
input as one-line errors, and the loader, base_train, base_loss and tok_train on the prepared shards."""

import gzip
import json
import os
import re
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from nanochat import userdata, userfiles
from nanochat.checkpoint import checkpoint_dir, find_last_step, read_meta
from nanochat.cli import run_cli
from nanochat.compare.runs import absolute_data_paths
from nanochat.dataloader import DataLoader
from nanochat.tokenizer import RustBPETokenizer, get_tokenizer, trained_on
from nanochat.userdata import prepare_text
from nanochat.userfiles import BadInput, SplitWriter, held_out_score
from scripts import base_loss, base_train, tok_train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = "river stone light paper window garden winter music silver forest letter morning".split()
TINY = ["--depth=1", "--head_dim=32", "--max_seq_len=32", "--device_batch_size=2", "--eval_every=-1",
        "--eval_tokens=64", "--sample_every=-1"]


def make_doc(i, n=12):
    return f"doc{i} " + " ".join(WORDS[(i * 5 + k) % len(WORDS)] for k in range(n)) + "."


@pytest.fixture
def base(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "base"))
    return tmp_path / "base"


def compress(data, compression):
    if compression == ".gz":
        return gzip.compress(data)
    if compression == ".zst":
        sink = pa.BufferOutputStream()
        with pa.CompressedOutputStream(sink, "zstd") as out:
            out.write(data)
        return sink.getvalue().to_pybytes()
    return data


def write(path, data, compression=""):
    """Write bytes (str as UTF-8) to path + compression; returns the full path."""
    path = str(path) + compression
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(compress(data.encode() if isinstance(data, str) else data, compression))
    return path


def parquet_bytes(docs, column="text"):
    sink = pa.BufferOutputStream()
    pq.write_table(pa.table({column: docs}), sink)
    return sink.getvalue().to_pybytes()


def in_format(docs, fmt):
    """The documents as the bytes of a file of this format."""
    if fmt in (".txt", ".md"):
        return "\n\n\n".join(docs) + "\n"
    if fmt == ".jsonl":
        return "".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(docs))
    return parquet_bytes(docs)


def shard_docs(directory, manifest):
    """(training documents, held-out documents) of a prepared directory."""
    read = lambda name: pq.read_table(os.path.join(directory, name)).column("text").to_pylist()  # noqa: E731
    return [d for name in manifest["train_shards"] for d in read(name)], read(manifest["val_shard"])


# -----------------------------------------------------------------------------
# Formats


@pytest.mark.parametrize("compression", ["", ".gz", ".zst"])
@pytest.mark.parametrize("fmt", [".txt", ".md", ".jsonl", ".parquet"])
def test_every_format_and_compression_gives_its_documents(base, tmp_path, fmt, compression):
    docs = [make_doc(i) for i in range(40)] + ["première ligne\n\nune seconde, après un blanc — ünïcödé ✓"]
    path = write(tmp_path / f"data{fmt}", in_format(docs, fmt), compression)
    directory, manifest = prepare_text(path, val_fraction=0.1)
    train, val = shard_docs(directory, manifest)
    assert sorted(train + val) == sorted(docs)  # nothing lost, nothing added, text exact
    assert manifest["documents"] == 41 and manifest["val_documents"] == len(val) >= 1
    assert manifest["files"][0]["name"] == os.path.basename(path)


def test_txt_documents_are_separated_by_two_blank_lines(base, tmp_path, monkeypatch):
    text = ("\ufeff\n\nFirst paragraph.\r\nStill the first.\r\n\r\nSecond paragraph, same document.\r\n"
            "  \n\t\n"  # whitespace-only lines are blank: two of them end the document
            "    Indented second document.\n\n\n\n\nThird.\n\n")
    path = write(tmp_path / "a.txt", text)
    directory, manifest = prepare_text(path)
    train, val = shard_docs(directory, manifest)
    assert sorted(train + val) == sorted([
        "First paragraph.\nStill the first.\n\nSecond paragraph, same document.",
        "    Indented second document.", "Third."])
    monkeypatch.setattr(userdata, "MAX_DOC_CHARS", 100)  # a long document is cut at the first line end past it
    path = write(tmp_path / "long.md", "".join(f"line {i} " + "x" * 30 + "\n" for i in range(20)))
    directory, manifest = prepare_text(path)
    train, val = shard_docs(directory, manifest)
    assert manifest["cut_documents"] == 6 and manifest["documents"] == 7
    assert all(len(d) < 140 for d in train + val) and "".join(sorted(train + val, key=lambda d: int(
        d.split()[1]))).count("line") == 20


def test_directory_is_read_recursively_in_name_order(base, tmp_path, capsys):
    root = tmp_path / "corpus"
    write(root / "b.jsonl", in_format([make_doc(i) for i in range(5)], ".jsonl"), ".gz")
    write(root / "a" / "z.txt", in_format([make_doc(i) for i in range(5, 9)], ".txt"))
    write(root / "a" / "notes.csv", "not,data\n")
    write(root / ".git" / "x.txt", "hidden: not data")
    write(root / ".hidden.txt", "hidden: not data")
    _, manifest = prepare_text(str(root))
    assert [(f["name"], f["documents"]) for f in manifest["files"]] == [("a/z.txt", 4), ("b.jsonl.gz", 5)]
    assert "ignoring 1 file(s) of other types (a/notes.csv)" in capsys.readouterr().out


# -----------------------------------------------------------------------------
# The content hash


def test_same_bytes_are_prepared_once_and_one_changed_byte_prepares_again(base, tmp_path, capsys):
    root = tmp_path / "corpus"
    write(root / "a.txt", in_format([make_doc(i) for i in range(30)], ".txt"))
    write(root / "b.jsonl", in_format([make_doc(i) for i in range(30, 60)], ".jsonl"))
    directory, manifest = prepare_text(str(root))
    assert "prepared in" in capsys.readouterr().out
    mtimes = {f: os.stat(os.path.join(directory, f)).st_mtime_ns for f in os.listdir(directory)}
    again, same = prepare_text(str(root))
    assert again == directory and same == manifest
    assert "prepared earlier from the same bytes, reusing" in capsys.readouterr().out
    assert {f: os.stat(os.path.join(directory, f)).st_mtime_ns for f in os.listdir(directory)} == mtimes
    data = bytearray((root / "b.jsonl").read_bytes())
    data[20] = ord("Z") if data[20] != ord("Z") else ord("Y")  # one byte inside a text
    (root / "b.jsonl").write_bytes(bytes(data))
    changed, new = prepare_text(str(root))
    assert changed != directory and new["key"] != manifest["key"] and "prepared in" in capsys.readouterr().out
    assert new["files"][0]["sha256"] == manifest["files"][0]["sha256"]  # a.txt: same bytes, same hash
    assert new["files"][1]["sha256"] != manifest["files"][1]["sha256"]
    assert prepare_text(str(root), val_fraction=0.2)[1]["key"] != new["key"]  # settings are part of the key
    assert os.path.isdir(directory)  # the earlier preparation stays (another run may still read it)


def test_a_killed_preparation_leaves_nothing_that_looks_complete(base, tmp_path, monkeypatch):
    path = write(tmp_path / "a.txt", in_format([make_doc(i) for i in range(30)], ".txt"))

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as m, pytest.raises(KeyboardInterrupt):
        m.setattr(SplitWriter, "close", killed)
        prepare_text(path)
    assert os.listdir(base / "user_data") == []  # the staging directory is gone, nothing was renamed into place
    os.makedirs(base / "user_data" / "0123456789abcdef.tmp.999999999.x1y2")  # a dead process's staging directory
    directory, manifest = prepare_text(path)
    assert os.listdir(base / "user_data") == [os.path.basename(directory)] and manifest["documents"] == 30


def test_two_processes_preparing_the_same_bytes_keep_the_first(base, tmp_path):
    """Another process (here: a nested call) finishes the same preparation first: its directory is kept as it is,
    never removed under its readers, and this one's staging directory is dropped."""
    built = []

    def build(staging):
        if not built:
            built.append("inner")
            first = userfiles.prepare_once("user_data", "ab" * 32, build, "inner")
            built.append(os.stat(first[0]).st_ino)
        with open(os.path.join(staging, "x.parquet"), "w") as f:
            f.write(str(len(built)))
        return {"who": len(built)}

    directory, manifest = userfiles.prepare_once("user_data", "ab" * 32, build, "outer")
    assert manifest["who"] == 1 and os.stat(directory).st_ino == built[1]  # the inner one's, untouched
    assert os.listdir(base / "user_data") == [os.path.basename(directory)]


# -----------------------------------------------------------------------------
# The held-out split


def test_split_is_by_content_whatever_the_order_of_the_files(base, tmp_path):
    docs = [make_doc(i) for i in range(400)]
    write(tmp_path / "one" / "a.jsonl", in_format(docs[:200], ".jsonl"))
    write(tmp_path / "one" / "b.txt", in_format(docs[200:], ".txt"))
    write(tmp_path / "two" / "a.txt", in_format(docs[200:][::-1], ".txt"))  # other files, other order
    write(tmp_path / "two" / "b.jsonl", in_format(docs[:200] + docs[:5], ".jsonl"))  # and five copies
    split = {}
    for name in ("one", "two"):
        directory, manifest = prepare_text(str(tmp_path / name), val_fraction=0.1)
        train, val = shard_docs(directory, manifest)
        split[name] = set(val)
        assert not set(train) & set(val)  # copies of a document land in the same split
        assert sum(f["val_documents"] for f in manifest["files"]) == len(val) == manifest["val_documents"]
    assert split["one"] == split["two"] == {d for d in docs if held_out_score(d) < 0.1}
    assert 20 <= len(split["one"]) <= 60  # ~10% of 400


def test_neither_split_is_ever_empty(base, tmp_path):
    directory, manifest = prepare_text(write(tmp_path / "two.txt", in_format([make_doc(1), make_doc(2)], ".txt")))
    assert (manifest["train_documents"], manifest["val_documents"]) == (1, 1)
    held = sorted([make_doc(1), make_doc(2)], key=held_out_score)[0]
    assert shard_docs(directory, manifest)[1] == [held]  # the lower score is held out
    under = [d for d in (make_doc(i) for i in range(100)) if held_out_score(d) < 0.5][:3]
    _, manifest = prepare_text(write(tmp_path / "under.txt", in_format(under, ".txt")), val_fraction=0.5)
    assert (manifest["train_documents"], manifest["val_documents"]) == (1, 2)  # all fell under: one kept to train
    with pytest.raises(BadInput, match=r"1 usable row\(s\) in all: need at least 2"):
        prepare_text(write(tmp_path / "one.txt", make_doc(1)))


def test_shards_are_uniform_samples_in_an_order_fixed_by_the_rows_alone(tmp_path, monkeypatch):
    """Rows are spread over the shards by their hash and ordered by it inside each: the same rows in any order of
    the files give the same shards, and a shard holds rows of every file (the loader reads shards in turn)."""
    monkeypatch.setattr(SplitWriter, "SHARD_CHARS", 2000)  # 4 training shards for 8000 bytes
    monkeypatch.setattr(SplitWriter, "BUFFER_CHARS", 100)  # buckets are written in many small pieces
    topics = [[f"topic{t} {make_doc(i)}" for i in range(60)] for t in range(4)]  # one topic per file
    shards = []
    for order, name in ((topics, "a"), (topics[::-1], "b")):
        os.makedirs(tmp_path / name)
        writer = SplitWriter(str(tmp_path / name), 0.1, input_bytes=8000)
        for t, docs in enumerate(order):
            for doc in (docs if name == "a" else docs[::-1]):
                writer.add(doc, t)
        train, val, moved = writer.close()
        assert train == [f"shard_{i:05d}.parquet" for i in range(4)] and val == "shard_00004.parquet" and not moved
        assert sorted(os.listdir(tmp_path / name)) == train + [val]  # the buckets are gone
        shards.append([pq.read_table(tmp_path / name / f).column("text").to_pylist() for f in train + [val]])
    assert shards[0] == shards[1]
    everything = sorted(d for docs in topics for d in docs)
    assert sorted(d for shard in shards[0] for d in shard) == everything
    assert shards[0][-1] == sorted((d for d in everything if held_out_score(d) < 0.1), key=userfiles.row_digest)
    for shard in shards[0][:-1]:
        assert {d.split()[0] for d in shard} == {f"topic{t}" for t in range(4)} and len(shard) > 20


def test_a_training_row_moved_to_the_empty_held_out_split(tmp_path):
    docs = [d for d in (make_doc(i) for i in range(100)) if held_out_score(d) >= 0.01][:12]
    writer = SplitWriter(str(tmp_path), 0.01, input_bytes=10 ** 5)  # several training shards
    for i, doc in enumerate(docs):
        assert writer.add(doc, i) is False
    lowest = min(range(12), key=lambda i: held_out_score(docs[i]))
    train, val, moved = writer.close()
    assert moved == (lowest, "val") and train == [f"shard_{i:05d}.parquet" for i in range(len(train))]
    read = lambda name: pq.read_table(tmp_path / name).column("text").to_pylist()  # noqa: E731
    assert read(val) == [docs[lowest]]
    assert sorted(d for n in train for d in read(n)) == sorted(docs[:lowest] + docs[lowest + 1:])


# -----------------------------------------------------------------------------
# Bad input: one line naming the file and the line, exit status 1


def one_line_error(capsys, argv):
    with pytest.raises(SystemExit) as e:
        run_cli(lambda: tok_train.main([*argv, "--vocab_size=300"]))
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err, err
    return err.strip()


def test_bad_text_input_is_one_line_naming_file_and_line(base, tmp_path, capsys):
    good = in_format([make_doc(i) for i in range(3)], ".jsonl")
    cases = {
        "malformed.jsonl": (good + '{"text": "cut short\n', r"malformed.jsonl:4: not valid JSON \(Unterminated string"),
        "field.jsonl": (good + '{"body": "x"}\n', r"field.jsonl:4: no 'text' field \(fields: body; --text_field"),
        "empty.jsonl": (good + '{"text": "  "}\n', r"empty.jsonl:4: empty 'text'"),
        "number.jsonl": (good + '{"text": 3}\n', r"number.jsonl:4: 'text' is a int, not a string"),
        "array.jsonl": (good + '[1]\n', r"array.jsonl:4: expected a JSON object with a 'text' field, got a JSON list"),
        "latin1.txt": ("ok\n\n\nfine\n".encode() + "caf\xe9\n".encode("latin-1"),
                       r"latin1.txt:5: not UTF-8 \(byte 0xe9 at column 4\)"),
        "latin1.jsonl": (good.encode() + '{"text": "caf\xe9"}\n'.encode("latin-1"),
                         r"latin1.jsonl:4: not UTF-8 \(byte 0xe9 at column 14\)"),
        "blank.txt": ("\n \n\n", r"blank.txt: no usable documents in this file$"),
        "surrogate.jsonl": (good + '{"text": "a\\ud800b"}\n', r"surrogate.jsonl:4: 'text' holds a lone surrogate "
                                                              r"'\\ud800': an escape that is not a character"),
        "nested.jsonl": (good + "[" * 100_000 + "]" * 100_000 + "\n", r"nested.jsonl:4: JSON nested too deeply"),
        "allbad.jsonl": ("\n[1]\n", r"allbad.jsonl:2: expected a JSON object"),
    }
    for name, (data, message) in cases.items():
        err = one_line_error(capsys, [f"--data={write(tmp_path / name, data)}"])
        assert err.startswith(f"error: {tmp_path / name}") and re.search(message, err), (name, err)
        assert name == "blank.txt" or "--skip_bad_lines" in err
    data = compress((good * 50).encode(), ".gz")
    (tmp_path / "cut.jsonl.gz").write_bytes(data[:len(data) // 2])
    assert "cut.jsonl.gz: cannot be read (" in one_line_error(capsys, [f"--data={tmp_path / 'cut.jsonl.gz'}"])
    data = parquet_bytes([make_doc(i) for i in range(3000)])
    damaged = write(tmp_path / "damaged.parquet", data[:100] + bytes(2000) + data[2100:])  # a row group's bytes
    assert re.search(r"damaged.parquet(:row 1)?: (unreadable|not a readable parquet file) \(",
                     one_line_error(capsys, [f"--data={damaged}"]))
    cols = write(tmp_path / "cols.parquet", parquet_bytes(["a", "b"], column="body"))
    assert "cols.parquet: no column 'text' (columns: body" in one_line_error(capsys, [f"--data={cols}"])
    assert "missing: no such file or directory" in one_line_error(capsys, [f"--data={tmp_path / 'missing'}"])
    assert "data.csv: not a data file this command reads (accepted: .txt[.gz|.zst]" in one_line_error(
        capsys, [f"--data={write(tmp_path / 'data.csv', 'a,b')}"])
    assert os.listdir(base / "user_data") == []  # nothing half-prepared was kept


def test_skip_bad_lines_counts_them_and_a_reuse_needs_the_flag_again(base, tmp_path, capsys):
    root = tmp_path / "corpus"
    good = in_format([make_doc(i) for i in range(20)], ".jsonl")
    write(root / "a.jsonl", '{"text": "x"\n' + good + "\xff\n{}\n")
    write(root / "b.txt", "\n\n")  # no document: skipped, counted
    write(root / "c.txt", in_format([make_doc(i) for i in range(20, 30)], ".txt"))
    directory, manifest = prepare_text(str(root), skip_bad_lines=True)
    assert manifest["bad_lines"] == 4 and manifest["documents"] == 30
    assert [(f["name"], f["bad_lines"], f["documents"]) for f in manifest["files"]] == [
        ("a.jsonl", 3, 20), ("b.txt", 1, 0), ("c.txt", 0, 10)]
    out = capsys.readouterr().out
    assert f"skipped 4 bad line(s) (--skip_bad_lines), the first: {root}/a.jsonl:1: not valid JSON" in out
    with pytest.raises(BadInput, match=r"a.jsonl:1: not valid JSON .* 4 bad line\(s\) in all"):
        prepare_text(str(root))  # the same preparation, without the flag: the first bad line, as the first time


def test_bad_input_from_the_command_line_exits_1_without_traceback(base, tmp_path):
    path = write(tmp_path / "x.jsonl", in_format([make_doc(1)], ".jsonl") + "{oops}\n")
    proc = subprocess.run([sys.executable, "-m", "scripts.base_train", f"--data={path}", *TINY, "--num_iterations=1"],
                          cwd=REPO, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, NANOCHAT_BASE_DIR=str(base)))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [f"error: {path}:2: not valid JSON (Expecting property name enclosed "
                                                f"in double quotes at column 2) (fix it, or pass --skip_bad_lines to "
                                                f"skip bad lines)"]


# -----------------------------------------------------------------------------
# Loader, tokenizer, base_train, base_loss, compare


def test_loader_resume_is_bit_exact_on_prepared_data(base, tmp_path):
    docs = [make_doc(i, n=3 + i % 9) for i in range(300)]
    directory, _ = prepare_text(write(tmp_path / "d.jsonl", in_format(docs, ".jsonl"), ".zst"), val_fraction=0.1)
    tok = RustBPETokenizer.train_from_iterator(docs, 300)

    def loader():
        return DataLoader(2, 8, "train", tokenizer=tok, rank=1, world_size=2, tokenizer_batch_size=3,
                          data_dir=directory)

    uninterrupted = loader()
    reference = [next(uninterrupted) for _ in range(121)]
    for k in (0, 7, 50, 110):  # 110: past the end of rank 1's first epoch
        a = loader()
        for _ in range(k):
            next(a)
        b = loader()
        b.load_state_dict(json.loads(json.dumps(a.state_dict())))
        for x, y in reference[k:k + 10]:
            bx, by = next(b)
            assert torch.equal(x, bx) and torch.equal(y, by)
    val = DataLoader(2, 8, "val", tokenizer=tok, rank=0, world_size=1, data_dir=directory)
    held = {d for d in docs if held_out_score(d) < 0.1}
    text = tok.decode([t for _ in range(20) for t in next(val)[1].flatten().tolist()])
    assert {w for w in text.split() if w.startswith("doc")} <= {d.split()[0] for d in held}


def test_tok_train_then_base_train_then_base_loss_on_own_text(base, tmp_path, capsys):
    path = write(tmp_path / "corpus" / "a.txt", in_format([make_doc(i) for i in range(200)], ".txt"))
    tok_train.main([f"--data={tmp_path / 'corpus'}", "--vocab_size=300"])
    assert trained_on()["path"] == str(tmp_path / "corpus")
    capsys.readouterr()
    base_train.main([f"--data={tmp_path / 'corpus'}", *TINY, "--num_iterations=2"])
    assert "note: the tokenizer" not in capsys.readouterr().out  # trained on this very data
    meta = read_meta(checkpoint_dir("base", "gpt_d1"), 2)
    record = meta["data"]
    assert record["path"] == str(tmp_path / "corpus") and record["documents"] == 200
    assert record["files"] == [{"name": "a.txt", "sha256": userfiles.content_key([("a.txt", path)], {})[1]["a.txt"],
                                "documents": 200, "val_documents": record["val_documents"], "bad_lines": 0}]
    report = (base / "report" / "base-model-training.md").read_text()
    assert f"- data: {tmp_path / 'corpus'}" in report and f"- data_hash: {record['key'][:16]}" in report
    assert "- data_files: a.txt (sha256 " in report and "200 documents" in report
    results = base_loss.main(["--model_tag=gpt_d1", "--device_batch_size=2", "--split_tokens=64"])
    assert f"data: the checkpoint's own, {record['dir']}" in capsys.readouterr().out
    loader = DataLoader(2, 32, "val", tokenizer=get_tokenizer(), rank=0, world_size=1, data_dir=record["dir"])
    from nanochat.checkpoint import load_model
    from nanochat.loss_eval import evaluate_bpb
    from nanochat.tokenizer import get_token_bytes
    model, _, _ = load_model("base", model_tag="gpt_d1")
    assert results["val_bpb"] == pytest.approx(evaluate_bpb(model, loader, 1, get_token_bytes()), rel=1e-6)


def test_base_train_trains_a_tokenizer_on_own_data_and_resumes_only_on_it(base, tmp_path, capsys):
    path = write(tmp_path / "a.md", in_format([make_doc(i) for i in range(200)], ".md"))
    base_train.main([f"--data={path}", *TINY, "--num_iterations=2", "--save_every=1"])
    out = capsys.readouterr().out
    assert "No tokenizer found: training a 4096-token BPE tokenizer on the training split of your data" in out
    assert trained_on() == {"path": path, "key": read_meta(checkpoint_dir("base", "gpt_d1"), 2)["data"]["key"]}
    with pytest.raises(SystemExit):
        run_cli(lambda: base_train.main([*TINY, "--num_iterations=3", "--resume"]))
    assert "--resume: this run started on --data=" in capsys.readouterr().err
    base_train.main([f"--data={path}", *TINY, "--num_iterations=3", "--resume"])
    assert find_last_step(checkpoint_dir("base", "gpt_d1")) == 3
    other = write(tmp_path / "b.txt", in_format([make_doc(i) for i in range(300, 320)], ".txt"))
    base_train.main([f"--data={other}", *TINY, "--num_iterations=1", "--model_tag=other"])
    assert f"note: the tokenizer was trained on {path}, not on this --data" in capsys.readouterr().out


@pytest.mark.slow
def test_compare_trains_both_types_on_own_text(tmp_path):
    """A relative --data given to compare from another directory reaches every run, and base_loss scores each run
    on that data's held-out split."""
    write(tmp_path / "texts" / "a.txt", in_format([make_doc(i) for i in range(300)], ".txt"))
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(tmp_path / "base"), OMP_NUM_THREADS="1",
               PYTHONPATH=REPO)
    proc = subprocess.run([sys.executable, "-m", "scripts.compare", "--model_types", "gpt", "alcoholic", "--depth", "1",
                           "--seeds", "1", "--num_iterations", "2", "--head_dim=32", "--max_seq_len=32",
                           "--device_batch_size=2", "--eval_tokens=64", "--loss_tokens=64", "--core_max_per_task=0",
                           "--data=texts"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for model_type in ("gpt", "alcoholic"):
        meta = read_meta(str(tmp_path / "base" / "base_checkpoints" / f"cmp_{model_type}_d1_s1"), 2)
        assert meta["data"]["path"] == str(tmp_path / "texts") and meta["data"]["documents"] == 300
        assert "val_bpb" in meta["metrics"] and "train_bpb" in meta["metrics"]
        log = (tmp_path / "base" / "report" / "compare_logs" / f"cmp_{model_type}_d1_s1.base_loss.log").read_text()
        assert f"data: the checkpoint's own, {meta['data']['dir']}" in log


def test_compare_gives_its_runs_absolute_data_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert absolute_data_paths(["--data=texts", "--max-seq-len=64", "--data", "b/c.txt"]) == [
        f"--data={tmp_path / 'texts'}", "--max_seq_len=64", "--data", str(tmp_path / "b" / "c.txt")]
