"""The tests' CLI runs, each in a process forked from a server that has already imported torch, Lightning and the
package, instead of in a fresh interpreter.

Why: a fresh ``python -m llmfoundry_pl.<command>`` spends ~6 s of a core on imports alone (Lightning imports
torchmetrics, which imports transformers and scipy where they are installed): more than most CLI tests spend on
anything else, and the suite runs about a hundred of them on a 2-core machine (the suite: 498 s -> 314 s). The
fork is still a process of its own. It takes the test's working directory, environment, arguments and stdin,
runs the command with ``runpy`` as ``python -m`` does (``sys.argv``, ``__main__``, ``sys.path[0]``), and ends
with the command's own exit status and output. Modules a command imports lazily (peft, torchao, ...) are
imported in the fork, as in a fresh interpreter.

The server runs no tensor operation before it forks: OpenMP's thread pool is not fork-safe once it has been used.
What a fork cannot reproduce is a setting read while the interpreter starts or a library loads (``PYTHONPATH``,
``LD_PRELOAD``, OpenMP's variables): :func:`run` starts a fresh interpreter when one of those differs from the
server's. The exception is ``OMP_NUM_THREADS``, which the tests set (``one_thread``): the fork applies it with
``torch.set_num_threads``, as OpenMP would have on loading.

Protocol, one JSON line each way: the client sends ``{"command", "args", "cwd", "env", "stdin", "stdout",
"stderr"}`` (the last three are file paths); the server answers ``{"pid"}`` once it has forked, and
``{"returncode"}`` when the command has ended. One command at a time per test process.
"""

from __future__ import annotations

import atexit
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

_LOAD_TIME_ENV = ("PYTHON", "LD_", "OMP_", "KMP_", "MKL_", "OPENBLAS_")  # read as the interpreter or a library loads
_APPLIED_IN_FORK = ("PYTHONUNBUFFERED", "OMP_NUM_THREADS")  # ... but these two are the server's or set in the fork
_server: subprocess.Popen | None = None
_server_env: dict[str, str] = {}
_server_failed = False


class _ServerGone(Exception):
    """The server ended: it could not import the package, or it was killed."""


def run(command: str, args: list[str], cwd: Path, env: dict[str, str], timeout: float,
        input: str | None = None) -> subprocess.CompletedProcess:
    """``python -m llmfoundry_pl.<command> args...`` as ``subprocess.run(..., capture_output=True, text=True)``
    returns it; raises ``subprocess.TimeoutExpired`` after ``timeout`` seconds, the command killed."""
    argv = [sys.executable, "-m", f"llmfoundry_pl.{command}", *args]
    server = _the_server()
    if server is None or _load_time_env(env) != _load_time_env(_server_env):
        return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, input=input)
    with tempfile.TemporaryDirectory(prefix="forked-cli-") as tmp:
        files = {name: Path(tmp, name) for name in ("stdin", "stdout", "stderr")}
        files["stdin"].write_text(input or "")
        request = {"command": command, "args": list(args), "cwd": str(cwd), "env": env,
                   **{name: str(path) for name, path in files.items()}}
        try:
            server.stdin.write(json.dumps(request) + "\n")
            server.stdin.flush()
            pid = _reply(server, timeout)["pid"]
        except (_ServerGone, BrokenPipeError):  # the package does not import: a fresh interpreter shows why
            global _server_failed
            _server_failed = True
            return run(command, args, cwd, env, timeout, input)
        except BaseException:  # the test was stopped while the server started: the next one gets a new server
            _stop_server()
            raise
        try:
            returncode = _reply(server, timeout)["returncode"]
        except subprocess.TimeoutExpired:
            os.kill(pid, signal.SIGKILL)
            _reply(server, timeout)
            output = files["stdout"].read_text(), files["stderr"].read_text()
            raise subprocess.TimeoutExpired(argv, timeout, *output) from None
        except BaseException:  # the test was stopped (Ctrl-C, pytest-timeout): the next one gets a new server
            os.kill(pid, signal.SIGKILL)
            _stop_server()
            raise
        return subprocess.CompletedProcess(argv, returncode, files["stdout"].read_text(), files["stderr"].read_text())


def _load_time_env(env: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in env.items() if k.startswith(_LOAD_TIME_ENV) and k not in _APPLIED_IN_FORK}


def _the_server() -> subprocess.Popen | None:
    """This test process's server, started on first use (one per pytest-xdist worker); None once it has failed."""
    global _server, _server_env
    if _server_failed:
        return None
    if _server is None or _server.poll() is not None:
        # Without OMP_NUM_THREADS, so that OpenMP's default is a fresh interpreter's (the fork applies the test's);
        # unbuffered, as run_cli asks, so that a command killed at its timeout has written what it printed.
        _server_env = {**{k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}, "PYTHONUNBUFFERED": "1"}
        _server = subprocess.Popen([sys.executable, "-m", "tests.helpers.forked_cli"], env=_server_env, text=True,
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                   cwd=Path(__file__).resolve().parents[2])
    return _server


def _stop_server() -> None:
    global _server
    if _server is not None:
        _server.kill()
        _server.wait()
        _server = None


atexit.register(_stop_server)


def _reply(server: subprocess.Popen, timeout: float) -> dict:
    ready, _, _ = select.select([server.stdout], [], [], timeout)
    if not ready:
        raise subprocess.TimeoutExpired("forked_cli", timeout)
    line = server.stdout.readline()
    if not line:
        raise _ServerGone(f"status {server.wait()}")
    return json.loads(line)


def _serve() -> tuple[dict, int] | None:
    """The server's loop: fork for each request and report the child's status. Returns, in the child only, the
    request to run and OpenMP's default thread count."""
    import torch

    import llmfoundry_pl.cli.bench  # noqa: F401  -- what the commands import at the top, once, before any fork
    import llmfoundry_pl.cli.eval  # noqa: F401
    import llmfoundry_pl.cli.export  # noqa: F401
    import llmfoundry_pl.cli.generate  # noqa: F401
    import llmfoundry_pl.cli.serve  # noqa: F401
    import llmfoundry_pl.cli.train  # noqa: F401

    default_threads = torch.get_num_threads()  # OpenMP's setting; it starts no thread
    while line := sys.stdin.readline():
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            return request, default_threads
        print(json.dumps({"pid": pid}), flush=True)
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}), flush=True)
    return None


def _become(request: dict, default_threads: int) -> None:
    """In the child: take the request's directory, environment and files, then run the command as ``python -m``
    would; how it ends (status, traceback, atexit handlers) is the interpreter's own."""
    import runpy

    import torch

    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    torch.set_num_threads(int(request["env"].get("OMP_NUM_THREADS", default_threads)))
    write = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    for fd, name, mode in ((0, "stdin", os.O_RDONLY), (1, "stdout", write), (2, "stderr", write)):
        opened = os.open(request[name], mode)
        os.dup2(opened, fd)
        os.close(opened)
    sys.stdin = open(0, closefd=False)  # the server's reader may hold read-ahead of its own pipe
    sys.path[0] = request["cwd"]  # where python -m looks first
    sys.argv = ["-m", *request["args"]]  # runpy puts the module's path first, as python -m does
    runpy.run_module(f"llmfoundry_pl.{request['command']}", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    if (job := _serve()) is not None:
        _become(*job)
