"""How much weight-only int8 changes the model's predictions: KL divergence per token.

Loads the same checkpoint twice through the product's loader (``THAI_QUANTIZATION``
none and int8, same dtype), runs the bundled Thai texts (``assets/examples``)
through both, and reports the mean and worst KL(reference || int8) of the
next-token distributions, and how often the top token agrees::

    python -m bench.quant_quality --model /tmp/qwen15 [--lora DIR] [--dtype bfloat16]

On random weights (``bench.random_model``) the numbers say how much the
arithmetic moves, not how a trained model's quality changes; run it on the
real base model and adapter for that.
"""

from __future__ import annotations

import argparse
import json

import torch

from api.engine.loader import load_model_bundle
from api.settings import ModelSettings
from bench.servers import REPO


def next_token_logprobs(bundle, ids: list[int], window: int) -> torch.Tensor:
    out = []
    with torch.inference_mode():
        for start in range(0, len(ids), window):
            chunk = torch.tensor([ids[start:start + window]])
            out.append(torch.log_softmax(bundle.model(chunk).logits[0].float(), dim=-1))
    return torch.cat(out)


def kl_stats(model: str, lora: str, dtype: str, window: int = 256, max_tokens: int = 1024) -> dict:
    texts = [p.read_text(encoding="utf-8") for p in sorted((REPO / "assets" / "examples").glob("*.txt"))]
    common = dict(base_model=model, lora_path=lora, require_model=True, device="cpu", dtype=dtype)
    reference = load_model_bundle(ModelSettings(**common))
    ids = [i for text in texts for i in reference.tokenizer(text)["input_ids"]][:max_tokens]
    ref = next_token_logprobs(reference, ids, window)
    del reference
    quantized = load_model_bundle(ModelSettings(**common, quantization="int8"))
    q = next_token_logprobs(quantized, ids, window)
    kl = (ref.exp() * (ref - q)).sum(-1)
    return {"tokens": len(ids), "dtype": dtype, "kl_mean": round(kl.mean().item(), 6),
            "kl_p99": round(kl.quantile(0.99).item(), 6), "kl_max": round(kl.max().item(), 6),
            "top1_agreement": round((ref.argmax(-1) == q.argmax(-1)).float().mean().item(), 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--lora", default="")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--max-tokens", type=int, default=1024)
    args = parser.parse_args()
    print(json.dumps(kl_stats(args.model, args.lora, args.dtype, max_tokens=args.max_tokens)))


if __name__ == "__main__":
    main()
