"""The program every sandboxed process starts with (``python -I -S -c BOOT mode ...``).

Kept as text, not imported: it runs *inside* the sandbox (:mod:`.sandbox`), in a fresh
interpreter without this package. It sets the rlimits from its arguments, compiles
``program.py`` of the working directory and, as ``subject``, serves calls of the
completion's entry point over the pipes or, as ``judge``, runs the problem's tests
against a proxy of it; only plain data crosses (tagged JSON, decoded strictly).
"""

BOOT = r"""
import json, os, sys
mode, memory, cpu, nproc, fsize, guard = sys.argv[1], *(int(x) for x in sys.argv[2:7])
import resource
for limit, value in ((resource.RLIMIT_AS, memory), (resource.RLIMIT_CPU, cpu),
                     (resource.RLIMIT_NPROC, nproc), (resource.RLIMIT_FSIZE, fsize),
                     (resource.RLIMIT_CORE, 0)):
    try:
        resource.setrlimit(limit, (value, value))
    except (ValueError, OSError):
        pass
with open("program.py", encoding="utf-8") as f:
    code = compile(f.read(), "program.py", "exec")
SCALARS = (type(None), bool, int, str)
KINDS = {"list": list, "tuple": tuple, "set": set, "frozenset": frozenset}

def encode(v):
    t = type(v)
    if t in SCALARS:
        return v
    if t is float:
        return {"float": repr(v)}
    if t is complex:
        return {"complex": [repr(v.real), repr(v.imag)]}
    if t is bytes:
        return {"bytes": v.hex()}
    if t.__name__ in KINDS and KINDS[t.__name__] is t:
        return {t.__name__: [encode(x) for x in v]}
    if t is dict:
        return {"dict": [[encode(k), encode(x)] for k, x in v.items()]}
    raise TypeError(f"sandbox: a {t.__name__} cannot cross the sandbox")

def decode(v):
    t = type(v)
    if t in SCALARS:
        return v
    if t is dict and len(v) == 1:
        (tag, x), = v.items()
        if tag == "float" and type(x) is str:
            return float(x)
        if tag == "complex" and type(x) is list and len(x) == 2:
            return complex(float(x[0]), float(x[1]))
        if tag == "bytes" and type(x) is str:
            return bytes.fromhex(x)
        if tag == "dict" and type(x) is list:
            return {decode(k): decode(y) for k, y in x}
        if tag in KINDS and type(x) is list:
            return KINDS[tag](decode(y) for y in x)
    raise ValueError("sandbox: malformed value")

def fail():
    import traceback
    try:
        traceback.print_exc(limit=5)
        sys.stderr.flush()
    finally:
        os._exit(1)

namespace = {"__name__": "__main__", "__builtins__": __builtins__}
if mode == "judge":
    import builtins
    entry, requests, replies = sys.argv[7], os.fdopen(int(sys.argv[8]), "wb"), int(sys.argv[9])
    replies = os.fdopen(replies, "rb")

    def candidate(*args, **kwargs):
        requests.write(json.dumps(encode((args, kwargs))).encode() + b"\n")
        requests.flush()
        line = replies.readline(fsize)
        if not line.endswith(b"\n"):
            raise RuntimeError("sandbox: the completion gave no answer")
        reply = json.loads(line)
        if type(reply) is not dict or not ("value" in reply or "raise" in reply):
            raise RuntimeError("sandbox: malformed answer")
        if "value" in reply:
            return decode(reply["value"])
        kind = getattr(builtins, str(reply["raise"]), None)
        if not (isinstance(kind, type) and issubclass(kind, Exception)):
            kind = RuntimeError
        raise kind(str(reply.get("message", "")))

    try:
        exec(code, namespace)
        namespace[entry] = candidate
        namespace["check"](candidate)
    except BaseException:
        fail()
    os._exit(0)
if guard:
    home, me = os.path.realpath(os.getcwd()), os.getpid()
    BLOCKED = {"socket.__new__", "socket.connect", "socket.bind", "socket.getaddrinfo",
               "socket.sendto", "ctypes.dlopen", "ctypes.dlsym", "ctypes.cdata",
               "os.fork", "os.forkpty", "os.exec", "os.posix_spawn", "os.spawn",
               "os.system", "subprocess.Popen", "pty.spawn", "resource.setrlimit",
               "resource.prlimit", "os.setuid", "os.chroot", "sys._current_frames",
               "signal.pthread_kill", "os.killpg", "os.chdir"}
    PATHS = {"os.remove", "os.rmdir", "os.mkdir", "os.rename", "os.chmod", "os.chown",
             "os.link", "os.symlink", "os.truncate", "os.utime", "shutil.rmtree",
             "shutil.move"}
    WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

    def inside(path):
        if isinstance(path, int):
            return True
        full = os.path.realpath(os.path.join(home, os.fsdecode(path)))
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
                raise PermissionError(f"sandbox: writing {path!r} outside the directory")
        elif event in PATHS:
            for path in args[:2]:
                if isinstance(path, (str, bytes, os.PathLike)) and not inside(path):
                    raise PermissionError(f"sandbox: {event} on {path!r} outside the directory")

    sys.addaudithook(hook)
try:
    exec(code, namespace)
    if mode == "serve":
        function = namespace[sys.argv[7]]
        answers = os.fdopen(int(sys.argv[9]), "wb")
        for line in os.fdopen(int(sys.argv[8]), "rb"):
            args, kwargs = decode(json.loads(line))
            try:
                reply = {"value": encode(function(*args, **kwargs))}
            except Exception as error:
                reply = {"raise": type(error).__name__, "message": str(error)[:1000]}
            answers.write(json.dumps(reply).encode() + b"\n")
            answers.flush()
    sys.stdout.flush()
    sys.stderr.flush()
except BaseException:
    fail()
os._exit(0)
"""
