"""
The isolation pieces of nanochat/execution.py's sandbox, each a layer of its own: the seccomp filter, the view of
the file system (what the sandbox sees), and the per-run cgroups. execution.py puts them together around bwrap.
"""

import ctypes
import ctypes.util
import errno
import itertools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from functools import lru_cache

from nanochat.log import print0


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
                    print0(f"warning: could not remove the sandbox's cgroup {path}")
                    break
                time.sleep(0.002)
