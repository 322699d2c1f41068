"""Run untrusted generated code in an OS-level sandbox, and judge it from outside.

The boundary is bubblewrap (``bwrap``, Linux), for root and non-root callers alike.
Every program runs in ``python -I -S`` inside ``bwrap`` with:
  - a filesystem of read-only binds only: the system libraries (``/usr/lib``, ``/lib*``),
    the interpreter and its standard library; the program's own throw-away directory,
    mounted at ``/sandbox`` (the working directory), is the only writable path. ``/usr/bin``
    (no shell), ``/etc``, ``/home``, ``/root``, ``/tmp``, the project and its data are absent;
  - ``--unshare-all --unshare-user --disable-userns``: new user, PID, network (only a down
    loopback), IPC, UTS and cgroup namespaces, no further user namespaces inside;
  - ``--die-with-parent``, ``--new-session``, ``--cap-drop ALL``, and ``PR_SET_NO_NEW_PRIVS``
    (bwrap always sets it: setuid binaries cannot raise privileges);
  - the wall-clock timeout, then ``SIGKILL`` to the process group (the PID namespace dies
    with it).
Second layer, rlimits set before the program's first line: ``RLIMIT_AS``, ``RLIMIT_CPU``,
``RLIMIT_FSIZE`` (which also bounds stdout/stderr: they are files), ``RLIMIT_NPROC``,
``RLIMIT_CORE`` = 0; as root, a pids cgroup where one can be made. Third layer
(``python_guard``): a PEP 578 audit hook refusing sockets, ctypes, fork/exec and writes
outside the directory -- convenient, but code can bypass it; it is not the boundary.

The verdict (:func:`judge_completion`) cannot be forged by the completion, because the
completion never runs in the process that decides it. Two sandboxes run side by side:
the *subject* runs ``prompt + completion`` and serves calls to the entry point; the
*judge* runs ``prompt + test`` and calls ``check(candidate)``, where ``candidate``
forwards each call to the subject over a pair of pipes. Only plain data crosses (exact
``None``/bool/int/float/complex/str/bytes and lists, tuples, sets, dicts of them, decoded
strictly by the judge). The problem passes only if the judge process exits 0 after
``check`` returned. The subject holds no token and cannot see, signal or write to the
judge (separate PID, IPC, network namespaces and filesystems), so ``sys.exit(0)``,
``os._exit(0)``, a forged stdout, reading ``sys.argv`` or the environment, ``sys.settrace``
and tampering with the checking code all fail.

Without bwrap (macOS, or Linux without user namespaces) nothing runs unless the caller
opts in with ``SandboxLimits(allow_unsafe=True)`` (``task.unsafe_exec=true``); then the
same two processes run with only rlimits, ``unshare`` where it works and the audit hook,
each run says so in a loud warning, and a hostile completion can escape and fake its
verdict. See docs/security.md.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from strato_peft.tasks.sandbox_boot import BOOT

log = logging.getLogger(__name__)

INSTALL_HINT = (
    "HumanEval executes generated code and needs bubblewrap for its sandbox: install it "
    "(apt-get install bubblewrap, or make sandbox) or opt in to running it unsandboxed with "
    "task.unsafe_exec=true (see docs/security.md)"
)
UNSAFE_WARNING = (
    "UNSAFE CODE EXECUTION: bubblewrap is unavailable and unsafe execution was opted in, so "
    "generated code runs WITHOUT an OS sandbox (rlimits and a bypassable audit hook only): it "
    "can read and write whatever this user can and fake its own verdict. Use a throw-away "
    "machine or container (docs/security.md)."
)
SYSTEM_LIBRARIES = ("/usr/lib", "/usr/lib64", "/usr/lib32", "/lib", "/lib64", "/lib32")
INSIDE = "/sandbox"


class SandboxUnavailable(NotImplementedError):
    """No bubblewrap here and unsafe execution was not opted in."""


@dataclass(frozen=True)
class SandboxLimits:
    """Resource limits of one sandboxed run, and the opt-in to run without bwrap."""

    timeout_s: float = 10.0
    memory_mb: int = 1024
    cpu_s: int = 10
    max_processes: int = 16
    max_file_mb: int = 16
    max_output_chars: int = 4000
    python_guard: bool = True
    allow_unsafe: bool = False
    """Where bwrap is unavailable, run anyway with the weaker layers (warned loudly)."""


@dataclass(frozen=True)
class SandboxResult:
    """One sandboxed process: what it did, not whether it was right."""

    status: str
    """``exited`` (status 0), ``failed`` (exception or non-zero status) or ``timeout``."""
    returncode: int | None
    stdout: str
    stderr: str
    duration_s: float


@dataclass(frozen=True)
class Verdict:
    """The judge's decision on one completion: ``passed`` only if its ``check`` returned."""

    passed: bool
    status: str
    """``passed``, ``failed`` or ``timeout``."""
    judge: SandboxResult
    subject: SandboxResult


def _interpreter() -> str:
    """The real interpreter behind ``sys.executable`` (a venv's base Python)."""
    return os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)


def _read_only_view() -> list[str]:
    """bwrap arguments binding the system libraries and the interpreter read-only."""
    args: list[str] = []
    for path in SYSTEM_LIBRARIES:
        if os.path.islink(path):
            args += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path):
            args += ["--ro-bind", path, path]
    python = {_interpreter()}
    base = {"base": sys.base_prefix, "platbase": sys.base_exec_prefix}
    base.update(installed_base=sys.base_prefix, installed_platbase=sys.base_exec_prefix)
    python.update(
        os.path.realpath(sysconfig.get_path(key, vars=base)) for key in ("stdlib", "platstdlib")
    )
    if sysconfig.get_config_var("Py_ENABLE_SHARED"):
        libdir, library = sysconfig.get_config_var("LIBDIR"), sysconfig.get_config_var("LDLIBRARY")
        python.add(os.path.realpath(os.path.join(str(libdir), str(library))))
    for path in sorted(python):
        if os.path.exists(path) and not path.startswith(("/usr/lib/", "/lib")):
            args += ["--ro-bind", path, path]
    if os.path.exists("/etc/ld.so.cache"):
        args += ["--ro-bind", "/etc/ld.so.cache", "/etc/ld.so.cache"]
    return args


def bwrap_command(workdir: Path) -> list[str] | None:
    """The ``bwrap`` prefix confining a program to ``workdir``, or ``None`` without bwrap."""
    bwrap = shutil.which("bwrap")
    if bwrap is None or not sys.platform.startswith("linux"):
        return None
    return [
        bwrap,
        *("--unshare-all", "--unshare-user", "--disable-userns", "--die-with-parent"),
        *("--new-session", "--cap-drop", "ALL", "--clearenv", "--hostname", "sandbox"),
        *("--setenv", "PATH", "/usr/bin", "--setenv", "LANG", "C.UTF-8"),
        *("--setenv", "HOME", INSIDE, "--setenv", "TMPDIR", INSIDE),
        *("--dev", "/dev", "--proc", "/proc", *_read_only_view()),
        *("--bind", str(workdir), INSIDE, "--chdir", INSIDE, "--"),
    ]


@functools.lru_cache(maxsize=1)
def bwrap_available() -> bool:
    """Whether bwrap is installed and can start the interpreter here (namespaces allowed)."""
    with tempfile.TemporaryDirectory(prefix="strato-sandbox-probe-") as probe:
        prefix = bwrap_command(Path(probe))
        if prefix is None:
            return False
        try:
            done = subprocess.run(
                [*prefix, _interpreter(), "-I", "-S", "-c", "pass"], capture_output=True, timeout=30
            )
        except (OSError, subprocess.SubprocessError):
            return False
    if done.returncode != 0:
        log.warning("sandbox: bwrap cannot start here: %s", done.stderr.decode(errors="replace"))
    return done.returncode == 0


def require_sandbox(limits: SandboxLimits, *, announce: bool = True) -> str:
    """``"bwrap"``; ``"unsafe"`` when opted in without bwrap (a loud warning: every call if
    ``announce``, else once per process); otherwise :class:`SandboxUnavailable`."""
    if bwrap_available():
        return "bwrap"
    if not limits.allow_unsafe:
        raise SandboxUnavailable(INSTALL_HINT)
    if announce:
        log.warning(UNSAFE_WARNING)
    else:
        _warn_unsafe_once()
    return "unsafe"


@functools.lru_cache(maxsize=1)
def _warn_unsafe_once() -> None:
    log.warning(UNSAFE_WARNING)


@functools.lru_cache(maxsize=1)
def namespace_prefix() -> tuple[str, ...]:
    """``unshare`` arguments for new network and PID namespaces (unsafe fallback), or ``()``."""
    unshare = shutil.which("unshare")
    if unshare is None or not sys.platform.startswith("linux"):
        return ()
    base = ["--net", "--pid", "--fork", "--kill-child"]
    candidates = [[unshare, *base]] if os.geteuid() == 0 else []
    candidates.append([unshare, "--user", "--map-root-user", *base])
    for prefix in candidates:
        try:
            done = subprocess.run([*prefix, "true"], capture_output=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            continue
        if done.returncode == 0:
            return tuple(prefix)
    log.warning("sandbox: unshare is unavailable here; no network/PID namespace isolation")
    return ()


def _make_pids_cgroup(max_processes: int) -> Path | None:
    """A fresh pids cgroup limited to ``max_processes``, or ``None`` (not root, no controller)."""
    if os.geteuid() != 0:
        return None
    for base in (Path("/sys/fs/cgroup/pids"), Path("/sys/fs/cgroup")):
        if not (base / "cgroup.procs").exists():
            continue
        group = base / f"strato-sandbox-{os.getpid()}-{secrets.token_hex(4)}"
        try:
            group.mkdir()
            (group / "pids.max").write_text(str(max_processes))
            return group
        except OSError:
            with contextlib.suppress(OSError):
                group.rmdir()
    return None


@functools.lru_cache(maxsize=1)
def process_cap_enforced() -> bool:
    """Whether the kernel caps the sandbox's processes (RLIMIT_NPROC as non-root, or a pids cgroup)."""
    if os.geteuid() != 0:
        return True
    group = _make_pids_cgroup(1)
    _remove_cgroup(group)
    return group is not None


def _remove_cgroup(group: Path | None) -> None:
    if group is None:
        return
    for _ in range(50):
        try:
            group.rmdir()
            return
        except OSError:
            time.sleep(0.02)
    log.warning("sandbox: could not remove cgroup %s", group)


def _read_tail(path: Path, limit: int) -> str:
    try:
        with open(path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            handle.seek(max(0, handle.tell() - limit))
            return handle.read().decode("utf-8", errors="replace")
    except OSError:
        return ""


class _Sandbox:
    """One sandboxed process (``mode``: run, serve or judge) in its own throw-away directory."""

    def __init__(
        self, program: str, mode: str, limits: SandboxLimits, backend: str, extra: list[str]
    ) -> None:
        self.limits, self.started = limits, time.monotonic()
        self.private = Path(tempfile.mkdtemp(prefix="strato-sandbox-"))
        work = self.private / "work"
        work.mkdir()
        (work / "program.py").write_text(program, encoding="utf-8")
        self.group = _make_pids_cgroup(limits.max_processes)
        guard = limits.python_guard and mode != "judge"
        numbers = (limits.memory_mb * 2**20, limits.cpu_s, limits.max_processes)
        boot = [*(str(n) for n in numbers), str(limits.max_file_mb * 2**20), str(int(guard))]
        inner = [_interpreter(), "-I", "-S", "-c", BOOT, mode, *boot, *extra]
        if backend == "bwrap":
            command = [*(bwrap_command(work) or []), *inner]
        else:
            command = [*namespace_prefix(), *inner]
        if self.group is not None:
            procs = str(self.group / "cgroup.procs")
            command = ["/bin/sh", "-c", 'echo $$ > "$0" && exec "$@"', procs, *command]
        self.fds = tuple(int(x) for x in extra[1:])
        self.timed_out = False
        with open(self.private / "stdout", "wb") as out, open(self.private / "stderr", "wb") as err:
            self.process = subprocess.Popen(
                command,
                cwd=work,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                pass_fds=self.fds,
                start_new_session=True,
                env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
            )

    def wait(self, deadline: float) -> None:
        try:
            self.process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.timed_out = True

    def finish(self) -> SandboxResult:
        """Kill whatever is left, remove the directory, report."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            self.process.kill()
        returncode = self.process.wait()
        _remove_cgroup(self.group)
        limit = self.limits.max_output_chars
        stdout = _read_tail(self.private / "stdout", limit)
        stderr = _read_tail(self.private / "stderr", limit)
        shutil.rmtree(self.private, ignore_errors=True)
        status = "timeout" if self.timed_out else "exited" if returncode == 0 else "failed"
        code = None if self.timed_out else returncode
        return SandboxResult(status, code, stdout, stderr, time.monotonic() - self.started)


def run_program(program: str, limits: SandboxLimits | None = None) -> SandboxResult:
    """Run ``program`` (Python source) in the sandbox; the caller survives whatever it does.

    The status is the program's own claim (it may ``os._exit(0)``): use it for containment,
    and :func:`judge_completion` for a verdict.
    """
    limits = limits or SandboxLimits()
    sandbox = _Sandbox(program, "run", limits, require_sandbox(limits, announce=False), [])
    sandbox.wait(time.monotonic() + limits.timeout_s)
    return sandbox.finish()


def judge_completion(
    prompt: str, completion: str, test: str, entry_point: str, limits: SandboxLimits | None = None
) -> Verdict:
    """Whether ``check(entry_point)`` of ``test`` passes, decided outside the completion."""
    limits = limits or SandboxLimits()
    backend = require_sandbox(limits, announce=False)
    request_read, request_write = os.pipe()
    reply_read, reply_write = os.pipe()
    deadline = time.monotonic() + limits.timeout_s
    subject = judge = None
    try:
        subject = _Sandbox(
            f"{prompt}{completion}\n",
            "serve",
            limits,
            backend,
            [entry_point, str(request_read), str(reply_write)],
        )
        judge = _Sandbox(
            f"{prompt}\n\n{test}\n",
            "judge",
            limits,
            backend,
            [entry_point, str(request_write), str(reply_read)],
        )
    finally:
        for fd in (request_read, request_write, reply_read, reply_write):
            os.close(fd)
        if judge is None and subject is not None:
            subject.finish()
    assert subject is not None and judge is not None
    judge.wait(deadline)
    judged, served = judge.finish(), subject.finish()
    passed = judged.status == "exited"
    status = "passed" if passed else judged.status
    return Verdict(passed, status, judged, served)
