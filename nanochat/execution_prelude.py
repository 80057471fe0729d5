"""
Runs inside the sandbox (see nanochat/execution.py), before the untrusted program, as the interpreter's `-c` script.
Standard library only: nothing else is visible in there.

It is not what contains the program (the namespaces, seccomp filter and cgroups outside it are); it only finishes
the set-up that has to happen in the sandboxed process itself, then runs the program:
1. reads the program from stdin, then points stdin at /dev/null;
2. when bwrap ran as root: gives up root for the run's own uid, and every capability with it;
3. sets resource limits, hard and soft alike, so the program cannot raise them;
4. tells the parent the sandbox is up (one byte on the ready pipe), closes every other inherited descriptor;
5. runs the program in a child process, its traceback starting at its own first frame, and tells the parent how
   that process ended ("exit N" or "signal N" on the ready pipe, which the program itself never holds): a program
   that exits with 137 of its own accord is then not taken for one the kernel killed (bwrap reports signal N as
   status 128 + N, so the status alone cannot tell them apart).

argv: memory_bytes cpu_seconds file_bytes max_processes max_files run_as_uid ready_fd (-1 = no limit / none).
"""

import builtins
import faulthandler
import linecache
import os
import resource
import sys

PR_CAPBSET_DROP = 24  # prctl option: remove one capability from the bounding set
LINUX_CAPABILITY_VERSION_3 = 0x20080522
CAPABILITY_FIELDS = ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")


def drop_root(uid):
    """From uid 0 with CAP_SETUID, CAP_SETGID and CAP_SETPCAP only, to `uid` with no capability in any set."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    for cap in range(64):  # past the last capability the kernel answers EINVAL, which is fine
        libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0)
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)  # leaving uid 0 clears the permitted, effective and ambient sets

    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    class Data(ctypes.Structure):
        _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]

    if libc.capset(ctypes.byref(Header(LINUX_CAPABILITY_VERSION_3, 0)), (Data * 2)()) != 0:  # inheritable too
        raise OSError(ctypes.get_errno(), "capset failed")
    with open("/proc/self/status") as f:
        left = [line.split()[0] for line in f if line.startswith(CAPABILITY_FIELDS) and int(line.split()[1], 16)]
    if os.getuid() != uid or os.geteuid() != uid or left:
        raise OSError(f"privileges still held after the drop: uid {os.geteuid()}, non-empty {left}")


def set_limits(memory, cpu_seconds, file_bytes, max_processes, max_files):
    for limit, value in ((resource.RLIMIT_AS, memory), (resource.RLIMIT_DATA, memory),
                         (resource.RLIMIT_CPU, cpu_seconds), (resource.RLIMIT_FSIZE, file_bytes),
                         (resource.RLIMIT_NPROC, max_processes), (resource.RLIMIT_NOFILE, max_files),
                         (resource.RLIMIT_CORE, 0)):
        if value >= 0:
            resource.setrlimit(limit, (value, value))


def run(code):
    linecache.cache["<sandbox>"] = (len(code), None, code.splitlines(True), "<sandbox>")  # tracebacks show lines
    try:
        exec(compile(code, "<sandbox>", "exec"), {"__name__": "__main__", "__builtins__": builtins})
    except SystemExit:
        raise
    except BaseException as e:  # the traceback from the program's first frame on, with its source lines
        import traceback

        traceback.print_exception(type(e), e, e.__traceback__.tb_next)
        sys.exit(1)


def main(argv):
    memory, cpu_seconds, file_bytes, max_processes, max_files, run_as_uid, ready_fd = (int(a) for a in argv)
    code = sys.stdin.read()
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    try:
        if run_as_uid >= 0:
            drop_root(run_as_uid)
        set_limits(memory, cpu_seconds, file_bytes, max_processes, max_files)
    except OSError as e:
        print(f"sandbox set-up failed: {e}", file=sys.stderr)
        sys.exit(125)
    if ready_fd >= 0:
        os.write(ready_fd, b"1")
    for fd in [int(name) for name in os.listdir("/proc/self/fd")]:  # e.g. a descriptor bwrap was handed
        if fd > 2 and fd != ready_fd:
            try:
                os.close(fd)
            except OSError:
                pass  # the descriptor listdir itself used
    pid = os.fork()
    if pid == 0:  # the program: no descriptor but stdin (/dev/null), stdout and stderr
        if ready_fd >= 0:
            os.close(ready_fd)
        faulthandler.disable()
        builtins.exit = builtins.quit = sys.exit  # `site` is not imported (-S), so these are not defined otherwise
        run(code)  # then a normal interpreter exit: atexit handlers run, non-daemon threads are joined
        sys.exit(0)
    while True:  # as the namespace's pid 1, also reap the program's orphans until the program itself ends
        done, wait_status = os.waitpid(-1, 0)
        if done == pid:
            report(ready_fd, wait_status)


def report(ready_fd, wait_status):
    """Tell the parent how the program ended, and end the same way (status N, or 128 + the signal)."""
    if os.WIFSIGNALED(wait_status):
        how, status = f"signal {os.WTERMSIG(wait_status)}", 128 + os.WTERMSIG(wait_status)
    else:
        status = os.WEXITSTATUS(wait_status)
        how = f"exit {status}"
    if ready_fd >= 0:
        os.write(ready_fd, how.encode())
    os._exit(status)


if __name__ == "__main__":
    main(sys.argv[1:])
