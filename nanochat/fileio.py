"""
Files: the base directory, atomic writes (temp file, fsync, rename), cleanup of what a killed writer left, and
downloads that are complete or absent.
"""

import hashlib
import os
import re
import time

from nanochat.log import UserError, one_line, print0


def get_base_dir():
    """Where tokenizer, data, checkpoints and reports live: $NANOCHAT_BASE_DIR or ~/.cache/nanochat."""
    base = os.environ.get("NANOCHAT_BASE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "nanochat")
    os.makedirs(base, exist_ok=True)
    return base


def atomic_write_bytes(path, data: bytes):
    """Write via temp file + fsync + rename, so a crash never leaves a half-written file under `path`.
    A kill mid-write leaves only `{path}.tmp.{pid}`, which remove_orphan_tmp_files() clears later."""
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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


def download_file(url, path, retries=5, backoff=2.0, timeout=30, expected_sha256=None, validate=None, name=None,
                  chunk_bytes=1 << 20):
    """Download `url` to `path`: streamed to `{path}.tmp.{pid}`, checked, then renamed into place, so `path` is
    complete or absent. Checks: the Content-Length (a cut transfer), `expected_sha256` (a mismatch is permanent:
    the file is not the expected one), and `validate(tmp_path)` (e.g. a parquet footer check; any exception means
    a broken download). Retries network errors, HTTP 5xx/408/429 and failed checks, waiting backoff, 2*backoff,
    4*backoff, ... seconds; other HTTP 4xx (e.g. 404) are not retried. Raises DownloadError (ChecksumError)."""
    import requests  # here, so that importing common stays light

    name = name or os.path.basename(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    remove_orphan_tmp_files(directory, prefix=os.path.basename(path) + ".tmp")
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        for attempt in range(1, retries + 1):
            try:
                _fetch(requests, url, tmp, timeout, chunk_bytes, expected_sha256)
                if validate is not None:
                    try:
                        validate(tmp)
                    except Exception as e:  # the callback decides what is broken; any failure means retry
                        raise _Retryable(f"invalid download: {one_line(e)}") from e
                os.replace(tmp, path)
                return path
            except _Permanent as e:
                cls = ChecksumError if e.checksum else DownloadError
                raise cls(f"could not download {url}: {e}", url, str(e), attempt, permanent=True) from None
            except (_Retryable, requests.RequestException, OSError) as e:
                reason = one_line(e)
                if attempt == retries:
                    raise DownloadError(f"could not download {url} after {retries} attempts ({reason})", url,
                                        reason, attempt) from None
                wait = backoff * 2 ** (attempt - 1)
                print0(f"Attempt {attempt}/{retries} for {name} failed ({reason}); retrying in {wait:.1f}s")
                time.sleep(wait)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


class _Retryable(Exception):
    pass


class _Permanent(Exception):
    def __init__(self, message, checksum=False):
        super().__init__(message)
        self.checksum = checksum


def _fetch(requests, url, tmp, timeout, chunk_bytes, expected_sha256):
    digest, written = hashlib.sha256(), 0
    with requests.get(url, stream=True, timeout=(10, timeout)) as r:
        if 400 <= r.status_code < 500 and r.status_code not in (408, 429):  # timeout and rate limit: retried
            raise _Permanent(f"HTTP {r.status_code} (not retried)")
        r.raise_for_status()
        with open(tmp, "wb") as f:  # "wb": whatever an earlier attempt left is overwritten
            for chunk in r.iter_content(chunk_size=chunk_bytes):
                f.write(chunk)
                digest.update(chunk)
                written += len(chunk)
        expected = r.headers.get("Content-Length")
        # requests decodes gzip/deflate on the fly: the length only counts for undecoded bodies
        if expected is not None and r.headers.get("Content-Encoding", "identity") == "identity":
            if written != int(expected):
                raise _Retryable(f"truncated download: got {written} of {expected} bytes")
    if expected_sha256 and digest.hexdigest() != expected_sha256.lower():
        raise _Permanent(f"sha256 {digest.hexdigest()} does not match the expected {expected_sha256}; "
                         f"the file was not installed", checksum=True)
