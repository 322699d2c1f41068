"""Hostile completions against the HumanEval sandbox: each is contained and scored a failure.

Every completion answers ``add(a, b)`` wrongly (or not at all) and then attacks: it
exits early, forges stdout, hunts for a token in ``sys.argv``/the environment/its
frames, writes outside its directory (``os.chdir`` + a relative path, ``dir_fd``),
runs a shell through ``_posixsubprocess.fork_exec``, returns an object equal to
everything... Only a forged verdict could make one pass. The writes aim at a file
outside the sandbox that the attacker's user could write without it, so the OS layer
(bubblewrap) is what holds, not file permissions. The same attacks also run as the
unprivileged user ``nobody``, and on the unsafe fallback, where they must succeed
(proof that these tests can fail).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from strato_peft.tasks import sandbox
from strato_peft.tasks.sandbox import SandboxLimits, bwrap_available, judge_completion

FAST = SandboxLimits(timeout_s=3.0, cpu_s=3, memory_mb=512, max_processes=16)
BARE = SandboxLimits(timeout_s=3.0, cpu_s=3, memory_mb=512, python_guard=False)
PROMPT = 'def add(a, b):\n    """Return a + b."""\n'
TEST = "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n"
WRONG = "    return 0\n"
EXIT_EARLY = {
    "sys.exit(0)": "import sys\nsys.exit(0)\n",
    "raise SystemExit": "raise SystemExit(0)\n",
    "os._exit(0)": "import os\nos._exit(0)\n",
    "exit in a finally": "try:\n    assert False\nfinally:\n    import os\n    os._exit(0)\n",
    "print fake success": "print('passed')\nimport os, sys\nsys.stdout.flush()\nos._exit(0)\n",
}
HOSTILE = {
    **EXIT_EARLY,
    "infinite loop": "while True:\n    pass\n",
    "sleep forever": "import time\ntime.sleep(3600)\n",
    "fork bomb": "import os\nwhile True:\n    os.fork()\n",
    "allocate 50 GB": "block = bytearray(50 * 2**30)\n",
    "grow a list forever": "x = []\nwhile True:\n    x.append(' ' * 2**20)\n",
    "open a socket": "import socket\nsocket.create_connection(('1.1.1.1', 53), timeout=1)\n",
    "kill the parent": "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\n",
    "kill the process group": "import os, signal\nos.killpg(0, signal.SIGKILL)\n",
    "kill every process": "import os, signal\nos.kill(-1, signal.SIGKILL)\n",
    "flood stdout": "while True:\n    print('x' * 10000)\n",
    "flood stderr": "import sys\nwhile True:\n    sys.stderr.write('y' * 10000)\n",
    "subprocess": "import subprocess\nsubprocess.run(['sh', '-c', 'echo hi'])\n",
    "ctypes bypass": "import ctypes\nctypes.CDLL(None).fork()\n",
    "raise the limits": "import resource\nresource.setrlimit(resource.RLIMIT_AS, (-1, -1))\n",
    "token from argv": (
        "import os, sys\nloot = []\nfor fd in [int(a) for a in sys.argv if a.isdigit()] + list(range(3, 64)):\n"
        "    try:\n        os.set_blocking(fd, False)\n        loot.append(os.read(fd, 4096))\n"
        "    except OSError:\n        pass\nfor fd in range(3, 64):\n    try:\n"
        "        os.write(fd, (loot or [b'passed'])[0])\n    except OSError:\n        pass\n"
        "print('passed', sys.argv, dict(os.environ))\nos._exit(0)\n"
    ),
    "token via settrace": (
        "import os, sys\nseen = []\ndef trace(frame, event, arg):\n"
        "    seen.extend(str(v) for v in frame.f_locals.values())\n    return trace\n"
        "sys.settrace(trace)\nimport atexit\ndef leak():\n    for fd in range(3, 64):\n"
        "        for value in seen[-50:]:\n            try:\n"
        "                os.write(fd, value.encode()[:200] + b'\\n')\n"
        "            except OSError:\n                pass\n    os._exit(0)\natexit.register(leak)\n"
    ),
    "forge answers": (
        "import os\nfor fd in range(3, 64):\n    try:\n"
        '        os.write(fd, b\'{"raise": "SystemExit"}\\n{"passed": true}\\n\')\n'
        "    except OSError:\n        pass\n"
    ),
    "raise SystemExit in the judge": "def add(a, b):\n    raise SystemExit(0)\n",
}


def _fork_exec(argv: str) -> str:
    """Completion code running ``argv`` with ``_posixsubprocess.fork_exec`` (no audit event)."""
    return (
        "import os, _posixsubprocess\nr, w = os.pipe()\n"
        f"argv = [os.fsencode(a) for a in {argv}]\n"
        "pid = _posixsubprocess.fork_exec(argv, [argv[0]], True, (), None, None, -1, -1, -1, -1,"
        " -1, -1, r, w, False, False, -1, None, None, -1, -1, None, False)\n"
        "os.close(w)\nprint('exec error', os.read(r, 200))\nprint(os.waitpid(pid, 0))\n"
    )


def escapes(target: Path) -> dict[str, str]:
    """Completions that each try to overwrite ``target`` (a file outside the sandbox)."""
    folder, name = str(target.parent), target.name
    write = f"open({name!r}, 'w').write('pwned')"
    shell = f"echo pwned > {target}"
    absolute = f"open({str(target)!r}, 'w').write('pwned')"
    return {
        "chdir then relative write": f"import os\nos.chdir({folder!r})\n{write}\n",
        "dir_fd write": (
            f"import os\nfd = os.open({folder!r}, os.O_RDONLY)\n"
            f"os.write(os.open({name!r}, os.O_WRONLY | os.O_TRUNC, dir_fd=fd), b'pwned')\n"
        ),
        "absolute write": f"{absolute}\n",
        "fork_exec /bin/sh": _fork_exec(f"['/bin/sh', '-c', {shell!r}]"),
        "fork_exec python": _fork_exec(f"[{sandbox._interpreter()!r}, '-c', {absolute!r}]"),
    }


requires_bwrap = pytest.mark.skipif(
    not bwrap_available(), reason="bubblewrap unavailable (test_bubblewrap_works_on_linux says why)"
)


@pytest.fixture
def victim() -> Iterator[Path]:
    """Another run's ``metrics.json``, writable by anyone (so only the sandbox protects it)."""
    folder = Path(tempfile.mkdtemp(prefix="strato-victim-"))
    folder.chmod(0o777)
    target = folder / "metrics.json"
    target.write_text("original")
    target.chmod(0o666)
    yield target
    shutil.rmtree(folder)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="bubblewrap is Linux-only")
def test_bubblewrap_works_on_linux() -> None:
    assert bwrap_available(), sandbox.INSTALL_HINT


@requires_bwrap
@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_completion_is_contained_and_fails(name: str) -> None:
    started = time.monotonic()
    verdict = judge_completion(PROMPT, WRONG + HOSTILE[name], TEST, "add", FAST)
    assert not verdict.passed and verdict.status != "passed", (name, verdict)
    assert time.monotonic() - started < FAST.timeout_s + 5
    assert len(verdict.subject.stdout) <= FAST.max_output_chars


@requires_bwrap
@pytest.mark.parametrize("name", sorted(EXIT_EARLY))
def test_early_exit_inside_a_correct_looking_function_fails(name: str) -> None:
    body = "".join(f"    {line}\n" for line in EXIT_EARLY[name].splitlines())
    assert not judge_completion(PROMPT, body, TEST, "add", BARE).passed


@requires_bwrap
def test_an_object_equal_to_everything_cannot_cross() -> None:
    completion = "    class Any:\n        __eq__ = lambda self, other: True\n    return Any()\n"
    verdict = judge_completion(PROMPT, completion, TEST, "add", BARE)
    assert not verdict.passed and "cannot cross" in verdict.judge.stderr


@requires_bwrap
@pytest.mark.parametrize("guard", [True, False], ids=["guard", "no-guard"])
def test_writes_outside_the_directory_are_stopped_by_the_os(victim: Path, guard: bool) -> None:
    limits = FAST if guard else BARE
    for name, attack in escapes(victim).items():
        verdict = judge_completion(PROMPT, WRONG + attack, TEST, "add", limits)
        assert not verdict.passed, name
        assert victim.read_text() == "original", (name, verdict.subject.stderr)


@requires_bwrap
def test_the_host_is_invisible() -> None:
    program = (
        "import os\nfor path in ('/etc/passwd', '/usr/bin/sh', '/bin/sh', '/tmp', "
        f"{os.getcwd()!r}, {sys.prefix!r}, {str(Path.home() / '.ssh')!r}):\n"
        "    assert not os.path.exists(path), path\n"
        "assert os.getcwd() == '/sandbox'\n"
    )
    result = sandbox.run_program(program, BARE)
    assert result.status == "exited", result.stderr


@requires_bwrap
def test_the_correct_completion_still_passes() -> None:
    assert judge_completion(PROMPT, "    return a + b\n", TEST, "add", FAST).passed


NOBODY = r"""
import importlib.util, json, pathlib, sys
# the package's __init__ needs the venv: load the two sandbox modules by path instead
boot = pathlib.Path(sys.argv[1]).with_name("sandbox_boot.py")
spec = importlib.util.spec_from_file_location("strato_peft.tasks.sandbox_boot", boot)
sys.modules[spec.name] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(sys.modules[spec.name])
spec = importlib.util.spec_from_file_location("sandbox", sys.argv[1])
sandbox = importlib.util.module_from_spec(spec)
sys.modules["sandbox"] = sandbox
spec.loader.exec_module(sandbox)
attacks, prompt, test = json.loads(sys.argv[2]), sys.argv[3], sys.argv[4]
limits = sandbox.SandboxLimits(timeout_s=5.0, python_guard=False)
out = {"bwrap": sandbox.bwrap_available(), "uid": __import__("os").getuid()}
out["passed"] = {k: sandbox.judge_completion(prompt, v, test, "add", limits).passed
                 for k, v in attacks.items()}
print(json.dumps(out))
"""


@requires_bwrap
def test_attacks_fail_for_an_unprivileged_caller(victim: Path) -> None:
    """The harness itself runs as ``nobody`` (system Python, sandbox.py loaded by path)."""
    python, setpriv = "/usr/bin/python3", shutil.which("setpriv")
    if os.geteuid() != 0:
        pytest.skip("already unprivileged: this whole module ran as a non-root user")
    if setpriv is None or not os.path.exists(python):
        pytest.skip("needs setpriv (util-linux) and /usr/bin/python3 to become nobody")
    module = Path(sandbox.__file__).resolve()
    if not all(
        os.stat(p).st_mode & 0o005
        for p in [module, *module.parents, module.with_name("sandbox_boot.py")]
    ):
        pytest.skip(f"{module} is not readable by nobody")
    attacks = {name: WRONG + code for name, code in escapes(victim).items()}
    attacks |= {"os._exit(0)": WRONG + EXIT_EARLY["os._exit(0)"], "correct": "    return a + b\n"}
    nobody = [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups", python, "-I"]
    done = subprocess.run(
        [*nobody, "-c", NOBODY, str(module), json.dumps(attacks), PROMPT, TEST],
        capture_output=True,
        text=True,
        timeout=120,
        cwd="/",
    )
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["uid"] == 65534 and out["bwrap"], out
    assert out["passed"].pop("correct") is True
    assert not any(out["passed"].values()), out
    assert victim.read_text() == "original"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="attacks use Linux paths")
def test_the_unsafe_fallback_is_escapable_and_says_so(
    victim: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Without bwrap (forced here) the old layers let these attacks through: the tests above
    would fail on that path, and the fallback is opt-in only and warned about."""
    monkeypatch.setattr(sandbox, "bwrap_available", lambda: False)
    with pytest.raises(sandbox.SandboxUnavailable, match="apt-get install bubblewrap"):
        judge_completion(PROMPT, WRONG, TEST, "add", FAST)
    unsafe = SandboxLimits(timeout_s=3.0, allow_unsafe=True)
    assert sandbox.require_sandbox(unsafe) == "unsafe"
    assert "UNSAFE CODE EXECUTION" in caplog.text
    escaped = []
    for name, attack in escapes(victim).items():  # the audit hook is on (python_guard)
        judge_completion(PROMPT, WRONG + attack, TEST, "add", unsafe)
        if victim.read_text() != "original":
            escaped.append(name)
        victim.write_text("original")
    assert {"dir_fd write", "fork_exec python"} <= set(escaped), escaped
