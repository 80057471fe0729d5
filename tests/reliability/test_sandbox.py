"""
Escape attempts against nanochat.execution's sandbox, each checked from outside: a marker file that must not
appear, a listener that must get no connection, a host process that must survive, a secret that must not come back.

Every program below runs `attempt(label, fn)` for each trick: it prints "blocked <label>: <error>" when the trick
fails and "ESCAPED <label>: ..." when it works. `assert_contained` wants every label blocked, no ESCAPED line, and
the program itself to have finished (so the attempts did run). The refusal path (no bwrap, no namespaces, no
libseccomp) runs everywhere; the containment tests skip, saying why, where bwrap cannot build the sandbox.
"""

import ctypes
import ctypes.util
import glob
import os
import platform
import socket
import subprocess
import sys
import sysconfig
import textwrap
import time
import uuid

import pytest

from nanochat import execution
from nanochat.execution import SandboxUnavailable, execute_code

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SANDBOX_PROBLEM = execution.sandbox_problem()
needs_sandbox = pytest.mark.skipif(SANDBOX_PROBLEM is not None, reason=f"no sandbox here: {SANDBOX_PROBLEM}")

HEADER = '''
import ctypes, errno, os, socket, sys
libc = ctypes.CDLL(None, use_errno=True)

def attempt(label, fn):
    try:
        result = fn()
    except Exception as e:
        print(f"blocked {label}: {type(e).__name__}: {e}")
    else:
        print(f"ESCAPED {label}: {result!r}"[:300])

def check(rc):  # a libc call's -1 as an OSError, like os.* functions do
    if rc == -1:
        raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
    return rc

def read(path):
    with open(path, "rb") as f:
        return f.read(200)

def write(path, data=b"pwned"):
    with open(path, "wb") as f:
        f.write(data)
    return path
'''


def run(code, **kwargs):
    return execute_code(HEADER + textwrap.dedent(code), **kwargs)


def assert_contained(result, *labels):
    out = result.stdout
    assert "ESCAPED" not in out, out
    assert result.success, (result.error, result.stderr, out)  # the program ran every attempt to the end
    for label in labels:
        assert f"blocked {label}:" in out, (label, out)


def syscall_number(name):
    """This architecture's number for a syscall, from libseccomp (what the filter itself is built from)."""
    lib = ctypes.CDLL(ctypes.util.find_library("seccomp") or "libseccomp.so.2")
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    return lib.seccomp_syscall_resolve_name(name.encode())


def count_processes_named(name):
    n = 0
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/comm") as f:
                n += f.read().strip() == name
        except OSError:
            pass
    return n


@pytest.fixture
def tcp_listener():
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(4)
    server.settimeout(0.2)
    yield server
    server.close()


def assert_no_connection(server):
    with pytest.raises(socket.timeout):
        server.accept()


# ---------------------------------------------------------------------------------------------------------------
# The refusal path: these run on every machine


@pytest.fixture
def fresh_probe():
    execution.sandbox_problem.cache_clear()
    yield
    execution.sandbox_problem.cache_clear()
    execution.seccomp_program.cache_clear()


def test_without_bwrap_nothing_runs_and_the_error_says_what_to_install(fresh_probe, monkeypatch, tmp_path):
    monkeypatch.setattr(execution, "BWRAP", "nanochat-no-such-bwrap")
    marker = tmp_path / "ran"
    with pytest.raises(SandboxUnavailable, match=r"apt-get install bubblewrap") as info:
        execute_code(f"open({str(marker)!r}, 'w').write('ran')")
    assert "nanochat-no-such-bwrap" in str(info.value) and not marker.exists()


def test_bwrap_that_cannot_create_namespaces_is_refused_with_the_reason(fresh_probe, monkeypatch, tmp_path):
    fake = tmp_path / "bwrap"  # what bwrap prints in a container that forbids namespaces
    fake.write_text("#!/bin/sh\necho 'bwrap: No permissions to create new namespace' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setattr(execution, "BWRAP", str(fake))
    with pytest.raises(SandboxUnavailable) as info:
        execute_code("print('hi')")
    message = str(info.value)
    assert "No permissions to create new namespace" in message and "unprivileged_userns_clone" in message


def test_without_libseccomp_nothing_runs(fresh_probe, monkeypatch):
    execution.seccomp_program.cache_clear()
    monkeypatch.setattr(execution, "BWRAP", "sh")  # found everywhere: the missing piece is libseccomp only
    monkeypatch.setattr(ctypes.util, "find_library", lambda name: "libnanochat-no-such-seccomp.so")
    with pytest.raises(SandboxUnavailable, match=r"libseccomp is not installed.*apt-get install bubblewrap"):
        execute_code("print('hi')")


# ---------------------------------------------------------------------------------------------------------------
# Files: only the interpreter and its standard library are visible, read-only; /tmp is a private tmpfs


@needs_sandbox
def test_host_files_are_not_visible(tmp_path, monkeypatch):
    secret = tmp_path / "secret.txt"
    secret.write_text("host secret 1234")
    venv_cfg = os.path.join(sys.prefix, "pyvenv.cfg")
    paths = {"shadow": "/etc/shadow", "passwd": "/etc/passwd", "host-file": str(secret),
             "repo": os.path.join(REPO, "nanochat", "execution.py"), "venv": venv_cfg,
             "home": os.path.expanduser("~/.bashrc"), "host-proc": f"/proc/{os.getpid()}/environ",
             "sys": "/sys/kernel/notes"}
    code = "".join(f"attempt({label!r}, lambda: read({path!r}))\n" for label, path in paths.items())
    result = run(code)
    assert_contained(result, *paths)
    assert "host secret" not in result.stdout and "root:" not in result.stdout


@needs_sandbox
def test_only_the_interpreter_and_standard_library_are_mounted():
    result = run("""
        import sysconfig
        print(sorted(os.listdir("/")))
        print(sorted(os.listdir(sysconfig.get_path("stdlib") + "/site-packages")) if os.path.isdir(
            sysconfig.get_path("stdlib") + "/site-packages") else "no site-packages")
        print(sys.path)
        for line in open("/proc/self/mountinfo"):
            print("mount", line.split()[4], line.split()[5])
        attempt("import-numpy", lambda: __import__("numpy"))
        attempt("import-nanochat", lambda: __import__("nanochat"))
    """)
    assert_contained(result, "import-numpy", "import-nanochat")
    lines = result.stdout.splitlines()
    assert set(eval(lines[0])) <= {"dev", "etc", "lib", "lib64", "proc", "root", "tmp", "usr", "opt", "home"}
    assert lines[1] in ("[]", "no site-packages")  # the interpreter's own site-packages is masked by an empty dir
    venv = sys.prefix if sys.prefix != sys.base_prefix else None
    assert all(REPO not in p and (venv is None or not p.startswith(venv + "/")) for p in eval(lines[2]))
    mounts = [line.split()[1:] for line in lines if line.startswith("mount ")]
    writable = {point for point, options in mounts if options.split(",")[0] == "rw"}
    assert {point for point in writable if not point.startswith("/dev/")} == {"/proc", "/tmp"}, mounts
    assert dict(mounts)["/dev/shm"].startswith("rw")  # a private tmpfs, like /tmp
    assert dict(mounts)["/"].startswith("ro") and dict(mounts)["/dev"].startswith("ro")  # the device nodes: rw


@needs_sandbox
def test_planting_a_pth_file_in_site_packages_fails():
    targets = [sysconfig.get_path("purelib"), os.path.join(sysconfig.get_path("stdlib"), "site-packages")]
    names = [os.path.join(t, f"nanochat-escape-{uuid.uuid4().hex}.pth") for t in targets]
    code = "".join(f"attempt('pth-{i}', lambda: write({name!r}, b'import os; os.system(\"id\")'))\n"
                   for i, name in enumerate(names))
    try:
        result = run(code)
        assert_contained(result, "pth-0", "pth-1")
        assert not any(os.path.exists(name) for name in names)
    finally:
        for name in names:
            if os.path.exists(name):
                os.remove(name)


@needs_sandbox
def test_writing_into_the_project_the_stdlib_or_the_root_fails():
    name = f"nanochat-escape-{uuid.uuid4().hex}"
    targets = {"project": os.path.join(REPO, name), "stdlib": os.path.join(sysconfig.get_path("stdlib"), name),
               "root": f"/{name}", "dev": f"/dev/{name}", "var-tmp": f"/var/tmp/{name}"}
    try:
        result = run("".join(f"attempt({label!r}, lambda: write({path!r}))\n" for label, path in targets.items()))
        assert_contained(result, *targets)
        assert not any(os.path.exists(path) for path in targets.values())
    finally:
        for path in targets.values():
            if os.path.exists(path):
                os.remove(path)


@needs_sandbox
def test_tmp_and_dev_shm_are_private_and_gone_afterwards():
    name = f"nanochat-escape-{uuid.uuid4().hex}"
    result = execute_code(f"import os\nopen('/tmp/{name}', 'w').write('x')\nopen('{name}.2', 'w').write('y')\n"
                          f"open('/dev/shm/{name}', 'w').write('z')\nprint(os.getcwd(), sorted(os.listdir('/tmp')))")
    assert result.success and result.stdout == f"/tmp {sorted([name, name + '.2'])}\n"
    for path in (f"/tmp/{name}", f"/tmp/{name}.2", f"/dev/shm/{name}"):
        assert not os.path.exists(path)  # the host's
    result = execute_code(f"import os\nprint(os.path.exists('/tmp/{name}'), os.path.exists('/dev/shm/{name}'))")
    assert result.stdout == "False False\n"  # nor the next run's


@needs_sandbox
def test_symlinks_and_proc_links_lead_nowhere_outside(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("host secret 5678")
    result = run(f"""
        os.symlink({str(secret)!r}, "/tmp/to-secret")
        os.symlink("../../../../../../../../etc/shadow", "/tmp/to-shadow")
        attempt("symlink-abs", lambda: read("/tmp/to-secret"))
        attempt("symlink-rel", lambda: read("/tmp/to-shadow"))
        attempt("proc-1-root", lambda: read("/proc/1/root{secret}"))  # bwrap's pid 1: inside the sandbox too
        attempt("proc-1-cwd", lambda: read("/proc/1/cwd/../../../../../..{secret}"))
        attempt("hardlink-interpreter", lambda: os.link(sys.executable, "/tmp/python"))
        attempt("self-root-dotdot", lambda: read("/proc/self/root/../../../../{str(secret)}"))
    """)
    assert_contained(result, "symlink-abs", "symlink-rel", "proc-1-root", "proc-1-cwd", "hardlink-interpreter",
                     "self-root-dotdot")
    assert "host secret" not in result.stdout


@needs_sandbox
def test_overwriting_the_interpreter_through_proc_self_exe_fails():
    """runc CVE-2019-5736 style: write to the binary that runs the sandbox, through /proc/self/exe."""
    interpreter = execution.visible_paths()[0]
    before = os.stat(interpreter)
    result = run("""
        attempt("proc-self-exe", lambda: write("/proc/self/exe"))
        attempt("exe-path", lambda: write(sys.executable))
        attempt("chmod-exe", lambda: os.chmod(sys.executable, 0o777))
    """)
    assert_contained(result, "proc-self-exe", "exe-path", "chmod-exe")
    after = os.stat(interpreter)
    assert (after.st_size, after.st_mtime_ns, after.st_mode) == (before.st_size, before.st_mtime_ns, before.st_mode)


# ---------------------------------------------------------------------------------------------------------------
# Network: a network namespace with nothing in it, and no socket but AF_UNIX


@needs_sandbox
def test_tcp_to_a_host_listener_fails(tcp_listener):
    port = tcp_listener.getsockname()[1]
    result = run(f"""
        attempt("socket-module", lambda: socket.create_connection(("127.0.0.1", {port}), timeout=1))
        attempt("libc-socket", lambda: check(libc.socket(socket.AF_INET, socket.SOCK_STREAM, 0)))
        attempt("ipv6", lambda: socket.create_connection(("::1", {port}), timeout=1))
    """)
    assert_contained(result, "socket-module", "libc-socket", "ipv6")
    assert_no_connection(tcp_listener)


@needs_sandbox
def test_udp_to_a_host_socket_fails():
    receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    receiver.bind(("127.0.0.1", 0))
    receiver.settimeout(0.2)
    try:
        port = receiver.getsockname()[1]
        result = run(f"""
            attempt("udp", lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b"x", ("127.0.0.1", {port})))
            attempt("raw-packet", lambda: socket.socket(socket.AF_PACKET, socket.SOCK_RAW))
            attempt("netlink", lambda: socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0))
        """)
        assert_contained(result, "udp", "raw-packet", "netlink")
        with pytest.raises(socket.timeout):
            receiver.recvfrom(16)
    finally:
        receiver.close()


@needs_sandbox
def test_unix_sockets_of_the_host_are_unreachable(tmp_path):
    path = str(tmp_path / "host.sock")
    abstract = f"\0nanochat-test-{uuid.uuid4().hex}"
    servers = []
    for address in (path, abstract):
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        server.bind(address)
        server.listen(1)
        server.settimeout(0.2)
        servers.append(server)
    try:
        result = run(f"""
            def connect(address):
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.connect(address)
                return address
            attempt("path", lambda: connect({path!r}))
            attempt("abstract", lambda: connect({abstract!r}))
        """)
        assert_contained(result, "path", "abstract")
        for server in servers:
            assert_no_connection(server)
    finally:
        for server in servers:
            server.close()


# ---------------------------------------------------------------------------------------------------------------
# Namespaces, mounts, privileges: no way back out


@needs_sandbox
def test_setns_into_a_host_network_namespace_fails(tcp_listener):
    port = tcp_listener.getsockname()[1]
    result = run(f"""
        def enter(path):
            fd = os.open(path, os.O_RDONLY)
            check(libc.setns(fd, 0))
            return path
        attempt("host-pid", lambda: enter("/proc/{os.getpid()}/ns/net"))
        attempt("host-init", lambda: enter("/proc/1/ns/net"))
        attempt("self", lambda: enter("/proc/self/ns/net"))
        attempt("then-connect", lambda: socket.create_connection(("127.0.0.1", {port}), timeout=1))
    """)
    assert_contained(result, "host-pid", "host-init", "self", "then-connect")
    assert_no_connection(tcp_listener)


@needs_sandbox
def test_new_namespaces_cannot_be_created():
    clone_newuser, clone_newns, clone_newnet = 0x10000000, 0x00020000, 0x40000000
    result = run(f"""
        attempt("unshare-user", lambda: check(libc.unshare({clone_newuser})))
        attempt("unshare-mount", lambda: check(libc.unshare({clone_newns})))
        attempt("unshare-net", lambda: check(libc.unshare({clone_newnet})))
        attempt("clone-user", lambda: check(libc.syscall({syscall_number("clone")}, {clone_newuser | 17}, 0, 0, 0, 0)))
        attempt("clone3", lambda: check(libc.syscall({syscall_number("clone3")}, 0, 0)))
    """)
    assert_contained(result, "unshare-user", "unshare-mount", "unshare-net", "clone-user", "clone3")
    assert "Operation not permitted" in result.stdout


@needs_sandbox
def test_mount_chroot_and_pivot_root_fail():
    result = run(f"""
        attempt("mount-tmpfs", lambda: check(libc.mount(b"none", b"/tmp", b"tmpfs", 0, None)))
        attempt("mount-proc", lambda: check(libc.mount(b"proc", b"/tmp", b"proc", 0, None)))
        attempt("remount-root-rw", lambda: check(libc.mount(None, b"/", None, 32 | 1 << 5, None)))
        attempt("mount-cgroup", lambda: check(libc.mount(b"cgroup2", b"/tmp", b"cgroup2", 0, None)))
        os.mkdir("/tmp/jail")
        attempt("chroot", lambda: check(libc.chroot(b"/tmp/jail")))
        attempt("pivot-root", lambda: check(libc.syscall({syscall_number("pivot_root")}, b"/tmp", b"/tmp/jail")))
        attempt("open-by-handle", lambda: check(libc.syscall({syscall_number("open_by_handle_at")}, 3, 0, 0)))
    """)
    assert_contained(result, "mount-tmpfs", "mount-proc", "remount-root-rw", "mount-cgroup", "chroot", "pivot-root",
                     "open-by-handle")


@needs_sandbox
def test_no_capabilities_no_new_privileges_no_root():
    result = run("""
        status = dict(line.split(":", 1) for line in open("/proc/self/status"))
        print({k: status[k].strip() for k in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb", "NoNewPrivs",
                                                "Seccomp")})
        print(os.getuid(), os.geteuid(), os.getgid(), os.getgroups())
        attempt("setuid-0", lambda: os.setuid(0))
        attempt("setresuid-0", lambda: os.setresuid(0, 0, 0))
        attempt("setgroups", lambda: os.setgroups([0]))
        attempt("chown", lambda: os.chown("/tmp", 0, 0))
    """)
    assert_contained(result, "setuid-0", "setresuid-0", "setgroups", "chown")
    status = eval(result.stdout.splitlines()[0])
    assert status == {"CapInh": "0000000000000000", "CapPrm": "0000000000000000", "CapEff": "0000000000000000",
                      "CapBnd": "0000000000000000", "CapAmb": "0000000000000000", "NoNewPrivs": "1",
                      "Seccomp": "2"} or (os.geteuid() != 0 and status["CapEff"] == "0000000000000000")
    uid, euid, gid, groups = result.stdout.splitlines()[1].split(" ", 3)
    assert uid == euid != "0" and gid != "0" and groups == "[]"


@needs_sandbox
def test_every_denied_syscall_fails_with_eperm():
    numbers = {name: syscall_number(name) for name in execution.SECCOMP_DENIED}
    numbers = {name: nr for name, nr in numbers.items() if nr >= 0}
    result = run(f"""
        for name, nr in {numbers!r}.items():
            rc = libc.syscall(nr, 0, 0, 0, 0, 0, 0)
            failed_with = ctypes.get_errno() if rc == -1 else None
            print(name, "EPERM" if failed_with == errno.EPERM else f"rc={{rc}} errno={{failed_with}}")
    """)
    assert result.success, result.stderr
    outcomes = dict(line.split(" ", 1) for line in result.stdout.splitlines())
    assert outcomes == {name: "EPERM" for name in numbers}


@needs_sandbox
@pytest.mark.skipif(platform.machine() != "x86_64", reason="the 32-bit syscall ABI trick is x86-64 machine code")
def test_32_bit_syscalls_do_not_bypass_the_filter():
    """int 0x80 runs the i386 syscall table, whose numbers differ: a filter checking x86-64 numbers only would let
    i386 unshare (310) through. The filter checks the architecture and kills the process instead."""
    result = execute_code("""
import ctypes, mmap
code = bytes([0xB8, 0x36, 0x01, 0, 0,           # mov eax, 310 (unshare on i386)
              0xBB, 0, 0, 0, 0x10,               # mov ebx, CLONE_NEWUSER
              0xCD, 0x80,                        # int 0x80
              0xC3])                             # ret
buf = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
buf.write(code)
address = ctypes.addressof(ctypes.c_char.from_buffer(buf))
rc = ctypes.CFUNCTYPE(ctypes.c_int)(address)()
print("ESCAPED" if rc == 0 else f"blocked i386-unshare: {rc}")
""")
    assert "ESCAPED" not in result.stdout and result.stdout == ""  # killed at the int 0x80, nothing after it ran
    assert result.error in ("killed by signal SIGSYS", "killed by signal SIGSEGV")  # SEGV: no i386 emulation


# ---------------------------------------------------------------------------------------------------------------
# Other processes: invisible, unreachable


@needs_sandbox
def test_proc_shows_only_the_sandbox(monkeypatch):
    monkeypatch.setenv("NANOCHAT_TEST_SECRET", "s3cret-in-the-host-env")
    result = run("""
        pids = [p for p in os.listdir("/proc") if p.isdigit()]
        print(len(pids))
        for pid in pids:  # all of them the sandbox's own: bwrap's pid 1 and the program
            for name in ("environ", "cmdline"):
                try:
                    print(pid, name, open(f"/proc/{pid}/{name}", "rb").read())
                except OSError as e:
                    print(pid, name, e)
        print(dict(os.environ))
    """, max_output_bytes=1_000_000)
    out = result.stdout
    assert result.success and "s3cret" not in out and "pytest" not in out and REPO not in out
    assert int(out.splitlines()[0]) <= 3  # bwrap's pid 1, the program (and the listing's own thread at most)
    env = eval(out.splitlines()[-1])
    assert set(env) <= {"PATH", "HOME", "TMPDIR", "LANG", "LC_CTYPE", "PWD"}


@needs_sandbox
def test_host_processes_survive_kill_and_ptrace():
    sentinel = subprocess.Popen(["sleep", "30"])
    try:
        result = run(f"""
            attempt("kill-host-pid", lambda: os.kill({sentinel.pid}, 9))
            attempt("kill-test", lambda: os.kill({os.getpid()}, 9))
            try:
                os.kill(os.getppid(), 9)  # bwrap's pid 1, which its own namespace cannot kill
            except OSError:
                pass
            attempt("ptrace-attach-1", lambda: check(libc.ptrace(16, 1, 0, 0)))
            readv = {syscall_number("process_vm_readv")}
            attempt("process-vm-readv", lambda: check(libc.syscall(readv, 1, 0, 0, 0, 0, 0)))
            attempt("kill-everything", lambda: check(os.kill(-1, 9)) or "sent")
        """)
        # kill(-1) "succeeds" on the sandbox's own processes: the point is the host's sentinel
        assert "ESCAPED" not in result.stdout.replace("ESCAPED kill-everything", "")
        for label in ("kill-host-pid", "kill-test", "ptrace-attach-1", "process-vm-readv"):
            assert f"blocked {label}:" in result.stdout, result.stdout
        assert sentinel.poll() is None  # still running
    finally:
        sentinel.kill()
        sentinel.wait()


# ---------------------------------------------------------------------------------------------------------------
# Limits: cgroups and rlimits that the code cannot raise


@needs_sandbox
def test_limits_cannot_be_raised_or_tampered_with():
    result = run("""
        import resource
        for name in ("RLIMIT_NPROC", "RLIMIT_AS", "RLIMIT_CPU", "RLIMIT_FSIZE", "RLIMIT_NOFILE"):
            limit = getattr(resource, name)
            attempt(name, lambda: resource.setrlimit(limit, (resource.RLIM_INFINITY, resource.RLIM_INFINITY)))
        attempt("prlimit-1", lambda: resource.prlimit(1, resource.RLIMIT_NPROC, (10 ** 6, 10 ** 6)))
        attempt("cgroup-pids", lambda: write("/sys/fs/cgroup/pids/pids.max", b"max"))
        attempt("cgroup-memory", lambda: write("/sys/fs/cgroup/memory.max", b"max"))
        attempt("cgroup-procs", lambda: write("/sys/fs/cgroup/cgroup.procs", b"0"))
        print(open("/proc/self/cgroup").read().replace(chr(10), " "))
    """)
    assert_contained(result, "RLIMIT_NPROC", "RLIMIT_AS", "RLIMIT_CPU", "RLIMIT_FSIZE", "RLIMIT_NOFILE", "prlimit-1",
                     "cgroup-pids", "cgroup-memory", "cgroup-procs")
    assert "nanochat-sandbox" not in result.stdout  # its own cgroup namespace: not even the cgroup's name shows


FORK_BOMB = r"""
import ctypes, os, sys
libc = ctypes.CDLL(None)
forks = 0
while forks < 300:
    pid = libc.fork()  # libc directly: nothing in Python stands in the way
    if pid < 0:
        break  # the kernel refused: the process limit holds
    if pid == 0:
        libc.prctl(15, b"ncbomb", 0, 0, 0)  # PR_SET_NAME, so the test can look for survivors
        libc.pause()
    forks += 1
print(forks)
"""


@needs_sandbox
def test_fork_bomb_is_capped_and_cleaned_up():
    result = execute_code(FORK_BOMB, timeout=5.0)
    assert result.success, result.stderr
    assert 0 < int(result.stdout) <= execution.MAX_PROCESSES + 2  # capped far below the 300 it tried
    assert count_processes_named("ncbomb") == 0  # every child died with the run, before execute_code returned


@needs_sandbox
def test_fork_bomb_is_capped_by_the_rlimit_alone_without_cgroups(monkeypatch):
    """Where cgroups are not writable (a normal user), RLIMIT_NPROC of the run's own uid still holds."""
    monkeypatch.setattr(execution, "cgroup_homes", lambda: ())
    result = execute_code(FORK_BOMB, timeout=5.0)
    assert result.success and 0 < int(result.stdout) <= execution.MAX_PROCESSES + 1, result
    assert count_processes_named("ncbomb") == 0


@needs_sandbox
@pytest.mark.skipif(not execution.cgroup_homes(), reason="cgroups are not writable here (not root)")
def test_run_is_confined_to_a_cgroup_with_limits_that_is_removed_afterwards():
    import threading

    found = {}

    def inspect():  # from the host, while the program sleeps
        deadline = time.time() + 5
        while time.time() < deadline and not found:
            for home, _ in execution.cgroup_homes():
                for path in glob.glob(os.path.join(home, f"nanochat-sandbox-{os.getpid()}-*")):
                    try:
                        files = {name: open(os.path.join(path, name)).read().strip() for name in os.listdir(path)
                                 if name in ("pids.max", "memory.max", "memory.limit_in_bytes", "cpu.max",
                                             "cpu.cfs_quota_us", "cgroup.procs")}
                    except OSError:
                        continue
                    if files.get("cgroup.procs"):
                        found[path] = files
            time.sleep(0.01)

    watcher = threading.Thread(target=inspect)
    watcher.start()
    result = execute_code("import time\ntime.sleep(0.5)\nprint('ok')", maximum_memory_bytes=128 * 1024 ** 2)
    watcher.join()
    assert result.success and found
    limits = {name: value for files in found.values() for name, value in files.items()}
    tmpfs = execution.WORKDIR_BYTES + execution.SHM_BYTES
    expected_memory = str(128 * 1024 ** 2 + tmpfs + execution.CGROUP_SLACK_BYTES)
    if "pids.max" in limits:
        assert limits["pids.max"] == str(execution.MAX_PROCESSES + 5)  # + bwrap, the prelude and slack
    assert limits.get("memory.max", limits.get("memory.limit_in_bytes")) in (expected_memory, None)
    assert limits.get("cpu.max", "100000 100000") == "100000 100000"
    assert limits.get("cpu.cfs_quota_us", "100000") == "100000"
    assert not any(os.path.exists(path) for path in found)  # removed once the run was over


@needs_sandbox
@pytest.mark.slow
@pytest.mark.skipif(not any("memory" in c for _, c in execution.cgroup_homes()), reason="no memory cgroup here")
def test_memory_bomb_spread_over_processes_is_stopped_by_the_cgroup():
    """Each process stays under RLIMIT_AS; together they would take 16 x 200 MB. The memory cgroup stops them."""
    result = execute_code("""
import os, time
children = []
for i in range(14):
    pid = os.fork()
    if pid == 0:
        block = bytearray(200 * 1024 ** 2)
        for j in range(0, len(block), 4096):
            block[j] = 1  # touch every page: resident, not just reserved
        time.sleep(3)
        os._exit(0)
    children.append(pid)
killed = sum(os.waitpid(pid, 0)[1] & 0x7F == 9 for pid in children)
print(killed)
""", timeout=20.0, maximum_memory_bytes=256 * 1024 ** 2)
    assert result.success and int(result.stdout) > 0, result  # some children were OOM-killed


@needs_sandbox
def test_thread_bomb_is_capped():
    result = execute_code("""
import threading, time
threads = []
try:
    for _ in range(500):
        t = threading.Thread(target=time.sleep, args=(2,), daemon=True)
        t.start()
        threads.append(t)
except RuntimeError as e:
    print(len(threads), e)
""")
    assert result.success and int(result.stdout.split()[0]) <= execution.MAX_PROCESSES + 2, result


@needs_sandbox
def test_daemon_does_not_outlive_the_call():
    result = execute_code("""
import ctypes, os, time
libc = ctypes.CDLL(None)
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        libc.prctl(15, b"ncdaemon", 0, 0, 0)
        import signal
        for s in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
            signal.signal(s, signal.SIG_IGN)
        while True:
            time.sleep(0.05)
    os._exit(0)
time.sleep(0.2)
print("parent done")
""")
    assert result.success and result.stdout == "parent done\n"
    assert count_processes_named("ncdaemon") == 0  # checked right away: no grace period


@needs_sandbox
@pytest.mark.slow
def test_sandbox_dies_with_a_killed_evaluator_and_its_cgroup_is_swept_later():
    """SIGKILL the evaluating process mid-run: bwrap's --die-with-parent takes the sandbox down, and the next
    process to use cgroups removes the run's leftover (empty) cgroup."""
    program = ("import ctypes, time\nctypes.CDLL(None).prctl(15, b'ncorphan', 0, 0, 0)\nprint('up', flush=True)\n"
               "time.sleep(60)")
    evaluator = subprocess.Popen([sys.executable, "-c", f"from nanochat.execution import execute_code\n"
                                  f"execute_code({program!r}, timeout=60)"], cwd=REPO)
    try:
        deadline = time.time() + 20
        while count_processes_named("ncorphan") == 0 and time.time() < deadline:
            time.sleep(0.05)
        assert count_processes_named("ncorphan") == 1
    finally:
        evaluator.kill()
        evaluator.wait()
    deadline = time.time() + 5
    while count_processes_named("ncorphan") and time.time() < deadline:
        time.sleep(0.05)
    assert count_processes_named("ncorphan") == 0
    pattern = f"nanochat-sandbox-{evaluator.pid}-*"
    leftovers = [path for home, _ in execution.cgroup_homes() for path in glob.glob(os.path.join(home, pattern))]
    assert len(leftovers) == len(execution.cgroup_homes())  # one per hierarchy: nobody could remove them
    execution.cgroup_homes.cache_clear()
    execution.cgroup_homes()
    assert not any(os.path.exists(path) for path in leftovers)


@needs_sandbox
def test_child_left_running_at_timeout_is_killed():
    result = execute_code("""
import ctypes, os, time
if os.fork() == 0:
    ctypes.CDLL(None).prctl(15, b"nclinger", 0, 0, 0)
    while True:
        time.sleep(0.05)
time.sleep(60)
""", timeout=1.0)
    assert result.timeout
    assert count_processes_named("nclinger") == 0


@needs_sandbox
def test_memory_bomb_fails_fast():
    start = time.time()
    result = execute_code("x = bytearray(10 * 1024 ** 3)\nprint('allocated')")
    assert time.time() - start < 5.0
    assert not result.success and result.memory_exceeded and result.stdout == ""


@needs_sandbox
def test_disk_bomb_stops_at_the_tmpfs_size_and_the_file_size_limit():
    result = run(f"""
        chunk = b"x" * (1 << 20)
        def fill(prefix, count):
            written = 0
            for i in range(count):
                with open(f"{{prefix}}{{i}}", "wb") as f:
                    for _ in range(8):
                        f.write(chunk)
                        f.flush()
                        written += len(chunk)
            return written
        attempt("big-file", lambda: write("/tmp/big", chunk * ({execution.FILE_SIZE_LIMIT} // len(chunk) + 1)))
        os.remove("/tmp/big")
        attempt("fill-tmpfs", lambda: fill("/tmp/f", 1000))
        print(sum(os.path.getsize(f"/tmp/{{n}}") for n in os.listdir("/tmp")))
    """)
    assert_contained(result, "big-file", "fill-tmpfs")
    assert "File too large" in result.stdout and "No space left on device" in result.stdout
    assert int(result.stdout.splitlines()[-1]) <= execution.WORKDIR_BYTES


@needs_sandbox
def test_output_bomb_is_truncated_and_bounded():
    start = time.time()
    result = execute_code("import sys\nwhile True:\n    sys.stdout.write('z' * 65536)\n", timeout=5.0)
    assert time.time() - start < 5.0  # the file size limit stops it, not the timeout
    assert not result.timeout and len(result.stdout) < 11_000
    assert f"{execution.FILE_SIZE_LIMIT} bytes in total" in result.stdout  # never more than that on the host


# ---------------------------------------------------------------------------------------------------------------
# The tricks that undid the old in-process guard now reach nothing


@needs_sandbox
def test_reimported_modules_reach_nothing_outside(tmp_path):
    markers = {name: tmp_path / name for name in ("ctypes", "posix", "subprocess", "posixsubprocess", "child")}
    result = run(f"""
        for name in ("ctypes", "_ctypes", "posix", "subprocess", "_posixsubprocess"):
            sys.modules.pop(name, None)
        import ctypes, posix, subprocess, _posixsubprocess
        def ran(rc):  # system() and friends report failure in their return value
            if rc != 0:
                raise OSError(f"returned {{rc}}")
            return rc
        attempt("ctypes-system", lambda: ran(ctypes.CDLL(None).system(b"touch {markers['ctypes']}")))
        attempt("posix-execv", lambda: posix.execv("/bin/sh", ["sh", "-c", "touch {markers['posix']}"]))
        attempt("subprocess", lambda: subprocess.run(["touch", "{markers['subprocess']}"]))
        attempt("posix-spawn", lambda: ran(os.waitpid(os.posix_spawn(
            "/usr/bin/touch", ["touch", "{markers['posixsubprocess']}"], {{}}), 0)[1]))
        child = subprocess.run([sys.executable, "-c", "open({str(markers['child'])!r}, 'w')"], capture_output=True)
        attempt("python-child", lambda: child.check_returncode() or child)
    """)
    assert_contained(result, "ctypes-system", "posix-execv", "subprocess", "posix-spawn", "python-child")
    assert not any(marker.exists() for marker in markers.values())


@needs_sandbox
def test_inherited_descriptors_are_closed(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("host secret 9012")
    fd = os.open(secret, os.O_RDONLY)
    os.set_inheritable(fd, True)  # even a descriptor the parent forgot to mark close-on-exec
    try:
        result = run(f"""
            print(sorted(os.listdir("/proc/self/fd")))
            attempt("fd-{fd}", lambda: os.read({fd}, 100))
            for pid in ("self", "1"):  # bwrap's pid 1 holds the program's stdio and an eventfd, nothing else
                try:
                    print(pid, [os.readlink(f"/proc/{{pid}}/fd/{{n}}") for n in os.listdir(f"/proc/{{pid}}/fd")])
                except OSError as e:
                    print(pid, e)
            open_fds = []
            for n in range(3, 1024):
                try:
                    os.fstat(n)
                    open_fds.append(n)
                except OSError:
                    pass
            print(open_fds)
        """)
        assert_contained(result, f"fd-{fd}")
        lines = result.stdout.splitlines()
        assert eval(lines[0]) in (["0", "1", "2", "3"], ["0", "1", "2"])  # 3: listdir's own
        assert lines[-1] == "[]" and "host secret" not in result.stdout and str(secret) not in result.stdout
    finally:
        os.close(fd)


@needs_sandbox
def test_devices_and_kernel_interfaces_are_out_of_reach():
    result = run("""
        for path in ("/dev/mem", "/dev/kmsg", "/dev/sda", "/dev/vda", "/dev/nvidia0", "/proc/kcore",
                     "/proc/sysrq-trigger", "/proc/sys/kernel/core_pattern", "/sys/fs/cgroup"):
            attempt(path, lambda: write(path, b"x"))
        attempt("keyctl", lambda: check(libc.syscall(%d, 0, -4, 0, 0, 0)))  # KEYCTL_GET_KEYRING_ID of the user's
        attempt("bpf", lambda: check(libc.syscall(%d, 0, 0, 0)))
    """ % (syscall_number("keyctl"), syscall_number("bpf")))
    assert_contained(result, "/dev/mem", "/dev/kmsg", "/proc/kcore", "/proc/sys/kernel/core_pattern", "keyctl", "bpf")


@needs_sandbox
def test_sandbox_in_parallel_threads_keeps_runs_apart():
    from concurrent.futures import ThreadPoolExecutor

    code = "import os, time\nopen('/tmp/mine', 'w').write(str(os.getpid()))\ntime.sleep(0.2)\nprint(os.listdir('/tmp'))"
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: execute_code(code), range(4)))
    assert all(r.success and r.stdout == "['mine']\n" for r in results), results


# ---------------------------------------------------------------------------------------------------------------
# Host resources beyond the documented limits, and how a run ended


def free_bytes(path):
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


GROW_OUTPUT = {  # ways to grow an output file that a file-size limit does not see, and plain volume
    "fallocate": "os.posix_fallocate(1, 0, 2 * 1024**3)",
    "truncate": "os.ftruncate(1, 2 * 1024**3); os.ftruncate(2, 2 * 1024**3)",
    "seek past the end": "os.lseek(1, 2 * 1024**3, 0); os.write(1, b'x')",
    "volume": "while True: os.write(2, b'y' * 65536)",
}


@needs_sandbox
@pytest.mark.parametrize("how", list(GROW_OUTPUT))
def test_output_takes_no_host_disk(tmp_path, how):
    """The program's stdout and stderr are pipes read into a bounded buffer: no file of the host grows, whatever
    the program does to them (judged from outside: the free space of the temp dir's and the root file system)."""
    disks = {tempfile_dir(), "/"}
    before = {d: free_bytes(d) for d in disks}
    result = execute_code(f"import os\ntry:\n    {GROW_OUTPUT[how]}\nexcept OSError as e:\n    print(e)\n", timeout=10)
    for d in disks:
        assert before[d] - free_bytes(d) < execution.FILE_SIZE_LIMIT, (how, d)  # other processes write too
    assert not result.timeout, result  # a pipe refuses the first three; the volume is cut at the limit
    assert len(result.stdout) < 11_000 and len(result.stderr) < 11_000
    if how == "volume":
        assert result.error == f"stopped: more than {execution.FILE_SIZE_LIMIT} bytes of output"


def tempfile_dir():
    import tempfile

    return tempfile.gettempdir()


@needs_sandbox
def test_exit_status_137_is_not_memory():
    result = execute_code("import sys\nsys.exit(137)")
    assert not result.success and not result.memory_exceeded and result.error == "exited with status 137"
    killed = execute_code("import os, signal\nos.kill(os.getpid(), signal.SIGKILL)")
    assert not killed.memory_exceeded and killed.error == "killed by signal SIGKILL"


@needs_sandbox
def test_lone_surrogate_is_a_result_not_an_exception():
    result = execute_code("print('\ud800')")
    assert not result.success and result.error.startswith("the code is not valid text")
    ok = execute_code("print('caf\u00e9')")  # ordinary non-ASCII text runs
    assert ok.success and ok.stdout == "caf\u00e9\n"
