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

import ctypes
import ctypes.util
import errno
import itertools
import json
import math
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from functools import lru_cache
from random import SystemRandom


@dataclass
class ExecutionResult:
    success: bool  # the program ran to completion and exited with status 0
    stdout: str
    stderr: str
    error: str | None = None  # one line saying what went wrong (last traceback line, timeout, signal)
    timeout: bool = False
    memory_exceeded: bool = False


class SandboxUnavailable(RuntimeError):
    """The sandbox cannot be set up here, so untrusted code is not run at all."""


BWRAP = "bwrap"
INSTALL_HINT = ("Install bubblewrap and libseccomp: `apt-get install bubblewrap libseccomp2` (Debian/Ubuntu; "
                "`bash runs/setup_env.sh` does it when run as root) or `dnf install bubblewrap libseccomp` (Fedora)")
NAMESPACE_HINT = ("bwrap needs to create namespaces: as root that takes CAP_SYS_ADMIN (in Docker: --privileged, or "
                  "--cap-add SYS_ADMIN --security-opt seccomp=unconfined); as a normal user, unprivileged user "
                  "namespaces (sysctl kernel.unprivileged_userns_clone=1 and user.max_user_namespaces > 0; on "
                  "Ubuntu >= 23.10 also kernel.apparmor_restrict_unprivileged_userns=0)")

MAX_PROCESSES = 16  # processes (threads count too) the code may add; enough for a thread or two, not a bomb
FILE_SIZE_LIMIT = 16 * 1024 * 1024  # bytes, per file written (stdout/stderr included)
WORKDIR = "/tmp"  # the only writable place inside: a private tmpfs, gone with the sandbox
WORKDIR_BYTES = 64 * 1024 * 1024
SHM_BYTES = 16 * 1024 * 1024  # a private /dev/shm too, for multiprocessing's semaphores and queues
MAX_OPEN_FILES = 256
CPU_PERIOD_US = 100_000  # cgroup cpu quota per period: one period's worth = at most one CPU
CGROUP_SLACK_BYTES = 64 * 1024 * 1024  # memory cgroup: bwrap and the interpreter on top of the program's limit
# as root, each run gets a uid of its own from a range that no distribution or container tool hands out
# (systemd stops at 1879048191, and its "foreign" range starts at 2147352576), so it owns no file on the host and
# runs share no process count
SANDBOX_UIDS = range(2_000_000_000, 2_100_000_000)
PRELUDE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "execution_prelude.py")
_run_counter = itertools.count()

# --------------------------------------------------------------------------------------------------------------
# The seccomp filter (allow by default; these fail with EPERM). Each is a way out of the namespaces or into the
# kernel's less trodden paths; none is needed to run Python programs.
SECCOMP_DENIED = (
    "setns", "unshare", "mount", "umount2", "pivot_root", "chroot", "move_mount", "open_tree", "fsopen", "fsconfig",
    "fsmount", "fspick", "mount_setattr", "name_to_handle_at", "open_by_handle_at",  # namespaces and mounts
    "ptrace", "process_vm_readv", "process_vm_writev", "kcmp", "pidfd_getfd",  # other processes' memory and fds
    "bpf", "perf_event_open", "userfaultfd", "io_uring_setup", "io_uring_enter", "io_uring_register",
    "keyctl", "add_key", "request_key", "kexec_load", "kexec_file_load", "init_module", "finit_module",
    "delete_module", "reboot", "swapon", "swapoff", "acct", "quotactl", "quotactl_fd", "syslog", "lookup_dcookie",
    "fanotify_init", "iopl", "ioperm", "uselib", "vhangup", "nfsservctl", "settimeofday", "clock_settime",
    "clock_adjtime", "adjtimex",
)
CLONE_NAMESPACE_FLAGS = (0x00020000, 0x02000000, 0x04000000, 0x08000000, 0x10000000, 0x20000000, 0x40000000,
                         0x00000080)  # CLONE_NEWNS, NEWCGROUP, NEWUTS, NEWIPC, NEWUSER, NEWPID, NEWNET, NEWTIME
TERMINAL_INJECTION_IOCTLS = (0x5412, 0x541C)  # TIOCSTI, TIOCLINUX: typing into a terminal outside
SCMP_ACT_ALLOW = 0x7FFF0000
SCMP_CMP_NE, SCMP_CMP_MASKED_EQ = 1, 7


def _scmp_act_errno(code):
    return 0x00050000 | (code & 0xFFFF)


class _ScmpArgCmp(ctypes.Structure):
    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int), ("datum_a", ctypes.c_uint64),
                ("datum_b", ctypes.c_uint64)]


@lru_cache(maxsize=1)
def seccomp_program():
    """The compiled BPF program (bytes) that bwrap loads with --seccomp, generated once with libseccomp."""
    try:
        lib = ctypes.CDLL(ctypes.util.find_library("seccomp") or "libseccomp.so.2")
    except OSError as e:
        raise SandboxUnavailable(f"libseccomp is not installed ({e}). {INSTALL_HINT}") from None
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_rule_add_array.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint,
                                           ctypes.POINTER(_ScmpArgCmp)]
    lib.seccomp_export_bpf.argtypes = [ctypes.c_void_p, ctypes.c_int]
    lib.seccomp_release.argtypes = [ctypes.c_void_p]
    ctx = lib.seccomp_init(SCMP_ACT_ALLOW)  # other architectures (e.g. 32-bit syscalls) are killed by default
    if not ctx:
        raise SandboxUnavailable("libseccomp: seccomp_init failed")

    def rule(action, name, *comparisons):
        nr = lib.seccomp_syscall_resolve_name(name.encode())
        if nr == -1:  # __NR_SCMP_ERROR: this architecture has no such syscall
            return
        array = (_ScmpArgCmp * len(comparisons))(*comparisons) if comparisons else None
        rc = lib.seccomp_rule_add_array(ctx, action, nr, len(comparisons), array)
        if rc < 0:
            raise SandboxUnavailable(f"libseccomp: cannot add the rule for {name}: {os.strerror(-rc)}")

    deny = _scmp_act_errno(errno.EPERM)
    try:
        for name in SECCOMP_DENIED:
            rule(deny, name)
        for flag in CLONE_NAMESPACE_FLAGS:
            rule(deny, "clone", _ScmpArgCmp(0, SCMP_CMP_MASKED_EQ, flag, flag))
        rule(_scmp_act_errno(errno.ENOSYS), "clone3")  # its flags are behind a pointer: libc falls back to clone
        rule(deny, "socket", _ScmpArgCmp(0, SCMP_CMP_NE, 1, 0))  # AF_UNIX (1) only; there is no network anyway
        for request in TERMINAL_INJECTION_IOCTLS:
            rule(deny, "ioctl", _ScmpArgCmp(1, SCMP_CMP_MASKED_EQ, 0xFFFFFFFF, request))
        with tempfile.TemporaryFile() as f:
            rc = lib.seccomp_export_bpf(ctx, f.fileno())
            if rc < 0:
                raise SandboxUnavailable(f"libseccomp: cannot export the filter: {os.strerror(-rc)}")
            f.seek(0)
            return f.read()
    finally:
        lib.seccomp_release(ctx)


# --------------------------------------------------------------------------------------------------------------
# What the sandbox sees: the interpreter, its standard library, the shared libraries they load. Nothing else.

def _shared_libraries(files):
    """Absolute paths of the shared libraries (and the dynamic loader) that `files` load, from ldd."""
    found = set()
    for start in range(0, len(files), 200):
        out = subprocess.run(["ldd", *files[start:start + 200]], capture_output=True, text=True,
                             env={"PATH": "/usr/bin:/bin", "LC_ALL": "C"}).stdout
        for line in out.splitlines():
            words = line.split()
            if "=>" in words and len(words) > words.index("=>") + 1:
                path = words[words.index("=>") + 1]
            elif words and words[0].startswith("/") and not line.endswith(":"):
                path = words[0]  # the dynamic loader: "/lib64/ld-linux-x86-64.so.2 (0x...)"
            else:
                continue
            if path.startswith("/") and os.path.exists(path):
                found.add(path)
    return found


@lru_cache(maxsize=1)
def visible_paths():
    """(interpreter, read-only binds as [(host path, sandbox path)], directories masked with an empty tmpfs)."""
    interpreter = os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)
    # the directories the bare interpreter imports from (-S: no site-packages), as it reports them itself: from
    # a venv, sysconfig would name the venv's directories
    out = subprocess.run([interpreter, "-I", "-S", "-c", "import sys; print('\\n'.join(sys.path))"],
                         capture_output=True, text=True, env={}).stdout
    paths = {path for path in out.splitlines() if path.startswith("/") and os.path.exists(path)}
    stdlib = {path for path in paths if not any(path.startswith(other + "/") for other in paths)}  # outermost
    if not stdlib:
        raise SandboxUnavailable(f"cannot find the standard library of {interpreter}")
    masked = [os.path.join(d, name) for d in sorted(stdlib) for name in ("site-packages", "dist-packages")
              if os.path.isdir(os.path.join(d, name))]
    extensions = [os.path.join(root, name) for d in sorted(stdlib) for root, _, names in os.walk(d)
                  if not any(root.startswith(m) for m in masked) for name in names if name.endswith(".so")]
    if shutil.which("ldd") is None:
        raise SandboxUnavailable("ldd is not installed (package libc-bin): it lists the shared libraries the "
                                 "interpreter needs inside the sandbox")
    libraries = _shared_libraries([interpreter, *extensions])
    binds = [(os.path.realpath(path), path) for path in sorted(stdlib)] + [(interpreter, interpreter)]
    binds += [(os.path.realpath(path), path) for path in sorted(libraries)
              if not any(path.startswith(d + "/") for d in stdlib)]  # already visible, and read-only in there
    if os.path.exists("/etc/ld.so.cache"):  # where the loader finds libraries (their paths; the files are bound)
        binds.append(("/etc/ld.so.cache", "/etc/ld.so.cache"))
    return interpreter, binds, masked


# --------------------------------------------------------------------------------------------------------------
# cgroups: one per run, under this process's own cgroup (v2, or each v1 hierarchy with pids, memory or cpu)

CGROUP_CONTROLLERS = {"pids", "memory", "cpu"}


@lru_cache(maxsize=1)
def cgroup_homes():
    """Writable directories of this process's own cgroups under which a run's cgroup can be made (empty if none)."""
    try:
        own = {}
        with open("/proc/self/cgroup") as f:
            for line in f:
                _, controllers, path = line.rstrip("\n").split(":", 2)
                for controller in controllers.split(",") if controllers else [""]:
                    own[controller] = path
        with open("/proc/self/mountinfo") as f:
            mounts = [line.split() for line in f]
    except (OSError, ValueError):
        return ()
    homes = []
    for fields in mounts:
        fstype, options = fields[fields.index("-") + 1], fields[fields.index("-") + 3].split(",")
        root, mountpoint = fields[3].rstrip("/"), fields[4]
        if fstype == "cgroup2" and "" in own:
            path = own[""]
            controllers_file = mountpoint + path[len(root):] + "/cgroup.controllers"
            try:
                with open(controllers_file) as f:
                    controllers = set(f.read().split()) & CGROUP_CONTROLLERS
            except OSError:
                continue
        elif fstype == "cgroup" and set(options) & CGROUP_CONTROLLERS:
            controllers = set(options) & CGROUP_CONTROLLERS
            path = own.get(min(controllers))
        else:
            continue
        if not controllers or path is None or not (path + "/").startswith(root + "/"):
            continue
        directory = os.path.normpath(mountpoint + path[len(root):])
        if directory in (home for home, _ in homes) or not os.access(directory, os.W_OK):
            continue
        if fstype == "cgroup2":  # let the run's cgroup have these controllers (memory may be refused: then no cap)
            for controller in sorted(controllers):
                try:
                    with open(os.path.join(directory, "cgroup.subtree_control"), "w") as f:
                        f.write(f"+{controller}")
                except OSError:
                    pass
        homes.append((directory, frozenset(controllers)))
        _remove_stale_cgroups(directory)
    return tuple(homes)


def _remove_stale_cgroups(home):
    """Remove the (empty) cgroups of runs whose evaluating process was killed before it could remove them."""
    for name in os.listdir(home):
        if not name.startswith("nanochat-sandbox-"):
            continue
        try:
            os.kill(int(name.split("-")[2]), 0)
        except ProcessLookupError:  # its process is gone; rmdir fails harmlessly if anything still runs in it
            try:
                os.rmdir(os.path.join(home, name))
            except OSError:
                pass
        except (ValueError, IndexError, OSError):
            pass


def _make_cgroups(limits):
    """One cgroup per hierarchy for this run, with `limits` ({file: value}) written where the file exists."""
    name = f"nanochat-sandbox-{os.getpid()}-{next(_run_counter)}"
    made = []
    for home, _ in cgroup_homes():
        path = os.path.join(home, name)
        try:
            os.mkdir(path)
        except OSError:
            continue
        made.append(path)
        for filename, value in limits.items():
            target = os.path.join(path, filename)
            if os.path.exists(target):
                try:
                    with open(target, "w") as f:
                        f.write(str(value))
                except OSError:
                    pass  # e.g. memory.swap.max without swap accounting: the other limits still hold
    return made


def _remove_cgroups(paths, deadline):
    """Kill every process left in the run's cgroups and remove them (a cgroup can only be removed once empty)."""
    for path in paths:
        while True:
            try:
                if os.path.exists(os.path.join(path, "cgroup.kill")):
                    with open(os.path.join(path, "cgroup.kill"), "w") as f:
                        f.write("1")
                else:
                    with open(os.path.join(path, "cgroup.procs")) as f:
                        for pid in [int(line) for line in f if line.strip()]:
                            try:
                                os.kill(pid, signal.SIGKILL)
                            except OSError:
                                pass
                os.rmdir(path)
                break
            except FileNotFoundError:
                break
            except OSError:
                if time.monotonic() > deadline:
                    print(f"nanochat.execution: could not remove cgroup {path}", file=sys.stderr)
                    break
                time.sleep(0.002)


# --------------------------------------------------------------------------------------------------------------

def _bwrap_command(run_as_uid, seccomp_fd, info_fd, prelude_args):
    interpreter, binds, masked = visible_paths()
    as_root = os.geteuid() == 0
    command = [BWRAP, "--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts", "--unshare-cgroup-try",
               "--die-with-parent", "--new-session", "--hostname", "sandbox", "--clearenv",
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
    with open(PRELUDE) as f:
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


def _read_truncated(f, max_bytes):
    f.seek(0, os.SEEK_END)
    size = f.tell()
    f.seek(0)
    text = f.read(max_bytes).decode("utf-8", errors="replace")
    if size > max_bytes:
        text += f"\n... [output truncated: {size} bytes in total, first {max_bytes} shown]"
    return text


def _read_available(fd):
    os.set_blocking(fd, False)
    try:
        return os.read(fd, 65536)
    except BlockingIOError:
        return b""


def _wait(process, timeout):
    """Whether `process` exited within `timeout` seconds (a pidfd wakes up at once; Popen.wait polls)."""
    try:
        pidfd = os.pidfd_open(process.pid)
    except (AttributeError, OSError):
        try:
            process.wait(timeout=timeout)
            return True
        except subprocess.TimeoutExpired:
            return False
    try:
        poll = select.poll()
        poll.register(pidfd, select.POLLIN)
        return bool(poll.poll(max(0, math.ceil(timeout * 1000))))
    finally:
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


def _run(code, timeout, maximum_memory_bytes, max_output_bytes):
    """Run `code` in the sandbox. Raises SandboxUnavailable when the sandbox could not be set up."""
    run_as_uid = SystemRandom().choice(sandbox_uids())
    cgroup_limits = {"pids.max": MAX_PROCESSES + 4,  # + the bwrap monitor, bwrap's pid 1 and the interpreter
                     "cpu.max": f"{CPU_PERIOD_US} {CPU_PERIOD_US}", "cpu.cfs_period_us": CPU_PERIOD_US,
                     "cpu.cfs_quota_us": CPU_PERIOD_US}
    if maximum_memory_bytes:
        cap = maximum_memory_bytes + WORKDIR_BYTES + SHM_BYTES + CGROUP_SLACK_BYTES  # tmpfs files are memory too
        cgroup_limits |= {"memory.max": cap, "memory.swap.max": 0, "memory.limit_in_bytes": cap,
                          "memory.memsw.limit_in_bytes": cap}
    program = seccomp_program()
    (seccomp_r, seccomp_w), (info_r, info_w), (ready_r, ready_w) = os.pipe(), os.pipe(), os.pipe()
    os.write(seccomp_w, program)  # a few kB: fits in the pipe's buffer
    os.close(seccomp_w)
    child_ends = [seccomp_r, info_w, ready_w]  # the seccomp program, bwrap's info and the prelude's "ready" byte
    cgroups, timed_out = [], False
    try:
        prelude_args = [maximum_memory_bytes or -1, math.ceil(timeout) + 1, FILE_SIZE_LIMIT, MAX_PROCESSES + 2,
                        MAX_OPEN_FILES, run_as_uid if os.geteuid() == 0 else -1, ready_w]
        command = _bwrap_command(run_as_uid, seccomp_r, info_w, prelude_args)
        cgroups = _make_cgroups(cgroup_limits)
        if cgroups:  # the shell joins the cgroups, then becomes bwrap: nothing of the run starts outside them
            command = ["/bin/sh", "-c", 'while [ "$1" != -- ]; do echo $$ > "$1" || exit 125; shift; done; shift; '
                       'exec "$@"', "sh", *(os.path.join(path, "cgroup.procs") for path in cgroups), "--", *command]
        with tempfile.TemporaryFile() as stdin, tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            stdin.write(code.encode("utf-8", errors="surrogateescape"))
            stdin.seek(0)
            process = subprocess.Popen(command, stdin=stdin, stdout=out, stderr=err, cwd="/",
                                       env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}, pass_fds=child_ends,
                                       start_new_session=True)
            while child_ends:
                os.close(child_ends.pop())
            timed_out = not _wait(process, timeout)
            try:  # bwrap and its pid 1 (which takes the whole pid namespace with it: --die-with-parent)
                os.killpg(process.pid, signal.SIGKILL)
            except OSError:
                pass
            returncode = process.wait()
            deadline = time.monotonic() + 5.0
            _remove_cgroups(cgroups, deadline)
            cgroups = []
            _wait_for_namespace_end(_read_available(info_r), deadline)
            started = _read_available(ready_r) == b"1"
            stdout, stderr = _read_truncated(out, max_output_bytes), _read_truncated(err, max_output_bytes)
    finally:
        _remove_cgroups(cgroups, time.monotonic() + 5.0)
        for fd in (*child_ends, info_r, ready_r):
            os.close(fd)

    if not started and not timed_out:
        raise SandboxUnavailable(f"the sandbox did not start (exit status {returncode}): "
                                 f"{' '.join(stderr.split())[:500]}")
    if timed_out or returncode == 128 + signal.SIGXCPU:
        return ExecutionResult(False, stdout, stderr, error=f"timed out after {timeout:g} s (process killed)",
                               timeout=True)
    success = returncode == 0
    memory_exceeded = "MemoryError" in stderr or returncode == 128 + signal.SIGKILL  # the memory cgroup kills
    error = None
    if not success:
        lines = [line for line in stderr.strip().splitlines() if line.strip()]
        if 128 < returncode < 128 + signal.NSIG:  # bwrap reports a program killed by signal N as 128 + N
            error = f"killed by signal {signal.Signals(returncode - 128).name}"
        else:
            error = lines[-1] if lines else f"exited with status {returncode}"
    return ExecutionResult(success, stdout, stderr, error=error, memory_exceeded=memory_exceeded)


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
        result = _run("print('sandbox ok')", timeout=30.0, maximum_memory_bytes=None, max_output_bytes=10_000)
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
    return _run(code, timeout, maximum_memory_bytes, max_output_bytes)
