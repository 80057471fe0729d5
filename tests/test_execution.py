"""The code sandbox: results, limits (time, memory, processes, output), no network, disabled functions, cleanup."""

import os
import socket
import time

import pytest

from nanochat import execution
from nanochat.execution import ExecutionResult, execute_code


def test_success_captures_stdout():
    result = execute_code("x = 6 * 7\nprint('answer', x)")
    assert result == ExecutionResult(success=True, stdout="answer 42\n", stderr="", error=None, timeout=False,
                                     memory_exceeded=False)


def test_exception_fails_with_traceback():
    result = execute_code("def f():\n    raise ValueError('boom')\n\nf()")
    assert not result.success and not result.timeout and not result.memory_exceeded
    assert "Traceback (most recent call last)" in result.stderr
    assert 'File "<sandbox>", line 2, in f' in result.stderr  # the code's own line numbers
    assert "raise ValueError('boom')" in result.stderr
    assert result.error == "ValueError: boom"


def test_exit_status_decides_success():
    assert execute_code("import sys\nsys.exit(0)").success
    result = execute_code("import sys\nsys.exit(3)")
    assert not result.success and result.error == "exited with status 3"


def test_infinite_loop_is_killed_by_timeout():
    start = time.time()
    result = execute_code("while True:\n    pass", timeout=1.0)
    assert time.time() - start < 4.0
    assert result.timeout and not result.success
    assert "timed out after 1 s" in result.error


def test_sleeping_code_is_killed_by_wall_clock():
    start = time.time()
    result = execute_code("import time\nprint('before', flush=True)\ntime.sleep(60)", timeout=1.0)
    assert time.time() - start < 4.0
    assert result.timeout and result.stdout == "before\n"


def test_huge_allocation_fails_quickly_with_memory_exceeded():
    start = time.time()
    result = execute_code("x = bytearray(10 * 1024 ** 3)\nprint('allocated')")
    assert time.time() - start < 5.0
    assert not result.success and result.memory_exceeded and not result.timeout
    assert result.stdout == "" and "MemoryError" in result.error


def test_moderate_allocation_is_fine():
    result = execute_code("x = bytearray(20 * 1024 ** 2)\nprint(len(x))")
    assert result.success and result.stdout == f"{20 * 1024 ** 2}\n"


def test_fork_bomb_is_refused_by_the_guard():
    start = time.time()
    result = execute_code("import os\nwhile True:\n    os.fork()")
    assert time.time() - start < 4.0
    assert not result.success and "NoneType" in result.error
    result = execute_code("import subprocess\nsubprocess.Popen(['sh', '-c', 'echo hi'])")
    assert not result.success and result.stdout == ""


BOMB = r"""
import sys
for name in ("ctypes", "_ctypes"):  # undo the in-process guard, as hostile code could
    sys.modules.pop(name, None)
import ctypes
libc = ctypes.CDLL(None)
forks = 0
while forks < 300:
    pid = libc.fork()
    if pid < 0:
        break  # the kernel refused: the process limit holds
    if pid == 0:
        libc.prctl(15, b"ncbomb", 0, 0, 0)  # PR_SET_NAME, so the test can look for survivors
        libc.pause()
    forks += 1
print(forks)
"""


def count_processes_named(name):
    n = 0
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/comm") as f:
                n += f.read().strip() == name
        except OSError:
            pass
    return n


@pytest.mark.skipif(not execution.process_limit_enforced(),
                    reason="running as root without a writable pids cgroup: RLIMIT_NPROC does not apply to root")
def test_fork_bomb_past_the_guard_is_capped_by_the_kernel_and_cleaned_up():
    start = time.time()
    result = execute_code(BOMB, timeout=5.0)
    assert time.time() - start < 8.0
    assert result.success, result.stderr
    forks = int(result.stdout)
    assert 0 < forks <= execution.MAX_PROCESSES + 4  # capped far below the 300 it tried
    assert count_processes_named("ncbomb") == 0  # every child died with the run


def test_socket_connect_to_localhost_is_blocked():
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(0.3)
    port = server.getsockname()[1]
    try:
        code = f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=2)\nprint('connected')"
        result = execute_code(code)
        assert not result.success and "connected" not in result.stdout
        assert "network access is disabled" in result.error
        code = f"import socket\ns = socket.socket()\ns.connect(('127.0.0.1', {port}))\nprint('connected')"
        result = execute_code(code)
        assert not result.success and "PermissionError" in result.error
        with pytest.raises(socket.timeout):
            server.accept()  # nothing ever reached the listener
    finally:
        server.close()


@pytest.mark.skipif("--net" not in execution._unshare_prefix(), reason="unshare --net is not available here")
def test_network_namespace_blocks_sockets_that_get_past_the_guard():
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(0.3)
    port = server.getsockname()[1]
    code = ("import socket\nreal = socket.socket.__mro__[-2]  # _socket.socket, the C type under the guard\n"
            f"s = real()\ns.settimeout(2)\ns.connect(('127.0.0.1', {port}))\nprint('connected')")
    try:
        result = execute_code(code)
        assert not result.success and "connected" not in result.stdout
        assert "OSError" in result.error or "unreachable" in result.error.lower()
        with pytest.raises(socket.timeout):
            server.accept()
    finally:
        server.close()


def test_os_system_and_file_removal_are_disabled(tmp_path):
    marker = tmp_path / "marker"
    result = execute_code(f"import os\nos.system('touch {marker}')")
    assert not result.success and "NoneType" in result.error
    assert not marker.exists()
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    for code in (f"import os\nos.remove({str(victim)!r})", f"import shutil\nshutil.rmtree({str(tmp_path)!r})",
                 f"import os\nos.unlink({str(victim)!r})", "import os\nos.kill(1, 9)"):
        assert not execute_code(code).success, code
    assert victim.read_text() == "keep me"


def test_output_is_truncated():
    result = execute_code("print('x' * 100_000)\nimport sys\nprint('y' * 50_000, file=sys.stderr)",
                          max_output_bytes=1000)
    assert result.success
    assert result.stdout.startswith("x" * 1000)
    assert "output truncated: 100001 bytes" in result.stdout and len(result.stdout) < 1200
    assert result.stderr.startswith("y" * 1000) and len(result.stderr) < 1200


def test_endless_output_is_bounded():
    start = time.time()
    result = execute_code("while True:\n    print('z' * 1000)", timeout=5.0)
    assert time.time() - start < 8.0
    assert not result.success and len(result.stdout) < 11_000


def test_temporary_working_directory_is_removed():
    result = execute_code("import os\nopen('scratch.txt', 'w').write('hi')\nprint(os.getcwd())")
    assert result.success
    workdir = result.stdout.strip()
    assert os.path.basename(workdir).startswith("nanochat-exec-")
    assert workdir != os.getcwd() and not os.path.exists(workdir)


def test_child_gets_no_stdin_and_a_scrubbed_environment(monkeypatch):
    monkeypatch.setenv("NANOCHAT_TEST_SECRET", "s3cret")
    result = execute_code("import os\nprint(os.environ.get('NANOCHAT_TEST_SECRET'))\nprint(input())")
    assert result.stdout == "None\n" and result.error == "EOFError: EOF when reading a line"


def test_code_runs_in_another_process():
    result = execute_code("import os\nprint(os.getpid())")
    assert result.success and int(result.stdout) != os.getpid()
