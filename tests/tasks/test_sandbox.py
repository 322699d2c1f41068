"""The sandbox's plumbing: output, status, fresh directories, timeouts, and its refusal
to run without bubblewrap unless opted in. Hostile completions: tests/adversarial/."""

from __future__ import annotations

import logging

import pytest

from strato_peft.tasks import sandbox
from strato_peft.tasks.sandbox import (
    SandboxLimits,
    bwrap_available,
    judge_completion,
    process_cap_enforced,
    run_program,
)

FAST = SandboxLimits(timeout_s=3.0, cpu_s=3, memory_mb=512, max_processes=16)
pytestmark = pytest.mark.skipif(
    not bwrap_available(), reason="bubblewrap unavailable (see tests/adversarial)"
)


def test_writing_inside_the_directory_is_allowed() -> None:
    program = "open('scratch.txt', 'w').write('ok')\nassert open('scratch.txt').read() == 'ok'\n"
    assert run_program(program, FAST).status == "exited"


def test_each_run_gets_a_fresh_directory() -> None:
    assert run_program("open('mark', 'w').write('1')\n", FAST).status == "exited"
    assert run_program("import os\nassert not os.path.exists('mark')\n", FAST).status == "exited"


def test_a_program_runs_and_output_is_captured() -> None:
    result = run_program("print('hello')\nassert 1 + 1 == 2\n", FAST)
    assert result.status == "exited" and result.returncode == 0
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


@pytest.mark.skipif(
    not process_cap_enforced(),
    reason="root without a pids cgroup: the kernel would not cap the processes",
)
def test_fork_bomb_is_capped_by_the_os_without_the_python_guard() -> None:
    program = "import os\nwhile True:\n    os.fork()\n"
    limits = SandboxLimits(timeout_s=3.0, max_processes=16, python_guard=False)
    assert run_program(program, limits).status != "exited"


def test_no_network_without_the_python_guard() -> None:
    program = "import socket\nsocket.create_connection(('1.1.1.1', 53), timeout=1)\n"
    result = run_program(program, SandboxLimits(timeout_s=3.0, python_guard=False))
    assert result.status == "failed" and "Errno" in result.stderr


PROMPT = "def double(x):\n    '''2 x'''\n"
TEST = (
    "def check(candidate):\n    assert candidate(2.5) == 5.0\n    assert double((1,)) == (1, 1)\n"
)


def test_the_judge_calls_the_completion_with_plain_data() -> None:
    verdict = judge_completion(PROMPT, "    return x * 2\n", TEST, "double", FAST)
    assert verdict.passed and verdict.status == "passed", verdict
    wrong = judge_completion(PROMPT, "    return x\n", TEST, "double", FAST)
    assert not wrong.passed and "AssertionError" in wrong.judge.stderr


def test_without_bwrap_it_refuses_unless_opted_in(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(sandbox, "bwrap_available", lambda: False)
    with pytest.raises(sandbox.SandboxUnavailable) as refused:
        run_program("pass\n", FAST)
    assert "\n" not in str(refused.value) and "task.unsafe_exec=true" in str(refused.value)
    with caplog.at_level(logging.WARNING):
        assert sandbox.require_sandbox(SandboxLimits(allow_unsafe=True)) == "unsafe"
    assert "UNSAFE CODE EXECUTION" in caplog.text
