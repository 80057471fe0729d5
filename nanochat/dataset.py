"""
Pretraining data: parquet shards with one `text` column, one document per row (the layout of FineWeb-edu-100B
shuffled). Sorted by name, the last shard is the validation split and all others are the training split.

Three sources of shards:
- the user's own files (--data), prepared into $BASE/user_data/<content hash> by nanochat/userdata.py
- the real one: FineWeb-edu shards downloaded into $BASE/base_data with `python -m nanochat.dataset -n 240 -w 4`
- the embedded default corpus: public-domain books shipped in data/corpus/*.txt.gz (see data/SOURCES.md),
  turned into shards in $BASE/embedded_data on first use, so everything runs offline out of the box.
get_data_dir() prefers the real shards whenever any have been downloaded.
"""

import glob
import gzip
import hashlib
import json
import math
import os
import random
import sys
import time
from functools import partial
from multiprocessing.pool import ThreadPool

import pyarrow as pa
import pyarrow.parquet as pq

from nanochat.fileio import (
    DownloadError,
    FileError,
    atomic_write_bytes,
    download_file,
    get_base_dir,
    open_regular,
    read_json,
)
from nanochat.log import UserError, one_line, print0, progress

SPLITS = ("train", "val")

# -----------------------------------------------------------------------------
# The embedded corpus: data/corpus/*.txt.gz, documents separated by a line that is exactly DOC_SEPARATOR
# (written by dev/build_corpus.py).

CORPUS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "corpus")
DOC_SEPARATOR = "<|doc|>"
SHUFFLE_SEED = 42  # fixed: the same corpus always gives the same shards, and every shard mixes all sources
VAL_FRACTION = 0.04  # ~4% of documents, held out as the last shard
NUM_TRAIN_SHARDS = 4
# Rank r of w reads row groups r, r+w, ... of every shard, so a shard needs at least w row groups for every rank
# to get data. The corpus is small (~900 documents per shard), so instead of a fixed number of documents per row
# group (FineWeb uses ~1000) each shard is cut into 16 row groups: up to 16 ranks all read from every shard.
ROW_GROUPS_PER_SHARD = 16
COMPLETE_MARKER = "COMPLETE.json"  # written last: shards without it are an unfinished build


def read_embedded_corpus(corpus_dir=CORPUS_DIR):
    """All documents of the embedded corpus, in a fixed order (files sorted by name)."""
    paths = sorted(glob.glob(os.path.join(corpus_dir, "*.txt.gz")))
    if not paths:
        raise FileNotFoundError(f"no *.txt.gz files in {corpus_dir}: the embedded corpus ships with the repository "
                                f"(regenerate it with `python -m dev.build_corpus --src DIR`)")
    docs = []
    for path in paths:
        with open_regular(path) as raw, gzip.open(raw, "rt", encoding="utf-8") as f:
            docs += [d.strip("\n") for d in f.read().split(f"\n{DOC_SEPARATOR}\n")]
    return [d for d in docs if d]


def corpus_fingerprint(corpus_dir=CORPUS_DIR):
    """Hash of the corpus files and the shard layout: shards built from anything else are rebuilt."""
    h = hashlib.sha256(f"{SHUFFLE_SEED} {VAL_FRACTION} {NUM_TRAIN_SHARDS} {ROW_GROUPS_PER_SHARD}".encode())
    for path in sorted(glob.glob(os.path.join(corpus_dir, "*.txt.gz"))):
        with open_regular(path) as f:
            h.update(os.path.basename(path).encode() + f.read())
    return h.hexdigest()


def embedded_shards_complete(out_dir, fingerprint):
    try:
        marker = read_json(os.path.join(out_dir, COMPLETE_MARKER))
    except FileError:  # missing or damaged: the shards are built again
        return False
    if not isinstance(marker, dict) or not isinstance(marker.get("files"), list):
        return False
    files = marker["files"]
    return marker.get("fingerprint") == fingerprint and all(
        isinstance(f, str) and os.path.isfile(os.path.join(out_dir, os.path.basename(f))) for f in files)


def write_shard(path, docs):
    """One parquet shard, written to a temp file and renamed, so readers never see half a shard."""
    table = pa.table({"text": pa.array(docs, type=pa.string())})
    tmp = f"{path}.tmp.{os.getpid()}"
    pq.write_table(table, tmp, row_group_size=math.ceil(len(docs) / ROW_GROUPS_PER_SHARD), compression="zstd")
    os.replace(tmp, path)


def build_embedded_shards(out_dir=None, force=False):
    """Build $BASE/embedded_data/shard_*.parquet from the embedded corpus (a no-op when already built).
    Safe when several processes (DDP ranks) call it at once: they write identical files, each atomically."""
    out_dir = out_dir or os.path.join(get_base_dir(), "embedded_data")
    fingerprint = corpus_fingerprint()
    if not force and embedded_shards_complete(out_dir, fingerprint):
        return out_dir
    t0 = time.time()
    os.makedirs(out_dir, exist_ok=True)
    marker_path = os.path.join(out_dir, COMPLETE_MARKER)
    if os.path.exists(marker_path):
        os.remove(marker_path)
    docs = read_embedded_corpus()
    random.Random(SHUFFLE_SEED).shuffle(docs)
    n_val = max(1, round(len(docs) * VAL_FRACTION))
    train, val = docs[:-n_val], docs[-n_val:]
    shards = [train[i::NUM_TRAIN_SHARDS] for i in range(NUM_TRAIN_SHARDS)] + [val]  # the last shard is val
    names = [f"shard_{i:05d}.parquet" for i in range(len(shards))]
    for stale in set(os.listdir(out_dir)) - set(names):  # e.g. shards of an older, larger layout
        if stale.endswith(".parquet"):
            os.remove(os.path.join(out_dir, stale))
    for name, shard in zip(names, shards):  # well under a second: no progress bar
        write_shard(os.path.join(out_dir, name), shard)
    marker = {"fingerprint": fingerprint, "files": names, "num_docs": len(docs), "num_val_docs": n_val}
    atomic_write_bytes(marker_path, json.dumps(marker, indent=2).encode())
    print0(f"Built {len(names)} embedded shards ({len(train)} train + {n_val} val documents) in {out_dir} "
           f"in {time.time() - t0:.1f}s")
    return out_dir


# -----------------------------------------------------------------------------
# Finding and reading shards


def get_data_dir():
    """$BASE/base_data when it holds downloaded shards, else $BASE/embedded_data (built on first use)."""
    base_data = os.path.join(get_base_dir(), "base_data")
    if list_parquet_files(base_data):
        return base_data
    return build_embedded_shards()


def list_parquet_files(data_dir=None):
    """Sorted full paths of the *.parquet files in data_dir (in-progress *.tmp downloads are not listed)."""
    data_dir = data_dir or get_data_dir()
    if not os.path.isdir(data_dir):
        return []
    return sorted(os.path.join(data_dir, f) for f in os.listdir(data_dir) if f.endswith(".parquet"))


class DataError(UserError):
    """Training data that cannot be used; the message names the shards, what is wrong with them and what to do."""


class MissingShardsError(DataError, FileNotFoundError):
    """Fewer than two shards: no training split and validation split."""


def split_files(split, data_dir=None):
    """The shards of a split in data_dir (default: get_data_dir()): the last shard by name is the validation split,
    all others the training split.
    Broken shards stay in these lists (and so keep their indices, which resume positions refer to): they are
    skipped while reading, so a broken last shard never turns a training shard into validation data."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is not one of {SPLITS}")
    data_dir = data_dir or get_data_dir()
    files = list_parquet_files(data_dir)
    if len(files) < 2:
        raise MissingShardsError(
            f"found {len(files)} parquet shard(s) in {data_dir}, need at least 2 (the last one is the validation "
            f"split): download more with `python -m nanochat.dataset -n 2`, or empty {data_dir} to use the "
            f"embedded corpus")
    return files[:-1] if split == "train" else files[-1:]


_warned = set()  # (path, what): each broken shard is reported once per process, not once per epoch


def _warn_once(path, what, message):
    if (path, what) not in _warned:
        _warned.add((path, what))
        print0(message)


def open_shard(path):
    """(ParquetFile, None) for a usable shard; (None, reason) for one to skip: not a regular file (a FIFO or a device
    would hang or never end), unreadable (0 bytes, not parquet, cut short), without a string `text` column, or
    without rows."""
    try:
        f = open_regular(path)
    except FileError as e:
        return None, str(e).replace(f"{path} is ", "").replace(f"{path}", "the file")
    try:
        pf = pq.ParquetFile(f)  # reads through the file object, opened non-blocking and checked above
    except (OSError, pa.ArrowException) as e:
        f.close()
        return None, f"not a readable parquet file ({one_line(e)})"
    schema = pf.schema_arrow
    i = schema.get_field_index("text")  # -1 when missing (or ambiguous)
    if i < 0:
        return None, f"no 'text' column (columns: {', '.join(schema.names) or 'none'})"
    if not (pa.types.is_string(schema.field(i).type) or pa.types.is_large_string(schema.field(i).type)):
        return None, f"column 'text' has type {schema.field(i).type}, expected string"
    if pf.metadata.num_rows == 0:
        return None, "no rows"
    return pf, None


def read_row_group_docs(pf, path, rg_idx):
    """The non-null texts of one row group; [] (with a warning) when it cannot be read or has no text."""
    try:
        texts = pf.read_row_group(rg_idx, columns=["text"]).column("text").to_pylist()
    except (OSError, pa.ArrowException) as e:
        _warn_once(path, f"rg{rg_idx}", f"skipping row group {rg_idx} of {path}: unreadable ({one_line(e)})")
        return []
    docs = [t for t in texts if t is not None]
    if len(docs) < len(texts):
        _warn_once(path, "null", f"{path}: skipping null texts (e.g. {len(texts) - len(docs)} of {len(texts)} in "
                                 f"row group {rg_idx})")
    return docs


def iter_row_groups(split, start=0, step=1, resume=None, data_dir=None):
    """One pass over a split, yielding (docs, (shard_idx, rg_idx)) per row group.
    Rank r of w passes start=r, step=w: inside every shard it reads row groups r, r+w, r+2w, ...
    resume=(shard_idx, rg_idx), the position of the last row group consumed, continues just after it.
    data_dir: the shards to read (default: get_data_dir(); the user's own with --data).
    Unusable shards and row groups without text are skipped with a warning; a whole pass without any usable row
    group is a DataError (a loader looping over epochs would otherwise spin forever)."""
    if step < 1 or not 0 <= start < step:
        raise ValueError(f"need step >= 1 and 0 <= start < step, got start={start}, step={step}")
    files = split_files(split, data_dir)
    resume = tuple(resume) if resume is not None else None  # may come back from JSON as a list
    yielded, skipped, textless = False, [], set()
    for shard_idx, path in enumerate(files):
        if resume is not None and shard_idx < resume[0]:
            continue
        pf, reason = open_shard(path)
        if pf is None:
            skipped.append(f"{os.path.basename(path)} ({reason})")
            _warn_once(path, "shard", f"skipping shard {path}: {reason}")
            continue
        for rg_idx in range(start, pf.num_row_groups, step):
            if resume is not None and (shard_idx, rg_idx) <= resume:
                continue
            docs = read_row_group_docs(pf, path, rg_idx)
            if docs:
                yielded = True
                yield docs, (shard_idx, rg_idx)
            else:
                textless.add(os.path.basename(path))
    if not yielded and resume is None:
        raise DataError(_nothing_usable_message(split, files, skipped, sorted(textless), start, step))


def _nothing_usable_message(split, files, skipped, textless, start, step):
    where = f"rank {start} of {step} got" if step > 1 else "found"
    msg = f"{where} no usable text in the {split!r} split ({len(files)} shard(s) in {os.path.dirname(files[0])})"
    if skipped:
        msg += f"; skipped {len(skipped)}: {'; '.join(skipped[:3])}{' ...' if len(skipped) > 3 else ''}"
    if textless:
        msg += f"; only null texts or unreadable row groups in {', '.join(textless[:3])}"
    if split == "val":
        msg += (". The validation split is the last shard by name: re-download it (delete it, then run "
                "`python -m nanochat.dataset -n N` again) or delete it to make the shard before it the validation "
                "split")
    else:
        msg += ". Re-download or delete the broken shards (`python -m nanochat.dataset -n N` fetches missing ones)"
    if step > 1 and len(skipped) < len(files):
        msg += f", or use fewer than {step} ranks (each rank reads every {step}-th row group of a shard)"
    return msg


def parquets_iter_batched(split, start=0, step=1, data_dir=None):
    """One pass over a split, yielding the documents (list[str]) of one row group at a time."""
    for docs, _ in iter_row_groups(split, start=start, step=step, data_dir=data_dir):
        yield docs


# -----------------------------------------------------------------------------
# Downloading FineWeb-edu-100B shards (~100MB each)

BASE_URL = "https://huggingface.co/datasets/karpathy/fineweb-edu-100b-shuffle/resolve/main"
MAX_SHARD = 1822  # shards 0..1822 exist
CHUNK_BYTES = 1 << 20


def shard_filename(index):
    return f"shard_{index:05d}.parquet"


def validate_parquet(path):
    """Raise if the file is not a complete parquet file (a cut download loses the footer at the end)."""
    with open_regular(path) as f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(4)
        f.seek(max(0, size - 4))
        tail = f.read(4)
        if size < 12 or head != b"PAR1" or tail != b"PAR1":
            raise ValueError(f"{os.path.basename(path)} is not a complete parquet file ({size} bytes)")
        return pq.ParquetFile(f).metadata.num_rows  # parses the footer


def download_shard(index, data_dir, base_url=BASE_URL, attempts=5, backoff=2.0, timeout=30):
    """Download one shard (skipped if present) with fileio.download_file: validated, then renamed into place, with
    up to `attempts` requests and exponential backoff between them. Returns True on success."""
    filename = shard_filename(index)
    path = os.path.join(data_dir, filename)
    if os.path.exists(path):  # only ever created by the rename in download_file, after validation
        return True
    url = f"{base_url.rstrip('/')}/{filename}"
    try:
        download_file(url, path, retries=attempts, backoff=backoff, timeout=timeout, validate=validate_parquet,
                      name=filename, chunk_bytes=CHUNK_BYTES)
    except DownloadError as e:
        why = f": {e}" if e.permanent else f" after {e.attempts} attempts: {e.reason}"
        print0(f"Failed {filename}{why}")
        return False
    return True


def download_shards(num_files=-1, num_workers=4, data_dir=None, base_url=None, attempts=5, backoff=2.0):
    """Download shards 0..num_files-1 (all when num_files=-1) into $BASE/base_data. Returns the failed indices."""
    data_dir = data_dir or os.path.join(get_base_dir(), "base_data")
    base_url = base_url or os.environ.get("NANOCHAT_DATA_URL") or BASE_URL
    num_shards = MAX_SHARD + 1 if num_files == -1 else min(num_files, MAX_SHARD + 1)
    os.makedirs(data_dir, exist_ok=True)
    print0(f"Downloading {num_shards} shards with {num_workers} workers from {base_url} to {data_dir}")
    fn = partial(download_shard, data_dir=data_dir, base_url=base_url, attempts=attempts, backoff=backoff)
    with ThreadPool(num_workers) as pool:  # downloads wait on the network, so threads are enough
        done = pool.imap_unordered(lambda i: (i, fn(i)), range(num_shards))  # unordered: the bar moves as they end
        ok = dict(progress(done, desc="shards", total=num_shards, unit="shard"))
    failed = sorted(i for i, good in ok.items() if not good)
    print0(f"Done: {num_shards - len(failed)}/{num_shards} shards in {data_dir}"
           + (f"; failed: {failed} (run the command again to retry)" if failed else ""))
    return failed


def main(argv=None):
    """python -m nanochat.dataset -n 240 -w 4: download FineWeb-edu-100B shuffled parquet shards (the last shard
    downloaded is used as the validation split)."""
    from nanochat.cli import parse
    from nanochat.config import DownloadConfig

    args = parse(DownloadConfig, argv, prog="nanochat.dataset", description=main.__doc__)
    failed = download_shards(args.num_files, args.num_workers, base_url=args.base_url, attempts=args.attempts,
                             backoff=args.backoff)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    from nanochat.cli import run_cli

    run_cli(main)
