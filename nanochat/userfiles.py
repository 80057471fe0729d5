"""
The files a user brings with --data: finding them, reading them as lines of UTF-8 text whatever their compression,
the content hash that keys their preparation, the held-out split, and one-line errors for bad input.

- Found: PATH is a file, or a directory searched recursively; files whose names end with a known suffix, optionally
  followed by .gz or .zst, are read in sorted order (other files in a directory are listed once and left alone).
- Read as a stream: lines of at most MAX_LINE_BYTES at a time, never a whole file in memory; a byte that is not
  UTF-8 is an error naming the file, the line and the column.
- Bad input: "FILE:LINE: what is wrong", raised as a DataError (one line, exit status 1), or with --skip_bad_lines
  skipped and counted.
- Prepared once: the key is sha256 over the preparation settings and every file's name and bytes (hashed as a
  stream). The result lives in $NANOCHAT_BASE_DIR/<kind>/<key>/ with its manifest, COMPLETE.json, written last, and
  is renamed into place from a staging directory: an unchanged file is reused, one changed byte gives a new key and
  a new preparation, and a killed preparation leaves nothing that looks complete.
- Held out: a document (or conversation) is in the validation split when the sha256 of its text, read as a number in
  [0, 1), is below --val_fraction. The split does not depend on the order of the files or on any seed, and copies of
  one document always land in the same split. Neither split is ever empty: when no document falls under the
  fraction, the one with the lowest score is held out; when all do, the one with the highest score is kept for
  training.
"""

import gzip
import hashlib
import json
import math
import os
import re
import shutil
import tempfile
import time
import zlib

import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from nanochat.dataset import DataError
from nanochat.fileio import FileError, atomic_write_bytes, get_base_dir, open_regular, pid_alive, read_json
from nanochat.log import one_line, print0, progress

COMPRESSIONS = (".gz", ".zst")
MANIFEST = "COMPLETE.json"
CHUNK_BYTES = 1 << 20
MAX_LINE_BYTES = 1 << 24  # 16 MiB: a longer line comes in pieces (text) or is a bad line (JSON)
ROW_GROUPS_PER_SHARD = 16  # as the embedded shards: up to 16 ranks all read from every shard
PROGRESS_BYTES = 8 << 20  # a bar (with its ETA) for inputs of at least 8 MiB; smaller ones take well under a second
SKIP_HINT = "fix it, or pass --skip_bad_lines to skip bad lines"


class BadInput(DataError):
    """Input the user must fix; the message is "FILE:LINE: what is wrong" (or "FILE: what is wrong")."""


def split_name(name):
    """'a/b.jsonl.gz' -> ('.jsonl', '.gz'); ('.txt', '') for 'x.txt'."""
    lower = name.lower()
    compression = next((c for c in COMPRESSIONS if lower.endswith(c)), "")
    stem = lower[:len(lower) - len(compression)]
    return os.path.splitext(stem)[1], compression


def find_files(path, suffixes):
    """[(name, full path)] of the data under PATH, sorted by name (relative to PATH; the file name for a file)."""
    if not os.path.exists(path):
        raise BadInput(f"{path}: no such file or directory (--data takes a file or a directory)")
    accepted = ", ".join(f"{s}[.gz|.zst]" for s in suffixes)
    if os.path.isfile(path):
        if split_name(path)[0] not in suffixes:
            raise BadInput(f"{path}: not a data file this command reads (accepted: {accepted})")
        return [(os.path.basename(path), path)]
    found, ignored = [], []
    for root, dirs, names in os.walk(path):  # hidden files and directories (.git, .DS_Store) are not data
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in (n for n in names if not n.startswith(".")):
            full = os.path.join(root, name)
            (found if split_name(name)[0] in suffixes else ignored).append((os.path.relpath(full, path), full))
    if not found:
        raise BadInput(f"{path}: no data files in this directory (accepted: {accepted}; found {len(ignored)} others)")
    if ignored:
        shown = ", ".join(sorted(name for name, _ in ignored)[:3])
        print0(f"{path}: ignoring {len(ignored)} file(s) of other types ({shown}{' ...' if len(ignored) > 3 else ''})")
    return sorted(found)


# -----------------------------------------------------------------------------
# Reading


def open_raw(path):
    """(the decompressed byte stream, the file underneath: its position is the progress)."""
    raw = open_regular(path, "rb", error=BadInput)
    compression = split_name(path)[1]
    if compression == ".gz":
        return gzip.GzipFile(fileobj=raw, mode="rb"), raw
    if compression == ".zst":  # pyarrow's zstd stream: truncated or corrupt input is an error, not a short read
        return pa.CompressedInputStream(raw, "zstd"), raw
    return raw, raw


def byte_chunks(path, name, on_progress=None):
    """The decompressed bytes of a file, CHUNK_BYTES at a time; a file that cannot be read is one BadInput."""
    stream, raw = open_raw(path)
    seen = 0
    try:
        while True:
            try:
                chunk = stream.read(CHUNK_BYTES)
            except (OSError, EOFError, zlib.error, pa.ArrowException) as e:
                raise BadInput(f"{name}: cannot be read ({one_line(e)}): a cut or damaged "
                               f"{split_name(path)[1] or 'file'}?") from None
            if on_progress is not None:
                now = raw.tell()
                on_progress(now - seen)
                seen = now
            if not chunk:
                return
            yield chunk
    finally:
        stream.close()
        raw.close()


def byte_lines(path, name, on_progress=None):
    """(line number, bytes without the line end, complete) for each line; a line longer than MAX_LINE_BYTES comes in
    pieces (complete=False for all but its last piece)."""
    lineno, rest = 1, b""
    for chunk in byte_chunks(path, name, on_progress):
        rest += chunk
        start = 0
        while True:
            end = rest.find(b"\n", start)
            if end < 0:
                break
            yield lineno, rest[start:end], True
            lineno, start = lineno + 1, end + 1
        rest = rest[start:]
        while len(rest) > MAX_LINE_BYTES:
            cut = MAX_LINE_BYTES
            while cut > 0 and rest[cut] & 0xC0 == 0x80:  # never inside a UTF-8 character
                cut -= 1
            yield lineno, rest[:cut], False
            rest = rest[cut:]
    if rest:
        yield lineno, rest, True


def loads_json(line, lineno, bad):
    """(True, json.loads(line)), or (False, None) after reporting a bad line."""
    try:
        return True, json.loads(line)
    except json.JSONDecodeError as e:
        bad(lineno, f"not valid JSON ({e.msg} at column {e.colno})")
    except RecursionError:
        bad(lineno, "JSON nested too deeply")
    return False, None


def not_text(s):
    """Why a str from JSON is not text, or None: a lone surrogate ("\\ud800" is valid JSON, but no character)."""
    try:
        s.encode("utf-8")
    except UnicodeEncodeError as e:
        return f"a lone surrogate {e.object[e.start:e.end]!r}: an escape that is not a character"
    return None


def text_lines(path, name, bad, whole=False, on_progress=None):
    """(line number, str) for each line of a file (line ends and a trailing \\r removed). A line that is not UTF-8 is
    a bad line; with whole=True (JSON lines) so is a line longer than MAX_LINE_BYTES, otherwise it comes in pieces."""
    long_line = None
    for lineno, data, complete in byte_lines(path, name, on_progress):
        if long_line == lineno:
            continue  # the rest of a line already reported
        if whole and not complete:
            long_line = lineno
            bad(lineno, f"longer than {MAX_LINE_BYTES >> 20} MiB")
            continue
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            bad(lineno, f"not UTF-8 (byte 0x{data[e.start]:02x} at column {e.start + 1}); save the file as UTF-8")
            continue
        if lineno == 1 and text.startswith("\ufeff"):  # the byte order mark some editors put first
            text = text[1:]
        yield lineno, text[:-1] if text.endswith("\r") else text


class BadLines:
    """What happens to a bad line: a BadInput (the default), or, with skip=True, it is skipped and counted."""

    def __init__(self, name, skip):
        self.name, self.skip, self.count, self.first = name, skip, 0, None

    def __call__(self, where, what):
        message = f"{self.name}:{where}: {what}"
        if not self.skip:
            raise BadInput(f"{message} ({SKIP_HINT})")
        self.count += 1
        self.first = self.first or message


# -----------------------------------------------------------------------------
# Content hash, held-out split


def byte_progress(desc, total):
    """A progress bar over `total` bytes, silent below PROGRESS_BYTES."""
    return progress(desc=desc, total=total, unit="B", unit_scale=True) if total >= PROGRESS_BYTES else tqdm(
        disable=True)


def content_key(files, settings):
    """(key, {name: sha256 of its bytes}): the key covers the settings and every file's name and bytes."""
    total = sum(os.path.getsize(full) for _, full in files)
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    hashes = {}
    with byte_progress("hashing", total) as bar:
        for name, full in files:
            h = hashlib.sha256()
            try:
                with open_regular(full, "rb", error=BadInput) as f:
                    while chunk := f.read(CHUNK_BYTES):
                        h.update(chunk)
                        bar.update(len(chunk))
            except OSError as e:  # unreadable (permissions), or gone since it was listed
                raise BadInput(f"{full}: cannot be read ({e.strerror or one_line(e)})") from None
            hashes[name] = h.hexdigest()
            key.update(f"{name}\0{hashes[name]}\0".encode())
    return key.hexdigest(), hashes


def row_digest(text):
    return hashlib.sha256(text.encode("utf-8")).digest()


def held_out_score(text):
    """A number in [0, 1) fixed by the text alone: the first 8 bytes of its sha256."""
    return int.from_bytes(row_digest(text)[:8], "big") / 2 ** 64


def write_rows(path, column, rows):
    """One parquet file of a string column, in ROW_GROUPS_PER_SHARD row groups (up to that many ranks all read
    from it)."""
    table = pa.table({column: pa.array(rows, type=pa.string())})
    pq.write_table(table, path, row_group_size=max(1, math.ceil(len(rows) / ROW_GROUPS_PER_SHARD)),
                   compression="zstd")


class SplitWriter:
    """
    Rows of one string column into the loader's layout: training shards shard_00000.parquet, ... and the held-out
    rows in one shard after them (the last shard by name is the validation split), each row's split chosen by
    held_out_score. The rows are shuffled by their hash, in two passes with bounded memory:
    1. add(): each row goes to a bucket (JSON lines in the output directory) chosen by its sha256, through small
       buffers (BUFFER_CHARS characters for all buckets together);
    2. close(): each bucket, read whole (about SHARD_CHARS characters), becomes a shard with its rows in the order of
       their sha256.
    So every shard is a uniform sample of all rows, in an order that depends on the rows alone, not on the order of
    the files: the loader reads shards one after another, and a directory with one topic per file would otherwise
    train on one topic at a time.
    """

    SHARD_CHARS = 32_000_000
    MAX_SHARDS = 1024  # a larger input makes larger shards
    BUFFER_CHARS = 64_000_000

    def __init__(self, out_dir, val_fraction, column="text", input_bytes=0):
        self.out_dir, self.val_fraction, self.column = out_dir, val_fraction, column
        train = max(1, min(self.MAX_SHARDS, math.ceil(input_bytes / self.SHARD_CHARS)))
        self.buckets = {"train": train, "val": max(1, math.ceil(train * val_fraction))}
        self.flush_chars = max(1 << 18, self.BUFFER_CHARS // (train + self.buckets["val"]))
        self.buffers, self.count = {}, {"train": 0, "val": 0}
        self.lowest = None  # (score, row, source) of the training rows: held out if no row falls under the fraction
        self.highest = None  # (score, row, source) of the held-out rows: trained on if all rows fall under it

    def _bucket_path(self, split, i):
        return os.path.join(self.out_dir, f"{split}_{i:05d}.bucket.jsonl")

    def add(self, text, source):
        """Place one row; returns True when it is held out. `source` (e.g. a file index) comes back from close()."""
        digest = row_digest(text)
        score = int.from_bytes(digest[:8], "big") / 2 ** 64
        split = "val" if score < self.val_fraction else "train"
        if split == "val" and (self.highest is None or score > self.highest[0]):
            self.highest = (score, text, source)
        if split == "train" and (self.lowest is None or score < self.lowest[0]):
            self.lowest = (score, text, source)
        key = (split, int.from_bytes(digest[8:16], "big") % self.buckets[split])
        rows = self.buffers.setdefault(key, [[], 0])
        rows[0].append(text)
        rows[1] += len(text)
        self.count[split] += 1
        if rows[1] >= self.flush_chars:
            self._flush(key)
        return split == "val"

    def _flush(self, key):
        rows = self.buffers.pop(key, [[]])[0]
        if rows:
            with open(self._bucket_path(*key), "a", encoding="utf-8") as f:
                f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)

    def _bucket(self, split, i, drop=None):
        """A bucket's rows in sha256 order, without the row `drop` (once); the bucket file is removed."""
        path = self._bucket_path(split, i)
        if not os.path.exists(path):
            return []
        with open_regular(path, "r", encoding="utf-8") as f:  # our own staging file
            rows = [json.loads(line) for line in f]
        os.remove(path)
        if drop is not None and drop in rows:
            rows.remove(drop)
        return sorted(rows, key=row_digest)

    def close(self):
        """Write the shards. Returns (train shard names, val shard name, moved): moved is (source, "val"|"train")
        when a row changed split so that neither is empty, else None. Fewer than 2 rows in all is a BadInput."""
        for key in list(self.buffers):
            self._flush(key)
        if self.count["train"] + self.count["val"] < 2:
            raise BadInput(f"{self.count['train'] + self.count['val']} usable row(s) in all: need at least 2, one for "
                           f"training and one held out for validation")
        to_val = self.lowest if self.count["val"] == 0 else None
        to_train = self.highest if self.count["train"] == 0 else None
        names = []
        for i in range(self.buckets["train"]):
            rows = self._bucket("train", i, drop=to_val and to_val[1])
            rows += [to_train[1]] if to_train and i == 0 else []
            if rows:
                names.append(f"shard_{len(names):05d}.parquet")
                write_rows(os.path.join(self.out_dir, names[-1]), self.column, rows)
        val_name = f"shard_{len(names):05d}.parquet"  # after every training shard
        writer = None
        for i in range(self.buckets["val"]):
            rows = self._bucket("val", i, drop=to_train and to_train[1]) + ([to_val[1]] if to_val and i == 0 else [])
            if rows:
                table = pa.table({self.column: pa.array(rows, type=pa.string())})
                writer = writer or pq.ParquetWriter(os.path.join(self.out_dir, val_name), table.schema,
                                                    compression="zstd")
                writer.write_table(table, row_group_size=max(1, math.ceil(len(rows) / ROW_GROUPS_PER_SHARD)))
        writer.close()
        moved = (to_val[2], "val") if to_val else (to_train[2], "train") if to_train else None
        return names, val_name, moved


def write_splits(files, hashes, root, val_fraction, skip_bad_lines, staging, rows_of, unit, column="text"):
    """Every file's rows into SplitWriter's shards, with a progress bar over the input bytes. rows_of(path, shown
    name, bad, on_progress, record) yields a file's rows and may count into its record. Returns (records, train
    shard names, val shard name), a record per file: name, sha256, bytes, <unit>s, val_<unit>s, bad_lines,
    first_bad_line. A file without any row is a BadInput (with skip_bad_lines: one more bad line)."""
    total = sum(os.path.getsize(full) for _, full in files)
    writer = SplitWriter(staging, val_fraction, column=column, input_bytes=total)
    records = []
    with byte_progress("preparing", total) as bar:
        for index, (name, full) in enumerate(files):
            shown = os.path.join(root, name) if os.path.isdir(root) else root
            bad = BadLines(shown, skip_bad_lines)
            record = {"name": name, "sha256": hashes[name], "bytes": os.path.getsize(full), f"{unit}s": 0,
                      f"val_{unit}s": 0}
            for row in rows_of(full, shown, bad, bar.update, record):
                record[f"{unit}s"] += 1
                record[f"val_{unit}s"] += writer.add(row, index)
            if record[f"{unit}s"] == 0:
                empty = f"{shown}: no usable {unit}s in this file" + (
                    f" (all {bad.count} non-blank line(s) bad, the first: {bad.first})" if bad.count else "")
                if not skip_bad_lines:
                    raise BadInput(empty)
                bad.count, bad.first = bad.count + 1, bad.first or empty
            records.append(dict(record, bad_lines=bad.count, first_bad_line=bad.first))
    train_shards, val_shard, moved = writer.close()
    if moved:
        records[moved[0]][f"val_{unit}s"] += 1 if moved[1] == "val" else -1
    return records, train_shards, val_shard


def split_summary(records, unit):
    """The manifest's totals over the files' records."""
    n, val = sum(r[f"{unit}s"] for r in records), sum(r[f"val_{unit}s"] for r in records)
    return {f"{unit}s": n, f"train_{unit}s": n - val, f"val_{unit}s": val, "bytes": sum(r["bytes"] for r in records),
            "bad_lines": sum(r["bad_lines"] for r in records),
            "first_bad_line": next((r["first_bad_line"] for r in records if r["first_bad_line"]), None)}


# -----------------------------------------------------------------------------
# Prepared once


def read_manifest(directory):
    try:
        return read_json(os.path.join(directory, MANIFEST))
    except FileError:  # absent (not prepared yet) or damaged: prepared again
        return None


def remove_dead_staging(parent):
    """Staging directories (<key>.tmp.<pid>.<random>) left by a preparation that was killed."""
    for name in os.listdir(parent):
        m = re.search(r"\.tmp\.(\d+)\.", name)
        if m and not pid_alive(int(m.group(1))):
            shutil.rmtree(os.path.join(parent, name), ignore_errors=True)


def prepare_once(kind, key, build, what):
    """(directory, manifest) of $BASE/<kind>/<key>: reused when complete, else build(staging dir) -> manifest, then
    the manifest is written and the directory renamed into place."""
    parent = os.path.join(get_base_dir(), kind)
    final = os.path.join(parent, key[:16])
    manifest = read_manifest(final)
    if manifest is not None and manifest.get("key") == key:
        print0(f"{what}: prepared earlier from the same bytes, reusing {final}")
        return final, manifest
    os.makedirs(parent, exist_ok=True)
    remove_dead_staging(parent)
    staging = tempfile.mkdtemp(prefix=f"{key[:16]}.tmp.{os.getpid()}.", dir=parent)
    t0 = time.time()
    try:
        manifest = dict(build(staging), key=key, seconds=round(time.time() - t0, 2))
        atomic_write_bytes(os.path.join(staging, MANIFEST), json.dumps(manifest, indent=1).encode())
        done = read_manifest(final)
        if done is None or done.get("key") != key:  # not there, incomplete, or another key's (a prefix collision)
            shutil.rmtree(final, ignore_errors=True)
            try:
                os.rename(staging, final)
            except OSError:  # another process renamed the same preparation into place first
                if (read_manifest(final) or {}).get("key") != key:
                    raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print0(f"{what}: prepared in {manifest['seconds']:.1f}s into {final}")
    return final, read_manifest(final)


def check_bad_lines(manifest, skip):
    """A preparation that skipped bad lines is used again only with --skip_bad_lines; otherwise its first bad line
    is the error, as it was the first time."""
    if manifest.get("bad_lines") and not skip:
        raise BadInput(f"{manifest['first_bad_line']} ({SKIP_HINT}; {manifest['bad_lines']} bad line(s) in all)")
    if manifest.get("bad_lines"):
        print0(f"skipped {manifest['bad_lines']:,} bad line(s) (--skip_bad_lines), the first: "
               f"{manifest['first_bad_line']}")
