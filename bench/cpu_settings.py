"""Our server's CPU settings side by side: dtype (float32 vs auto) and engine threads.

Each configuration is a real ``app.py`` on the same checkpoint (use the 1.5B
real-shape one from ``bench.random_model``), measured through HTTP the way a
user meets it:

- **long prompt, one stream**: a summary-sized Thai prompt (the bundled long
  article cut to ``--prompt-tokens``, 785 by default), ``--tokens`` output tokens:
  time to first token (prefill) and the decode rate after it;
- **concurrency N**: ``--concurrency`` streams of short Thai prompts at once,
  aggregate output tokens per second.

Prints one JSON object per configuration and a table with ratios against the
first configuration (today's float32 default)::

    python -m bench.random_model --out /tmp/qwen15 --shape qwen2.5-1.5b --dtype bfloat16
    python -m bench.cpu_settings --model /tmp/qwen15
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path

import httpx

from bench.loadgen import chat_body, run_level, stream_one
from bench.servers import REPO, ServerPool

CONFIGS = {
    "float32-threads-all": {"THAI_DTYPE": "float32"},
    "auto-threads-all": {"THAI_DTYPE": "auto"},
    "auto-threads-1": {"THAI_DTYPE": "auto", "THAI_NUM_THREADS": "1"},
    "auto-int8": {"THAI_DTYPE": "auto", "THAI_QUANTIZATION": "int8"},
    "auto-w8a8": {"THAI_DTYPE": "auto", "THAI_QUANTIZATION": "w8a8"},
    "defaults": {"THAI_DTYPE": "auto", "THAI_QUANTIZATION": "auto"},  # the rest: none
}


def long_prompt(model: str, prompt_tokens: int) -> str:
    """The bundled long article, cut to about ``prompt_tokens`` tokens (0: all of it)."""
    article = (REPO / "assets" / "examples" / "long_article.txt").read_text(encoding="utf-8")
    if not prompt_tokens:
        return article
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    empty = tokenizer.apply_chat_template([{"role": "user", "content": ""}], tokenize=True,
                                          add_generation_prompt=True)
    template = len(empty["input_ids"] if hasattr(empty, "keys") else empty)
    ids = tokenizer(article)["input_ids"][: max(1, prompt_tokens - template)]
    return tokenizer.decode(ids)


async def measure(url: str, article: str, tokens: int, concurrency: int, requests: int) -> dict:
    body = {"model": "bench", "messages": [{"role": "user", "content": article}],
            "max_tokens": tokens, "min_tokens": tokens, "ignore_eos": True, "temperature": 0.0,
            "no_repeat_ngram_size": 0, "stream": True, "stream_options": {"include_usage": True}}
    async with httpx.AsyncClient(timeout=600) as client:
        # One warm-up, then the measured long stream.
        await stream_one(client, url, {**body, "max_tokens": 2, "min_tokens": 2}, 600)
        started = time.perf_counter()
        record = await stream_one(client, url, body, 600)
        elapsed = time.perf_counter() - started
        usage = (await client.post(url + "/v1/chat/completions", json={
            **body, "stream": False, "max_tokens": 1, "min_tokens": 1})).json()["usage"]
    if not record.ok:
        raise RuntimeError(record.error)
    decode_s = elapsed - record.ttft
    level = await run_level("ours", url, concurrency=concurrency, num_requests=requests,
                            body_for=chat_body("bench", tokens, fixed_length=True), timeout_s=600)
    return {"prompt_tokens": usage["prompt_tokens"], "ttft_s": round(record.ttft, 2),
            "decode_tok_s": round((record.tokens - 1) / decode_s, 2) if decode_s > 0 else None,
            f"c{concurrency}_tok_s": level.output_tokens_per_s, f"c{concurrency}_errors": level.errors}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="checkpoint folder (e.g. the 1.5B real shape)")
    parser.add_argument("--configs", default=",".join(CONFIGS), help="subset, comma separated")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--prompt-tokens", type=int, default=785,
                        help="cut the long prompt to about this many tokens (0: the whole article)")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--out", default=str(REPO / "bench" / "out"))
    args = parser.parse_args()

    article = long_prompt(args.model, args.prompt_tokens)
    results = {}
    for name in args.configs.split(","):
        with ServerPool(Path(args.out) / "cpu-settings") as pool:
            server = pool.start_ours(args.model, dtype=CONFIGS[name].get("THAI_DTYPE", "auto"),
                                     extra_env={**CONFIGS[name], "THAI_LOG_LEVEL": "info"})
            health = httpx.get(server.url + "/health").json()
            result = asyncio.run(measure(server.url, article, args.tokens, args.concurrency,
                                         args.requests))
            result.update(dtype=health["dtype"], dtype_reason=health.get("dtype_reason"),
                          ready_s=round(server.ready_s, 1))
            results[name] = result
            print(json.dumps({"config": name, **result}, ensure_ascii=False), flush=True)
    base = next(iter(results.values()))
    key = f"c{args.concurrency}_tok_s"
    print(f"\n| config | dtype | TTFT {base['prompt_tokens']} tok (s) | decode tok/s | {key} "
          "| TTFT ratio | decode ratio | c ratio |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for name, r in results.items():
        print(f"| {name} | {r['dtype']} | {r['ttft_s']} | {r['decode_tok_s']} | {r[key]} | "
              f"{r['ttft_s'] / base['ttft_s']:.2f} | {r['decode_tok_s'] / base['decode_tok_s']:.2f} | "
              f"{r[key] / base[key]:.2f} |")


if __name__ == "__main__":
    main()
