"""
Run untrusted Python (code written by a model, e.g. for HumanEval) in an OS-level sandbox, and report how it went.

The tool: bubblewrap (`bwrap`, the sandbox under Flatpak; Debian package `bubblewrap`). Why it and not the others:
- it is one small setuid-free binary packaged by every distribution, and it runs both as root (the usual GPU box or
  container) and as a normal user (through unprivileged user namespaces), with the same arguments;
- it builds exactly the view we want from flags: a new, empty root where only the paths we name are bound, a new
  /proc for a new pid namespace, a size-capped tmpfs, no network, capabilities dropped, no_new_privs, a seccomp
  program of ours, and it kills the whole sandbox when its parent dies (--die-with-parent);
- nsjail does the same and more (cgroups, rlimits) but is rarely packaged (not in Debian 12) and must be built;
  Landlock only restricts files (no network or pid isolation, and needs kernel >= 5.13 with it enabled); a seccomp
  filter alone cannot hide files. bwrap does the namespaces and mounts, libseccomp (through ctypes, already
  installed wherever apt is) writes the syscall filter, and this module adds the cgroup and the rlimits.
Verified (tests/reliability/test_sandbox.py) with bubblewrap 0.8.0 on Linux 6.18 as root with all capabilities in
a container, as root of a user namespace (rootless containers) and as an unprivileged user.

Layers, outermost first (docs/reliability.md says how each one is tested):
- a per-run cgroup where cgroups are writable (root): pids.max, memory (max, no swap), cpu.max (one CPU); the
  sandboxed process is put in it before bwrap starts, so nothing it starts is ever outside it, and /sys is not
  mounted inside, so it cannot raise them;
- bwrap: new mount, pid, network, ipc, uts and cgroup namespaces. The root is an empty read-only tmpfs holding only
  the interpreter, its standard library (site-packages masked) and the shared libraries they load (read-only),
  a new /proc, a read-only minimal /dev (null, zero, urandom..., and a private /dev/shm of SHM_BYTES), and a
  private tmpfs of WORKDIR_BYTES at /tmp, the working directory. No network but a loopback of its own; no host
  /proc, /sys, home, project or venv;
- no privilege: as root, bwrap keeps only CAP_SETUID/SETGID/SETPCAP, with which the prelude
  (nanochat/execution_prelude.py) empties every capability set and becomes a uid of its own for the run (no
  such user exists on the host); as a normal user, bwrap maps that uid onto the caller's in a new user namespace
  and drops every capability. no_new_privs is always set;
- a seccomp filter (SECCOMP_DENIED): no setns/unshare/mount/ptrace/bpf/keyctl/perf_event_open/kexec/module
  loading..., no clone() into new namespaces, no socket but AF_UNIX, no TIOCSTI;
- rlimits set hard by the prelude: address space, CPU seconds, file size (the output files included), processes,
  open files, no core dumps; a wall-clock timeout; stdout/stderr truncated to max_output_bytes;
- afterwards nothing is left: bwrap's pid 1 dies with its parent and takes the pid namespace with it, the cgroup is
  killed, and execute_code returns only once the sandbox's pid 1 is gone.

Without bwrap (or libseccomp, or namespaces) execute_code refuses (SandboxUnavailable says how to install it):
model-written code never runs unconfined.
"""

import json
import math
import os
import select
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from functools import lru_cache
from random import SystemRandom

from nanochat.fileio import open_regular
from nanochat.sandbox import (  # noqa: F401 (the limits are part of this module's interface)
    BWRAP,
    CGROUP_SLACK_BYTES,
    CPU_PERIOD_US,
    FILE_SIZE_LIMIT,
    INSTALL_HINT,
    MAX_OPEN_FILES,
    MAX_PROCESSES,
    NAMESPACE_HINT,
    PRELUDE,
    SANDBOX_UIDS,
    SECCOMP_DENIED,
    SHM_BYTES,
    WORKDIR,
    WORKDIR_BYTES,
    SandboxUnavailable,
    _make_cgroups,
    _remove_cgroups,
    cgroup_homes,
    seccomp_program,
    visible_paths,
)


@dataclass
class ExecutionResult:
    success: bool  # the program ran to completion and exited with status 0
    stdout: str
    stderr: str
    error: str | None = None  # one line saying what went wrong (last traceback line, timeout, signal)
    timeout: bool = False
    memory_exceeded: bool = False



# --------------------------------------------------------------------------------------------------------------

def _bwrap_command(run_as_uid, seccomp_fd, info_fd, prelude_args):
    interpreter, binds, masked = visible_paths()
    as_root = os.geteuid() == 0
    # --as-pid-1: the prelude is the namespace's init, which the kernel keeps signals from within the namespace
    # from killing (SIGKILL included), so the program cannot silence the prelude's report of how it ended
    command = [BWRAP, "--unshare-ipc", "--unshare-pid", "--as-pid-1", "--unshare-net", "--unshare-uts",
               "--unshare-cgroup-try", "--die-with-parent", "--new-session", "--hostname", "sandbox", "--clearenv",
               "--setenv", "PATH", "/usr/bin:/bin", "--setenv", "HOME", WORKDIR, "--setenv", "TMPDIR", WORKDIR,
               "--setenv", "LANG", "C.UTF-8", "--cap-drop", "ALL"]
    if as_root:  # bwrap runs privileged (no user namespace); the prelude needs these three to give up root
        command += ["--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID", "--cap-add", "CAP_SETPCAP"]
    else:
        command += ["--unshare-user", "--disable-userns", "--uid", str(run_as_uid), "--gid", str(run_as_uid)]
    # bwrap makes missing parents of mount points 0700; the sandbox's own uid must be able to walk through them
    parents = {os.path.dirname(dest) for _, dest in binds} | {WORKDIR}
    parents = {p for dest in parents for p in _ancestors(dest)} - {dest for _, dest in binds}
    for parent in sorted(parents):
        command += ["--perms", "0755", "--dir", parent]
    command += ["--proc", "/proc", "--dev", "/dev", "--perms", "1777", "--size", str(SHM_BYTES), "--tmpfs",
                "/dev/shm", "--remount-ro", "/dev"]  # the device nodes (null, zero...) and /dev/shm stay writable
    for source, dest in binds:
        command += ["--ro-bind", source, dest]
    for directory in masked:
        command += ["--tmpfs", directory, "--remount-ro", directory]
    command += ["--perms", "1777", "--size", str(WORKDIR_BYTES), "--tmpfs", WORKDIR, "--chdir", WORKDIR,
                "--remount-ro", "/", "--seccomp", str(seccomp_fd), "--info-fd", str(info_fd)]
    return command + ["--", interpreter, "-I", "-S", "-B", "-X", "utf8", "-c", _prelude_source(),
                      *map(str, prelude_args)]


@lru_cache(maxsize=1)
def _prelude_source():
    with open_regular(PRELUDE, "r", encoding="utf-8") as f:
        return f.read()


@lru_cache(maxsize=1)
def sandbox_uids():
    """The uids a run may take when bwrap runs as root: SANDBOX_UIDS where they exist (the host, or any user
    namespace that maps them), else nobody (65534) where that is mapped (e.g. a rootless container)."""
    try:
        maps = []
        for name in ("uid_map", "gid_map"):
            with open(f"/proc/self/{name}") as f:
                maps.append([tuple(map(int, line.split())) for line in f if line.strip()])
    except (OSError, ValueError):
        return SANDBOX_UIDS

    def mapped(uid):
        return all(any(inside <= uid < inside + count for inside, _, count in lines) for lines in maps)

    if mapped(SANDBOX_UIDS.start) and mapped(SANDBOX_UIDS.stop - 1):
        return SANDBOX_UIDS
    return range(65534, 65535) if mapped(65534) else SANDBOX_UIDS  # else the prelude cannot drop root: refused


def _ancestors(path):
    while path not in ("/", ""):
        yield path
        path = os.path.dirname(path)


class _Capture:
    """What one of the program's output pipes said: the first max_bytes kept and the rest counted, up to
    FILE_SIZE_LIMIT, where the program is stopped. No output of the sandbox ever lands in a file of the host."""

    def __init__(self, fd, max_bytes):
        self.fd, self.max_bytes, self.kept, self.total = fd, max_bytes, bytearray(), 0
        os.set_blocking(fd, False)

    @property
    def full(self):
        return self.total >= FILE_SIZE_LIMIT

    def read(self):
        """Drain what is there; False once the pipe is closed (EOF) or the limit is reached."""
        while not self.full:
            try:
                chunk = os.read(self.fd, min(65536, FILE_SIZE_LIMIT - self.total))
            except BlockingIOError:
                return True
            if not chunk:
                return False
            self.total += len(chunk)
            self.kept += chunk[:max(0, self.max_bytes - len(self.kept))]
        return False

    def text(self):
        text = bytes(self.kept).decode("utf-8", errors="replace")
        if self.total > self.max_bytes:
            text += f"\n... [output truncated: {self.total} bytes in total, first {self.max_bytes} shown]"
        return text


def _read_available(fd):
    os.set_blocking(fd, False)
    try:
        return os.read(fd, 65536)
    except BlockingIOError:
        return b""


def _pump(process, captures, timeout):
    """Read the program's output until it exits (a pidfd wakes up at once), `timeout` seconds pass or an output
    reaches FILE_SIZE_LIMIT: "exited", "timeout" or "output"."""
    deadline = time.monotonic() + timeout
    poll, open_fds = select.poll(), {c.fd: c for c in captures}
    for fd in open_fds:
        poll.register(fd, select.POLLIN)
    try:
        pidfd = os.pidfd_open(process.pid)
        poll.register(pidfd, select.POLLIN)
    except (AttributeError, OSError):
        pidfd = None  # no pidfd (an old kernel): poll the process every 10 ms
    try:
        while process.poll() is None:
            left = deadline - time.monotonic()
            if left <= 0:
                return "timeout"
            for fd, _ in poll.poll(min(10 if pidfd is None else 1000, max(1, math.ceil(left * 1000)))):
                if fd in open_fds and not open_fds[fd].read():
                    poll.unregister(fd)
                    if open_fds.pop(fd).full:
                        return "output"
        return "exited"
    finally:
        if pidfd is not None:
            os.close(pidfd)


def _wait_for_namespace_end(info, deadline):
    """Wait until the sandbox's pid 1 is gone: the kernel has then killed every process of its pid namespace."""
    try:
        info = json.loads(info)
        pid, namespace = info["child-pid"], info["pid-namespace"]
        pidfd = os.pidfd_open(pid)
    except (ValueError, KeyError, OSError, AttributeError):
        return  # it never started, or it is already gone
    try:
        if os.stat(f"/proc/{pid}/ns/pid").st_ino != namespace:
            return  # that pid is no longer the sandbox's (the pidfd makes this check race-free)
        poll = select.poll()
        poll.register(pidfd, select.POLLIN)
        while not poll.poll(10) and time.monotonic() < deadline:
            pass
    except OSError:
        pass
    finally:
        os.close(pidfd)


def _cgroup_limits(maximum_memory_bytes):
    limits = {"pids.max": MAX_PROCESSES + 5,  # + bwrap, the shell that joins the cgroups, the prelude (pid 1), slack
              "cpu.max": f"{CPU_PERIOD_US} {CPU_PERIOD_US}", "cpu.cfs_period_us": CPU_PERIOD_US,
              "cpu.cfs_quota_us": CPU_PERIOD_US}
    if maximum_memory_bytes:
        cap = maximum_memory_bytes + WORKDIR_BYTES + SHM_BYTES + CGROUP_SLACK_BYTES  # tmpfs files are memory too
        limits |= {"memory.max": cap, "memory.swap.max": 0, "memory.limit_in_bytes": cap,
                   "memory.memsw.limit_in_bytes": cap}
    return limits


def _oom_killed(cgroups):
    """Whether the memory cgroup killed something of the run (its oom_kill counter), as opposed to a program that
    exits with status 137 of its own accord."""
    for path in cgroups:
        for name in ("memory.events", "memory.oom_control"):  # cgroup v2, v1
            try:
                with open(os.path.join(path, name)) as f:
                    if any(line.split()[:1] == ["oom_kill"] and int(line.split()[1]) > 0 for line in f):
                        return True
            except (OSError, ValueError, IndexError):
                pass
    return False


def _launch(command, code, cgroups, child_ends):
    """Start the sandbox with the program on a pipe into its stdin (written by a thread, the program may be larger
    than the pipe) and its stdout and stderr on pipes; returns (process, [stdout, stderr] read ends)."""
    if cgroups:  # the shell joins the cgroups, then becomes bwrap: nothing of the run starts outside them
        command = ["/bin/sh", "-c", 'while [ "$1" != -- ]; do echo $$ > "$1" || exit 125; shift; done; shift; '
                   'exec "$@"', "sh", *(os.path.join(path, "cgroup.procs") for path in cgroups), "--", *command]
    (in_r, in_w), (out_r, out_w), (err_r, err_w) = os.pipe(), os.pipe(), os.pipe()
    try:
        process = subprocess.Popen(command, stdin=in_r, stdout=out_w, stderr=err_w, cwd="/",
                                   env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}, pass_fds=child_ends,
                                   start_new_session=True)
    finally:
        for fd in (in_r, out_w, err_w):
            os.close(fd)

    def feed():
        try:
            with open(in_w, "wb") as f:
                f.write(code)
        except BrokenPipeError:  # the sandbox died before reading it all: its result says why
            pass

    threading.Thread(target=feed, daemon=True).start()
    return process, [out_r, err_r]


def _run(code, timeout, maximum_memory_bytes, max_output_bytes):
    """Run `code` (bytes) in the sandbox. Raises SandboxUnavailable when the sandbox could not be set up."""
    run_as_uid = SystemRandom().choice(sandbox_uids())
    (seccomp_r, seccomp_w), (info_r, info_w), (ready_r, ready_w) = os.pipe(), os.pipe(), os.pipe()
    os.write(seccomp_w, seccomp_program())  # a few kB: fits in the pipe's buffer
    os.close(seccomp_w)
    child_ends = [seccomp_r, info_w, ready_w]  # the seccomp program, bwrap's info and the prelude's "ready" byte
    cgroups, outputs = [], []
    try:
        prelude_args = [maximum_memory_bytes or -1, math.ceil(timeout) + 1, FILE_SIZE_LIMIT, MAX_PROCESSES + 3,
                        MAX_OPEN_FILES, run_as_uid if os.geteuid() == 0 else -1, ready_w]
        command = _bwrap_command(run_as_uid, seccomp_r, info_w, prelude_args)
        cgroups = _make_cgroups(_cgroup_limits(maximum_memory_bytes))
        process, outputs = _launch(command, code, cgroups, child_ends)
        while child_ends:
            os.close(child_ends.pop())
        captures = [_Capture(fd, max_output_bytes) for fd in outputs]
        ended = _pump(process, captures, timeout)
        try:  # bwrap and its pid 1 (which takes the whole pid namespace with it: --die-with-parent)
            os.killpg(process.pid, signal.SIGKILL)
        except OSError:
            pass
        returncode = process.wait()
        deadline = time.monotonic() + 5.0
        oom = _oom_killed(cgroups)
        _remove_cgroups(cgroups, deadline)
        cgroups = []
        _wait_for_namespace_end(_read_available(info_r), deadline)
        for capture in captures:  # what was written before the end (every writer is gone now)
            capture.read()
        ready = _read_available(ready_r)
    finally:
        _remove_cgroups(cgroups, time.monotonic() + 5.0)
        for fd in (*child_ends, info_r, ready_r, *outputs):
            os.close(fd)
    return _result(returncode, ready, ended, oom, captures[0].text(), captures[1].text(), timeout)


def ending(ready):
    """How the prelude saw the program end, after its b"1": ("exit", N), ("signal", N), or None (no report: the
    prelude itself was killed, e.g. with the whole sandbox)."""
    how, _, number = ready[1:].decode("ascii", errors="replace").partition(" ")
    return (how, int(number)) if how in ("exit", "signal") and number.isdigit() else None


def _result(returncode, ready, ended, oom, stdout, stderr, timeout):
    if ready[:1] != b"1" and ended == "exited":
        raise SandboxUnavailable(f"the sandbox did not start (exit status {returncode}): "
                                 f"{' '.join(stderr.split())[:500]}")
    if ended == "timeout" or returncode == 128 + signal.SIGXCPU:
        return ExecutionResult(False, stdout, stderr, error=f"timed out after {timeout:g} s (process killed)",
                               timeout=True)
    if ended == "output":
        return ExecutionResult(False, stdout, stderr, error=f"stopped: more than {FILE_SIZE_LIMIT} bytes of output")
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    memory_exceeded = oom or bool(lines) and lines[-1].startswith("MemoryError")
    error = None
    if returncode != 0:
        if oom:
            error = "memory limit exceeded (killed by the memory cgroup)"
        elif ending(ready) is not None and ending(ready)[0] == "signal":
            error = f"killed by signal {signal.Signals(ending(ready)[1]).name}"
        elif ending(ready) is None and 128 < returncode < 128 + signal.NSIG:  # bwrap: signal N = status 128 + N
            error = f"killed by signal {signal.Signals(returncode - 128).name}"
        else:
            error = lines[-1] if lines else f"exited with status {returncode}"
    return ExecutionResult(returncode == 0, stdout, stderr, error=error, memory_exceeded=memory_exceeded)


@lru_cache(maxsize=1)
def sandbox_problem():
    """Why untrusted code cannot be run here (one paragraph saying what to do), or None when the sandbox works."""
    if not sys.platform.startswith("linux"):
        return f"the code sandbox needs Linux (bubblewrap); this is {sys.platform}"
    if shutil.which(BWRAP) is None:
        return (f"bubblewrap (`{BWRAP}`) is not installed, and model-written code is never run without it. "
                f"{INSTALL_HINT}")
    try:
        seccomp_program()
        visible_paths()
        result = _run(b"print('sandbox ok')", timeout=30.0, maximum_memory_bytes=None, max_output_bytes=10_000)
    except SandboxUnavailable as e:
        return f"{e}. {NAMESPACE_HINT}" if "did not start" in str(e) else str(e)
    if result.stdout != "sandbox ok\n":
        return f"the sandbox runs but a trivial program failed in it: {result.error}\n{result.stderr}"
    return None


def require_sandbox():
    """Raise SandboxUnavailable (saying how to fix it) unless untrusted code can be run here."""
    problem = sandbox_problem()
    if problem is not None:
        raise SandboxUnavailable(problem)


def execute_code(code: str, timeout: float = 5.0, maximum_memory_bytes: int | None = 256 * 1024 * 1024,
                 max_output_bytes: int = 10_000) -> ExecutionResult:
    """Run `code` as a Python program in the sandbox and report how it went. Raises SandboxUnavailable (with what
    to install) when the sandbox cannot be set up here: the code is then not run at all."""
    require_sandbox()
    try:
        source = code.encode("utf-8", errors="surrogateescape")  # bytes that were not UTF-8 go back as they came
    except UnicodeEncodeError as e:  # a lone surrogate (\ud800): no bytes to run
        return ExecutionResult(False, "", "", error=f"the code is not valid text: {e.reason} at {e.start}")
    return _run(source, timeout, maximum_memory_bytes, max_output_bytes)
