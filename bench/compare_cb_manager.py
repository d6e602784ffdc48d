"""Mechanism check, in-process and without HTTP: our ``BatchScheduler`` against
transformers' own continuous-batching manager (``model.generate_batch``, paged
attention) on the same checkpoint, prompts and fixed output length.

    python -m bench.compare_cb_manager --model DIR [--requests 16] [--tokens 64]

This is the evidence for the engine's choice of mechanism (bench/RESULTS.md).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time


def ours(model_dir: str, n: int, tokens: int) -> float:
    from api.engine.transformers_engine import TransformersEngine
    from api.engine.types import GenerationRequest, SamplingParams
    from api.settings import ModelSettings
    from bench.workload import messages

    params = SamplingParams(max_tokens=tokens, min_tokens=tokens, ignore_eos=True,
                            temperature=0.0, no_repeat_ngram_size=0)

    async def main() -> float:
        engine = TransformersEngine(ModelSettings(base_model=model_dir, lora_path="",
                                                  require_model=True, max_batch_size=max(n, 1)))
        await engine.start()
        await engine.wait_ready()

        async def one(i: int) -> int:
            request = GenerationRequest(engine.encode_chat(messages(i)), params)
            last = 0
            async for chunk in engine.generate(request):
                last = chunk.completion_tokens
            return last

        try:
            await one(0)  # warm-up
            start = time.perf_counter()
            counts = await asyncio.gather(*(one(i) for i in range(n)))
            return sum(counts) / (time.perf_counter() - start)
        finally:
            await engine.stop()

    return asyncio.run(main())


def transformers_manager(model_dir: str, n: int, tokens: int) -> float:
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from bench.workload import messages

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    inputs = [list(tokenizer.apply_chat_template(messages(i), add_generation_prompt=True,
                                                 tokenize=True, return_dict=False)) for i in range(n)]
    config = GenerationConfig(max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                              eos_token_id=-1, pad_token_id=tokenizer.pad_token_id)
    model.generate_batch(inputs[:1], generation_config=config)  # warm-up
    start = time.perf_counter()
    outputs = model.generate_batch(inputs, generation_config=config)
    elapsed = time.perf_counter() - start
    return sum(len(o.generated_tokens) for o in outputs.values()) / elapsed


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=64)
    args = parser.parse_args(argv)
    result = {"requests": args.requests, "tokens": args.tokens,
              "ours_tok_s": round(ours(args.model, args.requests, args.tokens), 1),
              "transformers_generate_batch_tok_s": round(
                  transformers_manager(args.model, args.requests, args.tokens), 1)}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
