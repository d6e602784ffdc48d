"""The GPU benchmark as one program: model, cold start, HTTP levels, in-process baselines
and a profile of one decode step, each result written the moment it exists.

``bash bench/gpu_offline.sh run`` runs this on a GPU host after installing the wheels
(see that script for an offline host). Every phase saves ``gpu_results.json`` and
``gpu_results.md`` again when it ends, and a phase that would start past ``--deadline-s``
is skipped (and says so), so a run cut short by a time limit still leaves its numbers.
The last line printed says whether the expectation was met: at least
:data:`EXPECTED_C32_RPS` requests/s at concurrency 32 with 150-token replies on one
H100-class GPU in bf16.

    python -m bench.gpu_bench --out DIR                        # GPU defaults (cuda, bf16)
    python -m bench.gpu_bench --out DIR --device cpu --dtype float32 --shape small \\
        --concurrency 1,4 --tokens 8 ...                       # the CPU check the tests run

Phases:

1. model: ``bench.random_model`` (Qwen2.5-1.5B-Instruct's exact shape, random weights,
   built on the GPU; no download), or ``--model DIR``.
2. http: our server (``app.py``, UI off) started as a fresh process: cold start = process
   start to ``/ready`` 200; then streamed chats with ``--tokens`` fixed-length outputs at
   each concurrency (the CPU benchmark's load generator and prompts, ``bench/loadgen.py``),
   and, right before each level, the in-process ``generate`` baseline for that batch size
   (``bench/inprocess.py``: one at a time for c=1, a static batch otherwise).
3. profile: in this process, our ``BatchScheduler`` with ``--profile-batch`` running
   sequences: the decode step the server runs (``_decode_step``, evict, flush), timed
   alone, split into model forward / sampling and acceptance / the rest, and traced with
   ``torch.profiler``: GPU kernel time per step against the step's wall time says whether
   the step waits on the GPU or on Python and kernel launches; the bytes one step must
   read (weights + KV cache) over the measured copy bandwidth give its floor.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import gzip
import importlib.metadata as md
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

from bench import report
from bench.loadgen import chat_body, run_level
from bench.servers import ServerPool
from bench.workload import requests_for

PROFILE_TXT = "decode_profile.txt"
TRACE = "decode_trace.json.gz"
TRACE_MAX_BYTES = 15 * 2**20  # a trace small enough to attach to a report
EXPECTED_C32_RPS = 20.0
PACKAGES = ("torch", "transformers", "tokenizers", "safetensors", "accelerate", "peft",
            "huggingface-hub", "numpy", "fastapi", "uvicorn", "pydantic", "httpx", "matplotlib")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default=os.environ.get("OUT") or "bench/out/gpu",
                   help="where the results are written")
    p.add_argument("--work", default="/tmp/gpu-bench", help="model and server logs")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--dtype", default="auto", choices=("auto", "bfloat16", "float16", "float32"),
                   help="auto: bfloat16 on cuda, float32 on cpu")
    p.add_argument("--shape", default="qwen2.5-1.5b", choices=("qwen2.5-1.5b", "small"),
                   help="bench.random_model's shape")
    p.add_argument("--model", help="an existing checkpoint instead of building one")
    p.add_argument("--tokens", type=int, default=150, help="output tokens per request")
    p.add_argument("--concurrency", default="1,8,32,64")
    p.add_argument("--rounds", type=int, default=2, help="requests per level = rounds x concurrency")
    p.add_argument("--min-requests", type=int, default=4, help="at least this many per level")
    p.add_argument("--level-budget", type=float, default=45,
                   help="seconds after which a level starts no new request")
    p.add_argument("--request-timeout", type=float, default=120)
    p.add_argument("--max-batch-size", type=int, default=64, help="THAI_MAX_BATCH_SIZE")
    p.add_argument("--threads", type=int, default=0,
                   help="OMP threads of every process under test (0: leave them alone)")
    p.add_argument("--no-baselines", dest="baselines", action="store_false",
                   help="skip the in-process generate baselines")
    p.add_argument("--profile-batch", type=int, default=32)
    p.add_argument("--profile-warmup", type=int, default=10, help="decode steps before timing")
    p.add_argument("--profile-steps", type=int, default=40, help="decode steps timed")
    p.add_argument("--trace-steps", type=int, default=3, help="decode steps under torch.profiler")
    p.add_argument("--deadline-s", type=float, default=3600,
                   help="no phase starts later than this many seconds after start")
    args = p.parse_args(argv)
    if args.dtype == "auto":
        args.dtype = "bfloat16" if args.device == "cuda" else "float32"
    return args


class ReadyPool(ServerPool):
    """The benchmark's server pool, with readiness read from ``/ready`` (model loaded,
    engine alive, not draining) rather than ``/health``, as this benchmark defines cold start."""

    def _spawn(self, name, argv, env, port, model, ready_timeout_s, ready_path="/ready"):
        return super()._spawn(name, argv, env, port, model, ready_timeout_s, ready_path="/ready")


class Run:
    """The results so far, saved to ``out`` after every phase."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.out = Path(args.out).resolve()
        self.work = Path(args.work).resolve()
        self.out.mkdir(parents=True, exist_ok=True)
        self.work.mkdir(parents=True, exist_ok=True)
        self.started = time.monotonic()
        self.results: dict = {"meta": {}, "output_tokens": args.tokens, "http": [],
                              "phases": {}, "errors": {}}

    def left_s(self) -> float:
        return self.args.deadline_s - (time.monotonic() - self.started)

    def phase(self, name: str, fn, *, needs_s: float = 0) -> object:
        if self.left_s() < needs_s:
            msg = f"skipped: {self.left_s():.0f}s left of --deadline-s, this phase needs ~{needs_s:.0f}s"
            print(f"== {name}: {msg}", flush=True)
            self.results["phases"][name] = {"status": msg}
            self.save()
            return None
        print(f"== {name} ({self.left_s():.0f}s left)", flush=True)
        t0 = time.monotonic()
        try:
            value = fn()
            status = "ok"
        except Exception as exc:  # one broken phase must not lose the others' numbers
            value = None
            status = f"failed: {type(exc).__name__}: {exc}"[:500]
            self.results["errors"][name] = traceback.format_exc()[-4000:]
            print(f"== {name} {status}\n{traceback.format_exc()}", flush=True)
        self.results["phases"][name] = {"status": status, "seconds": round(time.monotonic() - t0, 1)}
        self.save()
        return value

    def save(self) -> str:
        self.results["meta"]["elapsed_s"] = round(time.monotonic() - self.started, 1)
        self.results["targets"] = report.targets(self.results)
        (self.out / "gpu_results.json").write_text(json.dumps(self.results, indent=2, ensure_ascii=False))
        text = markdown(self.results)
        (self.out / "gpu_results.md").write_text(text)
        return text


# ---------------------------------------------------------------------- phases
def machine(args: argparse.Namespace) -> dict:
    import torch


    info: dict = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                  "python": platform.python_version(), "executable": sys.executable,
                  "platform": platform.platform(), "cpu_count": os.cpu_count(),
                  "device": args.device, "dtype": args.dtype,
                  "args": {k: v for k, v in vars(args).items()}}
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            versions[name] = None
    info["versions"] = versions
    if args.device == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("torch sees no CUDA device")
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=torch.cuda.get_device_name(0), gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    sm_count=props.multi_processor_count, cuda=torch.version.cuda)
        try:
            info["nvidia_smi"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm",
                 "--format=csv,noheader"], capture_output=True, text=True, timeout=20).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    return info


def build_model(args: argparse.Namespace, run: Run) -> str:
    if args.model:
        return str(Path(args.model).resolve())
    from bench.random_model import build_random_model

    target = run.work / f"model-{args.shape}-{args.dtype}"
    if not (target / "config.json").exists():
        t0 = time.perf_counter()
        build_random_model(target, shape=args.shape, dtype=args.dtype, device=args.device)
        run.results["model_build_s"] = round(time.perf_counter() - t0, 1)
    run.results["model_bytes"] = sum(p.stat().st_size for p in target.glob("*.safetensors"))
    return str(target)


def child_env(args: argparse.Namespace) -> dict[str, str]:
    if not args.threads:
        return {}
    return {"OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}


def http_levels(args: argparse.Namespace, run: Run, model_dir: str) -> None:
    """Cold start, then every level; each level's row is saved as soon as it is measured."""
    import httpx

    from bench.run_benchmark import InProcessBaselines

    levels = [int(c) for c in args.concurrency.split(",") if c.strip()]
    baselines = None
    if args.baselines:
        try:
            baselines = InProcessBaselines(args, Path(model_dir))
        except Exception as exc:  # the HTTP numbers matter more than the baseline
            run.results["errors"]["baselines"] = f"{type(exc).__name__}: {exc}"
    try:
        with ReadyPool(run.work / "logs", env=child_env(args)) as pool:
            server = pool.start_ours(model_dir, max_batch_size=args.max_batch_size,
                                     max_waiting=4096, device=args.device, dtype=args.dtype,
                                     ready_timeout_s=300)
            run.results["cold_start_s"] = round(server.ready_s, 2)
            run.results["cold_start_definition"] = "process start to the first 200 from /ready"
            print(f"  cold start {server.ready_s:.1f}s", flush=True)
            run.save()
            try:
                run.results["server_health"] = httpx.get(server.url + "/health", timeout=10).json()
            except (httpx.HTTPError, ValueError):
                pass
            body_for = chat_body(server.model, args.tokens, fixed_length=True)
            asyncio.run(run_level(server.name, server.url, concurrency=1, num_requests=2,
                                  body_for=body_for, timeout_s=args.request_timeout))  # warm-up
            for concurrency in levels:
                if run.left_s() < 20:
                    run.results["errors"][f"c{concurrency}"] = "skipped: past --deadline-s"
                    break
                if baselines is not None:  # right before the level it is compared with
                    baselines.measure(concurrency)
                    run.results["inprocess"] = baselines.results
                # Near the deadline a level sends less and waits less, so the rows measured
                # so far are saved before the call's time limit ends the run.
                level = asyncio.run(run_level(
                    server.name, server.url, concurrency=concurrency,
                    num_requests=requests_for(concurrency, args.rounds, args.min_requests),
                    body_for=body_for, timeout_s=min(args.request_timeout, max(10.0, run.left_s())),
                    budget_s=min(args.level_budget, max(5.0, run.left_s() - 15))))
                row = level.as_dict()
                run.results["http"].append(row)
                print(f"  c={concurrency}: {row['requests_per_s']} req/s, "
                      f"{row['output_tokens_per_s']} tok/s, TTFT p50 {row['ttft_p50_ms']} ms, "
                      f"ITL p50 {row['itl_p50_ms']} ms, errors {row['errors']}/{row['requests']}",
                      flush=True)
                run.save()
    finally:
        log = run.work / "logs" / "ours.log"  # ServerPool's log of our server, also on failure
        if log.exists():
            shutil.copyfile(log, run.out / "server.log")
        if baselines is not None:
            baselines.close()
            run.results["inprocess"] = baselines.results


def copy_bandwidth_gbs(device: str) -> float | None:
    """Device-to-device copy rate (bytes read + written), the ceiling a decode step's
    weight and KV reads can reach; None on a CPU."""
    if device != "cuda":
        return None
    import torch

    src = torch.empty(2**29, dtype=torch.uint8, device="cuda").random_()  # 512 MiB
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(20):
        dst.copy_(src)
    end.record()
    torch.cuda.synchronize()
    seconds = start.elapsed_time(end) / 1000
    del src, dst
    return round(2 * 2**29 * 20 / seconds / 1e9, 1)


def cache_bytes(cache) -> int:
    """Bytes held by a transformers DynamicCache (keys and values of every layer)."""
    total = 0
    for layer in getattr(cache, "layers", None) or ():
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if t is not None and hasattr(t, "numel"):
                total += t.numel() * t.element_size()
    return total


def profile_decode(args: argparse.Namespace, run: Run, model_dir: str) -> dict:
    """One decode step of our scheduler at ``--profile-batch`` running sequences."""
    import torch

    from api.engine.loader import load_model_bundle
    from api.engine.metrics import EngineMetrics
    from api.engine.scheduler import BatchScheduler
    from api.engine.types import GenerationRequest, SamplingParams
    from api.settings import ModelSettings
    from bench.inprocess import encode

    cuda = args.device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    batch = args.profile_batch
    bundle = load_model_bundle(ModelSettings(base_model=model_dir, lora_path="", device=args.device,
                                             dtype=args.dtype, require_model=True))
    scheduler = BatchScheduler(bundle, max_batch_size=batch, max_waiting=batch,
                               request_timeout_s=3600, metrics=EngineMetrics("profile"),
                               prefix_caching=True, num_threads=0)
    scheduler._set_threads()  # as the server's worker thread does (1 thread next to a GPU)
    steps_total = args.profile_warmup + args.profile_steps * 2 + args.trace_steps + 4
    params = SamplingParams(max_tokens=steps_total, min_tokens=steps_total, ignore_eos=True,
                            temperature=0.0, top_p=1.0, no_repeat_ngram_size=0)
    loop = asyncio.new_event_loop()  # the scheduler hands chunks to a loop; nobody reads them
    try:
        prompts = encode(bundle.tokenizer, list(range(batch)))
        for ids in prompts:
            scheduler.submit(GenerationRequest(prompt_ids=ids, params=params), loop, asyncio.Queue())
        admitted = scheduler._admit_locked()
        scheduler._prefill(admitted)
        scheduler._evict()
        scheduler._flush()
        if len(scheduler._running) != batch:
            raise RuntimeError(f"{len(scheduler._running)} of {batch} sequences running after prefill")

        def step() -> None:  # the decode half of BatchScheduler._run's loop
            scheduler._decode_step()
            scheduler._evict()
            scheduler._flush()

        for _ in range(args.profile_warmup):
            step()
        sync()
        walls = []
        for _ in range(args.profile_steps):
            t0 = time.perf_counter()
            step()
            sync()
            walls.append(time.perf_counter() - t0)

        # The same steps with the forward and the sampling timed apart (each synchronized,
        # which adds a little: the split is read as shares, the plain timing above as the cost).
        parts: dict[str, list[float]] = {"forward": [], "sample_accept": [], "step": []}
        model, sample = scheduler.model, scheduler._sample_and_accept

        class TimedModel:
            def __call__(self, *a, **kw):
                sync()
                t = time.perf_counter()
                out = model(*a, **kw)
                sync()
                parts["forward"].append(time.perf_counter() - t)
                return out

            def __getattr__(self, name):
                return getattr(model, name)

        def timed_sample(*a, **kw):
            t = time.perf_counter()
            sample(*a, **kw)
            sync()
            parts["sample_accept"].append(time.perf_counter() - t)

        scheduler.model, scheduler._sample_and_accept = TimedModel(), timed_sample
        try:
            for _ in range(args.profile_steps):
                t0 = time.perf_counter()
                step()
                sync()
                parts["step"].append(time.perf_counter() - t0)
        finally:
            scheduler.model = model
            del scheduler._sample_and_accept

        result: dict = {"batch": batch, "device": args.device, "dtype": args.dtype,
                        "steps_timed": len(walls), "context_tokens": int(scheduler._kv.mask.shape[1])
                        if getattr(scheduler._kv, "mask", None) is not None else None}
        ms = lambda xs, q=50: round(1000 * (statistics.median(xs) if q == 50 else  # noqa: E731
                                            sorted(xs)[min(len(xs) - 1, int(q / 100 * len(xs)))]), 3)
        result.update(step_ms_p50=ms(walls), step_ms_p10=ms(walls, 10), step_ms_p90=ms(walls, 90),
                      tokens_per_s_at_p50=round(batch / statistics.median(walls), 1),
                      split_step_ms=ms(parts["step"]), split_forward_ms=ms(parts["forward"]),
                      split_sample_accept_ms=ms(parts["sample_accept"]))
        result["split_other_ms"] = round(result["split_step_ms"] - result["split_forward_ms"]
                                         - result["split_sample_accept_ms"], 3)

        weights = sum(p.numel() * p.element_size() for p in bundle.model.parameters())
        kv = cache_bytes(scheduler._kv.cache)
        result.update(weight_bytes=weights, kv_cache_bytes=kv)
        try:
            bandwidth = copy_bandwidth_gbs(args.device)
        except Exception as exc:  # the step timings above stand without it
            bandwidth, result["bandwidth_error"] = None, f"{type(exc).__name__}: {exc}"
        if bandwidth:
            result["copy_bandwidth_gb_s"] = bandwidth
            result["floor_ms"] = round((weights + kv) / (bandwidth * 1e9) * 1000, 3)
            result["step_over_floor"] = round(result["step_ms_p50"] / result["floor_ms"], 2)

        try:
            result.update(trace(args, run, step, sync, cuda))
        except Exception as exc:  # likewise: keep the timings if the profiler fails
            result["trace_error"] = f"{type(exc).__name__}: {exc}"
            run.results["errors"]["trace"] = traceback.format_exc()[-4000:]
        return result
    finally:
        loop.close()  # the model goes with this frame; the profile is the last phase


def trace(args: argparse.Namespace, run: Run, step, sync, cuda: bool) -> dict:
    """torch.profiler over a few steps: GPU kernel time and launches per step, the top
    operators (to ``decode_profile.txt``) and a Chrome trace (``decode_trace.json.gz``)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    n = max(1, args.trace_steps)
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        for _ in range(n):
            step()
            sync()
        traced_wall = (time.perf_counter() - t0) / n
    out: dict = {"traced_steps": n, "traced_step_ms": round(traced_wall * 1000, 3)}
    events = prof.events()
    if cuda:
        kernels = [e for e in events if e.device_type == DeviceType.CUDA]
        kernel_us = sum(e.time_range.elapsed_us() for e in kernels) / n
        out.update(gpu_kernel_ms_per_step=round(kernel_us / 1000, 3),
                   kernels_per_step=round(len(kernels) / n),
                   gpu_busy_share_of_traced_step=round(kernel_us / 1000 / (traced_wall * 1000), 3))
    averages = prof.key_averages()
    tables = []
    # GPU time first (the key's name changed across torch versions), then CPU time.
    for keys in ((("self_device_time_total", "self_cuda_time_total") if cuda else ()),
                 ("self_cpu_time_total",)):
        for key in keys:
            try:
                tables.append(f"sorted by {key} ({n} steps):\n"
                              + averages.table(sort_by=key, row_limit=25))
                break
            except (AttributeError, KeyError, RuntimeError):
                continue
    top = []
    for evt in averages:
        gpu_us = getattr(evt, "self_device_time_total", None)
        if gpu_us is None:
            gpu_us = getattr(evt, "self_cuda_time_total", 0)
        top.append({"name": evt.key, "calls_per_step": round(evt.count / n, 1),
                    "self_cpu_ms_per_step": round(evt.self_cpu_time_total / 1000 / n, 3),
                    "self_gpu_ms_per_step": round((gpu_us or 0) / 1000 / n, 3)})
    sort_key = "self_gpu_ms_per_step" if cuda else "self_cpu_ms_per_step"
    out["top_ops"] = sorted(top, key=lambda r: r[sort_key], reverse=True)[:12]
    (run.out / PROFILE_TXT).write_text("\n\n".join(tables) + "\n")
    raw = run.work / "decode_trace.json"
    try:
        prof.export_chrome_trace(str(raw))
        data = gzip.compress(raw.read_bytes())
        if len(data) <= TRACE_MAX_BYTES:
            (run.out / TRACE).write_bytes(data)
            out["trace_file"] = TRACE
    except (OSError, RuntimeError) as exc:
        out["trace_error"] = str(exc)
    return out


# ---------------------------------------------------------------------- report
_fmt = report._fmt  # the same number format as make bench's tables


def markdown(results: dict) -> str:
    meta = results.get("meta") or {}
    where = meta.get("gpu") or f"{meta.get('device', '?')} (no GPU)"
    lines = [f"## GPU benchmark: {where}, {meta.get('date', '?')}", "",
             f"torch {(meta.get('versions') or {}).get('torch')}, transformers "
             f"{(meta.get('versions') or {}).get('transformers')}, python {meta.get('python')}, "
             f"dtype {meta.get('dtype')}, {results.get('output_tokens')} output tokens per request"
             f"{'; model built in %ss' % results['model_build_s'] if 'model_build_s' in results else ''}.",
             ""]
    lines.append(report.markdown(results).replace(
        "Cold start (process start to /health ready)", "Cold start (process start to /ready 200)"))
    prof = results.get("profile")
    if prof:
        lines += ["", f"### One decode step at batch {prof['batch']} (our scheduler, in-process)", "",
                  "| measure | value |", "|---|---:|",
                  f"| step, median (p10–p90) | {_fmt(prof['step_ms_p50'])} ms "
                  f"({_fmt(prof['step_ms_p10'])}–{_fmt(prof['step_ms_p90'])}) |",
                  f"| tokens/s at that step time | {_fmt(prof['tokens_per_s_at_p50'])} |",
                  f"| of a synchronized step ({_fmt(prof['split_step_ms'])} ms): model forward | "
                  f"{_fmt(prof['split_forward_ms'])} ms |",
                  f"| sampling + accept (detokenize, stops) | {_fmt(prof['split_sample_accept_ms'])} ms |",
                  f"| the rest (inputs, KV bookkeeping, delivery) | {_fmt(prof['split_other_ms'])} ms |",
                  f"| context (columns in the KV cache) | {_fmt(prof.get('context_tokens'))} |"]
        if "gpu_kernel_ms_per_step" in prof:
            lines += [f"| GPU kernel time per step (under the profiler) | "
                      f"{_fmt(prof['gpu_kernel_ms_per_step'])} ms of {_fmt(prof['traced_step_ms'])} ms "
                      f"({100 * prof['gpu_busy_share_of_traced_step']:.0f}% busy) |",
                      f"| kernels launched per step | {prof['kernels_per_step']} |"]
        if "floor_ms" in prof:
            lines += [f"| bytes per step: weights + KV | {prof['weight_bytes'] / 1e9:.2f} + "
                      f"{prof['kv_cache_bytes'] / 1e9:.3f} GB |",
                      f"| copy bandwidth measured | {prof['copy_bandwidth_gb_s']:.0f} GB/s |",
                      f"| floor (bytes / bandwidth) | {_fmt(prof['floor_ms'])} ms: the step is "
                      f"{_fmt(prof['step_over_floor'])}x it |"]
        if prof.get("top_ops"):
            unit = "GPU" if "gpu_kernel_ms_per_step" in prof else "CPU"
            lines += ["", f"Top operators by self {unit} time per step:", "",
                      "| operator | calls/step | self CPU ms | self GPU ms |", "|---|---:|---:|---:|"]
            lines += [f"| `{o['name'][:70]}` | {o['calls_per_step']} | {o['self_cpu_ms_per_step']} | "
                      f"{o['self_gpu_ms_per_step']} |" for o in prof["top_ops"][:10]]
    problems = {k: v for k, v in (results.get("phases") or {}).items() if v.get("status") != "ok"}
    if problems or results.get("errors"):
        lines += ["", "Problems: " + "; ".join(
            [f"{k}: {v['status']}" for k, v in problems.items()]
            + [f"{k}: {str(v).strip().splitlines()[-1][:200]}" for k, v in
               (results.get("errors") or {}).items() if k not in problems])]
    return "\n".join(lines) + "\n"


def verdict(results: dict) -> str:
    """One line: the expectation, what was measured, and whether it was met."""
    goal = (f"expectation: >= {EXPECTED_C32_RPS:g} requests/s at concurrency 32, "
            f"{results.get('output_tokens')}-token replies, on one H100-class GPU")
    meta = results.get("meta") or {}
    row = next((r for r in results.get("http", []) if r.get("concurrency") == 32), None)
    if row is None:
        return f"{goal}: NOT MEASURED (no c=32 level in this run)"
    measured = f"measured {row['requests_per_s']} requests/s on {meta.get('gpu') or meta.get('device')}"
    if not meta.get("gpu"):
        return f"{goal}: not applicable, {measured} (no GPU)"
    met = row["requests_per_s"] >= EXPECTED_C32_RPS and not row.get("errors")
    return f"{goal}: {'MET' if met else 'NOT MET'}, {measured}, {row.get('errors', 0)} errors"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # SIGTERM (the call's time limit) unwinds through the ServerPool, which stops the server.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    run = Run(args)
    meta = run.phase("machine", lambda: machine(args))
    if meta is None:
        print(run.save())
        return 1
    run.results["meta"].update(meta)
    model_dir = run.phase("model", lambda: build_model(args, run), needs_s=30)
    if model_dir is None:
        print(run.save())
        return 1
    run.results["model_dir"] = model_dir
    run.phase("http", lambda: http_levels(args, run, model_dir), needs_s=60)
    prof = run.phase("profile", lambda: profile_decode(args, run, model_dir), needs_s=40)
    if prof:
        run.results["profile"] = prof
    try:
        report.plot(run.results, run.out / "gpu_results.png")
    except Exception as exc:  # matplotlib missing or no rows: the numbers are what matter
        run.results["errors"]["plot"] = f"{type(exc).__name__}: {exc}"
    text = run.save()
    print(json.dumps(run.results, indent=2, ensure_ascii=False)[:20000])
    print(text, flush=True)
    print(verdict(run.results), flush=True)
    failed = [k for k, v in run.results["phases"].items() if not v["status"].startswith("ok")]
    return 1 if failed or not run.results["http"] else 0


if __name__ == "__main__":
    sys.exit(main())
