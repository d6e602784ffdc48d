"""What THAI_ENGINE=openai costs and how it fails over, measured in one run.

    python -m bench.upstream_hop                 # demo checkpoint (h512, 8 layers)
    python -m bench.upstream_hop --json out.json

1. Latency of the extra hop: the same replica of this app called directly and through a
   front app (THAI_ENGINE=openai, that replica as its only upstream), at concurrency 1
   and 16, interleaved in one run (TTFT and end-to-end per request).
2. Spread and failover: a front over two replicas; N streamed requests at concurrency
   16; one replica is SIGKILLed once a third of them finished. Counted: requests each
   replica served (its own metrics), retried by the front, failed at the client (streams
   that had started on the killed replica end in an error event; nothing else may fail).

Prints a table and JSON. Not a test: numbers vary with the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import signal
import sys
import tempfile
from pathlib import Path

import httpx

from bench.loadgen import chat_body, run_level, stream_one, summarize
from bench.servers import ServerPool


def metric(url: str, name: str, **labels: str) -> float:
    """Sum of a Prometheus sample over the series whose labels include ``labels``."""
    total = 0.0
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        match = re.fullmatch(r"(\S+?)(?:\{(.*)\})? (\S+)", line)
        if not match or match.group(1) != name:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', match.group(2) or ""))
        if all(found.get(k) == v for k, v in labels.items()):
            total += float(match.group(3))
    return total


async def hop_latency(direct: str, front: str, tokens: int, requests: int) -> list[dict]:
    body_for = chat_body("bench", tokens, fixed_length=True)
    rows = []
    for concurrency in (1, 16):
        for name, url in (("direct", direct), ("front", front), ("direct", direct), ("front", front)):
            level = await run_level(name, url, concurrency=concurrency, num_requests=requests,
                                    body_for=body_for, timeout_s=120)
            rows.append(level.as_dict())
    return rows


async def failover(front: str, replicas: list, tokens: int, requests: int) -> dict:
    body_for = chat_body("bench", tokens, fixed_length=True)
    before = [metric(r.url, "thai:request_success_total") for r in replicas]
    records, done = [], asyncio.Event()
    queue = iter(range(requests))
    async with httpx.AsyncClient(timeout=httpx.Timeout(120, connect=10)) as client:
        async def worker() -> None:
            for i in queue:
                records.append(await stream_one(client, front, body_for(i), 120))
                if len(records) >= requests // 3:
                    done.set()

        async def killer() -> None:
            await done.wait()
            replicas[1].proc.send_signal(signal.SIGKILL)

        loop = asyncio.get_running_loop()
        start = loop.time()
        await asyncio.gather(killer(), *(worker() for _ in range(16)))
        duration = loop.time() - start
    level = summarize("front-failover", 16, records, duration)
    served = [metric(replicas[0].url, "thai:request_success_total") - before[0], None]
    return {"requests": requests, "completed": level.completed, "failed": level.errors,
            "failed_samples": level.error_samples,
            "served_by_replica_0": served[0],
            "served_by_replica_1": "killed (its metrics died with it)",
            "front_ok_per_upstream": {u: metric(front, "thai:upstream_requests_total", upstream=u,
                                                outcome="ok") for u in ("0", "1")},
            "retried": metric(front, "thai:upstream_requests_total", outcome="retried"),
            "duration_s": round(duration, 2)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="base model folder (default: a generated demo checkpoint)")
    p.add_argument("--lora", default="", help="adapter folder")
    p.add_argument("--tokens", type=int, default=32, help="tokens per request")
    p.add_argument("--requests", type=int, default=48, help="requests per level")
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="upstream-hop-"))
    model, lora = args.model, args.lora
    if model is None:
        from api.engine.demo_checkpoint import build_demo_checkpoint

        base, adapter = build_demo_checkpoint(work / "demo", hidden_size=512, num_layers=8)
        model, lora = str(base), str(adapter)
    with ServerPool(work / "logs", env={"THAI_METRICS_PUBLIC": "true", "THAI_DTYPE": "float32"}) as pool:
        replicas = [pool.start_ours(model, lora_dir=lora, max_batch_size=16) for _ in range(2)]
        front_env = {"THAI_ENGINE": "openai", "THAI_UPSTREAM_MODEL": "bench",
                     "THAI_UPSTREAM_HEALTH_INTERVAL_S": "0.5"}
        single = pool.start_ours(model, lora_dir=lora, extra_env={
            **front_env, "THAI_UPSTREAM_URLS": replicas[0].url})
        hop = asyncio.run(hop_latency(replicas[0].url, single.url, args.tokens, args.requests))
        double = pool.start_ours(model, lora_dir=lora, extra_env={
            **front_env, "THAI_UPSTREAM_URLS": f"{replicas[0].url},{replicas[1].url}"})
        fail = asyncio.run(failover(double.url, replicas, args.tokens, args.requests * 2))
    print(f"{'system':8} {'c':>3} {'req/s':>7} {'TTFT p50 ms':>12} {'TTFT p99 ms':>12} {'ITL p50 ms':>11} {'errors':>6}")
    for row in hop:
        print(f"{row['system']:8} {row['concurrency']:>3} {row['requests_per_s']:>7} "
              f"{row['ttft_p50_ms']!s:>12} {row['ttft_p99_ms']!s:>12} {row['itl_p50_ms']!s:>11} {row['errors']:>6}")
    print(json.dumps(fail, indent=1))
    result = {"hop": hop, "failover": fail}
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
