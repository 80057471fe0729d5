"""
Pretraining text of your own (--data=PATH for tok_train, base_train, base_loss and compare), prepared once into the
parquet shards the loader reads ($NANOCHAT_BASE_DIR/user_data/<key>/, see nanochat/userfiles.py for the key, the
held-out split and the errors). PATH is a file or a directory (searched recursively) of:

- .txt / .md: documents are separated by two or more blank lines in a row; a single blank line is a paragraph break
  inside a document, so a file without such a gap is one document. A document reaching MAX_DOC_CHARS characters is
  cut at the next line end (counted as cut), so a huge file without gaps never sits in memory whole.
- .jsonl: one JSON object per line with the text in a "text" field (--text_field names another); blank lines are
  skipped.
- .parquet: a string column "text" (or --text_field), one document per row.
and each of them compressed: .gz or .zst.

A malformed JSON line, a missing, non-string or empty text, a non-UTF-8 byte, or a file without any document is one
line naming the file and the line (--skip_bad_lines skips them and counts them).
"""

import os

import pyarrow as pa
import pyarrow.parquet as pq

from nanochat.fileio import check_regular
from nanochat.log import one_line, print0
from nanochat.userfiles import (
    BadInput,
    byte_chunks,
    check_bad_lines,
    content_key,
    find_files,
    loads_json,
    not_text,
    prepare_once,
    read_manifest,
    split_name,
    split_summary,
    text_lines,
    write_splits,
)

SUFFIXES = (".txt", ".md", ".jsonl", ".parquet")
FORMAT_VERSION = 1  # bump when the documents a file gives change: every preparation is redone
MAX_DOC_CHARS = 100_000  # a .txt/.md document is cut at the first line end past this many characters
PARQUET_BATCH = 1024


def txt_documents(path, name, bad, field, staging, on_progress, record):
    """Documents of a .txt/.md file: separated by two or more blank lines (see the module docstring)."""
    lines, size, blank_run = [], 0, 0
    for _, line in text_lines(path, name, bad, on_progress=on_progress):
        if not line.strip():
            blank_run += 1
            if blank_run == 2 and lines:
                yield "\n".join(lines).strip("\n")
                lines, size = [], 0
            elif lines:
                lines.append("")
            continue
        blank_run = 0
        lines.append(line)
        size += len(line) + 1
        if size >= MAX_DOC_CHARS:
            record["cut_documents"] += 1
            yield "\n".join(lines).strip("\n")
            lines, size = [], 0
    if lines:
        yield "\n".join(lines).strip("\n")


def jsonl_documents(path, name, bad, field, staging, on_progress, record):
    """The `field` of each JSON line."""
    for lineno, line in text_lines(path, name, bad, whole=True, on_progress=on_progress):
        if not line.strip():
            continue
        ok, item = loads_json(line, lineno, bad)
        if not ok:
            continue
        if not isinstance(item, dict):
            bad(lineno, f"expected a JSON object with a {field!r} field, got a JSON {type(item).__name__}")
        elif field not in item:
            bad(lineno, f"no {field!r} field (fields: {', '.join(list(item)[:6]) or 'none'}; --text_field picks one)")
        elif not isinstance(item[field], str):
            bad(lineno, f"{field!r} is a {type(item[field]).__name__}, not a string")
        elif not item[field].strip():
            bad(lineno, f"empty {field!r}")
        elif not_text(item[field]):
            bad(lineno, f"{field!r} holds {not_text(item[field])}")
        else:
            yield item[field]


def parquet_documents(path, name, bad, field, staging, on_progress, record):
    """The string column `field`, row by row; a compressed parquet file is first decompressed into the staging
    directory (parquet is read from its end, so it cannot be read as a stream)."""
    if split_name(path)[1]:
        plain = os.path.join(staging, "decompressed.parquet")
        with open(plain, "wb") as f:
            for chunk in byte_chunks(path, name, on_progress):
                f.write(chunk)
        path, on_progress = plain, None
    path = check_regular(path, error=BadInput)
    try:
        pf = pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as e:
        raise BadInput(f"{name}: not a readable parquet file ({one_line(e)})") from None
    schema = pf.schema_arrow
    if field not in schema.names:
        raise BadInput(f"{name}: no column {field!r} (columns: {', '.join(schema.names)}; --text_field picks one)")
    kind = schema.field(field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise BadInput(f"{name}: column {field!r} has type {kind}, expected strings")
    row, batches = 0, pf.iter_batches(batch_size=PARQUET_BATCH, columns=[field])
    while True:
        try:
            batch = next(batches, None)
        except (OSError, pa.ArrowException) as e:
            raise BadInput(f"{name}:row {row + 1}: unreadable ({one_line(e)}): a damaged parquet file?") from None
        if batch is None:
            return
        for text in batch.column(0).to_pylist():
            row += 1
            if text is None or not text.strip():
                bad(f"row {row}", f"{'null' if text is None else 'empty'} {field!r}")
            else:
                yield text
        if on_progress is not None:
            on_progress(os.path.getsize(path) * len(batch) // max(1, pf.metadata.num_rows))


READERS = {".txt": txt_documents, ".md": txt_documents, ".jsonl": jsonl_documents, ".parquet": parquet_documents}


def build(files, hashes, root, text_field, val_fraction, skip_bad_lines, staging):
    """Every file's documents into shards; returns the manifest."""

    def documents(path, shown, bad, on_progress, record):
        record.setdefault("cut_documents", 0)
        yield from READERS[split_name(path)[0]](path, shown, bad, text_field, staging, on_progress, record)

    records, train_shards, val_shard = write_splits(files, hashes, root, val_fraction, skip_bad_lines, staging,
                                                    documents, "document")
    return {"kind": "text", "format_version": FORMAT_VERSION, "text_field": text_field, "val_fraction": val_fraction,
            "files": records, **split_summary(records, "document"), "train_shards": train_shards,
            "val_shard": val_shard, "cut_documents": sum(r["cut_documents"] for r in records)}


def prepare_text(path, text_field="text", val_fraction=0.01, skip_bad_lines=False):
    """(shard directory, manifest) of the user's text under PATH, prepared on first use (see the module docstring)."""
    files = find_files(path, SUFFIXES)
    settings = {"kind": "text", "format_version": FORMAT_VERSION, "text_field": text_field,
                "val_fraction": val_fraction, "max_doc_chars": MAX_DOC_CHARS}
    key, hashes = content_key(files, settings)

    def make(staging):
        return build(files, hashes, path.rstrip("/") or path, text_field, val_fraction, skip_bad_lines, staging)

    directory, manifest = prepare_once("user_data", key, make, f"--data={path}")
    check_bad_lines(manifest, skip_bad_lines)
    print0(f"--data={path}: {len(files)} file(s), {manifest['documents']:,} documents: {manifest['train_documents']:,} "
           f"for training, {manifest['val_documents']:,} held out for validation"
           + (f"; {manifest['cut_documents']:,} long ones cut at {MAX_DOC_CHARS:,} characters"
              if manifest["cut_documents"] else ""))
    return directory, manifest


# -----------------------------------------------------------------------------
# What a run records: checkpoint meta and the run report

MAX_FILES_RECORDED = 100  # a directory of thousands of files: the manifest in the data directory lists them all


def data_record(path, directory, manifest):
    """The data of a run, for its checkpoint meta: where, the key, the counts, and each file's name, hash and
    documents."""
    files = [{k: f[k] for k in ("name", "sha256", "documents", "val_documents", "bad_lines")}
             for f in manifest["files"][:MAX_FILES_RECORDED]]
    return {"path": os.path.abspath(path), "key": manifest["key"], "dir": directory,
            "documents": manifest["documents"], "train_documents": manifest["train_documents"],
            "val_documents": manifest["val_documents"], "bad_lines_skipped": manifest["bad_lines"],
            "num_files": len(manifest["files"]), "files": files}


def report_lines(record):
    """The same, as the run report's '- key: value' lines."""
    files = "; ".join(f"{f['name']} (sha256 {f['sha256'][:12]}, {f['documents']:,} documents)"
                      for f in record["files"][:20])
    more = record["num_files"] - min(20, len(record["files"]))
    return {"data": record["path"], "data_hash": record["key"][:16],
            "data_documents": f"{record['documents']:,} ({record['train_documents']:,} train, "
                              f"{record['val_documents']:,} held out)",
            "data_bad_lines_skipped": record["bad_lines_skipped"] or None,
            "data_files": files + (f"; ... {more} more (manifest: {record['dir']})" if more > 0 else "")}


def prepare_own_text(config):
    """(shard directory, record) of a config's --data (with its --text_field, --val_fraction, --skip_bad_lines)."""
    directory, manifest = prepare_text(config.data, config.text_field, config.val_fraction, config.skip_bad_lines)
    return directory, data_record(config.data, directory, manifest)


def checkpoint_data_dir(meta, data=None, text_field=None, val_fraction=None, skip_bad_lines=None):
    """(shard directory, record) a checkpoint is scored on: --data when given (the checkpoint's settings fill what
    is not given), else the data the checkpoint trained on (its prepared shards when they are still there, else
    prepared again from its path), else (None, None): the default shards."""
    args, recorded = meta.get("train_args", {}), meta.get("data")
    path = data or (recorded or {}).get("path") or args.get("data")  # the record's path is absolute
    if not path:
        return None, None
    text_field = text_field or args.get("text_field") or "text"
    val_fraction = val_fraction or args.get("val_fraction") or 0.01
    skip = skip_bad_lines if skip_bad_lines is not None else bool(args.get("skip_bad_lines"))
    if data is None and recorded and read_manifest(recorded["dir"]) is not None:
        manifest = read_manifest(recorded["dir"])
        if manifest.get("key") == recorded["key"]:
            print0(f"data: the checkpoint's own, {recorded['dir']} ({recorded['path']})")
            return recorded["dir"], recorded
    directory, manifest = prepare_text(path, text_field, val_fraction, skip)
    if recorded and manifest["key"] != recorded["key"]:
        print0(f"note: {path} is not what the checkpoint trained on (its content hash was {recorded['key'][:16]}, now "
               f"{manifest['key'][:16]}): the held-out split is this data's")
    return directory, data_record(path, directory, manifest)

