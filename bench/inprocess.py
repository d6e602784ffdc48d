"""In-process baselines on the same checkpoint and prompts, no HTTP.

* ``single``: plain ``model.generate`` for one request at a time, the original design's
  design; its tokens/s is what one streamed HTTP request should approach.
* ``static``: one left-padded ``generate`` over a whole batch of N prompts,
  all with the same fixed output length; a ceiling for a batch of N on this
  hardware (no joins, no streaming, no per-token Python work).

Run as ``python -m bench.inprocess --model DIR ...``; prints one JSON object.
It runs in its own process so it gets the same thread settings as the servers.
With ``--serve`` it loads the model once and answers one JSON line per input
line (``single`` or a batch size), so the benchmark can measure each baseline
right next to the HTTP level it is compared with: on a shared machine the load
drifts, and only measurements taken minutes apart would disagree.
"""

from __future__ import annotations

import argparse
import json
import time


def load(model_dir: str, device: str, dtype: str):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    torch_dtype = {"auto": torch.bfloat16 if device == "cuda" else torch.float32,
                   "float32": torch.float32, "bfloat16": torch.bfloat16,
                   "float16": torch.float16}[dtype]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype).to(device).eval()
    return model, tokenizer, device


def encode(tokenizer, indices: list[int]) -> list[list[int]]:
    from bench.workload import messages

    return [list(tokenizer.apply_chat_template(messages(i), add_generation_prompt=True,
                                               tokenize=True, return_dict=False)) for i in indices]


def timed_generate(model, tokenizer, prompts: list[list[int]], tokens: int, device: str) -> float:
    import torch

    width = max(len(p) for p in prompts)
    pad = tokenizer.pad_token_id or 0
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=tokens,
                             min_new_tokens=tokens, do_sample=False, no_repeat_ngram_size=0,
                             pad_token_id=pad)
    if device == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    assert out.shape[1] - width == tokens, "generate stopped early"
    return elapsed


class Baselines:
    """The loaded model, measured on request."""

    def __init__(self, model_dir: str, tokens: int, device: str = "auto", dtype: str = "auto"):
        self.model, self.tokenizer, self.device = load(model_dir, device, dtype)
        self.tokens = tokens
        timed_generate(self.model, self.tokenizer, encode(self.tokenizer, [0]), min(tokens, 8),
                       self.device)  # warm-up

    def single(self, requests: int) -> dict:
        elapsed = sum(timed_generate(self.model, self.tokenizer, encode(self.tokenizer, [i]),
                                     self.tokens, self.device) for i in range(requests))
        return {"requests": requests, "duration_s": round(elapsed, 3),
                "output_tokens_per_s": round(requests * self.tokens / elapsed, 2),
                "requests_per_s": round(requests / elapsed, 3)}

    def static(self, size: int) -> dict:
        elapsed = timed_generate(self.model, self.tokenizer, encode(self.tokenizer, list(range(size))),
                                 self.tokens, self.device)
        return {"batch": size, "duration_s": round(elapsed, 3),
                "output_tokens_per_s": round(size * self.tokens / elapsed, 2),
                "requests_per_s": round(size / elapsed, 3)}


def serve(baselines: Baselines, single_requests: int) -> None:
    """One JSON line out per line in: ``single`` or a static batch size."""
    import sys

    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        what = line.strip()
        if not what:
            continue
        result = (baselines.single(single_requests) if what == "single"
                  else baselines.static(int(what)))
        print(json.dumps(result), flush=True)


def measure(model_dir: str, *, tokens: int, sizes: list[int], single_requests: int,
            device: str = "auto", dtype: str = "auto") -> dict:
    baselines = Baselines(model_dir, tokens, device, dtype)
    return {"output_tokens": tokens, "device": baselines.device,
            "single": baselines.single(single_requests),
            "static": {str(size): baselines.static(size) for size in sizes}}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--sizes", default="4,16,64", help="static batch sizes, comma separated")
    parser.add_argument("--single-requests", type=int, default=4)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--serve", action="store_true", help="answer requests on stdin")
    args = parser.parse_args(argv)
    if args.serve:
        serve(Baselines(args.model, args.tokens, args.device, args.dtype), args.single_requests)
        return
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    print(json.dumps(measure(args.model, tokens=args.tokens, sizes=sizes,
                             single_requests=args.single_requests, device=args.device,
                             dtype=args.dtype)))


if __name__ == "__main__":
    main()
