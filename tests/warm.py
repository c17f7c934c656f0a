"""Warm test processes: `python -m spoctl ...` without paying Python's imports of torch, transformers and PEFT again.

Most of what the suite's subprocesses cost is their imports (`import torch, transformers, peft` and the Llama
model code: about 5 CPU-seconds on this repository's 2-core machine, against a fraction of a second of work in
a 1-step run or an error path). Like Rails' Spring or Android's zygote, a server process imports those libraries
once, and each command is a process forked from it:

    client (what the test starts: a real process, with its own pid, stdin, stdout, stderr and exit code)
      -> server (imported torch, transformers, peft and spoctl; one thread; forks per request)
         -> supervisor (one per command: reports the command's end to the client)
            -> runner (the command: the client's stdio, cwd, environment and arguments; runs it as Python would)

What the test sees is what it sees of a fresh process: the exit code (or death by the same signal), stdout and
stderr (the client's own file descriptors, passed over the socket), the working folder and the environment. A
SIGTERM, SIGINT or SIGHUP sent to the client is forwarded to the command; if the client dies (SIGKILL), the
command is killed too, but a few milliseconds later, so the tests that SIGKILL a command keep fresh processes.

The environment variables read while the libraries import (Python's own, locale, thread pools, CPU kernels,
torch, Hugging Face, HOME) pick the server: a command whose values differ (tests/test_other_cpus.py's kernels, a
test's own HF_HOME) gets a server started with its values, so what a library read at import is the command's.
A fresh `python` runs instead where a warm one could differ: a Python option other than -u, -m, -c or a script;
no server (SPOCTL_TEST_WARM=0, or a server that did not start: the suite then runs as before, only slower).
And what stays fresh on purpose: the tests of the entry point itself and of what it imports, library warnings
included (tests/test_cli.py), of hash seeds (tests/test_adapter_bytes.py), of pids in lock messages, of signals at a
command's start (tests/test_signals.py, the chaos suite), of a process's limits and powers (file size,
capabilities), of a launch where one process fails at once (tests/test_json_stdout.py), and every test that
SIGKILLs a command. All processes forked from one server share one hash seed (fresh ones draw their own);
`random` is reseeded in each.

Use: `python_cmd("-m", "spoctl", ...)` in place of `[sys.executable, "-m", "spoctl", ...]`, `torchrun_entry(...)`
for what follows torchrun's options, and `bin_dir()`'s `spoctl` for a shell. tests/conftest.py gives each pytest
run a folder for the servers (the xdist workers of one run share it); a server is started by the first command
whose import-time environment it serves, and ends with the run."""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import sys

DIR_VAR = "WARM_PYTHON_DIR"  # not SPOCTL_*: tests that drop spoctl's variables keep it
# Read while the server imports its libraries: one server per set of their values (a command must not see values
# other than its own), started by the first command that needs it.
IMPORT_TIME_VARS = ("PYTHON", "LANG", "LC_", "OMP_", "MKL_", "OPENBLAS_", "KMP_", "ATEN_", "TORCH", "PYTORCH_",
                    "CUDA", "HF_", "HUGGINGFACE_", "TRANSFORMERS_", "TOKENIZERS_", "XDG_", "HOME", "BNB_", "TRITON_")
# Not read at import: PYTHONUNBUFFERED is read at start-up and applied by the runner to its streams; torchrun gives
# each process its own TORCHELASTIC_* values (an error file per rank) and TORCH_NCCL_*, read when the process group
# starts; TORCHINDUCTOR_CACHE_DIR is read when inductor compiles, and set to its default by importing it (a process
# that did has it, one that did not yet has not: the same environment, else two servers).
NOT_AT_IMPORT = ("PYTHONUNBUFFERED", "TORCHELASTIC_", "TORCH_NCCL_", "TORCHINDUCTOR_CACHE_DIR")
# What every spoctl command sets for itself before it does anything (spoctl.cli.common.quiet_library_output: with
# setdefault, and a library imported already is told directly): a test process has them once it ran a command in
# process, and whether it had does not change what a spoctl command does, so they do not pick a server.
SPOCTL_SETS = {"HF_HUB_DISABLE_PROGRESS_BARS": "1", "TRANSFORMERS_VERBOSITY": "error",
               "TOKENIZERS_PARALLELISM": "false", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1"}
PRELOAD = ("torch", "torch.distributed", "transformers", "transformers.models.llama.modeling_llama", "peft",
           "safetensors.torch", "spoctl.cli", "spoctl.engine.align", "spoctl.evaluate.runner", "spoctl.export.pipeline")
HERE = os.path.dirname(os.path.abspath(__file__))
# What the client passes on to its command (SIGKILL cannot be caught: the supervisor kills the command then).
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)


def _import_time_env(env: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in sorted(env.items()) if k.startswith(IMPORT_TIME_VARS)
            and not k.startswith(NOT_AT_IMPORT) and SPOCTL_SETS.get(k) != v}


# ------------------------------------------------------------------------------------------------ test side
def available() -> bool:
    return bool(os.environ.get(DIR_VAR))


def bin_dir() -> str:
    """A folder whose `python` and `spoctl` are warm."""
    return os.path.join(os.environ[DIR_VAR], "bin")


def python_cmd(*argv: str) -> list[str]:
    """The command line of `python *argv`, warm when the suite runs warm."""
    return [os.path.join(bin_dir(), "python"), *argv] if available() else [sys.executable, *argv]


def torchrun_entry(*argv: str) -> list[str]:
    """What follows torchrun's own options to run `python *argv` in each worker, warm when the suite runs warm."""
    return ["--no-python", os.path.join(bin_dir(), "python"), "-u", *argv] if available() else list(argv)


def set_up(folder: str, owner: int) -> None:
    """Make `folder` this pytest process's warm folder (its clients, and the servers they start, live there; the
    servers end when process `owner` has ended). Every process this one starts finds it in the environment. Several
    pytest processes (xdist's workers) may share one folder and its servers."""
    os.makedirs(os.path.join(folder, "bin"), exist_ok=True)
    for name, mode in (("python", "python"), ("spoctl", "console")):  # `-S`: the client needs no site-packages
        script = os.path.join(folder, "bin", name)
        _write(script, f"#!{sys.executable} -S\nimport sys\nsys.path.insert(0, {HERE!r})\nimport warm\n"
                       f"warm.client({mode!r}, sys.argv[1:])\n", 0o755)
    _write(os.path.join(folder, "owner.pid"), str(owner), 0o644)
    os.environ[DIR_VAR] = folder


def _write(path: str, text: str, mode: int) -> None:
    """Whole or not at all: another worker may be starting a client from this folder meanwhile."""
    part = f"{path}.{os.getpid()}.tmp"
    with open(part, "w", encoding="utf-8") as f:
        f.write(text)
    os.chmod(part, mode)
    os.replace(part, path)


def tear_down() -> None:
    """End the servers of this process's warm folder (call it only in the folder's owner)."""
    folder = os.environ.pop(DIR_VAR, None)
    if not folder or not os.path.isdir(folder):
        return
    for name in os.listdir(folder):
        if name.endswith(".pid") and name != "owner.pid":
            try:
                os.kill(int(open(os.path.join(folder, name), encoding="utf-8").read()), signal.SIGTERM)
            except (OSError, ValueError):
                pass


# ------------------------------------------------------------------------------------------------ client
class _Fallback(Exception):
    pass


def client(mode: str, argv: list[str]) -> None:
    """Run `argv` warm (mode "python": python's arguments; "console": spoctl's), else as a fresh process."""
    folder = os.environ.get(DIR_VAR)
    if folder:
        try:
            _client_warm(_server_for(folder), mode, argv)
        except _Fallback:
            pass
    python = sys.executable  # the client's own interpreter: the suite's
    if mode == "console":
        script = os.path.join(os.path.dirname(python), "spoctl")  # the real console script
        os.execv(script, [script, *argv])
    os.execv(python, [python, *argv])


def _server_for(folder: str) -> str:
    """The socket of the server for this environment's import-time variables; started here if none is."""
    import hashlib
    import time

    key = hashlib.sha256(json.dumps(_import_time_env(dict(os.environ))).encode()).hexdigest()[:16]
    path = os.path.join(folder, key + ".sock")
    if not os.path.exists(path):
        try:
            os.close(os.open(os.path.join(folder, key + ".starting"), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            first = True
        except FileExistsError:
            first = False
        except OSError:
            raise _Fallback from None
        if first:
            import subprocess

            with open(os.path.join(folder, key + ".log"), "wb") as log:
                server = subprocess.Popen([sys.executable, __file__, "serve", path, folder], stdin=subprocess.DEVNULL,
                                          stdout=log, stderr=log, cwd=os.path.dirname(HERE), start_new_session=True)
            with open(os.path.join(folder, key + ".pid"), "w", encoding="utf-8") as f:
                f.write(str(server.pid))
        for _ in range(3000):  # the socket is bound before the imports: a moment
            if os.path.exists(path):
                break
            time.sleep(0.01)
        else:
            raise _Fallback
    return path


def _client_warm(path: str, mode: str, argv: list[str]) -> None:
    if mode == "python" and _parse_python_args(argv) is None:
        raise _Fallback
    pending: list[int] = []
    runner = [0]

    def forward(signum: int, frame: object) -> None:
        if runner[0]:
            os.kill(runner[0], signum)
        else:
            pending.append(signum)

    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
    except OSError:
        raise _Fallback from None
    for s in FORWARDED:
        signal.signal(s, forward)
    request = json.dumps({"mode": mode, "argv": argv, "cwd": os.getcwd(), "env": dict(os.environ)}).encode()
    socket.send_fds(sock, [struct.pack("!I", len(request)) + request], [0, 1, 2])
    reader = sock.makefile("rb")
    for line in reader:
        msg = json.loads(line)
        if "fallback" in msg:
            if os.environ.get("WARM_PYTHON_DEBUG"):
                sys.stderr.write(f"warm client: fresh process: {msg['fallback']}\n")
            for s in FORWARDED:
                signal.signal(s, signal.SIG_DFL)
            raise _Fallback
        if "pid" in msg:
            runner[0] = msg["pid"]
            for signum in pending:
                os.kill(runner[0], signum)
        elif "exit" in msg:
            os._exit(msg["exit"])
        elif "signal" in msg:
            signal.signal(msg["signal"], signal.SIG_DFL)
            os.kill(os.getpid(), msg["signal"])
            os._exit(128 + msg["signal"])
    sys.stderr.write("warm client: the server ended without the command's exit status\n")
    os._exit(1)


def _parse_python_args(argv: list[str]) -> tuple[bool, str, str, list[str]] | None:
    """(unbuffered, kind "-m"/"-c"/"script", target, rest) for the python options we run warm, else None."""
    unbuffered = False
    i = 0
    while i < len(argv) and argv[i] == "-u":
        unbuffered, i = True, i + 1
    if i >= len(argv):
        return None
    if argv[i] in ("-m", "-c"):
        return (unbuffered, argv[i], argv[i + 1], argv[i + 2:]) if i + 1 < len(argv) else None
    if argv[i].startswith("-"):
        return None
    return unbuffered, "script", argv[i], argv[i + 1:]


# ------------------------------------------------------------------------------------------------ server
def serve(path: str, folder: str) -> None:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(64)
    listener.settimeout(5)
    owner = int(open(os.path.join(folder, "owner.pid"), encoding="utf-8").read())
    before = dict(os.environ)
    import importlib

    for name in PRELOAD:
        importlib.import_module(name)
    set_by_imports = {k: v for k, v in os.environ.items() if before.get(k) != v}
    threads = len(os.listdir("/proc/self/task")) if os.path.isdir("/proc/self/task") else 1
    refuse = threads != 1  # forking a process with threads is not safe: every request runs fresh instead
    if refuse:
        sys.stderr.write(f"warm server: {threads} threads after the imports; not serving\n")
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # supervisors are reaped by the kernel
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    while True:
        try:
            conn, _ = listener.accept()
        except socket.timeout:  # the pytest process that owns the folder has ended (or was killed): so do we
            try:
                os.kill(owner, 0)
            except ProcessLookupError:
                os.unlink(path)
                return
            continue
        conn.setblocking(True)
        try:
            request, fds = _receive(conn)
        except (OSError, ValueError):
            conn.close()
            continue
        if refuse:  # (no other reason: the client chose this server by its environment, _server_for)
            conn.sendall(json.dumps({"fallback": f"the server has {threads} threads"}).encode() + b"\n")
        elif os.fork() == 0:
            listener.close()
            request["env"] = {**set_by_imports, **request["env"]}  # as in a process that imported them itself
            _supervise(conn, request, fds)  # never returns
        for fd in fds:
            os.close(fd)
        conn.close()


def _receive(conn: socket.socket) -> tuple[dict, list[int]]:
    data, fds, _, _ = socket.recv_fds(conn, 1 << 16, 3)
    while len(data) < 4:
        data += conn.recv(1 << 16)
    size = struct.unpack("!I", data[:4])[0]
    while len(data) < 4 + size:
        more = conn.recv(1 << 16)
        if not more:
            raise ValueError("short request")
        data += more
    return json.loads(data[4:4 + size]), list(fds)


def _supervise(conn: socket.socket, request: dict, fds: list[int]) -> None:
    """Fork the runner, tell the client its pid, and report how it ended; kill it if the client dies first."""
    import select

    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    pid = os.fork()
    if pid == 0:
        conn.close()
        _run(request, fds)  # never returns
    for fd in fds:
        os.close(fd)
    try:
        pidfd = os.pidfd_open(pid)  # readable when the runner ends (Linux 5.3 and later)
    except (AttributeError, OSError):
        pidfd = None  # elsewhere: look every 20 ms
    conn.sendall(json.dumps({"pid": pid}).encode() + b"\n")
    poller = select.poll()
    poller.register(conn, select.POLLIN)
    if pidfd is not None:
        poller.register(pidfd, select.POLLIN)
    status = None
    while status is None:
        ready = {fd for fd, _ in poller.poll(None if pidfd is not None else 20)}
        if conn.fileno() in ready and not conn.recv(1):  # the client died: so does its command
            os.kill(pid, signal.SIGKILL)
            status = os.waitpid(pid, 0)[1]
        elif pidfd is None or pidfd in ready:
            done, found = os.waitpid(pid, 0 if pidfd is not None else os.WNOHANG)
            status = found if done == pid else None
    end = {"signal": os.WTERMSIG(status)} if os.WIFSIGNALED(status) else {"exit": os.WEXITSTATUS(status)}
    try:
        conn.sendall(json.dumps(end).encode() + b"\n")
    except OSError:
        pass
    os._exit(0)


def _run(request: dict, fds: list[int]) -> None:
    """In the runner: become the client's process (stdio, folder, environment, arguments), run the command, and
    end as the interpreter ends (non-daemon threads joined, atexit functions, streams flushed)."""
    import random
    import threading

    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for fd, target in zip(fds, (0, 1, 2)):
        os.dup2(fd, target)
        os.close(fd)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    random.seed()
    if "numpy" in sys.modules:
        sys.modules["numpy"].random.seed()
    argv = request["argv"]
    if request["mode"] == "console":
        unbuffered, kind, target, rest = False, "console", "", argv
    else:
        unbuffered, kind, target, rest = _parse_python_args(argv)
    unbuffered = unbuffered or bool(os.environ.get("PYTHONUNBUFFERED"))
    sys.stdout.reconfigure(line_buffering=os.isatty(1) and not unbuffered, write_through=unbuffered)
    sys.stderr.reconfigure(line_buffering=True, write_through=unbuffered)
    code: object = 0
    interrupted = False
    try:
        _execute(kind, target, rest)
    except SystemExit as done:
        code = done.code
    except KeyboardInterrupt:
        _print_uncaught()
        code, interrupted = 1, True
    except BaseException:
        _print_uncaught()
        code = 1
    if code is None:
        code = 0
    elif not isinstance(code, int):
        print(code, file=sys.stderr)
        code = 1
    try:
        threading._shutdown()
    except BaseException:
        pass
    import atexit

    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    if interrupted:  # as Python does: die by SIGINT
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    os._exit(code & 0xFF)


def _print_uncaught() -> None:
    """The traceback Python prints, without this file's frames (a fresh process has none of them)."""
    kind, value, tb = sys.exc_info()
    while tb is not None and tb.tb_frame.f_code.co_filename == os.path.abspath(__file__):
        tb = tb.tb_next
    sys.excepthook(kind, value.with_traceback(tb), tb)  # (Python prints the exception's own __traceback__)


def _execute(kind: str, target: str, rest: list[str]) -> None:
    import runpy
    import types

    if kind == "console":  # the `spoctl` console script
        sys.argv = [os.path.join(bin_dir(), "spoctl"), *rest]
        sys.path[0] = bin_dir()
        from spoctl.cli import main

        sys.exit(main())
    if kind == "-m":
        sys.argv = [target, *rest]  # runpy puts the module's file in argv[0]
        sys.path[0] = os.getcwd()
        runpy.run_module(target, run_name="__main__", alter_sys=True)
    elif kind == "-c":
        sys.argv = ["-c", *rest]
        sys.path[0] = ""
        main = types.ModuleType("__main__")
        sys.modules["__main__"] = main
        exec(compile(target, "<string>", "exec"), main.__dict__)
    else:
        sys.argv = [target, *rest]
        sys.path[0] = os.path.dirname(os.path.realpath(target))
        runpy.run_path(target, run_name="__main__")


if __name__ == "__main__":
    if sys.argv[1:2] == ["serve"]:
        serve(sys.argv[2], sys.argv[3])
