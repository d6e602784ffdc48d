"""Side-by-side serving benchmark: our server, ``transformers serve`` (with and
without ``--continuous-batching``) and in-process ``generate``, on one checkpoint.

    python -m bench.run_benchmark                       # generated demo checkpoint
    python -m bench.run_benchmark --model DIR [--lora DIR]
    python -m bench.run_benchmark ... --systems ours,llama.cpp --gguf X.gguf --llama-server PATH

llama.cpp (``bench/llamacpp.py``) is in the default systems but runs only when a
llama-server binary and a GGUF of the same checkpoint are given; otherwise it is
skipped with the reason printed (and recorded under ``skipped``).

By default it builds a demo checkpoint with a larger hidden size than the test
one, so the forward pass (not Python) dominates. A LoRA adapter is merged into
the base once, and every system serves those same merged weights. Our server
gets fixed-length outputs (``min_tokens = max_tokens``, ``ignore_eos``); the
peer only understands standard OpenAI fields, so its output length is whatever
it generates up to ``max_tokens`` and its tokens are counted from ``usage``.

Writes ``results.json``, ``results.md`` and ``results.png`` to ``--out`` and
prints the JSON and the table.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path

from bench import llamacpp, report
from bench.loadgen import chat_body, run_level, structured_body
from bench.servers import REPO, ServerPool
from bench.workload import requests_for

# llama.cpp runs only when a llama-server and a GGUF of the checkpoint are given (skipped otherwise).
SYSTEMS = ("ours", "transformers-serve", "transformers-serve-cb", "inprocess", llamacpp.NAME)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", help="base model directory (default: build a demo checkpoint)")
    p.add_argument("--lora", help="LoRA adapter directory, merged into --model for every system")
    p.add_argument("--out", default=str(REPO / "bench" / "out"), help="output directory")
    p.add_argument("--hidden-size", type=int, default=512, help="demo checkpoint hidden size")
    p.add_argument("--layers", type=int, default=8, help="demo checkpoint layers")
    p.add_argument("--tokens", type=int, default=64, help="output tokens per request")
    p.add_argument("--concurrency", default="1,4,16,64", help="levels, comma separated")
    p.add_argument("--rounds", type=int, default=2, help="requests per level = rounds x concurrency")
    p.add_argument("--min-requests", type=int, default=8, help="at least this many per level")
    p.add_argument("--request-timeout", type=float, default=300, help="seconds per request")
    p.add_argument("--level-budget", type=float, default=60,
                   help="seconds after which a level sends no new requests (slow peers)")
    p.add_argument("--systems", default=",".join(SYSTEMS), help=f"subset of {','.join(SYSTEMS)}")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"))
    p.add_argument("--threads", type=int, default=1,
                   help="OMP/torch threads for every process under test (0: torch's default). "
                   "1 by default: on a small shared CPU, OpenMP threads that spin-wait for a "
                   "busy core slow every system down several times over")
    p.add_argument("--max-batch-size", type=int, default=64, help="THAI_MAX_BATCH_SIZE for ours")
    p.add_argument("--structured-concurrency", type=int, default=16,
                   help="after its levels, ours runs this level plain and with a json_schema "
                   "response_format, back to back (0: skip)")
    p.add_argument("--gguf", help="llama.cpp: a GGUF of the same checkpoint (e.g. Q8_0)")
    p.add_argument("--llama-server", help="llama.cpp: the llama-server binary "
                   "(default: $LLAMA_SERVER, then PATH)")
    p.add_argument("--llama-parallel", type=int, default=8, help="llama.cpp: slots (-np)")
    return p.parse_args(argv)


def prepare_checkpoint(args: argparse.Namespace, out: Path) -> Path:
    """One directory with merged weights and the tokenizer that every system loads."""
    if args.model and not args.lora:
        return Path(args.model).resolve()
    if args.model:
        base, lora = Path(args.model).resolve(), Path(args.lora).resolve()
        merged = out / f"merged-{lora.name}"
    else:
        root = out / f"demo-h{args.hidden_size}-l{args.layers}"
        base, lora, merged = root / "base", root / "lora", root / "merged"
        if not (lora / "adapter_config.json").exists():
            from api.engine.demo_checkpoint import build_demo_checkpoint

            build_demo_checkpoint(root, hidden_size=args.hidden_size, num_layers=args.layers,
                                  num_heads=max(1, args.hidden_size // 64),
                                  num_kv_heads=max(1, args.hidden_size // 256))
    if (merged / "config.json").exists():
        return merged
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), lora)
    model.merge_and_unload().save_pretrained(merged)
    tok_dir = lora if (lora / "tokenizer_config.json").exists() else base
    AutoTokenizer.from_pretrained(tok_dir).save_pretrained(merged)
    return merged


def child_env(args: argparse.Namespace) -> dict[str, str]:
    if not args.threads:
        return {}
    n = str(args.threads)
    return {"OMP_NUM_THREADS": n, "MKL_NUM_THREADS": n}


class InProcessBaselines:
    """A ``bench.inprocess --serve`` child: baselines measured on demand, next to each level."""

    def __init__(self, args: argparse.Namespace, model_dir: Path):
        cmd = [sys.executable, "-m", "bench.inprocess", "--serve", "--model", str(model_dir),
               "--tokens", str(args.tokens), "--device", args.device, "--dtype", args.dtype]
        self.proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, **child_env(args)},
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, text=True, start_new_session=True)
        self.results: dict = {"output_tokens": args.tokens, "static": {}}
        self._ask(None)

    def _ask(self, what: str | None) -> dict:
        if what is not None:
            self.proc.stdin.write(what + "\n")
            self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"in-process baseline exited with {self.proc.wait()}")
        return json.loads(line)

    def measure(self, concurrency: int) -> None:
        try:
            if concurrency == 1:
                self.results["single"] = self._ask("single")
            else:
                self.results["static"][str(concurrency)] = self._ask(str(concurrency))
        except (RuntimeError, ValueError, OSError) as exc:
            self.results.setdefault("errors", []).append(f"c={concurrency}: {exc}")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)


async def drive(server, args, levels: list[int], fixed_length: bool,
                baselines: InProcessBaselines | None = None, body_for=None) -> list[dict]:
    body_for = body_for or chat_body(server.model, args.tokens, fixed_length=fixed_length)
    await run_level(server.name, server.url, concurrency=1, num_requests=2, body_for=body_for,
                    timeout_s=args.request_timeout)  # warm-up, not recorded
    rows = []
    for concurrency in levels:
        if baselines is not None:  # measured just before the level it is compared with
            baselines.measure(concurrency)
        level = await run_level(
            server.name, server.url, concurrency=concurrency,
            num_requests=requests_for(concurrency, args.rounds, args.min_requests),
            body_for=body_for, timeout_s=args.request_timeout, budget_s=args.level_budget)
        row = level.as_dict()
        rows.append(row)
        print(f"  {server.name} c={concurrency}: {row['output_tokens_per_s']} tok/s, "
              f"TTFT p50 {row['ttft_p50_ms']} ms, errors {row['errors']}/{row['requests']}",
              flush=True)
    if fixed_length and args.structured_concurrency:
        rows.extend(await structured_pair(server, args))
    return rows


async def structured_pair(server, args) -> list[dict]:
    """The cost of grammar-constrained decoding: one level plain, then the same level with
    every request under a JSON schema, back to back on the same server (output tokens/s
    compare; the constrained replies end when their JSON does)."""
    concurrency = args.structured_concurrency
    count = requests_for(concurrency, args.rounds, args.min_requests)
    rows = []
    for name, body_for in (("ours, plain (same run)", chat_body(server.model, args.tokens, fixed_length=True)),
                           ("ours, json_schema", structured_body(server.model, args.tokens))):
        level = await run_level(name, server.url, concurrency=concurrency, num_requests=count,
                                body_for=body_for, timeout_s=args.request_timeout,
                                budget_s=args.level_budget)
        rows.append(level.as_dict())
        print(f"  {name} c={concurrency}: {rows[-1]['output_tokens_per_s']} tok/s, "
              f"errors {rows[-1]['errors']}/{rows[-1]['requests']}", flush=True)
    return rows


def run_http(args: argparse.Namespace, model_dir: Path, levels: list[int], systems: list[str],
             results: dict, baselines: InProcessBaselines | None) -> None:
    device = "cpu" if args.device == "auto" and not _cuda() else args.device
    with ServerPool(Path(args.out) / "logs", env=child_env(args)) as pool:
        for system in systems:
            try:
                if system == "ours":
                    server = pool.start_ours(str(model_dir), max_batch_size=args.max_batch_size,
                                             max_waiting=4096, device=args.device, dtype=args.dtype)
                    results["cold_start_s"] = round(server.ready_s, 2)
                elif system == llamacpp.NAME:
                    server = pool.start_llama_server(
                        llamacpp.find_llama_server(args.llama_server)[0], args.gguf,
                        parallel=args.llama_parallel, ctx_per_slot=max(1024, args.tokens + 512),
                        threads=args.threads or os.cpu_count() or 1)
                    results.setdefault("commands", {})[system] = " ".join(server.argv)
                else:
                    server = pool.start_transformers_serve(
                        str(model_dir), continuous_batching=system.endswith("-cb"),
                        device=device, dtype=args.dtype)
            except RuntimeError as exc:
                results.setdefault("failures", {})[system] = str(exc)[-1500:]
                print(f"  {system} failed to start: {str(exc)[-300:]}", flush=True)
                continue
            try:
                results["http"].extend(asyncio.run(drive(
                    server, args, levels, system == "ours",
                    baselines if system == "ours" else None,
                    llamacpp.chat_body(server.model, args.tokens) if system == llamacpp.NAME else None)))
            except Exception as exc:  # one broken system must not lose the others' numbers
                results.setdefault("failures", {})[system] = f"{type(exc).__name__}: {exc}"
            finally:
                server.stop()


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def machine_info(args: argparse.Namespace) -> dict:
    import torch
    import transformers

    info = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "cpu_count": os.cpu_count(),
            "platform": platform.platform(), "load_avg_start": list(os.getloadavg()),
            "args": vars(args)}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    levels = [int(c) for c in args.concurrency.split(",") if c.strip()]
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = set(systems) - set(SYSTEMS)
    if unknown:
        print(f"unknown system(s): {', '.join(sorted(unknown))}", file=sys.stderr)
        return 2
    skipped = {}
    if llamacpp.NAME in systems:
        reason = llamacpp.unavailable(args.llama_server, args.gguf)
        if reason:
            print(f"{llamacpp.NAME} skipped: {reason}", flush=True)
            skipped[llamacpp.NAME] = reason
            systems.remove(llamacpp.NAME)
    # SIGTERM (e.g. from `timeout`) unwinds through the ServerPool, which stops every server.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    started = time.perf_counter()
    model_dir = prepare_checkpoint(args, out)
    results: dict = {"meta": machine_info(args), "model_dir": str(model_dir),
                     "output_tokens": args.tokens, "http": []}
    if skipped:
        results["skipped"] = skipped
    print(f"checkpoint: {model_dir}", flush=True)
    baselines = InProcessBaselines(args, model_dir) if "inprocess" in systems else None
    try:
        servers = [s for s in systems if s != "inprocess"]
        if baselines is not None and "ours" not in servers:
            for concurrency in levels:
                baselines.measure(concurrency)
        run_http(args, model_dir, levels, servers, results, baselines)
    finally:
        if baselines is not None:
            baselines.close()
            results["inprocess"] = baselines.results
    results["targets"] = report.targets(results)
    results["meta"]["load_avg_end"] = list(os.getloadavg())
    results["meta"]["total_s"] = round(time.perf_counter() - started, 1)

    (out / "results.json").write_text(json.dumps(results, indent=2, ensure_ascii=False))
    table = report.markdown(results)
    (out / "results.md").write_text(table)
    report.plot(results, out / "results.png")
    print(json.dumps(results, indent=2, ensure_ascii=False))
    print(table)
    print(f"wrote {out / 'results.json'}, {out / 'results.md'}, {out / 'results.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
