"""Parquet shards: the embedded corpus build, split/rank iteration with resume, and the resilient downloader."""

import collections
import glob
import gzip
import hashlib
import io
import json
import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nanochat import dataset
from nanochat.dataset import (
    build_embedded_shards,
    download_shards,
    get_data_dir,
    iter_row_groups,
    list_parquet_files,
    parquets_iter_batched,
    shard_filename,
)


@pytest.fixture
def base_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "base"))
    monkeypatch.delenv("NANOCHAT_DATA_URL", raising=False)
    return tmp_path / "base"


DOC_SEP = dataset.DOC_SEPARATOR


def read_texts(path):
    return pq.read_table(path).column("text").to_pylist()


# -----------------------------------------------------------------------------
# Embedded corpus


def test_embedded_shards_layout(base_dir):
    out = build_embedded_shards()
    assert out == str(base_dir / "embedded_data")
    files = list_parquet_files(out)
    assert [os.path.basename(f) for f in files] == [f"shard_{i:05d}.parquet" for i in range(5)]
    for f in files:
        pf = pq.ParquetFile(f)
        assert pf.schema_arrow.names == ["text"] and pf.schema_arrow.field("text").type == pa.string()
        assert pf.metadata.row_group(0).column(0).compression == "ZSTD"
        assert pf.num_row_groups >= 8  # every one of up to 8 ranks gets row groups from every shard
    train = [d for f in files[:-1] for d in read_texts(f)]
    val = read_texts(files[-1])
    corpus = dataset.read_embedded_corpus()
    assert len(corpus) > 3000
    assert sorted(train + val) == sorted(corpus)  # nothing lost, nothing duplicated
    assert not set(train) & set(val)
    assert 0.03 <= len(val) / len(corpus) <= 0.05
    assert all(d.strip() and DOC_SEP not in d for d in corpus)
    marker = json.loads((base_dir / "embedded_data" / dataset.COMPLETE_MARKER).read_text())
    assert marker["num_docs"] == len(corpus) and marker["num_val_docs"] == len(val)


def test_every_shard_mixes_all_sources(base_dir):
    sources = {}
    for path in sorted(glob.glob(os.path.join(dataset.CORPUS_DIR, "*.txt.gz"))):
        with gzip.open(path, "rt", encoding="utf-8") as f:
            for d in f.read().split(f"\n{DOC_SEP}\n"):
                sources[d.strip("\n")] = os.path.basename(path)
    assert set(sources.values()) == {"austen.txt.gz", "kjv.txt.gz", "shakespeare.txt.gz"}
    for f in list_parquet_files(build_embedded_shards()):
        assert {sources[d] for d in read_texts(f)} == set(sources.values()), f


def test_embedded_build_is_deterministic_and_idempotent(base_dir, tmp_path):
    out = build_embedded_shards()
    files = list_parquet_files(out)
    mtimes = [os.stat(f).st_mtime_ns for f in files]
    assert build_embedded_shards() == out
    assert [os.stat(f).st_mtime_ns for f in files] == mtimes  # complete: nothing rewritten
    other = build_embedded_shards(out_dir=str(tmp_path / "other"))
    assert [read_texts(f) for f in list_parquet_files(other)] == [read_texts(f) for f in files]


def test_unfinished_build_is_redone(base_dir):
    out = build_embedded_shards()
    files = list_parquet_files(out)
    os.remove(files[2])  # an interrupted build: a shard missing ...
    open(os.path.join(out, "shard_00099.parquet"), "wb").close()  # ... and a stale shard from another layout
    os.remove(os.path.join(out, dataset.COMPLETE_MARKER))
    assert build_embedded_shards() == out
    assert list_parquet_files(out) == files
    assert len(read_texts(files[2])) > 0
    mtime = os.stat(files[0]).st_mtime_ns
    build_embedded_shards(force=True)
    assert os.stat(files[0]).st_mtime_ns != mtime


def test_get_data_dir_prefers_downloaded_shards(base_dir):
    assert get_data_dir() == str(base_dir / "embedded_data")
    base_data = base_dir / "base_data"
    base_data.mkdir()
    (base_data / "shard_00000.parquet.tmp").write_bytes(b"partial")  # an unfinished download is not a shard
    assert get_data_dir() == str(base_dir / "embedded_data")
    for i in range(2):
        pq.write_table(pa.table({"text": [f"doc {i}"]}), base_data / shard_filename(i))
    assert get_data_dir() == str(base_data)
    assert list(parquets_iter_batched("train")) == [["doc 0"]]
    assert list(parquets_iter_batched("val")) == [["doc 1"]]  # the last downloaded shard is val


def test_split_errors(base_dir):
    with pytest.raises(ValueError, match=r"split='test' is not one of \('train', 'val'\)"):
        next(iter_row_groups("test"))
    with pytest.raises(ValueError, match="0 <= start < step, got start=2, step=2"):
        next(iter_row_groups("train", start=2, step=2))
    (base_dir / "base_data").mkdir(parents=True)
    pq.write_table(pa.table({"text": ["only"]}), base_dir / "base_data" / shard_filename(0))
    with pytest.raises(FileNotFoundError, match=r"found 1 parquet shard\(s\) in .*base_data, need at least 2"):
        next(parquets_iter_batched("train"))


# -----------------------------------------------------------------------------
# Iteration across ranks, and resume


def test_ranks_get_disjoint_and_complete_row_groups(base_dir):
    for split in ("train", "val"):
        full = list(iter_row_groups(split))
        ranks = [list(iter_row_groups(split, start=r, step=2)) for r in range(2)]
        positions = [[pos for _, pos in rank] for rank in ranks]
        assert not set(positions[0]) & set(positions[1])
        assert sorted(positions[0] + positions[1]) == [pos for _, pos in full]
        assert all(rg % 2 == r for r in range(2) for _, rg in positions[r])
        by_pos = {pos: docs for docs, pos in full}
        assert all(docs == by_pos[pos] for rank in ranks for docs, pos in rank)
        assert all(len(rank) > 0 for rank in ranks)
    assert {shard for _, (shard, _) in iter_row_groups("val")} == {0}  # the val split is one shard


def test_resume_continues_just_after_the_given_row_group(base_dir):
    full = list(iter_row_groups("train", start=1, step=2))
    assert len({shard for _, (shard, _) in full}) == dataset.NUM_TRAIN_SHARDS
    for k in [0, 5, 7, 8, len(full) - 2, len(full) - 1]:  # including across a shard boundary (8 per shard)
        resumed = list(iter_row_groups("train", start=1, step=2, resume=list(full[k][1])))  # JSON gives a list
        assert [pos for _, pos in resumed] == [pos for _, pos in full[k + 1 :]]
        assert [docs for docs, _ in resumed[:1]] == [docs for docs, _ in full[k + 1 : k + 2]]


# -----------------------------------------------------------------------------
# Downloader, against a local HTTP server


def parquet_bytes(index, rows=400):
    buf = io.BytesIO()
    texts = [f"shard {index} document {i} " + "lorem ipsum " * (i % 7) for i in range(rows)]
    pq.write_table(pa.table({"text": texts}), buf, row_group_size=100)
    return buf.getvalue()


class ShardServer:
    """Serves shard_XXXXX.parquet files; `behaviour(name, attempt)` picks the response for each request:
    "ok", "500", "404", "408", "429", "short" (fewer bytes than the Content-Length), "cut" (a cut file, consistent
    length) or "slow" (headers only after 1 s)."""

    def __init__(self, num_shards):
        self.files = {shard_filename(i): parquet_bytes(i) for i in range(num_shards)}
        self.behaviour = lambda name, attempt: "ok"
        self.requests = collections.Counter()
        lock, server = threading.Lock(), self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                name = self.path.rsplit("/", 1)[-1]
                with lock:
                    server.requests[name] += 1
                    attempt = server.requests[name]
                action = server.behaviour(name, attempt) if name in server.files else "404"
                if action in ("500", "404", "408", "429"):
                    self.send_error(int(action))
                    return
                if action == "slow":
                    time.sleep(1.0)
                data = server.files[name]
                body = data[: len(data) // 2] if action in ("short", "cut") else data
                self.send_response(200)
                self.send_header("Content-Length", str(len(data) if action == "short" else len(body)))
                self.end_headers()
                self.wfile.write(body)
                self.close_connection = True

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/data"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.01,), daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = ShardServer(num_shards=3)
    yield s
    s.close()


def download(server, **kwargs):
    kwargs = {"num_files": 3, "num_workers": 2, "base_url": server.url, "backoff": 0.001, **kwargs}
    return download_shards(**kwargs)


def assert_downloaded(base_dir, server, n=3):
    base_data = base_dir / "base_data"
    assert sorted(os.listdir(base_data)) == [shard_filename(i) for i in range(n)]  # and no *.tmp left over
    for i in range(n):
        assert (base_data / shard_filename(i)).read_bytes() == server.files[shard_filename(i)]


def test_download(base_dir, server):
    assert download(server) == []
    assert_downloaded(base_dir, server)
    assert server.requests == {shard_filename(i): 1 for i in range(3)}
    assert get_data_dir() == str(base_dir / "base_data")
    assert next(parquets_iter_batched("val"))[0].startswith("shard 2 document 0")


def test_download_retries_server_errors(base_dir, server):
    server.behaviour = lambda name, attempt: "500" if attempt <= 2 else "ok"
    assert download(server) == []
    assert_downloaded(base_dir, server)
    assert server.requests == {shard_filename(i): 3 for i in range(3)}


@pytest.mark.parametrize("truncation", ["short", "cut"])
def test_download_detects_truncation_and_retries(base_dir, server, truncation):
    server.behaviour = lambda name, attempt: truncation if attempt == 1 else "ok"
    assert download(server) == []
    assert_downloaded(base_dir, server)
    assert server.requests == {shard_filename(i): 2 for i in range(3)}


def test_download_gives_up(base_dir, server, capsys):
    server.behaviour = lambda name, attempt: "500" if name == shard_filename(1) else "ok"
    assert download(server, attempts=3) == [1]
    assert server.requests[shard_filename(1)] == 3
    assert sorted(os.listdir(base_dir / "base_data")) == [shard_filename(0), shard_filename(2)]
    assert f"Failed {shard_filename(1)} after 3 attempts" in capsys.readouterr().out
    server.behaviour = lambda name, attempt: "ok"
    assert download(server, num_files=4) == [3]  # 404 (shard_00003 does not exist): not retried
    assert server.requests[shard_filename(3)] == 1
    assert server.requests[shard_filename(1)] == 4 and server.requests[shard_filename(0)] == 1


def test_download_skips_present_shards_and_resumes(base_dir, server):
    base_data = base_dir / "base_data"
    base_data.mkdir(parents=True)
    (base_data / shard_filename(0)).write_bytes(server.files[shard_filename(0)])
    (base_data / (shard_filename(1) + ".tmp")).write_bytes(b"PAR1 partial download from a killed run")
    assert download(server) == []
    assert_downloaded(base_dir, server)
    assert server.requests == {shard_filename(1): 1, shard_filename(2): 1}  # shard 0 was never asked for


def test_cli(base_dir, server, monkeypatch):
    monkeypatch.setenv("NANOCHAT_DATA_URL", server.url)
    with pytest.raises(SystemExit) as e:
        dataset.main(["--", "-n", "2", "-w", "2", "--backoff=0"])
    assert e.value.code == 0
    assert_downloaded(base_dir, server, n=2)
    server.behaviour = lambda name, attempt: "500"
    monkeypatch.setenv("NANOCHAT_DATA_URL", "http://127.0.0.1:9/unused")  # --base-url wins over the env var
    with pytest.raises(SystemExit) as e:
        dataset.main(["--num-files", "3", "--base-url", server.url, "--attempts", "2", "--backoff", "0"])
    assert e.value.code == 1
    assert server.requests[shard_filename(2)] == 2


# -----------------------------------------------------------------------------
# fileio.download_file, the one download helper (shards here, the CORE bundle in core_eval)


def test_download_file_checksum(tmp_path, server):
    from nanochat.fileio import ChecksumError, download_file

    name = shard_filename(0)
    url, path = f"{server.url}/{name}", tmp_path / name
    with pytest.raises(ChecksumError, match="does not match the expected 0000") as e:
        download_file(url, str(path), retries=3, backoff=0, expected_sha256="0" * 64)
    assert "\n" not in str(e.value) and isinstance(e.value, ValueError)
    assert server.requests[name] == 1  # the wrong file is not fetched again
    assert os.listdir(tmp_path) == []  # nothing installed, no temp file left
    good = hashlib.sha256(server.files[name]).hexdigest()
    assert download_file(url, str(path), expected_sha256=good.upper(), validate=dataset.validate_parquet) == str(path)
    assert path.read_bytes() == server.files[name] and os.listdir(tmp_path) == [name]


@pytest.mark.parametrize("first", ["408", "429", "slow"])
def test_download_file_retries_timeouts_and_rate_limits(tmp_path, server, first):
    from nanochat.fileio import download_file

    name = shard_filename(0)
    server.behaviour = lambda name, attempt: first if attempt == 1 else "ok"
    download_file(f"{server.url}/{name}", str(tmp_path / name), retries=2, backoff=0, timeout=0.3)
    assert (tmp_path / name).read_bytes() == server.files[name] and server.requests[name] == 2


def test_download_file_removes_temp_files_of_dead_downloads(tmp_path, server):
    from nanochat.fileio import download_file

    proc = subprocess.Popen([sys.executable, "-c", ""])
    proc.wait()  # a process id that no longer runs: its temp file is a leftover
    name = shard_filename(1)
    (tmp_path / f"{name}.tmp.{proc.pid}").write_bytes(b"PAR1 cut")
    (tmp_path / f"{name}.tmp.{os.getppid()}").write_bytes(b"a live download")  # kept
    download_file(f"{server.url}/{name}", str(tmp_path / name), validate=dataset.validate_parquet)
    assert sorted(os.listdir(tmp_path)) == sorted([name, f"{name}.tmp.{os.getppid()}"])
