"""What a start costs: time to a loaded model and peak memory, per setting, each in a fresh
process (first start with an empty quantized-weight cache, then a second start reading it).

    python -m bench.start_cost --model /tmp/qwen15 [--dtype bfloat16] \
        [--runs none,auto,auto] [--cache DIR]

Each run is ``python -m bench.start_cost --one SETTING``: the product's loader
(``load_model_bundle``) in a new process; the time is from the process's creation (imports
included) to the loaded model; then one short forward pass reads every weight (a checkpoint
loaded by mmap is resident only once read), and the peak is the kernel's ``VmHWM`` (resident
high-water mark), the final size its ``VmRSS``. The first run of a setting that the cache keeps starts from
an empty cache folder; later runs of it read what the first wrote.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def one(model: str, lora: str, dtype: str, quantization: str, cache: str, max_kl: float) -> dict:
    import psutil

    from api.engine.loader import load_model_bundle
    from api.settings import ModelSettings

    bundle = load_model_bundle(ModelSettings(
        base_model=model, lora_path=lora, require_model=True, device="cpu", dtype=dtype,
        quantization=quantization, quant_cache_dir=cache, quantization_max_kl=max_kl))
    seconds = time.time() - psutil.Process().create_time()
    times = psutil.Process().cpu_times()  # CPU seconds: what a busy machine does not inflate
    import torch

    with torch.inference_mode():  # one short forward: every weight read once, so resident
        bundle.model(torch.tensor([bundle.tokenizer("สวัสดีครับ")["input_ids"]]))
    return {"quantization": quantization, "runs": bundle.quantization,
            "from_cache": "quantized-weight cache" in bundle.quantization_reason,
            "start_s": round(seconds, 2), "cpu_s": round(times.user + times.system, 1),
            "peak_rss_mib": _status_kib("VmHWM") // 1024,
            "final_rss_mib": _status_kib("VmRSS") // 1024, "reason": bundle.quantization_reason}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--lora", default="")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--runs", default="none,auto,auto",
                        help="THAI_QUANTIZATION of each start, in order")
    parser.add_argument("--cache", help="quantized-weight cache folder (default: a new "
                        "temporary one, removed at the end)")
    parser.add_argument("--max-kl", type=float, default=0.01, help="THAI_QUANTIZATION_MAX_KL")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(one(args.model, args.lora, args.dtype, args.one, args.cache or "",
                             args.max_kl)))
        return
    cache = args.cache or tempfile.mkdtemp(prefix="quant-cache-")
    rows = []
    try:
        for quantization in args.runs.split(","):
            out = subprocess.run(
                [sys.executable, "-m", "bench.start_cost", "--model", args.model, "--lora",
                 args.lora, "--dtype", args.dtype, "--cache", cache, "--max-kl", str(args.max_kl),
                 "--one", quantization],
                capture_output=True, text=True, check=True)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), flush=True)
    finally:
        if not args.cache:
            shutil.rmtree(cache, ignore_errors=True)
    print(f"| THAI_QUANTIZATION ({args.dtype}) | runs | from cache | start s | CPU s | "
          "peak RSS MiB | final RSS MiB | peak / final |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['quantization']} | {r['runs']} | {'yes' if r['from_cache'] else 'no'} | "
              f"{r['start_s']} | {r.get('cpu_s', '')} | {r['peak_rss_mib']} | {r['final_rss_mib']} | "
              f"{r['peak_rss_mib'] / max(1, r['final_rss_mib']):.2f} |")


if __name__ == "__main__":
    main()
