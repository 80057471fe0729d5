"""execute_code's results: output, errors, exit status, timeouts, memory, truncation. What the sandbox contains
(escape attempts, bombs, refusal without bwrap) is in tests/reliability/test_sandbox.py."""

import time

import pytest

from nanochat import execution
from nanochat.execution import ExecutionResult, execute_code

SANDBOX_PROBLEM = execution.sandbox_problem()
pytestmark = pytest.mark.skipif(SANDBOX_PROBLEM is not None, reason=f"no sandbox here: {SANDBOX_PROBLEM}")


def test_success_captures_stdout():
    result = execute_code("x = 6 * 7\nprint('answer', x)")
    assert result == ExecutionResult(success=True, stdout="answer 42\n", stderr="", error=None, timeout=False,
                                     memory_exceeded=False)


def test_unicode_round_trips():
    result = execute_code("s = 'héllo → 世界'\nprint(s, len(s))")
    assert result.success and result.stdout == "héllo → 世界 10\n"


def test_exception_fails_with_traceback():
    result = execute_code("def f():\n    raise ValueError('boom')\n\nf()")
    assert not result.success and not result.timeout and not result.memory_exceeded
    assert "Traceback (most recent call last)" in result.stderr
    assert 'File "<sandbox>", line 2, in f' in result.stderr  # the code's own line numbers
    assert "raise ValueError('boom')" in result.stderr
    assert "execution_prelude" not in result.stderr and "<string>" not in result.stderr  # the prelude's frame is cut
    assert result.error == "ValueError: boom"


def test_exit_status_decides_success():
    assert execute_code("import sys\nsys.exit(0)").success
    assert execute_code("print('done')\nexit()").success  # the builtin, though `site` is not imported
    result = execute_code("import sys\nsys.exit(3)")
    assert not result.success and result.error == "exited with status 3"


def test_death_by_signal_is_reported():
    result = execute_code("import os, signal\nos.kill(os.getpid(), signal.SIGSEGV)")
    assert not result.success and result.error == "killed by signal SIGSEGV"


def test_infinite_loop_is_killed_by_timeout():
    start = time.time()
    result = execute_code("while True:\n    pass", timeout=1.0)
    assert time.time() - start < 3.0
    assert result.timeout and not result.success
    assert result.error == "timed out after 1 s (process killed)"


def test_sleeping_code_is_killed_by_wall_clock_and_keeps_its_output():
    start = time.time()
    result = execute_code("import time\nprint('before', flush=True)\ntime.sleep(60)", timeout=1.0)
    assert time.time() - start < 3.0
    assert result.timeout and result.stdout == "before\n"


def test_huge_allocation_sets_memory_exceeded():
    result = execute_code("x = bytearray(2 * 1024 ** 3)\nprint('allocated')", maximum_memory_bytes=256 * 1024 ** 2)
    assert not result.success and result.memory_exceeded and not result.timeout
    assert result.error == "MemoryError"


def test_moderate_allocation_is_fine():
    result = execute_code("x = bytearray(20 * 1024 ** 2)\nprint(len(x))")
    assert result.success and result.stdout == f"{20 * 1024 ** 2}\n"


def test_output_is_truncated():
    result = execute_code("print('x' * 100_000)\nimport sys\nprint('y' * 50_000, file=sys.stderr)",
                          max_output_bytes=1000)
    assert result.success
    assert result.stdout.startswith("x" * 1000)
    assert "output truncated: 100001 bytes" in result.stdout and len(result.stdout) < 1200
    assert result.stderr.startswith("y" * 1000) and len(result.stderr) < 1200


def test_stdin_is_empty():
    result = execute_code("print(input())")
    assert result.error == "EOFError: EOF when reading a line"


def test_working_directory_is_a_fresh_writable_tmp():
    result = execute_code("import os\nopen('scratch.txt', 'w').write('hi')\nprint(os.getcwd(), os.listdir('.'))")
    assert result.success and result.stdout == "/tmp ['scratch.txt']\n"


def test_threads_and_multiprocessing_work():
    code = ("import multiprocessing as mp, threading\nt = threading.Thread(target=print, args=('thread',))\n"
            "t.start()\nt.join()\nif __name__ == '__main__':\n    with mp.get_context('fork').Pool(2) as pool:\n"
            "        print(pool.map(abs, [-1, -2]))")
    result = execute_code(code, timeout=10.0)
    assert result.success and result.stdout == "thread\n[1, 2]\n", result
