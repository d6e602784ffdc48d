"""The real-shape CPU table: our server beside llama.cpp's llama-server, in one run.

Every system serves the same random-weight model of Qwen2.5-1.5B's exact shape
(``python -m bench.random_model --shape qwen2.5-1.5b``; llama.cpp gets GGUFs
converted from that same checkpoint) and is measured the same way, one system at
a time, each on all the CPU's cores:

- **single stream**: after a warm-up of similar length, one streamed chat whose
  prompt is the bundled Thai article cut to ``--prompt-tokens`` (785, as in
  ``bench/cpu_settings.py``), ``--single-tokens`` output tokens: time to first token
  (the whole prompt is prefilled: our prefix cache has nothing to reuse yet, and
  llama-server gets ``cache_prompt: false``) and the decode rate after it;
- **concurrency 4 and 8**: the benchmark's short Thai chats (``bench/workload.py``),
  each request's message numbered so no whole prompt repeats (``--no-unique-prompts``
  to send them as they are), ``--rounds`` x c requests of ``--tokens`` tokens, aggregate
  output tokens/s, the same load generator (``bench/loadgen.py``) for every server.

Systems (``--systems``, in the order run): ``ours-auto`` (our defaults: ``THAI_DTYPE=auto``,
bf16 on a CPU with native bf16, and ``THAI_QUANTIZATION=auto``, w8a8 when its measured KL
is within the limit; the table says what ran), ``ours-int8`` (weight-only int8),
``llama.cpp-Q8_0``, ``ours-bf16`` (``THAI_QUANTIZATION=none``), ``ours-float32`` (the
earlier CPU default; single stream only unless ``--float32-levels``),
``llama.cpp-Q4_K_M``, ``generate-bf16`` (in-process ``model.generate`` in a child
process: the single stream through a streamer, c4/c8 as one static batch each);
``ours-w8a8`` on request.
llama-server runs with ``-np 8`` slots (``bench/llamacpp.py``).

It can wait for the machine (``--wait-for FILE``, polled every 30 s), stops at once
when ``--stop-file`` appears, and skips what would start after ``--deadline-min``.
Writes ``cpu_real_shape.json`` and ``.md`` to ``--out`` after every system::

    python -m bench.cpu_real_shape --model /tmp/qwen15 --llama-server PATH \\
        --gguf Q8_0=/tmp/qwen15-Q8_0.gguf --gguf Q4_K_M=/tmp/qwen15-Q4_K_M.gguf
"""

from __future__ import annotations

import _thread
import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

from bench import llamacpp
from bench.cpu_settings import long_prompt
from bench.loadgen import RequestRecord, chat_body, run_level, sse_events
from bench.servers import REPO, ServerPool

SYSTEMS = ("ours-auto", "ours-int8", "llama.cpp-Q8_0", "ours-bf16", "ours-float32",
           "llama.cpp-Q4_K_M", "generate-bf16")
# ours-auto is the default settings (THAI_QUANTIZATION=auto: w8a8 when its measured KL is
# within the limit, which /health reports); ours-float32 is the earlier CPU default.
OURS = {"ours-auto": {"THAI_DTYPE": "auto", "THAI_QUANTIZATION": "auto"},
        "ours-bf16": {"THAI_DTYPE": "auto", "THAI_QUANTIZATION": "none"},
        "ours-int8": {"THAI_DTYPE": "auto", "THAI_QUANTIZATION": "int8"},
        "ours-w8a8": {"THAI_DTYPE": "auto", "THAI_QUANTIZATION": "w8a8"},
        "ours-float32": {"THAI_DTYPE": "float32", "THAI_QUANTIZATION": "none"}}
WEIGHTS = {"none": "", "int8": " + int8 weights", "w8a8": " + int8 weights and activations"}
# The float32 reference when this run did not measure it (bench/RESULTS.md, run 3).
FLOAT32_EARLIER = {"decode_tok_s": 2.45, "ttft_s": 12.95, "source": "bench/RESULTS.md run 3 (earlier run)"}


# Every system's c4/c8 requests are numbered ("คำขอที่ N: " first), so no server can reuse
# a whole earlier prompt while the chat template's shared prefix stays shared (why:
# bench/llamacpp.py's notes).
unique = llamacpp.numbered


# --------------------------------------------------------------------------- prompts

def prompts(model: str, prompt_tokens: int) -> tuple[str, str, int]:
    """(measured long prompt, a warm-up prompt of the same size from elsewhere in the
    article, the long prompt's tokens with the chat template by the model's tokenizer)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    text = long_prompt(model, prompt_tokens)
    article = (REPO / "assets" / "examples" / "long_article.txt").read_text(encoding="utf-8")
    ids = tokenizer(article)["input_ids"]
    size = len(tokenizer(text)["input_ids"])
    warm = tokenizer.decode(ids[len(ids) - size:])   # the article's end: no shared prefix
    chat = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=True,
                                         add_generation_prompt=True)
    count = len(chat["input_ids"] if hasattr(chat, "keys") else chat)
    return text, warm, count


# --------------------------------------------------------------------------- HTTP systems

async def stream_with_usage(client: httpx.AsyncClient, url: str, body: dict,
                            timeout_s: float) -> tuple[RequestRecord, dict, dict]:
    """One streamed chat: the record (TTFT to the first content chunk), the final
    ``usage`` and, from llama-server, its own ``timings``."""
    start = time.perf_counter()
    first = last = None
    chunks, usage, timings = 0, {}, {}
    async with asyncio.timeout(timeout_s):
        async with client.stream("POST", url + "/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                text = (await response.aread()).decode(errors="replace")[:300]
                return RequestRecord(False, error=f"HTTP {response.status_code}: {text}"), {}, {}
            async for event in sse_events(response):
                if "error" in event:
                    return RequestRecord(False, error=str(event["error"])[:300]), {}, {}
                usage = event.get("usage") or usage
                timings = event.get("timings") or timings
                for choice in event.get("choices") or ():
                    if (choice.get("delta") or {}).get("content"):
                        last = time.perf_counter()
                        first = first or last
                        chunks += 1
    if first is None:
        return RequestRecord(False, error="no content streamed"), usage, timings
    tokens = int(usage.get("completion_tokens") or chunks)
    return (RequestRecord(True, tokens=tokens, ttft=first - start, latency=last - start),
            usage, timings)


async def measure_server(name: str, server, is_llama: bool, long_text: str, warm_text: str,
                         args: argparse.Namespace, levels: list[int]) -> dict:
    def body(content: str, tokens: int) -> dict:
        b = {"model": server.model, "messages": [{"role": "user", "content": content}],
             "max_tokens": tokens, "temperature": 0.0, "stream": True,
             "stream_options": {"include_usage": True}}
        if is_llama:
            b.update(ignore_eos=True, cache_prompt=False)
        else:
            b.update(min_tokens=tokens, ignore_eos=True, no_repeat_ngram_size=0)
        return b

    out: dict = {}
    async with httpx.AsyncClient(timeout=args.request_timeout) as client:
        warm, _, _ = await stream_with_usage(client, server.url, body(warm_text, 4), args.request_timeout)
        if not warm.ok:
            raise RuntimeError(f"warm-up failed: {warm.error}")
        record, usage, timings = await stream_with_usage(
            client, server.url, body(long_text, args.single_tokens), args.request_timeout)
    if not record.ok:
        raise RuntimeError(f"single stream failed: {record.error}")
    decode_s = record.latency - record.ttft
    out["single"] = {"prompt_tokens": usage.get("prompt_tokens"), "output_tokens": record.tokens,
                     "ttft_s": round(record.ttft, 3),
                     "decode_tok_s": round((record.tokens - 1) / decode_s, 3) if decode_s > 0 else None}
    if timings:   # llama-server's own clock, for a cross-check
        out["single"]["server_timings"] = {k: timings.get(k) for k in (
            "prompt_n", "prompt_ms", "predicted_n", "predicted_ms", "predicted_per_second")}
    print(f"  {name}: TTFT {out['single']['ttft_s']} s for "
          f"{out['single']['prompt_tokens']} prompt tokens, decode {out['single']['decode_tok_s']} tok/s",
          flush=True)
    def bodies(tokens: int):
        body_for = (llamacpp.chat_body(server.model, tokens, numbered_prompts=False) if is_llama
                    else chat_body(server.model, tokens, fixed_length=True))
        return unique(body_for) if args.unique_prompts else body_for

    body_for = bodies(args.tokens)
    if levels:   # a short batched warm-up, not recorded
        await run_level(server.name, server.url, concurrency=2, num_requests=2,
                        body_for=bodies(4), timeout_s=args.request_timeout)
    for c in levels:
        level = await run_level(name, server.url, concurrency=c, num_requests=args.rounds * c,
                                body_for=body_for, timeout_s=args.request_timeout)
        out[f"c{c}"] = level.as_dict()
        print(f"  {name} c={c}: {level.output_tokens_per_s} tok/s, TTFT p50 "
              f"{level.ttft_p50_ms} ms, ITL p50 {level.itl_p50_ms} ms, "
              f"errors {level.errors}/{level.requests}", flush=True)
    return out


def peak_rss_gib(session_id: int) -> float | None:
    """Sum of the peak resident memory (VmHWM) of every live process in a session."""
    total = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            if int(stat.rsplit(")", 1)[1].split()[3]) != session_id:
                continue
            for line in (entry / "status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    total += int(line.split()[1])
        except (OSError, ValueError, IndexError):
            continue
    return round(total / 2**20, 2) if total else None


def command_line(server) -> str:
    keep = {k: v for k, v in server.env.items()
            if k.startswith(("THAI_", "OMP_", "MKL_")) and v != ""}
    argv = [os.path.relpath(a, REPO) if a.startswith(str(REPO)) else a for a in server.argv]
    return " ".join([*(f"{k}={shlex.quote(v)}" for k, v in keep.items()), *map(shlex.quote, argv)])


def run_server_system(name: str, args, pool: ServerPool, long_text: str, warm_text: str,
                      levels: list[int], ctx_per_slot: int) -> dict:
    if name.startswith("ours-"):
        # The batch width and queue are the server's defaults (16, 64), which start_ours sets.
        server = pool.start_ours(args.model, dtype=OURS[name]["THAI_DTYPE"], max_batch_size=16,
                                 max_waiting=64, extra_env=OURS[name], ready_timeout_s=900)
        health = httpx.get(server.url + "/health").json()
        quantization = health.get("quantization") or "none"
        info = {"dtype": health.get("dtype"), "dtype_reason": health.get("dtype_reason"),
                "quantization": quantization,
                "quantization_reason": health.get("quantization_reason"),
                "weights": f"{health.get('dtype')}{WEIGHTS.get(quantization, ' + ' + quantization)}"}
        is_llama = False
        if name == "ours-float32" and not args.float32_levels:
            levels = []
    else:
        quant = name.split("-", 1)[1]
        gguf = args.gguf[quant]
        server = pool.start_llama_server(args.llama_server_path, gguf, name=name,
                                         parallel=args.llama_parallel, ctx_per_slot=ctx_per_slot,
                                         threads=args.threads, ready_timeout_s=600)
        info = {"weights": f"GGUF {quant}", "gguf": gguf,
                "gguf_bytes": Path(gguf).stat().st_size}
        is_llama = True
    info.update(command=command_line(server), ready_s=round(server.ready_s, 1))
    print(f"{name}: ready in {info['ready_s']} s: {info['command']}", flush=True)
    try:
        info.update(asyncio.run(measure_server(name, server, is_llama, long_text, warm_text, args, levels)))
    finally:
        info["peak_rss_gib"] = peak_rss_gib(server.proc.pid)
        server.stop()
    return info


# --------------------------------------------------------------------------- in-process generate

def generate_child(args: argparse.Namespace) -> None:
    """In this process: ``model.generate`` on the same prompts; prints one JSON object."""
    import torch
    from transformers.generation.streamers import BaseStreamer

    from bench.inprocess import encode, load, timed_generate

    torch.set_num_threads(args.threads)
    model, tokenizer, device = load(args.model, "cpu", "bfloat16")
    long_text, warm_text, _ = prompts(args.model, args.prompt_tokens)

    def chat_ids(text: str) -> list[int]:
        out = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=True,
                                            add_generation_prompt=True, return_dict=False)
        return list(out)

    class Clock(BaseStreamer):
        def __init__(self):
            self.times: list[float] = []
            self.calls = 0

        def put(self, value):
            self.calls += 1
            if self.calls > 1:          # the first call is the prompt
                self.times.append(time.perf_counter())

        def end(self):
            pass

    def stream(text: str, tokens: int) -> dict:
        ids = torch.tensor([chat_ids(text)])
        clock = Clock()
        start = time.perf_counter()
        with torch.inference_mode():
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens,
                           min_new_tokens=tokens, do_sample=False, no_repeat_ngram_size=0,
                           pad_token_id=tokenizer.pad_token_id or 0, streamer=clock)
        t = clock.times
        return {"prompt_tokens": ids.shape[1], "output_tokens": len(t), "ttft_s": round(t[0] - start, 3),
                "decode_tok_s": round((len(t) - 1) / (t[-1] - t[0]), 3) if len(t) > 1 else None}

    ready = time.perf_counter()
    stream(warm_text, 4)
    result = {"weights": "bf16", "command": "", "single": stream(long_text, args.single_tokens)}
    print(json.dumps({"progress": result["single"]}), flush=True)
    timed_generate(model, tokenizer, encode(tokenizer, [0, 1]), 4, device)  # batched warm-up
    for c in args.levels:
        elapsed = timed_generate(model, tokenizer, encode(tokenizer, list(range(c))), args.tokens, device)
        result[f"c{c}"] = {"concurrency": c, "requests": c, "output_tokens": c * args.tokens,
                           "duration_s": round(elapsed, 3), "errors": 0,
                           "output_tokens_per_s": round(c * args.tokens / elapsed, 2)}
    result["measure_s"] = round(time.perf_counter() - ready, 1)
    print(json.dumps({"result": result}), flush=True)


def run_generate_system(args: argparse.Namespace, levels: list[int]) -> dict:
    argv = [sys.executable, "-m", "bench.cpu_real_shape", "--generate-child", "--model", args.model,
            "--threads", str(args.threads), "--tokens", str(args.tokens),
            "--single-tokens", str(args.single_tokens), "--prompt-tokens", str(args.prompt_tokens),
            "--concurrency", ",".join(map(str, levels))]
    started = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True, start_new_session=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    result = None
    try:
        for line in proc.stdout:
            event = json.loads(line)
            if "progress" in event:
                p = event["progress"]
                print(f"  generate-bf16: TTFT {p['ttft_s']} s for {p['prompt_tokens']} prompt tokens, "
                      f"decode {p['decode_tok_s']} tok/s", flush=True)
            result = event.get("result", result)
        proc.wait()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    if result is None:
        raise RuntimeError(f"generate child exited with {proc.returncode}")
    result["command"] = " ".join(shlex.quote(os.path.relpath(a, REPO) if a.startswith(str(REPO)) else a)
                                 for a in argv)
    result["total_s"] = round(time.perf_counter() - started, 1)
    for c in levels:
        print(f"  generate-bf16 static batch {c}: {result[f'c{c}']['output_tokens_per_s']} tok/s",
              flush=True)
    return result


# --------------------------------------------------------------------------- report

def _get(results: dict, system: str, *path):
    value = results.get("systems", {}).get(system)
    for key in path:
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return value


def targets(results: dict) -> list[dict]:
    """The CPU speed targets, with the ratio, the goal and whether it is met."""
    rows = []
    f32_decode = _get(results, "ours-float32", "single", "decode_tok_s")
    f32_ttft = _get(results, "ours-float32", "single", "ttft_s")
    f32_source = "this run"
    if not f32_decode:
        f32_decode, f32_ttft, f32_source = (FLOAT32_EARLIER["decode_tok_s"], FLOAT32_EARLIER["ttft_s"],
                                            FLOAT32_EARLIER["source"])

    def add(target, num, den, goal, higher=True, note=""):
        value = round(num / den, 2) if num and den else None
        met = None if value is None else (value >= goal if higher else value <= goal)
        rows.append({"target": target, "value": value, "goal": f"{'>=' if higher else '<='} {goal}",
                     "met": met, "numerator": num, "denominator": den, "note": note})

    note = f"float32 from {f32_source}"
    add("(a) defaults decode vs float32", _get(results, "ours-auto", "single", "decode_tok_s"),
        f32_decode, 1.4, note=note)
    add("(a) defaults TTFT 785 vs float32", _get(results, "ours-auto", "single", "ttft_s"),
        f32_ttft, 0.4, higher=False, note=note)
    systems = results.get("systems", {})
    for setting in ("int8", "w8a8"):
        # the explicit setting's run, else the default's if auto chose it
        system = next((s for s in (f"ours-{setting}", "ours-auto")
                       if (systems.get(s) or {}).get("quantization") == setting), None)
        if system is None:
            continue
        add(f"(b) {setting} decode vs float32", _get(results, system, "single", "decode_tok_s"),
            f32_decode, 2.5, note=note)
        add(f"(b) {setting} decode vs llama.cpp Q8_0, single stream",
            _get(results, system, "single", "decode_tok_s"),
            _get(results, "llama.cpp-Q8_0", "single", "decode_tok_s"), 0.8)
        add(f"(b) {setting} c8 aggregate vs llama-server Q8_0 -np 8",
            _get(results, system, "c8", "output_tokens_per_s"),
            _get(results, "llama.cpp-Q8_0", "c8", "output_tokens_per_s"), 1.0)
        if system != "ours-auto":
            add(f"(b) {setting} TTFT vs float32 (not a target, for comparison)",
                _get(results, system, "single", "ttft_s"), f32_ttft, 0.4, higher=False, note=note)
    rows.append({"target": "(c) int4", "value": None, "goal": "only if int4 ships", "met": None,
                 "note": "not applicable: int4 does not ship (the CPU settings are int8 and w8a8)"})
    return rows


def markdown(results: dict, levels: list[int]) -> str:
    prompt = results.get("prompt_tokens_hf")
    head = (f"| system | weights | decode tok/s (1 stream) | TTFT {prompt}-token prompt (s) | "
            + " | ".join(f"c{c} tok/s" for c in levels)
            + " | prompt tokens seen | errors | peak RSS GiB | ready s |")
    lines = [head, "|---|---|" + "---:|" * (6 + len(levels))]
    for name, r in results.get("systems", {}).items():
        if "error" in r:
            lines.append(f"| {name} | failed: {r['error'][:120]} |" + " |" * (6 + len(levels)))
            continue
        s = r.get("single") or {}
        cells = [name, r.get("weights", ""), s.get("decode_tok_s"), s.get("ttft_s")]
        cells += [(r.get(f"c{c}") or {}).get("output_tokens_per_s", "–") for c in levels]
        errors = [f"{(r.get(f'c{c}') or {}).get('errors', 0)}/{(r.get(f'c{c}') or {}).get('requests', 0)}"
                  for c in levels if r.get(f"c{c}")]
        cells += [s.get("prompt_tokens"), ", ".join(errors) or "–", r.get("peak_rss_gib", "–"),
                  r.get("ready_s", "–")]
        lines.append("| " + " | ".join("–" if c is None else str(c) for c in cells) + " |")
    lines += ["", "| target | ratio | goal | met | |", "|---|---:|---|---|---|"]
    for t in results.get("targets", []):
        met = {True: "met", False: "not met", None: "–"}[t["met"]]
        detail = (f"{t['numerator']} / {t['denominator']}" if t.get("numerator") else "") + \
            (f" ({t['note']})" if t.get("note") else "")
        lines.append(f"| {t['target']} | {t['value'] if t['value'] is not None else '–'} | "
                     f"{t['goal']} | {met} | {detail} |")
    lines += ["", "Commands:", ""]
    for name, r in results.get("systems", {}).items():
        if r.get("command"):
            lines.append(f"- {name}: `{r['command']}`")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- main

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", required=True, help="the real-shape checkpoint (bench.random_model)")
    p.add_argument("--gguf", action="append", default=[], metavar="TYPE=PATH",
                   help="a GGUF of that checkpoint, e.g. Q8_0=/tmp/q8.gguf (repeatable)")
    p.add_argument("--llama-server", help="llama-server binary (default: $LLAMA_SERVER, then PATH)")
    p.add_argument("--llama-parallel", type=int, default=8, help="llama-server slots (-np)")
    p.add_argument("--systems", default=",".join(SYSTEMS), help="which, in this order")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                   help="llama.cpp -t/-tb and generate's torch threads (ours: its default, every core)")
    p.add_argument("--tokens", type=int, default=32, help="output tokens per request at c4/c8")
    p.add_argument("--single-tokens", type=int, default=64, help="output tokens of the single stream")
    p.add_argument("--prompt-tokens", type=int, default=785, help="the single stream's prompt")
    p.add_argument("--concurrency", default="4,8", help="levels, comma separated")
    p.add_argument("--rounds", type=int, default=2, help="requests per level = rounds x c")
    p.add_argument("--float32-levels", action="store_true", help="run c4/c8 for ours-float32 too")
    p.add_argument("--unique-prompts", action=argparse.BooleanOptionalAction, default=True,
                   help="number every c4/c8 request's message so no whole prompt repeats "
                   "(generate's static batches are unaffected: nothing is cached there)")
    p.add_argument("--request-timeout", type=float, default=900)
    p.add_argument("--wait-for", help="wait (polling every 30 s) until this file exists")
    p.add_argument("--stop-file", help="stop measuring at once when this file appears")
    p.add_argument("--deadline-min", type=float, default=0,
                   help="start no system after this many minutes from the start (0: none)")
    p.add_argument("--out", default=str(REPO / "bench" / "out" / "cpu-real-shape"))
    p.add_argument("--generate-child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.levels = [int(c) for c in args.concurrency.split(",") if c.strip()]
    args.gguf = dict(item.split("=", 1) for item in args.gguf)
    return args


def watch_stop(path: str, flag: threading.Event) -> None:
    while not flag.is_set():
        if os.path.exists(path):
            print(f"\n{path} appeared: stopping now", flush=True)
            flag.set()
            _thread.interrupt_main()
            return
        time.sleep(1)


def save(results: dict, out: Path, levels: list[int]) -> str:
    results["targets"] = targets(results)
    table = markdown(results, levels)
    out.mkdir(parents=True, exist_ok=True)
    (out / "cpu_real_shape.json").write_text(json.dumps(results, indent=2, ensure_ascii=False))
    (out / "cpu_real_shape.md").write_text(table)
    return table


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.generate_child:
        generate_child(args)
        return 0
    out = Path(args.out).resolve()
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = set(systems) - set(SYSTEMS) - {f"llama.cpp-{q}" for q in args.gguf}
    if unknown:
        print(f"unknown system(s): {', '.join(sorted(unknown))}", file=sys.stderr)
        return 2
    results: dict = {"systems": {}, "skipped": {}}
    args.llama_server_path, why = llamacpp.find_llama_server(args.llama_server)
    for name in list(systems):
        if name.startswith("llama.cpp-"):
            quant = name.split("-", 1)[1]
            reason = why or (None if quant in args.gguf else f"no --gguf {quant}=PATH") or \
                llamacpp.unavailable(args.llama_server, args.gguf[quant])
            if reason:
                print(f"{name} skipped: {reason}", flush=True)
                results["skipped"][name] = reason
                systems.remove(name)

    long_text, warm_text, prompt_count = prompts(args.model, args.prompt_tokens)
    results["prompt_tokens_hf"] = prompt_count
    ctx_per_slot = max(1024, -(-(prompt_count + args.single_tokens + 128) // 256) * 256)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    stop = threading.Event()
    if args.wait_for:
        print(f"waiting for {args.wait_for} (polling every 30 s)", flush=True)
        while not os.path.exists(args.wait_for):
            if args.stop_file and os.path.exists(args.stop_file):
                print(f"{args.stop_file} appeared while waiting: nothing measured", flush=True)
                return 1
            time.sleep(30)
    started = time.perf_counter()
    import torch
    import transformers
    results["meta"] = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(), "torch": torch.__version__,
        "transformers": transformers.__version__, "cpu_count": os.cpu_count(),
        "cpu": next((line.split(":", 1)[1].strip() for line in
                     Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")), ""),
        "platform": platform.platform(), "load_avg_start": list(os.getloadavg()),
        "command": " ".join(map(shlex.quote, ["python", "-m", "bench.cpu_real_shape",
                                              *(argv or sys.argv[1:])])),
        "model": args.model, "output_tokens": args.tokens, "single_tokens": args.single_tokens,
        "llama_server": args.llama_server_path, "llama_ctx_per_slot": ctx_per_slot}
    if args.stop_file:
        threading.Thread(target=watch_stop, args=(args.stop_file, stop), daemon=True).start()
    try:
        for name in systems:
            with ServerPool(out / "logs" / name) as pool:
                elapsed_min = (time.perf_counter() - started) / 60
                if args.deadline_min and elapsed_min > args.deadline_min:
                    results["skipped"][name] = f"deadline: {elapsed_min:.1f} min had passed"
                    print(f"{name} skipped: {results['skipped'][name]}", flush=True)
                    continue
                t0 = time.perf_counter()
                try:
                    if name == "generate-bf16":
                        r = run_generate_system(args, args.levels)
                    else:
                        r = run_server_system(name, args, pool, long_text, warm_text, args.levels,
                                              ctx_per_slot)
                except (RuntimeError, httpx.HTTPError, TimeoutError, OSError) as exc:
                    r = {"error": f"{type(exc).__name__}: {exc}"[-1500:]}
                    print(f"{name} failed: {r['error'][-400:]}", flush=True)
                r["system_s"] = round(time.perf_counter() - t0, 1)
                results["systems"][name] = r
                save(results, out, args.levels)
    except KeyboardInterrupt:
        results["stopped"] = f"stopped after {(time.perf_counter() - started) / 60:.1f} min" + (
            " (stop file)" if stop.is_set() else " (interrupted)")
        print(results["stopped"], flush=True)
    finally:
        stop.set()
    results["meta"]["load_avg_end"] = list(os.getloadavg())
    results["meta"]["total_s"] = round(time.perf_counter() - started, 1)
    table = save(results, out, args.levels)
    print(json.dumps(results, indent=2, ensure_ascii=False))
    print(table)
    print(f"wrote {out / 'cpu_real_shape.json'} and {out / 'cpu_real_shape.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
