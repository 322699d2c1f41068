"""Hostile completions are contained by the sandbox and scored as failures.

Each program runs in its own process; the test process (the "evaluator") must
survive, and nothing may leak outside the throw-away directory.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from strato_peft.tasks.sandbox import (
    SandboxLimits,
    namespace_prefix,
    process_cap_enforced,
    run_program,
)

FAST = SandboxLimits(timeout_s=3.0, cpu_s=3, memory_mb=512, max_processes=16)

HOSTILE = {
    "infinite loop": "while True:\n    pass\n",
    "sleep forever": "import time\ntime.sleep(3600)\n",
    "fork bomb": "import os\nwhile True:\n    os.fork()\n",
    "allocate 50 GB": "block = bytearray(50 * 2**30)\n",
    "grow a list forever": "x = []\nwhile True:\n    x.append(' ' * 2**20)\n",
    "open a socket": "import socket\nsocket.create_connection(('1.1.1.1', 53), timeout=1)\n",
    "kill the parent": "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\n",
    "kill the process group": "import os, signal\nos.killpg(0, signal.SIGKILL)\n",
    "sys.exit(0)": "import sys\nsys.exit(0)\n",
    "raise SystemExit": "raise SystemExit(0)\n",
    "os._exit(0)": "import os\nos._exit(0)\n",
    "exit in a finally": "try:\n    assert False\nfinally:\n    import os\n    os._exit(0)\n",
    "print fake success": "print('passed'); import sys; sys.stdout.flush(); import os; os._exit(0)\n",
    "flood stdout": "while True:\n    print('x' * 10000)\n",
    "flood stderr": "import sys\nwhile True:\n    sys.stderr.write('y' * 10000)\n",
    "subprocess": "import subprocess\nsubprocess.run(['sh', '-c', 'echo hi'])\n",
    "ctypes bypass": "import ctypes\nctypes.CDLL(None).fork()\n",
    "raise the limits": "import resource\nresource.setrlimit(resource.RLIMIT_AS, (-1, -1))\n",
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_program_is_contained_and_fails(name: str) -> None:
    started = time.monotonic()
    result = run_program(HOSTILE[name], FAST)
    assert not result.passed, (name, result)
    assert result.status != "passed"
    assert time.monotonic() - started < FAST.timeout_s + 5
    assert len(result.stdout) <= FAST.max_output_chars


def test_writing_outside_the_directory_is_blocked(tmp_path: Path) -> None:
    target = tmp_path / "outside.txt"
    for program in (
        f"open({str(target)!r}, 'w').write('pwned')\n",
        f"import os\nos.close(os.open({str(target)!r}, os.O_WRONLY | os.O_CREAT))\n",
        f"import os\nos.symlink('/etc/passwd', 'link')\nopen('../../' + {target.name!r}, 'w')\n",
        f"import shutil\nshutil.rmtree({str(tmp_path)!r})\n",
    ):
        assert not run_program(program, FAST).passed
    assert not target.exists()
    assert tmp_path.exists()


def test_writing_inside_the_directory_is_allowed() -> None:
    program = "open('scratch.txt', 'w').write('ok')\nassert open('scratch.txt').read() == 'ok'\n"
    assert run_program(program, FAST).passed


def test_each_run_gets_a_fresh_directory() -> None:
    assert run_program("open('mark', 'w').write('1')\n", FAST).passed
    assert run_program("import os\nassert not os.path.exists('mark')\n", FAST).passed


def test_a_correct_program_passes_and_output_is_captured() -> None:
    result = run_program("print('hello')\nassert 1 + 1 == 2\n", FAST)
    assert result.passed and result.status == "passed" and result.returncode == 0
    assert result.stdout.strip() == "hello"


def test_an_exception_fails_with_its_traceback() -> None:
    result = run_program("assert 1 + 1 == 3, 'arithmetic'\n", FAST)
    assert result.status == "failed"
    assert "AssertionError: arithmetic" in result.stderr


def test_timeout_kills_daemonized_children() -> None:
    """A child that escapes into its own session must still die with the sandbox."""
    program = (
        "import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(60)\ntime.sleep(60)\n"
    )
    result = run_program(program, SandboxLimits(timeout_s=1.0, python_guard=False))
    assert result.status == "timeout"


os_layer = pytest.mark.skipif(
    not process_cap_enforced(),
    reason="root without a pids cgroup: the kernel would not cap the processes",
)


@os_layer
def test_fork_bomb_is_capped_by_the_os_without_the_python_guard() -> None:
    program = "import os\nwhile True:\n    os.fork()\n"
    result = run_program(
        program, SandboxLimits(timeout_s=3.0, max_processes=16, python_guard=False)
    )
    assert not result.passed


@pytest.mark.skipif(not namespace_prefix(), reason="needs unshare (network namespace)")
def test_no_network_without_the_python_guard() -> None:
    program = "import socket\nsocket.create_connection(('1.1.1.1', 53), timeout=1)\n"
    result = run_program(program, SandboxLimits(timeout_s=3.0, python_guard=False))
    assert not result.passed
    assert "unreachable" in result.stderr or "Errno" in result.stderr


@pytest.mark.skipif(not namespace_prefix(), reason="needs unshare (PID namespace)")
def test_parent_is_invisible_without_the_python_guard() -> None:
    program = "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\n"
    assert not run_program(program, SandboxLimits(timeout_s=3.0, python_guard=False)).passed
