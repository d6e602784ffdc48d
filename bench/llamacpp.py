"""llama.cpp's ``llama-server`` as a peer in the benchmark (the server CPU users pick).

llama-server speaks OpenAI's ``/v1/chat/completions`` with streaming, and with
``stream_options.include_usage`` its last chunk carries ``usage`` (so the load
generator counts its tokens the same way as ours). It applies the chat template
stored in the GGUF (jinja, on by default), so a GGUF converted from our
checkpoint gets the same prompt text as our server. Fixed-length outputs:
``max_tokens`` (an alias of its ``n_predict``) and ``ignore_eos`` (documented in
its ``tools/server/README.md``; it adds a -inf logit bias to every end-of-generation
token). ``cache_prompt`` (reuse of the slot's KV for a shared prefix) stays at its
default, on, like our prefix cache; a single-stream TTFT measurement turns it off
so the whole prompt is prefilled.

llama-server keeps each slot's last prompt and sends a request to the slot whose
prompt matches it best, so a prompt it has seen before is prefilled from its last
token: the benchmark's 8 workload prompts repeat, and at c8 it then prefilled about
one token per request (``bench/RESULTS.md``, run 1 of the real-shape table). Our
prefix cache keeps only the prefix recent prompts share. So each request's message
starts with its own number (:func:`numbered`): no whole prompt repeats, and the chat
template's shared prefix stays shared for both.

Nothing here builds llama.cpp or converts models; how to do both is in
``bench/RESULTS.md`` ("Real-shape CPU table: llama.cpp beside ours"). The binary is
found from ``--llama-server``, ``$LLAMA_SERVER``, then ``llama-server`` on ``PATH``.
"""

from __future__ import annotations

import itertools
import os
import shutil
from pathlib import Path

from bench.loadgen import chat_body as _chat_body

NAME = "llama.cpp"
SERVED_MODEL = "bench"     # the name llama-server reports (--alias); it accepts any in requests


def find_llama_server(explicit: str | None = None) -> tuple[str | None, str]:
    """``(path, "")`` for a runnable llama-server, else ``(None, why not)``."""
    for candidate, origin in ((explicit, "--llama-server"),
                              (os.environ.get("LLAMA_SERVER"), "$LLAMA_SERVER")):
        if candidate:
            path = Path(candidate).expanduser()
            if path.is_file() and os.access(path, os.X_OK):
                return str(path.resolve()), ""
            return None, f"{origin} {candidate} is not an executable file"
    found = shutil.which("llama-server")
    if found:
        return found, ""
    return None, ("no llama-server (give --llama-server PATH or set $LLAMA_SERVER; "
                  "build notes in bench/RESULTS.md)")


def unavailable(explicit_server: str | None, gguf: str | None) -> str | None:
    """Why llama.cpp cannot run in this benchmark, or None when it can."""
    if not gguf:
        return "no --gguf model given (a GGUF of the same checkpoint, see bench/RESULTS.md)"
    if not Path(gguf).is_file():
        return f"--gguf {gguf} does not exist"
    return find_llama_server(explicit_server)[1] or None


def server_argv(exe: str, gguf: str, port: int, *, parallel: int = 8, ctx_per_slot: int = 1024,
                threads: int = 2, extra: list[str] | tuple[str, ...] = ()) -> list[str]:
    """The llama-server command: ``parallel`` slots of ``ctx_per_slot`` tokens each
    (``-c`` is the total, split evenly between the slots), continuous batching (its
    default), ``threads`` for both decoding and prompt processing."""
    return [exe, "-m", str(gguf), "-np", str(parallel), "-c", str(parallel * ctx_per_slot),
            "-t", str(threads), "-tb", str(threads), "--host", "127.0.0.1", "--port", str(port),
            "--alias", SERVED_MODEL, "--no-webui", *extra]


_REQUEST_NUMBERS = itertools.count(1)


def numbered(body_for):
    """``body_for`` with each request's first message prefixed "คำขอที่ N: " (request N),
    N counting up across the whole process, so no prompt repeats."""
    def wrapped(i: int) -> dict:
        body = body_for(i)
        first, *rest = body["messages"]
        return {**body, "messages": [{**first, "content": f"คำขอที่ {next(_REQUEST_NUMBERS)}: "
                                      f"{first['content']}"}, *rest]}
    return wrapped


def chat_body(model: str, max_tokens: int, *, numbered_prompts: bool = True):
    """The load generator's standard body plus llama-server's ``ignore_eos``: every reply
    is exactly ``max_tokens`` long, as with our server's fixed-length fields. With
    ``numbered_prompts`` (see the module's notes) each prompt is 8-10 tokens longer than
    the other systems' in ``bench/run_benchmark.py``, which costs llama.cpp slightly."""
    plain = _chat_body(model, max_tokens, fixed_length=False)

    def body_for(i: int) -> dict:
        return {**plain(i), "ignore_eos": True}
    return numbered(body_for) if numbered_prompts else body_for

