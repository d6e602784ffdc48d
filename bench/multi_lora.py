"""What serving several LoRA adapters per row costs against one merged adapter.

Three engines in this process, on the same base and prompts, each kept busy by
``--concurrency`` clients (8: c8) that send greedy requests of ``--tokens`` tokens:

* ``merged``: one adapter merged into the base (today's path, THAI_LORA_PATH alone);
* ``per_row_1``: adapters unmerged (THAI_ENABLE_LORA), every request on adapter A;
* ``per_row_2``: two adapters unmerged, requests alternating A and B in one batch
  (THAI_LORA_MODULES): the mixed case, target >= 0.7x ``merged``'s throughput.

Printed (one JSON object and a line per engine), never asserted: timings on a shared
machine drift, so the engines run in turns (``--rounds``) and the best round counts.

    python -m bench.multi_lora [--shape demo|small|qwen2.5-1.5b] [--concurrency 8]

``demo``: the tiny generated checkpoint; ``small`` and ``qwen2.5-1.5b``: random weights in
those shapes (``bench/random_model.py``) with rank-16 adapters on every projection.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path

PROMPTS = ["สวัสดีครับ ช่วยเล่าเรื่องประเทศไทยให้ฟังหน่อย", "สรุปข่าวเศรษฐกิจวันนี้",
           "ประเทศไทยมีจังหวัดกี่จังหวัด", "hello, how are you?", "อธิบายการออกกำลังกาย",
           "เขียนกลอนสั้น ๆ เกี่ยวกับทะเล", "แนะนำอาหารไทย", "ข่าวการท่องเที่ยว"]


def random_adapter(base_dir: Path, out: Path, *, seed: int, rank: int = 16) -> Path:
    """A peft LoRA adapter for ``base_dir`` with random A and B (rank ``rank``, every
    projection of the decoder), saved as safetensors."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(
        r=rank, lora_alpha=2 * rank, lora_dropout=0.0, task_type="CAUSAL_LM",
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                        "down_proj"]))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.01)
    peft_model.save_pretrained(out)
    config = json.loads((out / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(base_dir)
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return out


def checkpoint(shape: str, work: Path) -> tuple[Path, Path, Path]:
    """(base, adapter A, adapter B) for ``shape``, built once under ``work``."""
    from api.engine.demo_checkpoint import build_demo_checkpoint, derive_adapter

    out = work / shape
    if shape == "demo":
        if not (out / "lora_b" / "adapter_model.safetensors").exists():
            base, lora = build_demo_checkpoint(out)
            derive_adapter(lora, out / "lora_b", seed=1)
        return out / "base", out / "lora", out / "lora_b"
    from bench.random_model import build_random_model

    base = out / "base"
    if not (base / "config.json").exists():
        build_random_model(base, shape=shape, dtype="float32")
    for name, seed in (("lora", 1), ("lora_b", 2)):
        if not (out / name / "adapter_model.safetensors").exists():
            random_adapter(base, out / name, seed=seed)
    return base, out / "lora", out / "lora_b"


async def throughput(engine, models: list[str | None], *, concurrency: int, requests: int,
                     tokens: int) -> float:
    """Generated tokens per second with ``concurrency`` clients, request i on models[i % n]."""
    from api.engine.types import GenerationRequest, SamplingParams

    params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True,
                            no_repeat_ngram_size=0)
    prompts = [engine.encode_chat([{"role": "user", "content": p}]) for p in PROMPTS]
    todo = list(range(requests))
    done = 0

    async def client() -> None:
        nonlocal done
        while todo:
            i = todo.pop()
            request = GenerationRequest(list(prompts[i % len(prompts)]), params,
                                        model=models[i % len(models)])
            async for chunk in engine.generate(request):
                if chunk.finished:
                    done += chunk.completion_tokens

    start = time.perf_counter()
    await asyncio.gather(*[client() for _ in range(concurrency)])
    return done / (time.perf_counter() - start)


def forward_ms(engine, slots: list[int], *, rows: int, trials: int = 8, steps: int = 10) -> float:
    """The best of ``trials`` mean times of a one-token forward over ``rows`` rows (the
    decode step's matrix work without attention over a cache), rows on ``slots`` in turn:
    the minimum is what the machine gives when no other process competes for it."""
    import torch

    model, lora = engine.bundle.model, engine.bundle.lora
    if lora is not None:
        lora.rows.set([slots[i % len(slots)] for i in range(rows)], torch.device(engine.bundle.device))
    ids = torch.randint(0, 1000, (rows, 1), device=engine.bundle.device)
    best = float("inf")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread: a busy machine's other processes disturb it least
    with torch.inference_mode():
        for _ in range(trials):
            start = time.perf_counter()
            for _ in range(steps):
                model(input_ids=ids)
            best = min(best, (time.perf_counter() - start) / steps)
    torch.set_num_threads(threads)
    if lora is not None:
        lora.rows.set([], torch.device(engine.bundle.device))
    return best * 1e3


async def main_async(args) -> dict:
    from api.engine.transformers_engine import TransformersEngine
    from api.settings import ModelSettings

    base, lora_a, lora_b = checkpoint(args.shape, Path(args.work))
    common = dict(base_model=str(base), lora_path=str(lora_a), require_model=True,
                  dtype=args.dtype, quantization="none", max_batch_size=max(16, args.concurrency),
                  prefix_caching=False, device=args.device)
    setups = {
        "merged": ({}, [None], [0]),
        "per_row_1": ({"enable_lora": True}, [None], [1]),
        "per_row_2": ({"lora_modules": [f"B={lora_b}"]}, [None, "B"], [1, 2]),
    }
    best: dict[str, float] = {}
    forward: dict[str, float] = {}
    for round_ in range(args.rounds):
        for name, (overrides, models, slots) in setups.items():
            engine = TransformersEngine(ModelSettings(**common, **overrides))
            await engine.start()
            await engine.wait_ready()
            assert engine.ready, engine.error
            try:
                ms = forward_ms(engine, slots, rows=args.concurrency)  # the worker is idle
                forward[name] = min(forward.get(name, float("inf")), ms)
                await throughput(engine, models, concurrency=args.concurrency,
                                 requests=args.concurrency, tokens=4)  # warm-up
                rate = await throughput(engine, models, concurrency=args.concurrency,
                                        requests=args.requests, tokens=args.tokens)
            finally:
                await engine.stop()
            best[name] = max(best.get(name, 0.0), rate)
            print(f"round {round_ + 1} {name:10s} {rate:8.1f} tok/s, one-token forward of "
                  f"{args.concurrency} rows {ms:.2f} ms", flush=True)
    return {"shape": args.shape, "concurrency": args.concurrency, "tokens": args.tokens,
            "requests": args.requests, "tok_s": {k: round(v, 1) for k, v in best.items()},
            "ratio_vs_merged": {k: round(v / best["merged"], 3) for k, v in best.items()},
            "forward_ms": {k: round(v, 3) for k, v in forward.items()},
            "forward_speed_vs_merged": {k: round(forward["merged"] / v, 3)
                                        for k, v in forward.items()}}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=["demo", "small", "qwen2.5-1.5b"], default="demo")
    parser.add_argument("--work", default="bench/out/multi_lora", help="where checkpoints are built")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--requests", type=int, default=24)
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    result = asyncio.run(main_async(args))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
