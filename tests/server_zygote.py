"""Test servers forked from one process that has already imported what every server imports.

Most of a test server's start is the interpreter importing torch, transformers, peft and
Gradio, the same for every server, and the suite starts dozens of them on a 2-core machine.
This process does those imports once per test run, then forks a server for each ``start``
request it reads. The fork runs ``app.py`` as ``__main__`` with the server's own
environment, argv, working directory and log file. From ``app.main`` on, it is the code a
real start runs, including the ``spawn``ed helpers, which start from ``app.py`` as they do
in production. Tests of the start itself (a taken port, the interpreter's exit) and servers
with other interpreter-level settings still run ``python app.py`` (``tests.support``).

``python -m tests.server_zygote --listen PATH`` listens on a Unix socket: every test worker
of the run connects to the one process (its imports cost ~17 CPU s, once instead of once
per worker). It prints one JSON line on standard output when it is ready, then speaks JSON
lines on each connection, which it opens with ``{"ready": bool, "env": {...}}`` (the
environment it was started with, which a forked server's may differ from in THAI_ settings
only):

- ``{"op": "start", "env": {...}, "argv": [...], "log": PATH}`` answers ``{"pid": N}``;
  with ``"module": NAME`` it runs ``python -m NAME`` instead of ``app.py`` (the batch CLI),
  and ``"stderr": PATH`` keeps standard error apart from ``log``;
- ``{"op": "poll", "pid": N}`` answers ``{"code": C}``. ``C`` is null while the server runs;
  otherwise it is its exit code, negative for a signal as ``subprocess`` reports it.

It reaps its servers. When a connection closes (its worker finished or died), it kills the
servers that connection started; once the last connection has closed, it exits.
"""

from __future__ import annotations

import atexit
import json
import os
import runpy
import selectors
import signal
import socket
import sys
import threading
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
START_ENV = dict(os.environ)  # as the worker that started this process gave it
# A run whose workers never connect (the starting one died before it could) ends here.
FIRST_CLIENT_WAIT_S = 300


def preload() -> None:
    """What a server imports before it serves. Nothing here may start a thread: a fork
    copies only the thread that forks. (numpy's OpenBLAS would start its thread pool at
    import; here it runs on the calling thread, which no server relies on for speed.)"""
    os.environ["OPENBLAS_NUM_THREADS"] = "1"  # this process's own; each server gets its env
    sys.path.insert(0, str(REPO))
    import gradio  # noqa: F401
    import peft  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401
    import transformers.models.qwen2.modeling_qwen2  # noqa: F401
    import uvicorn  # noqa: F401

    import api.server  # noqa: F401
    import thai_ui  # noqa: F401
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401


def threads() -> int:
    return len(os.listdir("/proc/self/task"))


def become_server(request: dict) -> None:
    """In the forked child: the process's streams, environment and argv, then app.py (or
    ``module``, as ``python -m`` runs it) as __main__, then :func:`exit_as_python_does`."""
    devnull = os.open(os.devnull, os.O_RDONLY)
    stdout = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    stderr = stdout
    if request.get("stderr", request["log"]) != request["log"]:
        stderr = os.open(request["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(devnull, 0)
    os.dup2(stdout, 1)
    os.dup2(stderr, 2)
    for fd in {devnull, stdout, stderr}:
        os.close(fd)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    # A fresh interpreter draws its generators' seeds from the OS; a fork would share this
    # process's (Python's own ``random`` reseeds itself after a fork).
    import numpy
    import torch

    torch.seed()
    numpy.random.seed()
    os.environ.clear()
    os.environ.update(request["env"])
    os.chdir(REPO)
    sys.path[0] = str(REPO)  # as for `python app.py` and `python -m` in the repository
    try:
        if request.get("module"):
            sys.argv = [request["module"], *request["argv"]]  # runpy sets argv[0] to its file
            runpy.run_module(request["module"], run_name="__main__", alter_sys=True)
        else:
            app = str(REPO / "app.py")
            sys.argv = [app, *request["argv"]]
            runpy.run_path(app, run_name="__main__")
        code = 0
    except SystemExit as exit_:
        code = exit_code(exit_.code)
    except KeyboardInterrupt:
        traceback.print_exc()
        code = -signal.SIGINT
    except BaseException:
        traceback.print_exc()
        code = 1
    exit_as_python_does(code)


def exit_code(code: object) -> int:
    """The status ``SystemExit(code)`` gives a process (a message is printed, status 1)."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    print(code, file=sys.stderr)
    return 1


def exit_as_python_does(code: int) -> None:
    """What the interpreter does at exit that a program can see, in its order: wait for the
    threads that are not daemons, run the ``atexit`` handlers (logging's flush,
    multiprocessing's reaping of its children, ``weakref.finalize``), flush the streams.
    Then ``os._exit``: freeing every object of torch, transformers and Gradio one by one
    took a forked process about 3 s of CPU (each page it touches is copied from this
    process), and nothing outside the process can tell. A negative ``code`` is a signal,
    raised on this process as the interpreter does after an uncaught KeyboardInterrupt."""
    threading._shutdown()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    if code < 0:
        signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    os._exit(code)


class Connection:
    """One test worker's connection: its unanswered bytes and the servers it started."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.pending = b""
        self.servers: set[int] = set()

    def answer(self, message: dict) -> None:
        self.sock.sendall((json.dumps(message) + "\n").encode())


def serve(listen: str) -> None:
    codes: dict[int, int] = {}
    running: set[int] = set()
    connections: dict[socket.socket, Connection] = {}

    def reap() -> None:
        while running:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            running.discard(pid)
            codes[pid] = os.waitstatus_to_exitcode(status)

    def kill(pids: set[int]) -> None:
        for pid in pids & running:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    preload()
    count = threads()
    hello = {"ready": count == 1, "threads": count, "env": START_ENV}
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(listen)
    listener.listen(16)
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ)
    sys.stdout.write(json.dumps(hello) + "\n")
    sys.stdout.flush()

    def close_inherited() -> None:
        """In a forked server: none of this process's sockets."""
        selector.close()
        listener.close()
        for sock in connections:
            sock.close()

    def handle(connection: Connection, request: dict) -> None:
        reap()
        if request["op"] == "start":
            pid = os.fork()
            if pid == 0:
                close_inherited()
                become_server(request)  # ends with os._exit
            running.add(pid)
            connection.servers.add(pid)
            connection.answer({"pid": pid})
        elif request["op"] == "poll":
            connection.answer({"code": codes.get(request["pid"])})

    ever_connected = False
    started = time.monotonic()
    try:
        while connections or not ever_connected:
            if not ever_connected and time.monotonic() - started > FIRST_CLIENT_WAIT_S:
                break
            for key, _ in selector.select(timeout=5):
                if key.fileobj is listener:
                    sock, _ = listener.accept()
                    ever_connected = True
                    try:
                        Connection(sock).answer(hello)
                    except OSError:  # gone already
                        sock.close()
                        continue
                    connections[sock] = Connection(sock)
                    selector.register(sock, selectors.EVENT_READ)
                    continue
                connection = connections[key.fileobj]
                try:
                    data = connection.sock.recv(65536)
                    connection.pending += data
                    while b"\n" in connection.pending:
                        line, connection.pending = connection.pending.split(b"\n", 1)
                        handle(connection, json.loads(line))
                except OSError:  # reset, or gone before its answer: as closed
                    data = b""
                if not data:  # its worker is gone: so are its servers
                    selector.unregister(connection.sock)
                    connection.sock.close()
                    del connections[connection.sock]
                    kill(connection.servers)
                    reap()
    finally:
        kill(set(running))
        deadline = time.monotonic() + 10
        while running and time.monotonic() < deadline:
            reap()
            time.sleep(0.05)
        try:
            os.unlink(listen)
        except FileNotFoundError:
            pass


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "--listen":
        sys.exit("usage: python -m tests.server_zygote --listen SOCKET_PATH")
    serve(sys.argv[2])
