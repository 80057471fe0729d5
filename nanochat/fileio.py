"""
Files: the base directory, reading files that may be hostile (only regular files, never a FIFO or a device, and
JSON of a bounded size), atomic writes (temp file, fsync, rename), cleanup of what a killed writer left, and
downloads that are complete or absent.
"""

import hashlib
import json
import os
import re
import stat
import time

from nanochat.limits import MAX_JSON_BYTES
from nanochat.log import UserError, one_line, print0


def get_base_dir():
    """Where tokenizer, data, checkpoints and reports live: $NANOCHAT_BASE_DIR or ~/.cache/nanochat."""
    base = os.environ.get("NANOCHAT_BASE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "nanochat")
    os.makedirs(base, exist_ok=True)
    return base


# -----------------------------------------------------------------------------
# Reading: every file the project reads is opened here


class FileError(UserError, OSError):
    """A file that cannot be read as asked: missing, unreadable, not a regular file (a FIFO, a device, a directory)
    or larger than the limit for its kind; the message names the file."""


_KINDS = [(stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")]


def _kind(mode):
    return next((what for test, what in _KINDS if test(mode)), "not a plain file")


def open_regular(path, mode="rb", max_bytes=None, error=FileError, **text):
    """Open `path` for reading, refusing anything but a regular file: a FIFO, a device, a socket or a directory in its
    place is an `error` (a UserError, FileError by default) naming it, never a hang: the file is opened non-blocking
    (opening a FIFO waits for a writer otherwise), checked with fstat, then set back to blocking. A file larger than
    max_bytes is refused too. Returns the open file (binary, or text: `text` holds encoding, newline, errors)."""
    if "r" not in mode or any(c in mode for c in "wax+"):
        raise ValueError(f"open_regular opens files for reading only, not mode {mode!r}")
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(path, flags)
    except OSError as e:
        raise error(f"cannot read {path}: {one_line(e.strerror or e)}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise error(f"{path} is {_kind(st.st_mode)}, not a regular file: put the real file there")
        if max_bytes is not None and st.st_size > max_bytes:
            raise error(f"{path} is {st.st_size:,} bytes, more than the {max_bytes:,} nanochat reads from such a "
                        f"file: it is not the file it should be")
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, mode, **text)
    except BaseException:
        os.close(fd)
        raise


def check_regular(path, error=FileError):
    """Raise `error` unless `path` is a regular file that can be opened: for libraries that open a path themselves
    (pyarrow, safetensors, transformers)."""
    open_regular(path, error=error).close()
    return path


def read_bytes(path, max_bytes=None, error=FileError):
    with open_regular(path, max_bytes=max_bytes, error=error) as f:
        return f.read()


def read_json(path, max_bytes=MAX_JSON_BYTES, error=FileError):
    """The JSON value in `path` (a regular file of at most max_bytes): invalid JSON, bytes that are not UTF-8 and
    nesting too deep for the parser are each an `error` naming the file."""
    data = read_bytes(path, max_bytes, error)
    try:
        return json.loads(data)
    except RecursionError:
        raise error(f"cannot read {path}: its JSON is nested too deeply") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, an integer too long to convert
        raise error(f"cannot read {path}: {one_line(e)}") from None


# -----------------------------------------------------------------------------
# Writing


def atomic_write(path, write):
    """Call write(f) on a temp file, fsync it and rename it to `path`, so a crash never leaves a half-written file
    under `path`. A kill mid-write leaves only `{path}.tmp.{pid}`, which remove_orphan_tmp_files() clears later;
    an exception removes it at once."""
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write_bytes(path, data: bytes):
    atomic_write(path, lambda f: f.write(data))


TMP_SUFFIX = re.compile(r"\.tmp(?:\.(\d+))?$")  # "x.tmp.<pid>" (atomic writes) or "x.tmp" (older downloads)


def pid_alive(pid):
    """Whether a process with this id runs on this machine (a process of another user counts as alive)."""
    try:
        os.kill(pid, 0)  # signal 0: checks existence, sends nothing
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def remove_orphan_tmp_files(directory, prefix=""):
    """Delete temp files (`*.tmp.<pid>`, `*.tmp`) in `directory` whose names start with `prefix` and whose writer
    is dead: leftovers of a process killed mid-write. A temp file of a live process (another DDP rank, another
    script saving here) is kept. Returns the removed paths. Only this machine's processes can be checked, so call
    it where no process on another machine writes into `directory` at the same moment (see docs/reliability.md)."""
    removed = []
    try:
        names = os.listdir(directory)
    except OSError:
        return removed
    for name in names:
        m = TMP_SUFFIX.search(name)
        if not m or not name.startswith(prefix) or (m.group(1) is not None and pid_alive(int(m.group(1)))):
            continue
        path = os.path.join(directory, name)
        try:
            os.remove(path)
            removed.append(path)
        except OSError:
            pass  # gone already (a concurrent cleanup), or not ours to delete
    if removed:
        print0(f"removed {len(removed)} temp file(s) left by a killed process in {directory}: "
                       f"{', '.join(os.path.basename(p) for p in removed[:5])}{' ...' if len(removed) > 5 else ''}")
    return removed


class DownloadError(UserError, RuntimeError):
    """A download that failed for good. `permanent`: retrying cannot help (HTTP 404, checksum mismatch)."""

    def __init__(self, message, url, reason, attempts, permanent=False):
        super().__init__(message)
        self.url, self.reason, self.attempts, self.permanent = url, reason, attempts, permanent


class ChecksumError(DownloadError, ValueError):
    """The downloaded bytes are not the expected ones (sha256 mismatch): never installed, never retried."""


RETRIED_STATUS = frozenset([408, 429, *range(500, 600)])  # request timeout, rate limit, server errors


def download_file(url, path, retries=5, backoff=2.0, timeout=30, expected_sha256=None, validate=None, name=None,
                  chunk_bytes=1 << 20):
    """Download `url` to `path`: streamed to `{path}.tmp.{pid}`, checked, then renamed into place, so `path` is
    complete or absent. Checks: the Content-Length (urllib3 refuses a body cut short), `expected_sha256` (a mismatch
    is permanent: the file is not the expected one), and `validate(tmp_path)` (e.g. a parquet footer check; any
    exception means a broken download). Up to `retries` requests in all: urllib3's Retry repeats connection errors,
    read timeouts and HTTP 408/429/5xx, waiting 0, backoff, 2*backoff, ... seconds; a body or check that fails after
    the headers came is fetched again here, with the same waits. Other HTTP 4xx (e.g. 404) are not retried.
    Raises DownloadError (ChecksumError)."""
    import requests  # here, so that importing fileio stays light

    name = name or os.path.basename(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    remove_orphan_tmp_files(directory, prefix=os.path.basename(path) + ".tmp")
    tmp = f"{path}.tmp.{os.getpid()}"
    made = 0  # requests so far
    try:
        while True:
            try:
                _attempt(requests, url, tmp, retries - made, backoff, timeout, chunk_bytes, expected_sha256, validate)
                os.replace(tmp, path)
                return path
            except _Failed as e:
                made += e.made
                if e.kind in ("permanent", "checksum"):
                    cls = ChecksumError if e.kind == "checksum" else DownloadError
                    raise cls(f"could not download {url}: {e}", url, str(e), made, permanent=True) from None
                if e.kind == "spent" or made >= retries:
                    raise DownloadError(f"could not download {url} after {made} attempts ({e})", url, str(e),
                                        made) from None
                wait = backoff * 2 ** (made - 1)
                print0(f"Attempt {made}/{retries} for {name} failed ({e}); retrying in {wait:.1f}s")
                time.sleep(wait)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


class _Failed(Exception):
    """An attempt that failed after `made` requests. kind: "body" (the body or a check failed after the headers:
    worth another request), "spent" (urllib3's Retry used up the attempts), "permanent" or "checksum"."""

    def __init__(self, message, made, kind):
        super().__init__(message)
        self.made, self.kind = made, kind


def _session(requests, attempts, backoff):
    """A requests session that makes up to `attempts` requests per get(): retries are urllib3's."""
    from urllib3.util import Retry

    retry = Retry(total=attempts - 1, status_forcelist=RETRIED_STATUS, backoff_factor=backoff / 2,
                  allowed_methods=["GET"], raise_on_status=False)  # the last error response is returned, not raised
    session = requests.Session()
    adapter = requests.adapters.HTTPAdapter(max_retries=retry)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


def _attempt(requests, url, tmp, attempts, backoff, timeout, chunk_bytes, expected_sha256, validate):
    """One get() (retried by urllib3 until its headers come), its body streamed to `tmp`, then checked."""
    from urllib3.exceptions import MaxRetryError

    with _session(requests, attempts, backoff) as session:
        try:
            r = session.get(url, stream=True, timeout=(10, timeout))
        except requests.RequestException as e:  # MaxRetryError inside: the attempts are spent; else not retryable
            cause = e.args[0] if e.args else None
            spent = isinstance(cause, MaxRetryError)
            raise _Failed(one_line(cause.reason if spent else e), attempts if spent else 1,
                          "spent" if spent else "permanent") from None
        with r:
            made = len(r.raw.retries.history) + 1 if r.raw.retries is not None else 1
            if r.status_code >= 400:
                if r.status_code in RETRIED_STATUS:
                    raise _Failed(f"HTTP {r.status_code}", made, "spent")
                raise _Failed(f"HTTP {r.status_code} (not retried)", made, "permanent")
            digest = hashlib.sha256()
            try:
                with open(tmp, "wb") as f:  # "wb": whatever an earlier attempt left is overwritten
                    for chunk in r.iter_content(chunk_size=chunk_bytes):
                        f.write(chunk)
                        digest.update(chunk)
            except (requests.RequestException, OSError) as e:  # cut short (urllib3 checks the length), a timeout
                raise _Failed(f"truncated or stalled download: {one_line(e)}", made, "body") from None
    if expected_sha256 and digest.hexdigest() != expected_sha256.lower():
        raise _Failed(f"sha256 {digest.hexdigest()} does not match the expected {expected_sha256}; the file was not "
                      f"installed", made, "checksum")
    if validate is not None:
        try:
            validate(tmp)
        except Exception as e:  # the callback decides what is broken; any failure means fetch again
            raise _Failed(f"invalid download: {one_line(e)}", made, "body") from e
