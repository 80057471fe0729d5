"""
Output and errors: print0 (rank 0 only), progress bars with an ETA, UserError (a one-line message instead of a
traceback), one_line and fmt_time.
"""

import os
import sys

from tqdm import tqdm


def print0(*args, **kwargs):
    """print() on rank 0 only (flushes, so progress shows up in pipes and logs). The library's one output channel:
    errors go to stderr through nanochat.cli.run."""
    if int(os.environ.get("RANK", 0)) == 0:
        kwargs.setdefault("flush", True)
        # a progress bar on the terminal steps aside for the line and is redrawn below it (nolock: no lock is
        # created in processes that never show a bar)
        with tqdm.external_write_mode(file=kwargs.get("file"), nolock=True):
            print(*args, **kwargs)


class UserError(Exception):
    """A problem the user can fix (wrong flag, missing or mismatched checkpoint, ...): scripts print the message,
    which says what to do, without a traceback."""


def one_line(e):
    """An exception as one short line (some libraries put whole paragraphs in their messages)."""
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def fmt_time(seconds):
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


class _Lines(tqdm):
    """tqdm that writes a whole line per update, no carriage returns: for logs and pipes."""

    def display(self, msg=None, pos=None):
        if msg != "" and (self.n, self.total) != getattr(self, "_shown", None):  # close() repeats the last line
            self._shown = (self.n, self.total)
            self.fp.write(self.__str__() + "\n")
            self.fp.flush()
        return True


class _Stream:
    """The stream behind _Lines: tqdm's own line ends and carriage returns (written alone) are dropped."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, s):
        if s not in ("", "\n", "\r"):
            self.stream.write(s)

    def flush(self):
        self.stream.flush()


def progress(iterable=None, desc="", total=None, unit="it", every=10.0, **kwargs):
    """A progress bar with an ETA on rank 0 (tqdm on a terminal; elsewhere a line every `every` seconds and at the
    end), nothing on other ranks."""
    quiet = int(os.environ.get("RANK", 0)) != 0
    if sys.stderr.isatty():
        return tqdm(iterable, desc=desc, total=total, unit=unit, disable=quiet, dynamic_ncols=True, **kwargs)
    return _Lines(iterable, desc=desc, total=total, unit=unit, disable=quiet, file=_Stream(sys.stdout),
                  mininterval=every, maxinterval=every * 10, ascii=True, **kwargs)
